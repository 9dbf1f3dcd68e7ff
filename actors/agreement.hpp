#pragma once
// The poll agreement (semantics.md section 3) as pure data structures: a node of the merge tree
// collects its children's states for a round and MIN-merges them; the root keeps the agreed
// state monotone (only rises, except to Failed). No actors: the supervisors drive these.
#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <unordered_map>
#include <unordered_set>
#include <string>
#include <vector>

#include "actors/kv_poll.hpp"
#include "config/tunables.hpp"

namespace kvflow {

struct room_state {
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::uint8_t state = 0;  // kv_poll
  // This rank let go of the room's memory: nothing it started can still write (decode: into
  // its pages; prefill: read them). Merged by AND; only meaningful once terminal.
  bool released = false;
  bool operator==(const room_state& o) const {
    return room == o.room && incarnation == o.incarnation && state == o.state && released == o.released;
  }
};

// Sorted by (room, incarnation), each key once.
using step_states = std::vector<room_state>;

inline bool key_less(const room_state& a, const room_state& b) {
  return a.room != b.room ? a.room < b.room : a.incarnation < b.incarnation;
}

// Why `s` is not a well-formed report (sorted by key, each key once, every state a kv_poll);
// empty when it is. The merge below relies on all three.
std::string malformed(const step_states& s);

// MIN-merge of sorted lists (states by MIN, `released` by AND). A key missing from one input
// counts as Bootstrapping there (that child has not created the room yet, or cleared it after
// the group released it; the root keeps terminal states monotone) and as released.
step_states merge_min(const std::vector<const step_states*>& inputs);

// A round's merge once some children died: every room a live child (in `merged`) or a dead one
// (its last report, in `dead_reports`) holds is Failed; a dead child holds none of their memory.
step_states fail_with_dead(step_states merged, const std::vector<const step_states*>& dead_reports);

// Collects one round from `children` children; children may be declared dead, after which they
// count as Failed for every room of every round and are no longer waited for.
class round_collector {
 public:
  explicit round_collector(int children);

  // Records child's states for `round`. Returns true if this completed the round (then take()).
  bool add(int child, std::uint64_t round, step_states states);
  // Marks a child dead. Returns the rounds this completed, in order.
  std::vector<std::uint64_t> child_down(int child);
  // Merged result of a complete round; removes it. Rounds are taken in order: a report for a
  // round taken already is ignored.
  step_states take(std::uint64_t round);
  bool complete(std::uint64_t round) const;
  int live_children() const { return live_; }
  bool is_dead(int child) const { return dead_[child]; }

 private:
  struct pending {
    std::vector<bool> got;
    int count = 0;
    std::vector<step_states> parts;
  };
  int children_;
  int live_;
  std::vector<bool> dead_;
  std::vector<step_states> last_;  // each child's last report (its rooms fail when it dies)
  std::map<std::uint64_t, pending> rounds_;
  std::uint64_t taken_ = 0;  // the last round taken
};

// How long a root remembers a request that ended (its tombstone) under `t`: failure_memory_ms,
// never less than the bootstrap timeout. A tombstone ends at once the request of a rank whose
// engine creates it after its group ended it; such a create comes within the bootstrap timeout
// of the end where the rank's own memory of it does (the late-create window), so the tombstone
// must live at least as long. A create later than the tombstone opens the key again at
// Bootstrapping, and the rank fails it after the bootstrap timeout: late, not lost.
std::chrono::milliseconds tombstone_age(const config::tunables& t);

// The root's memory: agreed states only rise, except to Failed; a terminal agreed state is final
// and an agreed release stays agreed; a key disappears once no child
// reports it any more, and is then remembered for a while as a tombstone so that a late rank
// that creates it again cannot restart it from Bootstrapping. Tombstones are bounded by count
// (the oldest go first) and by age (see tombstone_age): each apply forgets those older than the
// age, and rounds come every step, idle or not, so they go without new requests.
class agreed_table {
 public:
  using clock = std::chrono::steady_clock;
  explicit agreed_table(std::size_t tombstones = 65536,
                        std::chrono::milliseconds age = tombstone_age(config::tunables{}))
      : max_tombstones_(tombstones), tombstone_age_(age) {}
  // Applies a round's merged states at `now` (monotone from one apply to the next); returns the
  // agreed states of the round (sorted).
  step_states apply(const step_states& merged, clock::time_point now);
  step_states apply(const step_states& merged) { return apply(merged, clock::now()); }
  std::size_t size() const { return agreed_.size(); }
  std::size_t tombstones() const { return tombstones_.size(); }
  // The apply (counted from 1) since which every apply agreed the very states of the last one.
  // Its callers apply rounds 1, 2, ... in order, so it is a round: what lets a reader that holds
  // one of those rounds skip the copy and the comparison (agreed_view::same_since).
  std::uint64_t same_since() const { return same_since_; }

 private:
  using key = std::pair<std::uint64_t, std::uint64_t>;
  struct key_hash {
    std::size_t operator()(const std::pair<std::uint64_t, std::uint64_t>& k) const {
      return std::hash<std::uint64_t>()(k.first * 0x9E3779B97F4A7C15ULL ^ k.second);
    }
  };
  step_states agreed_;  // sorted, like every round's merge
  std::uint64_t applied_ = 0, same_since_ = 0;
  void drop_oldest_tombstone();
  std::unordered_map<key, room_state, key_hash> tombstones_;
  std::deque<std::pair<key, clock::time_point>> tombstone_order_;  // oldest first, one per tombstone
  std::size_t max_tombstones_;
  std::chrono::milliseconds tombstone_age_;
};

}  // namespace kvflow
