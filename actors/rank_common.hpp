#pragma once
// What prefill and decode rank actors share: the agreement client (report a step, receive the
// agreed round) and the snapshot of a state store as step states. Internal to actors/.
#include <caf/all.hpp>
#include <algorithm>
#include <chrono>

#include "actors/agreement.hpp"
#include "actors/messages.hpp"
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

// Pacing of the simulated scheduler's steps: fast while rooms are live, slow when idle.
inline std::chrono::microseconds step_pause(const config::tunables& t, bool idle) {
  return std::chrono::microseconds(idle ? t.step_interval_us * 20 : t.step_interval_us);
}

}  // namespace kvflow::detail
