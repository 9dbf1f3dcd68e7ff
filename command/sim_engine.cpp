#include "command/sim_engine.hpp"

#include <spdlog/spdlog.h>
#include <sys/resource.h>

#include <cstring>
#include <map>

#include "command/engine_messages.hpp"
#include "command/sim_kv_content.hpp"

namespace kvflow::command {
namespace {

struct engine_tick {};
template <class I>
typename I::result_type inspect(I& f, engine_tick&) {
  return f(caf::meta::type_name("engine_tick"));
}

struct sim_req {
  request_view view;
  std::uint8_t fault = 0;
  bool started = false;                 // prefill: init came; decode: destinations sent
  std::vector<std::int32_t> pages;      // by request page (prefix positions: -1)
  std::vector<std::int32_t> state;      // by request page (empty: no state)
  std::int32_t aux = -1;
  int next_page = 0;                    // prefill: next request page to send
  bool last_sent = false;
  int rounds_since_dst = 0;             // decode: rounds seen since its destinations went
  bool aborted = false;                 // decode: the abort-in-transfer fault fired
};

struct engine_state {
  sim_engine_args args;
  std::map<std::pair<std::uint64_t, std::uint64_t>, sim_req> reqs;
  std::uint64_t step = 0;  // the step being polled
  std::uint64_t last_round = 0;
  msg::round_digests digests;  // not yet sent to the observer (no checker in this process)
  bool lost = false;
  rank& api() { return args.rank_api.api(); }
};
using engine_actor = caf::stateful_actor<engine_state>;

void report(engine_actor* self, const sim_req& r, std::uint64_t round, poll_state state, std::string reason,
            verify_counts v = {}) {
  auto& st = self->state;
  msg::rank_released ev;
  ev.prefill = st.args.prefill;
  ev.rank = st.args.rank;
  ev.room = r.view.room;
  ev.incarnation = r.view.incarnation;
  ev.round = round;
  ev.state = static_cast<std::uint8_t>(state);
  ev.reason = std::move(reason);
  ev.bytes_expected = v.bytes_expected;
  ev.bytes_verified = v.bytes_verified;
  ev.mismatched_pages = v.mismatched_pages;
  if (st.args.observer) self->send(st.args.observer, std::move(ev));
}

void free_memory(engine_state& st, sim_req& r) {
  std::vector<std::int32_t> held;
  for (auto p : r.pages)
    if (p >= 0) held.push_back(p);
  st.args.memory->pages.give_back(held);
  st.args.memory->state_pages.give_back(r.state);
  if (r.aux >= 0) st.args.memory->aux_rows.give_back({r.aux});
  r.pages.clear();
  r.state.clear();
  r.aux = -1;
}

// Takes the request's pages after its prefix (and state pages, an aux row); false when the
// pool is out of them.
bool allocate(engine_state& st, sim_req& r, bool aux) {
  auto& mem = *st.args.memory;
  const int n = r.view.n_pages, prefix = r.view.prefix_pages;
  auto pages = mem.pages.take(n - prefix);
  if (!pages) return false;
  r.pages.assign(static_cast<std::size_t>(prefix), -1);
  r.pages.insert(r.pages.end(), pages->begin(), pages->end());
  if (mem.has_state()) {
    auto state = mem.state_pages.take(n);
    if (!state) return free_memory(st, r), false;
    r.state = std::move(*state);
  }
  if (aux) {
    auto row = mem.aux_rows.take(1);
    if (!row) return free_memory(st, r), false;
    r.aux = (*row)[0];
  }
  return true;
}

// Prefill, the group agreed WaitingForInput: take the request's memory, then init. Its KV is
// written chunk by chunk (send_next_chunk), as chunked prefill's forward passes write it, so no
// scheduler step does a whole request's work and the group's rounds keep their pace.
void start_prefill(engine_actor* self, sim_req& r) {
  auto& st = self->state;
  auto& api = *st.args.rank_api.prefill;
  const request_id id{r.view.room, r.view.incarnation};
  auto prefix = api.decode_prefix_pages(id);
  if (!prefix) return;  // not yet (it comes with the destinations)
  r.view.prefix_pages = prefix.value();
  const auto& me = st.args.plan->prefill(st.args.rank);
  if (!allocate(st, r, me.authoritative)) {
    api.abort(id, "out of KV pages");
    r.started = true;
    return;
  }
  r.next_page = r.view.prefix_pages;
  r.started = true;
  if (auto e = api.init(id, r.view.n_pages - r.view.prefix_pages, std::max(r.aux, 0)))
    spdlog::error("simulated engine, prefill rank {}: init: {}", st.args.rank, e.message());
}

// The "forward" of request pages [begin, end): the KV (and state) this rank sends of them; the
// first output into the aux row with the last chunk.
void write_chunk(engine_state& st, sim_req& r, int begin, int end, bool last) {
  const auto& me = st.args.plan->prefill(st.args.rank);
  if (!me.authoritative) return;
  const auto& cfg = st.args.plan->config();
  config::range mine{r.view.prefix_pages, r.view.n_pages};
  if (cfg.cp_send_all && cfg.prefill.cp > 1) {
    auto share = config::cp_share(r.view.n_pages, cfg.prefill.cp, me.coord.cp);
    mine = {std::max(mine.begin, share.begin), std::min(mine.end, share.end)};
  }
  const config::range fill{std::max(begin, mine.begin), std::min(end, mine.end)};
  if (!fill.empty()) {
    fill_pages(*st.args.plan, st.args.rank, *st.args.memory, r.view, r.pages, r.state, fill);
    if ((r.fault & fault_corrupt) != 0 && fill.begin == mine.begin) {
      auto* p = st.args.memory->item(me.layers.begin, 0, r.pages[static_cast<std::size_t>(fill.begin)]);
      *p = static_cast<std::byte>(~std::to_integer<unsigned>(*p));
    }
  }
  if (last) {
    auto out = simulated_first_output(r.view);
    std::memcpy(st.args.memory->aux_row(r.aux), &out, sizeof out);
  }
}

// Prefill: one chunk per step (chunked prefill), the last one possibly empty.
void send_next_chunk(engine_actor* self, sim_req& r) {
  auto& st = self->state;
  const int per_chunk = std::max(1, st.args.chunk_tokens / st.args.plan->config().page_size);
  // Whole chunks first; the last chunk carries what is left, possibly nothing.
  const bool last = r.next_page + per_chunk > r.view.n_pages;
  const int end = last ? r.view.n_pages : r.next_page + per_chunk;
  write_chunk(st, r, r.next_page, end, last);
  std::vector<std::int32_t> chunk(r.pages.begin() + r.next_page, r.pages.begin() + end);
  r.next_page = end;
  r.last_sent = last;
  auto e = st.args.rank_api.prefill->send({r.view.room, r.view.incarnation}, chunk, last,
                                     last ? r.state : std::vector<std::int32_t>{});
  if (e) spdlog::error("simulated engine, prefill rank {}: send: {}", st.args.rank, e.message());
}

void start_decode(engine_actor* self, sim_req& r) {
  auto& st = self->state;
  auto& api = *st.args.rank_api.decode;
  const request_id id{r.view.room, r.view.incarnation};
  r.started = true;
  if (!allocate(st, r, st.args.plan->decode(st.args.rank).expects_aux)) {
    api.abort(id, "out of KV pages");
    return;
  }
  if ((r.fault & fault_drop_dst_info) != 0 && st.args.drops) {
    std::lock_guard<std::mutex> g(st.args.drops->mutex);
    st.args.drops->pending.insert({r.view.room, r.view.incarnation});
  }
  if (auto e = api.send_destinations(id, r.pages, std::max(r.aux, 0), r.state, r.view.prefix_pages))
    spdlog::error("simulated engine, decode rank {}: destinations: {}", st.args.rank, e.message());
}

// The request's end on this rank: the group agreed it terminal and released its memory.
void finish(engine_actor* self, sim_req& r, std::uint64_t round, poll_state state) {
  auto& st = self->state;
  const request_id id{r.view.room, r.view.incarnation};
  verify_counts v;
  if (!st.args.prefill && state == poll_state::success)
    v = verify_pages(*st.args.plan, st.args.rank, *st.args.memory, r.view, r.pages, r.state, r.aux);
  free_memory(st, r);
  report(self, r, round, state, state == poll_state::failed ? st.api().failure_reason(id) : std::string{}, v);
}

// The rounds' digests go to the observer in batches (and before any usage reply).
void flush_digests(engine_actor* self) {
  auto& st = self->state;
  if (st.digests.rounds.empty() || !st.args.observer) return;
  st.digests.group = st.args.rank_api.group;
  self->send(st.args.observer, std::move(st.digests));
  st.digests = {};
}

void on_round(engine_actor* self, const round_view& round) {
  auto& st = self->state;
  if (round.round > st.last_round) {
    if (st.args.checker) {
      st.args.checker->on_round(st.args.rank_api.group, round);
    } else {
      st.digests.rounds.push_back(round.round);
      st.digests.digests.push_back(round_digest(round));
      if (st.digests.rounds.size() >= 64) flush_digests(self);
    }
  }
  st.last_round = std::max(st.last_round, round.round);
  std::vector<std::pair<std::uint64_t, std::uint64_t>> done;
  for (auto& [key, r] : st.reqs) {
    const auto* p = round.find({key.first, key.second});
    if (p == nullptr) continue;
    if (p->state == poll_state::success || p->state == poll_state::failed) {
      if (p->released) {
        finish(self, r, round.round, p->state);
        done.push_back(key);
      }
      continue;
    }
    spdlog::trace("engine {} {}: round {} room {} {} released {}", st.args.prefill ? "prefill" : "decode", st.args.rank,
                  round.round, key.first, to_string(p->state), p->released);
    if (p->state < poll_state::waiting_for_input) continue;
    // The client goes away while KV may be moving into this rank's pages: 1 to 6 rounds (by
    // room) after its destinations went, with no Success agreed yet.
    if (!st.args.prefill && (r.fault & fault_abort_in_transfer) != 0 && !r.aborted && r.started &&
        ++r.rounds_since_dst > static_cast<int>(key.first % 6)) {
      r.aborted = true;
      if (auto e = st.args.rank_api.decode->abort({key.first, key.second}, "abort-in-transfer:decode fault"))
        spdlog::error("simulated engine, decode rank {}: abort: {}", st.args.rank, e.message());
      continue;
    }
    if (!r.started) {
      st.args.prefill ? start_prefill(self, r) : start_decode(self, r);
    } else if (st.args.prefill && !r.last_sent) {
      send_next_chunk(self, r);
    }
  }
  for (const auto& k : done) st.reqs.erase(k);
}

void tick(engine_actor* self) {
  auto& st = self->state;
  // The scheduler steps whether or not it holds requests: the group's rounds need every rank's
  // post.
  if (!st.lost) {
    auto round = st.api().poll(st.step + 1, std::chrono::microseconds(0));
    if (round) {
      ++st.step;
      on_round(self, round.value());
    } else if (round.err().code() == errc::unavailable) {
      // The group is gone (a rank and its supervisor died): no round will come; its requests
      // end here, failed.
      st.lost = true;
      for (auto& [key, r] : st.reqs) {
        free_memory(st, r);
        report(self, r, 0, poll_state::failed, round.err().message());
      }
      st.reqs.clear();
    }
    // not_ready: the round is still being agreed; poll the same step again next tick.
  }
  const auto pause = std::chrono::microseconds(st.reqs.empty() ? st.args.step_interval_us * 20 : st.args.step_interval_us);
  self->delayed_send(self, pause, engine_tick{});
}

caf::behavior sim_engine(engine_actor* self, sim_engine_args args) {
  auto& st = self->state;
  st.args = std::move(args);
  self->link_to(st.args.rank_api.actor);
  self->delayed_send(self, std::chrono::microseconds(st.args.step_interval_us), engine_tick{});
  return {
      [self](engine_tick) { tick(self); },
      [self](msg::new_request& q) {
        auto& st = self->state;
        const auto& cfg = st.args.plan->config();
        sim_req r;
        r.view = {q.room, q.incarnation, 0, 0, q.prefill_dp};
        if (auto why = request_problem(q, cfg.page_size, st.args.memory->pages.total()); !why.empty()) {
          spdlog::error("simulated engine, {} rank {}: {}", st.args.prefill ? "prefill" : "decode", st.args.rank, why);
          report(self, r, 0, poll_state::failed, why);
          return;
        }
        r.view.n_pages = static_cast<int>((std::int64_t{q.prompt_tokens} + cfg.page_size - 1) / cfg.page_size);
        r.view.prefix_pages = q.prefix_pages;
        r.fault = q.fault;
        const request_id id{q.room, q.incarnation};
        auto e = st.args.prefill ? st.args.rank_api.prefill->create(id, q.decode_dp) : st.args.rank_api.decode->create(id, q.prefill_dp);
        if (e) {
          // Refused at creation (its room is live already, or the group is lost): the live
          // request keeps the room; this one ends here, failed.
          spdlog::error("simulated engine, {} rank {}: {}", st.args.prefill ? "prefill" : "decode", st.args.rank, e.message());
          report(self, r, 0, poll_state::failed, e.message());
          return;
        }
        st.reqs.emplace(std::make_pair(q.room, q.incarnation), std::move(r));
      },
      [self](msg::abort_request& a) {
        auto& st = self->state;
        if (!st.reqs.count({a.room, a.incarnation})) return;
        if (st.args.prefill)
          st.args.rank_api.prefill->abort({a.room, a.incarnation}, a.reason);
        else
          st.args.rank_api.decode->abort({a.room, a.incarnation}, a.reason);
      },
      [self](msg::pool_usage_query) {
        flush_digests(self);
        auto& st = self->state;
        auto& mem = *st.args.memory;
        auto s = st.api().stats();
        rusage ru{};
        getrusage(RUSAGE_SELF, &ru);
        msg::pool_usage u;
        u.prefill = st.args.prefill;
        u.rank = st.args.rank;
        u.used_pages = mem.pages.used() + mem.state_pages.used();
        u.used_aux = mem.aux_rows.used();
        u.live_rooms = static_cast<std::int64_t>(s.live_requests);
        u.bytes_moved = s.bytes_sent;
        u.peak_rss_bytes = std::uint64_t(ru.ru_maxrss) * 1024;
        // Pages of requests whose memory the group has not released yet come back later.
        std::int64_t held = 0;
        for (const auto& [k, r] : st.reqs) held += static_cast<std::int64_t>(r.pages.size() + r.state.size());
        u.draining_pages = static_cast<std::int64_t>(s.pushes_in_flight + s.quarantined) > 0 ? held : 0;
        return u;
      },
  };
}

}  // namespace

std::function<bool(std::uint64_t, std::uint64_t)> drop_filter(std::shared_ptr<dst_drops> drops) {
  return [drops](std::uint64_t room, std::uint64_t incarnation) {
    std::lock_guard<std::mutex> g(drops->mutex);
    return drops->pending.erase({room, incarnation}) != 0;
  };
}

std::string request_problem(const msg::new_request& q, int page_size, int pool_pages) {
  if (q.prompt_tokens <= 0) return "prompt of " + std::to_string(q.prompt_tokens) + " tokens";
  const std::int64_t pages = (std::int64_t{q.prompt_tokens} + page_size - 1) / page_size;
  if (q.prefix_pages < 0 || q.prefix_pages > pages)
    return "prefix of " + std::to_string(q.prefix_pages) + " pages outside [0, " + std::to_string(pages) +
           "] for a prompt of " + std::to_string(q.prompt_tokens) + " tokens";
  if (pages - q.prefix_pages > pool_pages)
    return "prompt of " + std::to_string(q.prompt_tokens) + " tokens needs " + std::to_string(pages - q.prefix_pages) +
           " pages, the rank's pool has " + std::to_string(pool_pages);
  return {};
}

caf::actor spawn_sim_engine(caf::actor_system& sys, sim_engine_args args) {
  return sys.spawn(sim_engine, std::move(args));
}

}  // namespace kvflow::command
