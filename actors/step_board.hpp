#pragma once
// In-process fast path of the per-step agreement: the CP ranks of a shard (or the TP ranks of a
// decode group) post their step states here instead of sending one message each; the post that
// completes a round tells its caller to wake the supervisor, so a shard costs one message per
// step, not one per rank. Ranks in other processes use msg::step_report instead.
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include "actors/agreement.hpp"

namespace kvflow {

class step_board {
 public:
  explicit step_board(int children) : children_(children), dead_(children, false) {}

  // Child `child` posts its states for `round`. True when this post completed the round (every
  // live child posted it): the caller then wakes the supervisor, exactly once per round.
  bool post(int child, std::uint64_t round, step_states states);
  // A child died: it is no longer waited for. Returns the rounds this completed.
  std::vector<std::uint64_t> child_down(int child);
  // The posts of a completed round, one entry per child that posted (child index, states).
  std::vector<std::pair<int, step_states>> take(std::uint64_t round);

 private:
  struct pending {
    std::vector<std::pair<int, step_states>> posts;
    bool signaled = false;
  };
  bool complete(const pending& p) const;
  int children_;
  int dead_count_ = 0;
  std::vector<bool> dead_;
  std::mutex mutex_;
  std::map<std::uint64_t, pending> rounds_;
};

}  // namespace kvflow
