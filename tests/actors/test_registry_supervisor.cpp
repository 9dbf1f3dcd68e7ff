// The bootstrap registry (semantics.md section 4) and the agreement supervisors (section 3) as
// actors, driven by test actors on a real threaded actor system.
#include <algorithm>
#include <map>
#include <optional>
#include <set>
#include <thread>

#include "actor_helpers.hpp"
#include "actors/agreed_ring.hpp"
#include "actors/bootstrap_registry.hpp"
#include "actors/supervisor.hpp"
#include "config/topology.hpp"

namespace kvflow::actor_test {
namespace {

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

config::cluster_config registry_config() {
  config::cluster_config c;
  c.prefill.tp = 2;
  c.prefill.cp = 2;
  c.prefill.pp = 1;
  c.prefill.dp = 1;
  c.decode.tp = 2;
  c.dtype = config::kv_dtype::fp8;
  c.model = config::parse_model("mla:4:16", c.dtype);
  c.page_size = 4;
  return c;
}

// One registration round trip; nullopt when the registry did not answer.
std::optional<msg::registration_reply> register_as(actor_fixture& f, const caf::actor& registry,
                                                   msg::rank_key key, const std::string& name,
                                                   const caf::actor& who,
                                                   std::uint32_t version = msg::wire_version,
                                                   const kv_handshake& shape = {}) {
  std::optional<msg::registration_reply> out;
  f.self->request(registry, long_wait, msg::register_rank{version, key, name, who, shape})
      .receive([&](msg::registration_reply& r) { out = r; },
               [&](caf::error& e) { FAIL_CHECK("registry did not answer: " << f.sys.render(e)); });
  return out;
}

// Asks the registry for the topology as soon as it starts; records the reply in its inbox.
caf::behavior topology_asker(caf::event_based_actor* self, inbox_ptr box, caf::actor registry) {
  self->request(registry, long_wait, msg::topology_query{})
      .then([box](msg::topology_reply& r) { box->push(caf::make_message(r)); },
            [box](caf::error&) { box->push(caf::make_message(std::string("topology query failed"))); });
  return {[](poke_atom) {}};
}

}  // namespace

// ---- bootstrap registry ----------------------------------------------------------------------

TEST_CASE("registry_table: idempotent for the same live owner, refuses another, generation after down") {
  registry_table t(registry_config().prefill);
  registry_key k{0, 1, 0, 0};
  auto a = t.add(k, 11, "prefill rank 2");
  REQUIRE(a.ok());
  CHECK(a.value() == 1);
  // The same live owner again (a repeated registration): accepted, nothing changes.
  auto again = t.add(k, 11, "prefill rank 2");
  REQUIRE(again.ok());
  CHECK(again.value() == 1);
  REQUIRE(t.entries().size() == 1);
  CHECK(t.entries().at(k).id == 11);
  CHECK(t.entries().at(k).generation == 1);
  // Another live owner of the same key: refused, naming both.
  auto other = t.add(k, 12, "prefill rank 3");
  REQUIRE_FALSE(other.ok());
  CHECK(contains(other.error().reason(), "prefill rank 2"));
  CHECK(contains(other.error().reason(), "prefill rank 3"));
  CHECK(t.entries().at(k).id == 11);
  // Keys that differ only in cp are different keys (SGLang #19119: CP ranks overwrote each other).
  auto cp0 = t.add({0, 0, 0, 0}, 12, "prefill rank 0");
  REQUIRE(cp0.ok());
  CHECK(cp0.value() == 1);
  CHECK(t.entries().size() == 2);
  // A key outside the topology is refused.
  CHECK_FALSE(t.add({0, 2, 0, 0}, 13, "prefill rank 9").ok());
  CHECK_FALSE(t.add({1, 0, 0, 0}, 13, "prefill rank 9").ok());
  CHECK_FALSE(t.add({0, 0, 0, -1}, 13, "prefill rank 9").ok());
  // After the owner went down, a new owner takes the key with the next generation.
  t.owner_down(11);
  CHECK_FALSE(t.entries().at(k).live);
  auto next = t.add(k, 14, "prefill rank 2 (restarted)");
  REQUIRE(next.ok());
  CHECK(next.value() == 2);
  CHECK(t.entries().at(k).id == 14);
  CHECK(t.entries().at(k).live);
  // ...and is idempotent for that owner too.
  auto next_again = t.add(k, 14, "prefill rank 2 (restarted)");
  REQUIRE(next_again.ok());
  CHECK(next_again.value() == 2);
}

TEST_CASE("registry_table: ready once every dp x cp x tp x pp key is registered") {
  registry_table t(registry_config().prefill);
  CHECK_FALSE(t.ready());
  std::uint64_t id = 1;
  for (int cp = 0; cp < 2; ++cp)
    for (int tp = 0; tp < 2; ++tp) {
      CHECK_FALSE(t.ready());
      REQUIRE(t.add({0, cp, tp, 0}, id, "prefill rank " + std::to_string(id)).ok());
      ++id;
    }
  CHECK(t.ready());
}

TEST_CASE("registry actor: a second live owner of a key is refused naming both owners") {
  actor_fixture f;
  auto registry = f.own(spawn_bootstrap_registry(f.sys, registry_config()));
  auto a = f.spawn_recorder().first;
  auto b = f.spawn_recorder().first;
  const msg::rank_key key{0, 1, 0, 0};

  auto first = register_as(f, registry, key, "prefill rank 2 (cp 1)", a);
  REQUIRE(first);
  CHECK(first->ok);
  CHECK(first->generation == 1);

  auto second = register_as(f, registry, key, "prefill rank 7 (intruder)", b);
  REQUIRE(second);
  CHECK_FALSE(second->ok);
  INFO("reason: " << second->reason);
  CHECK(contains(second->reason, "prefill rank 2 (cp 1)"));
  CHECK(contains(second->reason, "prefill rank 7 (intruder)"));

  // The first owner repeating its registration is accepted and keeps its generation.
  auto repeat = register_as(f, registry, key, "prefill rank 2 (cp 1)", a);
  REQUIRE(repeat);
  CHECK(repeat->ok);
  CHECK(repeat->generation == 1);

  // CP rank 0 of the same (dp, tp, pp) is a different key.
  auto cp0 = register_as(f, registry, {0, 0, 0, 0}, "prefill rank 0 (cp 0)", b);
  REQUIRE(cp0);
  CHECK(cp0->ok);
  CHECK(cp0->generation == 1);
}

TEST_CASE("registry actor: after the owner exits its key is taken again with generation 2") {
  actor_fixture f;
  auto registry = f.own(spawn_bootstrap_registry(f.sys, registry_config()));
  auto a = f.spawn_recorder().first;
  auto a2 = f.spawn_recorder().first;
  const msg::rank_key key{0, 1, 1, 0};

  auto first = register_as(f, registry, key, "prefill rank 3", a);
  REQUIRE(first);
  REQUIRE(first->ok);
  CHECK(first->generation == 1);
  auto refused = register_as(f, registry, key, "prefill rank 3 (restarted)", a2);
  REQUIRE(refused);
  CHECK_FALSE(refused->ok);

  f.kill(a);
  // The registry learns of the exit by its own monitor: retry until it did (bounded).
  std::optional<msg::registration_reply> taken;
  const auto deadline = std::chrono::steady_clock::now() + long_wait;
  while (std::chrono::steady_clock::now() < deadline) {
    taken = register_as(f, registry, key, "prefill rank 3 (restarted)", a2);
    REQUIRE(taken);
    if (taken->ok) break;
    CHECK(contains(taken->reason, "prefill rank 3"));  // still refused for the right reason
    std::this_thread::sleep_for(ms(5));
  }
  REQUIRE(taken);
  CHECK(taken->ok);
  CHECK(taken->generation == 2);

  // The new owner is what the table now serves.
  for (const msg::rank_key k : {msg::rank_key{0, 0, 0, 0}, msg::rank_key{0, 0, 1, 0},
                                msg::rank_key{0, 1, 0, 0}}) {
    auto r = register_as(f, registry, k, "filler", f.spawn_recorder().first);
    REQUIRE(r);
    REQUIRE(r->ok);
  }
  std::optional<msg::topology_reply> topo;
  f.self->request(registry, long_wait, msg::topology_query{})
      .receive([&](msg::topology_reply& t) { topo = t; },
               [&](caf::error& e) { FAIL_CHECK(f.sys.render(e)); });
  REQUIRE(topo);
  bool found = false;
  for (const auto& e : topo->entries)
    if (e.key == key) {
      found = true;
      CHECK(e.generation == 2);
      CHECK(e.name == "prefill rank 3 (restarted)");
      CHECK(e.rank == a2);
    }
  CHECK(found);
}

TEST_CASE("registry actor: a decode rank that died is looked up as down") {
  // Across processes, a proxy of a dead node may never report the death to whoever monitors it
  // later: the registry, which saw the death, says so in the lookup.
  actor_fixture f;
  auto registry = f.own(spawn_bootstrap_registry(f.sys, registry_config()));
  auto d = f.spawn_recorder().first;
  caf::send_as(d, registry, msg::register_decode{1, d});
  auto lookup = [&] {
    std::optional<msg::decode_entry> out;
    f.self->request(registry, long_wait, msg::lookup_decode{1})
        .receive([&](msg::decode_entry& e) { out = e; }, [&](caf::error& e) { FAIL_CHECK(f.sys.render(e)); });
    return out;
  };
  auto live = lookup();
  REQUIRE(live);
  CHECK(live->handle == d);
  CHECK_FALSE(live->down);
  f.kill(d);
  std::optional<msg::decode_entry> seen;
  const auto deadline = std::chrono::steady_clock::now() + long_wait;
  while (std::chrono::steady_clock::now() < deadline) {
    seen = lookup();
    REQUIRE(seen);
    if (seen->down) break;
    std::this_thread::sleep_for(ms(5));
  }
  CHECK(seen->down);
  // A restarted decode rank registering again is live.
  auto d2 = f.spawn_recorder().first;
  caf::send_as(d2, registry, msg::register_decode{1, d2});
  std::optional<msg::decode_entry> back;
  const auto deadline2 = std::chrono::steady_clock::now() + long_wait;
  while (std::chrono::steady_clock::now() < deadline2) {
    back = lookup();
    if (back && back->handle == d2) break;
    std::this_thread::sleep_for(ms(5));
  }
  REQUIRE(back);
  CHECK(back->handle == d2);
  CHECK_FALSE(back->down);
}

TEST_CASE("registry actor: topology query answered only once every key is registered") {
  actor_fixture f;
  const auto c = registry_config();
  auto registry = f.own(spawn_bootstrap_registry(f.sys, c));
  auto box = std::make_shared<inbox>();
  f.own(f.sys.spawn(topology_asker, box, registry));

  std::map<msg::rank_key, caf::actor> owners;
  std::vector<msg::rank_key> keys{{0, 0, 0, 0}, {0, 0, 1, 0}, {0, 1, 0, 0}, {0, 1, 1, 0}};
  for (std::size_t i = 0; i < keys.size(); ++i) {
    // Not answered while a key is missing.
    CHECK_FALSE(box->wait_any<msg::topology_reply>(i == 0 ? short_wait : ms(50)));
    auto who = f.spawn_recorder().first;
    owners[keys[i]] = who;
    kv_handshake shape = handshake_of(c);
    shape.page_size = 10 + static_cast<int>(i);  // each entry carries its own rank's registration
    auto r = register_as(f, registry, keys[i], "prefill rank " + std::to_string(i), who, msg::wire_version, shape);
    REQUIRE(r);
    REQUIRE(r->ok);
  }
  auto reply = box->wait_any<msg::topology_reply>();
  REQUIRE(reply);
  CHECK(box->all<std::string>().empty());
  CHECK(reply->version == msg::wire_version);
  CHECK(reply->tp == 2);
  CHECK(reply->cp == 2);
  CHECK(reply->pp == 1);
  CHECK(reply->dp == 1);
  REQUIRE(reply->entries.size() == 4);
  std::set<msg::rank_key> seen;
  for (const auto& e : reply->entries) {
    seen.insert(e.key);
    REQUIRE(owners.count(e.key) == 1);
    CHECK(e.rank == owners[e.key]);
    CHECK(e.generation == 1);
    CHECK(contains(e.name, "prefill rank"));
    const auto i = std::find(keys.begin(), keys.end(), e.key) - keys.begin();
    CHECK(e.shape.page_size == 10 + i);
    CHECK(e.shape.layout == "mla:4:16");
  }
  CHECK(seen.size() == 4);

  // Once ready, a query is answered at once.
  std::optional<msg::topology_reply> late;
  f.self->request(registry, long_wait, msg::topology_query{})
      .receive([&](msg::topology_reply& t) { late = t; },
               [&](caf::error& e) { FAIL_CHECK(f.sys.render(e)); });
  REQUIRE(late);
  CHECK(late->entries.size() == 4);
}

TEST_CASE("registry actor: a registration of another wire version is refused with a reason") {
  actor_fixture f;
  auto registry = f.own(spawn_bootstrap_registry(f.sys, registry_config()));
  auto a = f.spawn_recorder().first;
  auto bad = register_as(f, registry, {0, 0, 0, 0}, "prefill rank 0", a, msg::wire_version + 6);
  REQUIRE(bad);
  CHECK_FALSE(bad->ok);
  INFO("reason: " << bad->reason);
  CHECK(contains(bad->reason, "wire version"));
  CHECK(contains(bad->reason, std::to_string(msg::wire_version + 6)));
  // The refused registration took nothing: the key is still free for a correct one.
  auto b = f.spawn_recorder().first;
  auto good = register_as(f, registry, {0, 0, 0, 0}, "prefill rank 0 (current build)", b);
  REQUIRE(good);
  CHECK(good->ok);
  CHECK(good->generation == 1);
}

// ---- supervisors (agreement tree) ------------------------------------------------------------

namespace {

// A prefill agreement group: a root over the shard supervisors of every pipeline stage (tp * pp
// of them, shard index pp * tp + tp_rank, as config::prefill_shard_of numbers them) over test
// actors standing in for the ranks. Child i = shard * cp_size + cp. The root publishes each
// agreed round on `ring` when given one (where in-process engines read it).
struct group_tree {
  int tp = 0, cp = 0, pp = 1, group = 0;
  caf::actor root;
  std::vector<caf::actor> shards;
  std::vector<caf::actor> children;
  std::vector<inbox_ptr> boxes;

  group_tree(actor_fixture& f, int tp_size, int cp_size, int group_id, int attach, int pp_size = 1,
             std::shared_ptr<agreed_ring> ring = nullptr, std::optional<ms> tombstone_age = std::nullopt)
      : tp(tp_size), cp(cp_size), pp(pp_size), group(group_id) {
    supervisor_args top;
    top.children = tp * pp;
    top.group = group;
    top.root = true;
    if (tombstone_age) top.tombstone_age = *tombstone_age;
    top.ranks = tp * cp * pp;  // every rank attaches by message (no in-process boards)
    top.publish = std::move(ring);
    root = f.own(spawn_supervisor(f.sys, top, {}));
    for (int t = 0; t < tp * pp; ++t) {
      supervisor_args sa;
      sa.children = cp;
      sa.group = group;
      sa.index_in_parent = t;
      auto shard = f.own(spawn_supervisor(f.sys, sa, root));
      shards.push_back(shard);
      caf::send_as(shard, root, msg::attach_child{t, shard});
      for (int k = 0; k < cp; ++k) {
        auto box = std::make_shared<inbox>();
        auto child = f.own(f.sys.spawn(child_stub, box, shard));
        caf::send_as(child, shard, msg::attach_child{k, child});
        children.push_back(child);
        boxes.push_back(box);
      }
    }
    for (int i = 0; i < attach; ++i) attach_rank(i);
  }

  void attach_rank(int i) { caf::send_as(children[i], root, msg::attach_rank{children[i]}); }

  void report(int i, std::uint64_t round, step_states states) {
    std::sort(states.begin(), states.end(), key_less);
    report_as_is(i, round, std::move(states));
  }
  // Unsorted, duplicated or with states no rank posts: what a lying or broken peer sends.
  void report_as_is(int i, std::uint64_t round, step_states states) {
    caf::anon_send(children[i], msg::step_report{round, i % cp, std::move(states)});
  }

  // The agreed round `round` as child i received it.
  std::optional<msg::agreed_round> agreed(int i, std::uint64_t round, ms timeout = long_wait) {
    return boxes[i]->wait_for<msg::agreed_round>(
        [round](const msg::agreed_round& a) { return a.round == round; }, timeout);
  }
};

constexpr std::uint8_t F = 0, B = 1, W = 2, T = 3, S = 4;

room_state rs(std::uint64_t room, std::uint8_t state, bool released = false) {
  return {room, 1, state, released};
}

// Every listed child received round `round`, all identical; returns the states.
step_states agreed_by_all(group_tree& g, const std::vector<int>& who, std::uint64_t round) {
  std::optional<msg::agreed_round> first;
  for (int i : who) {
    auto a = g.agreed(i, round);
    INFO("child " << i << " round " << round);
    REQUIRE(a);
    CHECK(a->group == g.group);
    if (!first)
      first = a;
    else
      CHECK(a->states == first->states);
  }
  return first->states;
}

}  // namespace

TEST_CASE("supervisors TP2 x CP2: the agreed round is the MIN merge, identical on every rank") {
  actor_fixture f;
  group_tree g(f, 2, 2, 17, 4);
  // Rooms 1..4. Room 4 is missing from child 3: it counts as Bootstrapping there.
  g.report(0, 1, {rs(1, S), rs(2, S), rs(3, F), rs(4, T)});
  g.report(1, 1, {rs(1, T), rs(2, S), rs(3, S), rs(4, T)});
  g.report(2, 1, {rs(1, S), rs(2, S), rs(3, S), rs(4, T)});
  g.report(3, 1, {rs(1, W), rs(2, S), rs(3, S)});
  auto states = agreed_by_all(g, {0, 1, 2, 3}, 1);
  step_states expected{rs(1, W), rs(2, S), rs(3, F), rs(4, B)};
  CHECK(states == expected);

  // Incarnations are distinct keys: room 5 incarnation 2 is merged apart from incarnation 1.
  for (int i = 0; i < 4; ++i)
    g.report(i, 2, {room_state{5, 1, S}, room_state{5, 2, i == 2 ? W : S}});
  auto two = agreed_by_all(g, {0, 1, 2, 3}, 2);
  step_states expected_two{room_state{5, 1, S}, room_state{5, 2, W}};
  CHECK(two == expected_two);
}

TEST_CASE("supervisors: agreed states never go down except to Failed, and terminal states stay") {
  actor_fixture f;
  group_tree g(f, 2, 2, 3, 4);
  const std::vector<int> all{0, 1, 2, 3};
  // Round 1: room 1 agreed T, room 2 agreed Success, room 3 agreed W, room 4 agreed Failed.
  for (int i = 0; i < 4; ++i) g.report(i, 1, {rs(1, T), rs(2, S), rs(3, W), rs(4, i == 1 ? F : S)});
  CHECK(agreed_by_all(g, all, 1) == step_states{rs(1, T), rs(2, S), rs(3, W), rs(4, F)});

  // Round 2: lower reports do not lower the agreement; a Failed report does not undo Success;
  // Success reports do not revive Failed; room 3 may still fall to Failed.
  g.report(0, 2, {rs(1, B), rs(2, F), rs(3, F), rs(4, S)});
  g.report(1, 2, {rs(1, W), rs(2, S), rs(3, T), rs(4, S)});
  g.report(2, 2, {rs(1, T), rs(2, S), rs(3, T), rs(4, S)});
  g.report(3, 2, {rs(1, T), rs(2, S), rs(3, T), rs(4, S)});
  CHECK(agreed_by_all(g, all, 2) == step_states{rs(1, T), rs(2, S), rs(3, F), rs(4, F)});

  // Round 3: room 1 rises to Success once every rank reports it.
  for (int i = 0; i < 4; ++i) g.report(i, 3, {rs(1, S)});
  CHECK(agreed_by_all(g, all, 3) == step_states{rs(1, S)});

  // Round 4: nobody reports room 1 (every rank cleared it). Round 5: a late rank reports it
  // again from Bootstrapping: the agreement keeps the terminal Success, never Bootstrapping.
  for (int i = 0; i < 4; ++i) g.report(i, 4, {});
  CHECK(agreed_by_all(g, all, 4).empty());
  for (int i = 0; i < 4; ++i) g.report(i, 5, i == 3 ? step_states{rs(1, B)} : step_states{});
  CHECK(agreed_by_all(g, all, 5) == step_states{rs(1, S)});
}

// The root's tombstones were bounded by count only; they go by age now too (supervisor_args::
// tombstone_age, from failure_memory_ms). A 1 ms age and 20 ms between the rounds: the age has
// passed whatever the machine's load (the sleep only lets time pass).
TEST_CASE("supervisors: a root forgets a tombstone older than its age, so a late rank's key opens again") {
  actor_fixture f;
  group_tree g(f, 2, 1, 6, 2, 1, nullptr, ms{1});
  const std::vector<int> all{0, 1};
  for (int i = 0; i < 2; ++i) g.report(i, 1, {rs(1, S, true)});
  CHECK(agreed_by_all(g, all, 1) == step_states{rs(1, S, true)});
  for (int i = 0; i < 2; ++i) g.report(i, 2, {});  // every rank cleared room 1: its tombstone
  CHECK(agreed_by_all(g, all, 2).empty());
  std::this_thread::sleep_for(ms{20});
  // A late rank creates room 1 again: its tombstone is gone, so it is Bootstrapping (the
  // rank's bootstrap timeout bounds it), not the final Success of round 1.
  g.report(0, 3, {rs(1, B)});
  g.report(1, 3, {});
  CHECK(agreed_by_all(g, all, 3) == step_states{rs(1, B)});
}

TEST_CASE("supervisors: each published round says since which round the group agreed these very states") {
  // What lets a poll skip the copy and the comparison of a round that changed nothing.
  actor_fixture f;
  auto ring = std::make_shared<agreed_ring>();
  group_tree g(f, 2, 1, 4, 2, 1, ring);
  const std::vector<std::uint8_t> state_of_round{0, W, W, W, T, T, W};  // round 6: lower, agreed stays T
  const std::vector<std::uint64_t> since{0, 1, 1, 1, 4, 4, 4};
  for (std::uint64_t r = 1; r < state_of_round.size(); ++r) {
    for (int i = 0; i < 2; ++i) g.report(i, r, {rs(1, state_of_round[r])});
    const agreed_view* v = ring->wait_for(r, std::chrono::seconds(10));
    REQUIRE(v != nullptr);
    CAPTURE(r);
    CHECK(v->same_since == since[r]);
  }
}

TEST_CASE("supervisors: a round whose reports overtook the round before it is agreed after it") {
  // Across processes a report can overtake the previous round's (the route changes when two
  // nodes connect directly): round 2 completes first, round 1 next; the agreement must still be
  // taken round by round, or round 1 would show round 2's states (agreed states only rise).
  actor_fixture f;
  group_tree g(f, 2, 2, 3, 4);
  const std::vector<int> all{0, 1, 2, 3};
  for (int i = 0; i < 4; ++i) g.report(i, 2, {rs(1, T)});
  for (int i = 0; i < 4; ++i) g.report(i, 1, {rs(1, W)});
  CHECK(agreed_by_all(g, all, 1) == step_states{rs(1, W)});
  CHECK(agreed_by_all(g, all, 2) == step_states{rs(1, T)});
  for (int i = 0; i < 4; ++i) g.report(i, 3, {rs(1, S)});
  CHECK(agreed_by_all(g, all, 3) == step_states{rs(1, S)});
}

TEST_CASE("supervisors: a rank that dies fails every room of the pending and later rounds") {
  actor_fixture f;
  group_tree g(f, 2, 2, 9, 4);
  const std::vector<int> survivors{0, 1, 2};
  for (int i = 0; i < 4; ++i) g.report(i, 1, {rs(7, W)});
  CHECK(agreed_by_all(g, {0, 1, 2, 3}, 1) == step_states{rs(7, W)});

  // Round 2 is pending on child 3 (shard 1, cp 1), which never reports it.
  for (int i : survivors) g.report(i, 2, {rs(7, T), rs(8, W)});
  CHECK_FALSE(g.agreed(0, 2, short_wait));
  f.kill(g.children[3]);
  // The pending round completes without it: every room Failed (no stall until a timeout).
  CHECK(agreed_by_all(g, survivors, 2) == step_states{rs(7, F), rs(8, F)});

  // Every later round completes with the survivors only, and every room is Failed.
  for (int i : survivors) g.report(i, 3, {rs(7, S), rs(9, W)});
  CHECK(agreed_by_all(g, survivors, 3) == step_states{rs(7, F), rs(9, F)});
  // (The dead rank's last rooms may stay listed, Failed: ranks ignore rooms they cleared.)
  for (int i : survivors) g.report(i, 4, {rs(10, S)});
  auto four = agreed_by_all(g, survivors, 4);
  CHECK(state_of(four, 10) == F);
  for (const auto& s : four) CHECK(s.state == F);
}

// Issue 9: the merge walks sorted lists; an unsorted, duplicated or out-of-range report from one
// child made every rank's round wrong (a room listed twice or missing, a state no kv_poll), and
// dropping it would have stalled the round for good. The child counts as down instead.
TEST_CASE("regression: a malformed step report fails its child's rooms, and the group goes on") {
  const std::vector<step_states> bad{
      {rs(8, W), rs(7, W)},          // out of order
      {rs(7, W), rs(7, W), rs(8, W)},  // a key twice
      {rs(7, W), {8, 1, 9, false}},  // state 9: no kv_poll
  };
  for (const auto& states : bad) {
    actor_fixture f;
    group_tree g(f, 2, 2, 9, 4);
    const std::vector<int> survivors{0, 1, 2};
    for (int i : survivors) g.report(i, 1, {rs(7, W), rs(8, W)});
    g.report_as_is(3, 1, states);
    CHECK(agreed_by_all(g, survivors, 1) == step_states{rs(7, F), rs(8, F)});
    for (int i : survivors) g.report(i, 2, {rs(7, T), rs(9, W)});
    g.report(3, 2, {rs(7, T), rs(9, W)});  // well-formed again: it counts as down all the same
    auto two = agreed_by_all(g, survivors, 2);
    for (const auto& s : two) CHECK(s.state == F);
  }
}

TEST_CASE("supervisors PP2 x TP2: one agreement across pipeline stages, on the group's ring, released by AND") {
  // semantics.md section 3: a request has one outcome across PP stages; every rank reads the
  // same round k, whether it gets it by message or from the ring. A room is released for the
  // group only once every rank of every stage let go of its memory.
  actor_fixture f;
  auto ring = std::make_shared<agreed_ring>();
  group_tree g(f, 2, 1, 4, 4, 2, ring);
  const std::vector<int> all{0, 1, 2, 3};  // stage 0: children 0, 1; stage 1: children 2, 3
  g.report(0, 1, {rs(1, T), rs(2, F, true), rs(3, S, true)});
  g.report(1, 1, {rs(1, T), rs(2, S, true), rs(3, S, true)});
  g.report(2, 1, {rs(1, W), rs(2, S, true), rs(3, S, false)});  // stage 1 lags; still holds room 3
  g.report(3, 1, {rs(1, T), rs(2, S, true), rs(3, S, true)});
  const step_states one{rs(1, W), rs(2, F, true), rs(3, S, false)};
  CHECK(agreed_by_all(g, all, 1) == one);
  const auto* v1 = ring->get(1);
  REQUIRE(v1 != nullptr);
  CHECK(v1->round == 1);
  CHECK(v1->group == 4);
  CHECK(v1->states == one);

  // Round 2: room 2 was cleared everywhere (it leaves the rounds); stage 1 let go of room 3.
  for (int i = 0; i < 4; ++i) g.report(i, 2, {rs(1, T), rs(3, S, true)});
  const step_states two{rs(1, T), rs(3, S, true)};
  CHECK(agreed_by_all(g, all, 2) == two);
  const auto* v2 = ring->get(2);
  REQUIRE(v2 != nullptr);
  CHECK(v2->states == two);
  CHECK(ring->latest() == 2);
  CHECK(ring->get(3) == nullptr);  // never "the latest round" for a round not agreed yet
}

TEST_CASE("supervisors: the root holds agreed rounds until every rank attached") {
  actor_fixture f;
  group_tree g(f, 2, 2, 5, 3);  // child 3 not attached to the root yet
  for (int i = 0; i < 4; ++i) g.report(i, 1, {rs(1, W)});
  for (int i = 0; i < 4; ++i) CHECK_FALSE(g.agreed(i, 1, i == 0 ? short_wait : ms(20)));
  g.attach_rank(3);
  // The held round reaches every rank, the late one included.
  CHECK(agreed_by_all(g, {0, 1, 2, 3}, 1) == step_states{rs(1, W)});
  for (int i = 0; i < 4; ++i) g.report(i, 2, {rs(1, T)});
  CHECK(agreed_by_all(g, {0, 1, 2, 3}, 2) == step_states{rs(1, T)});
  for (int i = 0; i < 4; ++i) CHECK(g.boxes[i]->all<msg::agreed_round>().size() == 2);
}

// ---- senders are who they say (issue 9, hostile peers) --------------------------------------
// A peer that proved the token can still claim what it is not. Each check below is against the
// sender CAF saw; an impostor is another actor (a peer's, across processes) or nobody.

TEST_CASE("hostile: a step report claiming another child, or an attach of it, is refused, the round waits for the child") {
  actor_fixture f;
  group_tree g(f, 1, 2, 9, 2);
  auto impostor = f.own(f.sys.spawn(child_stub, std::make_shared<inbox>(), g.shards[0]));
  // As child 0: Failed for room 7 would win the MIN merge of every rank's round.
  caf::send_as(impostor, g.shards[0], msg::attach_child{0, impostor});
  caf::anon_send(g.shards[0], msg::attach_child{1, impostor});
  caf::anon_send(impostor, msg::step_report{1, 0, {rs(7, F)}});
  caf::anon_send(g.shards[0], msg::step_report{1, 1, {rs(7, F)}});  // anonymous
  g.report(1, 1, {rs(7, W)});
  CHECK_FALSE(g.agreed(1, 1, short_wait));  // child 0 has not reported: the round waits
  g.report(0, 1, {rs(7, W)});
  CHECK(agreed_by_all(g, {0, 1}, 1) == step_states{rs(7, W)});
}

TEST_CASE("hostile: an attach of a rank not sent by that rank gets it no rounds, and holds none back") {
  actor_fixture f;
  group_tree g(f, 1, 2, 5, 1);  // rank 1 not attached
  auto [spy, spy_box] = f.spawn_recorder();
  caf::anon_send(g.root, msg::attach_rank{spy});                         // anonymous
  caf::send_as(g.children[0], g.root, msg::attach_rank{spy});             // as another rank
  caf::send_as(spy, g.root, msg::attach_rank{g.children[1]});             // naming a rank it is not
  for (int i = 0; i < 2; ++i) g.report(i, 1, {rs(1, W)});
  // None of those counted: the root still holds round 1 for its second rank.
  CHECK_FALSE(g.agreed(0, 1, short_wait));
  g.attach_rank(1);
  CHECK(agreed_by_all(g, {0, 1}, 1) == step_states{rs(1, W)});
  CHECK(spy_box->all<msg::agreed_round>().empty());
}

TEST_CASE("hostile: a stray error message does not stop a supervisor") {
  actor_fixture f;
  group_tree g(f, 1, 2, 3, 2);
  auto shard = g.shards[0];
  f.self->monitor(shard);
  // CAF's default error handler stops an actor on any error message nobody asked for. (A peer's
  // exit and down messages never reach it: the link guard cuts the link that carries one.)
  caf::anon_send(shard, caf::make_error(caf::sec::runtime_error));
  f.self->send(shard, caf::make_error(caf::sec::unexpected_message));
  bool down = false;
  f.self->receive([&](const caf::down_msg&) { down = true; }, caf::after(short_wait) >> [] {});
  CHECK_FALSE(down);
  // It still agrees rounds.
  for (int i = 0; i < 2; ++i) g.report(i, 1, {rs(4, T)});
  CHECK(agreed_by_all(g, {0, 1}, 1) == step_states{rs(4, T)});
  // An exit from this process still stops it.
  CHECK(f.stop(shard));
}

TEST_CASE("hostile: the registry refuses registrations from nobody, and a second live owner of a decode rank") {
  actor_fixture f;
  auto registry = f.own(spawn_bootstrap_registry(f.sys, registry_config()));
  auto lookup = [&] {
    msg::decode_entry out;
    f.self->request(registry, long_wait, msg::lookup_decode{1})
        .receive([&](msg::decode_entry& e) { out = e; }, [&](caf::error& e) { FAIL_CHECK(f.sys.render(e)); });
    return out;
  };
  auto d = f.spawn_recorder().first;
  auto squatter = f.spawn_recorder().first;
  caf::anon_send(registry, msg::register_decode{1, squatter});
  caf::anon_send(registry, msg::register_supervisor{0, 0, squatter, {}});
  CHECK_FALSE(lookup().handle);
  caf::send_as(d, registry, msg::register_decode{1, d});
  CHECK(lookup().handle == d);
  caf::send_as(squatter, registry, msg::register_decode{1, squatter});  // d is live
  CHECK(lookup().handle == d);
  // Nor does a stray error stop it (it did: a reply it could not take came back as one).
  f.self->monitor(registry);
  caf::anon_send(registry, caf::make_error(caf::sec::unexpected_message));
  bool down = false;
  f.self->receive([&](const caf::down_msg&) { down = true; }, caf::after(short_wait) >> [] {});
  CHECK_FALSE(down);
  CHECK(lookup().handle == d);
  msg::supervisor_entry sup;
  f.self->request(registry, long_wait, msg::lookup_supervisor{0, 0})
      .receive([&](msg::supervisor_entry& e) { sup = e; }, [&](caf::error&) {});
  CHECK_FALSE(sup.handle);
}

}  // namespace kvflow::actor_test
