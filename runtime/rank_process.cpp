// `kvflow rank`: one prefill or decode rank as its own process. The process hosts the rank actor,
// the agreement supervisors its rank leads (CP rank 0 of a shard: the shard supervisor; TP rank 0
// of it too: the group's TP supervisor), its transport, and a node its peers connect to directly
// (so traffic between ranks never depends on the bootstrap process).
#include <spdlog/spdlog.h>

#include <cstdio>
#include <map>
#include <set>
#include <thread>

#include "actors/bootstrap_registry.hpp"
#include "actors/messages.hpp"
#include "actors/supervisor.hpp"
#include "runtime/api_internal.hpp"
#include "runtime/node.hpp"
#include "runtime/rank_process.hpp"
#include "runtime/sim_engine.hpp"
#include "transport/ucx_transport.hpp"

namespace kvflow::runtime {
namespace {

using namespace std::chrono_literals;


struct local_supervisor {
  int group = 0, index = -1;
  caf::actor handle;
};

// Asks the registry for supervisor (group, index) until it is registered or `timeout`.
result<caf::actor> find_supervisor(caf::scoped_actor& self, const caf::actor& registry, int group, int index,
                                   std::chrono::milliseconds timeout) {
  auto until = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    caf::actor found;
    std::string failed;
    self->request(registry, 5s, msg::lookup_supervisor{group, index})
        .receive([&](msg::supervisor_entry& e) { found = e.handle; },
                 [&](caf::error& e) { failed = self->system().render(e); });
    if (found) return found;
    if (!failed.empty() || std::chrono::steady_clock::now() >= until)
      return status::error("supervisor " + std::to_string(index) + " of agreement group " + std::to_string(group) +
                           " not found" + (failed.empty() ? "" : ": " + failed));
    std::this_thread::sleep_for(50ms);
  }
}

class rank_node {
 public:
  rank_node(caf::actor_system& sys, const rank_options& o) : sys_(sys), o_(o), self_(sys) {
    plan_ = std::make_shared<const config::routing_plan>(o.cluster);
    name_ = std::string(o.prefill ? "prefill " : "decode ") + std::to_string(o.rank);
    expected_nodes_ = o.cluster.prefill.ranks() + o.cluster.decode.ranks();
  }

  int run() {
    if (auto s = start(); !s) {
      std::fprintf(stderr, "kvflow: rank %s: %s\n", name_.c_str(), s.reason().c_str());
      stop();  // what start() spawned must go, or the actor system never shuts down
      return refused_version_ ? 2 : 1;
    }
    int code = serve();
    stop();
    return code;
  }

 private:
  status start() {
    auto made = transport::ucx_transport::create(
        transport::ucx_options{std::chrono::milliseconds(o_.tunables.ucx_flush_timeout_ms)});
    if (!made) return status::error("transport ucx: " + made.error().reason());
    transport_ = std::move(made.value());
    auto where = parse_host_port(o_.listen, "listen");
    auto timeout = std::chrono::milliseconds(o_.tunables.connect_timeout_ms);
    auto reg = connect_with_retry(sys_, parse_host_port(o_.bootstrap, "bootstrap"), timeout);
    if (!reg) return reg.error();
    registry_ = reg.value();
    // The node's anchor: what peers reach when they connect to this process directly.
    anchor_ = sys_.spawn([]() -> caf::behavior { return {[](msg::node_query) {}}; });
    auto port = publish_on(sys_, anchor_, where);
    if (!port) return port.error();
    me_ = {where.host, port.value()};
    if (auto s = register_node(); !s) return s;
    if (auto s = host_supervisors(timeout); !s) return s;
    if (!o_.report_to.empty()) {
      auto obs = connect_with_retry(sys_, parse_host_port(o_.report_to, "report-to"), timeout);
      if (!obs) return obs.error();
      observer_ = obs.value();
    }
    return spawn_rank();
  }

  status register_node() {
    std::uint32_t version = o_.wire_version != 0 ? o_.wire_version : msg::wire_version;
    status out;
    self_->request(registry_, 5s, msg::register_node{version, name_, me_.host, me_.port, meshed_, engine_})
        .receive(
            [&](msg::registration_reply& r) {
              if (!r.ok) {
                refused_version_ = r.reason.find("wire version") != std::string::npos;
                out = status::error("the bootstrap registry refused this node: " + r.reason);
              }
            },
            [&](caf::error& e) { out = status::error("registering with the bootstrap: " + sys_.render(e)); });
    return out;
  }

  // Spawns (and registers) the supervisors this rank leads; finds its parent and its group's root.
  status host_supervisors(std::chrono::milliseconds timeout) {
    const auto& c = o_.cluster;
    int group = 0, shard = -1;
    bool lead_shard = false, lead_group = false;
    int ranks_in_group = 0, root_children = 0;
    if (o_.prefill) {
      auto pc = config::prefill_coord_of(c.prefill, o_.rank);
      group = config::prefill_group_of(c.prefill, pc);
      shard = config::prefill_shard_of(c.prefill, pc);
      lead_shard = pc.cp == 0;
      lead_group = pc.cp == 0 && pc.tp == 0 && pc.pp == 0;
      ranks_in_group = c.prefill.tp * c.prefill.cp * c.prefill.pp;
      root_children = c.prefill.tp * c.prefill.pp;
      child_index_ = pc.cp;
    } else {
      auto dc = config::decode_coord_of(c.decode, o_.rank);
      group = config::decode_group_of(c.decode, dc);
      lead_group = dc.tp == 0 && dc.pp == 0;
      ranks_in_group = c.decode.tp * c.decode.pp;
      root_children = ranks_in_group;
      child_index_ = config::decode_child_of(c.decode, dc);
    }
    group_ = group;
    if (lead_group) {
      supervisor_args ra;
      ra.children = root_children;
      ra.group = group;
      ra.root = true;
      ra.ranks = ranks_in_group;
      supervisors_.push_back({group, -1, spawn_supervisor(sys_, ra, {})});
    }
    auto root = lead_group ? result<caf::actor>(supervisors_.back().handle)
                           : find_supervisor(self_, registry_, group, -1, timeout);
    if (!root) return root.error();
    root_ = root.value();
    if (lead_shard) {
      supervisor_args sa;
      sa.children = c.prefill.cp;
      sa.group = group;
      sa.index_in_parent = shard;
      auto h = spawn_supervisor(sys_, sa, root_);
      self_->send(root_, msg::attach_child{shard, h});
      supervisors_.push_back({group, shard, h});
    }
    for (const auto& s : supervisors_) self_->send(registry_, msg::register_supervisor{s.group, s.index, s.handle});
    if (!o_.prefill) {
      parent_ = root_;
      return {};
    }
    auto parent = lead_shard ? result<caf::actor>(supervisors_.back().handle)
                             : find_supervisor(self_, registry_, group, shard, timeout);
    if (!parent) return parent.error();
    parent_ = parent.value();
    return {};
  }

  // The rank through the same path as every engine's (make_rank), reporting its steps by
  // message, and the simulated engine that drives it.
  status spawn_rank() {
    auto memory = std::make_shared<sim_memory>(*plan_, o_.prefill, o_.rank, o_.pool_pages, std::max(1, o_.aux_slots), transport_);
    rank_context ctx{sys_, plan_, o_.tunables, transport_, registry_, drop_filter(drops_), stopped_};
    agreement_link link;
    link.group = group_;
    link.parent = parent_;
    link.child = child_index_;
    link.ring = std::make_shared<agreed_ring>(ring_rounds(o_.tunables));
    auto made = make_rank(ctx, o_.prefill, o_.rank, memory->desc(), link, memory);
    if (!made) return status::error(made.err().message());
    rank_ = made.value()->actor;
    sim_engine_args a;
    a.plan = plan_;
    a.prefill = o_.prefill;
    a.rank = o_.rank;
    a.group = group_;
    if (o_.prefill)
      a.prefill_api = std::make_shared<kvflow::prefill_rank>(made.value());
    else
      a.decode_api = std::make_shared<kvflow::decode_rank>(made.value());
    a.rank_actor = rank_;
    a.memory = memory;
    a.chunk_tokens = o_.chunk_tokens;
    a.step_interval_us = o_.tunables.step_interval_us;
    a.observer = observer_;
    a.drops = drops_;
    engine_ = spawn_sim_engine(sys_, std::move(a));
    self_->send(root_, msg::attach_rank{rank_});
    self_->monitor(rank_);
    self_->monitor(registry_);
    return {};
  }

  // The rank's registrations, again, with a restarted registry.
  status reregister() {
    if (auto s = register_node(); !s) return s;
    self_->send(rank_, msg::set_registry{registry_});
    for (const auto& s : supervisors_) self_->send(registry_, msg::register_supervisor{s.group, s.index, s.handle});
    if (o_.prefill) {
      auto pc = config::prefill_coord_of(o_.cluster.prefill, o_.rank);
      self_->send(registry_, msg::register_rank{msg::wire_version, {pc.dp, pc.cp, pc.tp, pc.pp},
                                                "prefill rank " + std::to_string(o_.rank), rank_});
    } else {
      self_->send(registry_, msg::register_decode{o_.rank, rank_});
    }
    return {};
  }

  // Direct connections, so that no message between ranks depends on the bootstrap node (whose
  // restart would lose what it relays): this node dials every node whose name sorts before its
  // own (each pair connects once) and reports itself meshed once it has; the launcher starts
  // the workload only when every node is.
  void connect_peers() {
    if (meshed_) return;
    msg::node_table t;
    self_->request(registry_, 2s, msg::node_query{}).receive([&](msg::node_table& x) { t = std::move(x); },
                                                             [&](caf::error&) {});
    int listed = 0;
    for (const auto& n : t.nodes) {
      if (n.name == name_) continue;
      ++listed;
      if (n.name > name_ || dialed_.count(n.name)) continue;
      auto a = sys_.middleman().remote_actor(n.host, n.port);
      if (a) {
        dialed_.insert(n.name);
      } else if (dial_failed_.insert(n.name).second) {
        spdlog::warn("{}: cannot reach node {} at {}:{}: {}", name_, n.name, n.host, n.port, sys_.render(a.error()));
      }
    }
    int before_me = 0;
    for (const auto& n : t.nodes) before_me += n.name < name_;
    if (listed == expected_nodes_ - 1 && static_cast<int>(dialed_.size()) == before_me) {
      meshed_ = true;
      if (auto s = register_node(); !s) spdlog::warn("{}: {}", name_, s.reason());
    }
  }

  int serve() {
    auto bootstrap = parse_host_port(o_.bootstrap, "bootstrap");
    bool registry_up = true;
    int code = 0;
    bool running = true;
    while (running && !stop_requested()) {
      if (registry_up) connect_peers();
      self_->receive(
          [&](caf::down_msg& dm) {
            if (dm.source == rank_.address()) {
              spdlog::error("{}: the rank stopped: {}", name_, sys_.render(dm.reason));
              code = 1;
              running = false;
            } else if (dm.source == registry_.address()) {
              spdlog::warn("{}: the bootstrap registry went away; reconnecting", name_);
              lost_registry_node_ = registry_.node();
              registry_up = false;
            }
          },
          caf::after(std::chrono::milliseconds(registry_up ? 200 : 0)) >> [] {});
      if (!registry_up && running) {
        auto back = sys_.middleman().remote_actor(bootstrap.host, bootstrap.port);
        // The middleman may still answer with the old registry until it saw it go.
        if (back && back->node() != lost_registry_node_) {
          registry_ = *back;
          self_->monitor(registry_);
          registry_up = true;
          if (auto s = reregister(); !s) {
            spdlog::warn("{}: registering again: {}", name_, s.reason());
            registry_up = false;
          } else {
            spdlog::info("{}: registered again with the restarted bootstrap registry", name_);
          }
        }
        if (!registry_up) std::this_thread::sleep_for(200ms);
      }
    }
    return code;
  }

  void stop() {
    // The engine and the rank first (the rank deregisters its memory before the transport goes),
    // then what it reported to, so it never sees its supervisor leave.
    stopped_->store(true);
    if (engine_) self_->send_exit(engine_, caf::exit_reason::user_shutdown);
    if (rank_) {
      self_->send_exit(rank_, caf::exit_reason::user_shutdown);
      self_->wait_for(rank_);
    }
    for (auto& s : supervisors_) self_->send_exit(s.handle, caf::exit_reason::user_shutdown);
    if (anchor_) self_->send_exit(anchor_, caf::exit_reason::user_shutdown);
  }

  caf::actor_system& sys_;
  const rank_options& o_;
  caf::scoped_actor self_;
  std::shared_ptr<const config::routing_plan> plan_;
  std::shared_ptr<transport::transport> transport_;
  std::string name_;
  int expected_nodes_ = 0;
  host_port me_;
  caf::actor registry_, anchor_, root_, parent_, observer_, rank_, engine_;
  int group_ = 0;
  std::shared_ptr<dst_drops> drops_ = std::make_shared<dst_drops>();
  std::shared_ptr<std::atomic<bool>> stopped_ = std::make_shared<std::atomic<bool>>(false);
  std::vector<local_supervisor> supervisors_;
  int child_index_ = 0;
  std::set<std::string> dialed_, dial_failed_;
  bool meshed_ = false;
  caf::node_id lost_registry_node_;
  bool refused_version_ = false;
};

}  // namespace

int run_rank(const rank_options& o) {
  if (o.transport != "ucx") {
    std::fprintf(stderr, "kvflow: transport: '%s' cannot cross processes (use ucx)\n", o.transport.c_str());
    return 2;
  }
  install_stop_signals();
  caf::actor_system_config cfg;
  configure_node(cfg, o.tunables);
  caf::actor_system sys{cfg};
  return rank_node(sys, o).run();
}

}  // namespace kvflow::runtime
