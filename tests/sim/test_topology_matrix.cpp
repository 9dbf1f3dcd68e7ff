// The topology matrix of the core issue, each run byte-verified at decode.
#include "sim_helpers.hpp"

using kvflow::test::check_clean;
using kvflow::test::small_run;

TEST_CASE("matrix: P tp1 / D tp1") { check_clean(run_simulation(small_run("tp=1", "tp=1"))); }

TEST_CASE("matrix: P tp2 / D tp4 (D > P)") { check_clean(run_simulation(small_run("tp=2", "tp=4"))); }

TEST_CASE("matrix: P tp4 / D tp2 MLA (D < P, one authoritative reader)") {
  check_clean(run_simulation(small_run("tp=4", "tp=2")));
}

TEST_CASE("matrix: P tp4 / D tp2 MHA (D < P, heads from every prefill rank)") {
  check_clean(run_simulation(small_run("tp=4", "tp=2", "mha:4:8:32")));
}

TEST_CASE("matrix: P tp2 / D tp4 MHA (D > P, head slices)") {
  check_clean(run_simulation(small_run("tp=2", "tp=4", "mha:4:8:32")));
}

TEST_CASE("matrix: P cp8 / D dp8, DeepSeek-V3.2 fp8 (the seed)") {
  auto o = small_run("cp=8", "dp=8");
  o.cluster.dtype = kvflow::config::kv_dtype::fp8;
  o.cluster.model = kvflow::config::parse_model("dsv32", o.cluster.dtype);
  o.cluster.page_size = 64;
  o.prompt_min = 100;
  o.prompt_max = 700;
  o.chunk_tokens = 256;
  check_clean(run_simulation(o));
}

TEST_CASE("matrix: P tp2 cp4 / D tp4") { check_clean(run_simulation(small_run("tp=2,cp=4", "tp=4"))); }

TEST_CASE("matrix: P pp2 cp2 tp2 / D tp2 pp2") {
  check_clean(run_simulation(small_run("pp=2,cp=2,tp=2", "tp=2,pp=2")));
}

TEST_CASE("matrix: P pp2 cp2 tp2 / D tp2 pp1 (decode reads every stage)") {
  check_clean(run_simulation(small_run("pp=2,cp=2,tp=2", "tp=2,pp=1")));
}

TEST_CASE("matrix: P dp2 (attention dp) / D dp2") {
  check_clean(run_simulation(small_run("tp=2,dp=2", "tp=2,dp=2")));
}

TEST_CASE("matrix: several chunks per request and an empty last chunk") {
  // 64 tokens per chunk = 4 pages; 128-token prompts = 8 pages: the last chunk carries nothing.
  auto o = small_run("tp=2", "tp=2");
  o.prompt_min = o.prompt_max = 128;
  check_clean(run_simulation(o));
}

TEST_CASE("matrix: CP-parallel sending (--cp-send all)") {
  auto o = small_run("tp=2,cp=4", "tp=2");
  o.cluster.cp_send_all = true;
  check_clean(run_simulation(o));
}

TEST_CASE("matrix: CP-parallel sending with MHA and decode pp1 over prefill pp2") {
  auto o = small_run("tp=2,cp=2,pp=2", "tp=4", "mha:4:8:32");
  o.cluster.cp_send_all = true;
  check_clean(run_simulation(o));
}

TEST_CASE("matrix: same runs on the deterministic random interleaving") {
  for (std::uint64_t seed = 1; seed <= 3; ++seed) {
    auto o = small_run("tp=2,cp=2", "tp=4");
    o.interleave_seed = seed;
    check_clean(run_simulation(o));
  }
}

TEST_CASE("matrix: state pages (an indexer cache) move with the KV and are verified byte for byte") {
  auto with_state = small_run("tp=2,cp=2", "tp=4", "mla:4:64:16");
  with_state.cluster.cp_send_all = true;
  auto without = with_state;
  without.cluster.model = kvflow::config::parse_model("mla:4:64", without.cluster.dtype);
  auto a = run_simulation(with_state);
  auto b = run_simulation(without);
  check_clean(a);
  check_clean(b);
  // Same workload: the state adds 16 bytes per token per layer to the 64 of the KV.
  CHECK(a.bytes_expected * 64 == b.bytes_expected * 80);
}
