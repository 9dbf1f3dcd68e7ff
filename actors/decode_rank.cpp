// The decode (receiver) rank actor: semantics.md section 2 "Receiver" and section 5.
#include <spdlog/spdlog.h>

#include <map>
#include <set>

#include "actors/block_plan.hpp"
#include "actors/rank.hpp"
#include "actors/rank_common.hpp"

namespace kvflow {
namespace {

struct prefill_peer {
  caf::actor handle;
  bool down = false;
};

struct decode_room {
  request_view req;
  std::vector<std::int32_t> pages;
  std::int32_t aux_slot = -1;
  std::vector<std::int32_t> state_pages;  // destinations of the request's state (if any)
  std::vector<int> peers;   // global prefill ranks this request reads
  std::set<int> responded;  // distinct prefill ranks that reported Success
  std::uint8_t fault = 0;
};

struct decode_state {
  rank_args args;
  const config::decode_rank_plan* me = nullptr;
  std::unique_ptr<kv_pool> pool;
  state_store store;
  std::map<std::uint64_t, decode_room> rooms;
  std::map<int, prefill_peer> peers;  // by global prefill rank
  bool connected = false;
  std::string fatal;  // set when the prefill side is incompatible: every room fails with it
  std::vector<std::uint64_t> waiting_connect;
  remote_pool described;
  std::vector<transport::region_desc> described_regions;  // what peers need to write into them
  std::vector<std::uint64_t> regions;  // registered with the transport; removed before the pool
  std::uint64_t posted = 0;   // last step this rank reported
  std::uint64_t applied = 0;  // last agreed round it acted on
  bool group_lost = false;    // its agreement supervisor went down: rooms cannot be agreed
  std::int64_t lent_pages() const { return 0; }  // nothing of a decode rank is lent out
  std::string name;

  decode_state() = default;
  decode_state(const decode_state&) = delete;
  decode_state& operator=(const decode_state&) = delete;
  ~decode_state() {
    // Peers may still push: the transport must forget this memory before it is unmapped.
    if (args.transport)
      for (auto id : regions) args.transport->deregister_memory(id);
  }
};
using decode_actor = caf::stateful_actor<decode_state>;

void abort_peers(decode_actor* self, decode_room& r, const std::string& reason) {
  auto& st = self->state;
  for (int p : r.peers)
    if (auto it = st.peers.find(p); it != st.peers.end() && !it->second.down)
      self->send(it->second.handle, msg::abort_room{r.req.room, r.req.incarnation, st.args.rank, reason});
}

void fail_room(decode_actor* self, std::uint64_t room, const std::string& reason) {
  auto& st = self->state;
  auto it = st.rooms.find(room);
  if (it == st.rooms.end()) return;
  if (!st.store.fail(room, reason)) return;
  spdlog::debug("{}: room {} failed: {}", st.name, room, reason);
  // Tell every prefill peer: they stop sending and release (no transfer after an abort).
  abort_peers(self, it->second, reason);
}

bool aux_landed(const decode_state& st, const decode_room& r) {
  if (!st.me->expects_aux) return true;
  aux_record rec;
  std::memcpy(&rec, st.pool->aux_base() + st.pool->aux_offset(r.aux_slot), sizeof rec);
  return rec.room == r.req.room && rec.incarnation == r.req.incarnation && rec.check == aux_checksum(rec);
}

void check_done(decode_actor* self, decode_room& r) {
  auto& st = self->state;
  if (static_cast<int>(r.responded.size()) < st.me->required_prefill_response_num) return;
  if (!aux_landed(st, r)) {
    fail_room(self, r.req.room, "every prefill rank reported Success but the aux slot did not land");
    return;
  }
  st.store.update(r.req.room, kv_poll::success);
}

void send_destinations(decode_actor* self, decode_room& r) {
  auto& st = self->state;
  const auto room = r.req.room;
  if (!st.fatal.empty()) {
    fail_room(self, room, st.fatal);
    return;
  }
  for (int p : r.peers)
    if (st.peers.at(p).down) {
      fail_room(self, room, "prefill rank " + std::to_string(p) + " down");
      return;
    }
  st.store.update(room, kv_poll::waiting_for_input);
  bool drop = (r.fault & fault_drop_dst_info) != 0;
  for (int p : r.peers) {
    msg::dst_info d;
    d.room = room;
    d.incarnation = r.req.incarnation;
    d.decode_rank = st.args.rank;
    d.dst_pages = r.pages;
    d.aux_slot = r.aux_slot < 0 ? 0 : r.aux_slot;
    d.prefix_pages = r.req.prefix_pages;
    d.state_indices = r.state_pages;
    if (drop) {
      drop = false;  // the fault loses exactly one destination message
      continue;
    }
    self->send(st.peers.at(p).handle, std::move(d));
  }
  self->delayed_send(self, std::chrono::milliseconds(st.args.tunables.waiting_timeout_ms),
                     msg::room_timeout{room, r.req.incarnation});
}

void release(decode_actor* self, std::uint64_t room, std::uint64_t round, kv_poll agreed) {
  auto& st = self->state;
  auto it = st.rooms.find(room);
  auto& r = it->second;
  const auto* e = st.store.find(room);
  msg::rank_released ev;
  ev.prefill = false;
  ev.rank = st.args.rank;
  ev.room = room;
  ev.incarnation = r.req.incarnation;
  ev.round = round;
  ev.state = static_cast<std::uint8_t>(agreed);
  ev.reason = e != nullptr ? e->reason : std::string{};
  if (agreed == kv_poll::success && st.args.hooks.verify) {
    auto v = st.args.hooks.verify(*st.pool, r.req, r.pages, r.state_pages, r.aux_slot);
    ev.bytes_expected = v.bytes_expected;
    ev.bytes_verified = v.bytes_verified;
    ev.mismatched_pages = v.mismatched_pages;
  }
  st.pool->free_pages(r.pages);
  st.pool->free_state(r.state_pages);
  if (r.aux_slot >= 0) st.pool->free_aux(r.aux_slot);
  st.rooms.erase(it);
  st.store.clear(room);
  if (st.args.observer) self->send(st.args.observer, std::move(ev));
}

void on_topology(decode_actor* self, const msg::topology_reply& t) {
  auto& st = self->state;
  const auto& cfg = st.args.plan->config();
  if (t.version != msg::wire_version)
    st.fatal = "bootstrap registry speaks wire version " + std::to_string(t.version);
  else if (t.page_size != cfg.page_size)
    st.fatal = "prefill page size " + std::to_string(t.page_size) + " != decode page size " +
               std::to_string(cfg.page_size);
  else if (t.dtype != config::to_string(cfg.dtype))
    st.fatal = "prefill KV dtype " + t.dtype + " != decode KV dtype " + config::to_string(cfg.dtype);
  else if (t.layout != config::describe(cfg.model))
    st.fatal = "prefill KV layout " + t.layout + " != decode KV layout " + config::describe(cfg.model);
  else if (t.tp != cfg.prefill.tp || t.cp != cfg.prefill.cp || t.pp != cfg.prefill.pp || t.dp != cfg.prefill.dp)
    st.fatal = "prefill topology differs from the one this decode rank was configured for";
  if (st.fatal.empty()) {
    std::map<msg::rank_key, caf::actor> table;
    for (const auto& e : t.entries) table[e.key] = e.rank;
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
    for (int g = 0; g < cfg.prefill.dp; ++g)
      for (const auto& pe : st.me->peers) {
        int p = config::prefill_rank_of(cfg.prefill, {g, pe.pp, pe.cp, pe.tp});
        auto h = table[msg::rank_key{g, pe.cp, pe.tp, pe.pp}];
        auto& peer = st.peers[p];
        peer.handle = h;
        peer.down = !h;
        if (h) {
          self->send(h, reg);  // once per connection
          self->monitor(h);
        }
      }
  } else {
    spdlog::error("{}: {}", st.name, st.fatal);
  }
  st.connected = true;
  auto waiting = std::move(st.waiting_connect);
  for (auto room : waiting)
    if (auto it = st.rooms.find(room); it != st.rooms.end()) send_destinations(self, it->second);
}

caf::behavior decode_rank(decode_actor* self, rank_args args) {
  auto& st = self->state;
  st.args = std::move(args);
  st.me = &st.args.plan->decode(st.args.rank);
  st.store = state_store(static_cast<std::size_t>(st.args.tunables.max_rooms_per_rank));
  st.name = "decode rank " + std::to_string(st.args.rank);
  // Peers write into the KV pages, the aux slots and the state pages: all three are registered,
  // in memory the transport allocates when it has faster memory to offer (UCX shared memory).
  std::vector<std::uint64_t> ids;
  const auto sizes = sizes_of(st.args.shape);
  const std::uint64_t owner = static_cast<std::uint64_t>(st.args.rank);
  std::vector<transport::allocation> allocated;
  for (auto bytes : {sizes.kv, sizes.aux, sizes.state}) {
    auto a = st.args.transport->allocate_memory(owner, bytes);
    if (!a) break;
    allocated.push_back(a.value());
  }
  if (allocated.size() == 3) {
    st.pool = std::make_unique<kv_pool>(st.args.shape, pool_memory{allocated[0].base, allocated[1].base, allocated[2].base});
    for (const auto& a : allocated) {
      ids.push_back(a.desc.id);
      st.described_regions.push_back(a.desc);
    }
  } else {
    for (const auto& a : allocated) st.args.transport->deregister_memory(a.desc.id);
    st.pool = std::make_unique<kv_pool>(st.args.shape);
    for (auto [base, bytes] : {std::make_pair(st.pool->kv_base(), st.pool->kv_bytes()),
                               std::make_pair(st.pool->aux_base(), st.pool->aux_bytes()),
                               std::make_pair(st.pool->state_base(), st.pool->state_bytes())}) {
      auto reg = st.args.transport->register_memory(owner, base, bytes);
      if (!reg) {
        st.fatal = "cannot register KV memory: " + reg.error().reason();
        spdlog::error("{}: {}", st.name, st.fatal);
        break;
      }
      ids.push_back(reg->id);
      st.described_regions.push_back(reg.value());
    }
  }
  st.regions = ids;
  if (st.fatal.empty()) st.described = describe(*st.pool, ids[0], ids[1], ids[2]);
  self->send(st.args.parent, msg::attach_child{st.args.child_index, caf::actor_cast<caf::actor>(self)});
  self->send(st.args.registry, msg::register_decode{st.args.rank, caf::actor_cast<caf::actor>(self)});
  self->request(st.args.registry, caf::infinite, msg::topology_query{})
      .then([self](msg::topology_reply& t) { on_topology(self, t); });
  self->delayed_send(self, detail::step_pause(st.args.tunables, true), msg::step_tick{});

  self->monitor(st.args.parent);
  self->set_down_handler([self](const caf::down_msg& dm) {
    auto& st = self->state;
    if (detail::on_parent_down(
            self, dm, [self](std::uint64_t room, const std::string& why) { fail_room(self, room, why); },
            [self](std::uint64_t room, std::uint64_t round, kv_poll s) { release(self, room, round, s); }))
      return;
    for (auto& [p, peer] : st.peers)
      if (peer.handle && peer.handle.address() == dm.source && !peer.down) {
        peer.down = true;
        for (auto& [room, r] : st.rooms) {
          const auto* e = st.store.find(room);
          if (e == nullptr || is_terminal(e->state)) continue;
          if (std::find(r.peers.begin(), r.peers.end(), p) != r.peers.end())
            fail_room(self, room, "prefill rank " + std::to_string(p) + " down");
        }
      }
  });

  return caf::message_handler{
      [self](msg::new_request& q) {
        auto& st = self->state;
        if (st.group_lost) {
          detail::refuse_request(self, false, q, "agreement group lost: its supervisor went down");
          return;
        }
        const auto& cfg = st.args.plan->config();
        decode_room r;
        r.req = detail::view_of(q, cfg.page_size);
        r.fault = q.fault;
        for (const auto& pe : st.me->peers)
          r.peers.push_back(config::prefill_rank_of(cfg.prefill, {q.prefill_dp, pe.pp, pe.cp, pe.tp}));
        if (auto s = st.store.create(q.room, q.incarnation, kv_poll::bootstrapping); !s) {
          detail::refuse_request(self, false, q, s.reason());
          return;
        }
        auto& room = st.rooms.emplace(q.room, std::move(r)).first->second;
        auto pages = st.pool->alloc_pages(room.req.n_pages);
        if (!pages) {
          fail_room(self, q.room, "out of KV pages");
          return;
        }
        room.pages = std::move(*pages);
        if (st.pool->shape().state_pages > 0) {
          auto state = st.pool->alloc_state(room.req.n_pages);
          if (!state) {
            fail_room(self, q.room, "out of state pages");
            return;
          }
          room.state_pages = std::move(*state);
        }
        if (st.me->expects_aux) {
          auto slot = st.pool->alloc_aux();
          if (!slot) {
            fail_room(self, q.room, "out of aux slots");
            return;
          }
          room.aux_slot = *slot;
        }
        if (st.connected)
          send_destinations(self, room);
        else
          st.waiting_connect.push_back(q.room);
      },
      [self](msg::kv_status& s) {
        auto& st = self->state;
        auto it = st.rooms.find(s.room);
        if (it == st.rooms.end() || it->second.req.incarnation != s.incarnation) return;
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
          check_done(self, r);
        } else if (state == kv_poll::transferring) {
          st.store.update(s.room, kv_poll::transferring);
        }
      },
      [self](msg::abort_ack& a) {
        // The prefill rank stopped (nothing more will land for the room); memory is released
        // by the agreed Failed, not by the acknowledgement.
        spdlog::debug("{}: prefill rank {} acknowledged the abort of room {}", self->state.name,
                      a.prefill_rank, a.room);
      },
      [self](msg::abort_request& a) {
        auto& st = self->state;
        auto it = st.rooms.find(a.room);
        // A late abort of an earlier request must not touch the request reusing its room.
        if (it == st.rooms.end() || it->second.req.incarnation != a.incarnation) return;
        fail_room(self, a.room, "aborted: " + a.reason);
      },
      [self](msg::room_timeout& t) {
        auto& st = self->state;
        auto it = st.rooms.find(t.room);
        if (it == st.rooms.end() || it->second.req.incarnation != t.incarnation) return;
        const auto* e = st.store.find(t.room);
        if (e != nullptr && !is_terminal(e->state))
          fail_room(self, t.room, "waiting timeout: " + std::to_string(it->second.responded.size()) +
                                      " of " + std::to_string(st.me->required_prefill_response_num) +
                                      " prefill ranks responded");
      },
  }.or_else(detail::rank_handlers(
      self, false,
      [self](std::uint64_t room, const std::string& why) { fail_room(self, room, why); },
      [self](std::uint64_t room, std::uint64_t round, kv_poll s) { release(self, room, round, s); }));
}

}  // namespace

caf::actor spawn_decode_rank(caf::actor_system& sys, rank_args args) {
  return sys.spawn(decode_rank, std::move(args));
}

}  // namespace kvflow
