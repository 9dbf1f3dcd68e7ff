// The `kvflow` command: simulate, launch, plan, bench. Exit codes: 0 ok, 1 failure found, 2 bad usage.
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>

#include "config/link_security.hpp"
#include "config/tunables.hpp"
#include "bench/bench.hpp"
#include "command/launch.hpp"
#include "command/plan_command.hpp"
#include "command/rank_process.hpp"
#include "command/simulation.hpp"

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

// The cluster's shape: the same flags for simulate, launch, bootstrap and rank.
struct cluster_flags {
  std::string prefill = "cp=8", decode = "dp=8", model = "dsv32", dtype = "fp8", cp_send = "rank0";
  int page_size = 64;
  // As passed on to the processes a launcher starts.
  std::vector<std::string> args() const {
    return {"--prefill", prefill, "--decode", decode, "--model", model, "--dtype", dtype,
            "--page-size", std::to_string(page_size), "--cp-send", cp_send};
  }
};

void add_cluster_options(CLI::App* app, cluster_flags& f) {
  app->add_option("--prefill", f.prefill, "tp=N,cp=N,pp=N,dp=N")->capture_default_str();
  app->add_option("--decode", f.decode, "tp=N,dp=N,pp=N")->capture_default_str();
  app->add_option("--model", f.model, "dsv32 | mla:L:BYTES[:STATE_BYTES] | mha:L:KV_HEADS:HEAD_DIM")->capture_default_str();
  app->add_option("--dtype", f.dtype, "bf16 | fp8")->capture_default_str();
  app->add_option("--page-size", f.page_size, "tokens per KV page")->capture_default_str();
  app->add_option("--cp-send", f.cp_send, "rank0 | all (CP-parallel sending)")->capture_default_str();
}

// Node-link security: flags over the environment (KVFLOW_AUTH_TOKEN... in --help). The token
// has no flag of its own: a command line is visible to every user of the machine.
struct link_flags {
  std::string token_file, cert, key, ca;
  bool allow_insecure = false;
  config::link_security resolve() const {
    config::link_security s;
    s.auth_token_file = token_file;
    s.tls_certificate = cert;
    s.tls_key = key;
    s.tls_ca = ca;
    if (allow_insecure) s.allow_insecure_listen = "1";
    return config::resolve_link_security(s, ::getenv);
  }
};

void add_link_options(CLI::App* app, link_flags& f) {
  app->add_option("--auth-token-file", f.token_file, "file holding the cluster token (env KVFLOW_AUTH_TOKEN[_FILE])");
  app->add_option("--tls-cert", f.cert, "PEM certificate of this node: mutual TLS on node links (env KVFLOW_TLS_CERT)");
  app->add_option("--tls-key", f.key, "PEM private key of --tls-cert (env KVFLOW_TLS_KEY)");
  app->add_option("--tls-ca", f.ca, "PEM CA that peers' certificates chain to (env KVFLOW_TLS_CA)");
  app->add_flag("--allow-insecure-listen", f.allow_insecure,
                "listen beyond loopback with neither TLS nor a token (env KVFLOW_ALLOW_INSECURE_LISTEN=1)");
}

config::cluster_config to_cluster(const cluster_flags& f) {
  config::cluster_config c;
  c.prefill = config::parse_prefill(f.prefill);
  c.decode = config::parse_decode(f.decode);
  c.dtype = config::parse_dtype(f.dtype);
  c.model = config::parse_model(f.model, c.dtype);
  c.page_size = f.page_size;
  if (f.cp_send != "rank0" && f.cp_send != "all")
    throw config::config_error("cp-send: '" + f.cp_send + "' is not rank0 or all");
  c.cp_send_all = f.cp_send == "all";
  config::validate(c);
  return c;
}

struct simulate_flags : cluster_flags {
  int requests = 64, chunk_tokens = 1024, concurrency = 8, rooms = 0;
  std::string prompt_tokens = "512:2048", transport = "inproc", report;
  std::vector<std::string> faults;
  double deadline = 60, soak = 0;
  int soak_fault_every = 8;
  std::uint64_t seed = 1, interleave = 0;
  bool delay_transfers = false;
};

command::simulation_options to_options(const simulate_flags& f, bool processes) {
  command::simulation_options o;
  o.cluster = to_cluster(f);
  o.processes = processes;
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
  o.transport = processes ? "ucx" : f.transport;  // only UCX crosses processes
  for (const auto& s : f.faults) o.faults.push_back(command::parse_fault(s));
  o.deadline_s = f.deadline;
  o.soak_s = f.soak;
  o.soak_fault_every = f.soak_fault_every;
  o.seed = f.seed;
  o.room_pool = f.rooms;
  o.interleave_seed = f.interleave;
  o.delay_transfers = f.delay_transfers;
  o.tunables = config::load_tunables();
  // Unless set explicitly, the SGLang-sized 300 s timeouts shrink to fit the run's deadline, so
  // a lost message fails its request (and is counted) instead of stalling past the deadline.
  auto cap = static_cast<std::int64_t>(f.deadline * 1000 / 4);
  if (std::getenv("KVFLOW_BOOTSTRAP_TIMEOUT_MS") == nullptr)
    o.tunables.bootstrap_timeout_ms = std::max<std::int64_t>(1, std::min(o.tunables.bootstrap_timeout_ms, cap));
  if (std::getenv("KVFLOW_WAITING_TIMEOUT_MS") == nullptr)
    o.tunables.waiting_timeout_ms = std::max<std::int64_t>(1, std::min(o.tunables.waiting_timeout_ms, cap));
  command::validate(o);
  return o;
}

int run_simulate(const simulate_flags& f, const command::launch_options* launch) {
  auto o = to_options(f, launch != nullptr);
  auto rep = launch != nullptr ? command::run_launch(o, *launch) : command::run_simulation(o);
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
      "%s: prefill tp=%d cp=%d pp=%d dp=%d, decode tp=%d dp=%d pp=%d, %s %s, page %d\n"
      "  requests %d: succeeded %d, failed %d (unexpected %d), stalled %d\n"
      "  verified %.3f GB of %.3f GB, mismatched pages %llu, leaked pages %llu, aux %llu\n"
      "  transfer %.3f GB in %.2f s (%.2f GB/s; copying %.2f GB/s), latency p50 %.1f ms p99 %.1f ms, "
      "peak RSS %.0f MiB\n",
      launch != nullptr ? "launch" : "simulate", o.cluster.prefill.tp, o.cluster.prefill.cp, o.cluster.prefill.pp, o.cluster.prefill.dp,
      o.cluster.decode.tp, o.cluster.decode.dp, o.cluster.decode.pp,
      config::describe(o.cluster.model).c_str(), config::to_string(o.cluster.dtype), o.cluster.page_size,
      rep.requests, rep.succeeded, rep.failed, rep.unexpected_failures, rep.stalled, gb,
      double(rep.bytes_expected) / 1e9, static_cast<unsigned long long>(rep.mismatched_pages),
      static_cast<unsigned long long>(rep.leaked_pages),
      static_cast<unsigned long long>(rep.leaked_aux_slots), double(rep.transfer_bytes) / 1e9,
      rep.transfer_seconds,
      rep.goodput_gbps(), rep.copy_gbps(), rep.latency_p50_ms, rep.latency_p99_ms, double(rep.peak_rss_bytes) / (1 << 20));
  if (o.soak_s > 0)
    std::printf("  soak %.1f s: %.1f requests/s held, %zu faults applied, resident memory%s %.0f MiB at a quarter, "
                "%.0f MiB at the end, heap in use %.1f MiB then %.1f MiB\n",
                rep.soak_seconds, rep.requests_per_second, rep.faults_applied_total,
                launch != nullptr ? " (the launcher's)" : "",
                double(rep.rss_warm_bytes) / (1 << 20), double(rep.rss_end_bytes) / (1 << 20),
                double(rep.heap_warm_bytes) / (1 << 20), double(rep.heap_end_bytes) / (1 << 20));
  for (const auto& p : rep.problems) std::fprintf(stderr, "kvflow: FAIL: %s\n", p.c_str());
  return rep.exit_code();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvflow: KV-cache transfer runtime for disaggregated LLM serving"};
  app.require_subcommand(1);
  std::string log_level = std::getenv("KVFLOW_LOG_LEVEL") ? std::getenv("KVFLOW_LOG_LEVEL") : "warn";
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error|off (env KVFLOW_LOG_LEVEL)");
  app.footer("Tunables (environment):\n" + config::tunables_help() + "Node links (environment):\n" +
             config::link_settings_help());

  simulate_flags sf;
  auto add_workload = [&](CLI::App* a, bool one_process) {
    a->add_option("--log-level", log_level, "trace|debug|info|warn|error|off");
    add_cluster_options(a, sf);
    a->add_option("--requests", sf.requests, "requests to run")->capture_default_str();
    a->add_option("--prompt-tokens", sf.prompt_tokens, "N or N:M (uniform range)")->capture_default_str();
    a->add_option("--chunk-tokens", sf.chunk_tokens, "tokens per prefill chunk")->capture_default_str();
    a->add_option("--concurrency", sf.concurrency, "requests in flight")->capture_default_str();
    a->add_option("--fault", sf.faults,
                  one_process ? "kill:prefill:R@N kill:decode:R@N abort:decode@N abort-in-transfer:decode@N drop-dst-info@N corrupt@N dup-room@N"
                              : "kill:prefill:R@N kill:decode:R@N freeze:prefill:R@N freeze:decode:R@N "
                                "restart:bootstrap@N abort:decode@N abort-in-transfer:decode@N drop-dst-info@N corrupt@N dup-room@N");
    a->add_option("--deadline", sf.deadline, "seconds until unfinished requests count as stalled")->capture_default_str();
    a->add_option("--seed", sf.seed, "workload seed")->capture_default_str();
    a->add_option("--rooms", sf.rooms, "draw rooms from N values, reused once cleared (0: unique)")->capture_default_str();
    a->add_option("--report", sf.report, "write the JSON report here");
    a->add_option("--soak", sf.soak,
                  "SECONDS: keep the load on this long (batches of --requests) with random request faults")
        ->capture_default_str();
    a->add_option("--soak-fault-every", sf.soak_fault_every, "soak: a fault about every N requests")
        ->capture_default_str();
  };
  auto* sim = app.add_subcommand("simulate", "run a whole P/D cluster in one process, byte-verified");
  add_workload(sim, true);
  sim->add_option("--transport", sf.transport, "inproc | ucx")->capture_default_str();
  sim->add_option("--interleave", sf.interleave,
                  "run every message on CAF's deterministic scheduler in a random order from this seed");
  sim->add_flag("--delay-transfers", sf.delay_transfers,
                "with --interleave: hold every push in flight and land the held pushes in random order");

  command::launch_options lo;
  auto* launch = app.add_subcommand("launch", "run the cluster as one process per rank (bootstrap + ranks), byte-verified");
  add_workload(launch, false);
  launch->add_option("--host", lo.host, "where the launcher and the bootstrap listen")->capture_default_str();
  launch->add_option("--prefill-host", lo.prefill_host, "where prefill ranks listen (default: --host)");
  launch->add_option("--decode-host", lo.decode_host, "where decode ranks listen (default: --host)");
  launch->add_option("--prefill-exec", lo.prefill_exec, "command prefix for prefill rank processes (e.g. 'ip netns exec A')");
  launch->add_option("--decode-exec", lo.decode_exec, "command prefix for decode rank processes");
  link_flags launch_links;
  add_link_options(launch, launch_links);

  cluster_flags planf;
  bool plan_json = false;
  auto* plan = app.add_subcommand("plan", "print every rank's routing plan (peers, responses, layers, heads, CP shares)");
  add_cluster_options(plan, planf);
  plan->add_flag("--json", plan_json, "a JSON document instead of text");

  cluster_flags bootf;
  std::string boot_listen = "127.0.0.1:0";
  auto* boot = app.add_subcommand("bootstrap", "serve the bootstrap registry over TCP");
  boot->add_option("--log-level", log_level, "trace|debug|info|warn|error|off");
  boot->add_option("--listen", boot_listen, "HOST:PORT (port 0: any free one, printed)")->capture_default_str();
  add_cluster_options(boot, bootf);
  link_flags boot_links;
  add_link_options(boot, boot_links);

  cluster_flags rankf;
  command::rank_options ro;
  std::string role = "prefill";
  auto* rank = app.add_subcommand("rank", "run one prefill or decode rank as this process");
  rank->add_option("--log-level", log_level, "trace|debug|info|warn|error|off");
  rank->add_option("--role", role, "prefill | decode")->required();
  rank->add_option("--rank", ro.rank, "global prefill or decode rank")->required();
  rank->add_option("--bootstrap", ro.bootstrap, "HOST:PORT of kvflow bootstrap")->required();
  rank->add_option("--listen", ro.listen, "HOST:PORT peers connect to (port 0: any)")->capture_default_str();
  rank->add_option("--report-to", ro.report_to, "HOST:PORT of the launcher that observes this rank");
  rank->add_option("--transport", ro.transport, "ucx")->capture_default_str();
  rank->add_option("--pool-pages", ro.pool_pages, "KV pages in this rank's pool")->required();
  rank->add_option("--aux-slots", ro.aux_slots, "aux rows")->capture_default_str();
  rank->add_option("--chunk-tokens", ro.chunk_tokens, "prefill: tokens per chunk")->capture_default_str();
  rank->add_option("--wire-version", ro.wire_version, "speak this wire version (compatibility tests; 0: this build's)");
  add_cluster_options(rank, rankf);
  link_flags rank_links;
  add_link_options(rank, rank_links);

  bench::bench_flags bf;
  auto* bench = app.add_subcommand("bench", "benchmarks: figures beside their anchors");
  bench->require_subcommand(1);
  auto* control = bench->add_subcommand("control", "per-step agreement of a prefill group, in one process");
  control->add_option("--tp", bf.tp, "attention TP size")->capture_default_str();
  control->add_option("--cp", bf.cp, "CP size")->capture_default_str();
  control->add_option("--rooms", bf.rooms, "in-flight rooms (repeatable)");
  control->add_option("--rounds", bf.rounds, "rounds per measurement")->capture_default_str();
  control->add_option("--workers", bf.workers, "actor worker threads (0: one per core)")->capture_default_str();
  bool processes = false;
  control->add_flag("--processes", processes, "one process per rank, beside torch.distributed gloo (bench/setup.sh)");
  bench::control_worker_flags cw;
  auto* worker = bench->add_subcommand("control-worker", "one rank process of bench control --processes (internal)");
  worker->group("");  // hidden
  worker->add_option("--bootstrap", cw.bootstrap);
  worker->add_option("--index", cw.index);
  worker->add_option("--tp", cw.tp);
  worker->add_option("--cp", cw.cp);
  worker->add_option("--rooms", cw.rooms);
  worker->add_option("--rounds", cw.rounds);

  bench::transfer_flags tf;
  bool no_perftest = false;
  auto* transfer = bench->add_subcommand("transfer", "UCX push between two processes vs ucx_perftest put_bw");
  transfer->add_option("--sizes", tf.sizes, "block sizes in bytes (repeatable)");
  transfer->add_option("--bytes", tf.bytes_per_size, "bytes moved per block size")->capture_default_str();
  transfer->add_option("--tokens", tf.request_tokens, "whole-request sizes in tokens (repeatable)");
  transfer->add_flag("--no-perftest", no_perftest, "skip the ucx_perftest anchor");

  bench::gpu_flags gf;
  auto* gpu = bench->add_subcommand("gpu", "GPU copy paths of one DSv3.2 request vs cudaMemcpyAsync and pinned copies, and requests "
                                  "through the public API between two processes vs the gather kernel");
  gpu->add_option("--device", gf.device, "CUDA device")->capture_default_str();
  gpu->add_option("--tokens", gf.request_tokens, "request sizes in tokens (repeatable)");
  gpu->add_option("--reps", gf.reps, "timed repetitions per path (best of)")->capture_default_str();
  bool serve_ucx = false;  // the UCX rows' receiving process, started by bench gpu itself
  gpu->add_flag("--serve-ucx", serve_ucx)->group("");
  bool no_api = false;
  gpu->add_flag("--no-api", no_api, "leave out the API rows (requests through the public API between two processes)");
  gpu->add_flag("--api-only", gf.api_only, "only the API rows and the gather kernel they are compared with");
  gpu->add_option("--api-requests", gf.api_requests, "API rows: requests in flight at once")->capture_default_str();
  gpu->add_option("--api-chunk-tokens", gf.api_chunk_tokens, "API rows: tokens per prefill chunk (one send() each)")
      ->capture_default_str();
  gpu->add_option("--api-step-us", gf.api_step_us, "API rows: microseconds between scheduler steps (polls) of both engines")
      ->capture_default_str();
  gpu->add_option("--api-model", gf.api_model, "API rows: dsv32 | mla:L:BYTES[:STATE_BYTES] (fp8, 64-token pages)")
      ->capture_default_str();
  gpu->add_option("--api-timeout", gf.api_timeout_s, "API rows: seconds before an unfinished run fails")
      ->capture_default_str();
  std::string serve_api;  // the API rows' decode engine (its prefill node's address), started by bench gpu itself
  gpu->add_option("--serve-api", serve_api)->group("");

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
    if (sim->parsed()) return run_simulate(sf, nullptr);
    if (launch->parsed()) {
      lo.cluster_flags = sf.args();
      lo.log_level = log_level;
      lo.links = launch_links.resolve();
      return run_simulate(sf, &lo);
    }
    if (plan->parsed()) return command::run_plan(to_cluster(planf), plan_json);
    if (boot->parsed()) {
      command::bootstrap_options b;
      b.cluster = to_cluster(bootf);
      b.listen = boot_listen;
      b.tunables = config::load_tunables();
      b.links = boot_links.resolve();
      return command::run_bootstrap(b);
    }
    if (rank->parsed()) {
      if (role != "prefill" && role != "decode") throw config::config_error("role: '" + role + "' is not prefill or decode");
      ro.prefill = role == "prefill";
      ro.cluster = to_cluster(rankf);
      ro.tunables = config::load_tunables();
      ro.links = rank_links.resolve();
      const int ranks = ro.prefill ? ro.cluster.prefill.ranks() : ro.cluster.decode.ranks();
      if (ro.rank < 0 || ro.rank >= ranks)
        throw config::config_error("rank: " + std::to_string(ro.rank) + " is not a " + role + " rank (0.." +
                                   std::to_string(ranks - 1) + ")");
      if (ro.pool_pages < 1) throw config::config_error("pool-pages: must be >= 1");
      if (!ro.prefill && ro.aux_slots < 1) throw config::config_error("aux-slots: a decode rank needs >= 1");
      return command::run_rank(ro);
    }
    if (control->parsed()) return processes ? bench::run_bench_control_processes(bf) : bench::run_bench_control(bf);
    if (worker->parsed()) return bench::run_bench_control_worker(cw);
    if (transfer->parsed()) {
      tf.perftest = !no_perftest;
      return bench::run_bench_transfer(tf);
    }
    if (gpu->parsed()) {
      gf.api = !no_api || gf.api_only;
      if (gf.api_requests < 1 || gf.api_requests > 1024)
        throw config::config_error("api-requests: must be 1..1024, got " + std::to_string(gf.api_requests));
      if (gf.api_chunk_tokens < 1)
        throw config::config_error("api-chunk-tokens: must be >= 1, got " + std::to_string(gf.api_chunk_tokens));
      if (gf.api_step_us < 0) throw config::config_error("api-step-us: must be >= 0, got " + std::to_string(gf.api_step_us));
      if (gf.api_timeout_s < 1)
        throw config::config_error("api-timeout: must be >= 1, got " + std::to_string(gf.api_timeout_s));
      config::model_layout api_model;
      try {
        api_model = config::parse_model(gf.api_model, config::kv_dtype::fp8);
      } catch (const config::config_error& e) {
        throw config::config_error(std::string("api-") + e.what());  // "api-model: ..."
      }
      if (api_model.kind != config::model_kind::mla)
        throw config::config_error("api-model: '" + gf.api_model + "' is not an MLA model (dsv32, mla:L:BYTES[:STATE_BYTES])");
    }
    if (gpu->parsed() && serve_ucx)
      return bench::serve_ucx_gpu(gf.device, gf.request_tokens.empty() ? 32768 : gf.request_tokens.back());
    if (gpu->parsed() && !serve_api.empty())
      return bench::serve_api_gpu(gf, serve_api, gf.request_tokens.empty() ? 32768 : gf.request_tokens.back());
    if (gpu->parsed()) return bench::run_bench_gpu(gf);
  } catch (const config::config_error& e) {
    return usage_error(e.what());
  }
  return 2;
}
