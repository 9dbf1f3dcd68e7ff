#pragma once
// What every kvflow process on the network shares: addresses, the networked actor system
// (middleman with heartbeats), and connecting with retries. Internal to runtime/ and kvflow's own
// engines (command/: launch connects to its rank processes with these).
#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <chrono>
#include <cstdint>
#include <string>

#include "config/status.hpp"
#include "config/tunables.hpp"
#include "runtime/link_guard.hpp"

namespace kvflow::runtime {

struct host_port {
  std::string host;
  std::uint16_t port = 0;
  std::string text() const { return host + ":" + std::to_string(port); }
};

// "HOST:PORT" (port 0: any free one). Throws config_error naming `field`.
host_port parse_host_port(const std::string& text, const std::string& field);

// configure_actor_system plus the middleman, with heartbeats every heartbeat_interval_ms and a
// connection that stays silent for heartbeat_misses intervals closed (its actors go down), and
// the node links' TLS (runtime/link_guard.hpp). Once the system runs, start its link_guard: the
// two functions below go through it.
void configure_node(caf::actor_system_config& cfg, const config::tunables& t, const link_settings& links);

// Reaches the actor published at `where`, tried again every 100 ms until `timeout`; the last
// error if never. A peer that refused this node's link handshake is not tried again (a token or
// certificate does not change by waiting).
result<caf::actor> connect_with_retry(caf::actor_system& sys, const host_port& where,
                                      std::chrono::milliseconds timeout);

// Publishes `a` on `where` (port 0: any) behind the link guard; the port it got.
result<std::uint16_t> publish_on(caf::actor_system& sys, const caf::actor& a, const host_port& where);

}  // namespace kvflow::runtime
