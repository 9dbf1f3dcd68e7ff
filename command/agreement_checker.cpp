#include "command/agreement_checker.hpp"

#include <algorithm>

namespace kvflow::command {

void agreement_checker::add_rank(int group) {
  std::lock_guard<std::mutex> g(mutex_);
  ++ranks_[group];
}

bool agreement_checker::first_of_round(int group, std::uint64_t round, std::uint64_t digest) {
  auto [it, fresh] = rounds_.emplace(std::make_pair(group, round), seen{digest, 0});
  if (!fresh && it->second.digest != digest)
    problem("group " + std::to_string(group) + " round " + std::to_string(round) +
            ": ranks received different agreed states");
  if (auto n = ranks_.find(group); n != ranks_.end() && ++it->second.reports >= n->second) rounds_.erase(it);
  if (fresh) ++checked_;
  return fresh;
}

void agreement_checker::on_digest(int group, std::uint64_t round, std::uint64_t digest) {
  std::lock_guard<std::mutex> g(mutex_);
  first_of_round(group, round, digest);
}

void agreement_checker::on_round(int group, const round_view& round) {
  const auto h = round_digest(round);
  std::lock_guard<std::mutex> g(mutex_);
  if (!first_of_round(group, round.round, h)) return;
  for (const auto& s : round) {
    auto [prev, first] = last_.emplace(std::make_tuple(group, s.id.room, s.id.incarnation), room_seen{s.state, round.round});
    prev->second.round = std::max(prev->second.round, round.round);
    if (first) continue;
    const poll_state old = prev->second.state, now = s.state;
    const bool terminal = old == poll_state::success || old == poll_state::failed;
    const bool ok = terminal ? now == old : (now == poll_state::failed || now >= old);
    if (!ok)
      problem("group " + std::to_string(group) + " room " + std::to_string(s.id.room) + ": agreed " +
              to_string(old) + " then " + to_string(now) + " at round " + std::to_string(round.round));
    prev->second.state = s.state;
  }
  forget_old_rooms(group, round.round);
}

void agreement_checker::forget_old_rooms(int group, std::uint64_t round) {
  // A sweep every quarter window: what is held stays within about 1.25 windows of rooms.
  auto& swept = swept_[group];
  if (round < swept + forget_after_ / 4 + 1) return;
  swept = round;
  auto it = last_.lower_bound(std::make_tuple(group, std::uint64_t{0}, std::uint64_t{0}));
  while (it != last_.end() && std::get<0>(it->first) == group) {
    if (it->second.round + forget_after_ < round)
      it = last_.erase(it);
    else
      ++it;
  }
}

std::size_t agreement_checker::rooms_tracked() const {
  std::lock_guard<std::mutex> g(mutex_);
  return last_.size();
}

std::size_t agreement_checker::rounds_tracked() const {
  std::lock_guard<std::mutex> g(mutex_);
  return rounds_.size();
}

std::vector<std::string> agreement_checker::problems() const {
  std::lock_guard<std::mutex> g(mutex_);
  return problems_;
}

std::uint64_t agreement_checker::violations() const {
  std::lock_guard<std::mutex> g(mutex_);
  return violations_;
}

std::uint64_t agreement_checker::rounds_checked() const {
  std::lock_guard<std::mutex> g(mutex_);
  return checked_;
}

void agreement_checker::problem(std::string p) {
  ++violations_;
  if (problems_.size() < 10) problems_.push_back(std::move(p));
}

}  // namespace kvflow::command
