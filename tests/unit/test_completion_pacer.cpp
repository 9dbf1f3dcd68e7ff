// The completion thread's pacing (transport/completion_pacer.hpp), without a GPU.
#include <doctest/doctest.h>

#include "transport/completion_pacer.hpp"

using kvflow::transport::completion_pacer;
using namespace std::chrono_literals;

TEST_CASE("completion pacer: no push timed yet, or one too small, sleeps on the event") {
  completion_pacer p;
  CHECK_FALSE(p.plan_for(1ull << 30));
  p.observed(1u << 10, 0.01);  // below min_bytes: launch costs, not a rate
  CHECK(p.ns_per_byte() == 0);
  p.observed(1ull << 30, 0.0);  // a zero or failed timing teaches nothing
  CHECK(p.ns_per_byte() == 0);
  p.observed(1ull << 30, 0.5);
  CHECK(p.plan_for(1ull << 30));
  CHECK_FALSE(p.plan_for(1u << 10));
}

TEST_CASE("completion pacer: the first look comes before the predicted end and the looks reach past it") {
  completion_pacer p;
  const std::uint64_t bytes = 1311ull * 1000 * 1000;  // a DSv3.2 32k-token request
  p.observed(bytes, 0.655);
  auto plan = p.plan_for(bytes);
  REQUIRE(plan);
  const auto predicted = std::chrono::nanoseconds(655000);
  CHECK(plan->first_look < predicted);
  CHECK(plan->first_look > predicted / 2);
  CHECK(plan->interval == 10us);
  const auto last_look = plan->first_look + plan->interval * (plan->looks - 1);
  CHECK(last_look >= predicted);
  // Past the end by the window: a quarter of the prediction here (within 50..400 us).
  CHECK(last_look - predicted >= 150us);
  CHECK(last_look - predicted <= 175us);
  // Twice the bytes, twice the wait before the first look.
  auto twice = p.plan_for(2 * bytes);
  REQUIRE(twice);
  CHECK(twice->first_look > plan->first_look * 19 / 10);
}

TEST_CASE("completion pacer: the window is bounded both ways") {
  completion_pacer p;
  p.observed(1ull << 30, 1.0);  // ~0.93 ps per byte
  auto small = p.plan_for(2u << 20);
  REQUIRE(small);
  // ~2 us predicted: the looks still span the minimum window.
  CHECK(small->interval * small->looks >= 50us);
  auto huge = p.plan_for(100ull << 30);  // ~100 ms predicted: at most 400 us of looks past it
  REQUIRE(huge);
  const auto predicted = std::chrono::nanoseconds(static_cast<std::int64_t>(p.ns_per_byte() * (100.0 * (1ull << 30))));
  CHECK(huge->first_look + huge->interval * (huge->looks - 1) - predicted <= 410us);
  // Nor does it start looking long before: a few dozen looks, not thousands.
  CHECK(predicted - huge->first_look <= 400us);
  CHECK(huge->looks <= 81);
}

TEST_CASE("completion pacer: the rate follows what the pushes show, not the first alone") {
  completion_pacer p;
  const std::uint64_t bytes = 1ull << 30;
  p.observed(bytes, 1.0);
  const double first = p.ns_per_byte();
  for (int i = 0; i < 40; ++i) p.observed(bytes, 2.0);  // the GPU now shares its time
  CHECK(p.ns_per_byte() > first * 1.9);
  CHECK(p.ns_per_byte() <= first * 2.0 + 1e-12);
}
