#pragma once
// When a completion thread looks for a GPU push's end. Asleep on a blocking event, the thread
// wakes ~85 us after a 32k-token request's 0.65 ms copy ends (bench gpu, H200, 2026-12-04): an
// eighth of the copy. So it sleeps until shortly before the push's predicted end (its bytes at the
// rate the last pushes ran on the GPU, timed by their events), looks a few times a short interval
// apart, and only then sleeps on the event. No rate yet, or a push too small to time, or one the
// looks missed (queued behind a fence the engine has not reached): the event alone, as before.
#include <chrono>
#include <cstdint>
#include <optional>

namespace kvflow::transport {

class completion_pacer {
 public:
  using duration = std::chrono::nanoseconds;
  struct plan {
    duration first_look{0};  // after the push's GPU work could start
    int looks = 0;           // at most, `interval` apart, before sleeping on the event
    duration interval{0};
  };
  struct settings {
    std::uint64_t min_bytes = 1u << 20;  // smaller pushes: launch costs, not bytes, set their time
    double early = 0.9;                  // first look at this share of the predicted time...
    duration interval = std::chrono::microseconds(10);
    duration min_window = std::chrono::microseconds(50);   // looks span at least this...
    double window_share = 0.25;                            // ...or this share of the prediction...
    duration max_window = std::chrono::microseconds(400);  // ...but no more (nor that early)
    double weight = 0.25;                                  // of a new observation in the rate
  };

  completion_pacer() = default;
  explicit completion_pacer(settings s) : s_(s) {}

  // How to look for a push of `bytes`; none: sleep on its event.
  std::optional<plan> plan_for(std::uint64_t bytes) const;
  // A push of `bytes` ran `gpu_ms` on the GPU (from its first kernel's start to its end).
  void observed(std::uint64_t bytes, double gpu_ms);
  // Nanoseconds per byte the pushes have shown (0: none timed yet).
  double ns_per_byte() const { return ns_per_byte_; }

 private:
  settings s_;
  double ns_per_byte_ = 0;
};

}  // namespace kvflow::transport
