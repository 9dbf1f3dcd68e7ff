// `kvflow bootstrap`: the registry as its own process: a node that hosts the registry and holds
// no rank.
#include <cstdio>
#include <thread>

#include "command/engine_messages.hpp"
#include "command/rank_process.hpp"
#include "command/stop_signals.hpp"
#include "runtime/engine_host.hpp"
#include "runtime/node.hpp"

namespace kvflow::command {

int run_bootstrap(const bootstrap_options& o) {
  // A malformed address, or one beyond loopback with unprotected links, is a usage error (exit 2).
  config::check_listen_address(o.links, runtime::parse_host_port(o.listen, "listen").host, "listen");
  install_stop_signals();
  node_options no;
  no.listen = o.listen;
  no.transport = "ucx";  // it moves no KV: the ranks' transports never reach it
  runtime::internal_options in;
  in.add_message_types = msg::add_engine_message_types;
  in.tunables = o.tunables;
  in.links = o.links;
  auto n = runtime::start_node(runtime::topology_of(o.cluster), no, std::move(in));
  if (!n) {
    std::fprintf(stderr, "kvflow: bootstrap: %s\n", n.err().message().c_str());
    return 1;
  }
  std::printf("kvflow bootstrap listening on %s\n", n.value()->address().c_str());
  std::fflush(stdout);
  while (!stop_requested()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  n.value()->stop();
  return 0;
}

}  // namespace kvflow::command
