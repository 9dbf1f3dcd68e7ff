#pragma once
// What prefill and decode rank actors share: the lock on what they share with the engine, the
// agreed rounds of a parent in another process, acting on what a poll found, and losing the
// group. Internal to actors/.
#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <memory>
#include <mutex>

#include "actors/agreed_ring.hpp"
#include "actors/agreement.hpp"
#include "actors/messages.hpp"
#include "actors/rank.hpp"
#include "actors/sender_check.hpp"
#include "actors/state_store.hpp"

namespace kvflow::detail {

// The state store as a rank actor sees it: only the entries of the requests it holds (its
// `rooms`, by incarnation). The engine's thread clears a released request from the store and may
// create the next request of the same room before the actor has forgotten the old one; a late
// event of the old request must not touch the new one.
template <class State>
struct actor_store {
  State& st;
  const room_entry* find(std::uint64_t room) const {
    auto it = st.rooms.find(room);
    const auto* e = st.args.shared->store.find(room);
    return it != st.rooms.end() && e != nullptr && e->incarnation == it->second.inc ? e : nullptr;
  }
  bool update(std::uint64_t room, kv_poll next, const std::string& reason = {}) {
    return find(room) != nullptr && st.args.shared->store.update(room, next, reason);
  }
  bool fail(std::uint64_t room, const std::string& reason) { return update(room, kv_poll::failed, reason); }
  bool set_released(std::uint64_t room) {
    return find(room) != nullptr && st.args.shared->store.set_released(room);
  }
};

// Every handler runs under the lock of what the rank shares with its engine's thread.
inline std::unique_lock<std::mutex> lock(rank_shared& s) { return std::unique_lock<std::mutex>(s.mutex); }

// The rank's agreement parent went down. Supervisors live in the processes of the ranks that
// lead their group, so a rank of the group died with it and no round will come again: every room
// fails (peers are told) and the engine's polls answer that the group is lost; later requests
// are refused.
template <class Self, class Fail>
bool on_parent_down(Self* self, const caf::down_msg& dm, Fail fail) {
  auto& st = self->state;
  auto& sh = *st.args.shared;
  if (!st.args.parent || dm.source != st.args.parent.address() || sh.lost) return false;
  sh.lost = true;
  sh.lost_reason = "agreement group lost: its supervisor went down";
  spdlog::error("{}: agreement supervisor down ({}): failing every room", st.name, self->system().render(dm.reason));
  std::vector<std::uint64_t> rooms;
  for (const auto& [room, r] : st.rooms) rooms.push_back(room);
  for (auto room : rooms) fail(room, sh.lost_reason);
  return true;
}

inline std::string group_failed_reason(const char* side) {
  return std::string("another rank of the ") + side + " group failed the room";
}

// A request the group failed before this rank's engine created it: the poll that showed it was
// this rank's only notice of the failure, so the new room fails now (it takes part in letting
// the request go, and would otherwise wait out the bootstrap timeout). Called as the actor takes
// the create.
template <class State>
bool failed_before_created(State& st, std::uint64_t room, std::uint64_t incarnation) {
  return st.args.shared->failed_unheld.take(room, incarnation,
                                            std::chrono::milliseconds(st.args.tunables.bootstrap_timeout_ms),
                                            std::chrono::steady_clock::now());
}

// The handlers every rank has. `fail(room, reason)` fails a room here and tells its peers;
// `forget(room)` drops what the actor keeps of a room the group released.
template <class Self, class Fail, class Forget>
caf::message_handler rank_handlers(Self* self, Fail fail, Forget forget) {
  return {
      [self](msg::set_registry& r) {
        // Only this process's keeper knows the registry restarted.
        if (r.registry && from_this_process(self)) self->state.args.registry = r.registry;
      },
      // Rounds of a TP supervisor in another process: the engine reads them from the ring.
      [self](msg::agreed_round& a) {
        auto& st = self->state;
        if (!st.args.ring) return;
        if (!sent_by(self, st.args.root.address())) {
          spdlog::warn("{}: an agreed round {} not sent by the group's supervisor refused", st.name, a.round);
          return;
        }
        // Round k merges this rank's own step-k post: a round it has not posted, or of another
        // group, is forged or misrouted. Taken, round 2^64-1 would hold its ring slot for good.
        const auto posted = st.args.shared->posted_step.load(std::memory_order_acquire);
        if (a.round == 0 || a.round > posted || a.group != st.args.group) {
          spdlog::warn("{}: agreed round {} of group {} refused (posted {}, group {})", st.name, a.round, a.group,
                       posted, st.args.group);
          return;
        }
        st.args.ring->publish(std::make_shared<const agreed_view>(agreed_view{a.round, a.group, std::move(a.states), 0}));
      },
      [self, fail](msg::agreement_expiry& x) {
        auto& st = self->state;
        auto g = lock(*st.args.shared);
        auto it = st.rooms.find(x.room);
        if (it == st.rooms.end() || it->second.incarnation() != x.incarnation) return;
        const auto* e = st.store().find(x.room);
        if (e == nullptr || is_terminal(e->state)) return;
        const auto& engine = st.args.shared->engine;
        if (auto en = engine.find(x.room); en != engine.end() && en->second.incarnation == x.incarnation &&
                                           en->second.agreed_ready)
          return;
        fail(x.room, std::string("the ") + st.side +
                         " group did not agree on the request within the bootstrap timeout (a rank of the group "
                         "may not hold it)");
      },
      [self, fail, forget](msg::api_apply& a) {
        auto& st = self->state;
        auto g = lock(*st.args.shared);
        for (const auto& s : a.fail) {
          auto it = st.rooms.find(s.room);
          if (it == st.rooms.end() || it->second.incarnation() != s.incarnation) continue;
          const auto* e = st.store().find(s.room);
          if (e != nullptr && e->state != kv_poll::failed)
            fail(s.room, group_failed_reason(st.side));
        }
        for (const auto& s : a.forget) {
          auto it = st.rooms.find(s.room);
          if (it != st.rooms.end() && it->second.incarnation() == s.incarnation) forget(s.room);
        }
      },
  };
}

}  // namespace kvflow::detail
