#pragma once
// Where a rank publishes each agreed round for its serving process's scheduler thread: one
// writer (the rank actor), any number of readers; poll() never blocks and never allocates.
#include <atomic>
#include <cstdint>
#include <memory>

#include "actors/agreement.hpp"

namespace kvflow {

struct agreed_view {
  std::uint64_t round = 0;
  step_states states;
};

class agreed_board {
 public:
  void publish(std::shared_ptr<const agreed_view> v) {
    std::atomic_store_explicit(&latest_, std::move(v), std::memory_order_release);
  }
  // The latest agreed round, or null before the first one.
  std::shared_ptr<const agreed_view> poll() const {
    return std::atomic_load_explicit(&latest_, std::memory_order_acquire);
  }

 private:
  std::shared_ptr<const agreed_view> latest_;
};

}  // namespace kvflow
