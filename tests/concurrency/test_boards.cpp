// The shared-memory pieces of the agreement and the in-process transport, hammered from several
// threads. Run under ThreadSanitizer by CI (they use no CAF, so every access is instrumented).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "actors/agreed_ring.hpp"
#include "actors/step_board.hpp"
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
  ring.publish(std::make_shared<agreed_view>(agreed_view{rounds - 1, 0, {}}));
  CHECK(ring.get(rounds)->round == rounds);
  CHECK(ring.wait_for(rounds + 1, std::chrono::milliseconds(20)) == nullptr);
}

TEST_CASE("agreed_ring: a round published after a later one is still served, a lapped one is not") {
  // Rounds by message may arrive out of order (a route between processes changed).
  agreed_ring ring(4);
  ring.publish(std::make_shared<agreed_view>(agreed_view{2, 0, {}}));
  ring.publish(std::make_shared<agreed_view>(agreed_view{1, 0, {}}));
  REQUIRE(ring.get(1) != nullptr);
  CHECK(ring.get(1)->round == 1);
  REQUIRE(ring.get(2) != nullptr);
  CHECK(ring.wait_for(1, std::chrono::microseconds(0)) == ring.get(1));
  CHECK(ring.latest() == 2);
  // A waiter for round 3 wakes when round 3 comes, not when any later round does.
  std::thread late([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ring.publish(std::make_shared<agreed_view>(agreed_view{4, 0, {}}));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ring.publish(std::make_shared<agreed_view>(agreed_view{3, 0, {}}));
  });
  const agreed_view* three = ring.wait_for(3, std::chrono::seconds(10));
  late.join();
  REQUIRE(three != nullptr);
  CHECK(three->round == 3);
  // Round 5 takes round 1's slot; round 1, late again, does not take it back.
  ring.publish(std::make_shared<agreed_view>(agreed_view{5, 0, {}}));
  ring.publish(std::make_shared<agreed_view>(agreed_view{1, 0, {}}));
  CHECK(ring.get(1) == nullptr);
  REQUIRE(ring.get(5) != nullptr);
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
