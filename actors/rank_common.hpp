#pragma once
// What prefill and decode rank actors share: the agreement client (report a step, receive the
// agreed round) and the snapshot of a state store as step states. Internal to actors/.
#include <caf/all.hpp>
#include <spdlog/spdlog.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>

#include "actors/agreed_board.hpp"
#include "actors/agreement.hpp"
#include "actors/step_board.hpp"
#include "actors/messages.hpp"
#include "actors/rank.hpp"
#include "actors/state_store.hpp"

namespace kvflow::detail {

inline step_states snapshot(const state_store& store) {
  step_states out;
  out.reserve(store.size());
  for (const auto& [room, e] : store.rooms())
    out.push_back({room, e.incarnation, static_cast<std::uint8_t>(e.state)});
  std::sort(out.begin(), out.end(), key_less);
  return out;
}

// What a rank keeps of a new request (its pages counted from the prompt).
inline request_view view_of(const msg::new_request& q, int page_size) {
  return {q.room,       q.incarnation, q.prompt_tokens, (q.prompt_tokens + page_size - 1) / page_size,
          q.prefill_dp, q.decode_dp,   q.prefix_pages};
}

// A request this rank refuses at creation (its room is live already): the live request keeps
// the room; the refused one is reported to the scheduler as released in Failed, with why.
template <class Self>
void refuse_request(Self* self, bool prefill, const msg::new_request& q, const std::string& reason) {
  auto& st = self->state;
  spdlog::error("{}: {}", st.name, reason);
  msg::rank_released ev;
  ev.prefill = prefill;
  ev.rank = st.args.rank;
  ev.room = q.room;
  ev.incarnation = q.incarnation;
  ev.state = static_cast<std::uint8_t>(kv_poll::failed);
  ev.reason = reason;
  if (st.args.observer) self->send(st.args.observer, std::move(ev));
}

// Pacing of the simulated scheduler's steps: fast while rooms are live, slow when idle.
inline std::chrono::microseconds step_pause(const config::tunables& t, bool idle) {
  return std::chrono::microseconds(idle ? t.step_interval_us * 20 : t.step_interval_us);
}

// The agreement client of a rank, called on each scheduler step (`msg::step_tick`). In-process
// (a step board is set): act on the group's latest agreed round once, then post this step's
// states; the next step comes after the step pause. Remote: send a msg::step_report; the
// agreed round comes back as a message (on_agreed_message) and schedules the next step.
// `apply(round, states)` acts on an agreed round; every round is applied once, in order.
template <class Self, class Apply>
void on_step(Self* self, Apply apply) {
  auto& st = self->state;
  const auto& a = st.args;
  if (!a.board) {
    self->send(a.parent, msg::step_report{++st.posted, a.child_index, snapshot(st.store)});
    return;
  }
  auto v = a.agreed->poll();
  const bool agreed = st.posted == 0 || (v && v->round >= st.posted);
  if (agreed) {
    if (v && v->round > st.applied) {
      st.applied = v->round;
      if (a.hooks.agreed) a.hooks.agreed(v->group, v->round, v->states);
      apply(v->round, v->states);
    }
    st.posted = std::max(st.posted, v ? v->round : 0) + 1;
    if (a.board->post(a.child_index, st.posted, snapshot(st.store)))
      self->send(a.parent, msg::board_round{st.posted});
  }
  self->delayed_send(self, step_pause(a.tunables, st.rooms.empty()), msg::step_tick{});
}

template <class Self, class Apply>
void on_agreed_message(Self* self, const msg::agreed_round& m, Apply apply) {
  auto& st = self->state;
  if (m.round > st.applied) {
    st.applied = m.round;
    if (st.args.hooks.agreed) st.args.hooks.agreed(m.group, m.round, m.states);
    apply(m.round, m.states);
  }
  self->delayed_send(self, step_pause(st.args.tunables, st.rooms.empty()), msg::step_tick{});
}

// Acts on an agreed round: an agreed Failed fails the room here too (`fail` tells the peers);
// an agreed terminal state releases the room (`release`), at the same round on every rank of the
// group. Rooms this rank does not hold (cleared, or another incarnation) are left alone.
template <class Self, class Fail, class Release>
void apply_agreed(Self* self, std::uint64_t round, const step_states& states, const char* side,
                  Fail fail, Release release) {
  auto& st = self->state;
  for (const auto& s : states) {
    auto it = st.rooms.find(s.room);
    if (it == st.rooms.end() || it->second.req.incarnation != s.incarnation) continue;
    auto agreed = static_cast<kv_poll>(s.state);
    if (agreed == kv_poll::failed) {
      const auto* e = st.store.find(s.room);
      if (e != nullptr && e->state != kv_poll::failed)
        fail(s.room, std::string("another rank of the ") + side + " group failed the room");
    }
    if (is_terminal(agreed)) release(s.room, round, agreed);
  }
}

// The rank's agreement parent went down. Supervisors live in the processes of the ranks that
// lead their group, so a rank of the group died with it and no round will come again: every room
// fails for the whole group (semantics.md section 3) and, with nobody left to agree with, is
// released here at round 0. Requests that come later are refused (`group_lost`).
template <class Self, class Fail, class Release>
bool on_parent_down(Self* self, const caf::down_msg& dm, Fail fail, Release release) {
  auto& st = self->state;
  if (!st.args.parent || dm.source != st.args.parent.address() || st.group_lost) return false;
  st.group_lost = true;
  spdlog::error("{}: agreement supervisor down ({}): failing every room", st.name, self->system().render(dm.reason));
  std::vector<std::uint64_t> rooms;
  for (const auto& [room, r] : st.rooms) rooms.push_back(room);
  for (auto room : rooms) fail(room, "agreement group lost: its supervisor went down");
  for (auto room : rooms)
    if (st.rooms.count(room) != 0) release(room, 0, kv_poll::failed);
  return true;
}

// The handlers every rank has: leak accounting, the scheduler step, agreed rounds by message.
// `fail(room, reason)` and `release(room, round, state)` are the rank's own.
template <class Self, class Fail, class Release>
caf::message_handler rank_handlers(Self* self, bool prefill, Fail fail, Release release) {
  auto apply = [self, prefill, fail, release](std::uint64_t round, const step_states& states) {
    apply_agreed(self, round, states, prefill ? "prefill" : "decode", fail, release);
  };
  return {
      [self, prefill](msg::pool_usage_query) {
        auto& st = self->state;
        rusage ru{};
        getrusage(RUSAGE_SELF, &ru);
        return msg::pool_usage{prefill, st.args.rank, st.pool->used_pages() + st.pool->used_state_pages(),
                               st.pool->used_aux(), static_cast<std::int64_t>(st.store.size()),
                               st.args.transport->bytes_moved(), std::uint64_t(ru.ru_maxrss) * 1024,
                               st.lent_pages()};
      },
      [self](msg::set_registry& r) {
        if (r.registry) self->state.args.registry = r.registry;
      },
      [self, apply](msg::step_tick) { on_step(self, apply); },
      [self, apply](const msg::agreed_round& a) { on_agreed_message(self, a, apply); },
  };
}

}  // namespace kvflow::detail
