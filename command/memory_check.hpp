#pragma once
// Does a simulation's KV fit in this machine? The pools every rank maps, the part of them a run
// touches, and the memory available to this process (MemAvailable, lowered by a cgroup limit).
// Pure arithmetic over config::routing_plan, plus reading /proc and /sys. No CAF types.
#include <cstdint>
#include <string>

#include "command/simulation.hpp"

namespace kvflow::command {

// Bytes of one aux slot counted per decode pool slot (an upper bound of the aux record).
constexpr std::uint64_t aux_slot_bytes = 64;

// Bytes of the simulated engines' KV pools a run can touch (the pools are sparse mappings: only
// touched pages take memory; in_flight = min(concurrency, requests), max_pages = pages of a
// prompt_max-token request, each page of every layer a rank holds: buffers_per_layer KV items
// plus, for MLA models with state, a state page): in_flight * max_pages pages on every rank that holds KV, i.e.
// every decode rank and every authoritative prefill rank (a non-authoritative one never fills
// its pages), plus the decode ranks' aux slots. Conservative: every rank is counted as if every
// request in flight were its own.
std::uint64_t simulation_touched_bytes(const simulation_options& o);

// Bytes this process can still allocate: MemAvailable of `root`/proc/meminfo, lowered to what
// the cgroup (v2 memory.max - memory.current, or v1 memory.limit_in_bytes - usage_in_bytes,
// reclaimable inactive file cache not counted as used) of this process and of its ancestors
// leaves. UINT64_MAX when nothing can be read. `root` prefixes every path (tests use a fake tree).
std::uint64_t available_memory_bytes(const std::string& root);
inline std::uint64_t available_memory_bytes() { return available_memory_bytes(""); }

// Throws config_error "needs N GiB of KV pools, M GiB available; lower --concurrency or
// --prompt-tokens" when simulation_touched_bytes(o) > available.
void check_pool_memory(const simulation_options& o, std::uint64_t available);

}  // namespace kvflow::command
