// failure_memory: what a prefill rank remembers of failed and early-aborted requests, bounded by
// count and by age (it was bounded by count alone: 65536 reasons, about 12 MB a prefill rank,
// reached within an hour of a soak's faults and never given back).
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <string>

#include "actors/failure_memory.hpp"
#include "actors/rank.hpp"

using kvflow::failure_memory;
using std::chrono::milliseconds;

namespace {
const failure_memory::time_point t0{};
}

TEST_CASE("failure memory: the first reason of a key is kept, empty reasons are not remembered") {
  failure_memory m(8, milliseconds{1000});
  m.remember({1, 1}, "aborted", t0);
  m.remember({1, 1}, "later reason", t0 + milliseconds{1});
  m.remember({2, 1}, "", t0);
  REQUIRE(m.find({1, 1}, t0) != nullptr);
  CHECK(*m.find({1, 1}, t0) == "aborted");
  CHECK(m.find({1, 2}, t0) == nullptr);  // another incarnation of the room
  CHECK(m.find({2, 1}, t0) == nullptr);
  CHECK(m.size() == 1);
}

TEST_CASE("failure memory: an entry is forgotten once it is older than the age bound") {
  failure_memory m(1000, milliseconds{100});
  m.remember({1, 1}, "a", t0);
  m.remember({2, 1}, "b", t0 + milliseconds{60});
  CHECK(m.find({1, 1}, t0 + milliseconds{99}) != nullptr);
  CHECK(m.find({1, 1}, t0 + milliseconds{100}) == nullptr);  // found nowhere, even before it is dropped
  CHECK(m.find({2, 1}, t0 + milliseconds{100}) != nullptr);
  m.expire(t0 + milliseconds{100});
  CHECK(m.size() == 1);
  // A key forgotten by age can be remembered again, with its new reason.
  m.remember({1, 1}, "again", t0 + milliseconds{170});
  CHECK(m.size() == 1);  // {2,1} aged out on the way in
  REQUIRE(m.find({1, 1}, t0 + milliseconds{170}) != nullptr);
  CHECK(*m.find({1, 1}, t0 + milliseconds{170}) == "again");
}

TEST_CASE("failure memory: a steady stream of failures holds what its age bound covers, not the count") {
  // 1 failure a millisecond for 10 s, remembered 500 ms, count bound 65536: about 500 held.
  failure_memory m(65536, milliseconds{500});
  std::size_t most = 0;
  for (int i = 0; i < 10000; ++i) {
    m.remember({static_cast<std::uint64_t>(i), 1}, "failed " + std::to_string(i), t0 + milliseconds{i});
    most = std::max(most, m.size());
  }
  CHECK(most == 500);
  CHECK(m.find({9999, 1}, t0 + milliseconds{9999}) != nullptr);
  CHECK(m.find({9499, 1}, t0 + milliseconds{9999}) == nullptr);
}

TEST_CASE("failure memory: beyond the count bound the oldest entry goes first") {
  failure_memory m(3, milliseconds{1000000});
  for (std::uint64_t r = 1; r <= 5; ++r) m.remember({r, 1}, "r" + std::to_string(r), t0);
  CHECK(m.size() == 3);
  CHECK(m.find({1, 1}, t0) == nullptr);
  CHECK(m.find({2, 1}, t0) == nullptr);
  CHECK(m.find({3, 1}, t0) != nullptr);
  CHECK(m.find({5, 1}, t0) != nullptr);
}

TEST_CASE("failure memory: replace keeps the latest reason of a key, aged from when it came") {
  failure_memory m(8, milliseconds{1000});
  m.replace({1, 1}, "refused: duplicate room", t0);
  m.replace({2, 1}, "b", t0 + milliseconds{100});
  m.replace({1, 1}, "decode rank 3 down", t0 + milliseconds{500});
  m.replace({1, 1}, "", t0 + milliseconds{500});  // no reason: nothing changes
  CHECK(m.size() == 2);
  REQUIRE(m.find({1, 1}, t0 + milliseconds{1499}) != nullptr);
  CHECK(*m.find({1, 1}, t0 + milliseconds{1499}) == "decode rank 3 down");
  // Room 2 is now the oldest: it goes first, by age and by count.
  m.expire(t0 + milliseconds{1100});
  CHECK(m.size() == 1);
  CHECK(m.find({1, 1}, t0 + milliseconds{1100}) != nullptr);
}

// The reasons of the requests a rank cleared were bounded by count only (4096 a rank, about 0.5 MB,
// never given back). They go by age now too (failure_memory_ms), on the poll of every step.
TEST_CASE("rank: a cleared request's reason is forgotten after its age, on the step's tick without new failures") {
  kvflow::rank_shared sh;
  sh.cleared_reasons = failure_memory{4096, milliseconds{1000}};
  sh.remember_reason(7, 1, "decode rank 3 down", t0);
  sh.remember_reason(8, 1, "", t0);  // no reason: nothing to remember
  CHECK(sh.failure_of(7, 1, t0 + milliseconds{999}) == "decode rank 3 down");
  CHECK(sh.failure_of(7, 1, t0 + milliseconds{1000}).empty());
  sh.expire(t0 + milliseconds{999}, milliseconds{1000});
  CHECK(sh.cleared_reasons.size() == 1);
  sh.expire(t0 + milliseconds{1000}, milliseconds{1000});  // what poll does every step
  CHECK(sh.cleared_reasons.size() == 0);
  // A room used again under the same key: the latest request's reason is the one reported.
  sh.remember_reason(7, 1, "refused: duplicate room", t0 + milliseconds{2000});
  sh.remember_reason(7, 1, "aborted by the engine", t0 + milliseconds{2500});
  CHECK(sh.failure_of(7, 1, t0 + milliseconds{3400}) == "aborted by the engine");
  // The count bound holds as before.
  for (std::uint64_t r = 100; r < 100 + 5000; ++r) sh.remember_reason(r, 1, "r", t0 + milliseconds{3000});
  CHECK(sh.cleared_reasons.size() == 4096);
  CHECK(sh.failure_of(7, 1, t0 + milliseconds{3000}).empty());
  CHECK(sh.failure_of(100 + 4999, 1, t0 + milliseconds{3000}) == "r");
}

TEST_CASE("failure memory: next_expiry is when the oldest entry's age runs out") {
  failure_memory m(8, milliseconds{1000});
  CHECK_FALSE(m.next_expiry().has_value());
  m.remember({1, 1}, "a", t0 + milliseconds{10});
  m.remember({2, 1}, "b", t0 + milliseconds{300});
  REQUIRE(m.next_expiry().has_value());
  CHECK(*m.next_expiry() == t0 + milliseconds{1010});
  m.expire(*m.next_expiry());  // due then: the oldest goes, the next one is due later
  CHECK(m.size() == 1);
  CHECK(*m.next_expiry() == t0 + milliseconds{1300});
  m.expire(t0 + milliseconds{1300});
  CHECK_FALSE(m.next_expiry().has_value());
}

// A rank's finished and failed_unheld (4096 requests each) dropped old entries only as a create
// came: a rank that got no more creates held its last ones for good. The step's poll expires
// them too now, by the window in which they answer a create (the bootstrap timeout), so a late
// create within it is still refused or failed.
TEST_CASE("rank: finished and failed_unheld forget a request past the bootstrap timeout, on the step's tick without a create") {
  kvflow::rank_shared sh;
  const milliseconds window{1000};
  sh.finished.remember(1, 1, t0);
  sh.failed_unheld.remember(2, 1, t0 + milliseconds{500});
  sh.expire(t0 + milliseconds{1000}, window);  // both within the window: kept
  CHECK(sh.finished.size() == 1);
  CHECK(sh.failed_unheld.size() == 1);
  sh.expire(t0 + milliseconds{1001}, window);  // what poll does every step
  CHECK(sh.finished.size() == 0);
  CHECK(sh.failed_unheld.size() == 1);
  // A create within the window still finds what is left, once.
  CHECK(sh.failed_unheld.take(2, 1, window, t0 + milliseconds{1500}));
  CHECK(sh.failed_unheld.size() == 0);
  // After the window, a late create would not have found it anyway: the tick drops it.
  sh.finished.remember(3, 1, t0 + milliseconds{2000});
  sh.failed_unheld.remember(4, 1, t0 + milliseconds{2000});
  CHECK_FALSE(sh.finished.take(3, 1, window, t0 + milliseconds{3001}));
  sh.expire(t0 + milliseconds{3001}, window);
  CHECK(sh.failed_unheld.size() == 0);
  // The count bound holds as before.
  for (std::uint64_t r = 100; r < 100 + 5000; ++r) sh.finished.remember(r, 1, t0 + milliseconds{4000});
  CHECK(sh.finished.size() == 4096);
  CHECK_FALSE(sh.finished.take(100, 1, window, t0 + milliseconds{4000}));
  CHECK(sh.finished.take(100 + 4999, 1, window, t0 + milliseconds{4000}));
}
