#pragma once
// One place that configures every kvflow actor system (simulation, benchmarks, rank processes).
#include <caf/actor_system_config.hpp>

namespace kvflow::runtime {

// Registers kvflow's message types, silences CAF's own logger (kvflow logs through spdlog) and
// sets the scheduler's idle policy: after a short spin, an idle worker sleeps on a condition
// variable that the next enqueue signals. CAF's default instead naps in 50 us steps for up to
// 25 ms, which adds up to 50 us to a message's latency and wakes idle cores 20,000 times a
// second; the machines here have 2 cores.
void configure_actor_system(caf::actor_system_config& cfg);

}  // namespace kvflow::runtime
