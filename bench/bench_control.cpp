// `kvflow bench control`: the per-step poll agreement of one prefill attention group (TP x CP
// ranks, a shard supervisor per TP rank, a TP supervisor) in one process, hand-back included.
// Anchor, same run: the naive design of performance.md -- one message per rank per step up the
// same tree and one back to each rank -- with empty messages and no merging at all.
#include <caf/all.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>

#include "actors/messages.hpp"
#include "kvflow/kvflow.hpp"
#include "runtime/actor_system_setup.hpp"
#include "bench/bench.hpp"
#include "command/percentile.hpp"

namespace kvflow::bench {

using command::percentile;
using runtime::configure_actor_system;
namespace {

using clock_type = std::chrono::steady_clock;

struct bench_shared {
  int rounds = 0;
  std::vector<clock_type::time_point> seen;  // rank 0's receipt of each round
  std::atomic<bool> done{false};
};

struct figures {
  double p50_us = 0, p99_us = 0, rounds_per_s = 0;
};

figures summarize(const bench_shared& sh) {
  std::vector<double> d;
  // Skip the first 10% (warm-up: allocation of mailboxes and maps).
  for (int r = std::max(1, sh.rounds / 10); r < sh.rounds; ++r)
    d.push_back(std::chrono::duration<double, std::micro>(sh.seen[r] - sh.seen[r - 1]).count());
  figures f;
  f.p50_us = percentile(d, 0.5);
  f.p99_us = percentile(d, 0.99);
  double total = std::chrono::duration<double>(sh.seen.back() - sh.seen[std::max(1, sh.rounds / 10) - 1]).count();
  f.rounds_per_s = (sh.rounds - std::max(1, sh.rounds / 10)) / total;
  return f;
}

// kvflow through its public API, as engines drive it: a node holding the group's TP x CP prefill
// ranks (memory of one small layer each), `rooms` requests created on every rank, and the calling
// thread playing every rank's scheduler. Each step every rank polls (posts its states, reads the
// agreed round of the step before: complete, so wait-free) and rank 0 then polls one step ahead,
// waiting for the round the others just completed: that wait is the agreement's latency.
struct api_figures {
  double agree_p50_us = 0, agree_p99_us = 0;
  double poll_p50_us = 0, poll_p99_us = 0;
  double steps_per_s = 0;
  std::uint64_t stalls = 0;
};

result<api_figures> run_kvflow(int tp, int cp, int rooms, int rounds, int workers) {
  topology t;
  t.prefill = {tp, cp, 1, 1};
  t.decode = {1, 1, 1};
  t.model = "mla:1:64";
  t.dtype = "bf16";
  t.page_size = 16;
  node_options o;
  o.worker_threads = workers;
  auto started = node::start(t, o);
  if (!started) return status::error(started.err().message());
  auto n = started.value();
  const std::uint64_t page = 16 * 64;
  std::vector<std::vector<std::byte>> memory;
  std::vector<std::shared_ptr<prefill_rank>> ranks;
  for (int c = 0; c < cp; ++c)
    for (int x = 0; x < tp; ++x) {
      memory.emplace_back(4 * page);
      memory_desc m;
      m.layer_begin = 0;
      m.layer_end = 1;
      m.buffers.push_back({memory.back().data(), 2 * page, page, buffer_role::mla_latent, 0});
      m.buffers.push_back({memory.back().data() + 2 * page, 2 * page, 64, buffer_role::aux, -1});
      auto r = n->add_prefill({x, c, 0, 0}, m);
      if (!r) return status::error(r.err().message());
      ranks.push_back(r.value());
    }
  for (auto& r : ranks)
    for (int i = 0; i < rooms; ++i) r->create({std::uint64_t(i + 1), 1}, 0);
  std::vector<double> agree, cost;
  const auto wait = std::chrono::seconds(10);
  auto first = ranks[0]->poll(1, wait);
  if (!first) return status::error(first.err().message());
  auto begin = clock_type::now();
  for (int k = 1; k <= rounds; ++k) {
    const auto step = std::uint64_t(k);
    for (std::size_t i = 1; i < ranks.size(); ++i) {
      auto t0 = clock_type::now();
      auto v = ranks[i]->poll(step, std::chrono::microseconds(0));
      auto t1 = clock_type::now();
      if (!v && v.err().code() != errc::not_ready) return status::error(v.err().message());
      if (v && k > rounds / 10) cost.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      if (!v && !ranks[i]->poll(step, wait)) return status::error("round " + std::to_string(k - 1) + " never came");
    }
    auto t0 = clock_type::now();
    auto v = ranks[0]->poll(step + 1, wait);
    auto t1 = clock_type::now();
    if (!v) return status::error(v.err().message());
    if (k > rounds / 10) agree.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  auto secs = std::chrono::duration<double>(clock_type::now() - begin).count();
  api_figures f;
  for (auto& r : ranks) f.stalls += r->stats().stalls;
  n->stop();
  f.agree_p50_us = percentile(agree, 0.5);
  f.agree_p99_us = percentile(agree, 0.99);
  f.poll_p50_us = percentile(cost, 0.5);
  f.poll_p99_us = percentile(cost, 0.99);
  f.steps_per_s = rounds / secs;
  return f;
}

// Anchor: the same tree shape with empty messages and no merging.
struct empty_report {
  std::uint64_t round;
};
template <class I>
typename I::result_type inspect(I& f, empty_report& x) {
  return f(caf::meta::type_name("empty_report"), x.round);
}

figures run_anchor(caf::actor_system& sys, int tp, int cp, int rounds) {
  auto sh = std::make_shared<bench_shared>();
  sh->rounds = rounds;
  sh->seen.resize(rounds);
  auto ranks = std::make_shared<std::vector<caf::actor>>();
  auto root = sys.spawn([=](caf::event_based_actor* self) -> caf::behavior {
    auto count = std::make_shared<int>(0);
    return {[=](empty_report r) {
      if (++*count < tp) return;
      *count = 0;
      auto m = caf::make_message(msg::agreed_round{r.round, 0, {}});
      for (auto& a : *ranks) self->send(a, m);
    }};
  });
  std::vector<caf::actor> shards;
  for (int t = 0; t < tp; ++t)
    shards.push_back(sys.spawn([=](caf::event_based_actor* self) -> caf::behavior {
      auto count = std::make_shared<int>(0);
      return {[=](empty_report r) {
        if (++*count < cp) return;
        *count = 0;
        self->send(root, r);
      }};
    }));
  for (int t = 0; t < tp; ++t)
    for (int c = 0; c < cp; ++c) {
      bool first = t == 0 && c == 0;
      auto shard = shards[t];
      ranks->push_back(sys.spawn([=](caf::event_based_actor* self) -> caf::behavior {
        return {
            [=](msg::start_atom) { self->send(shard, empty_report{1}); },
            [=](const msg::agreed_round& a) {
              if (first) {
                sh->seen[a.round - 1] = clock_type::now();
                if (static_cast<int>(a.round) == sh->rounds) sh->done = true;
              }
              if (static_cast<int>(a.round) < sh->rounds) self->send(shard, empty_report{a.round + 1});
            },
        };
      }));
    }
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  for (auto& r : *ranks) caf::anon_send(r, msg::start_atom::value);
  while (!sh->done.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  auto out = summarize(*sh);
  for (auto& a : *ranks) caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
  for (auto& a : shards) caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(root, caf::exit_reason::user_shutdown);
  ranks->clear();
  return out;
}

}  // namespace

int run_bench_control(const bench_flags& f) {
  caf::actor_system_config cfg;
  configure_actor_system(cfg);
  cfg.add_message_type<empty_report>("kvflow.bench.empty_report");
  if (f.workers > 0) cfg.set("scheduler.max-threads", f.workers);
  caf::actor_system sys{cfg};  // the anchor's; kvflow runs in a node of its own
  auto rooms = f.rooms.empty() ? std::vector<int>{1, 64, 1024} : f.rooms;
  std::printf("bench control: prefill group TP%d x CP%d (%d ranks, %d shard supervisors, 1 TP "
              "supervisor), one process, %u hardware threads, %zu actor worker threads, %d rounds each\n",
              f.tp, f.cp, f.tp * f.cp, f.tp, std::thread::hardware_concurrency(),
              sys.scheduler().num_workers(), f.rounds);
  auto anchor = run_anchor(sys, f.tp, f.cp, f.rounds);
  std::printf("anchor: one message per rank per step + one back per rank, empty, no merge: "
              "p50 %.1f us  p99 %.1f us per step\n",
              anchor.p50_us, anchor.p99_us);
  std::printf("%7s %10s %10s %11s %11s %10s %12s %8s\n", "rooms", "agree_p50", "agree_p99", "poll_p50_us",
              "poll_p99_us", "steps/s", "agree/anchor", "stalls");
  for (int n : rooms) {
    int rounds = n >= 1024 ? std::max(50, f.rounds / 10) : f.rounds;
    auto k = run_kvflow(f.tp, f.cp, n, rounds, f.workers);
    if (!k) {
      std::fprintf(stderr, "kvflow: bench control: %s\n", k.error().reason().c_str());
      return 1;
    }
    const auto& x = k.value();
    std::printf("%7d %10.1f %10.1f %11.2f %11.2f %10.0f %12.2f %8llu\n", n, x.agree_p50_us, x.agree_p99_us,
                x.poll_p50_us, x.poll_p99_us, x.steps_per_s, x.agree_p50_us / anchor.p50_us,
                static_cast<unsigned long long>(x.stalls));
  }
  std::printf("through the public API (kvflow/kvflow.hpp), this thread playing every rank's scheduler. agree: rank 0 "
              "waits for the round the other %d ranks just completed (us); poll: one scheduler's poll of a complete "
              "round, its step's post included (us, every rank); stalls: polls that had to wait\n",
              f.tp * f.cp - 1);
  std::printf("reference, not measured here: SGLang gloo all_reduce MIN on this 2-core kind, TP8: "
              "2304 us p50 (1 room), 16578 us p50 (64 rooms) (performance.md)\n");
  return 0;
}

}  // namespace kvflow::bench
