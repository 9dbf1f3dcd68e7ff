#include "runtime/node.hpp"

#include <thread>

#include "config/topology.hpp"
#include "runtime/actor_system_setup.hpp"

namespace kvflow::runtime {

host_port parse_host_port(const std::string& text, const std::string& field) {
  auto colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0)
    throw config::config_error(field + ": '" + text + "' is not HOST:PORT");
  host_port hp;
  hp.host = text.substr(0, colon);
  std::string port = text.substr(colon + 1);
  try {
    std::size_t used = 0;
    long p = std::stol(port, &used);
    if (used != port.size() || p < 0 || p > 65535) throw std::out_of_range("port");
    hp.port = static_cast<std::uint16_t>(p);
  } catch (const std::logic_error&) {
    throw config::config_error(field + ": '" + text + "' needs a port 0..65535");
  }
  return hp;
}

void configure_node(caf::actor_system_config& cfg, const config::tunables& t, const link_settings& links) {
  configure_actor_system(cfg);
  cfg.load<caf::io::middleman>();
  configure_links(cfg, links);
  auto interval = std::chrono::milliseconds(t.heartbeat_interval_ms);
  cfg.set("middleman.heartbeat-interval", caf::timespan{interval});
  cfg.set("middleman.connection-timeout", caf::timespan{interval * t.heartbeat_misses});
  // The middleman's own thread deserializes incoming messages: the small control messages of
  // the agreement are cheaper to decode in place than to hand to a BASP worker thread (one
  // thread wake-up less per hop on machines with few cores).
  cfg.set("middleman.workers", size_t{0});
}

result<caf::actor> connect_with_retry(caf::actor_system& sys, const host_port& where,
                                      std::chrono::milliseconds timeout) {
  using clock = std::chrono::steady_clock;
  const auto until = clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - clock::now());
    auto a = guarded_connect(sys, where, std::max(left, std::chrono::milliseconds(100)));
    if (a) return a;
    if (clock::now() >= until || a.error().reason().find(link_refused) != std::string::npos) return a;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

result<std::uint16_t> publish_on(caf::actor_system& sys, const caf::actor& a, const host_port& where) {
  return guarded_publish(sys, a, where);
}

}  // namespace kvflow::runtime
