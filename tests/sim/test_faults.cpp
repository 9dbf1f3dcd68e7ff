// Faults: requests a fault did not touch succeed, none stalls, nothing leaks.
#include <limits>

#include "command/engine_messages.hpp"
#include "command/sim_engine.hpp"
#include "sim_helpers.hpp"

using kvflow::command::parse_fault;
using kvflow::test::check_survived;
using kvflow::test::small_run;

namespace {
kvflow::command::simulation_report run_with(kvflow::command::simulation_options o,
                                            std::initializer_list<const char*> faults) {
  for (auto f : faults) o.faults.push_back(parse_fault(f));
  return run_simulation(o);
}
}  // namespace

TEST_CASE("fault: a non-authoritative CP rank dies, its group fails its rooms, the other dp group serves") {
  auto r = run_with(small_run("cp=2,dp=2", "dp=2"), {"kill:prefill:1@3"});
  check_survived(r);
  CHECK(r.failed > 0);
  CHECK(r.succeeded > 0);
}

TEST_CASE("fault: an authoritative prefill rank dies") {
  auto r = run_with(small_run("tp=2,dp=2", "tp=2,dp=2"), {"kill:prefill:0@2"});
  check_survived(r);
  CHECK(r.succeeded > 0);
}

TEST_CASE("fault: a decode rank dies, also before it ever connected") {
  for (const char* f : {"kill:decode:1@1", "kill:decode:3@6"}) {
    auto r = run_with(small_run("tp=2", "tp=2,dp=2"), {f});
    check_survived(r);
    CHECK(r.succeeded > 0);
  }
}

TEST_CASE("fault: decode aborts a request") {
  auto r = run_with(small_run("tp=2,cp=2", "tp=2"), {"abort:decode@2", "abort:decode@5"});
  check_survived(r);
  CHECK(r.succeeded >= r.requests - 2);
}

TEST_CASE("fault: a lost destination message fails its request at the waiting timeout, not later") {
  auto o = small_run("tp=2", "tp=2");
  o.tunables.waiting_timeout_ms = 300;
  o.tunables.bootstrap_timeout_ms = 300;
  auto r = run_with(o, {"drop-dst-info@3"});
  check_survived(r);
  CHECK(r.failed == 1);
  bool saw_timeout = false;
  for (const auto& out : r.outcomes)
    if (out.state == "Failed") saw_timeout = out.reason.find("timeout") != std::string::npos;
  CHECK(saw_timeout);
}

TEST_CASE("fault: a corrupted byte is caught by verification (exit 1)") {
  auto r = run_with(small_run("tp=1", "tp=1"), {"corrupt@2"});
  CHECK(r.exit_code() == 1);
  CHECK(r.mismatched_pages >= 1);
  CHECK(r.bytes_verified < r.bytes_expected);
}

TEST_CASE("fault: several faults at once on the random interleaving") {
  for (std::uint64_t seed = 11; seed <= 14; ++seed) {
    auto o = small_run("tp=2,cp=2,dp=2", "tp=2,dp=2");
    o.interleave_seed = seed;
    auto r = run_with(o, {"kill:prefill:5@4", "abort:decode@2", "kill:decode:1@7"});
    check_survived(r);
  }
}

TEST_CASE("fault specs parse or are refused with one line naming the fault") {
  CHECK(parse_fault("kill:prefill:3@5").rank == 3);
  CHECK(parse_fault("kill:decode:0@1").at == 1);
  CHECK(parse_fault("abort:decode@4").what == kvflow::command::fault_spec::kind::abort_decode);
  CHECK(parse_fault("kill:bootstrap@3").what == kvflow::command::fault_spec::kind::kill_bootstrap);
  CHECK(parse_fault("freeze:bootstrap@3").what == kvflow::command::fault_spec::kind::freeze_bootstrap);
  for (const char* bad : {"kill:prefill:x@1", "kill:prefill:1", "abort:decode@0", "explode@1", "kill:decode:-1@2",
                          "kill:bootstrap:0@1", "freeze:bootstrap"}) {
    try {
      parse_fault(bad);
      FAIL("accepted " << bad);
    } catch (const kvflow::config::config_error& e) {
      std::string what = e.what();
      CHECK(what.rfind("fault: ", 0) == 0);
      CHECK(what.find('\n') == std::string::npos);
    }
  }
}

// Issue 9: a request from the router (another process under `kvflow launch`) with a prompt
// length near INT32_MAX overflowed the engine's page count (signed overflow, then a negative
// allocation); one longer than the pool waited for pages forever. Each is refused alone.
TEST_CASE("regression: a request the engine cannot serve is refused with the reason, before any arithmetic") {
  using kvflow::command::request_problem;
  kvflow::command::msg::new_request q;
  q.prompt_tokens = 300;
  CHECK(request_problem(q, 16, 100).empty());
  q.prefix_pages = 19;
  CHECK(request_problem(q, 16, 100).empty());  // the whole prompt cached at decode
  q.prefix_pages = 20;
  CHECK(request_problem(q, 16, 100) == "prefix of 20 pages outside [0, 19] for a prompt of 300 tokens");
  q.prefix_pages = -1;
  CHECK_FALSE(request_problem(q, 16, 100).empty());
  q.prefix_pages = 0;
  q.prompt_tokens = std::numeric_limits<std::int32_t>::max();
  CHECK(request_problem(q, 16, 100) == "prompt of 2147483647 tokens needs 134217728 pages, the rank's pool has 100");
  q.prompt_tokens = 0;
  CHECK(request_problem(q, 16, 100) == "prompt of 0 tokens");
  q.prompt_tokens = -5;
  CHECK_FALSE(request_problem(q, 16, 100).empty());
}
