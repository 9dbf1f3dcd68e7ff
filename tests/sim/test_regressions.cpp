// The upstream failures of semantics.md section 7 that apply to the core, each a test.
#include "sim_helpers.hpp"

using kvflow::command::parse_fault;
using kvflow::test::check_clean;
using kvflow::test::check_survived;
using kvflow::test::small_run;

TEST_CASE("upstream 1 (#19119): MLA + CP does not stall, non-authoritative CP ranks finish") {
  // With registration keyed without CP, or CP ranks starting in Bootstrapping, this stalls.
  auto o = small_run("tp=2,cp=4", "tp=2");
  o.deadline_s = 20;
  check_clean(run_simulation(o));
}

TEST_CASE("upstream 2 (#19548): prefill PP2 x CP8 x TP8 runs") {
  auto o = small_run("pp=2,cp=8,tp=8", "tp=8,pp=2", "mla:4:32");
  o.requests = 6;
  o.prompt_max = 160;
  check_clean(run_simulation(o));
  o.cluster.decode = kvflow::config::parse_decode("tp=8");  // decode pp1 reads both stages
  check_clean(run_simulation(o));
}

TEST_CASE("upstream 3 (#37909, #36928): TP4 x CP4 ranks whose queues diverge still agree") {
  // Random interleavings make ranks learn of rooms at different rounds; the merge counts a
  // room a rank has not seen as Bootstrapping instead of mismatching sizes.
  for (std::uint64_t seed = 21; seed <= 24; ++seed) {
    auto o = small_run("tp=4,cp=4", "tp=4");
    o.interleave_seed = seed;
    check_clean(run_simulation(o));
  }
}

TEST_CASE("upstream 4 (#34572): PP prefill under an abort storm neither hangs nor leaks") {
  auto o = small_run("pp=2,tp=2", "tp=2,pp=2");
  o.requests = 16;
  for (int n = 1; n <= 16; n += 2) o.faults.push_back(parse_fault("abort:decode@" + std::to_string(n)));
  check_survived(run_simulation(o));
}

TEST_CASE("upstream 5 (#6857): a reused room never inherits the old Success") {
  auto o = small_run("tp=2,cp=2", "tp=2");
  o.requests = 24;
  o.room_pool = 3;  // every room comes back several times
  check_clean(run_simulation(o));
}

TEST_CASE("upstream 6 (#40125): a duplicate room is refused on both sides, nothing crashes") {
  auto o = small_run("tp=2", "tp=2,dp=2");
  o.faults.push_back(parse_fault("dup-room@4"));
  auto r = run_simulation(o);
  check_survived(r);
  CHECK(r.failed == 1);
  CHECK(r.succeeded == r.requests - 1);
  for (const auto& out : r.outcomes)
    if (out.state == "Failed") CHECK(out.reason.find("duplicate room") != std::string::npos);
}

TEST_CASE("upstream 7 (#26486, #30723, #40297): n>1 samples sharing a room fail fast, not at a timeout") {
  auto o = small_run("tp=2", "tp=2,dp=2");
  o.tunables.bootstrap_timeout_ms = o.tunables.waiting_timeout_ms = 600000;  // a stall would show
  o.deadline_s = 20;
  for (int n : {3, 4, 5}) o.faults.push_back(parse_fault("dup-room@" + std::to_string(n)));
  auto r = run_simulation(o);
  check_survived(r);
  for (const auto& out : r.outcomes)
    if (out.state == "Failed") CHECK(out.reason.find("duplicate room") != std::string::npos);
}

TEST_CASE("upstream 14 (#9817, #18701, #21652, #37103): aborted decode requests leak no KV memory") {
  auto o = small_run("tp=2,cp=2", "tp=2,dp=2");
  for (int n : {1, 2, 6, 9}) o.faults.push_back(parse_fault("abort:decode@" + std::to_string(n)));
  auto r = run_simulation(o);
  check_survived(r);
  CHECK(r.leaked_rooms == 0);
}
