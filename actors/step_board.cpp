#include "actors/step_board.hpp"

namespace kvflow {

bool step_board::complete(const pending& p) const {
  return static_cast<int>(p.posts.size()) + dead_count_ >= children_;
}

bool step_board::post(int child, std::uint64_t round, step_states states) {
  std::lock_guard<std::mutex> g(mutex_);
  if (child < 0 || child >= children_ || dead_[child]) return false;
  auto& p = rounds_[round];
  for (const auto& [c, s] : p.posts)
    if (c == child) return false;  // one post per child per round
  p.posts.emplace_back(child, std::move(states));
  if (p.signaled || !complete(p)) return false;
  p.signaled = true;
  return true;
}

std::vector<std::uint64_t> step_board::child_down(int child) {
  std::lock_guard<std::mutex> g(mutex_);
  std::vector<std::uint64_t> done;
  if (child < 0 || child >= children_ || dead_[child]) return done;
  dead_[child] = true;
  ++dead_count_;
  for (auto& [round, p] : rounds_) {
    // A post the dead child made no longer counts: its rooms fail through the collector.
    for (auto it = p.posts.begin(); it != p.posts.end(); ++it)
      if (it->first == child) {
        p.posts.erase(it);
        break;
      }
    if (!p.signaled && complete(p)) {
      p.signaled = true;
      done.push_back(round);
    }
  }
  return done;
}

std::vector<std::pair<int, step_states>> step_board::take(std::uint64_t round) {
  std::lock_guard<std::mutex> g(mutex_);
  auto it = rounds_.find(round);
  if (it == rounds_.end()) return {};
  auto posts = std::move(it->second.posts);
  rounds_.erase(it);
  return posts;
}

}  // namespace kvflow
