// `kvflow bench control --processes`: the per-step agreement of one prefill group whose ranks are
// separate processes (TP x CP), the supervisors in the processes of the ranks that lead them, as
// `kvflow launch` places them. Each rank's scheduler reports a step (msg::step_report) and
// receives the agreed round (msg::agreed_round). Anchor, same run: SGLang's way, torch.distributed
// gloo all_reduce MIN over the TP group then the CP group, one process per rank
// (bench/gloo_allreduce.py, Debian's python3-torch: bench/setup.sh installs it).
#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include <cstdio>
#include <map>
#include <sstream>
#include <thread>

#include "actors/messages.hpp"
#include "actors/supervisor.hpp"
#include "runtime/bench.hpp"
#include "runtime/child_process.hpp"
#include "runtime/node.hpp"
#include "runtime/percentile.hpp"

namespace kvflow::runtime {
namespace {

using clock_type = std::chrono::steady_clock;
using namespace std::chrono_literals;

struct bench_hello {
  std::int32_t index = 0;
  std::string host;
  std::uint16_t port = 0;
  caf::actor worker;
  caf::actor root;  // worker 0 only
};
struct bench_setup {
  caf::actor root;
  std::string root_host;
  std::uint16_t root_port = 0;
};
struct bench_shard {
  std::int32_t index = 0;
  caf::actor shard;  // CP rank 0 of a shard only
};
struct bench_wire {
  caf::actor parent;
  std::string parent_host;
  std::uint16_t parent_port = 0;
};
struct bench_ready {
  std::int32_t index = 0;
};
struct bench_go {};
struct bench_result {
  std::int32_t index = 0;
  std::vector<double> latency_us;  // report sent -> agreed round received
  std::vector<double> cost_us;     // the scheduler's share per step: build + send + handle reply
};
template <class I> typename I::result_type inspect(I& f, bench_hello& x) {
  return f(caf::meta::type_name("bench_hello"), x.index, x.host, x.port, x.worker, x.root);
}
template <class I> typename I::result_type inspect(I& f, bench_setup& x) {
  return f(caf::meta::type_name("bench_setup"), x.root, x.root_host, x.root_port);
}
template <class I> typename I::result_type inspect(I& f, bench_shard& x) {
  return f(caf::meta::type_name("bench_shard"), x.index, x.shard);
}
template <class I> typename I::result_type inspect(I& f, bench_wire& x) {
  return f(caf::meta::type_name("bench_wire"), x.parent, x.parent_host, x.parent_port);
}
template <class I> typename I::result_type inspect(I& f, bench_ready& x) {
  return f(caf::meta::type_name("bench_ready"), x.index);
}
template <class I> typename I::result_type inspect(I& f, bench_go&) { return f(caf::meta::type_name("bench_go")); }
template <class I> typename I::result_type inspect(I& f, bench_result& x) {
  return f(caf::meta::type_name("bench_result"), x.index, x.latency_us, x.cost_us);
}

void add_bench_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<bench_hello>("kvflow.bench.hello");
  cfg.add_message_type<bench_setup>("kvflow.bench.setup");
  cfg.add_message_type<bench_shard>("kvflow.bench.shard");
  cfg.add_message_type<bench_wire>("kvflow.bench.wire");
  cfg.add_message_type<bench_ready>("kvflow.bench.ready");
  cfg.add_message_type<bench_go>("kvflow.bench.go");
  cfg.add_message_type<bench_result>("kvflow.bench.result");
  cfg.add_message_type<std::vector<double>>("kvflow.bench.doubles");
}

step_states states_of(int rooms, std::uint64_t round, int rank) {
  step_states s(rooms);
  for (int i = 0; i < rooms; ++i)
    s[i] = {std::uint64_t(i + 1), 1, static_cast<std::uint8_t>(1 + (round + rank + i) % 3)};
  return s;
}

// One rank's scheduler in the benchmark: report, wait for the agreed round, report the next.
struct bench_rank_state {
  caf::actor parent, coordinator;
  int index = 0, child = 0, rooms = 0, rounds = 0;
  clock_type::time_point sent;
  double send_cost_us = 0;
  bench_result result;
};
caf::behavior bench_rank(caf::stateful_actor<bench_rank_state>* self, caf::actor parent, caf::actor coordinator,
                         int index, int child, int rooms, int rounds) {
  auto& st = self->state;
  st.parent = parent;
  st.coordinator = coordinator;
  st.index = index;
  st.child = child;
  st.rooms = rooms;
  st.rounds = rounds;
  st.result.index = index;
  auto post = [self](std::uint64_t round) {
    auto& st = self->state;
    auto t0 = clock_type::now();
    self->send(st.parent, msg::step_report{round, st.child, states_of(st.rooms, round, st.index)});
    st.sent = t0;
    st.send_cost_us = std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
  };
  return {
      [post](bench_go) { post(1); },
      [self, post](const msg::agreed_round& a) {
        auto t0 = clock_type::now();
        auto& st = self->state;
        st.result.latency_us.push_back(std::chrono::duration<double, std::micro>(t0 - st.sent).count());
        std::uint64_t acted = 0;  // what a rank does with the round: look at every room's state
        for (const auto& s : a.states) acted += s.state;
        double handle_us = std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
        st.result.cost_us.push_back(st.send_cost_us + handle_us + (acted == ~0ull ? 1 : 0));
        if (static_cast<int>(a.round) < st.rounds)
          post(a.round + 1);
        else
          self->send(st.coordinator, st.result);
      },
  };
}

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

result<run_figures> run_processes(const bench_flags& f, int rooms, int rounds) {
  caf::actor_system_config cfg;
  config::tunables t;
  configure_node(cfg, t);
  add_bench_types(cfg);
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  auto port = publish_on(sys, caf::actor_cast<caf::actor>(self), {"127.0.0.1", 0});
  if (!port) return port.error();
  const int n = f.tp * f.cp;
  std::vector<child_process> workers;
  for (int i = 0; i < n; ++i) {
    auto c = child_process::start({self_executable(), "bench", "control-worker", "--coordinator",
                                   "127.0.0.1:" + std::to_string(port.value()), "--index", std::to_string(i),
                                   "--tp", std::to_string(f.tp), "--cp", std::to_string(f.cp), "--rooms",
                                   std::to_string(rooms), "--rounds", std::to_string(rounds)},
                                  {}, false);
    if (!c) return c.error();
    workers.push_back(std::move(c.value()));
  }
  std::map<int, bench_hello> hellos;
  std::map<int, caf::actor> shards;
  std::vector<bench_result> results;
  int ready = 0;
  bool failed = false;
  auto wait_for = [&](auto cond) {
    while (!cond() && !failed)
      self->receive([&](bench_hello& h) { hellos[h.index] = h; },
                    [&](bench_shard& s) { shards[s.index] = s.shard; },
                    [&](bench_ready&) { ++ready; },
                    [&](bench_result& r) { results.push_back(std::move(r)); },
                    caf::after(60s) >> [&] { failed = true; });
  };
  wait_for([&] { return static_cast<int>(hellos.size()) == n; });
  if (failed) return status::error("workers did not start");
  const auto& h0 = hellos[0];
  for (auto& [i, h] : hellos) self->send(h.worker, bench_setup{h0.root, h0.host, h0.port});
  wait_for([&] { return static_cast<int>(shards.size()) == n; });
  // rank index = cp * tp + tp_rank (tp fastest); shard t lives with index t (cp 0).
  std::map<int, caf::actor> shard_of;
  for (auto& [i, s] : shards)
    if (s) shard_of[i % f.tp] = s;
  for (auto& [i, h] : hellos) {
    const auto& host = hellos[i % f.tp];
    self->send(h.worker, bench_wire{shard_of[i % f.tp], host.host, host.port});
  }
  wait_for([&] { return ready == n; });
  if (failed) return status::error("workers did not wire up");
  for (auto& [i, h] : hellos) self->send(h.worker, bench_go{});
  wait_for([&] { return static_cast<int>(results.size()) == n; });
  for (auto& w : workers) w.stop(2s);
  if (failed) return status::error("rounds did not complete");
  run_figures out;
  std::vector<double> lat, cost;
  for (const auto& r : results) {
    if (r.index == 0)
      lat.assign(r.latency_us.begin() + static_cast<long>(r.latency_us.size() / 10), r.latency_us.end());
    cost.insert(cost.end(), r.cost_us.begin() + static_cast<long>(r.cost_us.size() / 10), r.cost_us.end());
  }
  out.p50 = percentile(lat, 0.5);
  out.p99 = percentile(lat, 0.99);
  out.cost_p50 = percentile(cost, 0.5);
  out.cost_p99 = percentile(cost, 0.99);
  return out;
}

}  // namespace

int run_bench_control_worker(const control_worker_flags& w) {
  caf::actor_system_config cfg;
  config::tunables t;
  configure_node(cfg, t);
  add_bench_types(cfg);
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  auto coord = connect_with_retry(sys, parse_host_port(w.coordinator, "coordinator"), 30s);
  if (!coord) return 1;
  auto coordinator = coord.value();
  auto me = caf::actor_cast<caf::actor>(self);
  auto port = publish_on(sys, me, {"127.0.0.1", 0});
  if (!port) return 1;
  const int tp_rank = w.index % w.tp, cp_rank = w.index / w.tp;
  caf::actor root, shard;
  if (w.index == 0) {
    supervisor_args ra;
    ra.children = w.tp;
    ra.root = true;
    ra.ranks = w.tp * w.cp;
    root = spawn_supervisor(sys, ra, {});
  }
  self->send(coordinator, bench_hello{w.index, "127.0.0.1", port.value(), me, root});
  caf::actor rank;
  bool done = false;
  while (!done)
    self->receive(
        [&](bench_setup& s) {
          root = s.root;
          if (w.index != 0) (void)sys.middleman().remote_actor(s.root_host, s.root_port);  // direct route
          if (cp_rank == 0) {
            supervisor_args sa;
            sa.children = w.cp;
            sa.index_in_parent = tp_rank;
            shard = spawn_supervisor(sys, sa, root);
            self->send(root, msg::attach_child{tp_rank, shard});
          }
          self->send(coordinator, bench_shard{w.index, shard});
        },
        [&](bench_wire& x) {
          if (cp_rank != 0) (void)sys.middleman().remote_actor(x.parent_host, x.parent_port);
          rank = sys.spawn(bench_rank, x.parent, coordinator, w.index, cp_rank, w.rooms, w.rounds);
          self->send(x.parent, msg::attach_child{cp_rank, rank});
          self->send(root, msg::attach_rank{rank});
          self->send(coordinator, bench_ready{w.index});
        },
        [&](bench_go g) { self->send(rank, g); },
        caf::after(120s) >> [&] { done = true; });
  return 0;
}

int run_bench_control_processes(const bench_flags& f) {
  auto rooms = f.rooms.empty() ? std::vector<int>{1, 64} : f.rooms;
  const int rounds = f.rounds;
  std::printf("bench control --processes: prefill group TP%d x CP%d, one process per rank (%d), supervisors in the "
              "leading ranks' processes, loopback TCP (CAF middleman), %u hardware threads, %d rounds each\n",
              f.tp, f.cp, f.tp * f.cp, std::thread::hardware_concurrency(), rounds);
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
  std::printf("us per step. kvflow: rank 0 from sending its step report to receiving the agreed round (every "
              "rank's report merged by MIN in between); sched_cost: what one rank's scheduler spends per step "
              "(build + send the report, read the agreed round), every rank; gloo: all_reduce MIN over the TP "
              "group then the CP group, as SGLang's poll does it, same machine, same run\n");
  return 0;
}

}  // namespace kvflow::runtime
