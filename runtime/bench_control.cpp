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

#include "actors/agreed_ring.hpp"
#include "actors/messages.hpp"
#include "actors/step_board.hpp"
#include "actors/supervisor.hpp"
#include "runtime/actor_system_setup.hpp"
#include "runtime/bench.hpp"
#include "runtime/percentile.hpp"

namespace kvflow::runtime {
namespace {

using clock_type = std::chrono::steady_clock;

struct bench_shared {
  int rounds = 0;
  std::vector<clock_type::time_point> seen;  // rank 0's receipt of each round
  std::atomic<bool> done{false};
};

struct figures {
  double p50_us = 0, p99_us = 0, rounds_per_s = 0;
  double post_p50_us = 0;   // the scheduler threads' share: posting every rank's states
  double agree_p50_us = 0, agree_p99_us = 0;  // from the last post to publication
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

// The rooms a rank reports at a step (states vary with the round and the rank).
step_states rank_states(int rooms, std::uint64_t round, int rank) {
  step_states s(rooms);
  for (int i = 0; i < rooms; ++i)
    s[i] = {std::uint64_t(i + 1), 1, static_cast<std::uint8_t>(1 + (round + rank + i) % 3)};
  return s;
}

// kvflow: the real step boards, shard and TP supervisors and agreed ring. The calling thread
// plays the ranks' scheduler threads: each step it posts every rank's states (what poll() does
// on each rank) and waits until the agreed round is published to every rank.
figures run_kvflow(caf::actor_system& sys, int tp, int cp, int rooms, int rounds, double& poll_ns) {
  auto agreed = std::make_shared<agreed_ring>(std::size_t(rounds) + 1);
  supervisor_args ra;
  ra.children = tp;
  ra.root = true;
  ra.publish = agreed;
  auto root = spawn_supervisor(sys, ra, {});
  std::vector<caf::actor> all{root}, shards;
  std::vector<std::shared_ptr<step_board>> boards;
  for (int t = 0; t < tp; ++t) {
    supervisor_args sa;
    sa.children = cp;
    sa.index_in_parent = t;
    sa.board = std::make_shared<step_board>(cp);
    auto shard = spawn_supervisor(sys, sa, root);
    caf::anon_send(root, msg::attach_child{t, shard});
    boards.push_back(sa.board);
    shards.push_back(shard);
    all.push_back(shard);
  }
  std::vector<double> lat, post, agree;
  for (int r = 1; r <= rounds; ++r) {
    auto t0 = clock_type::now();
    for (int t = 0; t < tp; ++t)
      for (int c = 0; c < cp; ++c)
        if (boards[t]->post(c, r, rank_states(rooms, r, t * cp + c)))
          caf::anon_send(shards[t], msg::board_round{std::uint64_t(r)});
    auto t1 = clock_type::now();
    if (agreed->wait_for(std::uint64_t(r), std::chrono::seconds(10)) == nullptr) break;
    auto t2 = clock_type::now();
    if (r > rounds / 10) {
      lat.push_back(std::chrono::duration<double, std::micro>(t2 - t0).count());
      post.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      agree.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
    }
  }
  // One read of a complete round as a scheduler thread's poll makes it.
  const int polls = 1000000;
  std::uint64_t sink = 0;
  auto p0 = clock_type::now();
  for (int i = 0; i < polls; ++i) {
    const auto* v = agreed->get(std::uint64_t(rounds - i % 8));
    sink += v != nullptr ? v->round : 0;
  }
  poll_ns = std::chrono::duration<double, std::nano>(clock_type::now() - p0).count() / polls;
  if (sink == 0) poll_ns = -1;
  for (auto& a : all) caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
  figures f;
  if (lat.empty()) return f;
  f.p50_us = percentile(lat, 0.5);
  f.p99_us = percentile(lat, 0.99);
  f.post_p50_us = percentile(post, 0.5);
  f.agree_p50_us = percentile(agree, 0.5);
  f.agree_p99_us = percentile(agree, 0.99);
  double sum = 0;
  for (double x : lat) sum += x;
  f.rounds_per_s = 1e6 * double(lat.size()) / sum;
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
  caf::actor_system sys{cfg};
  auto rooms = f.rooms.empty() ? std::vector<int>{1, 64, 1024} : f.rooms;
  std::printf("bench control: prefill group TP%d x CP%d (%d ranks, %d shard supervisors, 1 TP "
              "supervisor), one process, %u hardware threads, %zu actor worker threads, %d rounds each\n",
              f.tp, f.cp, f.tp * f.cp, f.tp, std::thread::hardware_concurrency(),
              sys.scheduler().num_workers(), f.rounds);
  auto anchor = run_anchor(sys, f.tp, f.cp, f.rounds);
  std::printf("anchor: one message per rank per step + one back per rank, empty, no merge: "
              "p50 %.1f us  p99 %.1f us per step\n",
              anchor.p50_us, anchor.p99_us);
  std::printf("%7s %10s %10s %10s %10s %10s %12s %14s %11s %8s\n", "rooms", "agree_p50", "agree_p99",
              "step_p50", "step_p99", "post_us", "steps/s", "merges/s", "agree/anchor", "poll_ns");
  for (int n : rooms) {
    int rounds = n >= 1024 ? std::max(50, f.rounds / 10) : f.rounds;
    double poll_ns = 0;
    auto k = run_kvflow(sys, f.tp, f.cp, n, rounds, poll_ns);
    double merges = k.rounds_per_s * double(n) * f.tp * f.cp;
    std::printf("%7d %10.1f %10.1f %10.1f %10.1f %10.1f %12.0f %14.0f %11.2f %8.1f\n", n,
                k.agree_p50_us, k.agree_p99_us, k.p50_us, k.p99_us, k.post_p50_us, k.rounds_per_s,
                merges, k.agree_p50_us / anchor.p50_us, poll_ns);
  }
  std::printf("us per step. agree: from the last rank's post of a step until the agreed step is "
              "published to every rank; step: from the first post (this one thread posts for all "
              "%d ranks in turn); post_us: those %d posts; poll_ns: one scheduler-thread poll\n",
              f.tp * f.cp, f.tp * f.cp);
  std::printf("reference, not measured here: SGLang gloo all_reduce MIN on this 2-core kind, TP8: "
              "2304 us p50 (1 room), 16578 us p50 (64 rooms) (performance.md)\n");
  return 0;
}

}  // namespace kvflow::runtime
