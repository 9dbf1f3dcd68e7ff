#pragma once
// The bootstrap registry: prefill ranks register under (dp_group, cp, tp, pp); decode ranks ask
// for the topology and the table. Pure table + the actor that serves it.
#include <caf/fwd.hpp>
#include <cstdint>
#include <map>
#include <string>

#include "config/status.hpp"
#include "config/topology.hpp"

namespace kvflow {

// The key a prefill rank registers under (semantics.md section 4); also what msg::rank_key is.
struct registry_key {
  std::int32_t dp_group = 0, cp = 0, tp = 0, pp = 0;
  bool operator<(const registry_key& o) const {
    if (dp_group != o.dp_group) return dp_group < o.dp_group;
    if (cp != o.cp) return cp < o.cp;
    if (tp != o.tp) return tp < o.tp;
    return pp < o.pp;
  }
  bool operator==(const registry_key& o) const {
    return dp_group == o.dp_group && cp == o.cp && tp == o.tp && pp == o.pp;
  }
};
std::string to_string(const registry_key& k);

// The table, without actors: owners are opaque ids (the actor's id in the actor).
class registry_table {
 public:
  struct owner {
    std::uint64_t id = 0;
    std::string name;
    bool live = true;
    std::uint64_t generation = 0;
  };
  explicit registry_table(const config::prefill_topology& t) : topology_(t) {}

  // Registers `id` under `key`. Refused when a live other owner holds it (error names both);
  // accepted with generation + 1 after the owner went down; idempotent for the same live owner.
  result<std::uint64_t> add(const registry_key& key, std::uint64_t id, const std::string& name);
  // The owner `id` went down: its keys stay (for the generation) but count as not live.
  void owner_down(std::uint64_t id);
  bool ready() const;  // every (dp, cp, tp, pp) was registered (its owner may have died since)
  const std::map<registry_key, owner>& entries() const { return entries_; }

 private:
  status check_key(const registry_key& key) const;
  config::prefill_topology topology_;
  std::map<registry_key, owner> entries_;
};

caf::actor spawn_bootstrap_registry(caf::actor_system& sys, const config::cluster_config& c);

}  // namespace kvflow
