#pragma once
// Shard and TP supervisors: nodes of the per-step agreement tree (semantics.md section 3).
// A shard supervisor's children are the CP ranks of one attention-TP shard; a TP supervisor's
// children are shard supervisors (prefill) or ranks (decode). The TP supervisor publishes each
// agreed round on the group's agreed_ring (in-process ranks and schedulers read it there) and
// sends it to ranks attached from other processes.
//
// Children report a step either by posting on the supervisor's step_board (in-process: the
// post that completes a round wakes the supervisor with one msg::board_round) or with a
// msg::step_report each (remote). A dead child fails every room of its group from then on.
//
// A root given a shared-memory segment (actors/shm_agreement.hpp) merges nothing itself: its
// children are every rank of the group, a combiner thread merges them from the segment, and the
// root feeds it the reports of ranks that post by message, tells it who died, and sends its
// rounds to the ranks attached by message.
#include <caf/fwd.hpp>
#include <chrono>
#include <cstdint>
#include <memory>

#include "actors/agreement.hpp"

namespace kvflow {

class step_board;
class agreed_ring;
class shm_segment;

struct supervisor_args {
  int children = 1;
  int group = 0;        // id of the agreement group, echoed in agreed rounds
  bool root = false;    // TP supervisor: publishes rounds; else forwards to the parent
  int index_in_parent = 0;
  int ranks = 0;        // root: ranks attached by message; rounds are held until all attached
  std::shared_ptr<step_board> board;      // where in-process children post (may be null)
  std::shared_ptr<agreed_ring> publish;  // root: where agreed rounds go (may be null)
  std::shared_ptr<shm_segment> shared_memory;  // root: merge through this segment (may be null)
  // Root: how long its agreed table remembers a request that ended (tombstone_age(tunables)).
  std::chrono::milliseconds tombstone_age = kvflow::tombstone_age(config::tunables{});
};

// Spawns a supervisor. `parent` is the TP supervisor for a shard supervisor, unused for a root.
caf::actor spawn_supervisor(caf::actor_system& sys, const supervisor_args& args,
                            const caf::actor& parent);

}  // namespace kvflow
