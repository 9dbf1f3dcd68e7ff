// `kvflow bootstrap`: the registry as its own process.
#include <cstdio>
#include <thread>

#include "actors/bootstrap_registry.hpp"
#include "runtime/node.hpp"
#include "runtime/rank_process.hpp"

namespace kvflow::runtime {

int run_bootstrap(const bootstrap_options& o) {
  auto where = parse_host_port(o.listen, "listen");
  install_stop_signals();
  caf::actor_system_config cfg;
  configure_node(cfg, o.tunables);
  caf::actor_system sys{cfg};
  auto registry = spawn_bootstrap_registry(sys, o.cluster);
  auto port = publish_on(sys, registry, where);
  if (!port) {
    std::fprintf(stderr, "kvflow: bootstrap: %s\n", port.error().reason().c_str());
    caf::anon_send_exit(registry, caf::exit_reason::user_shutdown);
    return 1;
  }
  std::printf("kvflow bootstrap listening on %s:%u\n", where.host.c_str(), unsigned(port.value()));
  std::fflush(stdout);
  while (!stop_requested()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  caf::anon_send_exit(registry, caf::exit_reason::user_shutdown);
  return 0;
}

}  // namespace kvflow::runtime
