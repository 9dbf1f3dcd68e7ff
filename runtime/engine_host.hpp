#pragma once
// What kvflow's own engines get beyond the public API (include/kvflow/kvflow.hpp). The `kvflow`
// command (simulate, launch, bootstrap, rank) and the benchmarks run their router and simulated
// engines as actors beside the node's, on the node's actor system (the simulator puts a whole
// cluster on one deterministic scheduler), and inject faults through seams no serving engine
// needs. CAF types are fine here; nothing from actors/ is: a client of this header and of the
// public API is a client of the library, not of its actors. Never installed.
#include <caf/actor.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "config/link_security.hpp"
#include "config/routing.hpp"
#include "config/tunables.hpp"
#include "kvflow/kvflow.hpp"
#include "transport/transport.hpp"

namespace kvflow::runtime {

// Options only kvflow's own engines set.
struct internal_options {
  // Run the node's actors on CAF's deterministic test scheduler (the simulator drives it).
  bool deterministic = false;
  std::shared_ptr<transport::transport> transport;  // instead of the one options.transport names
  // The drop-dst-info fault seam: true drops this destination message of (room, incarnation)
  // on its way from a decode rank to its prefill peers.
  std::function<bool(std::uint64_t room, std::uint64_t incarnation)> drop_dst;
  std::optional<config::tunables> tunables;  // instead of options.tunables
  // Resolved node-link security (the command read its flags and the environment), instead of
  // options.auth_token ... allow_insecure_listen.
  std::optional<config::link_security> links;
  // A networked node: its name in the registry's node table (default "node HOST:PORT"), the
  // wire version it claims (0: this build's; a test claims another), and how many nodes the
  // cluster has (0: unknown; else it reports itself meshed only once it saw them all).
  std::string node_name;
  std::uint32_t wire_version = 0;
  int expected_nodes = 0;
  // Registers the engine's own message types with the node's actor system (they cross
  // processes beside kvflow's).
  std::function<void(caf::actor_system_config&)> add_message_types;
};

expected<std::shared_ptr<node>> start_node(const topology& t, node_options options, internal_options internal);

// Parses the public topology into kvflow's own (errors name the field), and back.
expected<config::cluster_config> to_cluster(const topology& t);
topology topology_of(const config::cluster_config& c);

caf::actor_system& system_of(node& n);
std::shared_ptr<const config::routing_plan> plan_of(node& n);
std::shared_ptr<transport::transport> transport_of(node& n);

// The coordinates of global prefill (or decode) rank `r` of cluster `c`.
coords coords_of(const config::cluster_config& c, bool prefill, int r);

// A rank as node::add_prefill / add_decode make it, with what an engine actor needs besides.
struct added_rank {
  std::shared_ptr<prefill_rank> prefill;  // set for a prefill rank
  std::shared_ptr<decode_rank> decode;    // set for a decode rank
  caf::actor actor;  // the rank's actor: an engine links to it, so the two live and die together
  int group = 0;     // its agreement group
  rank& api() const { return prefill ? static_cast<rank&>(*prefill) : *decode; }
};

// node::add_prefill / add_decode, with an owner of the memory (may be null) that the rank and
// its pushes keep alive as long as they need it.
expected<added_rank> add_rank(node& n, bool prefill, const coords& where, const memory_desc& memory,
                              std::shared_ptr<const void> owner);

// The process's serving engine, announced in the registry's node table (what a launcher hands
// requests to). No-op on a one-process node.
void set_node_engine(node& n, const caf::actor& engine);

// One row of the registry's node table.
struct node_listing {
  std::string name;  // internal_options::node_name
  std::string host;
  std::uint16_t port = 0;
  bool meshed = false;  // connected to every other node it expects
  caf::actor engine;    // set_node_engine's, or null
};
expected<std::vector<node_listing>> list_nodes(caf::actor_system& sys, const caf::actor& registry,
                                               std::chrono::milliseconds timeout);

}  // namespace kvflow::runtime
