// The simulated cluster: spawns the registry, the agreement trees and every rank, drives the
// synthetic workload as the router and schedulers would, and checks what came out.
#include "command/simulation.hpp"

#include <malloc.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <mutex>
#include <set>
#include <tuple>

#include <caf/scheduler/test_coordinator.hpp>

#include "command/agreement_checker.hpp"
#include "command/driver.hpp"
#include "command/engine_messages.hpp"
#include "command/outcome_reason.hpp"
#include "command/percentile.hpp"
#include "command/sim_engine.hpp"
#include "runtime/engine_host.hpp"
#include "command/sim_delayed_transport.hpp"
#include "transport/inproc_transport.hpp"
#include "transport/ucx_transport.hpp"

namespace kvflow::command {
namespace {

// The actor clock: real time, or the interleaved run's simulated time (latencies stay meaningful there).
using clock_type = caf::actor_clock;

struct deadline_reached {};
struct fire_abort {
  int index = 0;
};
template <class I>
typename I::result_type inspect(I& f, deadline_reached&) {
  return f(caf::meta::type_name("deadline_reached"));
}
template <class I>
typename I::result_type inspect(I& f, fire_abort& x) {
  return f(caf::meta::type_name("fire_abort"), x.index);
}

struct sim_request {
  int index = 0;
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  int tokens = 0;
  int prefill_dp = 0, decode_dp = 0;
  std::uint8_t fault = 0;
  std::vector<fault_spec> soak_faults;  // request faults a soak drew for this request
  bool started = false, finished = false;
  clock_type::time_point start, end;
  std::vector<int> prefill_ranks, decode_ranks;  // participants
  std::set<std::pair<bool, int>> released;       // (prefill?, rank)
  bool any_failed = false;
  int decode_success = 0;
  std::string reason;
  // (prefill?, group) -> (round, state) of the first rank that acted: the others must match
  std::map<std::pair<bool, int>, std::pair<std::uint64_t, std::uint8_t>> group_action;
};

struct driver_state {
  simulation_options opt;
  std::shared_ptr<const config::routing_plan> plan;
  std::shared_ptr<cluster_control> control;
  std::shared_ptr<simulation_report> report;
  std::shared_ptr<agreement_checker> checker;
  cluster_handles h;
  // The requests not finished yet (by index): a finished one is folded into the report's counts,
  // latencies and outcomes, then forgotten, so that a soak holds no record per request it ran.
  std::map<int, sim_request> requests;
  int created = 0;  // requests made so far (the next index)
  latency_summary latencies;
  std::map<std::pair<std::uint64_t, std::uint64_t>, int> by_key;  // (room, incarnation) -> index
  std::multiset<std::uint64_t> live_rooms;
  std::set<std::pair<bool, int>> dead;
  std::set<std::pair<bool, int>> killed;  // by a fault: their death is expected
  int next = 0, running = 0, started = 0, finished = 0;
  std::mt19937_64 rng;
  std::multiset<std::uint64_t> used_rooms;  // rooms of the requests not finished (without a room pool)
  clock_type::time_point first_start, last_end;
  bool warm_sampled = false;
  bool finalizing = false;
  caf::response_promise done;
};
using driver_actor = caf::stateful_actor<driver_state>;

int pages_of(const config::cluster_config& c, int tokens) {
  return (tokens + c.page_size - 1) / c.page_size;
}

// The cluster in this process: one node of the public API holding every rank, and a simulated
// engine per rank driving it (the router is the driver).
class inproc_cluster final : public cluster_control {
 public:
  inproc_cluster(simulation_options opt, std::shared_ptr<agreement_checker> checker, std::shared_ptr<node> n,
                 std::shared_ptr<transport::transport> t, std::shared_ptr<dst_drops> drops)
      : opt_(std::move(opt)), checker_(std::move(checker)), node_(std::move(n)), transport_(std::move(t)),
        drops_(std::move(drops)) {}

  cluster_handles start(caf::event_based_actor* self) override {
    const auto& c = opt_.cluster;
    auto plan = std::make_shared<const config::routing_plan>(c);
    // Each rank's pool holds the pages of the requests in flight at once.
    const int in_flight = std::min(opt_.concurrency, opt_.requests);
    const int pages = in_flight * pages_of(c, opt_.prompt_max);
    cluster_handles h;
    h.prefill.resize(c.prefill.ranks());
    h.decode.resize(c.decode.ranks());
    auto engine = [&](bool prefill, int r) -> caf::actor {
      sim_engine_args a;
      a.plan = plan;
      a.prefill = prefill;
      a.rank = r;
      a.memory = std::make_shared<sim_memory>(*plan, prefill, r, pages, in_flight + 1, transport_);
      (prefill ? memory_.first : memory_.second).push_back(a.memory);
      if (opt_.soak_s > 0) a.memory->prefault();
      a.chunk_tokens = opt_.chunk_tokens;
      a.step_interval_us = opt_.tunables.step_interval_us;
      a.observer = caf::actor_cast<caf::actor>(self);
      a.checker = checker_;
      a.drops = drops_;
      auto added = runtime::add_rank(*node_, prefill, runtime::coords_of(c, prefill, r), a.memory->desc(), a.memory);
      if (!added)
        return spdlog::error("simulate: {} rank {}: {}", prefill ? "prefill" : "decode", r, added.err().message()),
               caf::actor{};
      a.rank_api = added.value();
      checker_->add_rank(added.value().group);
      return spawn_sim_engine(self->system(), std::move(a));
    };
    for (int r = 0; r < c.prefill.ranks(); ++r)
      if (!(h.prefill[r] = engine(true, r))) return {};
    for (int r = 0; r < c.decode.ranks(); ++r)
      if (!(h.decode[r] = engine(false, r))) return {};
    h_ = h;
    return h;
  }
  status kill(caf::event_based_actor* self, bool prefill, int rank) override {
    // The engine and its rank die together (linked), as one process would; so do the pushes
    // it still had in flight.
    self->send_exit(prefill ? h_.prefill.at(rank) : h_.decode.at(rank), caf::exit_reason::kill);
    if (auto* d = dynamic_cast<delayed_transport*>(transport_.get())) {
      const auto mem = (prefill ? memory_.first : memory_.second).at(static_cast<std::size_t>(rank));
      d->drop_from([&](const std::byte* p) { return mem->holds(p); });
    }
    return {};
  }
  status freeze(bool, int) override { return status::error("freeze needs rank processes"); }
  status restart_bootstrap() override { return status::error("restart needs a bootstrap process"); }
  status stop_bootstrap(bool) override { return status::error("needs a bootstrap process"); }
  std::uint64_t transfer_bytes(const std::vector<msg::pool_usage>&) const override {
    return transport_->bytes_moved();
  }
  double copy_seconds() const override {
    auto* inproc = dynamic_cast<const transport::inproc_transport*>(transport_.get());
    return inproc != nullptr ? inproc->copy_seconds() : 0;
  }
  void stop(caf::event_based_actor* self) override {
    for (auto* list : {&h_.prefill, &h_.decode})
      for (auto& a : *list)
        if (a) self->send_exit(a, caf::exit_reason::user_shutdown);
  }

 private:
  simulation_options opt_;
  std::shared_ptr<agreement_checker> checker_;
  std::shared_ptr<node> node_;
  std::shared_ptr<transport::transport> transport_;
  std::shared_ptr<dst_drops> drops_;
  cluster_handles h_;
  std::pair<std::vector<std::shared_ptr<sim_memory>>, std::vector<std::shared_ptr<sim_memory>>> memory_;  // prefill, decode
};

// This process's resident memory now (bytes).
std::uint64_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::uint64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
}

// Bytes this process's allocator has handed out and not had back: what a leak grows. Resident
// memory also moves with what the kernel does to pages no leak touched (transparent huge pages
// collapse a sparse arena into 2 MiB pages; freed pages stay resident in the allocator's cache).
std::uint64_t heap_in_use_bytes() {
  const auto m = ::mallinfo2();
  return static_cast<std::uint64_t>(m.uordblks) + static_cast<std::uint64_t>(m.hblkhd);
}

// Appends `n` requests to the workload: rooms random 64-bit ids (or drawn from a small pool to
// exercise reuse), prompt lengths uniform in the options' range.
void add_requests(driver_state& st, int n) {
  std::uniform_int_distribution<int> tokens(st.opt.prompt_min, st.opt.prompt_max);
  for (int k = 0; k < n; ++k) {
    sim_request r;
    const int i = st.created++;
    r.index = i;
    r.incarnation = static_cast<std::uint64_t>(i) + 1;
    if (st.opt.room_pool > 0) {
      r.room = 1 + st.rng() % static_cast<std::uint64_t>(st.opt.room_pool);
    } else {
      do r.room = st.rng() >> 1; while (r.room == 0 || st.used_rooms.count(r.room) != 0);
      st.used_rooms.insert(r.room);
    }
    r.tokens = tokens(st.rng);
    r.prefill_dp = static_cast<int>(r.room % st.opt.cluster.prefill.dp);
    r.decode_dp = i % st.opt.cluster.decode.dp;
    st.requests.emplace(i, std::move(r));
  }
}

// A soak's next batch, each request drawing a request fault with probability 1/soak_fault_every.
void add_soak_batch(driver_state& st) {
  const int first = st.created;
  add_requests(st, st.opt.requests);
  // Faults of the runtime's inputs; corrupt@N is left out (it tests the simulator's own
  // verification, and fails the run by design).
  static const char* kinds[] = {"abort:decode", "abort-in-transfer:decode", "drop-dst-info", "dup-room"};
  for (int i = first; i < st.created; ++i) {
    if (st.rng() % static_cast<std::uint64_t>(st.opt.soak_fault_every) != 0) continue;
    auto f = parse_fault(std::string(kinds[st.rng() % std::size(kinds)]) + "@" + std::to_string(i + 1));
    st.requests.at(i).soak_faults.push_back(f);
  }
}

bool touched(const simulation_options& o, const sim_request& r) {
  if (!r.soak_faults.empty()) return true;
  for (const auto& f : o.faults) {
    switch (f.what) {
      case fault_spec::kind::kill_prefill:
      case fault_spec::kind::freeze_prefill:
        if (std::find(r.prefill_ranks.begin(), r.prefill_ranks.end(), f.rank) != r.prefill_ranks.end()) return true;
        break;
      case fault_spec::kind::kill_decode:
      case fault_spec::kind::freeze_decode:
        if (std::find(r.decode_ranks.begin(), r.decode_ranks.end(), f.rank) != r.decode_ranks.end()) return true;
        break;
      case fault_spec::kind::restart_bootstrap:
      case fault_spec::kind::kill_bootstrap:
      case fault_spec::kind::freeze_bootstrap:
        break;  // ranks that registered do not need the registry for requests: none may fail for it
      default:
        if (f.at == r.index + 1) return true;
    }
  }
  return false;
}

void start_more(driver_actor* self);

// What a soak's report keeps of what it counts per request: the first fault texts, and the
// outcomes other than Success (the first ones). Runs without --soak keep every one.
constexpr std::size_t soak_texts_kept = 256;

void note_fault(driver_state& st, std::string text) {
  auto& rep = *st.report;
  ++rep.faults_applied_total;
  if (st.opt.soak_s <= 0 || rep.faults_applied.size() < soak_texts_kept) rep.faults_applied.push_back(std::move(text));
}

void keep_outcome(driver_state& st, request_outcome o) {
  auto& rep = *st.report;
  if (st.opt.soak_s <= 0 || (o.state != "Success" && rep.outcomes.size() < soak_texts_kept))
    rep.outcomes.push_back(std::move(o));
  else
    ++rep.outcomes_omitted;
}

request_outcome outcome_of(const driver_state& st, const sim_request& r) {
  request_outcome o;
  o.room = r.room;
  o.index = r.index;
  o.prefill_dp = r.prefill_dp;
  o.decode_dp = r.decode_dp;
  o.touched = touched(st.opt, r);
  return o;
}

// A finished request's outcome goes into the report's counts now; its record is dropped.
void record_finished(driver_state& st, const sim_request& r) {
  auto& rep = *st.report;
  request_outcome o = outcome_of(st, r);
  if (!r.any_failed && r.decode_success > 0) {
    o.state = "Success";
    ++rep.succeeded;
  } else {
    o.state = "Failed";
    o.reason = r.reason.empty() ? "every decode rank of the request died" : r.reason;
    ++rep.failed;
    if (!o.touched) ++rep.unexpected_failures;
  }
  o.latency_ms = std::chrono::duration<double, std::milli>(r.end - r.start).count();
  st.latencies.add(o.latency_ms);
  keep_outcome(st, std::move(o));
}

void check_finished(driver_actor* self, sim_request& r) {
  auto& st = self->state;
  if (!r.started || r.finished) return;
  for (int p : r.prefill_ranks)
    if (!r.released.count({true, p}) && !st.dead.count({true, p})) return;
  for (int d : r.decode_ranks)
    if (!r.released.count({false, d}) && !st.dead.count({false, d})) return;
  r.finished = true;
  r.end = self->clock().now();
  st.last_end = r.end;
  ++st.finished;
  --st.running;
  st.live_rooms.erase(st.live_rooms.find(r.room));
  st.by_key.erase({r.room, r.incarnation});
  if (st.opt.room_pool <= 0) st.used_rooms.erase(st.used_rooms.find(r.room));
  record_finished(st, r);
  const int index = r.index;
  st.requests.erase(index);  // r is gone from here on
  start_more(self);
}

void start_request(driver_actor* self, sim_request& r) {
  auto& st = self->state;
  const auto& c = st.opt.cluster;
  ++st.started;
  // The faults of this request: the run's, and those a soak drew for it.
  std::vector<fault_spec> faults = r.soak_faults;
  for (const auto& f : st.opt.faults)
    if (f.at == st.started) faults.push_back(f);
  // dup-room: the router hands out the room of a live request (n>1 sampling, client reuse).
  for (const auto& f : faults)
    if (f.what == fault_spec::kind::duplicate_room && f.at == st.started && !st.live_rooms.empty()) {
      if (st.opt.room_pool <= 0) {
        st.used_rooms.erase(st.used_rooms.find(r.room));
        st.used_rooms.insert(*st.live_rooms.rbegin());
      }
      r.room = *st.live_rooms.rbegin();
      r.prefill_dp = static_cast<int>(r.room % c.prefill.dp);
      note_fault(st, f.text + " (room " + std::to_string(r.room) + ")");
    }
  r.started = true;
  r.start = self->clock().now();
  if (st.started == 1) st.first_start = r.start;
  for (const auto& f : faults) {
    if (f.what == fault_spec::kind::drop_dst_info) r.fault |= fault_drop_dst_info;
    if (f.what == fault_spec::kind::corrupt) r.fault |= fault_corrupt;
    if (f.what == fault_spec::kind::abort_decode_in_transfer) r.fault |= fault_abort_in_transfer;
  }
  for (int p = 0; p < c.prefill.ranks(); ++p)
    if (config::prefill_coord_of(c.prefill, p).dp == r.prefill_dp) r.prefill_ranks.push_back(p);
  for (int d = 0; d < c.decode.ranks(); ++d)
    if (config::decode_coord_of(c.decode, d).dp == r.decode_dp) r.decode_ranks.push_back(d);
  ++st.running;
  st.live_rooms.insert(r.room);
  st.by_key[{r.room, r.incarnation}] = r.index;

  msg::new_request q{r.room, r.incarnation, r.tokens, r.prefill_dp, r.decode_dp, 0, r.fault};
  // drop-dst-info loses one message: the first decode rank's first destination message; the
  // first decode rank is also the one that aborts in transfer.
  for (int d : r.decode_ranks) {
    self->send(st.h.decode[d], q);
    q.fault &= static_cast<std::uint8_t>(~(fault_drop_dst_info | fault_abort_in_transfer));
  }
  for (int p : r.prefill_ranks) self->send(st.h.prefill[p], q);
  for (const auto& f : faults) {
    if (f.what == fault_spec::kind::abort_decode) {
      self->delayed_send(self, std::chrono::milliseconds(1), fire_abort{r.index});
      note_fault(st, f.text + " (room " + std::to_string(r.room) + ")");
    } else if (f.what == fault_spec::kind::kill_prefill || f.what == fault_spec::kind::kill_decode ||
               f.what == fault_spec::kind::freeze_prefill || f.what == fault_spec::kind::freeze_decode) {
      bool pre = f.what == fault_spec::kind::kill_prefill || f.what == fault_spec::kind::freeze_prefill;
      bool kill = f.what == fault_spec::kind::kill_prefill || f.what == fault_spec::kind::kill_decode;
      st.killed.insert({pre, f.rank});
      auto done = kill ? st.control->kill(self, pre, f.rank) : st.control->freeze(pre, f.rank);
      if (done)
        note_fault(st, f.text);
      else
        st.report->problems.push_back("fault " + f.text + ": " + done.reason());
    } else if (f.what == fault_spec::kind::restart_bootstrap || f.what == fault_spec::kind::kill_bootstrap ||
               f.what == fault_spec::kind::freeze_bootstrap) {
      auto done = f.what == fault_spec::kind::restart_bootstrap
                      ? st.control->restart_bootstrap()
                      : st.control->stop_bootstrap(f.what == fault_spec::kind::freeze_bootstrap);
      if (done)
        note_fault(st, f.text);
      else
        st.report->problems.push_back("fault " + f.text + ": " + done.reason());
    } else if (f.what == fault_spec::kind::drop_dst_info || f.what == fault_spec::kind::corrupt) {
      note_fault(st, f.text + " (room " + std::to_string(r.room) + ")");
    } else if (f.what == fault_spec::kind::abort_decode_in_transfer) {
      note_fault(st, f.text + " (room " + std::to_string(r.room) + ", once its KV moves)");
    }
  }
}

void finalize(driver_actor* self);

void start_more(driver_actor* self) {
  auto& st = self->state;
  if (st.finalizing) return;
  if (st.opt.soak_s > 0 && st.started > 0) {
    const double on = std::chrono::duration<double>(self->clock().now() - st.first_start).count();
    if (!st.warm_sampled && on >= st.opt.soak_s / 4) {
      st.warm_sampled = true;
      st.report->rss_warm_bytes = resident_bytes();
      st.report->heap_warm_bytes = heap_in_use_bytes();
    }
    if (st.next == st.created && on < st.opt.soak_s) add_soak_batch(st);
  }
  while (st.running < st.opt.concurrency && st.next < st.created) {
    auto& r = st.requests.at(st.next++);
    // With a room pool, a room is reused only once every rank cleared it.
    if (st.opt.room_pool > 0 && st.live_rooms.count(r.room) != 0) {
      --st.next;
      break;
    }
    start_request(self, r);
  }
  if (st.finished == st.created) finalize(self);
}

void on_released(driver_actor* self, const msg::rank_released& ev) {
  auto& st = self->state;
  auto it = st.by_key.find({ev.room, ev.incarnation});
  if (it == st.by_key.end()) return;
  auto& r = st.requests.at(it->second);
  if (!r.released.insert({ev.prefill, ev.rank}).second) return;
  auto state = static_cast<poll_state>(ev.state);
  if (state == poll_state::failed) {
    r.any_failed = true;
    // Keep the most telling reason: a rank's own, not a group echo.
    if (!ev.reason.empty()) {
      std::string why = (ev.prefill ? "prefill rank " : "decode rank ") + std::to_string(ev.rank) + ": " + ev.reason;
      if (replaces_reason(r.reason, why)) r.reason = std::move(why);
    }
  } else if (!ev.prefill) {
    ++r.decode_success;
  }
  auto& rep = *st.report;
  rep.bytes_expected += ev.bytes_expected;
  rep.bytes_verified += ev.bytes_verified;
  rep.mismatched_pages += ev.mismatched_pages;
  // Agreement: every rank of one group acts on a room at the same round with the same state.
  if (ev.round > 0) {
    const auto& c = st.opt.cluster;
    int group = ev.prefill ? config::prefill_coord_of(c.prefill, ev.rank).pp
                           : config::decode_coord_of(c.decode, ev.rank).pp;
    auto [g, fresh] = r.group_action.emplace(std::make_pair(ev.prefill, group), std::make_pair(ev.round, ev.state));
    if (!fresh && g->second != std::make_pair(ev.round, ev.state)) {
      ++rep.agreement_violations;
      rep.problems.push_back("room " + std::to_string(r.room) + ": " + (ev.prefill ? "prefill" : "decode") +
                             " rank " + std::to_string(ev.rank) + " acted at round " + std::to_string(ev.round) +
                             " with " + to_string(state) + ", its group at round " +
                             std::to_string(g->second.first) + " with " +
                             to_string(static_cast<poll_state>(g->second.second)));
    }
  }
  check_finished(self, r);
}

void on_rank_down(driver_actor* self, const caf::down_msg& dm) {
  auto& st = self->state;
  auto died = [&](bool prefill, int i) {
    st.dead.insert({prefill, i});
    if (!st.killed.count({prefill, i}) && !st.finalizing)
      st.report->problems.push_back((prefill ? "prefill rank " : "decode rank ") + std::to_string(i) +
                                    " stopped with no fault: " + self->system().render(dm.reason));
  };
  for (int i = 0; i < static_cast<int>(st.h.prefill.size()); ++i)
    if (st.h.prefill[i].address() == dm.source) died(true, i);
  for (int i = 0; i < static_cast<int>(st.h.decode.size()); ++i)
    if (st.h.decode[i].address() == dm.source) died(false, i);
  // check_finished drops the requests it finishes (and start_more adds some): walk a copy of the keys.
  std::vector<int> live;
  for (const auto& [i, r] : st.requests) live.push_back(i);
  for (int i : live)
    if (auto it = st.requests.find(i); it != st.requests.end()) check_finished(self, it->second);
}

// Which of a stalled request's ranks never reported releasing it (where to look first).
std::string unreleased_by(const sim_request& r) {
  std::string out;
  auto add = [&](bool prefill, const std::vector<int>& ranks) {
    for (int k : ranks)
      if (!r.released.count({prefill, k}))
        out += (out.empty() ? "; not released by " : ", ") + std::string(prefill ? "prefill " : "decode ") + std::to_string(k);
  };
  add(true, r.prefill_ranks);
  add(false, r.decode_ranks);
  return out;
}

void write_report(driver_actor* self, const std::vector<msg::pool_usage>& usage) {
  auto& st = self->state;
  auto& rep = *st.report;
  rep.requests = st.created;
  // What is left did not finish: finished requests were counted as they finished.
  for (const auto& [i, r] : st.requests) {
    request_outcome o = outcome_of(st, r);
    o.state = "Stalled";
    o.reason = r.started ? "not terminal at the deadline" + unreleased_by(r) : "never started before the deadline";
    ++rep.stalled;
    keep_outcome(st, std::move(o));
  }
  std::sort(rep.outcomes.begin(), rep.outcomes.end(),
            [](const request_outcome& a, const request_outcome& b) { return a.index < b.index; });
  rep.latency_p50_ms = st.latencies.quantile(0.5);
  rep.latency_p99_ms = st.latencies.quantile(0.99);
  rep.latency_max_ms = st.latencies.max();
  for (const auto& u : usage) {
    rep.leaked_pages += u.used_pages;
    rep.leaked_aux_slots += u.used_aux;
    rep.leaked_rooms += u.live_rooms;
  }
  if (st.checker) {
    rep.agreement_violations += st.checker->violations();
    rep.agreement_rounds_checked = st.checker->rounds_checked();
    for (auto& p : st.checker->problems()) rep.problems.push_back(p);
  }
  rep.transfer_bytes = st.control->transfer_bytes(usage);
  rep.copy_seconds = st.control->copy_seconds();
  if (st.finished > 0)
    rep.transfer_seconds = std::chrono::duration<double>(st.last_end - st.first_start).count();
  if (st.opt.soak_s > 0) {
    rep.soak_seconds = rep.transfer_seconds;
    rep.requests_per_second = rep.soak_seconds > 0 ? st.finished / rep.soak_seconds : 0;
    rep.rss_end_bytes = resident_bytes();
    rep.heap_end_bytes = heap_in_use_bytes();
  }
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  rep.peak_rss_bytes = std::uint64_t(ru.ru_maxrss) * 1024;
  for (const auto& u : usage) rep.peak_rss_bytes = std::max(rep.peak_rss_bytes, u.peak_rss_bytes);  // rank processes

  auto problem = [&](bool bad, const std::string& what) {
    if (bad) rep.problems.push_back(what);
  };
  problem(rep.stalled > 0, std::to_string(rep.stalled) + " requests stalled");
  problem(rep.unexpected_failures > 0,
          std::to_string(rep.unexpected_failures) + " requests no fault touched failed");
  problem(rep.mismatched_pages > 0, std::to_string(rep.mismatched_pages) + " pages mismatched");
  problem(rep.bytes_verified != rep.bytes_expected,
          std::to_string(rep.bytes_expected - rep.bytes_verified) + " bytes not verified");
  problem(rep.leaked_pages > 0, std::to_string(rep.leaked_pages) + " KV pages leaked");
  problem(rep.leaked_aux_slots > 0, std::to_string(rep.leaked_aux_slots) + " aux slots leaked");
  problem(rep.leaked_rooms > 0, std::to_string(rep.leaked_rooms) + " rooms left in state stores");
}

void shutdown(driver_actor* self) {
  auto& st = self->state;
  st.control->stop(self);
  st.report->complete = true;
  st.done.deliver(true);
  self->quit();
}

struct account_usage {  // ask the ranks again (pushes of released rooms still draining)
  int attempt = 0;
};
template <class I>
typename I::result_type inspect(I& f, account_usage& x) {
  return f(caf::meta::type_name("account_usage"), x.attempt);
}

// Leak accounting: ask every live rank what it still holds (a dead rank's memory went with
// it, and a rank this run killed or froze is not asked either: frozen, it cannot answer, and its
// node may not have been found silent yet when the last request ended). Pages a rank still
// lends to pushes in flight (a room released while its transport was writing) come back when
// the transport completes: ask again, for up to 5 s, before counting anything held as leaked.
void collect_usage(driver_actor* self, int attempt) {
  auto& st = self->state;
  auto usage = std::make_shared<std::vector<msg::pool_usage>>();
  auto pending = std::make_shared<int>(0);
  std::vector<std::pair<caf::actor, std::string>> live;
  auto asked = [&](bool prefill, int i) { return !st.dead.count({prefill, i}) && !st.killed.count({prefill, i}); };
  for (int i = 0; i < static_cast<int>(st.h.prefill.size()); ++i)
    if (asked(true, i)) live.emplace_back(st.h.prefill[i], "prefill rank " + std::to_string(i));
  for (int i = 0; i < static_cast<int>(st.h.decode.size()); ++i)
    if (asked(false, i)) live.emplace_back(st.h.decode[i], "decode rank " + std::to_string(i));
  *pending = static_cast<int>(live.size());
  auto done = [self, usage, attempt] {
    std::int64_t draining = 0;
    for (const auto& u : *usage) draining += u.draining_pages;
    if (draining > 0 && attempt < 100) {
      self->delayed_send(self, std::chrono::milliseconds(50), account_usage{attempt + 1});
      return;
    }
    write_report(self, *usage);
    shutdown(self);
  };
  if (live.empty()) {
    done();
    return;
  }
  for (auto& [a, name] : live)
    self->request(a, std::chrono::seconds(10), msg::pool_usage_query{})
        .then(
            [usage, pending, done](msg::pool_usage& u) {
              usage->push_back(u);
              if (--*pending == 0) done();
            },
            // A live rank that does not answer has pools nobody counted: that is not "no leak".
            [self, who = name, pending, done](caf::error& e) {
              auto& problems = self->state.report->problems;
              auto line = who + " did not answer the pool-usage query: " + self->system().render(e);
              if (std::find(problems.begin(), problems.end(), line) == problems.end()) problems.push_back(line);
              if (--*pending == 0) done();
            });
}

void finalize(driver_actor* self) {
  auto& st = self->state;
  if (st.finalizing) return;
  st.finalizing = true;
  collect_usage(self, 0);
}

caf::behavior driver(driver_actor* self, simulation_options opt, std::shared_ptr<simulation_report> report,
                     std::shared_ptr<cluster_control> control, std::shared_ptr<agreement_checker> checker) {
  auto& st = self->state;
  st.opt = std::move(opt);
  st.report = std::move(report);
  st.report->options = st.opt;
  st.plan = std::make_shared<const config::routing_plan>(st.opt.cluster);
  st.control = std::move(control);
  st.checker = std::move(checker);
  st.rng.seed(st.opt.seed);
  if (st.opt.soak_s > 0)
    add_soak_batch(st);
  else
    add_requests(st, st.opt.requests);
  self->set_down_handler([self](caf::down_msg& dm) { on_rank_down(self, dm); });
  // A soak's deadline counts from the end of its load.
  const double deadline_s = st.opt.deadline_s + st.opt.soak_s;
  self->delayed_send(self, std::chrono::milliseconds(static_cast<std::int64_t>(deadline_s * 1000)), deadline_reached{});
  return {
      [self](msg::start_atom) -> caf::result<bool> {
        auto& st = self->state;
        st.h = st.control->start(self);
        st.done = self->make_response_promise();
        const auto& c = st.opt.cluster;
        if (static_cast<int>(st.h.prefill.size()) != c.prefill.ranks() ||
            static_cast<int>(st.h.decode.size()) != c.decode.ranks()) {
          st.report->problems.push_back("the cluster did not start");
          finalize(self);
          return st.done;
        }
        for (auto& a : st.h.prefill) self->monitor(a);
        for (auto& a : st.h.decode) self->monitor(a);
        start_more(self);
        return st.done;
      },
      [self](const msg::rank_released& ev) { on_released(self, ev); },
      [self](account_usage& a) { collect_usage(self, a.attempt); },
      [self](const msg::round_digests& d) {
        auto& st = self->state;
        if (!st.checker) return;
        for (std::size_t i = 0; i < d.rounds.size() && i < d.digests.size(); ++i)
          st.checker->on_digest(d.group, d.rounds[i], d.digests[i]);
      },
      [self](fire_abort& a) {
        auto& st = self->state;
        auto it = st.requests.find(a.index);
        if (it == st.requests.end() || it->second.finished) return;
        auto& r = it->second;
        for (int d : r.decode_ranks)
          self->send(st.h.decode[d], msg::abort_request{r.room, r.incarnation, "abort:decode fault"});
      },
      [self](deadline_reached) {
        spdlog::warn("simulate: deadline reached with {} of {} requests finished",
                     self->state.finished, self->state.created);
        finalize(self);
      },
  };
}

}  // namespace

void drive(caf::actor_system& sys, const simulation_options& options,
           const std::shared_ptr<simulation_report>& report, std::shared_ptr<cluster_control> control,
           std::shared_ptr<agreement_checker> checker) {
  auto d = sys.spawn(driver, options, report, std::move(control), std::move(checker));
  caf::scoped_actor self{sys};
  // Until its answer, or until it stops without one (the run then fails, saying why).
  self->monitor(d);
  self->send(d, msg::start_atom::value);
  bool answered = false;
  self->receive_while([&] { return !answered; })(
      [&](bool) { answered = true; },
      [&](caf::down_msg& dm) {
        report->problems.push_back("the driver stopped before its report: " + sys.render(dm.reason));
        answered = true;
      });
}

namespace {

// The node every rank of the simulated cluster joins, and the cluster over it.
struct simulated_node {
  std::shared_ptr<node> n;
  std::shared_ptr<cluster_control> control;
};

simulated_node make_inproc_cluster(const simulation_options& o, const std::shared_ptr<simulation_report>& report,
                                   std::shared_ptr<agreement_checker> checker, bool deterministic) {
  std::shared_ptr<transport::transport> t;
  if (o.transport == "ucx") {
    auto made = transport::ucx_transport::create(
        transport::ucx_options_from(o.tunables));
    if (!made) {
      report->problems.push_back("transport ucx: " + made.error().reason());
      return {};
    }
    t = std::move(made.value());
  } else {
    t = std::make_shared<transport::inproc_transport>(std::make_shared<transport::inproc_fabric>());
  }
  if (o.delay_transfers) t = std::make_shared<delayed_transport>(std::move(t), o.interleave_seed);
  auto drops = std::make_shared<dst_drops>();
  runtime::internal_options in;
  in.add_message_types = msg::add_engine_message_types;
  in.deterministic = deterministic;
  in.transport = t;
  in.tunables = o.tunables;
  in.drop_dst = drop_filter(drops);
  auto n = runtime::start_node(runtime::topology_of(o.cluster), {}, std::move(in));
  if (!n) {
    report->problems.push_back("node: " + n.err().message());
    return {};
  }
  auto control = std::make_shared<inproc_cluster>(o, std::move(checker), n.value(), t, drops);
  return {n.value(), control};
}

void run_interleaved(const simulation_options& options, const std::shared_ptr<simulation_report>& report) {
  std::mt19937_64 pick(options.interleave_seed);
  auto checker = std::make_shared<agreement_checker>();
  auto cluster = make_inproc_cluster(options, report, checker, true);
  if (!cluster.control) return;
  auto& sys = runtime::system_of(*cluster.n);
  auto& sched = dynamic_cast<caf::scheduler::test_coordinator&>(sys.scheduler());
  auto* delayed = dynamic_cast<delayed_transport*>(runtime::transport_of(*cluster.n).get());
  auto d = sys.spawn(driver, options, report, cluster.control, checker);
  caf::anon_send(d, msg::start_atom::value);
  std::uint64_t events = 0;
  while (!report->complete) {
    const std::size_t held = delayed != nullptr ? delayed->held() : 0;
    if (sched.jobs.empty() && held == 0) {
      if (!sched.trigger_timeout()) break;
      continue;
    }
    // Time also passes between messages (up to one scheduler step), so timers that fall due
    // then (steps, not the long timeouts) interleave with the messages in flight.
    if (pick() % 8 == 0) {
      sched.advance_time(std::chrono::microseconds(pick() % (options.tunables.step_interval_us + 1)));
      continue;
    }
    // A held push is one more event to pick: it lands, and its completion joins the messages.
    auto i = pick() % (sched.jobs.size() + held);
    if (i >= sched.jobs.size()) {
      delayed->pick(i - sched.jobs.size());
      continue;
    }
    std::rotate(sched.jobs.begin(), sched.jobs.begin() + static_cast<long>(i),
                sched.jobs.begin() + static_cast<long>(i) + 1);
    sched.run_once();
    ++events;
  }
  sched.run();  // let every actor see its exit message
  report->scheduled_events = events;
  if (delayed != nullptr) report->transfers_delayed = delayed->held_total();
  if (!report->complete) report->problems.push_back("interleaved run stopped: nothing left to run");
  cluster.n->stop();
}

}  // namespace

simulation_report run_simulation(const simulation_options& options) {
  validate(options);
  auto report = std::make_shared<simulation_report>();
  if (options.interleave_seed != 0) {
    run_interleaved(options, report);
    return *report;
  }
  auto checker = std::make_shared<agreement_checker>();
  auto cluster = make_inproc_cluster(options, report, checker, false);
  if (!cluster.control) return *report;
  drive(runtime::system_of(*cluster.n), options, report, cluster.control, checker);
  cluster.control.reset();
  cluster.n->stop();
  return *report;
}

}  // namespace kvflow::command
