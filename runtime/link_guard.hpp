#pragma once
// Every node link kvflow opens or accepts goes through here: TCP (TLS through caf::openssl when
// configured), then the token handshake of runtime/link_auth.hpp, then CAF's BASP with each frame
// header checked against the cap. CAF's own middleman is never published on: a peer reaches an
// actor of this process only after it proved the cluster token. Internal to runtime/ and
// kvflow's own engines (command/).
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>

#include <chrono>
#include <cstdint>
#include <memory>

#include "config/link_security.hpp"
#include "config/status.hpp"
#include "config/tunables.hpp"

namespace kvflow::runtime {

struct host_port;

struct link_settings {
  config::link_security security;
  std::uint64_t max_frame_bytes = 64 << 20;
  std::chrono::milliseconds auth_timeout{10000};
  std::size_t max_pending = 64;
};
link_settings link_settings_of(const config::link_security& s, const config::tunables& t);

// Before the actor system exists: with TLS, loads caf::openssl's module with the files (checked
// here: a certificate, key or CA that does not load throws config_error naming its variable).
void configure_links(caf::actor_system_config& cfg, const link_settings& s);

// The guarded middleman of one actor system; the system's publish and connect below find it
// while it lives. Stop it (or destroy it) before the actor system goes.
class link_guard {
 public:
  static std::unique_ptr<link_guard> start(caf::actor_system& sys, const link_settings& s);
  ~link_guard();
  link_guard(const link_guard&) = delete;
  link_guard& operator=(const link_guard&) = delete;
  void stop();

  struct impl;

 private:
  explicit link_guard(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

// Publishes `a` on `where` (port 0: any) behind the guard; the port it got.
result<std::uint16_t> guarded_publish(caf::actor_system& sys, const caf::actor& a, const host_port& where);
// What a connect error says when the peer (or this end) refused the link handshake.
inline constexpr const char* link_refused = "link refused: ";
// What it says when the connection dropped during the handshake, before any verdict: worth
// another attempt.
inline constexpr const char* link_dropped = "link dropped in its handshake: ";
// Links this node dials to `where` from now on may carry frames on behalf of other nodes (what
// the bootstrap forwards between nodes not linked directly yet); every other link carries only
// its own peer's. Call before dialling the bootstrap.
status trust_as_relay(caf::actor_system& sys, const host_port& where);
// One attempt to reach the actor published at `where`; a refused handshake's error says why
// (both ends log it once).
result<caf::actor> guarded_connect(caf::actor_system& sys, const host_port& where,
                                   std::chrono::milliseconds timeout);

}  // namespace kvflow::runtime
