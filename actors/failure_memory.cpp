#include "failure_memory.hpp"

namespace kvflow {

void failure_memory::remember(const key& k, const std::string& reason, time_point now) {
  expire(now);
  if (reason.empty() || !reasons_.emplace(k, entry{reason, now}).second) return;
  order_.push_back(k);
  while (order_.size() > max_entries_) {
    reasons_.erase(order_.front());
    order_.pop_front();
  }
}

const std::string* failure_memory::find(const key& k, time_point now) const {
  auto it = reasons_.find(k);
  if (it == reasons_.end() || expired(it->second, now)) return nullptr;
  return &it->second.reason;
}

void failure_memory::expire(time_point now) {
  // Entries are remembered in time order, so the expired ones are a prefix of order_.
  while (!order_.empty()) {
    auto it = reasons_.find(order_.front());
    if (it != reasons_.end() && !expired(it->second, now)) break;
    if (it != reasons_.end()) reasons_.erase(it);
    order_.pop_front();
  }
}

}  // namespace kvflow
