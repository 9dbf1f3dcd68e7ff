#pragma once
// A group's per-step agreement (semantics.md section 3) through POSIX shared memory, for ranks
// of one host in several processes. Through messages, a round costs every rank a report to a
// supervisor in another process and a round back, each crossing two processes' network threads;
// here a rank writes its post into its own slot of the group's segment, the post that completes
// a round wakes one combiner thread (in the process of the group's leader), and the combiner
// writes the agreed round into a ring of rounds in the segment that every rank reads where it
// is, without a message or a lock. One futex wake reaches the combiner per round, one reaches
// the ranks that wait for it. Ranks on other hosts feed the same combiner by message
// (shm_combiner::post_remote) and get its rounds by message. No CAF here (TSan sees all of it).
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "actors/agreed_ring.hpp"
#include "actors/agreement.hpp"
#include "config/status.hpp"

namespace kvflow {

struct shm_shape {
  int ranks = 1;       // children of the group, each with its own post slots
  int post_slots = 4;  // rounds a rank may post ahead of the last merged round
  int ring_slots = 16; // agreed rounds kept (more than the agreement lag)
  int max_rooms = 4096;  // rooms one post holds; an agreed round holds twice as many
};

// One mapping of a group's segment.
class shm_segment {
 public:
  // Creates the segment `name` (it must not exist), sized and allocated at once: a full
  // /dev/shm fails here, with a reason, not later with SIGBUS.
  static result<std::shared_ptr<shm_segment>> create(const std::string& name, int group, const shm_shape& shape);
  // Maps an existing segment; fails unless it is the one `name` and `group` promise.
  static result<std::shared_ptr<shm_segment>> open(const std::string& name, int group);
  ~shm_segment();
  shm_segment(const shm_segment&) = delete;
  shm_segment& operator=(const shm_segment&) = delete;

  // Removes the name (the mapping stays); what every member opened needs no name any more.
  void unlink();
  const shm_shape& shape() const { return shape_; }
  const std::string& name() const { return name_; }

  enum class post_result { posted, full, too_many_rooms, duplicate };
  // Child `child` posts its states for `round` (rounds rise by one per child). `full`: the
  // group merged nothing for post_slots rounds; waits up to `wait` for a slot first.
  // `unchanged`: the states are those of its post of round - 1 (nothing is copied).
  post_result post(int child, std::uint64_t round, const step_states& states, std::chrono::microseconds wait,
                   bool unchanged = false);
  // Copies agreed round `round` into `out`; false when it is not published (or was lapped).
  bool read(std::uint64_t round, agreed_view& out) const;
  // Whether agreed round `round` is published and holds the very states of round `held` (an
  // earlier round the caller read): then there is nothing to copy. The common step changes
  // nothing, and a copy out of memory another core wrote costs a cache miss per line.
  bool same_as(std::uint64_t round, std::uint64_t held) const;
  // Waits up to `timeout` for round `round`; true once it is published.
  bool wait(std::uint64_t round, std::chrono::microseconds timeout) const;
  // Why the group can no longer agree here (empty while it can).
  std::string broken() const;

 private:
  friend class shm_combiner;
  struct header;
  struct slot;
  // Where a segment of a shape keeps its parts. create() lays a segment out so and open() takes
  // only one whose header says so; kept here, not read from the header again (it lies in memory
  // other processes write).
  struct layout {
    std::size_t post_bytes = 0, ring_bytes = 0, arrivals_offset = 0, posts_offset = 0, ring_offset = 0, total = 0;
  };
  // Empty for an invalid shape, or one whose segment could not be mapped.
  static std::optional<layout> layout_of(const shm_shape& s);
  shm_segment(std::string name, void* base, const shm_shape& shape, const layout& at, bool owner);
  header& head() const;
  slot& post_slot(int child, std::uint64_t round) const;
  slot& ring_slot(std::uint64_t round) const;
  std::atomic<std::uint64_t>& arrivals(std::uint64_t round) const;
  // Counts a post of `round` into the segment; true when the round may be complete (then the
  // combiner is woken).
  bool arrive(std::uint64_t round) const;
  void wake_combiner() const;
  // Until done() or `timeout` (a template: the post of every step asks it once, without waiting).
  template <class Done>
  bool wait_published(const Done& done, std::chrono::microseconds timeout) const;

  std::string name_;
  void* base_ = nullptr;
  std::size_t size_ = 0;
  bool owner_ = false;
  bool linked_ = false;
  shm_shape shape_;
  layout at_;
};

// The group's merge, in the leader's process: a thread that sleeps until a post completes a
// round, then merges every complete round in order (round_collector, agreed_table: the rules
// of the message tree) and publishes it in the segment's ring. `on_agreed` (may be empty) gets
// every agreed round, on the merging thread: the rounds ranks on other hosts are sent.
class shm_combiner {
 public:
  using agreed_fn = std::function<void(const std::shared_ptr<const agreed_view>&)>;
  static constexpr std::chrono::milliseconds default_idle_check{200};
  // `idle_check`: how long the thread sleeps when no post woke it (a safety net; the tests set
  // it beyond their waits, so that a lost wake-up fails them). `tombstone_age`: how long the
  // agreed table remembers a request that ended (actors/agreement.hpp).
  shm_combiner(std::shared_ptr<shm_segment> segment, int group, agreed_fn on_agreed,
               std::chrono::milliseconds idle_check = default_idle_check,
               std::chrono::milliseconds tombstone_age = kvflow::tombstone_age(config::tunables{}));
  ~shm_combiner();  // stops the thread
  shm_combiner(const shm_combiner&) = delete;
  shm_combiner& operator=(const shm_combiner&) = delete;

  // A child that reports by message (another host) posted `round`.
  void post_remote(int child, std::uint64_t round, step_states states);
  // A child died: it is no longer waited for, and its rooms fail (as in the message tree).
  void child_down(int child);
  // Every child is dead: nothing more can be agreed.
  bool all_down() const;
  std::uint64_t merged() const;  // the last round merged

 private:
  void run();
  void advance();  // under mutex_
  bool ready(std::uint64_t round) const;  // under mutex_
  void publish(std::uint64_t round, const step_states& agreed);  // under mutex_

  std::shared_ptr<shm_segment> seg_;
  int group_;
  agreed_fn on_agreed_;
  std::chrono::milliseconds idle_check_;
  mutable std::mutex mutex_;
  agreed_table table_;
  std::vector<bool> dead_;
  std::vector<bool> by_message_;  // reported by message at least once
  std::vector<std::map<std::uint64_t, step_states>> remote_;
  std::vector<step_states> last_post_;  // each child's latest post (a dead child's: its last)
  std::vector<const step_states*> inputs_, dead_posts_;  // advance()'s, kept for their capacity
  std::uint64_t next_ = 1;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace kvflow
