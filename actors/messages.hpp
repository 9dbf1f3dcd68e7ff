#pragma once
// The typed messages between ranks, supervisors, the bootstrap registry and the scheduler.
// Small records; every wire message carries `version` so two builds can tell they disagree.
#include <caf/all.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "actors/agreement.hpp"
#include "actors/rank_memory.hpp"
#include "actors/block_plan.hpp"
#include "actors/bootstrap_registry.hpp"
#include "actors/handshake.hpp"
#include "transport/transport.hpp"

namespace kvflow::msg {

// 2: registrations carry the transport endpoint and regions; the registry knows nodes and
// supervisors (ranks in their own processes).
// 3: engine-owned memory (a registration lists every buffer), states carry `released`, one
// agreement group per dp group across PP stages.
// 5: each side's kv_handshake in its own registration (register_rank, kv_registration).
// 6: a decode rank's endpoint and region keys describe every transport of its node (the
// transport set: CUDA IPC beside UCX).
constexpr std::uint32_t wire_version = 6;

using start_atom = caf::atom_constant<caf::atom("start")>;

// ---- agreement ---------------------------------------------------------------------------
struct step_report {
  std::uint64_t round = 0;
  std::int32_t child = 0;  // index of the sender among its parent's children
  step_states states;
};
struct agreed_round {
  std::uint64_t round = 0;
  std::int32_t group = 0;
  step_states states;
};
struct attach_child {  // parent learns (and monitors) child `index`
  std::int32_t index = 0;
  caf::actor child;
};
struct attach_rank {  // root learns a rank it hands agreed rounds back to
  caf::actor rank;
};
struct board_round {  // the post that completed `round` on a supervisor's step_board
  std::uint64_t round = 0;
};
struct room_timeout {  // bootstrap (prefill) or waiting (decode) timer of one request
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
};
struct agreement_expiry {  // a request its group has not agreed past Bootstrapping yet
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
};
struct topology_retry {};  // decode: ask the registry for the topology again
struct leave_expiry {};    // decode: stopping, it waited long enough for its peers' writes to drain
struct failure_expiry {};  // prefill: its remembered failures' oldest age ran out: forget what is due
struct early_expiry {  // destinations buffered for a request this rank never saw: give up on them
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
};
struct push_done {  // a transport push of a room's chunk finished
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::int32_t decode_rank = 0;
  bool ok = true;
  std::string reason;
  std::uint64_t bytes = 0;
  double seconds = 0;  // from hand-over to completion
};

// ---- bootstrap registry ------------------------------------------------------------------
using rank_key = registry_key;
struct register_rank {
  std::uint32_t version = wire_version;
  rank_key key;
  std::string name;  // who registers ("prefill rank 3"), named in collision errors
  caf::actor rank;
  kv_handshake shape;  // as this prefill rank was configured
};
struct registration_reply {
  bool ok = false;
  std::uint64_t generation = 0;
  std::string reason;
};
struct register_decode {  // decode ranks are known to the registry so prefill can watch them
  std::int32_t rank = 0;
  caf::actor handle;
};
struct lookup_decode {
  std::int32_t rank = 0;
};
struct decode_entry {
  std::int32_t rank = 0;
  caf::actor handle;  // invalid when that rank never registered
  bool down = false;  // the registry saw it go down (a proxy of a dead node may never say so)
};
// Rank processes: where each node listens (so peers connect directly instead of through the
// bootstrap node) and where each agreement-tree supervisor lives.
struct register_node {
  std::uint32_t version = wire_version;
  std::string name;  // "prefill 3", "decode 0", "launcher"
  std::string host;
  std::uint16_t port = 0;
  bool meshed = false;  // it has connected directly to every node it dials (see rank_process)
  caf::actor engine;    // the process's serving engine (what a launcher hands requests to)
};
struct node_entry {
  std::string name;
  std::string host;
  std::uint16_t port = 0;
  bool meshed = false;
  caf::actor engine;
};
struct node_query {};
struct node_table {
  std::vector<node_entry> nodes;
};
struct register_supervisor {
  std::int32_t group = 0;  // agreement group id
  std::int32_t index = -1; // -1: the group's TP supervisor (root); else the shard's TP index
  caf::actor handle;
  // Root only: the group's shared-memory segment (actors/shm_agreement.hpp), where ranks of its
  // host post and read rounds; empty: the group agrees through the tree of supervisors.
  std::string shared_memory;
};
struct lookup_supervisor {
  std::int32_t group = 0;
  std::int32_t index = -1;
};
struct supervisor_entry {
  std::int32_t group = 0;
  std::int32_t index = -1;
  caf::actor handle;  // invalid until registered
  std::string shared_memory;
};
struct set_registry {  // the bootstrap registry restarted: ranks use the new one from now on
  caf::actor registry;
};
struct topology_query {
  std::uint32_t version = wire_version;
};
struct registry_entry {
  rank_key key;
  std::string name;
  caf::actor rank;
  std::uint64_t generation = 0;
  kv_handshake shape;  // what that prefill rank registered
};
struct topology_reply {
  std::uint32_t version = wire_version;
  std::int32_t tp = 0, cp = 0, pp = 0, dp = 0;  // the prefill side the registry's table holds
  std::vector<registry_entry> entries;
};

// ---- decode -> prefill ----------------------------------------------------------------------
struct kv_registration {  // once per connection
  std::uint32_t version = wire_version;
  std::int32_t decode_rank = 0;
  std::int32_t dp = 0, pp = 0, tp = 0, tp_size = 0;
  remote_pool pool;
  caf::actor decode;
  std::string endpoint;                          // transport endpoint (UCX worker address)
  std::vector<transport::region_desc> regions;   // KV, aux, state (ids as in `pool`)
  kv_handshake shape;                            // as this decode rank was configured
};
struct dst_info {
  std::uint32_t version = wire_version;
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::int32_t decode_rank = 0;
  std::vector<std::int32_t> dst_pages;
  std::int32_t aux_slot = 0;
  std::vector<std::int32_t> state_indices;  // e.g. DSv3.2 indexer-cache pages
  std::int32_t prefix_pages = 0;           // already cached on decode: not sent
};
struct abort_room {
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::int32_t decode_rank = 0;
  std::string reason;
};

// ---- prefill -> decode ----------------------------------------------------------------------
struct kv_status {
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::int32_t prefill_rank = 0;
  std::uint8_t state = 0;
  std::string reason;
};
struct abort_ack {
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::int32_t prefill_rank = 0;
};

// ---- engine -> rank (the public API's calls, in the rank's own process) ----------------------
struct api_create {
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::int32_t other_dp = 0;  // prefill: the decode dp group; decode: the prefill dp group
};
struct api_init {  // prefill
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::int32_t pages = 0;
  std::int32_t aux_row = 0;
};
struct api_send {  // prefill: a chunk
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::vector<std::int32_t> pages;
  bool is_last = false;
  std::vector<std::int32_t> state_pages;
  // The rank's own CUDA event (cuda::fence_pool) after the engine's ready fence; 0: none.
  std::uint64_t ready_fence = 0;
};
struct api_destinations {  // decode
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::vector<std::int32_t> pages;
  std::int32_t aux_slot = 0;
  std::vector<std::int32_t> state_pages;
  std::int32_t prefix_pages = 0;
};
struct api_abort {
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::string reason;
};
// The API refused a create (its room is held by another live request, or the rank cannot take
// it): peers that hear of the request from the other side are told now, not at a timeout.
// Never sent for a create of the very (room, incarnation) that is live: it would hit that one.
struct api_refused {
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::int32_t other_dp = 0;
  std::string reason;
};
// A poll saw agreed rounds this rank must act on: rooms the group failed (fail them here too)
// and rooms the group released (the engine side cleared them; forget them).
struct api_apply {
  step_states fail;
  step_states forget;
};

// ---- inspectors (serialization, to_string) ------------------------------------------------
template <class I>
typename I::result_type inspect(I& f, step_report& x) {
  return f(caf::meta::type_name("step_report"), x.round, x.child, x.states);
}
template <class I>
typename I::result_type inspect(I& f, agreed_round& x) {
  return f(caf::meta::type_name("agreed_round"), x.round, x.group, x.states);
}
template <class I>
typename I::result_type inspect(I& f, attach_child& x) {
  return f(caf::meta::type_name("attach_child"), x.index, x.child);
}
template <class I>
typename I::result_type inspect(I& f, attach_rank& x) {
  return f(caf::meta::type_name("attach_rank"), x.rank);
}
template <class I>
typename I::result_type inspect(I& f, board_round& x) {
  return f(caf::meta::type_name("board_round"), x.round);
}
template <class I>
typename I::result_type inspect(I& f, room_timeout& x) {
  return f(caf::meta::type_name("room_timeout"), x.room, x.incarnation);
}
template <class I>
typename I::result_type inspect(I& f, agreement_expiry& x) {
  return f(caf::meta::type_name("agreement_expiry"), x.room, x.incarnation);
}
template <class I>
typename I::result_type inspect(I& f, leave_expiry&) {
  return f(caf::meta::type_name("leave_expiry"));
}
template <class I>
typename I::result_type inspect(I& f, topology_retry&) {
  return f(caf::meta::type_name("topology_retry"));
}
template <class I>
typename I::result_type inspect(I& f, failure_expiry&) {
  return f(caf::meta::type_name("failure_expiry"));
}
template <class I>
typename I::result_type inspect(I& f, early_expiry& x) {
  return f(caf::meta::type_name("early_expiry"), x.room, x.incarnation);
}
template <class I>
typename I::result_type inspect(I& f, push_done& x) {
  return f(caf::meta::type_name("push_done"), x.room, x.incarnation, x.decode_rank, x.ok, x.reason, x.bytes,
           x.seconds);
}
template <class I>
typename I::result_type inspect(I& f, register_rank& x) {
  return f(caf::meta::type_name("register_rank"), x.version, x.key, x.name, x.rank, x.shape);
}
template <class I>
typename I::result_type inspect(I& f, registration_reply& x) {
  return f(caf::meta::type_name("registration_reply"), x.ok, x.generation, x.reason);
}
template <class I>
typename I::result_type inspect(I& f, register_decode& x) {
  return f(caf::meta::type_name("register_decode"), x.rank, x.handle);
}
template <class I>
typename I::result_type inspect(I& f, lookup_decode& x) {
  return f(caf::meta::type_name("lookup_decode"), x.rank);
}
template <class I>
typename I::result_type inspect(I& f, decode_entry& x) {
  return f(caf::meta::type_name("decode_entry"), x.rank, x.handle, x.down);
}
template <class I>
typename I::result_type inspect(I& f, register_node& x) {
  return f(caf::meta::type_name("register_node"), x.version, x.name, x.host, x.port, x.meshed, x.engine);
}
template <class I>
typename I::result_type inspect(I& f, node_entry& x) {
  return f(caf::meta::type_name("node_entry"), x.name, x.host, x.port, x.meshed, x.engine);
}
template <class I>
typename I::result_type inspect(I& f, node_query&) {
  return f(caf::meta::type_name("node_query"));
}
template <class I>
typename I::result_type inspect(I& f, node_table& x) {
  return f(caf::meta::type_name("node_table"), x.nodes);
}
template <class I>
typename I::result_type inspect(I& f, register_supervisor& x) {
  return f(caf::meta::type_name("register_supervisor"), x.group, x.index, x.handle, x.shared_memory);
}
template <class I>
typename I::result_type inspect(I& f, lookup_supervisor& x) {
  return f(caf::meta::type_name("lookup_supervisor"), x.group, x.index);
}
template <class I>
typename I::result_type inspect(I& f, supervisor_entry& x) {
  return f(caf::meta::type_name("supervisor_entry"), x.group, x.index, x.handle, x.shared_memory);
}
template <class I>
typename I::result_type inspect(I& f, set_registry& x) {
  return f(caf::meta::type_name("set_registry"), x.registry);
}
template <class I>
typename I::result_type inspect(I& f, topology_query& x) {
  return f(caf::meta::type_name("topology_query"), x.version);
}
template <class I>
typename I::result_type inspect(I& f, registry_entry& x) {
  return f(caf::meta::type_name("registry_entry"), x.key, x.name, x.rank, x.generation, x.shape);
}
template <class I>
typename I::result_type inspect(I& f, topology_reply& x) {
  return f(caf::meta::type_name("topology_reply"), x.version, x.tp, x.cp, x.pp, x.dp, x.entries);
}
template <class I>
typename I::result_type inspect(I& f, kv_registration& x) {
  return f(caf::meta::type_name("kv_registration"), x.version, x.decode_rank, x.dp, x.pp, x.tp,
           x.tp_size, x.pool, x.decode, x.endpoint, x.regions, x.shape);
}
template <class I>
typename I::result_type inspect(I& f, dst_info& x) {
  return f(caf::meta::type_name("dst_info"), x.version, x.room, x.incarnation, x.decode_rank,
           x.dst_pages, x.aux_slot, x.state_indices, x.prefix_pages);
}
template <class I>
typename I::result_type inspect(I& f, abort_room& x) {
  return f(caf::meta::type_name("abort_room"), x.room, x.incarnation, x.decode_rank, x.reason);
}
template <class I>
typename I::result_type inspect(I& f, kv_status& x) {
  return f(caf::meta::type_name("kv_status"), x.room, x.incarnation, x.prefill_rank, x.state,
           x.reason);
}
template <class I>
typename I::result_type inspect(I& f, abort_ack& x) {
  return f(caf::meta::type_name("abort_ack"), x.room, x.incarnation, x.prefill_rank);
}
template <class I>
typename I::result_type inspect(I& f, api_create& x) {
  return f(caf::meta::type_name("api_create"), x.room, x.incarnation, x.other_dp);
}
template <class I>
typename I::result_type inspect(I& f, api_init& x) {
  return f(caf::meta::type_name("api_init"), x.room, x.incarnation, x.pages, x.aux_row);
}
template <class I>
typename I::result_type inspect(I& f, api_send& x) {
  return f(caf::meta::type_name("api_send"), x.room, x.incarnation, x.pages, x.is_last, x.state_pages,
           x.ready_fence);
}
template <class I>
typename I::result_type inspect(I& f, api_destinations& x) {
  return f(caf::meta::type_name("api_destinations"), x.room, x.incarnation, x.pages, x.aux_slot,
           x.state_pages, x.prefix_pages);
}
template <class I>
typename I::result_type inspect(I& f, api_abort& x) {
  return f(caf::meta::type_name("api_abort"), x.room, x.incarnation, x.reason);
}
template <class I>
typename I::result_type inspect(I& f, api_refused& x) {
  return f(caf::meta::type_name("api_refused"), x.room, x.incarnation, x.other_dp, x.reason);
}
template <class I>
typename I::result_type inspect(I& f, api_apply& x) {
  return f(caf::meta::type_name("api_apply"), x.fail, x.forget);
}
// Registers every message type with an actor system config (needed across processes).
void add_message_types(caf::actor_system_config& cfg);

}  // namespace kvflow::msg

namespace kvflow {
template <class I>
typename I::result_type inspect(I& f, kv_handshake& x) {
  return f(caf::meta::type_name("kv_handshake"), x.page_size, x.dtype, x.layout, x.cp_send_all, x.prefill_tp,
           x.prefill_cp, x.prefill_pp, x.prefill_dp, x.decode_tp, x.decode_pp, x.decode_dp);
}
template <class I>
typename I::result_type inspect(I& f, registry_key& x) {
  return f(caf::meta::type_name("rank_key"), x.dp_group, x.cp, x.tp, x.pp);
}
template <class I>
typename I::result_type inspect(I& f, room_state& x) {
  return f(caf::meta::type_name("room_state"), x.room, x.incarnation, x.state, x.released);
}
template <class I>
typename I::result_type inspect(I& f, remote_buffer& x) {
  return f(caf::meta::type_name("remote_buffer"), x.region, x.offset, x.bytes, x.page_bytes);
}
template <class I>
typename I::result_type inspect(I& f, remote_pool& x) {
  return f(caf::meta::type_name("remote_pool"), x.layer_begin, x.layer_count, x.buffers_per_layer,
           x.pages, x.item_bytes, x.page_size, x.local_heads, x.head_bytes, x.kv, x.aux, x.aux_rows,
           x.state, x.state_pages, x.state_item_bytes, x.receipts);
}
}  // namespace kvflow

namespace kvflow::transport {
template <class I>
typename I::result_type inspect(I& f, region_desc& x) {
  return f(caf::meta::type_name("region_desc"), x.id, x.size, x.address, x.remote_key);
}
}  // namespace kvflow::transport
