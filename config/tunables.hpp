#pragma once
// Every runtime tunable, declared once: name, environment variable, default, doc.
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace kvflow::config {

// X(member, env var, default, doc)
#define KVFLOW_TUNABLES(X)                                                                       \
  X(bootstrap_timeout_ms, "KVFLOW_BOOTSTRAP_TIMEOUT_MS", 300000,                                 \
    "prefill: fail a room whose destinations did not all arrive in this time; every rank: fail " \
    "a room its group has not agreed past Bootstrapping this long after it came (SGLang: 300 s)") \
  X(waiting_timeout_ms, "KVFLOW_WAITING_TIMEOUT_MS", 300000,                                     \
    "decode: fail (and abort on every prefill peer) a room not done this long after sending "    \
    "its destinations (SGLang: 300 s)")                                                          \
  X(heartbeat_interval_ms, "KVFLOW_HEARTBEAT_INTERVAL_MS", 1000,                                 \
    "rank processes: CAF middleman heartbeat between nodes (in one process ranks monitor "     \
    "each other's actors and see a death at once)")                                              \
  X(heartbeat_misses, "KVFLOW_HEARTBEAT_MISSES", 3,                                              \
    "rank processes: a node silent for this many heartbeat intervals counts as down (a "       \
    "frozen or unreachable peer is detected within interval x misses)")                          \
  X(connect_timeout_ms, "KVFLOW_CONNECT_TIMEOUT_MS", 30000,                                      \
    "rank processes: how long to keep trying to reach the bootstrap and parent supervisors "   \
    "at start-up before giving up (exit 1)")                                                     \
  X(ucx_flush_timeout_ms, "KVFLOW_UCX_FLUSH_TIMEOUT_MS", 30000,                                  \
    "ucx transport: a push not flushed in this time fails and its peer counts as unreachable "   \
    "(UCX alone does not notice a frozen peer; an event-driven worker runs no keepalive)")       \
  X(ucx_probe_interval_ms, "KVFLOW_UCX_PROBE_INTERVAL_MS", 1000,                                 \
    "ucx transport: an unreachable peer is probed this long after it failed, then at doubling "  \
    "intervals; once it answers it serves pushes again (SGLang 0.5.23: 30 s doubling to 300 s)") \
  X(ucx_probe_interval_max_ms, "KVFLOW_UCX_PROBE_INTERVAL_MAX_MS", 30000,                        \
    "ucx transport: the longest interval between two probes of an unreachable peer")            \
  X(ucx_tcp, "KVFLOW_UCX_TCP", 1,                                                               \
    "ucx: 1 UCX's tcp transport on loopback only (peers of this host); 2 on every interface, "  \
    "for other hosts without RDMA. UCX's tcp listener takes anyone who reaches its port and "   \
    "writes where the sender says: set 2 only where nobody but the cluster reaches that network") \
  X(step_interval_us, "KVFLOW_STEP_INTERVAL_US", 2000,                                           \
    "simulated engines: pause between scheduler steps while requests are in flight (a real "    \
    "step is milliseconds; shorter ones only add agreement traffic, 20x longer when idle)")     \
  X(agreement_lag, "KVFLOW_AGREEMENT_LAG", 1,                                                    \
    "poll(step k) answers the agreed round k - L: L steps for a round to complete before a "    \
    "scheduler needs it")                                                                        \
  X(poll_wait_us, "KVFLOW_POLL_WAIT_US", 100000,                                                 \
    "longest a poll waits for a round that is not complete yet (counted as a stall; then it "   \
    "answers timeout, never another round)")                                                     \
  X(agreement_via, "KVFLOW_AGREEMENT_VIA", 1,                                                    \
    "1: ranks of one host agree through shared memory, in one process or several (a group's "  \
    "leader makes a segment; ranks elsewhere reach it by message); 2: every rank through the "  \
    "tree of supervisors, by message (the simulator's deterministic runs always do)")           \
  X(agreement_shm_rooms, "KVFLOW_AGREEMENT_SHM_ROOMS", 4096,                                     \
    "rooms one rank's step post holds in a shared-memory agreement (its segment is allocated "  \
    "at once: 24 B x rooms x (4 x ranks + 32)); a rank holding more refuses new rooms")          \
  X(max_rooms_per_rank, "KVFLOW_MAX_ROOMS_PER_RANK", 65536,                                      \
    "live rooms one rank accepts; more are refused with an error (bounds the state store)")      \
  X(failure_memory_ms, "KVFLOW_FAILURE_MEMORY_MS", 600000,                                       \
    "how long a request that ended is remembered. Prefill: one that failed, or that a decode "  \
    "rank aborted before it arrived, to refuse its late destinations and fail it when it comes " \
    "(at most max_rooms_per_rank of them); every rank: why a request it cleared failed (at "    \
    "most 4096); an agreement group's root: the agreed end of a request no rank holds any more, " \
    "so that a late rank's create of it ends at once (at most 65536, never less than the "      \
    "bootstrap timeout). Keep it above the bootstrap timeout")                                    \
  X(max_pages_per_request, "KVFLOW_MAX_PAGES_PER_REQUEST", 1 << 20,                              \
    "largest page list a destination or chunk message may carry; longer ones fail the room")    \
  X(link_max_frame_bytes, "KVFLOW_LINK_MAX_FRAME_BYTES", 64 << 20,                               \
    "node links: a frame whose header claims more payload than this closes its link before "    \
    "anything is allocated for it")                                                              \
  X(link_auth_timeout_ms, "KVFLOW_LINK_AUTH_TIMEOUT_MS", 10000,                                  \
    "node links: an accepted connection that has not proved the cluster token in this time is " \
    "closed")                                                                                    \
  X(link_max_pending, "KVFLOW_LINK_MAX_PENDING", 64,                                             \
    "node links: accepted connections still proving themselves at once; more are closed on "    \
    "accept (bounds what unauthenticated peers can hold)")                                                    \
  X(gpu_staged, "KVFLOW_GPU_STAGED", 1,                                                          \
    "GPU KV between processes of one host: 1 through CUDA IPC, else through the staged path "  \
    "(a pinned ring both map); 2 the staged path first (where CUDA IPC is not allowed between " \
    "them); 3 never staged (no ring is pinned). With 1 or 2, GPU KV to other hosts goes "      \
    "through the ring too, a UCX host put as the middle hop (before UCX's own GPU puts: set 3 " \
    "where the site UCX has GPUDirect RDMA)")                                                    \
  X(staged_lanes, "KVFLOW_STAGED_LANES", 8,                                                      \
    "staged path: sending processes one GPU rank's ring takes at once (a node's ring is made "   \
    "at its first GPU registration: lanes x slots x slot bytes of pinned host memory)")         \
  X(staged_slots, "KVFLOW_STAGED_SLOTS", 4,                                                      \
    "staged path: slots per lane, a sender's data in flight (its credits)")                     \
  X(staged_slot_bytes, "KVFLOW_STAGED_SLOT_BYTES", 16 << 20,                                     \
    "staged path: bytes of one slot (a multiple of 64 KiB); each slot is one copy out of the "  \
    "sender's pages and one into the receiver's (16 MiB reached 0.80x of pinned device-to-"     \
    "host in 4 of 5 GPU runs, 4 MiB 0.67-0.70x: docs/benchmarks.md; the default ring pins "     \
    "512 MiB)")                                                                                   \
  X(staged_slot_timeout_ms, "KVFLOW_STAGED_SLOT_TIMEOUT_MS", 30000,                              \
    "staged path: a slot the receiver has not taken in this time fails its push and the peer "  \
    "(a frozen receiver; a dead one fails them at once)")

struct tunables {
#define KVFLOW_TUNABLE_MEMBER(name, env, def, doc) std::int64_t name = def;
  KVFLOW_TUNABLES(KVFLOW_TUNABLE_MEMBER)
#undef KVFLOW_TUNABLE_MEMBER
};

// Reads every KVFLOW_* variable through `getenv` (defaults to ::getenv). A malformed or
// non-positive value throws config_error naming the variable.
using env_lookup = std::function<const char*(const char*)>;
tunables load_tunables(const env_lookup& getenv = {});

// Every tunable as (variable, value): what a launcher hands the processes it starts.
std::vector<std::pair<std::string, std::string>> to_env(const tunables& t);

// One line per tunable: variable, default, doc.
std::string tunables_help();

}  // namespace kvflow::config
