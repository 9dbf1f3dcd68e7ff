#pragma once
// Where a group's agreed rounds are published for its ranks and their serving processes'
// scheduler threads: one writer (the TP supervisor), any number of readers. poll() never blocks
// and never allocates; every reader sees the same immutable record for a round.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "actors/agreement.hpp"

namespace kvflow {

struct agreed_view {
  std::uint64_t round = 0;
  int group = 0;
  step_states states;  // sorted by (room, incarnation)
};

class agreed_board {
 public:
  void publish(std::shared_ptr<const agreed_view> v) {
    auto round = v->round;
    std::atomic_store_explicit(&latest_, std::move(v), std::memory_order_release);
    {
      std::lock_guard<std::mutex> g(wait_mutex_);
      round_ = round;
    }
    waiters_.notify_all();
  }
  // The latest agreed round, or null before the first one.
  std::shared_ptr<const agreed_view> poll() const {
    return std::atomic_load_explicit(&latest_, std::memory_order_acquire);
  }
  // Blocks until round `round` or a later one is published, or `timeout` passes. For tools and
  // benchmarks only: a scheduler thread uses poll().
  bool wait_for(std::uint64_t round, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> g(wait_mutex_);
    return waiters_.wait_for(g, timeout, [&] { return round_ >= round; });
  }

 private:
  std::shared_ptr<const agreed_view> latest_;
  std::mutex wait_mutex_;
  std::condition_variable waiters_;
  std::uint64_t round_ = 0;
};

}  // namespace kvflow
