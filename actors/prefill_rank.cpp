// The prefill (sender) rank actor: semantics.md section 2 "Sender" and section 5. The engine's
// calls arrive as msg::api_* (created, init, chunks, abort); every handler runs under the lock
// of what the rank shares with the engine's thread.
#include <spdlog/spdlog.h>

#include <chrono>
#include <map>

#include "actors/block_plan.hpp"
#include "actors/failure_memory.hpp"
#include "actors/rank.hpp"
#include "actors/rank_common.hpp"
#include "cuda/fence_pool.hpp"

namespace kvflow {
namespace {

using clock_type = std::chrono::steady_clock;

struct decode_peer {
  caf::actor handle;
  remote_pool pool;
  bool registered = false;  // its kv_registration arrived (else only watched for liveness)
  bool down = false;
  std::string refused;      // why its registration could not be used (its requests fail with it)
};

struct prefill_room {
  std::uint64_t room = 0;
  std::uint64_t inc = 0;
  int decode_dp = 0;
  std::vector<int> expected;          // global decode ranks that send destinations
  std::map<int, msg::dst_info> dsts;  // by decode rank
  int total_pages = -1;               // the request's pages, as every destination lists them
  int prefix = 0;                     // pages decode holds already (not sent)
  bool inited = false;
  int pages = 0, aux_row = 0;         // from init
  int sent = 0;                       // pages handed over so far (after the prefix)
  int pending_pushes = 0;
  bool last_seen = false;             // the last chunk was handed to the transport
  std::shared_ptr<aux_record> receipt;  // source of the receipt push; kept alive by the push
  std::vector<int> ack_when_drained;  // decode ranks whose abort waits for pushes to finish
  std::uint64_t incarnation() const { return inc; }
};

struct prefill_state {
  rank_args args;
  const config::prefill_rank_plan* me = nullptr;
  std::map<std::uint64_t, prefill_room> rooms;
  // Destinations that came before their request, by (room, incarnation), each refused once it
  // waited the bootstrap timeout (its own: a room reused, or another incarnation's, keeps its time).
  struct early_dst {
    msg::dst_info d;
    caf::actor_clock::time_point expires;
  };
  std::map<std::pair<std::uint64_t, std::uint64_t>, std::vector<early_dst>> early;
  std::map<int, decode_peer> peers;                             // by global decode rank
  // Failed requests this rank already cleared, and requests aborted by a decode rank before they
  // arrived here: destinations arriving later are refused at once with the reason, and an early
  // aborted request fails when it comes. Bounded by count and by age (failure_memory_ms), so a
  // rank under a steady stream of failures does not grow for the hour it takes to reach the count.
  failure_memory failed_before{0, std::chrono::milliseconds{0}};
  bool failure_expiry_set = false;  // a msg::failure_expiry of this rank is on its way
  std::string name;
  const char* side = "prefill";
  detail::actor_store<prefill_state> store() { return {*this}; }
};
using prefill_actor = caf::stateful_actor<prefill_state>;

// The peer_read entry of decode rank `d`'s plan that names this prefill rank.
const config::peer_read* read_of(const prefill_state& st, int decode_rank) {
  const auto& dp = st.args.plan->decode(decode_rank);
  for (const auto& pe : dp.peers)
    if (pe.pp == st.me->coord.pp && pe.cp == st.me->coord.cp && pe.tp == st.me->coord.tp) return &pe;
  return nullptr;
}

void send_status(prefill_actor* self, int d, std::uint64_t room, std::uint64_t inc, kv_poll state,
                 const std::string& reason) {
  auto& st = self->state;
  auto it = st.peers.find(d);
  if (it == st.peers.end() || it->second.down || !it->second.handle) return;
  self->send(it->second.handle,
             msg::kv_status{room, inc, st.args.rank, static_cast<std::uint8_t>(state), reason});
}

void notify_readers(prefill_actor* self, prefill_room& r, kv_poll state, const std::string& reason) {
  for (int d : r.expected) send_status(self, d, r.room, r.inc, state, reason);
}

// Refuses one decode rank's message about a request without touching the live room (if any):
// the sender's request fails with the reason, nobody else's.
void refuse(prefill_actor* self, int decode_rank, std::uint64_t room, std::uint64_t incarnation,
            const std::string& reason) {
  spdlog::warn("{}: refused decode rank {} for room {}: {}", self->state.name, decode_rank, room, reason);
  send_status(self, decode_rank, room, incarnation, kv_poll::failed, reason);
}

void ack_abort(prefill_actor* self, int d, std::uint64_t room, std::uint64_t inc) {
  auto& st = self->state;
  if (auto p = st.peers.find(d); p != st.peers.end() && !p->second.down && p->second.handle)
    self->send(p->second.handle, msg::abort_ack{room, inc, st.args.rank});
}

// A terminal room whose pushes all finished lets go of its pages (released), and the aborts
// that waited for that are acknowledged.
void settle(prefill_actor* self, prefill_room& r) {
  auto& st = self->state;
  const auto* e = st.store().find(r.room);
  if (e == nullptr || !is_terminal(e->state) || r.pending_pushes > 0) return;
  st.store().set_released(r.room);
  for (int d : r.ack_when_drained) ack_abort(self, d, r.room, r.inc);
  r.ack_when_drained.clear();
}

void fail_room(prefill_actor* self, std::uint64_t room, const std::string& reason) {
  auto& st = self->state;
  auto it = st.rooms.find(room);
  if (it == st.rooms.end() || !st.store().fail(room, reason)) return;
  spdlog::debug("{}: room {} failed: {}", st.name, room, reason);
  notify_readers(self, it->second, kv_poll::failed, reason);
  settle(self, it->second);
}

void finish_if_done(prefill_actor* self, prefill_room& r) {
  auto& st = self->state;
  const auto* e = st.store().find(r.room);
  if (e == nullptr || is_terminal(e->state)) return;
  if (!r.last_seen || r.pending_pushes > 0) return;
  st.store().update(r.room, kv_poll::success);
  notify_readers(self, r, kv_poll::success, {});
  settle(self, r);
}

config::range intersect(config::range a, config::range b) {
  return {std::max(a.begin, b.begin), std::min(a.end, b.end)};
}

// Hands the pages at request positions [pos, pos + src.size()) to the transport for every
// reader (and, on the last chunk, the state pages and the aux rows).
void send_chunk(prefill_actor* self, prefill_room& r, int pos, const std::vector<std::int32_t>& src,
                bool is_last, const std::vector<std::int32_t>& state_pages, std::uintptr_t ready_fence) {
  auto& st = self->state;
  const auto room = r.room;
  st.store().update(room, kv_poll::transferring);
  const auto& cfg = st.args.plan->config();
  const auto& mem = *st.args.memory;
  for (auto& [d, info] : r.dsts) {
    const auto* pe = read_of(st, d);
    auto& peer = st.peers.at(d);
    config::range chunk{pos, pos + static_cast<int>(src.size())};
    config::range share{0, r.total_pages};
    if (pe->cp_share) share = config::cp_share(r.total_pages, cfg.prefill.cp, st.me->coord.cp);
    const auto pages = intersect(chunk, share);
    const auto layers = intersect(mem.layers(), {peer.pool.layer_begin, peer.pool.layer_begin + peer.pool.layer_count});
    std::vector<transport::block> blocks;
    auto fail = [&](const status& s) {
      fail_room(self, room, "decode rank " + std::to_string(d) + ": " + s.reason());
    };
    if (!pages.empty() && !layers.empty()) {
      std::vector<std::int32_t> sp(src.begin() + (pages.begin - pos), src.begin() + (pages.end - pos));
      std::vector<std::int32_t> dp(info.dst_pages.begin() + pages.begin, info.dst_pages.begin() + pages.end);
      auto planned = plan_blocks(mem, peer.pool,
                                 {&sp, &dp, layers, pe->heads, cfg.model.kind == config::model_kind::mla, true});
      if (!planned) return fail(planned.error());
      blocks = std::move(planned.value());
    }
    if (is_last && !state_pages.empty() && !layers.empty()) {
      const auto part = intersect({r.prefix, r.total_pages}, share);
      if (!part.empty()) {
        std::vector<std::int32_t> ss(state_pages.begin() + part.begin, state_pages.begin() + part.end);
        std::vector<std::int32_t> ds(info.state_indices.begin() + part.begin, info.state_indices.begin() + part.end);
        auto planned = plan_state_blocks(mem, peer.pool, ss, ds, layers);
        if (!planned) return fail(planned.error());
        blocks.insert(blocks.end(), planned.value().begin(), planned.value().end());
      }
    }
    std::shared_ptr<aux_record> receipt;
    if (is_last && pe->writes_aux) {
      // The aux rows go after the KV of the last chunk; the receipt (room, incarnation,
      // checksum) lets decode tell a landed slot from a stale one.
      if (!r.receipt) r.receipt = std::make_shared<aux_record>(make_receipt(room, r.inc));
      receipt = r.receipt;
      auto planned = plan_aux_blocks(mem, peer.pool, r.aux_row, info.aux_slot, receipt.get());
      if (!planned) return fail(planned.error());
      blocks.insert(blocks.end(), planned.value().begin(), planned.value().end());
    }
    if (blocks.empty()) continue;
    ++r.pending_pushes;
    ++st.args.shared->counters.pushes_in_flight;
    std::uint64_t bytes = 0;
    for (const auto& b : blocks) bytes += b.len;
    auto me = caf::actor_cast<caf::actor>(self);
    auto inc = r.inc;
    auto start = clock_type::now();
    // The completion may run on this thread, inside push(): it only sends a message. It keeps
    // the source memory description (and its owner) alive until the transport is done with it.
    // With a fence the transport's stream waits for it on the GPU: nothing blocks here.
    st.args.transport->push_after(ready_fence, d, blocks, [me, room, inc, d, receipt, start, bytes, memory = st.args.memory](status s) {
      caf::anon_send(me, msg::push_done{room, inc, d, s.ok(), s.reason(), bytes,
                                        std::chrono::duration<double>(clock_type::now() - start).count()});
    });
  }
  if (is_last) r.last_seen = true;
}

void maybe_ready(prefill_actor* self, prefill_room& r) {
  auto& st = self->state;
  if (static_cast<int>(r.dsts.size()) < static_cast<int>(r.expected.size())) return;
  if (!st.store().update(r.room, kv_poll::waiting_for_input)) return;
  if (auto e = st.args.shared->engine.find(r.room); e != st.args.shared->engine.end())
    e->second.prefix_pages = r.prefix;
}

void accept_dst(prefill_actor* self, prefill_room& r, msg::dst_info d) {
  auto& st = self->state;
  const auto room = r.room;
  auto peer = st.peers.find(d.decode_rank);
  const bool expected = std::find(r.expected.begin(), r.expected.end(), d.decode_rank) != r.expected.end();
  if (d.incarnation != r.inc) {
    // Another request claims this live room (a duplicate room): refuse that request only.
    refuse(self, d.decode_rank, room, d.incarnation,
           "duplicate room " + std::to_string(room) + ": live request " + std::to_string(r.inc) + " holds it");
    return;
  }
  if (const auto* e = st.store().find(room); e != nullptr && e->state == kv_poll::failed) {
    // Failed before this decode rank's destinations came (the failure notice may have found no
    // handle of it yet): tell it now, or it waits out its timeout.
    send_status(self, d.decode_rank, room, d.incarnation, kv_poll::failed, e->reason);
    return;
  }
  const int n = static_cast<int>(d.dst_pages.size());
  std::string bad;
  if (!expected)
    bad = "decode rank " + std::to_string(d.decode_rank) + " does not read from this rank";
  else if (peer != st.peers.end() && !peer->second.refused.empty())
    bad = peer->second.refused;
  else if (peer == st.peers.end() || !peer->second.registered)
    bad = "decode rank " + std::to_string(d.decode_rank) + " sent destinations before registering";
  else if (r.total_pages >= 0 && n != r.total_pages)
    bad = std::to_string(n) + " destination pages, another decode rank sent " + std::to_string(r.total_pages);
  else if (d.prefix_pages < 0 || d.prefix_pages > n)
    bad = "prefix of " + std::to_string(d.prefix_pages) + " pages out of range";
  else if (r.total_pages >= 0 && d.prefix_pages != r.prefix)
    bad = "prefix of " + std::to_string(d.prefix_pages) + " pages, another decode rank sent " +
          std::to_string(r.prefix);
  else if (d.aux_slot < 0 || (peer->second.pool.aux_rows > 0 && d.aux_slot >= peer->second.pool.aux_rows))
    bad = "aux slot " + std::to_string(d.aux_slot) + " out of range";
  else if (!d.state_indices.empty() && static_cast<int>(d.state_indices.size()) != n)
    bad = std::to_string(d.state_indices.size()) + " state indices for a " + std::to_string(n) + "-page request";
  if (bad.empty())
    for (auto p : d.state_indices)
      if (p < 0 || p >= peer->second.pool.state_pages) {
        bad = "state index " + std::to_string(p) + " outside the registered " +
              std::to_string(peer->second.pool.state_pages) + " state pages";
        break;
      }
  if (bad.empty())
    for (auto p : d.dst_pages)
      if (p < 0 || p >= peer->second.pool.pages) {
        bad = "destination page " + std::to_string(p) + " outside the registered " +
              std::to_string(peer->second.pool.pages) + " pages";
        break;
      }
  if (!bad.empty()) {
    fail_room(self, room, "bad destination info: " + bad);
    return;
  }
  if (r.dsts.count(d.decode_rank) != 0) return;  // a duplicate changes nothing
  r.total_pages = n;
  r.prefix = d.prefix_pages;
  r.dsts.emplace(d.decode_rank, std::move(d));
  maybe_ready(self, r);
}

// After failed_before changed: its size for the engine's counters, and its timer. failed_before
// also goes by age on a timer of its own, so a rank that gets no new requests (whose creates
// expire it too) gives its last failures back: one timer at a time, due when the oldest entry's
// age runs out, set again for the next oldest each time it fires. The actor clock, as the
// entries' times.
void failures_changed(prefill_actor* self) {
  auto& st = self->state;
  st.args.shared->counters.failures_remembered = st.failed_before.size();
  if (st.failure_expiry_set) return;
  const auto due = st.failed_before.next_expiry();
  if (!due) return;
  st.failure_expiry_set = true;
  const auto now = self->clock().now();
  self->delayed_send(self, *due > now ? *due - now : caf::actor_clock::duration_type::zero(), msg::failure_expiry{});
}

void remember_failure(prefill_actor* self, std::uint64_t room, std::uint64_t inc, const std::string& reason) {
  self->state.failed_before.remember({room, inc}, reason, self->clock().now());
  failures_changed(self);
}

void forget(prefill_actor* self, std::uint64_t room) {
  auto& st = self->state;
  auto it = st.rooms.find(room);
  if (it == st.rooms.end()) return;
  const auto& sh = *st.args.shared;  // its reasons are timed by the steady clock
  remember_failure(self, room, it->second.inc, sh.failure_of(room, it->second.inc, std::chrono::steady_clock::now()));
  st.rooms.erase(it);
}

// Every unfinished room that expects destinations from decode rank `d` fails with `reason`.
void fail_rooms_expecting(prefill_actor* self, int d, const std::string& reason) {
  auto& st = self->state;
  std::vector<std::uint64_t> doomed;
  for (auto& [room, r] : st.rooms) {
    const auto* en = st.store().find(room);
    if (en != nullptr && !is_terminal(en->state) && std::find(r.expected.begin(), r.expected.end(), d) != r.expected.end())
      doomed.push_back(room);
  }
  for (auto room : doomed) fail_room(self, room, reason);
}

void watch_decode(prefill_actor* self, int d) {
  // Not connected yet: watch it through the registry, so its death fails the room now instead
  // of at the bootstrap timeout.
  auto& st = self->state;
  st.peers[d];
  self->request(st.args.registry, caf::infinite, msg::lookup_decode{d})
      .then(
          [self](msg::decode_entry& e) {
            auto& st = self->state;
            auto g = detail::lock(*st.args.shared);
            auto& peer = st.peers[e.rank];
            if (e.down && !peer.registered && !peer.down) {
              // Dead before it ever connected here: its rooms fail now.
              peer.down = true;
              fail_rooms_expecting(self, e.rank, "decode rank " + std::to_string(e.rank) + " down");
              return;
            }
            if (e.handle && !peer.handle) {
              peer.handle = e.handle;
              self->monitor(e.handle);
            }
          },
          // The registry may be restarting: the decode rank's registration (or the bootstrap
          // timeout) still settles the room.
          [self, d](caf::error& e) {
            spdlog::warn("{}: lookup of decode rank {} failed: {}", self->state.name, d, self->system().render(e));
          });
}

caf::behavior prefill_rank(prefill_actor* self, rank_args args) {
  auto& st = self->state;
  st.args = std::move(args);
  st.failed_before = failure_memory{static_cast<std::size_t>(st.args.tunables.max_rooms_per_rank),
                                    std::chrono::milliseconds{st.args.tunables.failure_memory_ms}};
  st.me = &st.args.plan->prefill(st.args.rank);
  st.name = "prefill rank " + std::to_string(st.args.rank);
  const auto& c = st.me->coord;
  self->send(st.args.registry, msg::register_rank{msg::wire_version, {c.dp, c.cp, c.tp, c.pp}, st.name,
                                                  caf::actor_cast<caf::actor>(self),
                                                  handshake_of(st.args.plan->config())});
  self->send(st.args.parent, msg::attach_child{st.args.child_index, caf::actor_cast<caf::actor>(self)});

  self->monitor(st.args.parent);
  detail::refuse_stray_errors(self, st.name);
  self->set_down_handler([self](const caf::down_msg& dm) {
    auto& st = self->state;
    auto g = detail::lock(*st.args.shared);
    if (detail::on_parent_down(self, dm, [self](std::uint64_t room, const std::string& why) { fail_room(self, room, why); }))
      return;
    for (auto& [d, peer] : st.peers)
      if (peer.handle && peer.handle.address() == dm.source && !peer.down) {
        peer.down = true;
        // Pushes in flight to it complete now (with an error) instead of waiting on a dead peer.
        st.args.transport->disconnect(static_cast<std::uint64_t>(d));
        std::vector<std::uint64_t> doomed;
        for (auto& [room, r] : st.rooms) {
          const auto* e = st.store().find(room);
          if (e == nullptr || is_terminal(e->state)) continue;
          if (std::find(r.expected.begin(), r.expected.end(), d) != r.expected.end()) doomed.push_back(room);
        }
        for (auto room : doomed) fail_room(self, room, "decode rank " + std::to_string(d) + " down");
      }
  });

  return caf::message_handler{
      [self](msg::registration_reply& r) {
        if (!r.ok) spdlog::error("{}: registration refused: {}", self->state.name, r.reason);
      },
      [self](msg::kv_registration& reg) {
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        if (reg.version != msg::wire_version) {
          spdlog::error("{}: decode rank {} speaks wire version {}, this rank {}", st.name, reg.decode_rank,
                        reg.version, msg::wire_version);
          return;
        }
        if (reg.decode_rank < 0 || reg.decode_rank >= st.args.plan->decode_ranks()) {
          spdlog::error("{}: registration from unknown decode rank {}", st.name, reg.decode_rank);
          return;
        }
        auto& peer = st.peers[reg.decode_rank];
        peer.handle = reg.decode;
        peer.down = false;
        self->monitor(reg.decode);
        peer.refused.clear();
        if (auto why = handshake_mismatch(handshake_of(st.args.plan->config()), reg.shape); !why.empty()) {
          peer.refused = "decode rank " + std::to_string(reg.decode_rank) + " registered another KV configuration: " + why;
        } else if (auto ok = check_remote_pool(reg.pool); !ok) {
          peer.refused = "invalid registration of decode rank " + std::to_string(reg.decode_rank) + ": " + ok.reason();
        } else {
          peer.pool = reg.pool;
          // The transport checks every later write against these regions; a description it
          // cannot use fails that decode rank's requests with the reason, nobody else's.
          auto connected = st.args.transport->connect(static_cast<std::uint64_t>(reg.decode_rank), reg.endpoint,
                                                      reg.regions);
          if (!connected)
            peer.refused = "transport cannot reach decode rank " + std::to_string(reg.decode_rank) + ": " +
                           connected.reason();
        }
        peer.registered = true;
        if (!peer.refused.empty()) {
          spdlog::error("{}: {}", st.name, peer.refused);
          // Its destinations would be refused: the rooms waiting for them fail now.
          fail_rooms_expecting(self, reg.decode_rank, peer.refused);
        }
      },
      [self](msg::api_create& q) {
        // The store entry exists already (the API created it, refusing duplicates at once).
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        const auto& cfg = st.args.plan->config();
        // The API created the store entry (refusing duplicates at once). Gone or replaced: the
        // engine cleared it already.
        const auto* e = st.args.shared->store.find(q.room);
        if (e == nullptr || e->incarnation != q.incarnation) return;
        if (auto old = st.rooms.find(q.room); old != st.rooms.end()) {
          if (old->second.inc == q.incarnation) return;  // seen already
          forget(self, q.room);  // an earlier request of the room, which the engine cleared
        }
        prefill_room r;
        r.room = q.room;
        r.inc = q.incarnation;
        r.decode_dp = q.other_dp;
        for (const auto& rd : st.me->readers)
          r.expected.push_back(config::decode_rank_of(cfg.decode, {q.other_dp, rd.pp, rd.tp}));
        auto& room = st.rooms.emplace(q.room, std::move(r)).first->second;
        st.failed_before.expire(self->clock().now());  // a quiet rank drops its old failures too
        failures_changed(self);
        if (const auto* f = st.failed_before.find({q.room, q.incarnation}, self->clock().now()))
          fail_room(self, q.room, *f);  // aborted before it came here
        if (st.args.shared->lost) fail_room(self, q.room, st.args.shared->lost_reason);
        if (detail::failed_before_created(st, q.room, q.incarnation))
          fail_room(self, q.room, detail::group_failed_reason(st.side));
        if (e->state == kv_poll::failed) {  // failed before the actor saw it (e.g. group lost)
          settle(self, room);
          return;
        }
        for (int d : room.expected) {
          auto it = st.peers.find(d);
          if (it != st.peers.end() && it->second.down) {
            fail_room(self, q.room, "decode rank " + std::to_string(d) + " down");
            return;
          }
          if (it != st.peers.end() && !it->second.refused.empty()) {
            fail_room(self, q.room, it->second.refused);
            return;
          }
          if (it == st.peers.end()) watch_decode(self, d);
        }
        if (st.me->authoritative)
          self->delayed_send(self, std::chrono::milliseconds(st.args.tunables.bootstrap_timeout_ms),
                             msg::room_timeout{q.room, q.incarnation});
        // Every rank: bounded until the group agrees past Bootstrapping (a rank of the group may
        // not hold the request, and then no round of it leaves Bootstrapping).
        self->delayed_send(self, std::chrono::milliseconds(st.args.tunables.bootstrap_timeout_ms),
                           msg::agreement_expiry{q.room, q.incarnation});
        if (auto early = st.early.find({q.room, q.incarnation}); early != st.early.end()) {
          auto list = std::move(early->second);
          st.early.erase(early);
          for (auto& e : list) accept_dst(self, room, std::move(e.d));
        }
      },
      [self](msg::api_init& i) {
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        auto it = st.rooms.find(i.room);
        if (it == st.rooms.end() || it->second.inc != i.incarnation) return;
        auto& r = it->second;
        r.inited = true;
        r.pages = i.pages;
        r.aux_row = i.aux_row;
        if (st.me->authoritative && r.total_pages >= 0 && i.pages != r.total_pages - r.prefix)
          fail_room(self, i.room, "init with " + std::to_string(i.pages) + " pages; decode expects " +
                                      std::to_string(r.total_pages - r.prefix) + " after its prefix");
      },
      [self](msg::api_send& c) {
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        // Every push of the chunk is queued (each waiting on the fence) by the time this
        // handler returns, whatever it decides: the fence may be recorded again then.
        const auto fence = static_cast<std::uintptr_t>(c.ready_fence);
        struct fence_back {
          cuda::fence_pool* pool;
          std::uintptr_t f;
          ~fence_back() {
            if (pool != nullptr && f != 0) pool->give_back(f);
          }
        } back{st.args.fences.get(), fence};
        auto it = st.rooms.find(c.room);
        if (it == st.rooms.end() || it->second.inc != c.incarnation) return;
        auto& r = it->second;
        const auto* e = st.store().find(c.room);
        if (e == nullptr || is_terminal(e->state)) return;  // aborted rooms send nothing more
        if (!st.me->authoritative) {
          // Non-authoritative: nobody reads this rank; skip chunks, done on the last one.
          if (c.is_last) {
            st.store().update(c.room, kv_poll::success);
            settle(self, r);
          }
          return;
        }
        const int pos = r.prefix + r.sent;
        if (e->state < kv_poll::waiting_for_input || pos + static_cast<int>(c.pages.size()) > r.total_pages) {
          fail_room(self, c.room, "chunk of " + std::to_string(c.pages.size()) + " pages beyond the request's " +
                                      std::to_string(r.total_pages - r.prefix));
          return;
        }
        if (c.is_last && !c.state_pages.empty() && static_cast<int>(c.state_pages.size()) != r.total_pages) {
          fail_room(self, c.room, std::to_string(c.state_pages.size()) + " state pages for a " +
                                      std::to_string(r.total_pages) + "-page request");
          return;
        }
        r.sent += static_cast<int>(c.pages.size());
        send_chunk(self, r, pos, c.pages, c.is_last, c.state_pages, fence);
        finish_if_done(self, r);
      },
      [self](msg::api_abort& a) {
        // The engine aborts: fail unless already done (no transfer after an abort).
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        auto it = st.rooms.find(a.room);
        if (it == st.rooms.end() || it->second.inc != a.incarnation) return;
        const auto* e = st.store().find(a.room);
        if (e != nullptr && e->state != kv_poll::success) {
          ++st.args.shared->counters.aborted;
          fail_room(self, a.room, "aborted: " + a.reason);
        }
      },
      [self](msg::api_refused& q) {
        // This rank's engine will not hold the request: its destinations are refused, those
        // that came before it now and later ones as they come.
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        remember_failure(self, q.room, q.incarnation, q.reason);
        auto early = st.early.find({q.room, q.incarnation});
        if (early == st.early.end()) return;
        auto list = std::move(early->second);
        st.early.erase(early);
        for (const auto& e : list) refuse(self, e.d.decode_rank, q.room, q.incarnation, q.reason);
      },
      [self](msg::dst_info& d) {
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        if (d.version != msg::wire_version) {
          refuse(self, d.decode_rank, d.room, d.incarnation,
                 "destination info of wire version " + std::to_string(d.version) + ", this prefill rank speaks " +
                     std::to_string(msg::wire_version));
          return;
        }
        auto it = st.rooms.find(d.room);
        if (it != st.rooms.end()) {
          accept_dst(self, it->second, std::move(d));  // checks it against the live request
          return;
        }
        if (const auto* f = st.failed_before.find({d.room, d.incarnation}, self->clock().now())) {
          refuse(self, d.decode_rank, d.room, d.incarnation, *f);
          return;
        }
        // The decode side can be faster than this rank's engine: keep it for the request, within
        // bounds (remote input must not grow this rank's memory without limit).
        if (static_cast<std::int64_t>(d.dst_pages.size()) > st.args.tunables.max_pages_per_request) {
          refuse(self, d.decode_rank, d.room, d.incarnation,
                 "destination info with " + std::to_string(d.dst_pages.size()) + " pages (max " +
                     std::to_string(st.args.tunables.max_pages_per_request) + ")");
          return;
        }
        if (st.early.size() >= static_cast<std::size_t>(st.args.tunables.max_rooms_per_rank)) {
          refuse(self, d.decode_rank, d.room, d.incarnation, "too many destinations for unknown rooms");
          return;
        }
        auto& waiting = st.early[{d.room, d.incarnation}];
        // The request may never come here (lost, or routed elsewhere): after the bootstrap
        // timeout the buffered destinations are refused, so their decode ranks fail now.
        const auto timeout = std::chrono::milliseconds(st.args.tunables.bootstrap_timeout_ms);
        // Its own timer, set after its expiry is taken, so the timer never comes before it.
        const auto expires = self->clock().now() + timeout;
        self->delayed_send(self, timeout, msg::early_expiry{d.room, d.incarnation});
        waiting.push_back({std::move(d), expires});
      },
      [self](msg::push_done& p) {
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        auto& counters = st.args.shared->counters;
        --counters.pushes_in_flight;
        if (p.ok) {
          counters.bytes_sent += p.bytes;
          counters.transfer_seconds += p.seconds;
        }
        auto it = st.rooms.find(p.room);
        if (it == st.rooms.end() || it->second.inc != p.incarnation) return;
        auto& r = it->second;
        --r.pending_pushes;
        if (!p.ok)
          fail_room(self, p.room, "transport to decode rank " + std::to_string(p.decode_rank) + ": " + p.reason);
        finish_if_done(self, r);
        settle(self, r);
      },
      [self](msg::abort_room& a) {
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        if (auto e = st.early.find({a.room, a.incarnation}); e != st.early.end()) {
          auto& list = e->second;
          list.erase(std::remove_if(list.begin(), list.end(),
                                    [&](const auto& w) { return w.d.decode_rank == a.decode_rank; }),
                     list.end());
          if (list.empty()) st.early.erase(e);
        }
        auto it = st.rooms.find(a.room);
        if (it != st.rooms.end() && it->second.inc == a.incarnation) {
          auto& r = it->second;
          const auto* e = st.store().find(a.room);
          if (e != nullptr && e->state != kv_poll::success)
            fail_room(self, a.room, "aborted by decode rank " + std::to_string(a.decode_rank) + ": " + a.reason);
          // Acknowledged only once nothing this rank started for the room can still write.
          if (r.pending_pushes > 0) {
            r.ack_when_drained.push_back(a.decode_rank);
            return;
          }
        } else {
          // Before the request (none of the room here, or an earlier incarnation of it still
          // live): it fails at once when it comes (semantics.md section 5).
          remember_failure(self, a.room, a.incarnation,
                           "aborted by decode rank " + std::to_string(a.decode_rank) + " before it arrived: " + a.reason);
        }
        ack_abort(self, a.decode_rank, a.room, a.incarnation);
      },
      [self](msg::early_expiry& x) {
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        auto e = st.early.find({x.room, x.incarnation});
        if (e == st.early.end()) return;
        // Only what waited its whole timeout goes (each arrival set its own timer).
        const auto now = self->clock().now();
        auto& list = e->second;
        auto keep = std::stable_partition(list.begin(), list.end(), [&](const auto& w) { return w.expires > now; });
        std::vector<msg::dst_info> stale;
        for (auto it = keep; it != list.end(); ++it) stale.push_back(std::move(it->d));
        list.erase(keep, list.end());
        if (list.empty()) st.early.erase(e);
        for (const auto& d : stale)
          refuse(self, d.decode_rank, d.room, d.incarnation,
                 "no request for this room reached prefill rank " + std::to_string(st.args.rank) +
                     " within the bootstrap timeout");
      },
      [self](msg::failure_expiry&) {
        // Only its own timer: failures_changed keeps one on its way.
        if (!detail::sent_by(self, self->address())) return;
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        st.failure_expiry_set = false;
        st.failed_before.expire(self->clock().now());
        failures_changed(self);  // set again for the next oldest, if any
      },
      [self](msg::room_timeout& t) {
        auto& st = self->state;
        auto g = detail::lock(*st.args.shared);
        auto it = st.rooms.find(t.room);
        if (it == st.rooms.end() || it->second.inc != t.incarnation) return;
        const auto* e = st.store().find(t.room);
        if (e != nullptr && e->state == kv_poll::bootstrapping)
          fail_room(self, t.room, "bootstrap timeout: destinations from " + std::to_string(it->second.dsts.size()) +
                                      " of " + std::to_string(it->second.expected.size()) + " decode ranks");
      },
  }
      .or_else(detail::rank_handlers(
          self, [self](std::uint64_t room, const std::string& why) { fail_room(self, room, why); },
          [self](std::uint64_t room) { forget(self, room); }));
}

}  // namespace

caf::actor spawn_prefill_rank(caf::actor_system& sys, rank_args args) {
  return sys.spawn(prefill_rank, std::move(args));
}

}  // namespace kvflow
