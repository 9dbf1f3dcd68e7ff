// The decode (receiver) rank actor: semantics.md section 2 "Receiver" and section 5. The engine's
// calls arrive as msg::api_* (created, destinations, abort); every handler runs under the lock
// of what the rank shares with the engine's thread.
#include <spdlog/spdlog.h>

#include <cstring>
#include <map>
#include <set>

#include "actors/block_plan.hpp"
#include "actors/rank.hpp"
#include "actors/rank_common.hpp"
#include "cuda/host_memory.hpp"

namespace kvflow {
namespace {

struct prefill_peer {
  caf::actor handle;
  bool down = false;
  std::string refused;  // it registered another KV configuration: its rooms fail with this
};

struct decode_room {
  std::uint64_t room = 0;
  std::uint64_t inc = 0;
  std::vector<int> peers;   // global prefill ranks this request reads
  std::set<int> responded;  // distinct prefill ranks that reported Success
  std::int32_t aux_slot = -1;
  std::set<int> sent_to;    // prefill ranks that got its destinations (they may write)
  std::set<int> acked;      // of those, the ones that said their writes drained
  std::uint64_t incarnation() const { return inc; }
};

struct decode_state {
  rank_args args;
  const config::decode_rank_plan* me = nullptr;
  std::map<std::uint64_t, decode_room> rooms;
  std::map<int, prefill_peer> peers;  // by global prefill rank
  bool connected = false;
  std::string fatal;  // set when the prefill side is incompatible: every room fails with it
  std::vector<std::uint64_t> waiting_connect;
  // Aborts of requests the engine could not create here, for prefill peers not known yet.
  struct owed_abort {
    std::uint64_t room, inc;
    std::vector<int> peers;
    std::string reason;
  };
  std::vector<owed_abort> owed_aborts;
  // The registry could not answer the topology query (down, or restarted before it was ready):
  // why, and the wait before asking again. Rooms fail with it meanwhile; set_registry or the
  // retry timer asks again.
  std::string registry_problem;
  std::chrono::milliseconds retry_after{0};
  std::uint64_t query = 0;  // the latest topology query; answers to earlier ones are ignored
  bool querying = false;
  // One aux_record per aux row: where prefill marks a slot landed.
  std::byte* receipts_base = nullptr;
  cuda::host_memory receipts_mapped;  // when the transport allocates none
  remote_pool described;
  std::vector<transport::region_desc> described_regions;  // what peers need to write into them
  std::vector<std::uint64_t> regions;  // registered with the transport; removed before the memory
  std::string name;
  const char* side = "decode";
  bool leaving = false;  // asked to stop: it goes once no peer can write into its memory
  detail::actor_store<decode_state> store() { return {*this}; }

  decode_state() = default;
  decode_state(const decode_state&) = delete;
  decode_state& operator=(const decode_state&) = delete;
  ~decode_state() {
    // Peers may still push: the transport must forget this memory before it is given back.
    if (args.transport)
      for (auto id : regions) args.transport->deregister_memory(id);
  }
};
using decode_actor = caf::stateful_actor<decode_state>;

void leave_if_drained(decode_actor* self);

bool peer_down(const decode_state& st, int p) {
  auto it = st.peers.find(p);
  return it != st.peers.end() && it->second.down;
}

// A terminal room lets go of its pages once no prefill peer can still write into them: it
// succeeded (every peer finished), or every peer that got its destinations acknowledged the
// abort (its pushes drained) or is down.
void settle(decode_actor* self, decode_room& r) {
  auto& st = self->state;
  const auto* e = st.store().find(r.room);
  if (e == nullptr || !is_terminal(e->state) || e->released) return;
  if (e->state == kv_poll::failed)
    for (int p : r.sent_to)
      if (!r.acked.count(p) && !peer_down(st, p)) return;
  st.store().set_released(r.room);
  if (e->state == kv_poll::failed && !r.sent_to.empty() && st.args.shared->counters.quarantined > 0)
    --st.args.shared->counters.quarantined;
  if (st.leaving) leave_if_drained(self);
}

// A stopping rank goes once every room it holds is released: then no peer can still write into
// its memory, which the state's destructor deregisters (and frees, where the transport
// allocated it). Until then the memory stays registered and mapped.
void leave_if_drained(decode_actor* self) {
  auto& st = self->state;
  for (const auto& [room, r] : st.rooms)
    if (const auto* e = st.store().find(room); e != nullptr && !e->released) return;
  self->quit(caf::exit_reason::user_shutdown);
}

// The global prefill ranks this rank reads a request of prefill dp group `dp` from.
std::vector<int> peers_of(const decode_state& st, int dp) {
  std::vector<int> out;
  for (const auto& pe : st.me->peers)
    out.push_back(config::prefill_rank_of(st.args.plan->config().prefill, {dp, pe.pp, pe.cp, pe.tp}));
  return out;
}

// Tells every prefill peer (that can be reached) the request is aborted: they stop sending, and
// acknowledge once their writes drained.
void abort_peers(decode_actor* self, std::uint64_t room, std::uint64_t inc, const std::vector<int>& peers,
                 const std::string& reason) {
  auto& st = self->state;
  for (int p : peers)
    if (auto pi = st.peers.find(p); pi != st.peers.end() && !pi->second.down && pi->second.handle)
      self->send(pi->second.handle, msg::abort_room{room, inc, st.args.rank, reason});
}

// The same, for a rank that may not know its peers yet: then the abort is owed, and goes once
// the topology came (a peer that holds the request would otherwise wait for destinations that
// never come, until its bootstrap timeout). Bounded like the rooms a rank may hold.
void abort_or_owe(decode_actor* self, std::uint64_t room, std::uint64_t inc, std::vector<int> peers,
                  const std::string& reason) {
  auto& st = self->state;
  if (st.connected)
    abort_peers(self, room, inc, peers, reason);
  else if (st.owed_aborts.size() < static_cast<std::size_t>(st.args.tunables.max_rooms_per_rank))
    st.owed_aborts.push_back({room, inc, std::move(peers), reason});
}

void fail_room(decode_actor* self, std::uint64_t room, const std::string& reason) {
  auto& st = self->state;
  auto it = st.rooms.find(room);
  if (it == st.rooms.end() || !st.store().fail(room, reason)) return;
  auto& r = it->second;
  spdlog::debug("{}: room {} failed: {}", st.name, room, reason);
  abort_or_owe(self, r.room, r.inc, r.peers, reason);
  if (!r.sent_to.empty()) ++st.args.shared->counters.quarantined;
  settle(self, r);
}

bool aux_landed(const decode_state& st, const decode_room& r) {
  if (!st.me->expects_aux) return true;
  aux_record rec;
  std::memcpy(&rec, st.receipts_base + std::uint64_t(r.aux_slot) * sizeof(aux_record), sizeof rec);
  return rec.room == r.room && rec.incarnation == r.inc && rec.check == aux_checksum(rec);
}

void check_done(decode_actor* self, decode_room& r) {
  auto& st = self->state;
  if (static_cast<int>(r.responded.size()) < st.me->required_prefill_response_num) return;
  if (!aux_landed(st, r)) {
    fail_room(self, r.room, "every prefill rank reported Success but the aux slot did not land");
    return;
  }
  st.store().update(r.room, kv_poll::success);
  settle(self, r);
}

// Peers resolved: the room is ready for the engine's destinations.
void ready(decode_actor* self, decode_room& r) {
  auto& st = self->state;
  if (!st.fatal.empty()) return fail_room(self, r.room, st.fatal);
  for (int p : r.peers) {
    if (peer_down(st, p)) return fail_room(self, r.room, "prefill rank " + std::to_string(p) + " down");
    if (auto it = st.peers.find(p); it != st.peers.end() && !it->second.refused.empty())
      return fail_room(self, r.room, it->second.refused);
  }
  st.store().update(r.room, kv_poll::waiting_for_input);
}

void forget(decode_actor* self, std::uint64_t room) { self->state.rooms.erase(room); }

// Registers every buffer of the engine's memory and the receipts with the transport.
status register_memory(decode_state& st) {
  const auto owner = static_cast<std::uint64_t>(st.args.rank);
  const auto& mem = *st.args.memory;
  auto reg = [&](const buffer_view& b, remote_buffer& out) -> status {
    // A buffer the engine placed in memory the transport allocated is part of that region.
    if (auto in = st.args.transport->region_of(b.base, b.bytes)) {
      const auto& d = in.value();
      if (std::none_of(st.described_regions.begin(), st.described_regions.end(),
                       [&](const transport::region_desc& x) { return x.id == d.id; }))
        st.described_regions.push_back(d);
      out = {d.id, reinterpret_cast<std::uintptr_t>(b.base) - d.address, b.bytes, b.page_bytes};
      return {};
    }
    auto d = st.args.transport->register_memory(owner, b.base, b.bytes);
    if (!d) return d.error();
    st.regions.push_back(d->id);
    st.described_regions.push_back(d.value());
    out = {d->id, 0, b.bytes, b.page_bytes};
    return {};
  };
  auto& p = st.described;
  p = describe_shape(mem);
  for (const auto* list : {&mem.kv_buffers(), &mem.aux_buffers(), &mem.state_buffers()}) {
    auto& out = list == &mem.kv_buffers() ? p.kv : list == &mem.aux_buffers() ? p.aux : p.state;
    for (const auto& b : *list) {
      out.emplace_back();
      if (auto s = reg(b, out.back()); !s) return s;
    }
  }
  // The receipts are kvflow's own: in transport-allocated memory when it offers some (so a
  // same-host peer writes every region the same way), else mapped here and registered.
  const std::uint64_t bytes = std::uint64_t(std::max(1, mem.aux_rows())) * sizeof(aux_record);
  if (auto a = st.args.transport->allocate_memory(owner, bytes)) {
    st.receipts_base = a->base;
    st.regions.push_back(a->desc.id);
  } else {
    st.receipts_mapped = cuda::host_memory(bytes);
    st.receipts_base = st.receipts_mapped.data();
  }
  return reg({st.receipts_base, bytes, sizeof(aux_record)}, p.receipts);
}

void on_topology(decode_actor* self, const msg::topology_reply& t) {
  auto& st = self->state;
  st.registry_problem.clear();
  st.retry_after = std::chrono::milliseconds{0};
  const auto& cfg = st.args.plan->config();
  if (t.version != msg::wire_version)
    st.fatal = "bootstrap registry speaks wire version " + std::to_string(t.version);
  else if (t.tp != cfg.prefill.tp || t.cp != cfg.prefill.cp || t.pp != cfg.prefill.pp || t.dp != cfg.prefill.dp)
    st.fatal = "the bootstrap registry holds another prefill topology than this decode rank was configured for";
  if (st.fatal.empty()) {
    std::map<msg::rank_key, const msg::registry_entry*> table;
    for (const auto& e : t.entries) table[e.key] = &e;
    const auto mine = handshake_of(cfg);
    msg::kv_registration reg;
    reg.decode_rank = st.args.rank;
    reg.dp = st.me->coord.dp;
    reg.pp = st.me->coord.pp;
    reg.tp = st.me->coord.tp;
    reg.tp_size = cfg.decode.tp;
    reg.pool = st.described;
    reg.decode = caf::actor_cast<caf::actor>(self);
    reg.endpoint = st.args.transport->endpoint();
    reg.regions = st.described_regions;
    reg.shape = mine;
    for (int g = 0; g < cfg.prefill.dp; ++g)
      for (const auto& pe : st.me->peers) {
        int p = config::prefill_rank_of(cfg.prefill, {g, pe.pp, pe.cp, pe.tp});
        const auto* e = table[msg::rank_key{g, pe.cp, pe.tp, pe.pp}];
        auto h = e != nullptr ? e->rank : caf::actor{};
        auto& peer = st.peers[p];
        peer.handle = h;
        peer.down = !h;
        // What the prefill rank registered itself, not the registry's own flags.
        // Its rooms fail here at once; the registration still goes, so that the prefill rank
        // refuses this side too and fails its own rooms instead of waiting for destinations.
        if (auto why = h ? handshake_mismatch(mine, e->shape) : std::string{}; !why.empty()) {
          peer.refused = "prefill rank " + std::to_string(p) + " registered another KV configuration: " + why;
          spdlog::error("{}: {}", st.name, peer.refused);
        }
        if (h) {
          self->send(h, reg);  // once per connection
          self->monitor(h);
        }
      }
  } else {
    spdlog::error("{}: {}", st.name, st.fatal);
  }
  st.connected = true;
  auto owed = std::move(st.owed_aborts);
  for (const auto& a : owed) abort_peers(self, a.room, a.inc, a.peers, a.reason);
  auto waiting = std::move(st.waiting_connect);
  for (auto room : waiting)
    if (auto it = st.rooms.find(room); it != st.rooms.end()) ready(self, it->second);
}

void registry_failed(decode_actor* self, std::string why);

// Asks the registry for the prefill side's topology (parked there until every prefill rank
// registered). An error does not end the rank: rooms waiting fail with the reason, and it asks
// again after a backoff, or at once when a restarted registry is set. `again`: a new registry,
// whose answer replaces that of a query still out to the old one (a registry on a dead node may
// never answer).
void query_topology(decode_actor* self, bool again = false) {
  auto& st = self->state;
  if (st.connected || (st.querying && !again)) return;
  st.querying = true;
  const auto id = ++st.query;
  self->request(st.args.registry, caf::infinite, msg::topology_query{})
      .then(
          [self, id](msg::topology_reply& t) {
            auto& st = self->state;
            auto g = detail::lock(*st.args.shared);
            if (id != st.query || st.connected) return;
            st.querying = false;
            on_topology(self, t);
          },
          [self, id](caf::error& e) {
            auto& st = self->state;
            auto g = detail::lock(*st.args.shared);
            if (id != st.query || st.connected) return;
            registry_failed(self, "bootstrap registry unavailable: " + self->system().render(e));
          });
}

// The topology query failed, or the registry went down with it parked (CAF 0.17 answers a
// request parked in an actor that dies with nothing): the rooms waiting fail with the reason,
// and the query goes again after a backoff.
void registry_failed(decode_actor* self, std::string why) {
  auto& st = self->state;
  st.querying = false;
  ++st.query;
  st.registry_problem = std::move(why);
  spdlog::error("{}: {}", st.name, st.registry_problem);
  auto waiting = std::move(st.waiting_connect);
  for (auto room : waiting) fail_room(self, room, st.registry_problem);
  const std::chrono::milliseconds first{200}, most{10000};
  st.retry_after = st.retry_after.count() == 0 ? first : std::min(st.retry_after * 2, most);
  self->delayed_send(self, st.retry_after, msg::topology_retry{});
}

caf::behavior decode_rank(decode_actor* self, rank_args args) {
  auto& st = self->state;
  st.args = std::move(args);
  st.me = &st.args.plan->decode(st.args.rank);
  st.name = "decode rank " + std::to_string(st.args.rank);
  if (auto s = register_memory(st); !s) {
    st.fatal = "cannot register KV memory: " + s.reason();
    spdlog::error("{}: {}", st.name, st.fatal);
  }
  self->send(st.args.parent, msg::attach_child{st.args.child_index, caf::actor_cast<caf::actor>(self)});
  self->send(st.args.registry, msg::register_decode{st.args.rank, caf::actor_cast<caf::actor>(self)});
  query_topology(self);
  if (st.args.registry) self->monitor(st.args.registry);

  // Asked to stop (the node stops, or the engine linked to it went): every unfinished room fails
  // and its peers are told, and the rank stays until their writes drained (each acknowledged its
  // abort or is down) or the flush timeout passed, instead of unmapping memory a push may still
  // be writing (UCX 1.13's emulated puts write whatever address they carry).
  detail::refuse_stray_errors(self, st.name);
  self->set_exit_handler([self](caf::exit_msg& m) {
    auto& st = self->state;
    auto g = detail::lock(*st.args.shared);
    if (st.leaving) return;
    st.leaving = true;
    std::vector<std::uint64_t> live;
    for (const auto& [room, r] : st.rooms)
      if (const auto* e = st.store().find(room); e != nullptr && !is_terminal(e->state)) live.push_back(room);
    for (auto room : live) fail_room(self, room, "decode rank stopping: " + self->system().render(m.reason));
    self->delayed_send(self, std::chrono::milliseconds(st.args.tunables.ucx_flush_timeout_ms), msg::leave_expiry{});
    leave_if_drained(self);
  });
  self->monitor(st.args.parent);
  self->set_down_handler([self](const caf::down_msg& dm) {
    auto& st = self->state;
    auto g = detail::lock(*st.args.shared);
    if (detail::on_parent_down(self, dm, [self](std::uint64_t room, const std::string& why) { fail_room(self, room, why); }))
      return;
    if (st.args.registry && dm.source == st.args.registry.address()) {
      if (!st.connected) registry_failed(self, "bootstrap registry down: " + self->system().render(dm.reason));
      return;
    }
    for (auto& [p, peer] : st.peers)
      if (peer.handle && peer.handle.address() == dm.source && !peer.down) {
        peer.down = true;
        std::vector<std::uint64_t> touched;
        for (auto& [room, r] : st.rooms)
          if (std::find(r.peers.begin(), r.peers.end(), p) != r.peers.end()) touched.push_back(room);
        for (auto room : touched) {
          const auto* e = st.store().find(room);
          if (e != nullptr && !is_terminal(e->state)) fail_room(self, room, "prefill rank " + std::to_string(p) + " down");
          if (auto it = st.rooms.find(room); it != st.rooms.end()) settle(self, it->second);  // it writes no more
        }
      }
  });

  return caf::message_handler{
      [self](msg::api_create& q) {
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        // The API created the store entry (refusing duplicates at once). Gone or replaced: the
        // engine cleared it already.
        const auto* e = st.args.shared->store.find(q.room);
        if (e == nullptr || e->incarnation != q.incarnation) return;
        if (auto old = st.rooms.find(q.room); old != st.rooms.end()) {
          if (old->second.inc == q.incarnation) return;  // seen already
          forget(self, q.room);  // an earlier request of the room, which the engine cleared
        }
        decode_room r;
        r.room = q.room;
        r.inc = q.incarnation;
        r.peers = peers_of(st, q.other_dp);
        auto& room = st.rooms.emplace(q.room, std::move(r)).first->second;
        if (st.args.shared->lost) fail_room(self, q.room, st.args.shared->lost_reason);
        if (detail::failed_before_created(st, q.room, q.incarnation))
          fail_room(self, q.room, detail::group_failed_reason(st.side));
        if (e->state == kv_poll::failed) {
          settle(self, room);
          return;
        }
        // Bounded until its group agrees past Bootstrapping (the topology may not come, or a
        // rank of the group may not hold the request).
        self->delayed_send(self, std::chrono::milliseconds(st.args.tunables.bootstrap_timeout_ms),
                           msg::agreement_expiry{q.room, q.incarnation});
        if (st.connected)
          ready(self, room);
        else if (!st.registry_problem.empty())
          fail_room(self, q.room, st.registry_problem);
        else
          st.waiting_connect.push_back(q.room);
      },
      [self](msg::leave_expiry&) {
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        if (!st.leaving) return;
        spdlog::warn("{}: stopping with prefill writes not acknowledged within the flush timeout", st.name);
        self->quit(caf::exit_reason::user_shutdown);
      },
      [self](msg::topology_retry&) {
        auto g = detail::lock(*self->state.args.shared);
        query_topology(self);
      },
      [self](msg::set_registry& r) {
        // A restarted registry: ask it at once if the topology is still missing.
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        if (!r.registry || !detail::from_this_process(self)) return;
        st.args.registry = r.registry;
        self->monitor(r.registry);
        query_topology(self, true);
      },
      [self](msg::api_destinations& d) {
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        auto it = st.rooms.find(d.room);
        if (it == st.rooms.end() || it->second.inc != d.incarnation) return;
        auto& r = it->second;
        const auto* e = st.store().find(d.room);
        if (e == nullptr || e->state != kv_poll::waiting_for_input || !r.sent_to.empty()) return;
        r.aux_slot = d.aux_slot;
        if (st.me->expects_aux)  // a recycled slot must not look landed for this request
          std::memset(st.receipts_base + std::uint64_t(d.aux_slot) * sizeof(aux_record), 0, sizeof(aux_record));
        for (int p : r.peers) {
          msg::dst_info m;
          m.room = d.room;
          m.incarnation = d.incarnation;
          m.decode_rank = st.args.rank;
          m.dst_pages = d.pages;
          m.aux_slot = d.aux_slot;
          m.prefix_pages = d.prefix_pages;
          m.state_indices = d.state_pages;
          r.sent_to.insert(p);  // it may write from here on, even if this message is lost
          if (st.args.drop_dst && st.args.drop_dst(m)) continue;
          self->send(st.peers.at(p).handle, std::move(m));
        }
        self->delayed_send(self, std::chrono::milliseconds(st.args.tunables.waiting_timeout_ms),
                           msg::room_timeout{d.room, d.incarnation});
      },
      [self](msg::kv_status& s) {
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        auto it = st.rooms.find(s.room);
        if (it == st.rooms.end() || it->second.inc != s.incarnation) return;
        auto& r = it->second;
        if (std::find(r.peers.begin(), r.peers.end(), s.prefill_rank) == r.peers.end()) {
          spdlog::warn("{}: status for room {} from prefill rank {}, not a peer", st.name, s.room, s.prefill_rank);
          return;
        }
        auto state = static_cast<kv_poll>(s.state);
        if (state == kv_poll::failed) {
          fail_room(self, s.room, "prefill rank " + std::to_string(s.prefill_rank) + ": " + s.reason);
        } else if (state == kv_poll::success) {
          r.responded.insert(s.prefill_rank);
          const auto* e = st.store().find(s.room);
          if (e != nullptr && !is_terminal(e->state)) check_done(self, r);
        } else if (state == kv_poll::transferring) {
          st.store().update(s.room, kv_poll::transferring);
        }
      },
      [self](msg::abort_ack& a) {
        // The prefill rank's writes for the room drained: one less reason to keep its pages.
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        auto it = st.rooms.find(a.room);
        if (it == st.rooms.end() || it->second.inc != a.incarnation) return;
        it->second.acked.insert(a.prefill_rank);
        settle(self, it->second);
      },
      [self](msg::api_refused& q) {
        // The engine could not create the request here (its room is held by another live
        // request): the prefill peers that hold it would wait for this rank's destinations until
        // their bootstrap timeout. They fail it now.
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        if (q.other_dp < 0 || q.other_dp >= st.args.plan->config().prefill.dp) return;
        abort_or_owe(self, q.room, q.incarnation, peers_of(st, q.other_dp), q.reason);
      },
      [self](msg::api_abort& a) {
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        auto it = st.rooms.find(a.room);
        // A late abort of an earlier request must not touch the request reusing its room.
        if (it == st.rooms.end() || it->second.inc != a.incarnation) return;
        const auto* e = st.store().find(a.room);
        if (e != nullptr && !is_terminal(e->state)) {
          ++st.args.shared->counters.aborted;
          fail_room(self, a.room, "aborted: " + a.reason);
        }
      },
      [self](msg::room_timeout& t) {
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        auto it = st.rooms.find(t.room);
        if (it == st.rooms.end() || it->second.inc != t.incarnation) return;
        const auto* e = st.store().find(t.room);
        if (e != nullptr && !is_terminal(e->state))
          fail_room(self, t.room, "waiting timeout: " + std::to_string(it->second.responded.size()) + " of " +
                                      std::to_string(st.me->required_prefill_response_num) +
                                      " prefill ranks responded");
      },
  }
      .or_else(detail::rank_handlers(
          self, [self](std::uint64_t room, const std::string& why) { fail_room(self, room, why); },
          [self](std::uint64_t room) { forget(self, room); }));
}

}  // namespace

caf::actor spawn_decode_rank(caf::actor_system& sys, rank_args args) {
  return sys.spawn(decode_rank, std::move(args));
}

}  // namespace kvflow
