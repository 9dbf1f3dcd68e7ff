#pragma once
// Checks, across threads, what the agreement promises (semantics.md section 3): every rank of a
// group receives the identical agreed states for each round, and a room's agreed state only
// rises (or drops to Failed) and stays once terminal. The simulator feeds it every agreed round
// every rank receives.
#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "kvflow/kvflow.hpp"

namespace kvflow::command {

// What identifies an agreed round's content (rooms, incarnations, states, released flags):
// FNV-1a over its entries, whichever type holds them (`to_poll` makes a room_poll of one).
template <class Entries, class ToPoll>
std::uint64_t digest_of(const Entries& entries, ToPoll to_poll) {
  std::uint64_t h = 1469598103934665603ULL;
  for (const auto& e : entries) {
    const room_poll p = to_poll(e);
    for (std::uint64_t x : {p.id.room, p.id.incarnation, std::uint64_t(p.state), std::uint64_t(p.released)})
      h = (h ^ x) * 1099511628211ULL;
  }
  return h;
}
inline std::uint64_t round_digest(const round_view& round) {
  return digest_of(round, [](const room_poll& p) { return p; });
}

class agreement_checker {
 public:
  // A room's agreed state is remembered until no round of its group has shown it for
  // `forget_after_rounds` rounds (its group forgot it, and so may the check): a soak checks tens of
  // thousands of rooms. A room that came back later than that would go unchecked.
  explicit agreement_checker(std::uint64_t forget_after_rounds = 4096) : forget_after_(forget_after_rounds) {}
  // One more rank reports rounds of `group`: once all of them reported a round, the checker
  // forgets it (a soak checks millions). A group never counted keeps every round.
  void add_rank(int group);
  // A rank of `group` (in this process) received `round` from its poll.
  void on_round(int group, const round_view& round);
  // A rank elsewhere received a round with this digest: only its identity can be checked.
  void on_digest(int group, std::uint64_t round, std::uint64_t digest);
  std::vector<std::string> problems() const;  // the first few, one line each
  std::uint64_t violations() const;
  std::uint64_t rounds_checked() const;
  std::size_t rounds_tracked() const;  // rounds held, not yet reported by every rank
  std::size_t rooms_tracked() const;   // (group, room, incarnation) states held

 private:
  void problem(std::string p);
  bool first_of_round(int group, std::uint64_t round, std::uint64_t digest);  // under mutex_
  mutable std::mutex mutex_;
  struct seen {
    std::uint64_t digest = 0;
    int reports = 0;
  };
  std::map<std::pair<int, std::uint64_t>, seen> rounds_;  // (group, round) -> digest, reports so far
  std::map<int, int> ranks_;                              // group -> ranks that report
  void forget_old_rooms(int group, std::uint64_t round);  // under mutex_
  struct room_seen {
    poll_state state = poll_state::bootstrapping;
    std::uint64_t round = 0;  // the highest round that showed it
  };
  std::uint64_t forget_after_;
  std::map<std::tuple<int, std::uint64_t, std::uint64_t>, room_seen> last_;
  std::map<int, std::uint64_t> swept_;  // group -> the round of its last forget_old_rooms
  std::vector<std::string> problems_;
  std::uint64_t violations_ = 0, checked_ = 0;
};

}  // namespace kvflow::command
