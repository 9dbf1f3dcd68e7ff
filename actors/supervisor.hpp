#pragma once
// Shard and TP supervisors: nodes of the per-step agreement tree (semantics.md section 3).
// A shard supervisor's children are the CP ranks of one attention-TP shard; a TP supervisor's
// children are shard supervisors (prefill) or ranks (decode), and it hands the agreed round back
// to every rank of the group.
#include <caf/fwd.hpp>
#include <cstdint>

namespace kvflow {

struct supervisor_args {
  int children = 1;
  int group = 0;        // id of the agreement group, echoed in agreed rounds
  bool root = false;    // TP supervisor: hands rounds back; else forwards to the parent
  int index_in_parent = 0;
  int ranks = 0;        // root: ranks that attach; rounds are handed back once all attached
};

// Spawns a supervisor. `parent` is the TP supervisor for a shard supervisor, unused for a root.
caf::actor spawn_supervisor(caf::actor_system& sys, const supervisor_args& args,
                            const caf::actor& parent);

}  // namespace kvflow
