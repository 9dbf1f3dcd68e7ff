// `kvflow bench control --processes`: the per-step agreement of one prefill group whose ranks are
// separate processes (TP x CP), each a networked node of the public API (kvflow/kvflow.hpp) with
// one rank, as a serving engine runs them: worker 0 hosts the registry, the others join it; the
// group's leader makes its shared-memory segment and runs its merge (KVFLOW_AGREEMENT_VIA=2 in
// the environment measures the tree of supervisors by message instead). Each worker's thread is its
// rank's scheduler: a poll per step. Anchor, same run: SGLang's way, torch.distributed gloo
// all_reduce MIN over the TP group then the CP group, one process per rank
// (bench/gloo_allreduce.py, Debian's python3-torch: bench/setup.sh installs it).
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <thread>

#include "kvflow/kvflow.hpp"
#include "bench/bench.hpp"
#include "command/child_process.hpp"
#include "command/stop_signals.hpp"
#include "runtime/node.hpp"
#include "command/percentile.hpp"

namespace kvflow::bench {

using command::child_process;
using command::percentile;
using command::self_executable;
using command::install_stop_signals;
using command::stop_requested;
namespace {

using clock_type = std::chrono::steady_clock;
using namespace std::chrono_literals;

// The gloo anchor: bench/gloo_allreduce.py under Debian's python3; "p50 p99" in us, or why not.
result<std::pair<double, double>> gloo_anchor(int tp, int cp, int rooms, int rounds) {
  std::string script = std::string(KVFLOW_SOURCE_DIR) + "/bench/gloo_allreduce.py";
  auto p = child_process::start({"/usr/bin/python3", script, "--tp", std::to_string(tp), "--cp", std::to_string(cp),
                                 "--rooms", std::to_string(rooms), "--rounds", std::to_string(rounds)},
                                {}, true);
  if (!p) return p.error();
  std::string last;
  for (;;) {
    auto line = p.value().read_line(300s);
    if (!line) break;
    last = line.value();
  }
  auto code = p.value().wait(10s);
  std::istringstream in(last);
  std::string tag;
  double p50 = 0, p99 = 0;
  if (!code || code.value() != 0 || !(in >> tag >> p50 >> p99) || tag != "gloo")
    return status::error("bench/gloo_allreduce.py failed (bench/setup.sh installs python3-torch)");
  return std::make_pair(p50, p99);
}

struct run_figures {
  double p50 = 0, p99 = 0, cost_p50 = 0, cost_p99 = 0;
};

// The words of the next line of a worker's stdout that starts with `tag` (after the tag).
result<std::vector<std::string>> read_tagged(child_process& c, const std::string& tag) {
  auto line = c.read_line(300s);
  if (!line) return status::error("a worker said nothing: " + line.error().reason());
  std::istringstream in(line.value());
  std::string got;
  in >> got;
  if (got != tag) return status::error("a worker said '" + line.value().substr(0, 120) + "', want " + tag);
  std::vector<std::string> words;
  for (std::string w; in >> w;) words.push_back(w);
  return words;
}

result<std::vector<double>> read_values(child_process& c, const std::string& tag) {
  auto words = read_tagged(c, tag);
  if (!words) return words.error();
  std::vector<double> v;
  for (const auto& w : words.value()) v.push_back(std::stod(w));
  // The first 10% warm up (connections, mailboxes, maps).
  return std::vector<double>(v.begin() + static_cast<long>(v.size() / 10), v.end());
}

result<run_figures> run_processes(const bench_flags& f, int rooms, int rounds) {
  const int n = f.tp * f.cp;
  std::vector<child_process> workers;
  auto start = [&](int i, const std::string& bootstrap) -> status {
    std::vector<std::string> argv{self_executable(), "--log-level", "error", "bench", "control-worker", "--index",
                                  std::to_string(i), "--tp", std::to_string(f.tp), "--cp", std::to_string(f.cp),
                                  "--rooms", std::to_string(rooms), "--rounds", std::to_string(rounds)};
    if (!bootstrap.empty()) argv.insert(argv.end(), {"--bootstrap", bootstrap});
    auto c = child_process::start(argv, {}, true);
    if (!c) return c.error();
    workers.push_back(std::move(c.value()));
    return {};
  };
  if (auto s = start(0, ""); !s) return s;
  auto address = read_tagged(workers[0], "address");  // worker 0 hosts the registry
  if (!address) return address.error();
  if (address.value().size() != 1) return status::error("worker 0 printed no address");
  for (int i = 1; i < n; ++i)
    if (auto s = start(i, address.value()[0]); !s) return s;
  run_figures out;
  std::vector<double> cost;
  for (int i = 0; i < n; ++i) {
    auto lat = read_values(workers[i], "latency");
    if (!lat) return lat.error();
    auto c = read_values(workers[i], "cost");
    if (!c) return c.error();
    if (i == 0) {
      out.p50 = percentile(lat.value(), 0.5);
      out.p99 = percentile(lat.value(), 0.99);
    }
    cost.insert(cost.end(), c.value().begin(), c.value().end());
  }
  // Every worker measured every round: now they may stop (worker 0, the registry's host, last).
  for (int i = n - 1; i >= 0; --i) workers[i].stop(5s);
  out.cost_p50 = percentile(cost, 0.5);
  out.cost_p99 = percentile(cost, 0.99);
  return out;
}

}  // namespace

// One rank of the group in this process, through the public API. Prints "address HOST:PORT"
// (worker 0), then "latency ..." (per step k: from its poll(k) posting step k to its poll(k+1)
// reading round k, us) and "cost ..." (per step: the scheduler's first poll of the step, its
// post included, us); then serves until SIGTERM, so the others' last rounds still come.
int run_bench_control_worker(const control_worker_flags& w) {
  install_stop_signals();
  topology t;
  t.prefill = {w.tp, w.cp, 1, 1};
  t.decode = {1, 1, 1};
  t.model = "mla:1:64";
  t.dtype = "bf16";
  t.page_size = 16;
  node_options o;
  o.transport = "ucx";
  if (w.bootstrap.empty())
    o.listen = "127.0.0.1:0";
  else
    o.bootstrap = w.bootstrap;
  // The rooms wait for destinations that never come: they must outlast the run.
  o.tunables = {{"KVFLOW_BOOTSTRAP_TIMEOUT_MS", "3600000"}};
  auto started = node::start(t, o);
  if (!started) {
    std::fprintf(stderr, "kvflow: bench control-worker %d: %s\n", w.index, started.err().message().c_str());
    return 1;
  }
  auto n = started.value();
  if (w.bootstrap.empty()) std::printf("address %s\n", n->address().c_str());
  std::fflush(stdout);
  const std::uint64_t page = 16 * 64;
  std::vector<std::byte> memory(4 * page);
  memory_desc m;
  m.layer_begin = 0;
  m.layer_end = 1;
  m.buffers.push_back({memory.data(), 2 * page, page, buffer_role::mla_latent, 0});
  m.buffers.push_back({memory.data() + 2 * page, 2 * page, 64, buffer_role::aux, -1});
  auto r = n->add_prefill({w.index % w.tp, w.index / w.tp, 0, 0}, m);
  if (!r) {
    std::fprintf(stderr, "kvflow: bench control-worker %d: %s\n", w.index, r.err().message().c_str());
    return 1;
  }
  auto& rank = *r.value();
  for (int i = 0; i < w.rooms; ++i) rank.create({std::uint64_t(i + 1), 1}, 0);
  std::vector<clock_type::time_point> posted(static_cast<std::size_t>(w.rounds) + 2);
  std::vector<double> latency, cost;
  for (int k = 1; k <= w.rounds + 1; ++k) {
    const auto t0 = clock_type::now();
    auto v = rank.poll(std::uint64_t(k), std::chrono::microseconds(0));
    const auto t1 = clock_type::now();
    posted[static_cast<std::size_t>(k)] = t0;
    if (k > 1) cost.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    if (!v && v.err().code() == errc::not_ready) v = rank.poll(std::uint64_t(k), std::chrono::seconds(30));
    if (!v) {
      std::fprintf(stderr, "kvflow: bench control-worker %d: step %d: %s\n", w.index, k, v.err().message().c_str());
      return 1;
    }
    if (k > 1)
      latency.push_back(
          std::chrono::duration<double, std::micro>(clock_type::now() - posted[static_cast<std::size_t>(k - 1)]).count());
  }
  for (const auto* list : {&latency, &cost}) {
    std::printf("%s", list == &latency ? "latency" : "cost");
    for (double x : *list) std::printf(" %.2f", x);
    std::printf("\n");
  }
  std::fflush(stdout);
  for (int i = 0; i < 6000 && !stop_requested(); ++i) std::this_thread::sleep_for(10ms);
  n->stop();
  return 0;
}

int run_bench_control_processes(const bench_flags& f) {
  auto rooms = f.rooms.empty() ? std::vector<int>{1, 64} : f.rooms;
  const int rounds = f.rounds;
  const char* via = std::getenv("KVFLOW_AGREEMENT_VIA");
  const bool tree = via != nullptr && std::string(via) == "2";
  std::printf("bench control --processes: prefill group TP%d x CP%d, one process per rank (%d), networked nodes of "
              "the public API, agreeing %s, %u hardware threads, %d rounds each\n",
              f.tp, f.cp, f.tp * f.cp,
              tree ? "through the tree of supervisors by message (loopback TCP, CAF middleman; KVFLOW_AGREEMENT_VIA=2)"
                   : "through the group's shared-memory segment (the merge in the leader's process)",
              std::thread::hardware_concurrency(), rounds);
  std::printf("%7s %12s %12s %14s %14s %12s %12s %10s\n", "rooms", "kvflow_p50", "kvflow_p99", "sched_cost_p50",
              "sched_cost_p99", "gloo_p50", "gloo_p99", "gloo/kvflow");
  for (int n : rooms) {
    auto k = run_processes(f, n, rounds);
    if (!k) {
      std::fprintf(stderr, "kvflow: bench control --processes: %s\n", k.error().reason().c_str());
      return 1;
    }
    auto g = gloo_anchor(f.tp, f.cp, n, std::min(rounds, 500));
    double gp50 = g ? g.value().first : 0, gp99 = g ? g.value().second : 0;
    const auto& v = k.value();
    std::printf("%7d %12.1f %12.1f %14.2f %14.2f %12.1f %12.1f %10.1f\n", n, v.p50, v.p99, v.cost_p50, v.cost_p99,
                gp50, gp99, gp50 > 0 ? gp50 / v.p50 : 0);
    if (!g) std::printf("        gloo anchor: %s\n", g.error().reason().c_str());
    std::fflush(stdout);
  }
  std::printf("us per step. kvflow, through the public API: rank 0 from its poll(k) posting step k to its "
              "poll(k+1) reading round k (every rank's post merged by MIN in between); sched_cost: one "
              "scheduler's first poll of a step (its post, and the round when complete), every rank; gloo: all_reduce MIN over the TP "
              "group then the CP group, as SGLang's poll does it, same machine, same run\n");
  return 0;
}

}  // namespace kvflow::bench
