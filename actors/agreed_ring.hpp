#pragma once
// Where a group's agreed rounds are published for its ranks' scheduler threads: one writer (the
// TP supervisor in this process, or the rank that receives the rounds of a supervisor in another
// process), any number of readers. Rounds are kept by number in a ring, so that a scheduler at
// step k reads round k - L — the same record on every rank — and never "the latest round".
//
// Why a reader's record stays valid until its next poll: round r + capacity overwrites round r,
// and no round completes before every rank of the group posted it; a reader at step k has not
// posted k + 1, so rounds above k cannot complete while it holds round k - L (capacity > L).
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "actors/agreement.hpp"

namespace kvflow {

struct agreed_view {
  std::uint64_t round = 0;
  int group = 0;
  step_states states;  // sorted by (room, incarnation)
  // Rounds same_since..round agreed these very states (0: not known). A reader that holds one
  // of them has nothing to copy or act on: the common step changes nothing.
  std::uint64_t same_since = 0;
};

class agreed_ring {
 public:
  explicit agreed_ring(std::size_t capacity = 256) : slots_(capacity) {}

  // Publishes round `v->round`. Rounds may come out of order (a round sent by message can overtake the one before it when
  // the route between two processes changes): a round is taken unless its slot already holds
  // it or a later round.
  void publish(std::shared_ptr<const agreed_view> v) {
    const auto round = v->round;
    auto& s = slots_[round % slots_.size()];
    if (round == 0 || s.round.load(std::memory_order_relaxed) >= round) return;
    s.round.store(0, std::memory_order_release);  // readers of the old round see it leave
    s.view = std::move(v);
    s.round.store(round, std::memory_order_release);
    if (round > latest_.load(std::memory_order_relaxed)) latest_.store(round);
    // seq_cst increment then load, paired with the waiter's increment then load of published_:
    // one of the two sees the other, so no wake-up is lost.
    published_.fetch_add(1);
    if (waiters_.load() > 0) {
      std::lock_guard<std::mutex> g(wait_mutex_);
      waiters_cv_.notify_all();
    }
  }

  // Round `round` if it is published and still held; null otherwise. Wait-free.
  const agreed_view* get(std::uint64_t round) const {
    const auto& s = slots_[round % slots_.size()];
    if (s.round.load(std::memory_order_acquire) != round) return nullptr;
    const agreed_view* v = s.view.get();
    // A writer lapping the ring would have cleared the slot's round first.
    if (s.round.load(std::memory_order_acquire) != round) return nullptr;
    return v;
  }

  // Waits until round `round` is published or `timeout` passes. For a scheduler whose round is
  // late (counted as a stall by the caller).
  const agreed_view* wait_for(std::uint64_t round, std::chrono::microseconds timeout) {
    if (auto* v = get(round)) return v;
    waiters_.fetch_add(1);
    {
      std::unique_lock<std::mutex> g(wait_mutex_);
      waiters_cv_.wait_for(g, timeout, [&] {
        published_.load();
        return get(round) != nullptr || latest_.load() >= round + slots_.size();  // here, or lapped
      });
    }
    waiters_.fetch_sub(1);
    return get(round);
  }

  std::uint64_t latest() const { return latest_.load(std::memory_order_acquire); }
  std::size_t capacity() const { return slots_.size(); }

 private:
  struct slot {
    std::atomic<std::uint64_t> round{0};
    std::shared_ptr<const agreed_view> view;
  };
  std::vector<slot> slots_;
  std::atomic<std::uint64_t> latest_{0};
  std::atomic<std::uint64_t> published_{0};  // every publish (the waiters' seq_cst partner)
  std::atomic<int> waiters_{0};
  std::mutex wait_mutex_;
  std::condition_variable waiters_cv_;
};

}  // namespace kvflow
