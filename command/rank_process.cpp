// `kvflow rank`: one prefill or decode rank as its own process, an engine on the public API: a
// networked node (it joins the bootstrap registry, leads or finds its group's supervisors, meshes
// with every other node and registers again with a restarted registry: runtime/api_network.cpp),
// the rank over the simulated engine's memory, and the simulated engine that drives it.
#include <spdlog/spdlog.h>

#include <cstdio>

#include "command/engine_messages.hpp"
#include "command/rank_process.hpp"
#include "command/sim_engine.hpp"
#include "command/sim_memory.hpp"
#include "command/stop_signals.hpp"
#include "runtime/engine_host.hpp"
#include "runtime/node.hpp"

namespace kvflow::command {
namespace {

using namespace std::chrono_literals;

class rank_node {
 public:
  explicit rank_node(const rank_options& o)
      : o_(o), name_(std::string(o.prefill ? "prefill " : "decode ") + std::to_string(o.rank)) {}

  int run() {
    if (auto s = start(); !s) {
      std::fprintf(stderr, "kvflow: rank %s: %s\n", name_.c_str(), s.reason().c_str());
      stop();  // what start() spawned must go, or the actor system never shuts down
      return s.reason().find("wire version") != std::string::npos ? 2 : 1;
    }
    int code = serve();
    stop();
    return code;
  }

 private:
  status start() {
    node_options no;
    no.bootstrap = o_.bootstrap;
    no.listen = o_.listen;
    no.transport = "ucx";
    runtime::internal_options in;
    in.add_message_types = msg::add_engine_message_types;
    in.tunables = o_.tunables;
    in.links = o_.links;
    in.drop_dst = drop_filter(drops_);
    in.node_name = name_;
    in.wire_version = o_.wire_version;
    // One rank per process: a node is meshed once it connected to every other rank's node.
    in.expected_nodes = o_.cluster.prefill.ranks() + o_.cluster.decode.ranks();
    auto n = runtime::start_node(runtime::topology_of(o_.cluster), std::move(no), std::move(in));
    if (!n) return status::error(n.err().message());
    node_ = n.value();
    auto& sys = runtime::system_of(*node_);
    plan_ = runtime::plan_of(*node_);
    if (!o_.report_to.empty()) {
      auto obs = runtime::connect_with_retry(sys, runtime::parse_host_port(o_.report_to, "report-to"),
                                    std::chrono::milliseconds(o_.tunables.connect_timeout_ms));
      if (!obs) return obs.error();
      observer_ = obs.value();
    }
    auto memory = std::make_shared<sim_memory>(*plan_, o_.prefill, o_.rank, o_.pool_pages, std::max(1, o_.aux_slots),
                                               runtime::transport_of(*node_));
    auto made = runtime::add_rank(*node_, o_.prefill, runtime::coords_of(o_.cluster, o_.prefill, o_.rank),
                                  memory->desc(), memory);
    if (!made) return status::error(made.err().message());
    rank_ = made.value().actor;
    sim_engine_args a;
    a.plan = plan_;
    a.prefill = o_.prefill;
    a.rank = o_.rank;
    a.rank_api = made.value();
    a.memory = memory;
    a.chunk_tokens = o_.chunk_tokens;
    a.step_interval_us = o_.tunables.step_interval_us;
    a.observer = observer_;
    a.drops = drops_;
    engine_ = spawn_sim_engine(sys, std::move(a));
    runtime::set_node_engine(*node_, engine_);
    return {};
  }

  // Until a stop signal, or the rank stops (its group lost, a fault killed a peer it needs).
  int serve() {
    caf::scoped_actor self{runtime::system_of(*node_)};
    self->monitor(rank_);
    for (;;) {
      bool down = false;
      self->receive(
          [&](caf::down_msg& dm) {
            spdlog::error("{}: the rank stopped: {}", name_, self->system().render(dm.reason));
            down = true;
          },
          caf::after(200ms) >> [] {});
      if (down) return 1;
      if (stop_requested()) return 0;
    }
  }

  void stop() {
    // The engine first (it drives the rank), then the node: its ranks leave before their
    // supervisors, so a rank never sees its supervisor go.
    if (engine_) caf::anon_send_exit(engine_, caf::exit_reason::user_shutdown);
    if (node_) node_->stop();
  }

  const rank_options& o_;
  std::shared_ptr<const config::routing_plan> plan_;
  std::string name_;
  std::shared_ptr<node> node_;
  caf::actor observer_, rank_, engine_;
  std::shared_ptr<dst_drops> drops_ = std::make_shared<dst_drops>();
};

}  // namespace

int run_rank(const rank_options& o) {
  if (o.transport != "ucx") {
    std::fprintf(stderr, "kvflow: transport: '%s' cannot cross processes (use ucx)\n", o.transport.c_str());
    return 2;
  }
  // Malformed addresses are usage errors (config_error: exit 2), not start-up failures.
  (void)runtime::parse_host_port(o.bootstrap, "bootstrap");
  config::check_listen_address(o.links, runtime::parse_host_port(o.listen, "listen").host, "listen");
  if (!o.report_to.empty()) (void)runtime::parse_host_port(o.report_to, "report-to");
  install_stop_signals();
  return rank_node(o).run();
}

}  // namespace kvflow::command
