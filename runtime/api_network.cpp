// A node on the network: it joins a bootstrap registry (or publishes its own), leads or finds
// the supervisors of its ranks' groups through that registry (a group may span processes), and
// keeps a keeper actor that connects it directly to every other node and registers everything
// again with a restarted registry. One-process nodes never come here (runtime/api_node.cpp).
#include <spdlog/spdlog.h>

#include <unistd.h>

#include <random>
#include <set>
#include <thread>

#include "actors/messages.hpp"
#include "actors/sender_check.hpp"
#include "actors/supervisor.hpp"
#include "runtime/api_internal.hpp"
#include "runtime/link_guard.hpp"
#include "runtime/node.hpp"

namespace kvflow::runtime {

using namespace std::chrono_literals;

// What a networked node registered, to register it again with a restarted registry.
struct network_node {
  std::mutex mutex;  // the engine's thread (add_rank) and the keeper both touch what follows
  std::string name;
  host_port me;
  std::optional<host_port> bootstrap;  // empty: this node hosts the registry
  std::uint32_t wire_version = msg::wire_version;
  int expected_nodes = 0;
  std::chrono::milliseconds connect_timeout{30000};
  caf::actor anchor;  // what peers dial: the registry on its host, else an actor of no use
  caf::actor keeper;
  caf::actor engine;
  bool meshed = false;
  std::map<std::pair<int, int>, msg::register_supervisor> supervisors;  // (group, index) -> led here
  std::map<int, std::shared_ptr<shm_segment>> segments;  // groups led here through shared memory
  std::vector<msg::register_rank> prefill_ranks;
  std::vector<msg::register_decode> decode_ranks;
  std::vector<caf::actor> rank_actors;
  std::set<std::string> dialed, dial_failed;
  caf::node_id lost_registry;

  msg::register_node registration() const { return {wire_version, name, me.host, me.port, meshed, engine}; }
};

namespace {

struct keeper_tick {};
template <class I>
typename I::result_type inspect(I& f, keeper_tick&) {
  return f(caf::meta::type_name("keeper_tick"));
}

// Registers the node (its table entry); an error when the registry refused or did not answer.
status register_node(caf::actor_system& sys, const caf::actor& registry, const msg::register_node& m) {
  caf::scoped_actor self{sys};
  status out;
  self->request(registry, 5s, m).receive(
      [&](msg::registration_reply& r) {
        if (!r.ok) out = status::error("the bootstrap registry refused this node: " + r.reason);
      },
      [&](caf::error& e) { out = status::error("registering with the bootstrap: " + sys.render(e)); });
  return out;
}

// Asks the registry for supervisor (group, index) until it is registered or `timeout`.
result<msg::supervisor_entry> find_supervisor(caf::actor_system& sys, const caf::actor& registry, int group, int index,
                                   std::chrono::milliseconds timeout) {
  caf::scoped_actor self{sys};
  auto until = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    msg::supervisor_entry found;
    std::string failed;
    self->request(registry, 5s, msg::lookup_supervisor{group, index})
        .receive([&](msg::supervisor_entry& e) { found = std::move(e); },
                 [&](caf::error& e) { failed = sys.render(e); });
    if (found.handle) return found;
    if (!failed.empty() || std::chrono::steady_clock::now() >= until)
      return status::error("supervisor " + std::to_string(index) + " of agreement group " + std::to_string(group) +
                           " not found" + (failed.empty() ? "" : ": " + failed));
    std::this_thread::sleep_for(50ms);
  }
}

// Direct connections, so that no message between ranks depends on the bootstrap node (whose
// restart would lose what it relays): a node dials every node whose name sorts before its own
// (each pair connects once) and reports itself meshed once it has (and, where the cluster's
// node count is known, once it saw them all).
void connect_peers(caf::actor_system& sys, const caf::actor& registry, network_node& net) {
  msg::node_table t;
  {
    caf::scoped_actor self{sys};
    self->request(registry, 2s, msg::node_query{}).receive([&](msg::node_table& x) { t = std::move(x); },
                                                           [&](caf::error&) {});
  }
  int listed = 0, before_me = 0, dialed_before = 0;
  for (const auto& n : t.nodes) {
    if (n.name == net.name) continue;
    ++listed;
    if (n.name > net.name) continue;
    ++before_me;
    if (!net.dialed.count(n.name)) {
      auto a = guarded_connect(sys, {n.host, n.port}, net.connect_timeout);
      if (a) {
        net.dialed.insert(n.name);
      } else if (net.dial_failed.insert(n.name).second) {
        spdlog::warn("{}: node {}: {}", net.name, n.name, a.error().reason());
      }
    }
    dialed_before += net.dialed.count(n.name) != 0;
  }
  msg::register_node me;
  {
    std::lock_guard<std::mutex> g(net.mutex);
    if (net.meshed || dialed_before != before_me) return;
    if (net.expected_nodes > 0 && listed != net.expected_nodes - 1) return;
    net.meshed = true;
    me = net.registration();
  }
  if (auto s = register_node(sys, registry, me); !s) {
    // The table must learn it: the next tick tries again.
    spdlog::warn("{}: {}", net.name, s.reason());
    std::lock_guard<std::mutex> g(net.mutex);
    net.meshed = false;
  }
}

// Everything this node registered, again, with a restarted registry.
// Each registration goes as the actor it registers (the registry checks that it comes from
// that actor's process), and set_registry from the keeper (a rank takes it only from here).
status reregister(node::impl& n, network_node& net, const caf::actor& keeper) {
  msg::register_node me;
  std::vector<caf::actor> ranks;
  std::vector<msg::register_supervisor> sups;
  std::vector<msg::register_rank> pre;
  std::vector<msg::register_decode> dec;
  {
    std::lock_guard<std::mutex> g(net.mutex);
    me = net.registration();
    ranks = net.rank_actors;
    for (const auto& [k, s] : net.supervisors) sups.push_back(s);
    pre = net.prefill_ranks;
    dec = net.decode_ranks;
  }
  auto registry = current_registry(n);
  if (auto s = register_node(*n.sys, registry, me); !s) return s;
  for (const auto& r : ranks) caf::send_as(keeper, r, msg::set_registry{registry});
  for (const auto& s : sups) caf::send_as(s.handle, registry, s);
  for (const auto& r : pre) caf::send_as(r.rank, registry, r);
  for (const auto& r : dec) caf::send_as(r.handle, registry, r);
  return {};
}

// The keeper: a thread of its own (it dials, and waits for answers), every 200 ms.
caf::behavior keeper(caf::event_based_actor* self, node::impl* n, std::shared_ptr<network_node> net) {
  auto registry_up = std::make_shared<bool>(true);
  detail::refuse_stray_errors(self, net->name + " keeper");
  self->monitor(n->registry);
  self->set_down_handler([=](caf::down_msg& dm) {
    auto registry = current_registry(*n);
    if (dm.source != registry.address()) return;
    spdlog::warn("{}: the bootstrap registry went away; reconnecting", net->name);
    net->lost_registry = registry.node();
    *registry_up = false;
  });
  self->delayed_send(self, 200ms, keeper_tick{});
  return {
      [=](keeper_tick) {
        if (n->stopped->load()) return;
        if (*registry_up) {
          if (net->bootstrap) connect_peers(*n->sys, current_registry(*n), *net);
        } else if (net->bootstrap) {
          auto back = guarded_connect(*n->sys, *net->bootstrap, net->connect_timeout);
          // The middleman may still answer with the old registry until it saw it go.
          if (back && back.value().node() != net->lost_registry) {
            {
              std::lock_guard<std::mutex> g(net->mutex);
              n->registry = back.value();
            }
            self->monitor(back.value());
            if (auto s = reregister(*n, *net, caf::actor_cast<caf::actor>(self)); !s) {
              spdlog::warn("{}: registering again: {}", net->name, s.reason());
            } else {
              *registry_up = true;
              spdlog::info("{}: registered again with the restarted bootstrap registry", net->name);
            }
          }
        }
        self->delayed_send(self, 200ms, keeper_tick{});
      },
      [=](msg::registration_reply& r) {  // the registry's answer to a register_node sent below
        if (!r.ok) spdlog::warn("{}: the bootstrap registry refused this node: {}", net->name, r.reason);
      },
      [=](msg::register_node&) {  // the engine changed: the table learns it
        // What the node is now, not what it was when the engine was set: a registration made
        // before this node meshed, forwarded after the tick that registered it meshed, would
        // mark it unmeshed for good (a launch then waits for it until its timeout).
        msg::register_node now;
        {
          std::lock_guard<std::mutex> g(net->mutex);
          now = net->registration();
        }
        self->send(current_registry(*n), std::move(now));
      },
  };
}

}  // namespace

status start_network(node::impl& n, const node_options& options) {
  auto net = std::make_shared<network_node>();
  net->connect_timeout = std::chrono::milliseconds(n.tunables.connect_timeout_ms);
  net->expected_nodes = n.internal.expected_nodes;
  if (n.internal.wire_version != 0) net->wire_version = n.internal.wire_version;
  auto& sys = *n.sys;
  try {
    auto where = parse_host_port(options.listen.empty() ? "127.0.0.1:0" : options.listen, "listen");
    if (!options.bootstrap.empty()) {
      net->bootstrap = parse_host_port(options.bootstrap, "bootstrap");
      // Until two nodes link directly, their frames come round through the bootstrap.
      if (auto t = trust_as_relay(sys, *net->bootstrap); !t) return t;
      auto reg = connect_with_retry(sys, *net->bootstrap, net->connect_timeout);
      if (!reg) return reg.error();
      n.registry = reg.value();
      net->anchor = sys.spawn([](caf::event_based_actor* self) -> caf::behavior {
        detail::refuse_stray_errors(self, "node anchor");
        return {[](msg::node_query) {}};
      });
      n.infrastructure.push_back(net->anchor);
    } else {
      net->anchor = n.registry;  // peers and joining nodes reach this node's registry
    }
    auto port = publish_on(sys, net->anchor, where);
    if (!port) return port.error();
    net->me = {where.host, port.value()};
  } catch (const config::config_error& e) {
    return status::error(e.what());
  }
  net->name = n.internal.node_name.empty() ? "node " + net->me.text() : n.internal.node_name;
  // A joining node enters the node table (what others dial); the registry's host is reached
  // by every node already, through the registry itself.
  if (net->bootstrap)
    if (auto s = register_node(sys, n.registry, net->registration()); !s) return s;
  n.net = net;
  // Detached: it blocks while it dials and waits for the registry's answers.
  net->keeper = sys.spawn<caf::detached>(keeper, &n, net);
  n.infrastructure.insert(n.infrastructure.begin(), net->keeper);
  return {};
}

namespace {

// A name no other group, run or process uses: the leader's pid and 64 random bits.
std::string segment_name(int group) {
  std::random_device rd;
  const std::uint64_t salt = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  char buf[96];
  std::snprintf(buf, sizeof(buf), "/kvflow-%d-%016llx-g%d", static_cast<int>(getpid()),
                static_cast<unsigned long long>(salt), group);
  return buf;
}

}  // namespace

// The group's segment, made by its leader: a group whose ranks will all post by message costs
// a few MiB of /dev/shm for nothing, one whose ranks share the host saves every round two
// processes' network threads. Null (and messages, the tree of supervisors) where /dev/shm
// cannot take it.
std::shared_ptr<shm_segment> make_segment(node::impl& n, int group, int ranks) {
  if (n.tunables.agreement_via != 1) return nullptr;
  shm_shape shape;
  shape.ranks = ranks;
  shape.post_slots = 4;
  shape.ring_slots = static_cast<int>(std::max<std::int64_t>(16, 4 * n.tunables.agreement_lag + 4));
  shape.max_rooms = static_cast<int>(std::min<std::int64_t>(n.tunables.agreement_shm_rooms, 1 << 24));
  auto seg = shm_segment::create(segment_name(group), group, shape);
  if (!seg) {
    spdlog::warn("{}: agreement group {} agrees through messages: {}", n.net ? n.net->name : std::string("node"), group, seg.error().reason());
    return nullptr;
  }
  return seg.value();
}

expected<agreement_link> link_network(node::impl& n, bool prefill, int r) {
  auto& net = *n.net;
  const auto& c = n.cluster;
  auto& sys = *n.sys;
  const auto place = place_in_group(c, prefill, r);
  const int group = place.group, flat = place.flat, ranks_in_group = place.ranks;
  int shard = -1, child = flat, root_children = ranks_in_group;
  bool lead_shard = false, lead_group = false;
  if (prefill) {
    auto pc = config::prefill_coord_of(c.prefill, r);
    shard = config::prefill_shard_of(c.prefill, pc);
    lead_shard = pc.cp == 0;
    lead_group = pc.cp == 0 && pc.tp == 0 && pc.pp == 0;
    root_children = c.prefill.tp * c.prefill.pp;
    child = pc.cp;
  } else {
    auto dc = config::decode_coord_of(c.decode, r);
    lead_group = dc.tp == 0 && dc.pp == 0;
  }
  auto unavailable = [](const status& s) { return error{errc::unavailable, s.reason()}; };
  // A supervisor led in this node, else the registry's (its leader may be in another process).
  auto find = [&](int index) -> result<msg::supervisor_entry> {
    {
      std::lock_guard<std::mutex> g(net.mutex);
      if (auto it = net.supervisors.find({group, index}); it != net.supervisors.end())
        return msg::supervisor_entry{group, index, it->second.handle, it->second.shared_memory};
    }
    return find_supervisor(sys, current_registry(n), group, index, net.connect_timeout);
  };
  auto lead = [&](int index, const caf::actor& h, std::shared_ptr<shm_segment> seg) {
    n.infrastructure.push_back(h);
    std::lock_guard<std::mutex> g(net.mutex);
    msg::register_supervisor m{group, index, h, seg ? seg->name() : std::string{}};
    net.supervisors[{group, index}] = m;
    if (seg) net.segments[group] = std::move(seg);
    caf::send_as(h, n.registry, std::move(m));  // under the lock
  };
  if (lead_group) {
    supervisor_args ra;
    ra.children = root_children;
    ra.group = group;
    ra.root = true;
    ra.tombstone_age = tombstone_age(n.tunables);
    ra.ranks = ranks_in_group;  // the root holds rounds until every rank attached by message
    ra.shared_memory = make_segment(n, group, ranks_in_group);
    if (ra.shared_memory) {
      // Every rank is the root's child; those of this host post into the segment, the others
      // report by message, and only they are sent rounds (they attach first: held rounds
      // would wait for ranks that never attach).
      ra.children = ranks_in_group;
      ra.ranks = 0;
    }
    lead(-1, spawn_supervisor(sys, ra, {}), ra.shared_memory);
  }
  auto root = find(-1);
  if (!root) return unavailable(root.error());
  agreement_link link;
  link.group = group;
  link.child = child;
  link.root = root.value().handle;
  link.ring = std::make_shared<agreed_ring>(ring_rounds(n.tunables));  // the rank fills it
  if (!root.value().shared_memory.empty()) {
    link.parent = link.root;
    link.child = flat;
    if (n.tunables.agreement_via == 1) {
      {
        std::lock_guard<std::mutex> g(net.mutex);
        if (auto it = net.segments.find(group); it != net.segments.end()) link.shm = it->second;
      }
      if (!link.shm) {
        // Another host's leader (or another /dev/shm) makes this fail: then by message.
        auto seg = shm_segment::open(root.value().shared_memory, group);
        if (seg)
          link.shm = seg.value();
        else
          spdlog::info("{}: rank {} of group {} reports by message: {}", net.name, r, group, seg.error().reason());
      }
    }
    return link;
  }
  if (!prefill) {
    link.parent = link.root;
    return link;
  }
  if (lead_shard) {
    supervisor_args sa;
    sa.children = c.prefill.cp;
    sa.group = group;
    sa.index_in_parent = shard;
    auto h = spawn_supervisor(sys, sa, link.root);
    caf::send_as(h, link.root, msg::attach_child{shard, h});
    lead(shard, h, nullptr);
  }
  auto parent = find(shard);
  if (!parent) return unavailable(parent.error());
  link.parent = parent.value().handle;
  return link;
}

void registered_network(node::impl& n, bool prefill, int r, const caf::actor& rank, const agreement_link& link) {
  auto& net = *n.net;
  const auto& c = n.cluster;
  {
    std::lock_guard<std::mutex> g(net.mutex);
    if (prefill) {
      auto pc = config::prefill_coord_of(c.prefill, r);
      net.prefill_ranks.push_back(
          {msg::wire_version, {pc.dp, pc.cp, pc.tp, pc.pp}, "prefill rank " + std::to_string(r), rank, handshake_of(c)});
    } else {
      net.decode_ranks.push_back({r, rank});
    }
    net.rank_actors.push_back(rank);
  }
  // A rank that reads its rounds in the group's segment needs none by message.
  if (!link.shm) caf::send_as(rank, link.root, msg::attach_rank{rank});
}

void stop_network(node::impl& n) {
  if (!n.net) return;
  // The keeper's behavior holds `net`: the handles it holds must go, or the keeper (a detached
  // actor, whose thread waits until nothing refers to it) never ends and the system never stops.
  std::lock_guard<std::mutex> g(n.net->mutex);
  n.net->keeper = nullptr;
  n.net->anchor = nullptr;
  n.net->engine = nullptr;
  n.net->supervisors.clear();
  n.net->segments.clear();
  n.net->rank_actors.clear();
  n.net->prefill_ranks.clear();
  n.net->decode_ranks.clear();
}

std::string network_address(node::impl& n) { return n.net->me.text(); }

caf::actor current_registry(node::impl& n) {
  if (!n.net) return n.registry;
  std::lock_guard<std::mutex> g(n.net->mutex);
  return n.registry;
}

caf::actor node_keeper(node& nd) {
  auto& n = internals(nd);
  if (!n.net) return {};
  std::lock_guard<std::mutex> g(n.net->mutex);
  return n.net->keeper;
}

void set_node_engine(node& nd, const caf::actor& engine) {
  auto& n = internals(nd);
  if (!n.net) return;
  msg::register_node m;
  {
    std::lock_guard<std::mutex> g(n.net->mutex);
    n.net->engine = engine;
    m = n.net->registration();
  }
  // Through the keeper, which owns the registry handle after a restart.
  caf::anon_send(n.net->keeper, std::move(m));
}

expected<std::vector<node_listing>> list_nodes(caf::actor_system& sys, const caf::actor& registry,
                                               std::chrono::milliseconds timeout) {
  caf::scoped_actor self{sys};
  expected<std::vector<node_listing>> out{error{errc::unavailable, "the registry did not answer"}};
  self->request(registry, timeout, msg::node_query{})
      .receive(
          [&](msg::node_table& t) {
            std::vector<node_listing> rows;
            for (auto& e : t.nodes) rows.push_back({std::move(e.name), std::move(e.host), e.port, e.meshed, e.engine});
            out = std::move(rows);
          },
          [&](caf::error& e) { out = error{errc::unavailable, "the registry did not answer: " + sys.render(e)}; });
  return out;
}

}  // namespace kvflow::runtime
