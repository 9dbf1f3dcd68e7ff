// The `kvflow` command: simulate, bench. Exit codes: 0 ok, 1 failure found, 2 bad usage.
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>

#include "config/tunables.hpp"
#include "runtime/bench.hpp"
#include "runtime/simulation.hpp"

namespace {

using namespace kvflow;

int usage_error(const std::string& what) {
  std::fprintf(stderr, "kvflow: %s\n", what.c_str());
  return 2;
}

void set_log_level(const std::string& level) {
  auto l = spdlog::level::from_str(level);
  if (l == spdlog::level::off && level != "off")  // from_str answers off for unknown names
    throw config::config_error("log-level: '" + level + "' is not trace, debug, info, warn, error, critical or off");
  spdlog::set_level(l);
}

struct simulate_flags {
  std::string prefill = "cp=8", decode = "dp=8", model = "dsv32", dtype = "fp8";
  int page_size = 64, requests = 64, chunk_tokens = 1024, concurrency = 8, rooms = 0;
  std::string prompt_tokens = "512:2048", transport = "inproc", cp_send = "rank0", report;
  std::vector<std::string> faults;
  double deadline = 60;
  std::uint64_t seed = 1, interleave = 0;
};

runtime::simulation_options to_options(const simulate_flags& f) {
  runtime::simulation_options o;
  auto& c = o.cluster;
  c.prefill = config::parse_prefill(f.prefill);
  c.decode = config::parse_decode(f.decode);
  c.dtype = config::parse_dtype(f.dtype);
  c.model = config::parse_model(f.model, c.dtype);
  c.page_size = f.page_size;
  if (f.cp_send != "rank0" && f.cp_send != "all")
    throw config::config_error("cp-send: '" + f.cp_send + "' is not rank0 or all");
  c.cp_send_all = f.cp_send == "all";
  o.requests = f.requests;
  auto colon = f.prompt_tokens.find(':');
  try {
    o.prompt_min = std::stoi(f.prompt_tokens.substr(0, colon));
    o.prompt_max = colon == std::string::npos ? o.prompt_min : std::stoi(f.prompt_tokens.substr(colon + 1));
  } catch (const std::logic_error&) {
    throw config::config_error("prompt-tokens: '" + f.prompt_tokens + "' is not N or N:M");
  }
  o.chunk_tokens = f.chunk_tokens;
  o.concurrency = f.concurrency;
  o.transport = f.transport;
  for (const auto& s : f.faults) o.faults.push_back(runtime::parse_fault(s));
  o.deadline_s = f.deadline;
  o.seed = f.seed;
  o.room_pool = f.rooms;
  o.interleave_seed = f.interleave;
  o.tunables = config::load_tunables();
  // Unless set explicitly, the SGLang-sized 300 s timeouts shrink to fit the run's deadline, so
  // a lost message fails its request (and is counted) instead of stalling past the deadline.
  auto cap = static_cast<std::int64_t>(f.deadline * 1000 / 4);
  if (std::getenv("KVFLOW_BOOTSTRAP_TIMEOUT_MS") == nullptr)
    o.tunables.bootstrap_timeout_ms = std::max<std::int64_t>(1, std::min(o.tunables.bootstrap_timeout_ms, cap));
  if (std::getenv("KVFLOW_WAITING_TIMEOUT_MS") == nullptr)
    o.tunables.waiting_timeout_ms = std::max<std::int64_t>(1, std::min(o.tunables.waiting_timeout_ms, cap));
  runtime::validate(o);
  return o;
}

int run_simulate(const simulate_flags& f) {
  auto o = to_options(f);
  auto rep = runtime::run_simulation(o);
  if (!f.report.empty()) {
    std::ofstream out(f.report);
    out << rep.to_json() << "\n";
    if (!out) {
      std::fprintf(stderr, "kvflow: report: cannot write %s\n", f.report.c_str());
      return 1;
    }
  }
  double gb = double(rep.bytes_verified) / 1e9;
  std::printf(
      "simulate: prefill tp=%d cp=%d pp=%d dp=%d, decode tp=%d dp=%d pp=%d, %s %s, page %d\n"
      "  requests %d: succeeded %d, failed %d (unexpected %d), stalled %d\n"
      "  verified %.3f GB of %.3f GB, mismatched pages %llu, leaked pages %llu, aux %llu\n"
      "  transfer %.3f GB in %.2f s (%.2f GB/s; copying %.2f GB/s), latency p50 %.1f ms p99 %.1f ms, "
      "peak RSS %.0f MiB\n",
      o.cluster.prefill.tp, o.cluster.prefill.cp, o.cluster.prefill.pp, o.cluster.prefill.dp,
      o.cluster.decode.tp, o.cluster.decode.dp, o.cluster.decode.pp,
      config::describe(o.cluster.model).c_str(), config::to_string(o.cluster.dtype), o.cluster.page_size,
      rep.requests, rep.succeeded, rep.failed, rep.unexpected_failures, rep.stalled, gb,
      double(rep.bytes_expected) / 1e9, static_cast<unsigned long long>(rep.mismatched_pages),
      static_cast<unsigned long long>(rep.leaked_pages),
      static_cast<unsigned long long>(rep.leaked_aux_slots), double(rep.transfer_bytes) / 1e9,
      rep.transfer_seconds,
      rep.goodput_gbps(), rep.copy_gbps(), rep.latency_p50_ms, rep.latency_p99_ms, double(rep.peak_rss_bytes) / (1 << 20));
  for (const auto& p : rep.problems) std::fprintf(stderr, "kvflow: FAIL: %s\n", p.c_str());
  return rep.exit_code();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvflow: KV-cache transfer runtime for disaggregated LLM serving"};
  app.require_subcommand(1);
  std::string log_level = std::getenv("KVFLOW_LOG_LEVEL") ? std::getenv("KVFLOW_LOG_LEVEL") : "warn";
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error|off (env KVFLOW_LOG_LEVEL)");
  app.footer("Tunables (environment):\n" + config::tunables_help());

  simulate_flags sf;
  auto* sim = app.add_subcommand("simulate", "run a whole P/D cluster in one process, byte-verified");
  sim->add_option("--log-level", log_level, "trace|debug|info|warn|error|off");
  sim->add_option("--prefill", sf.prefill, "tp=N,cp=N,pp=N,dp=N")->capture_default_str();
  sim->add_option("--decode", sf.decode, "tp=N,dp=N,pp=N")->capture_default_str();
  sim->add_option("--model", sf.model, "dsv32 | mla:L:BYTES[:STATE_BYTES] | mha:L:KV_HEADS:HEAD_DIM")->capture_default_str();
  sim->add_option("--dtype", sf.dtype, "bf16 | fp8")->capture_default_str();
  sim->add_option("--page-size", sf.page_size, "tokens per KV page")->capture_default_str();
  sim->add_option("--requests", sf.requests, "requests to run")->capture_default_str();
  sim->add_option("--prompt-tokens", sf.prompt_tokens, "N or N:M (uniform range)")->capture_default_str();
  sim->add_option("--chunk-tokens", sf.chunk_tokens, "tokens per prefill chunk")->capture_default_str();
  sim->add_option("--concurrency", sf.concurrency, "requests in flight")->capture_default_str();
  sim->add_option("--transport", sf.transport, "inproc")->capture_default_str();
  sim->add_option("--cp-send", sf.cp_send, "rank0 | all (CP-parallel sending)")->capture_default_str();
  sim->add_option("--fault", sf.faults, "kill:prefill:R@N kill:decode:R@N abort:decode@N drop-dst-info@N corrupt@N dup-room@N");
  sim->add_option("--deadline", sf.deadline, "seconds until unfinished requests count as stalled")->capture_default_str();
  sim->add_option("--seed", sf.seed, "workload seed")->capture_default_str();
  sim->add_option("--rooms", sf.rooms, "draw rooms from N values, reused once cleared (0: unique)")->capture_default_str();
  sim->add_option("--report", sf.report, "write the JSON report here");
  sim->add_option("--interleave", sf.interleave,
                  "run every message on CAF's deterministic scheduler in a random order from this seed");

  runtime::bench_flags bf;
  auto* bench = app.add_subcommand("bench", "benchmarks: figures beside their anchors");
  bench->require_subcommand(1);
  auto* control = bench->add_subcommand("control", "per-step agreement of a prefill group, in one process");
  control->add_option("--tp", bf.tp, "attention TP size")->capture_default_str();
  control->add_option("--cp", bf.cp, "CP size")->capture_default_str();
  control->add_option("--rooms", bf.rooms, "in-flight rooms (repeatable)");
  control->add_option("--rounds", bf.rounds, "rounds per measurement")->capture_default_str();
  control->add_option("--workers", bf.workers, "actor worker threads (0: one per core)")->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::string what = e.what();
    if (auto nl = what.find('\n'); nl != std::string::npos) what.resize(nl);
    return usage_error(what);
  }
  try {
    set_log_level(log_level);
    if (sim->parsed()) return run_simulate(sf);
    if (control->parsed()) return runtime::run_bench_control(bf);
  } catch (const config::config_error& e) {
    return usage_error(e.what());
  }
  return 2;
}
