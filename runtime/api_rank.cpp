// The ranks of the public API: checks every engine call against what the rank knows (at once,
// on the engine's thread), hands it to the rank actor, and runs the agreement client: post this
// step's states, answer the agreed round step - lag.
#include <algorithm>

#include "actors/messages.hpp"
#include "cuda/fence_pool.hpp"
#include "runtime/api_internal.hpp"

namespace kvflow {
namespace {

error invalid(std::string m) { return {errc::invalid_argument, std::move(m)}; }
error stopped_error() { return {errc::unavailable, "the node stopped"}; }

std::string id_text(const request_id& id) {
  return "room " + std::to_string(id.room) + " (request " + std::to_string(id.incarnation) + ")";
}

// The engine-side record of `id`, or null.
engine_room* find(rank_shared& s, const request_id& id) {
  auto it = s.engine.find(id.room);
  return it == s.engine.end() || it->second.incarnation != id.incarnation ? nullptr : &it->second;
}

error check_pages(const std::vector<std::int32_t>& pages, int limit, const char* what) {
  for (auto p : pages)
    if (p < 0 || p >= limit)
      return invalid(std::string(what) + ": page " + std::to_string(p) + " outside this rank's " +
                     std::to_string(limit));
  return {};
}

// Creates the store entry at once (a duplicate is refused here), then tells the actor.
error create_room(rank::impl& r, const request_id& id, int other_dp, int other_dps, kv_poll initial) {
  if (r.stopped->load()) return stopped_error();
  if (other_dp < 0 || other_dp >= other_dps)
    return invalid("dp group " + std::to_string(other_dp) + " outside [0, " + std::to_string(other_dps) + ")");
  std::lock_guard<std::mutex> g(r.shared->mutex);
  auto& sh = *r.shared;
  // This rank's create came after its group had already finished the request (the others
  // failed and let go of it first): taken, it would be a room only this rank holds.
  if (sh.finished.take(id.room, id.incarnation, r.late_create_window, std::chrono::steady_clock::now()))
    return {errc::exists, "room " + std::to_string(id.room) + " incarnation " + std::to_string(id.incarnation) +
                              ": its group already finished this request (another rank of the group ended it before this create)"};
  // A request this rank will not hold: the peers of the other side still hear of it from their
  // own engines, so the actor tells them now (unless the refused request is the very one that is
  // live: nothing tells the two apart).
  auto refuse = [&](errc code, std::string why) -> error {
    const auto* e = sh.store.find(id.room);
    const auto en = sh.engine.find(id.room);
    const bool same_key = (e != nullptr && e->incarnation == id.incarnation) ||
                          (en != sh.engine.end() && en->second.incarnation == id.incarnation);
    if (!same_key) {
      sh.remember_reason(id.room, id.incarnation, why, std::chrono::steady_clock::now());
      caf::anon_send(r.actor, msg::api_refused{id.room, id.incarnation, other_dp, why});
    }
    return {code, std::move(why)};
  };
  if (sh.lost) return refuse(errc::unavailable, sh.lost_reason);
  if (sh.engine.count(id.room) != 0 || sh.store.find(id.room) != nullptr)
    return refuse(errc::exists, "duplicate room " + std::to_string(id.room) + ": a live request holds it");
  // Refused here rather than failing the step post that would carry it.
  if (r.shm && sh.store.size() >= static_cast<std::size_t>(r.shm->shape().max_rooms))
    return refuse(errc::unavailable, "room " + std::to_string(id.room) + ": this rank holds " +
                                         std::to_string(sh.store.size()) +
                                         " rooms, what its group's shared-memory agreement posts at most "
                                         "(KVFLOW_AGREEMENT_SHM_ROOMS)");
  if (auto s = sh.store.create(id.room, id.incarnation, initial); !s) return refuse(errc::exists, s.reason());
  sh.engine[id.room] = engine_room{id.incarnation};
  ++sh.counters.created;
  // Sent under the lock, as poll sends what the group failed: the actor sees the two in the
  // order they happened, so a failure never overtakes the create it is about.
  caf::anon_send(r.actor, msg::api_create{id.room, id.incarnation, other_dp});
  return {};
}

}  // namespace

const room_poll* round_view::find(const request_id& id) const {
  auto it = std::lower_bound(begin(), end(), id, [](const room_poll& p, const request_id& k) {
    return p.id.room != k.room ? p.id.room < k.room : p.id.incarnation < k.incarnation;
  });
  return it != end() && it->id.room == id.room && it->id.incarnation == id.incarnation ? it : nullptr;
}

rank::rank(std::shared_ptr<impl> p) : impl_(std::move(p)) {}
rank::~rank() = default;
int rank::global_rank() const { return impl_->rank; }
std::uint64_t rank::lag() const { return impl_->lag; }

expected<round_view> rank::poll(std::uint64_t step) { return poll(step, impl_->default_wait); }

expected<round_view> rank::poll(std::uint64_t step, std::chrono::microseconds wait) {
  auto& r = *impl_;
  if (r.stopped->load()) return stopped_error();
  if (step == 0 || step > r.posted + 1 || step < r.posted)
    return invalid("step " + std::to_string(step) + ": steps start at 1 and rise by one (last " +
                   std::to_string(r.posted) + ")");
  auto& sh = *r.shared;
  if (step == r.posted + 1) {
    // This step's report: the store as it stands (rebuilt only when it changed).
    {
      std::lock_guard<std::mutex> g(sh.mutex);
      ++sh.counters.polls;
      // What it remembers of ended requests goes by age here, so without new failures or creates.
      // finished and failed_unheld answer a create within the bootstrap timeout (late_create_window;
      // the actor's failed_before_created uses the same), reasons for failure_memory_ms.
      sh.expire(std::chrono::steady_clock::now(), r.late_create_window);
      if (sh.store.version() != r.snapshot_version) {
        r.snapshot.clear();
        r.snapshot.reserve(sh.store.size());
        for (const auto& [room, e] : sh.store.rooms())
          r.snapshot.push_back({room, e.incarnation, static_cast<std::uint8_t>(e.state), e.released});
        std::sort(r.snapshot.begin(), r.snapshot.end(), key_less);
        r.snapshot_version = sh.store.version();
      }
    }
    if (r.shm) {
      // Into the group's segment; a rank a whole post ring ahead of the group waits here (within
      // the poll's wait) and, still ahead, answers not_ready without posting the step.
      switch (r.shm->post(r.child, step, r.snapshot, wait, r.posted_version == r.snapshot_version)) {
        case shm_segment::post_result::posted:
        case shm_segment::post_result::duplicate: break;
        case shm_segment::post_result::full:
          return error{wait.count() == 0 ? errc::not_ready : errc::timeout,
                       "step " + std::to_string(step) + ": the group has not merged round " +
                           std::to_string(step - static_cast<std::uint64_t>(r.shm->shape().post_slots)) + " yet"};
        case shm_segment::post_result::too_many_rooms:
          return error{errc::invalid_argument, "step " + std::to_string(step) + ": this rank holds " +
                                                   std::to_string(r.snapshot.size()) +
                                                   " rooms; its group's shared-memory agreement posts at most " +
                                                   std::to_string(r.shm->shape().max_rooms) +
                                                   " (KVFLOW_AGREEMENT_SHM_ROOMS)"};
      }
      r.posted = step;
      r.posted_version = r.snapshot_version;
    } else if (r.board) {
      r.posted = step;
      // In one process: the post that completes the step wakes the supervisor, once.
      if (r.board->post(r.child, step, r.snapshot)) caf::anon_send(r.parent, msg::board_round{step});
    } else {
      r.posted = step;
      r.shared->posted_step.store(step, std::memory_order_release);
      // As the rank: its supervisor takes child r.child's reports only from that child.
      caf::send_as(r.actor, r.parent, msg::step_report{step, r.child, r.snapshot});
    }
  }
  const std::uint64_t round = step > r.lag ? step - r.lag : 0;
  round_view out;
  out.step = step;
  out.round = round;
  if (round == 0) return out;
  // The group agreed nothing new since the round this rank holds: the view stands, nothing to
  // act on (the common step; it copies nothing).
  auto unchanged = [&] {
    if (r.view_round == 0) return false;
    if (r.shm) return r.shm->same_as(round, r.view_round);
    const agreed_view* v = r.ring->get(round);
    return v != nullptr && v->same_since != 0 && v->same_since <= r.view_round;
  };
  if (r.view_round != round && unchanged()) {
    r.view_round = round;
  } else if (r.view_round != round) {
    // The round where this rank reads it: the segment (copied out), or the ring.
    auto get = [&]() -> const agreed_view* {
      if (!r.shm) return r.ring->get(round);
      return r.shm->read(round, r.shm_view) ? &r.shm_view : nullptr;
    };
    const agreed_view* v = get();
    if (v == nullptr) {
      {
        std::lock_guard<std::mutex> g(sh.mutex);
        if (sh.lost) return error{errc::unavailable, sh.lost_reason};
        if (wait.count() > 0) ++sh.counters.stalls;
      }
      if (r.shm && !r.shm->broken().empty()) return error{errc::unavailable, r.shm->broken()};
      if (wait.count() == 0) return error{errc::not_ready, "round " + std::to_string(round) + " is not complete"};
      v = r.shm ? (r.shm->wait(round, wait) ? get() : nullptr) : r.ring->wait_for(round, wait);
      if (v == nullptr)
        return error{errc::timeout, "round " + std::to_string(round) + " did not complete within " +
                                        std::to_string(wait.count()) + " us"};
    }
    // Act on what changed since the last round handed out: rooms the group failed (fail them
    // here too) and rooms the group released (clear them).
    msg::api_apply apply;
    std::vector<const room_state*> ready;  // past Bootstrapping in this round for the first time
    std::size_t j = 0;
    for (const auto& s : v->states) {
      while (j < r.previous.size() && key_less(r.previous[j], s)) ++j;
      const bool was = j < r.previous.size() && !key_less(s, r.previous[j]);
      const auto state = static_cast<kv_poll>(s.state);
      if (state != kv_poll::bootstrapping && (!was || static_cast<kv_poll>(r.previous[j].state) == kv_poll::bootstrapping))
        ready.push_back(&s);
      if (state == kv_poll::failed && (!was || r.previous[j].state != s.state)) apply.fail.push_back(s);
      if (is_terminal(state) && s.released && (!was || !r.previous[j].released || r.previous[j].state != s.state))
        apply.forget.push_back(s);
    }
    if (!apply.forget.empty() || !apply.fail.empty() || !ready.empty()) {
      std::lock_guard<std::mutex> g(sh.mutex);
      for (const auto* s : ready)
        if (auto it = sh.engine.find(s->room); it != sh.engine.end() && it->second.incarnation == s->incarnation)
          it->second.agreed_ready = true;
      for (const auto& s : apply.fail) {
        const auto* e = sh.store.find(s.room);
        if (!s.released && (e == nullptr || e->incarnation != s.incarnation))
          sh.failed_unheld.remember(s.room, s.incarnation, std::chrono::steady_clock::now());
      }
      for (const auto& s : apply.forget) {
        const auto* e = sh.store.find(s.room);
        if (e == nullptr || e->incarnation != s.incarnation) {
          sh.finished.remember(s.room, s.incarnation, std::chrono::steady_clock::now());
          sh.failed_unheld.drop(s.room, s.incarnation);  // a create now is refused, not failed
          continue;
        }
        (static_cast<kv_poll>(s.state) == kv_poll::success ? sh.counters.succeeded : sh.counters.failed)++;
        sh.remember_reason(s.room, s.incarnation,
                           e->reason.empty() && s.state == 0 ? "another rank of the group failed the room" : e->reason,
                           std::chrono::steady_clock::now());
        sh.store.clear(s.room);
        sh.engine.erase(s.room);
      }
      // Under the lock, as create sends its message (see create_room).
      if (!apply.forget.empty() || !apply.fail.empty()) caf::anon_send(r.actor, std::move(apply));
    }
    r.view.resize(v->states.size());
    for (std::size_t i = 0; i < v->states.size(); ++i) {
      const auto& s = v->states[i];
      r.view[i] = {{s.room, s.incarnation}, static_cast<poll_state>(s.state), s.released};
    }
    // The segment's copy is this rank's own: taken, not copied again.
    if (v == &r.shm_view)
      std::swap(r.previous, r.shm_view.states);
    else
      r.previous = v->states;
    r.view_round = round;
  }
  out.rooms = r.view.data();
  out.count = r.view.size();
  return out;
}

std::string rank::failure_reason(const request_id& id) const {
  auto& sh = *impl_->shared;
  std::lock_guard<std::mutex> g(sh.mutex);
  return sh.failure_of(id.room, id.incarnation, std::chrono::steady_clock::now());
}

error rank::clear(const request_id& id) {
  // A poll clears a request once a round shows it terminal and released (every rank of the group
  // at the same step); before that the request is still the group's, so clearing it here alone
  // would leave this rank out of step with the others.
  auto& r = *impl_;
  auto& sh = *r.shared;
  std::unique_lock<std::mutex> g(sh.mutex);
  const auto* e = sh.store.find(id.room);
  if (e == nullptr || e->incarnation != id.incarnation) return {};  // cleared already (idempotent)
  // With its group lost no round will come: what this rank itself released may go.
  if (!sh.lost || !e->released) return invalid(id_text(id) + ": no round has shown it released yet");
  msg::api_apply forget;
  forget.forget.push_back({id.room, id.incarnation, static_cast<std::uint8_t>(e->state), true});
  sh.remember_reason(id.room, id.incarnation, e->reason, std::chrono::steady_clock::now());
  sh.store.clear(id.room);
  sh.engine.erase(id.room);
  g.unlock();
  caf::anon_send(r.actor, std::move(forget));
  return {};
}

error rank::abort(const request_id& id, const std::string& reason) {
  auto& r = *impl_;
  if (r.stopped->load()) return stopped_error();
  {
    std::lock_guard<std::mutex> g(r.shared->mutex);
    if (find(*r.shared, id) == nullptr) return {errc::not_found, id_text(id) + " is not on this rank"};
  }
  caf::anon_send(r.actor, msg::api_abort{id.room, id.incarnation, reason});
  return {};
}

rank_stats rank::stats() const {
  auto& sh = *impl_->shared;
  std::lock_guard<std::mutex> g(sh.mutex);
  const auto& c = sh.counters;
  rank_stats s;
  s.created = c.created;
  s.succeeded = c.succeeded;
  s.failed = c.failed;
  s.aborted = c.aborted;
  s.bytes_sent = c.bytes_sent;
  s.transfer_seconds = c.transfer_seconds;
  s.polls = c.polls;
  s.stalls = c.stalls;
  s.live_requests = sh.store.size();
  s.quarantined = c.quarantined;
  s.pushes_in_flight = c.pushes_in_flight;
  return s;
}

// ---- prefill ------------------------------------------------------------------------------
error prefill_rank::create(const request_id& id, int decode_dp) {
  auto& r = *impl_;
  return create_room(r, id, decode_dp, r.plan->config().decode.dp,
                     r.authoritative ? kv_poll::bootstrapping : kv_poll::waiting_for_input);
}

expected<int> prefill_rank::decode_prefix_pages(const request_id& id) const {
  auto& sh = *impl_->shared;
  std::lock_guard<std::mutex> g(sh.mutex);
  auto* e = find(sh, id);
  if (e == nullptr) return error{errc::not_found, id_text(id) + " is not on this rank"};
  if (!impl_->authoritative) return 0;  // no decode rank reads it: nothing to skip
  if (e->prefix_pages < 0) return error{errc::not_ready, id_text(id) + ": its destinations have not all arrived"};
  return e->prefix_pages;
}

error prefill_rank::init(const request_id& id, int pages, int aux_row) {
  auto& r = *impl_;
  if (r.stopped->load()) return stopped_error();
  if (pages < 0) return invalid("pages: " + std::to_string(pages) + " < 0");
  if (!r.memory->aux_buffers().empty() && (aux_row < 0 || aux_row >= r.memory->aux_rows()))
    return invalid("aux_row: " + std::to_string(aux_row) + " outside this rank's " +
                   std::to_string(r.memory->aux_rows()) + " rows");
  {
    std::lock_guard<std::mutex> g(r.shared->mutex);
    auto* e = find(*r.shared, id);
    if (e == nullptr) return {errc::not_found, id_text(id) + " is not on this rank"};
    if (e->inited) return invalid(id_text(id) + ": init called twice");
    const auto* st = r.shared->store.find(id.room);
    if (st != nullptr && st->state != kv_poll::failed && st->state < kv_poll::waiting_for_input)
      return {errc::not_ready, id_text(id) + ": init before WaitingForInput"};
    e->inited = true;
    e->pages = pages;
  }
  caf::anon_send(r.actor, msg::api_init{id.room, id.incarnation, pages, aux_row});
  return {};
}

error prefill_rank::send(const request_id& id, const std::vector<std::int32_t>& pages, bool is_last,
                         const std::vector<std::int32_t>& state_pages, std::uintptr_t ready_fence) {
  auto& r = *impl_;
  if (r.stopped->load()) return stopped_error();
  if (ready_fence != 0 && !r.fences)
    return {errc::unsupported, "ready_fence: this rank's KV is host memory (a fence orders writes on the GPU)"};
  if (auto e = check_pages(pages, r.memory->pages(), "pages")) return e;
  if (auto e = check_pages(state_pages, r.memory->state_pages(), "state_pages")) return e;
  if (!state_pages.empty() && !is_last) return invalid("state_pages: only on the last chunk");
  // Taken over now: the engine may record its event again once this call returned.
  std::uintptr_t fence = 0;
  if (ready_fence != 0) {
    auto mine = r.fences->capture(ready_fence);
    if (!mine) return {errc::internal, "ready_fence: " + mine.error().reason()};
    fence = mine.value();
  }
  {
    std::lock_guard<std::mutex> g(r.shared->mutex);
    auto refuse = [&](error e) {
      if (fence != 0) r.fences->give_back(fence);
      return e;
    };
    auto* e = find(*r.shared, id);
    if (e == nullptr) return refuse({errc::not_found, id_text(id) + " is not on this rank"});
    if (!e->inited) return refuse(invalid(id_text(id) + ": send before init"));
    if (e->last) return refuse(invalid(id_text(id) + ": send after the last chunk"));
    const int after = e->sent + static_cast<int>(pages.size());
    if (after > e->pages || (is_last && after != e->pages))
      return refuse(invalid(id_text(id) + ": chunks of " + std::to_string(after) + " pages for a request of " +
                            std::to_string(e->pages) + " (init)"));
    e->sent = after;
    e->last = is_last;
  }
  caf::anon_send(r.actor, msg::api_send{id.room, id.incarnation, pages, is_last, state_pages, fence});
  return {};
}

// ---- decode -------------------------------------------------------------------------------
error decode_rank::create(const request_id& id, int prefill_dp) {
  auto& r = *impl_;
  return create_room(r, id, prefill_dp, r.plan->config().prefill.dp, kv_poll::bootstrapping);
}

error decode_rank::send_destinations(const request_id& id, const std::vector<std::int32_t>& pages, int aux_slot,
                                     const std::vector<std::int32_t>& state_pages, int prefix_pages) {
  auto& r = *impl_;
  if (r.stopped->load()) return stopped_error();
  if (auto e = check_pages(pages, r.memory->pages(), "pages")) return e;
  if (auto e = check_pages(state_pages, r.memory->state_pages(), "state_pages")) return e;
  if (prefix_pages < 0 || prefix_pages > static_cast<int>(pages.size()))
    return invalid("prefix_pages: " + std::to_string(prefix_pages) + " outside [0, " + std::to_string(pages.size()) + "]");
  if (r.memory->state_pages() > 0 && state_pages.size() != pages.size())
    return invalid("state_pages: " + std::to_string(state_pages.size()) + " for " + std::to_string(pages.size()) +
                   " pages (the model has state: one per page)");
  if (r.memory->state_pages() == 0 && !state_pages.empty()) return invalid("state_pages: the model has no state");
  if (r.authoritative && (aux_slot < 0 || aux_slot >= r.memory->aux_rows()))
    return invalid("aux_slot: " + std::to_string(aux_slot) + " outside this rank's " +
                   std::to_string(r.memory->aux_rows()) + " rows");
  {
    std::lock_guard<std::mutex> g(r.shared->mutex);
    auto* e = find(*r.shared, id);
    if (e == nullptr) return {errc::not_found, id_text(id) + " is not on this rank"};
    if (e->inited) return invalid(id_text(id) + ": destinations sent twice");
    const auto* st = r.shared->store.find(id.room);
    if (st != nullptr && st->state == kv_poll::bootstrapping)
      return {errc::not_ready, id_text(id) + ": destinations before WaitingForInput"};
    e->inited = true;
  }
  caf::anon_send(r.actor, msg::api_destinations{id.room, id.incarnation, pages, aux_slot, state_pages, prefix_pages});
  return {};
}

}  // namespace kvflow
