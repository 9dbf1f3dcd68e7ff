#pragma once
// What a rank remembers of requests that failed: (room, incarnation) -> reason, bounded by count
// and by age. A prefill rank's requests that failed or were aborted before they arrived, and
// every rank's reasons of the failed requests it cleared (rank_shared). Pure: the caller passes
// the time, so a test can drive it without an actor or a clock.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <utility>

namespace kvflow {

class failure_memory {
 public:
  using key = std::pair<std::uint64_t, std::uint64_t>;  // (room, incarnation)
  using time_point = std::chrono::steady_clock::time_point;

  failure_memory(std::size_t max_entries, std::chrono::milliseconds max_age)
      : max_entries_(max_entries), max_age_(max_age) {}

  // Remembers `k` failed for `reason` at `now`; an empty reason, or a key already remembered,
  // changes nothing (the first reason is the one reported). Entries past their age, and the
  // oldest beyond the count, are dropped.
  void remember(const key& k, const std::string& reason, time_point now);
  // The same, but a key already remembered takes the new reason, aged from `now` (a room used
  // again under the same key is a new request: its own reason is the one reported).
  void replace(const key& k, const std::string& reason, time_point now);

  // The reason `k` failed, or nullptr where it is not remembered or was remembered longer ago
  // than the age bound.
  const std::string* find(const key& k, time_point now) const;

  // Drops what is older than the age bound (remember does too; a prefill rank also does on every
  // new request and on a timer set for next_expiry(), every rank on every step's poll, so
  // failures stop costing memory once they stop coming). Looks at the oldest entry only when
  // none is due.
  void expire(time_point now);

  std::size_t size() const { return reasons_.size(); }
  // When the oldest entry's age runs out (expire at or after it drops it), or nullopt when
  // nothing is remembered: a rank's timer for forgetting without new requests.
  std::optional<time_point> next_expiry() const {
    if (order_.empty()) return std::nullopt;
    return order_.front().second + max_age_;
  }

 private:
  struct entry {
    std::string reason;
    time_point at;
  };
  bool expired(const entry& e, time_point now) const { return now - e.at >= max_age_; }

  std::size_t max_entries_;
  std::chrono::milliseconds max_age_;
  std::map<key, entry> reasons_;
  std::deque<std::pair<key, time_point>> order_;  // oldest first; one per entry of reasons_, its time
};

}  // namespace kvflow
