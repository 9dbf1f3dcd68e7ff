// The shared-memory pieces of the agreement and the in-process transport, hammered from several
// threads. Run under ThreadSanitizer by CI (they use no CAF, so every access is instrumented).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <csignal>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "actors/agreed_ring.hpp"
#include "actors/shm_agreement.hpp"
#include "actors/step_board.hpp"
#include "command/agreement_checker.hpp"
#include "transport/inproc_transport.hpp"

using namespace kvflow;

TEST_CASE("step_board: concurrent posts signal each round exactly once") {
  const int children = 6, rounds = 2000;
  step_board board(children);
  std::atomic<int> signals{0};
  std::vector<std::atomic<int>> per_round(rounds + 1);
  std::vector<std::thread> threads;
  for (int c = 0; c < children; ++c)
    threads.emplace_back([&, c] {
      for (int r = 1; r <= rounds; ++r)
        if (board.post(c, r, {{1, 1, static_cast<std::uint8_t>(1 + (r + c) % 3)}})) {
          ++signals;
          ++per_round[r];
          CHECK(board.take(r).size() == static_cast<std::size_t>(children));
        }
    });
  for (auto& t : threads) t.join();
  CHECK(signals == rounds);
  for (int r = 1; r <= rounds; ++r) CHECK(per_round[r] == 1);
}

TEST_CASE("step_board: a child dying while others post completes the round once") {
  for (int trial = 0; trial < 200; ++trial) {
    step_board board(3);
    std::atomic<int> signals{0};
    std::thread a([&] { signals += board.post(0, 1, {}) ? 1 : 0; });
    std::thread b([&] { signals += board.post(1, 1, {}) ? 1 : 0; });
    std::thread d([&] { signals += static_cast<int>(board.child_down(2).size()); });
    a.join();
    b.join();
    d.join();
    CHECK(signals == 1);
  }
}

TEST_CASE("agreed_ring: every reader gets round k - 1 at step k, whole, while the writer publishes") {
  // As in a group: a reader (a rank's scheduler) posts step k, then reads round k - 1; the writer
  // (the TP supervisor) publishes round r once every reader posted it. So the writer never laps a
  // reader, and every reader must see each round exactly as published.
  constexpr int readers_n = 3;
  constexpr std::uint64_t rounds = 4000;
  agreed_ring ring(8);  // small: the writer wraps around the ring many times
  std::array<std::atomic<std::uint64_t>, readers_n> posted{};
  std::atomic<std::uint64_t> bad{0}, waits{0};
  std::vector<std::thread> readers;
  for (int i = 0; i < readers_n; ++i)
    readers.emplace_back([&, i] {
      for (std::uint64_t k = 1; k <= rounds + 1; ++k) {
        posted[i].store(k);
        if (k == 1) continue;
        const agreed_view* v = ring.get(k - 1);
        if (v == nullptr) {
          ++waits;
          v = ring.wait_for(k - 1, std::chrono::seconds(5));
        }
        if (v == nullptr || v->round != k - 1 || v->states.size() != (k - 1) % 17) {
          ++bad;
          continue;
        }
        for (const auto& s : v->states)
          if (s.room != k - 1) ++bad;
      }
    });
  std::thread writer([&] {
    for (std::uint64_t r = 1; r <= rounds; ++r) {
      for (auto& p : posted)
        while (p.load() < r) std::this_thread::yield();
      auto v = std::make_shared<agreed_view>();
      v->round = r;
      v->states.assign(r % 17, room_state{r, 1, 2, false});
      ring.publish(std::move(v));
    }
  });
  writer.join();
  for (auto& t : readers) t.join();
  CHECK(bad == 0);
  CHECK(ring.latest() == rounds);
  // Not published (yet), lapped, or repeated: never another round's record.
  CHECK(ring.get(rounds + 1) == nullptr);
  CHECK(ring.get(rounds - 8) == nullptr);
  ring.publish(std::make_shared<agreed_view>(agreed_view{rounds - 1, 0, {}, 0}));
  CHECK(ring.get(rounds)->round == rounds);
  CHECK(ring.wait_for(rounds + 1, std::chrono::milliseconds(20)) == nullptr);
}

TEST_CASE("agreed_ring: a round published after a later one is still served, a lapped one is not") {
  // Rounds by message may arrive out of order (a route between processes changed).
  agreed_ring ring(4);
  ring.publish(std::make_shared<agreed_view>(agreed_view{2, 0, {}, 0}));
  ring.publish(std::make_shared<agreed_view>(agreed_view{1, 0, {}, 0}));
  REQUIRE(ring.get(1) != nullptr);
  CHECK(ring.get(1)->round == 1);
  REQUIRE(ring.get(2) != nullptr);
  CHECK(ring.wait_for(1, std::chrono::microseconds(0)) == ring.get(1));
  CHECK(ring.latest() == 2);
  // A waiter for round 3 wakes when round 3 comes, not when any later round does.
  std::thread late([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ring.publish(std::make_shared<agreed_view>(agreed_view{4, 0, {}, 0}));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ring.publish(std::make_shared<agreed_view>(agreed_view{3, 0, {}, 0}));
  });
  const agreed_view* three = ring.wait_for(3, std::chrono::seconds(10));
  late.join();
  REQUIRE(three != nullptr);
  CHECK(three->round == 3);
  // Round 5 takes round 1's slot; round 1, late again, does not take it back.
  ring.publish(std::make_shared<agreed_view>(agreed_view{5, 0, {}, 0}));
  ring.publish(std::make_shared<agreed_view>(agreed_view{1, 0, {}, 0}));
  CHECK(ring.get(1) == nullptr);
  REQUIRE(ring.get(5) != nullptr);
}

namespace {

// Child c's post for round r: rooms 1..6, each present or not, at a state and release that
// depend on (c, r, room) only, so that a sequential reference can compute every round.
step_states post_of(int c, std::uint64_t r) {
  step_states out;
  for (std::uint64_t room = 1; room <= 6; ++room) {
    std::uint64_t h = (r * 1000003u + static_cast<std::uint64_t>(c) * 7919u + room * 104729u) * 0x9E3779B97F4A7C15ULL;
    h ^= h >> 29;
    if (h % 7 == 0) continue;  // this child has not created it (Bootstrapping in the merge)
    out.push_back({room, 1, static_cast<std::uint8_t>(1 + (h >> 8) % 4), ((h >> 16) & 1) != 0});
  }
  return out;
}

// The rounds the message tree would agree: every child's post merged, then the agreed table.
// With `runs`, a child's states change only every few rounds (as a real rank's do: most steps
// change nothing), and it posts the rounds between as unchanged.
std::uint64_t content_round(int c, std::uint64_t r, bool runs) {
  return runs ? (r + static_cast<std::uint64_t>(c)) / 5 : r;
}

std::vector<step_states> reference_rounds(int children, std::uint64_t rounds, bool runs = false) {
  round_collector collector(children);
  agreed_table table;
  std::vector<step_states> out(rounds + 1);
  for (std::uint64_t r = 1; r <= rounds; ++r) {
    for (int c = 0; c < children; ++c) collector.add(c, r, post_of(c, content_round(c, r, runs)));
    out[r] = table.apply(collector.take(r));
  }
  return out;
}

// Beyond every wait of the tests: a lost wake-up of the combiner fails them instead of costing
// the combiner's safety-net interval.
constexpr std::chrono::milliseconds no_idle_check{std::chrono::hours(1)};

std::string segment_name(const char* what) {
  return "/kvflow-test-" + std::string(what) + "-" + std::to_string(std::random_device{}());
}

}  // namespace

TEST_CASE("shm agreement: every rank reads the tree's merge of every round, some children reporting by message") {
  // Children 0..n-1 are scheduler threads at random paces; the odd ones (of the larger groups)
  // report as a rank of another host would, through the combiner, and the rest post into the
  // segment. Every child reads round k - 1 at step k, and it must be the reference's round.
  for (int n : {1, 3, 6})
  for (bool runs : {false, true}) {
    CAPTURE(n);
    CAPTURE(runs);
    constexpr std::uint64_t rounds = 1500;
    shm_shape shape;
    shape.ranks = n;
    shape.post_slots = 4;
    shape.ring_slots = 8;  // small: the combiner wraps around both rings many times
    shape.max_rooms = 8;
    auto seg = shm_segment::create(segment_name("merge"), 7, shape);
    REQUIRE_MESSAGE(seg, seg.error().reason());
    const auto expected = reference_rounds(n, rounds, runs);
    std::atomic<int> agreed_calls{0};
    shm_combiner combiner(seg.value(), 7, [&](const std::shared_ptr<const agreed_view>& v) {
      if (v->states != expected[v->round]) ++agreed_calls;  // counts wrong rounds only
    }, no_idle_check);
    std::atomic<std::uint64_t> bad{0};
    std::vector<std::thread> ranks;
    for (int c = 0; c < n; ++c)
      ranks.emplace_back([&, c] {
        std::mt19937 pace(static_cast<unsigned>(c + 17 * n));
        const bool by_message = n > 1 && c % 2 == 1;
        // A rank of this host maps the segment on its own, as another process would.
        auto mine = shm_segment::open(seg.value()->name(), 7);
        if (!mine) {
          ++bad;
          return;
        }
        agreed_view view;
        for (std::uint64_t k = 1; k <= rounds + 1; ++k) {
          if (k <= rounds) {
            const auto at = content_round(c, k, runs);
            const bool unchanged = runs && k > 1 && at == content_round(c, k - 1, runs);
            // An unchanged post carries no states: an empty list makes a wrong merge of it show.
            const step_states states = unchanged ? step_states{} : post_of(c, at);
            if (by_message) {
              combiner.post_remote(c, k, post_of(c, at));
            } else if (mine.value()->post(c, k, states, std::chrono::seconds(10), unchanged) !=
                       shm_segment::post_result::posted) {
              ++bad;
            }
          }
          if (pace() % 8 == 0) std::this_thread::yield();
          if (k == 1 || by_message) continue;  // by message, rounds come by message (on_agreed)
          if (!mine.value()->read(k - 1, view)) {
            if (!mine.value()->wait(k - 1, std::chrono::seconds(10)) || !mine.value()->read(k - 1, view)) {
              ++bad;
              continue;
            }
          }
          if (view.round != k - 1 || view.states != expected[k - 1]) ++bad;
          // A round that agreed what the round before did says so (a reader need not copy it).
          if (k > 2 && mine.value()->same_as(k - 1, k - 2) != (expected[k - 1] == expected[k - 2])) ++bad;
        }
      });
    for (auto& t : ranks) t.join();
    CHECK(bad == 0);
    CHECK(agreed_calls == 0);
    CHECK(combiner.merged() == rounds);
    // Lapped, or not agreed yet: never another round's record.
    agreed_view v;
    CHECK_FALSE(seg.value()->read(rounds - 8, v));
    CHECK_FALSE(seg.value()->read(rounds + 1, v));
    CHECK_FALSE(seg.value()->wait(rounds + 1, std::chrono::milliseconds(10)));
  }
}

TEST_CASE("shm agreement: a child dying mid-run completes the rounds that waited for it, and fails its rooms") {
  for (int trial = 0; trial < 20; ++trial) {
    CAPTURE(trial);
    const int n = 4;
    const std::uint64_t rounds = 200, dies_after = 50 + static_cast<std::uint64_t>(trial);
    shm_shape shape;
    shape.ranks = n;
    shape.max_rooms = 8;
    auto seg = shm_segment::create(segment_name("death"), 1, shape);
    REQUIRE_MESSAGE(seg, seg.error().reason());
    shm_combiner combiner(seg.value(), 1, {}, no_idle_check);
    std::atomic<std::uint64_t> bad{0};
    std::vector<std::vector<step_states>> seen(n, std::vector<step_states>(rounds + 1));
    std::vector<std::thread> ranks;
    for (int c = 0; c < n; ++c)
      ranks.emplace_back([&, c] {
        agreed_view view;
        for (std::uint64_t k = 1; k <= rounds + 1; ++k) {
          if (c == 0 && k > dies_after) {
            combiner.child_down(0);  // its node went down: posts no more
            return;
          }
          if (k <= rounds && seg.value()->post(c, k, post_of(c, k), std::chrono::seconds(10)) !=
                                 shm_segment::post_result::posted)
            ++bad;
          if (k == 1) continue;
          if (!seg.value()->wait(k - 1, std::chrono::seconds(10)) || !seg.value()->read(k - 1, view)) {
            ++bad;
            continue;
          }
          seen[c][k - 1] = view.states;
        }
      });
    for (auto& t : ranks) t.join();
    REQUIRE(bad == 0);
    CHECK(combiner.merged() == rounds);
    for (std::uint64_t r = 1; r <= rounds; ++r)
      for (int c = 2; c < n; ++c) CHECK(seen[c][r] == seen[1][r]);  // the survivors agree
    // From the death on, every room the group holds is Failed (agreed: it stays so).
    for (const auto& s : seen[1][rounds]) CHECK(s.state == static_cast<std::uint8_t>(kv_poll::failed));
    CHECK_FALSE(seen[1][rounds].empty());
  }
}

#if !defined(__SANITIZE_THREAD__)  // fork under TSan's runtime threads: not here
namespace {

// What a rank process writes back for each round it read: the launcher's digest of its content.
std::uint64_t round_digest(const step_states& states) {
  return command::digest_of(states, [](const room_state& s) {
    return room_poll{{s.room, s.incarnation}, static_cast<poll_state>(s.state), s.released};
  });
}

// A rank in a process of its own: maps the segment by name, posts `rounds` rounds, reads round
// k - 1 at step k, and writes the digest of every round it read to `out`. With `die_after`, it
// kills itself (SIGKILL: no clean-up) once it posted that round.
[[noreturn]] void rank_process(const std::string& name, int child, std::uint64_t rounds, std::uint64_t die_after,
                               int out) {
  auto seg = shm_segment::open(name, 5);
  if (!seg) _exit(3);
  std::vector<std::uint64_t> digests(rounds + 1, 0);
  agreed_view view;
  for (std::uint64_t k = 1; k <= rounds + 1; ++k) {
    if (k <= rounds && seg.value()->post(child, k, post_of(child, k), std::chrono::seconds(20)) !=
                           shm_segment::post_result::posted)
      _exit(4);
    if (die_after != 0 && k == die_after + 1) raise(SIGKILL);
    if (k > 1 && seg.value()->wait(k - 1, std::chrono::seconds(20)) && seg.value()->read(k - 1, view))
      digests[k - 1] = round_digest(view.states);
    if (k % 7 == static_cast<std::uint64_t>(child)) usleep(50);
  }
  const auto bytes = digests.size() * sizeof(std::uint64_t);
  if (write(out, digests.data(), bytes) != static_cast<ssize_t>(bytes)) _exit(5);
  _exit(0);
}

}  // namespace

TEST_CASE("shm agreement: ranks in processes of their own read the same rounds, one of them killed mid-run") {
  // As `kvflow launch` runs them: a process per rank, the combiner in the leader's. The rounds
  // before anyone died are the tree's; the survivors read identical rounds to the end, and once
  // the dead rank is known every room is Failed.
  constexpr int n = 5;
  constexpr std::uint64_t rounds = 400;
  for (std::uint64_t die_after : {std::uint64_t(0), std::uint64_t(120)}) {
    CAPTURE(die_after);
    shm_shape shape;
    shape.ranks = n;
    shape.max_rooms = 8;
    auto seg = shm_segment::create(segment_name("processes"), 5, shape);
    REQUIRE_MESSAGE(seg, seg.error().reason());
    const int victim = die_after ? n - 1 : -1;
    std::vector<pid_t> pids;
    std::vector<int> pipes;
    for (int c = 0; c < n; ++c) {  // forked before any thread of this test exists
      int fds[2];
      REQUIRE(pipe(fds) == 0);
      pid_t pid = fork();
      REQUIRE(pid >= 0);
      if (pid == 0) {
        close(fds[0]);
        rank_process(seg.value()->name(), c, rounds, c == victim ? die_after : 0, fds[1]);
      }
      close(fds[1]);
      pids.push_back(pid);
      pipes.push_back(fds[0]);
    }
    shm_combiner combiner(seg.value(), 5, {}, no_idle_check);
    // What the leader's supervisor does when a rank's node goes down.
    std::thread watcher([&] {
      if (victim < 0) return;
      int st = 0;
      waitpid(pids[static_cast<std::size_t>(victim)], &st, 0);
      combiner.child_down(victim);
    });
    std::vector<std::vector<std::uint64_t>> got(n);
    for (int c = 0; c < n; ++c) {
      if (c == victim) continue;
      got[c].assign(rounds + 1, 0);
      std::size_t want = got[c].size() * sizeof(std::uint64_t), have = 0;
      auto* p = reinterpret_cast<char*>(got[c].data());
      while (have < want) {
        auto r = read(pipes[c], p + have, want - have);
        if (r <= 0) break;
        have += static_cast<std::size_t>(r);
      }
      CHECK(have == want);
      int st = 0;
      waitpid(pids[c], &st, 0);
      CHECK(WIFEXITED(st));
      CHECK(WEXITSTATUS(st) == 0);
    }
    watcher.join();
    for (int fd : pipes) close(fd);
    const auto expected = reference_rounds(n, rounds);
    for (std::uint64_t r = 1; r <= rounds; ++r) {
      for (int c = 1; c < n; ++c)
        if (c != victim) CHECK(got[c][r] == got[0][r]);
      if (victim < 0) CHECK(got[0][r] == round_digest(expected[r]));
    }
    if (victim >= 0) {
      agreed_view v;
      REQUIRE(seg.value()->read(rounds, v));
      for (const auto& s : v.states) CHECK(s.state == static_cast<std::uint8_t>(kv_poll::failed));
      CHECK(got[0][rounds] == round_digest(v.states));
    }
  }
}
#endif

TEST_CASE("shm agreement: a segment is refused when it is not the one its leader registered") {
  shm_shape shape;
  shape.ranks = 2;
  const auto name = segment_name("open");
  auto seg = shm_segment::create(name, 3, shape);
  REQUIRE(seg);
  auto again = shm_segment::create(name, 3, shape);
  CHECK_FALSE(again);  // the name is taken: never two groups in one segment
  CHECK(shm_segment::open(name, 3));
  auto other = shm_segment::open(name, 4);
  REQUIRE_FALSE(other);
  CHECK(other.error().reason().find("belongs to group 3") != std::string::npos);
  CHECK_FALSE(shm_segment::open(name + "-absent", 3));
  // A post that holds more rooms than the segment's slots is refused, not cut.
  step_states many(static_cast<std::size_t>(shape.max_rooms) + 1, room_state{1, 1, 1, false});
  CHECK(seg.value()->post(0, 1, many, std::chrono::microseconds(0)) == shm_segment::post_result::too_many_rooms);
  // A rank a whole post ring ahead of the group is told so, within its wait.
  for (std::uint64_t r = 1; r <= static_cast<std::uint64_t>(shape.post_slots); ++r)
    CHECK(seg.value()->post(0, r, {}, std::chrono::microseconds(0)) == shm_segment::post_result::posted);
  CHECK(seg.value()->post(0, shape.post_slots + 1, {}, std::chrono::milliseconds(5)) == shm_segment::post_result::full);
  seg.value()->unlink();
  CHECK_FALSE(shm_segment::open(name, 3));
}

// Found by the shm_segment fuzz target (tests/fuzz): a post is bytes another process wrote, and
// a `released` byte other than 0 or 1 was merged, published and read back as a bool (undefined;
// UBSan stops at it, a plain build carries the byte into the agreed round).
TEST_CASE("regression: shm agreement: a post's released byte other than 0 or 1 reads back as released") {
  shm_shape shape;
  shape.ranks = 1;
  shape.max_rooms = 4;
  const auto name = segment_name("flag");
  auto seg = shm_segment::create(name, 9, shape);
  REQUIRE(seg);
  step_states odd(1, room_state{1, 1, static_cast<std::uint8_t>(kv_poll::success), false});
  const unsigned char two = 2;  // what a post of another build (or a stray write) may hold
  std::memcpy(reinterpret_cast<unsigned char*>(odd.data()) + offsetof(room_state, released), &two, 1);
  shm_combiner combiner(seg.value(), 9, nullptr, no_idle_check);
  auto member = shm_segment::open(name, 9);
  REQUIRE(member);
  REQUIRE(member.value()->post(0, 1, odd, std::chrono::seconds(10)) == shm_segment::post_result::posted);
  REQUIRE(member.value()->wait(1, std::chrono::seconds(10)));
  agreed_view v;
  REQUIRE(member.value()->read(1, v));
  REQUIRE(v.states.size() == 1);
  unsigned char flag = 0;
  std::memcpy(&flag, reinterpret_cast<const unsigned char*>(v.states.data()) + offsetof(room_state, released), 1);
  CHECK(flag == 1);
}

// Found by the shm_segment fuzz target: open() took a header whose offsets lie outside the
// mapping (here: a post slot's size of ~5.6e18 bytes), and the member's first post faulted.
// The inputs are the fuzz target's: a real segment made by create(), and that segment with its
// header's post slot size overwritten; the fixed name in their headers is made unique here.
TEST_CASE("regression: shm agreement: a segment whose header does not add up to its size is refused") {
  const std::string dir = KVFLOW_FUZZ_DIR;
  for (const std::string file : {"/corpus/shm_segment/seed-01", "/regressions/shm_segment/layout-post-bytes-beyond-mapping"}) {
    CAPTURE(file);
    std::ifstream in(dir + file, std::ios::binary);
    REQUIRE(in);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const std::string fixed = "/kvflow-fuzz-segment";
    char unique[32];
    std::snprintf(unique, sizeof unique, "/kvflow-t%011u", std::random_device{}());
    REQUIRE(std::strlen(unique) == fixed.size());
    const auto at = bytes.find(fixed + '\0');
    REQUIRE(at != std::string::npos);
    bytes.replace(at, fixed.size(), unique);
    int fd = shm_open(unique, O_RDWR | O_CREAT | O_EXCL, 0600);
    REQUIRE(fd >= 0);
    REQUIRE(write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
    close(fd);
    auto seg = shm_segment::open(unique, 5);
    shm_unlink(unique);
    if (file.find("seed") != std::string::npos) {
      REQUIRE_MESSAGE(seg, seg.error().reason());  // the segment as its leader made it
      CHECK(seg.value()->post(0, 2, {}, std::chrono::microseconds(0)) == shm_segment::post_result::posted);
    } else {
      REQUIRE_FALSE(seg);
      CHECK(seg.error().reason().find("does not add up") != std::string::npos);
    }
  }
}

// Found by the shm_segment fuzz target as a timeout: the merging thread checked `stop` before
// it read the word it sleeps on, so a destructor that came between the two woke nobody, and
// the thread slept its whole idle check (the destructor with it).
TEST_CASE("regression: shm agreement: a combiner stopped at once does not wait out its idle check") {
  shm_shape shape;
  shape.ranks = 2;
  auto seg = shm_segment::create(segment_name("stop"), 4, shape);
  REQUIRE(seg);
  constexpr std::chrono::milliseconds idle_check{2000};
  auto slowest = std::chrono::steady_clock::duration::zero();
  std::mt19937 pace(11);
  for (int i = 0; i < 20000 && slowest < idle_check / 2; ++i) {
    auto combiner = std::make_unique<shm_combiner>(seg.value(), 4, nullptr, idle_check);
    // Stop it at some point of its thread's start: the window is a few instructions wide.
    const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(pace() % 20000);
    while (std::chrono::steady_clock::now() < until) {
    }
    const auto t0 = std::chrono::steady_clock::now();
    combiner.reset();
    slowest = std::max(slowest, std::chrono::steady_clock::now() - t0);
  }
  CHECK(std::chrono::duration_cast<std::chrono::milliseconds>(slowest).count() < idle_check.count() / 2);
}

TEST_CASE("inproc transport: pushes race a deregistration without touching freed memory") {
  auto fabric = std::make_shared<transport::inproc_fabric>();
  transport::inproc_transport t(fabric);
  std::vector<std::byte> src(4096, std::byte{7});
  for (int trial = 0; trial < 200; ++trial) {
    auto dst = std::make_unique<std::vector<std::byte>>(4096);
    auto reg = t.register_memory(1, dst->data(), dst->size());
    REQUIRE(reg);
    std::atomic<int> ok{0}, refused{0};
    std::thread pusher([&] {
      for (int i = 0; i < 20; ++i)
        t.push(1, {{src.data(), reg->id, 0, 4096}}, [&](status s) { (s.ok() ? ok : refused)++; });
    });
    std::thread owner([&] {
      t.deregister_memory(reg->id);  // after this returns, no push may write into dst
      dst.reset();
    });
    pusher.join();
    owner.join();
    CHECK(ok + refused == 20);
  }
}
