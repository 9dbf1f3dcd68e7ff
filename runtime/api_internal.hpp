#pragma once
// What stands behind the public API (include/kvflow/kvflow.hpp): the node's actor system,
// transport, registry and agreement groups, and a rank's actor and agreement client. Internal to
// runtime/ and its tests (kvflow's own engines use runtime/engine_host.hpp); never installed.
#include <caf/all.hpp>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "actors/agreed_ring.hpp"
#include "actors/rank.hpp"
#include "actors/shm_agreement.hpp"
#include "actors/step_board.hpp"
#include "config/routing.hpp"
#include "config/status.hpp"
#include "config/tunables.hpp"
#include "kvflow/kvflow.hpp"
#include "runtime/engine_host.hpp"
#include "runtime/link_guard.hpp"
#include "transport/transport.hpp"
#include "transport/staged_transport.hpp"
#include "transport/transport_set.hpp"

namespace kvflow::runtime {

struct network_node;  // runtime/api_network.cpp: a node's registrations, anchor and keeper

// The engine's buffers in kvflow's own types; a CUDA buffer must be device memory of the device
// it names (and needs a build with CUDA).
expected<std::vector<buffer_spec>> to_buffer_specs(const memory_desc& m);

// What a rank needs from the process it lives in.
struct rank_context {
  caf::actor_system& sys;
  std::shared_ptr<const config::routing_plan> plan;
  config::tunables tunables;
  std::shared_ptr<transport::transport> transport;
  caf::actor registry;
  dst_filter drop_dst;
  std::shared_ptr<std::atomic<bool>> stopped;
};

// Where a rank reports its steps and reads the agreed rounds.
struct agreement_link {
  int group = 0;
  caf::actor parent;  // shard supervisor (prefill) or TP supervisor (decode)
  int child = 0;      // index among the parent's children
  std::shared_ptr<step_board> board;  // in the parent's process; null: report by message
  std::shared_ptr<agreed_ring> ring;  // filled by the TP supervisor here, or by the rank
  caf::actor root;                    // the group's TP supervisor (a networked rank attaches to it)
  // The group's segment, where this rank posts and reads rounds (a networked rank of the
  // leader's host, when the group agrees through shared memory); null: by board or message.
  std::shared_ptr<shm_segment> shm;
};

// Spawns a rank over the engine's memory (checked against the plan), linked into its group.
// The one place a rank is made: in-process nodes and rank processes both call it.
// `owner` (may be null) keeps the memory alive as long as the rank and its pushes need it.
expected<std::shared_ptr<rank::impl>> make_rank(const rank_context& ctx, bool prefill, int r,
                                                const memory_desc& memory, const agreement_link& link,
                                                std::shared_ptr<const void> owner = {});

std::size_t ring_rounds(const config::tunables& t);

// The CUDA device of a rank's buffers (-1: host memory only), each CUDA buffer checked to be
// device memory of the device it names.
expected<int> gpu_of(const memory_desc& m);
// Makes the node reach a rank's GPU memory (its first GPU rank brings CUDA IPC); one device per
// node.
error reach_gpu(node::impl& n, const memory_desc& memory, bool receiving);

// Where rank `r` sits in its agreement group: the group, how many ranks it has, and the rank's
// index among all of them (its child index under a root whose children are every rank).
struct group_place {
  int group = 0, ranks = 0, flat = 0;
};
group_place place_in_group(const config::cluster_config& c, bool prefill, int r);

// A segment for group `group` of `ranks` ranks to agree through (KVFLOW_AGREEMENT_VIA=1); null,
// with a warning, where /dev/shm cannot take it (the group then uses the tree of supervisors).
std::shared_ptr<shm_segment> make_segment(node::impl& n, int group, int ranks);

// A networked node (runtime/api_network.cpp). start_network joins the registry at
// options.bootstrap, or publishes this node's registry at options.listen; link_network finds or
// spawns the supervisors rank `r` leads or reports to (through the registry: the group may span
// processes); registered_network remembers the rank's registrations (for a restarted registry) and
// attaches it to its group's root.
status start_network(node::impl& n, const node_options& options);
expected<agreement_link> link_network(node::impl& n, bool prefill, int r);
void registered_network(node::impl& n, bool prefill, int r, const caf::actor& rank, const agreement_link& link);
// Lets go of the actors a networked node holds (node::stop, after their exit messages).
void stop_network(node::impl& n);
// The registry (a networked node's keeper replaces it when the bootstrap restarts).
caf::actor current_registry(node::impl& n);
std::string network_address(node::impl& n);  // HOST:PORT peers reach this node at
// The actor that keeps a networked node's registrations (what set_node_engine goes through).
caf::actor node_keeper(node& n);

}  // namespace kvflow::runtime

namespace kvflow {

// One agreement group in this process: its TP supervisor, shard supervisors and boards.
struct local_group {
  caf::actor root;
  std::shared_ptr<step_board> root_board;  // decode: the ranks post here
  std::map<int, caf::actor> shards;        // prefill: by shard index
  std::map<int, std::shared_ptr<step_board>> shard_boards;
  std::shared_ptr<agreed_ring> ring;
  std::shared_ptr<shm_segment> shm;  // set: the group agrees through it (the root's merge thread)
};

struct node::impl {
  config::cluster_config cluster;
  std::shared_ptr<const config::routing_plan> plan;
  config::tunables tunables;
  runtime::internal_options internal;
  std::unique_ptr<caf::actor_system_config> cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<runtime::link_guard> links;  // a networked node's guarded middleman
  std::shared_ptr<transport::transport> transport;
  // The node's own transports (null when a test gave the node one): CUDA IPC joins them with the
  // first rank whose memory is on a GPU.
  std::shared_ptr<transport::transport_set> transports;
  // Of those, the staged path (null unless a GPU rank came and KVFLOW_GPU_STAGED allows it).
  std::shared_ptr<transport::staged_transport> staged;
  int gpu = -1;  // the CUDA device of this node's GPU ranks (one per node)
  caf::actor registry;
  std::mutex mutex;  // guards groups, ranks
  std::map<int, local_group> groups;
  // What this node spawned, stopped in this order: prefill ranks, decode ranks, the rest.
  std::vector<caf::actor> prefill_actors, decode_actors, infrastructure;
  std::map<std::pair<bool, int>, bool> taken;  // (prefill?, rank) already added
  std::shared_ptr<std::atomic<bool>> stopped = std::make_shared<std::atomic<bool>>(false);
  std::shared_ptr<runtime::network_node> net;  // null: one process

  caf::actor_system& system() { return *sys; }
  local_group& group(int id);
};

struct rank::impl {
  bool prefill = true;
  int rank = 0;
  int group = 0;
  caf::actor actor;
  caf::actor parent;
  int child = 0;
  std::shared_ptr<step_board> board;  // null: post by message (or into shm)
  std::shared_ptr<agreed_ring> ring;
  std::shared_ptr<shm_segment> shm;   // posts and rounds in the group's segment
  std::shared_ptr<rank_shared> shared;
  std::shared_ptr<const rank_memory> memory;
  std::shared_ptr<const config::routing_plan> plan;
  std::shared_ptr<std::atomic<bool>> stopped;
  std::uint64_t lag = 1;
  std::chrono::microseconds default_wait{100000};
  // How long a request the group finished without this rank refuses this rank's late create.
  std::chrono::milliseconds late_create_window{300000};
  bool authoritative = true;  // prefill: some decode rank reads it; decode: expects aux
  std::shared_ptr<cuda::fence_pool> fences;  // prefill with GPU memory: ready fences captured here

  // The agreement client, touched only by the thread that polls.
  std::uint64_t posted = 0;
  std::uint64_t snapshot_version = ~0ULL;
  std::uint64_t posted_version = ~0ULL;  // the snapshot's version at the last post into shm
  step_states snapshot;
  std::uint64_t view_round = 0;
  agreed_view shm_view;  // the last round read from the segment
  std::vector<room_poll> view;
  step_states previous;  // the last round handed out (to act on what changed only)
};

}  // namespace kvflow

namespace kvflow {
struct internal_access {
  static node::impl& of(node& n) { return *n.impl_; }
  static rank::impl& of(rank& r) { return *r.impl_; }
  static std::shared_ptr<node> make(std::unique_ptr<node::impl> p) { return std::shared_ptr<node>(new node(std::move(p))); }
};
}  // namespace kvflow

namespace kvflow::runtime {
inline node::impl& internals(node& n) { return internal_access::of(n); }
inline rank::impl& internals(rank& r) { return internal_access::of(r); }
}  // namespace kvflow::runtime
