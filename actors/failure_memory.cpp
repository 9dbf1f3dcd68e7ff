#include "failure_memory.hpp"

#include <algorithm>

namespace kvflow {

void failure_memory::remember(const key& k, const std::string& reason, time_point now) {
  expire(now);
  if (reason.empty() || !reasons_.emplace(k, entry{reason, now}).second) return;
  order_.emplace_back(k, now);
  while (order_.size() > max_entries_) {
    reasons_.erase(order_.front().first);
    order_.pop_front();
  }
}

void failure_memory::replace(const key& k, const std::string& reason, time_point now) {
  expire(now);
  if (reason.empty()) return;
  if (auto it = reasons_.find(k); it != reasons_.end()) {
    // Rare (a key remembered twice): its place in the order moves to the back.
    reasons_.erase(it);
    order_.erase(std::find_if(order_.begin(), order_.end(), [&](const auto& o) { return o.first == k; }));
  }
  remember(k, reason, now);
}

const std::string* failure_memory::find(const key& k, time_point now) const {
  auto it = reasons_.find(k);
  if (it == reasons_.end() || expired(it->second, now)) return nullptr;
  return &it->second.reason;
}

void failure_memory::expire(time_point now) {
  // Entries are remembered in time order, so the expired ones are a prefix of order_.
  while (!order_.empty() && now - order_.front().second >= max_age_) {
    reasons_.erase(order_.front().first);
    order_.pop_front();
  }
}

}  // namespace kvflow
