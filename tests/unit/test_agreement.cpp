// actors/agreement.hpp: MIN merge, round collection with dead children, the monotone agreed table.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <vector>

#include "actors/agreement.hpp"

using namespace kvflow;

namespace {

constexpr std::uint8_t F = 0;  // Failed
constexpr std::uint8_t B = 1;  // Bootstrapping
constexpr std::uint8_t W = 2;  // WaitingForInput
constexpr std::uint8_t T = 3;  // Transferring
constexpr std::uint8_t S = 4;  // Success

bool sorted_unique(const step_states& s) {
  for (std::size_t i = 1; i < s.size(); ++i)
    if (!key_less(s[i - 1], s[i])) return false;
  return true;
}

std::optional<std::uint8_t> state_of(const step_states& s, std::uint64_t room, std::uint64_t inc = 1) {
  for (const auto& x : s)
    if (x.room == room && x.incarnation == inc) return x.state;
  return std::nullopt;
}

}  // namespace

TEST_CASE("agreement: merge_min takes the MIN per key, missing counts as Bootstrapping") {
  step_states a{{1, 1, T}, {2, 1, S}, {4, 1, S}};
  step_states b{{1, 1, S}, {3, 1, W}, {4, 1, S}};
  auto m = merge_min({&a, &b});
  CHECK(m == step_states{{1, 1, T}, {2, 1, B}, {3, 1, B}, {4, 1, S}});
  CHECK(sorted_unique(m));
}

TEST_CASE("agreement: merge_min: Failed dominates, also against a missing key") {
  step_states a{{1, 1, F}, {2, 1, S}};
  step_states b{{1, 1, S}, {2, 1, F}};
  step_states c{{3, 1, F}};
  auto m = merge_min({&a, &b, &c});
  CHECK(m == step_states{{1, 1, F}, {2, 1, F}, {3, 1, F}});
}

TEST_CASE("agreement: merge_min keys are (room, incarnation)") {
  step_states a{{1, 1, S}, {1, 2, W}};
  step_states b{{1, 1, S}, {1, 2, T}};
  auto m = merge_min({&a, &b});
  CHECK(m == step_states{{1, 1, S}, {1, 2, W}});
}

TEST_CASE("agreement: merge_min edge cases") {
  CHECK(merge_min({}).empty());
  step_states e1, e2;
  CHECK(merge_min({&e1, &e2}).empty());
  step_states one{{5, 1, S}, {9, 2, T}};
  CHECK(merge_min({&one}) == one);
  // Against an empty input, every key is only Bootstrapping (or Failed).
  step_states x{{5, 1, S}, {6, 1, F}};
  CHECK(merge_min({&x, &e1}) == step_states{{5, 1, B}, {6, 1, F}});
  // The same input twice is itself.
  CHECK(merge_min({&one, &one}) == one);
}

TEST_CASE("agreement: merge_min output is sorted and unique for random inputs") {
  std::mt19937 rng(7);
  for (int iter = 0; iter < 300; ++iter) {
    const int n = std::uniform_int_distribution<int>(1, 5)(rng);
    std::vector<step_states> ins(n);
    std::map<std::pair<std::uint64_t, std::uint64_t>, std::vector<std::optional<std::uint8_t>>> truth;
    for (int i = 0; i < n; ++i) {
      std::map<std::pair<std::uint64_t, std::uint64_t>, std::uint8_t> keys;
      const int k = std::uniform_int_distribution<int>(0, 12)(rng);
      for (int j = 0; j < k; ++j)
        keys[{std::uniform_int_distribution<std::uint64_t>(0, 15)(rng),
              std::uniform_int_distribution<std::uint64_t>(0, 2)(rng)}] =
            static_cast<std::uint8_t>(std::uniform_int_distribution<int>(0, 4)(rng));
      for (const auto& [key, st] : keys) ins[i].push_back({key.first, key.second, st});
    }
    std::vector<const step_states*> ptrs;
    for (const auto& in : ins) ptrs.push_back(&in);
    auto m = merge_min(ptrs);
    CHECK(sorted_unique(m));
    // Reference: MIN over inputs, a missing key counting as Bootstrapping.
    std::map<std::pair<std::uint64_t, std::uint64_t>, std::uint8_t> expected;
    for (const auto& in : ins)
      for (const auto& x : in) expected[{x.room, x.incarnation}] = S;
    for (auto& [key, st] : expected)
      for (const auto& in : ins) {
        auto got = state_of(in, key.first, key.second);
        st = std::min(st, got ? *got : B);
      }
    step_states want;
    for (const auto& [key, st] : expected) want.push_back({key.first, key.second, st});
    CHECK(m == want);
  }
}

TEST_CASE("agreement: merge_min over lists with the same keys, many of them identical, is the element-wise MIN and AND") {
  // A group at rest: most ranks report the very same list (the merge skips those), a few differ
  // in a state or a released flag, here and there one holds other rooms.
  std::mt19937 rng(11);
  for (int iter = 0; iter < 300; ++iter) {
    step_states base;
    const int rooms = std::uniform_int_distribution<int>(0, 20)(rng);
    for (int r = 0; r < rooms; ++r)
      base.push_back({static_cast<std::uint64_t>(10 + 3 * r), 1, static_cast<std::uint8_t>(rng() % 5), rng() % 2 == 0});
    const int n = std::uniform_int_distribution<int>(1, 12)(rng);
    std::vector<step_states> ins(static_cast<std::size_t>(n), base);
    for (auto& in : ins) {
      const auto roll = rng() % 10;
      if (roll == 0 && !in.empty()) in[rng() % in.size()].state = static_cast<std::uint8_t>(rng() % 5);
      if (roll == 1 && !in.empty()) in[rng() % in.size()].released = !in[rng() % in.size()].released;
      if (roll == 2) in.push_back({1000, 1, S, true});  // keys differ: the general merge
    }
    std::vector<const step_states*> ptrs;
    for (const auto& in : ins) ptrs.push_back(&in);
    auto m = merge_min(ptrs);
    // Reference: per key MIN of states (a missing key counts as Bootstrapping, released) and
    // AND of the released flags.
    std::map<std::pair<std::uint64_t, std::uint64_t>, std::pair<std::uint8_t, bool>> expected;
    for (const auto& in : ins)
      for (const auto& x : in) expected[{x.room, x.incarnation}] = {S, true};
    for (auto& [key, v] : expected)
      for (const auto& in : ins) {
        auto it = std::find_if(in.begin(), in.end(), [&](const room_state& x) {
          return x.room == key.first && x.incarnation == key.second;
        });
        v.first = std::min(v.first, it != in.end() ? it->state : B);
        v.second = v.second && (it == in.end() || it->released);
      }
    step_states want;
    for (const auto& [key, v] : expected) want.push_back({key.first, key.second, v.first, v.second});
    CHECK(m == want);
  }
}

TEST_CASE("agreement: round_collector completes only when every live child reported") {
  round_collector rc(3);
  CHECK(rc.live_children() == 3);
  CHECK_FALSE(rc.add(0, 1, {{1, 1, S}}));
  CHECK_FALSE(rc.complete(1));
  CHECK_FALSE(rc.add(1, 1, {{1, 1, T}}));
  CHECK_FALSE(rc.add(1, 1, {{1, 1, F}}));  // duplicate for round 1: ignored
  // Round 2 runs independently.
  CHECK_FALSE(rc.add(2, 2, {{1, 1, S}}));
  CHECK_FALSE(rc.complete(1));
  CHECK(rc.add(2, 1, {{1, 1, S}}));
  CHECK(rc.complete(1));
  CHECK_FALSE(rc.complete(2));
  // The duplicate did not replace the first report: T, not F.
  CHECK(rc.take(1) == step_states{{1, 1, T}});
  CHECK_FALSE(rc.complete(1));
  // Out-of-range child indices are ignored.
  CHECK_FALSE(rc.add(-1, 2, {}));
  CHECK_FALSE(rc.add(3, 2, {}));
  CHECK_FALSE(rc.complete(2));
}

TEST_CASE("regression: a replayed report of a round already taken does not open it again") {
  // It used to make a new pending round of it: memory for every replayed or forged round, and
  // once the children that did not replay died, the round counted as complete again.
  round_collector rc(3);
  for (int c = 0; c < 3; ++c) rc.add(c, 1, {{1, 1, T}});
  REQUIRE(rc.complete(1));
  CHECK(rc.take(1) == step_states{{1, 1, T}});
  CHECK_FALSE(rc.add(0, 1, {{1, 1, S}}));
  CHECK_FALSE(rc.add(1, 1, {{1, 1, S}}));
  CHECK_FALSE(rc.complete(1));
  CHECK(rc.child_down(2).empty());  // nothing pending: round 1 does not complete a second time
  CHECK_FALSE(rc.complete(1));
  // Later rounds are collected as before.
  CHECK_FALSE(rc.add(0, 2, {{1, 1, S}}));
  CHECK(rc.add(1, 2, {{1, 1, S}}));
  CHECK(rc.take(2) == step_states{{1, 1, F}});  // child 2 died holding room 1: it fails
}

TEST_CASE("agreement: round_collector child_down completes pending rounds and fails every room") {
  round_collector rc(3);
  // Round 1 completes normally; child 2 reported room 7 in it.
  rc.add(0, 1, {{5, 1, T}});
  rc.add(1, 1, {{5, 1, T}});
  REQUIRE(rc.add(2, 1, {{5, 1, T}, {7, 1, W}}));
  CHECK(rc.take(1) == step_states{{5, 1, T}, {7, 1, B}});

  // Round 2: children 0 and 1 reported, child 2 dies before reporting.
  CHECK_FALSE(rc.add(0, 2, {{5, 1, S}, {6, 1, S}}));
  CHECK_FALSE(rc.add(1, 2, {{5, 1, S}, {6, 1, S}}));
  auto done = rc.child_down(2);
  CHECK(done == std::vector<std::uint64_t>{2});
  CHECK(rc.is_dead(2));
  CHECK(rc.live_children() == 2);
  CHECK(rc.complete(2));
  // Every room of the round fails, the dead child's last-reported room 7 included; a room only
  // the dead child held is released (nothing of it can still write), the others are not yet.
  CHECK(rc.take(2) == step_states{{5, 1, F}, {6, 1, F}, {7, 1, F, true}});

  // From then on: two live children complete a round, and its rooms are all Failed.
  CHECK_FALSE(rc.add(0, 3, {{8, 1, S}}));
  CHECK(rc.add(1, 3, {{8, 1, S}}));
  CHECK(rc.take(3) == step_states{{5, 1, F, true}, {7, 1, F, true}, {8, 1, F}});

  // A dead child's reports are ignored; declaring it dead again does nothing.
  CHECK_FALSE(rc.add(2, 4, {{9, 1, S}}));
  CHECK(rc.child_down(2).empty());
  CHECK(rc.live_children() == 2);
  CHECK(rc.child_down(17).empty());
}

TEST_CASE("agreement: a dying child's report for a pending round no longer counts") {
  round_collector rc(3);
  CHECK_FALSE(rc.add(0, 1, {{1, 1, T}}));
  CHECK(rc.child_down(0).empty());  // children 1 and 2 still owe round 1
  CHECK_FALSE(rc.complete(1));
  CHECK_FALSE(rc.add(1, 1, {{2, 1, T}}));
  CHECK(rc.add(2, 1, {{2, 1, T}}));
  // Room 1 came only from the dead child: still failed (and released), not dropped.
  CHECK(rc.take(1) == step_states{{1, 1, F, true}, {2, 1, F}});
}

TEST_CASE("agreement: every child dead completes every pending round") {
  round_collector rc(2);
  rc.add(0, 1, {{1, 1, S}});
  rc.add(0, 2, {{1, 1, S}});
  CHECK(rc.child_down(1) == std::vector<std::uint64_t>{1, 2});
  CHECK(rc.take(1) == step_states{{1, 1, F}});
  auto done = rc.child_down(0);
  CHECK(std::find(done.begin(), done.end(), 2u) != done.end());
  CHECK(rc.live_children() == 0);
  CHECK(rc.take(2) == step_states{{1, 1, F, true}});
}

TEST_CASE("agreement: agreed_table is monotone and a terminal agreement is final") {
  agreed_table at;
  CHECK(at.apply({{1, 1, W}}) == step_states{{1, 1, W}});
  CHECK(at.apply({{1, 1, B}}) == step_states{{1, 1, W}});  // never goes down
  CHECK(at.apply({{1, 1, T}}) == step_states{{1, 1, T}});
  CHECK(at.apply({{1, 1, F}}) == step_states{{1, 1, F}});  // except to Failed
  CHECK(at.apply({{1, 1, S}}) == step_states{{1, 1, F}});  // and Failed is final

  CHECK(at.apply({{2, 1, S}}) == step_states{{2, 1, S}});
  CHECK(at.apply({{2, 1, F}}) == step_states{{2, 1, S}});  // Success is final too
  CHECK(at.apply({{2, 1, B}}) == step_states{{2, 1, S}});
  CHECK(at.size() == 1);
}

TEST_CASE("agreement: agreed_table says since which apply it agreed the very same states") {
  agreed_table at;
  CHECK(at.same_since() == 0);
  at.apply({});
  CHECK(at.same_since() == 1);  // the first apply starts a run, even an empty one
  at.apply({{1, 1, W}});
  CHECK(at.same_since() == 2);
  at.apply({{1, 1, B}});  // agreed stays W: the same states
  CHECK(at.same_since() == 2);
  at.apply({{1, 1, T}});
  CHECK(at.same_since() == 4);
  at.apply({{1, 1, T, true}});  // a release alone is a change
  CHECK(at.same_since() == 5);
}

TEST_CASE("agreement: agreed_table keeps a tombstone for a dropped terminal key") {
  agreed_table at;
  at.apply({{1, 1, S}, {2, 1, F}, {3, 1, T}});
  CHECK(at.size() == 3);
  // Nobody reports them any more: every rank cleared them.
  CHECK(at.apply({}).empty());
  CHECK(at.size() == 0);
  // A late rank re-creates the same (room, incarnation): it keeps its terminal state.
  CHECK(at.apply({{1, 1, B}, {2, 1, W}}) == step_states{{1, 1, S}, {2, 1, F}});
  // A new incarnation of the room starts fresh.
  CHECK(at.apply({{1, 2, B}, {2, 2, W}}) == step_states{{1, 2, B}, {2, 2, W}});
}

TEST_CASE("agreement: agreed_table remembers a bounded number of tombstones (oldest go first)") {
  agreed_table at(2);
  at.apply({{1, 1, S}});
  at.apply({});
  at.apply({{2, 1, S}});
  at.apply({});
  at.apply({{3, 1, F}});
  at.apply({});
  // Room 1's tombstone was evicted; 2 and 3 are remembered.
  CHECK(at.apply({{1, 1, B}, {2, 1, B}, {3, 1, B}}) == step_states{{1, 1, B}, {2, 1, S}, {3, 1, F}});
}

// Tombstones were bounded by count only (65536 a table, about 5 MB a group once full, never given
// back); they go by age now too, at the apply of any round, an empty one included.
TEST_CASE("agreement: agreed_table forgets a tombstone older than its age, at any round") {
  using std::chrono::milliseconds;
  const agreed_table::clock::time_point t0{};
  agreed_table at(65536, milliseconds{1000});
  at.apply({{1, 1, S}, {2, 1, F}}, t0);
  at.apply({{2, 1, F}}, t0 + milliseconds{10});  // room 1's tombstone, from t0 + 10 ms
  at.apply({}, t0 + milliseconds{500});          // room 2's, from t0 + 500 ms
  CHECK(at.tombstones() == 2);
  at.apply({}, t0 + milliseconds{1009});
  CHECK(at.tombstones() == 2);
  // Rounds with nothing in them: time alone lets room 1 go.
  at.apply({}, t0 + milliseconds{1010});
  CHECK(at.tombstones() == 1);
  // A late rank creates both again: room 1 opens again at Bootstrapping (the rank's own bootstrap
  // timeout then bounds it), room 2 is still a final Failed.
  CHECK(at.apply({{1, 1, B}, {2, 1, W}}, t0 + milliseconds{1010}) == step_states{{1, 1, B}, {2, 1, F}});
  at.apply({}, t0 + milliseconds{1400});
  CHECK(at.tombstones() == 1);  // room 2's, laid when it first left: it goes at that one's age
  at.apply({}, t0 + milliseconds{1500});
  CHECK(at.tombstones() == 0);
  CHECK(at.size() == 0);
}

TEST_CASE("agreement: a tombstone lives failure_memory_ms, never less than the bootstrap timeout") {
  config::tunables t;
  CHECK(tombstone_age(t) == std::chrono::milliseconds(t.failure_memory_ms));  // 10 min by default
  t.failure_memory_ms = 1000;
  t.bootstrap_timeout_ms = 5000;
  CHECK(tombstone_age(t) == std::chrono::milliseconds(5000));
}

// Children's per-room states only rise (and may fail); rounds are reported in random order with
// duplicates. While nobody died, every round's agreed state == MIN (missing = Bootstrapping),
// except that a terminal agreement is final; the agreed state never goes down except to Failed.
// After a child dies, every room of every later round is Failed unless already terminal.
TEST_CASE("agreement: property: random rising child states") {
  std::mt19937 rng(1234);
  auto coin = [&](double p) { return std::bernoulli_distribution(p)(rng); };
  for (int run = 0; run < 60; ++run) {
    const int children = std::uniform_int_distribution<int>(1, 5)(rng);
    const int rooms = std::uniform_int_distribution<int>(1, 12)(rng);
    const bool kill = children >= 2 && coin(0.4);  // one child dying leaves nobody to report
    const int kill_round = std::uniform_int_distribution<int>(1, 25)(rng);
    std::vector<std::map<std::uint64_t, std::uint8_t>> held(children);
    std::vector<step_states> last_report(children);
    round_collector rc(children);
    agreed_table at;
    std::map<std::uint64_t, std::uint8_t> agreed;  // previous agreed state per room
    int dead = -1;
    for (std::uint64_t round = 1; round <= 30; ++round) {
      CAPTURE(run);
      CAPTURE(round);
      // Evolve every child's rooms: create, rise, or fail.
      for (int c = 0; c < children; ++c) {
        for (int r = 0; r < rooms; ++r) {
          auto it = held[c].find(r);
          if (it == held[c].end()) {
            if (coin(0.3)) held[c][r] = static_cast<std::uint8_t>(coin(0.5) ? B : W);
          } else if (it->second != F && it->second != S) {
            if (coin(0.03)) it->second = F;
            else if (coin(0.4)) ++it->second;
          } else if (it->second == S && coin(0.01)) {
            it->second = F;  // a rank's Failed overrides its own Success
          }
        }
      }
      std::vector<step_states> reports(children);
      for (int c = 0; c < children; ++c)
        for (const auto& [r, s] : held[c]) reports[c].push_back({r, 1, s});

      // Report in random order, with a duplicate (stale content) thrown in now and then.
      std::vector<int> order(children);
      for (int c = 0; c < children; ++c) order[c] = c;
      std::shuffle(order.begin(), order.end(), rng);
      bool completed = false;
      std::vector<int> reported;
      for (std::size_t i = 0; i < order.size(); ++i) {
        const int c = order[i];
        if (kill && dead < 0 && static_cast<int>(round) == kill_round && i == order.size() / 2) {
          dead = order.back();
          auto done = rc.child_down(dead);
          if (!reported.empty() && static_cast<int>(reported.size()) >= rc.live_children())
            CHECK(done == std::vector<std::uint64_t>{round});
          completed = completed || !done.empty();
        }
        if (c == dead) continue;
        bool r = rc.add(c, round, reports[c]);
        last_report[c] = reports[c];
        reported.push_back(c);
        if (coin(0.2)) CHECK_FALSE(rc.add(c, round, {{0, 1, F}}));
        completed = completed || r;
      }
      REQUIRE(completed);
      REQUIRE(rc.complete(round));
      auto merged = rc.take(round);
      CHECK(sorted_unique(merged));

      // Reference merge.
      std::map<std::uint64_t, std::uint8_t> want;
      for (int c = 0; c < children; ++c)
        if (c != dead)
          for (const auto& x : reports[c]) want[x.room] = S;
      for (auto& [r, s] : want)
        for (int c = 0; c < children; ++c) {
          if (c == dead) continue;
          auto it = held[c].find(r);
          s = std::min(s, it == held[c].end() ? B : it->second);
        }
      std::set<std::uint64_t> live_rooms;
      for (const auto& [r, s] : want) live_rooms.insert(r);
      if (dead >= 0) {
        for (const auto& x : last_report[dead]) want[x.room] = F;
        for (auto& [r, s] : want) s = F;
      }
      // Rooms only the dead child held are released; the live children released none here.
      step_states want_list;
      for (const auto& [r, s] : want) want_list.push_back({r, 1, s, live_rooms.count(r) == 0});
      CHECK(merged == want_list);

      auto out = at.apply(merged);
      REQUIRE(out.size() == merged.size());
      for (std::size_t i = 0; i < out.size(); ++i) {
        const auto room = out[i].room;
        CHECK(out[i].room == merged[i].room);
        auto prev = agreed.find(room);
        if (prev != agreed.end()) {
          const auto p = prev->second;
          if (p == F || p == S) CHECK(out[i].state == p);            // terminal is final
          else CHECK((out[i].state >= p || out[i].state == F));     // monotone
        }
        const bool prev_terminal = prev != agreed.end() && (prev->second == F || prev->second == S);
        if (!prev_terminal) CHECK(out[i].state == merged[i].state);  // == MIN
        agreed[room] = out[i].state;
      }
    }
  }
}
