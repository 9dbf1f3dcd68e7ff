// What the simulator keeps per request while a soak runs: bounded, whatever the number of
// requests (the one-hour soak's heap grew about 2.2 KiB a request, linear in requests).
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "command/agreement_checker.hpp"
#include "command/percentile.hpp"

using kvflow::command::agreement_checker;
using kvflow::command::latency_summary;
using kvflow::command::percentile;

TEST_CASE("soak records: latency_summary is exact up to its limit, then bounded and within 1%") {
  latency_summary small(100);
  std::vector<double> all;
  for (int i = 1; i <= 100; ++i) {
    small.add(i * 0.37);
    all.push_back(i * 0.37);
  }
  CHECK(small.quantile(0.5) == percentile(all, 0.5));
  CHECK(small.quantile(0.99) == percentile(all, 0.99));
  CHECK(small.max() == doctest::Approx(37.0));

  latency_summary big(1000);
  all.clear();
  // A skewed sample: most requests fast, a tail of slow ones (as timeouts make).
  for (int i = 0; i < 200000; ++i) {
    const double ms = i % 100 == 0 ? 15000.0 + i % 7 : 20.0 + (i % 997) * 0.05;
    big.add(ms);
    all.push_back(ms);
  }
  CHECK(big.count() == 200000);
  CHECK(big.held() <= 4096);  // 2315 counters, the samples dropped
  for (double q : {0.0, 0.5, 0.9, 0.99, 1.0}) {
    const double want = percentile(all, q);
    INFO("q " << q << ": want " << want << ", got " << big.quantile(q));
    CHECK(std::abs(big.quantile(q) - want) <= 0.01 * want);
  }
  CHECK(big.max() == percentile(all, 1.0));
  CHECK(latency_summary().quantile(0.5) == 0);
}

TEST_CASE("soak records: the agreement check forgets rooms its group no longer shows, and still checks live ones") {
  using kvflow::poll_state;
  agreement_checker c(64);
  c.add_rank(0);
  // Each room lives 8 rounds, 4 rooms at a time, 100000 rooms in all: what the check holds stays
  // within its window of rounds, not the rooms it ever saw.
  std::vector<kvflow::room_poll> rooms;
  std::size_t most = 0;
  const std::uint64_t n_rounds = 200000;
  for (std::uint64_t round = 1; round <= n_rounds; ++round) {
    rooms.clear();
    for (std::uint64_t k = 0; k < 4; ++k) {
      const std::uint64_t room = (round + k * 2) / 8;  // rooms come and go
      const auto age = (round + k * 2) % 8;
      rooms.push_back({{room * 4 + k, 1}, age < 7 ? poll_state::transferring : poll_state::success, age == 7});
    }
    kvflow::round_view v;
    v.round = round;
    v.rooms = rooms.data();
    v.count = rooms.size();
    c.on_round(0, v);
    most = std::max(most, c.rooms_tracked());
  }
  CHECK(c.violations() == 0);
  CHECK(c.rounds_checked() == n_rounds);
  CHECK(most < 200);  // 4 rooms every 8 rounds, over 1.25 windows of 64 rounds: 40, plus the live ones

  // A room still shown is still checked: its agreed state may not fall.
  std::vector<kvflow::room_poll> up{{{99999999, 1}, poll_state::success, false}};
  std::vector<kvflow::room_poll> down{{{99999999, 1}, poll_state::transferring, false}};
  kvflow::round_view v;
  v.round = n_rounds + 1;
  v.rooms = up.data();
  v.count = up.size();
  c.on_round(0, v);
  v.round = n_rounds + 2;
  v.rooms = down.data();
  v.count = down.size();
  c.on_round(0, v);
  CHECK(c.violations() == 1);
}
