#include "actors/bootstrap_registry.hpp"

#include <spdlog/spdlog.h>

#include <set>

#include "actors/messages.hpp"
#include "actors/sender_check.hpp"

namespace kvflow {

std::string to_string(const registry_key& k) {
  return "(dp_group=" + std::to_string(k.dp_group) + ", cp=" + std::to_string(k.cp) +
         ", tp=" + std::to_string(k.tp) + ", pp=" + std::to_string(k.pp) + ")";
}

status registry_table::check_key(const registry_key& k) const {
  const auto& t = topology_;
  if (k.dp_group < 0 || k.dp_group >= t.dp || k.cp < 0 || k.cp >= t.cp || k.tp < 0 ||
      k.tp >= t.tp || k.pp < 0 || k.pp >= t.pp)
    return status::error("registration key " + to_string(k) + " outside the prefill topology");
  return {};
}

result<std::uint64_t> registry_table::add(const registry_key& key, std::uint64_t id,
                                          const std::string& name) {
  if (auto s = check_key(key); !s) return s;
  auto it = entries_.find(key);
  if (it == entries_.end()) {
    entries_.emplace(key, owner{id, name, true, 1});
    return std::uint64_t{1};
  }
  auto& o = it->second;
  if (o.live && o.id == id) return o.generation;
  if (o.live)
    return status::error("registration of " + to_string(key) + " by " + name +
                         " refused: owned by live " + o.name);
  o = owner{id, name, true, o.generation + 1};
  return o.generation;
}

void registry_table::owner_down(std::uint64_t id) {
  for (auto& [k, o] : entries_)
    if (o.id == id) o.live = false;
}

bool registry_table::ready() const {
  // Every key registered once. An owner that died since stays in the table (not live): askers
  // then see it down at once instead of waiting for a table that can never fill.
  return entries_.size() == static_cast<std::size_t>(topology_.ranks());
}

namespace {

struct registry_state {
  registry_table table{config::prefill_topology{}};
  config::cluster_config config;
  // Live owners by registry-assigned id: actor ids are unique only within one process, and
  // ranks register from many.
  std::map<std::uint64_t, caf::actor> actors;
  std::uint64_t next_owner = 1;
  std::vector<caf::response_promise> waiting;  // topology queries parked until ready
  std::map<std::int32_t, caf::actor> decode;    // decode ranks (kept after they die: watchers
                                                // that monitor a dead handle learn it at once)
  std::set<std::int32_t> decode_down;           // decode ranks seen going down (until re-registered)
  std::map<registry_key, kv_handshake> shapes;  // what each key's latest owner registered
  std::map<std::string, msg::node_entry> nodes;  // rank processes by name: where they listen
  std::map<std::pair<std::int32_t, std::int32_t>, msg::register_supervisor> supervisors;  // (group, index)
  static inline const char* name = "kvflow.bootstrap_registry";
};
using registry_actor = caf::stateful_actor<registry_state>;

msg::topology_reply make_reply(registry_actor* self) {
  auto& st = self->state;
  const auto& c = st.config;
  msg::topology_reply r;
  r.tp = c.prefill.tp;
  r.cp = c.prefill.cp;
  r.pp = c.prefill.pp;
  r.dp = c.prefill.dp;
  for (const auto& [k, o] : st.table.entries()) {
    msg::registry_entry e;
    e.key = k;
    e.name = o.name;
    e.generation = o.generation;
    if (auto sh = st.shapes.find(k); sh != st.shapes.end()) e.shape = sh->second;
    if (auto it = st.actors.find(o.id); it != st.actors.end()) e.rank = it->second;
    r.entries.push_back(std::move(e));
  }
  return r;
}

caf::behavior registry(registry_actor* self, config::cluster_config c) {
  self->state.config = c;
  self->state.table = registry_table(c.prefill);
  detail::refuse_stray_errors(self, "bootstrap registry");
  self->set_down_handler([self](const caf::down_msg& dm) {
    auto& st = self->state;
    for (const auto& [rank, h] : st.decode)
      if (h.address() == dm.source) st.decode_down.insert(rank);
    for (auto it = st.actors.begin(); it != st.actors.end(); ++it)
      if (it->second.address() == dm.source) {
        st.table.owner_down(it->first);
        st.actors.erase(it);
        break;
      }
  });
  return {
      [self](msg::register_rank& r) -> msg::registration_reply {
        auto& st = self->state;
        if (r.version != msg::wire_version)
          return {false, 0, "wire version " + std::to_string(r.version) + " != registry's " +
                                std::to_string(msg::wire_version)};
        if (!r.rank) return {false, 0, "registration of " + r.name + " without an actor handle"};
        if (!detail::from_node_of(self, r.rank))
          return {false, 0, "registration of " + r.name + " refused: it names an actor of another process"};
        std::uint64_t owner = 0;
        for (const auto& [id, a] : st.actors)
          if (a == r.rank) owner = id;
        const bool known = owner != 0;
        if (!known) owner = st.next_owner++;
        auto res = st.table.add(r.key, owner, r.name);
        if (!res) {
          spdlog::error("bootstrap: {}", res.error().reason());
          return {false, 0, res.error().reason()};
        }
        st.shapes[r.key] = r.shape;
        if (!known) {
          st.actors.emplace(owner, r.rank);
          self->monitor(r.rank);
        }
        if (st.table.ready()) {
          auto reply = make_reply(self);
          for (auto& p : st.waiting) p.deliver(reply);
          st.waiting.clear();
        }
        return {true, res.value(), {}};
      },
      [self](msg::register_decode& r) {
        auto& st = self->state;
        if (!r.handle) return;
        if (!detail::from_node_of(self, r.handle)) {
          spdlog::warn("bootstrap: a registration of decode rank {} naming an actor of another process refused", r.rank);
          return;
        }
        // A live decode rank keeps its entry; one seen down may be replaced (a restart).
        if (auto it = st.decode.find(r.rank); it != st.decode.end() && it->second && it->second != r.handle &&
                                              !st.decode_down.count(r.rank)) {
          spdlog::warn("bootstrap: decode rank {} registered again while its live owner holds it; refused", r.rank);
          return;
        }
        auto& h = st.decode[r.rank];
        if (h == r.handle) return;
        h = r.handle;
        st.decode_down.erase(r.rank);
        self->monitor(r.handle);
      },
      [self](msg::register_node& n) -> msg::registration_reply {
        if (n.version != msg::wire_version)
          return {false, 0, "wire version " + std::to_string(n.version) + " != registry's " +
                                std::to_string(msg::wire_version)};
        if (n.engine && !detail::from_node_of(self, n.engine))
          return {false, 0, "node " + n.name + " refused: its engine is an actor of another process"};
        self->state.nodes[n.name] = msg::node_entry{n.name, n.host, n.port, n.meshed, n.engine};
        return {true, 1, {}};
      },
      [self](msg::node_query) -> msg::node_table {
        msg::node_table t;
        for (const auto& [name, e] : self->state.nodes) t.nodes.push_back(e);
        return t;
      },
      [self](msg::register_supervisor& r) {
        if (!r.handle) return;
        if (!detail::from_node_of(self, r.handle)) {
          spdlog::warn("bootstrap: a registration of supervisor {} of group {} naming an actor of another process refused",
                       r.index, r.group);
          return;
        }
        self->state.supervisors[{r.group, r.index}] = r;
      },
      [self](msg::lookup_supervisor& l) -> msg::supervisor_entry {
        auto& s = self->state.supervisors;
        auto it = s.find({l.group, l.index});
        if (it == s.end()) return {l.group, l.index, caf::actor{}, {}};
        return {l.group, l.index, it->second.handle, it->second.shared_memory};
      },
      [self](msg::lookup_decode& l) -> msg::decode_entry {
        auto& d = self->state.decode;
        auto it = d.find(l.rank);
        return {l.rank, it == d.end() ? caf::actor{} : it->second, self->state.decode_down.count(l.rank) != 0};
      },
      [self](msg::topology_query& q) -> caf::result<msg::topology_reply> {
        auto& st = self->state;
        if (q.version != msg::wire_version) {
          auto r = msg::topology_reply{};
          r.version = msg::wire_version;
          return r;  // the asker sees the version differs and reports it
        }
        if (st.table.ready()) return make_reply(self);
        auto p = self->make_response_promise<msg::topology_reply>();
        st.waiting.push_back(p);
        return p;
      },
  };
}

}  // namespace

caf::actor spawn_bootstrap_registry(caf::actor_system& sys, const config::cluster_config& c) {
  return sys.spawn(registry, c);
}

}  // namespace kvflow
