#pragma once
// The engine's ready fence, taken over at the call: an engine records its CUDA event and may
// record it again for its next chunk (or destroy it) as soon as send() returned, long before a
// transport queues the push. So the call makes a stream of this pool wait for the engine's event
// and records one of the pool's own events after it; the transport's stream waits on that one.
// A pool event is given back once every push that waits on it was queued (a wait takes the
// event's state when it is queued, so the event may be recorded again from then on). Captures
// go through one stream in order: a fence completes no earlier than the fences captured before
// it, as an engine's chunks on one compute stream do anyway.
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "config/status.hpp"
#include "cuda/gpu.hpp"

namespace kvflow::cuda {

class fence_pool {
 public:
  static result<std::unique_ptr<fence_pool>> create(int device);
  // The pool's event that completes once `engine_event` (a cudaEvent_t) did; never blocks.
  result<std::uintptr_t> capture(std::uintptr_t engine_event);
  // `fence` (from capture) may be recorded again.
  void give_back(std::uintptr_t fence);
  int device() const { return stream_.device(); }

 private:
  explicit fence_pool(stream s) : stream_(std::move(s)) {}
  std::mutex m_;
  stream stream_;
  std::vector<event> events_;     // every event this pool made (a handful: one per chunk in flight)
  std::vector<std::size_t> free_;  // of those, the ones that may be recorded again
};

}  // namespace kvflow::cuda
