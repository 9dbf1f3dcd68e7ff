// The prefill (sender) rank actor: semantics.md section 2 "Sender" and section 5.
#include <spdlog/spdlog.h>

#include <map>
#include <set>

#include "actors/block_plan.hpp"
#include "actors/rank.hpp"
#include "actors/rank_common.hpp"

namespace kvflow {
namespace {

struct decode_peer {
  caf::actor handle;
  remote_pool pool;
  bool registered = false;  // its kv_registration arrived (else only watched for liveness)
  bool down = false;
  std::string refused;      // why its registration could not be used (its requests fail with it)
};

struct prefill_room {
  request_view req;
  std::vector<std::int32_t> pages;        // this rank's pages holding the request's KV
  std::vector<std::int32_t> state_pages;  // and its state pages (none when the model has none)
  std::vector<int> expected;              // global decode ranks that send destinations
  std::map<int, msg::dst_info> dsts;      // by decode rank
  std::vector<msg::kv_chunk> queued;      // chunks that arrived before all destinations
  int pending_pushes = 0;
  bool last_seen = false;                 // the last chunk was handed to the transport
  std::shared_ptr<aux_record> aux;        // source of the aux push; kept alive by the push
};

struct prefill_state {
  rank_args args;
  const config::prefill_rank_plan* me = nullptr;
  std::unique_ptr<kv_pool> pool;
  state_store store;
  std::map<std::uint64_t, prefill_room> rooms;
  std::map<std::uint64_t, std::vector<msg::dst_info>> early;  // destinations before the request
  std::map<int, decode_peer> peers;                             // by global decode rank
  // Released rooms whose pushes are still in flight: their pages return to the pool only once
  // the transport is done reading them. Key: (room, incarnation).
  struct draining_pages {
    std::vector<std::int32_t> pages, state_pages;
    int pending = 0;
  };
  std::map<std::pair<std::uint64_t, std::uint64_t>, draining_pages> draining;
  std::int64_t lent_pages() const {
    std::int64_t n = 0;
    for (const auto& [key, d] : draining) n += static_cast<std::int64_t>(d.pages.size() + d.state_pages.size());
    return n;
  }
  std::uint64_t posted = 0;   // last step this rank reported
  std::uint64_t applied = 0;  // last agreed round it acted on
  bool group_lost = false;    // its agreement supervisor went down: rooms cannot be agreed
  std::string name;
};
using prefill_actor = caf::stateful_actor<prefill_state>;

bool same(const prefill_room& r, std::uint64_t incarnation) { return r.req.incarnation == incarnation; }

// The peer_read entry of decode rank `d`'s plan that names this prefill rank.
const config::peer_read* read_of(const prefill_state& st, int decode_rank) {
  const auto& dp = st.args.plan->decode(decode_rank);
  for (const auto& pe : dp.peers)
    if (pe.pp == st.me->coord.pp && pe.cp == st.me->coord.cp && pe.tp == st.me->coord.tp) return &pe;
  return nullptr;
}

void notify_readers(prefill_actor* self, prefill_room& r, kv_poll state, const std::string& reason) {
  auto& st = self->state;
  for (int d : r.expected) {
    auto it = st.peers.find(d);
    if (it == st.peers.end() || it->second.down || !it->second.handle) continue;
    self->send(it->second.handle, msg::kv_status{r.req.room, r.req.incarnation, st.args.rank,
                                                 static_cast<std::uint8_t>(state), reason});
  }
}

// Refuses one decode rank's message about a request without touching the live room (if any):
// the sender's request fails with the reason, nobody else's.
void refuse(prefill_actor* self, int decode_rank, std::uint64_t room, std::uint64_t incarnation,
            const std::string& reason) {
  auto& st = self->state;
  spdlog::warn("{}: refused decode rank {} for room {}: {}", st.name, decode_rank, room, reason);
  auto it = st.peers.find(decode_rank);
  if (it == st.peers.end() || !it->second.handle || it->second.down) return;
  self->send(it->second.handle, msg::kv_status{room, incarnation, st.args.rank,
                                               static_cast<std::uint8_t>(kv_poll::failed), reason});
}

void fail_room(prefill_actor* self, std::uint64_t room, const std::string& reason) {
  auto& st = self->state;
  auto it = st.rooms.find(room);
  if (it == st.rooms.end()) return;
  if (!st.store.fail(room, reason)) return;
  spdlog::debug("{}: room {} failed: {}", st.name, room, reason);
  it->second.queued.clear();
  notify_readers(self, it->second, kv_poll::failed, reason);
}

void finish_if_done(prefill_actor* self, prefill_room& r) {
  auto& st = self->state;
  const auto* e = st.store.find(r.req.room);
  if (e == nullptr || e->state == kv_poll::failed || e->state == kv_poll::success) return;
  if (!r.last_seen || r.pending_pushes > 0) return;
  st.store.update(r.req.room, kv_poll::success);
  notify_readers(self, r, kv_poll::success, {});
}

// Hands one chunk to the transport for every reader.
void send_chunk(prefill_actor* self, prefill_room& r, const msg::kv_chunk& c) {
  auto& st = self->state;
  const auto room = r.req.room;
  st.store.update(room, kv_poll::transferring);
  const auto& cfg = st.args.plan->config();
  for (auto& [d, info] : r.dsts) {
    const auto* pe = read_of(st, d);
    auto& peer = st.peers.at(d);
    config::range pages{std::max(c.page_begin, info.prefix_pages), c.page_end};
    if (pe->cp_share) {
      auto share = config::cp_share(r.req.n_pages, cfg.prefill.cp, st.me->coord.cp);
      pages = {std::max(pages.begin, share.begin), std::min(pages.end, share.end)};
    }
    std::vector<transport::block> blocks;
    if (!pages.empty()) {
      std::vector<std::int32_t> src(r.pages.begin() + pages.begin, r.pages.begin() + pages.end);
      std::vector<std::int32_t> dst(info.dst_pages.begin() + pages.begin,
                                    info.dst_pages.begin() + pages.end);
      block_request br{&src, &dst, pe->layers, pe->heads,
                       cfg.model.kind == config::model_kind::mla, true, nullptr, nullptr};
      std::vector<std::int32_t> src_state, dst_state;
      if (!r.state_pages.empty()) {
        src_state.assign(r.state_pages.begin() + pages.begin, r.state_pages.begin() + pages.end);
        dst_state.assign(info.state_indices.begin() + pages.begin, info.state_indices.begin() + pages.end);
        br.src_state = &src_state;
        br.dst_state = &dst_state;
      }
      auto planned = plan_blocks(*st.pool, peer.pool, br);
      if (!planned) {
        fail_room(self, room, "decode rank " + std::to_string(d) + ": " + planned.error().reason());
        return;
      }
      blocks = std::move(planned.value());
    }
    std::shared_ptr<aux_record> aux;
    if (c.is_last && pe->writes_aux) {
      // Aux metadata goes after the KV of the last chunk, so it lands last. The room id and a
      // checksum in it let decode tell a landed slot from a stale one.
      if (!r.aux) {
        r.aux = std::make_shared<aux_record>(st.args.hooks.aux ? st.args.hooks.aux(r.req) : aux_record{});
        r.aux->room = room;
        r.aux->incarnation = r.req.incarnation;
        r.aux->check = aux_checksum(*r.aux);
      }
      aux = r.aux;
      blocks.push_back({reinterpret_cast<const std::byte*>(aux.get()), peer.pool.aux_region,
                        std::uint64_t(info.aux_slot) * sizeof(aux_record), sizeof(aux_record)});
    }
    if (blocks.empty()) continue;
    ++r.pending_pushes;
    auto me = caf::actor_cast<caf::actor>(self);
    auto inc = r.req.incarnation;
    st.args.transport->push(d, blocks, [me, room, inc, d, aux](status s) {
      caf::anon_send(me, msg::push_done{room, inc, d, s.ok(), s.reason()});
    });
  }
  if (c.is_last) r.last_seen = true;
}

void maybe_ready(prefill_actor* self, prefill_room& r) {
  auto& st = self->state;
  if (static_cast<int>(r.dsts.size()) < static_cast<int>(r.expected.size())) return;
  if (!st.store.update(r.req.room, kv_poll::waiting_for_input)) return;
  auto queued = std::move(r.queued);
  r.queued.clear();
  for (const auto& c : queued) send_chunk(self, r, c);
  // Chunks with nothing for this rank to send (an empty CP share) push nothing, so no push
  // completion will come to finish the room: check here.
  finish_if_done(self, r);
}

void accept_dst(prefill_actor* self, prefill_room& r, msg::dst_info d) {
  auto& st = self->state;
  const auto room = r.req.room;
  auto peer = st.peers.find(d.decode_rank);
  const bool expected =
      std::find(r.expected.begin(), r.expected.end(), d.decode_rank) != r.expected.end();
  if (d.incarnation != r.req.incarnation) {
    // Another request claims this live room (a duplicate room): refuse that request only.
    refuse(self, d.decode_rank, room, d.incarnation,
           "duplicate room " + std::to_string(room) + ": live request " +
               std::to_string(r.req.incarnation) + " holds it");
    return;
  }
  std::string bad;
  if (!expected)
    bad = "decode rank " + std::to_string(d.decode_rank) + " does not read from this rank";
  else if (peer != st.peers.end() && !peer->second.refused.empty())
    bad = peer->second.refused;
  else if (peer == st.peers.end() || !peer->second.registered)
    bad = "decode rank " + std::to_string(d.decode_rank) + " sent destinations before registering";
  else if (static_cast<int>(d.dst_pages.size()) != r.req.n_pages)
    bad = std::to_string(d.dst_pages.size()) + " destination pages for a " +
          std::to_string(r.req.n_pages) + "-page request";
  else if (d.prefix_pages < 0 || d.prefix_pages > r.req.n_pages)
    bad = "prefix of " + std::to_string(d.prefix_pages) + " pages out of range";
  else if (d.aux_slot < 0 || d.aux_slot >= peer->second.pool.aux_slots)
    bad = "aux slot " + std::to_string(d.aux_slot) + " out of range";
  else if (d.state_indices.size() != (r.state_pages.empty() ? 0u : static_cast<std::size_t>(r.req.n_pages)))
    bad = std::to_string(d.state_indices.size()) + " state indices for a " + std::to_string(r.req.n_pages) +
          "-page request" + (r.state_pages.empty() ? " of a model without state" : "");
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
  r.dsts.emplace(d.decode_rank, std::move(d));
  maybe_ready(self, r);
}

void release(prefill_actor* self, std::uint64_t room, std::uint64_t round, kv_poll agreed) {
  auto& st = self->state;
  auto it = st.rooms.find(room);
  const auto* e = st.store.find(room);
  msg::rank_released ev;
  ev.prefill = true;
  ev.rank = st.args.rank;
  ev.room = room;
  ev.incarnation = it->second.req.incarnation;
  ev.round = round;
  ev.state = static_cast<std::uint8_t>(agreed);
  ev.reason = e != nullptr ? e->reason : std::string{};
  if (it->second.pending_pushes > 0) {
    st.draining[{room, ev.incarnation}] = {std::move(it->second.pages), std::move(it->second.state_pages),
                                           it->second.pending_pushes};
  } else {
    st.pool->free_pages(it->second.pages);
    st.pool->free_state(it->second.state_pages);
  }
  st.rooms.erase(it);
  st.store.clear(room);
  if (st.args.observer) self->send(st.args.observer, std::move(ev));
}

caf::behavior prefill_rank(prefill_actor* self, rank_args args) {
  auto& st = self->state;
  st.args = std::move(args);
  st.me = &st.args.plan->prefill(st.args.rank);
  st.pool = std::make_unique<kv_pool>(st.args.shape);
  st.store = state_store(static_cast<std::size_t>(st.args.tunables.max_rooms_per_rank));
  st.name = "prefill rank " + std::to_string(st.args.rank);
  const auto& c = st.me->coord;
  self->send(st.args.registry,
             msg::register_rank{msg::wire_version, {c.dp, c.cp, c.tp, c.pp}, st.name,
                                caf::actor_cast<caf::actor>(self)});
  self->send(st.args.parent, msg::attach_child{st.args.child_index, caf::actor_cast<caf::actor>(self)});
  self->delayed_send(self, detail::step_pause(st.args.tunables, true), msg::step_tick{});

  self->monitor(st.args.parent);
  self->set_down_handler([self](const caf::down_msg& dm) {
    auto& st = self->state;
    if (detail::on_parent_down(
            self, dm, [self](std::uint64_t room, const std::string& why) { fail_room(self, room, why); },
            [self](std::uint64_t room, std::uint64_t round, kv_poll s) { release(self, room, round, s); }))
      return;
    for (auto& [d, peer] : st.peers)
      if (peer.handle && peer.handle.address() == dm.source && !peer.down) {
        peer.down = true;
        // Pushes in flight to it complete now (with an error) instead of waiting on a dead peer.
        st.args.transport->disconnect(static_cast<std::uint64_t>(d));
        for (auto& [room, r] : st.rooms) {
          const auto* e = st.store.find(room);
          if (e == nullptr || is_terminal(e->state)) continue;
          if (std::find(r.expected.begin(), r.expected.end(), d) != r.expected.end())
            fail_room(self, room, "decode rank " + std::to_string(d) + " down");
        }
      }
  });

  return caf::message_handler{
      [self](msg::registration_reply& r) {
        if (!r.ok) spdlog::error("{}: registration refused: {}", self->state.name, r.reason);
      },
      [self](msg::kv_registration& reg) {
        auto& st = self->state;
        if (reg.version != msg::wire_version) {
          spdlog::error("{}: decode rank {} speaks wire version {}, this rank {}", st.name,
                        reg.decode_rank, reg.version, msg::wire_version);
          return;
        }
        if (reg.decode_rank < 0 || reg.decode_rank >= st.args.plan->decode_ranks() ||
            !check_remote_pool(reg.pool)) {
          spdlog::error("{}: invalid registration from decode rank {}", st.name, reg.decode_rank);
          return;
        }
        auto& peer = st.peers[reg.decode_rank];
        peer.handle = reg.decode;
        peer.pool = reg.pool;
        peer.down = false;
        self->monitor(reg.decode);
        // The transport checks every later write against these regions; a description it cannot
        // use fails that decode rank's requests with the reason, nobody else's.
        auto connected = st.args.transport->connect(static_cast<std::uint64_t>(reg.decode_rank),
                                                    reg.endpoint, reg.regions);
        peer.refused.clear();
        if (!connected) {
          peer.refused = "transport cannot reach decode rank " + std::to_string(reg.decode_rank) +
                         ": " + connected.reason();
          spdlog::error("{}: {}", st.name, peer.refused);
        }
        peer.registered = true;
      },
      [self](msg::new_request& q) {
        auto& st = self->state;
        if (st.group_lost) {
          detail::refuse_request(self, true, q, "agreement group lost: its supervisor went down");
          return;
        }
        const auto& cfg = st.args.plan->config();
        prefill_room r;
        r.req = detail::view_of(q, cfg.page_size);
        for (const auto& rd : st.me->readers)
          r.expected.push_back(config::decode_rank_of(cfg.decode, {q.decode_dp, rd.pp, rd.tp}));
        auto initial = st.me->authoritative ? kv_poll::bootstrapping : kv_poll::waiting_for_input;
        if (auto s = st.store.create(q.room, q.incarnation, initial); !s) {
          detail::refuse_request(self, true, q, s.reason());
          return;
        }
        auto pages = st.pool->alloc_pages(r.req.n_pages);
        if (!pages) {
          st.rooms.emplace(q.room, std::move(r));
          fail_room(self, q.room, "out of KV pages");
          return;
        }
        r.pages = std::move(*pages);
        if (st.pool->shape().state_pages > 0) {
          auto state = st.pool->alloc_state(r.req.n_pages);
          if (!state) {
            st.pool->free_pages(r.pages);
            r.pages.clear();
            st.rooms.emplace(q.room, std::move(r));
            fail_room(self, q.room, "out of state pages");
            return;
          }
          r.state_pages = std::move(*state);
        }
        if (st.me->authoritative && st.args.hooks.fill) {
          config::range fill{0, r.req.n_pages};
          if (cfg.cp_send_all && cfg.prefill.cp > 1) fill = config::cp_share(r.req.n_pages, cfg.prefill.cp, st.me->coord.cp);
          st.args.hooks.fill(*st.pool, r.req, r.pages, r.state_pages, fill);
          if ((q.fault & fault_corrupt) != 0 && !fill.empty()) {
            auto* p = st.pool->item(st.me->layers.begin, 0, r.pages[fill.begin]);
            *p = static_cast<std::byte>(~std::to_integer<unsigned>(*p));
          }
        }
        auto& room = st.rooms.emplace(q.room, std::move(r)).first->second;
        for (int d : room.expected) {
          auto it = st.peers.find(d);
          if (it != st.peers.end() && it->second.down) {
            fail_room(self, q.room, "decode rank " + std::to_string(d) + " down");
            return;
          }
          if (it == st.peers.end()) {
            // Not connected yet: watch it through the registry, so its death fails the room
            // now instead of at the bootstrap timeout.
            st.peers[d];
            self->request(st.args.registry, caf::infinite, msg::lookup_decode{d})
                .then(
                    [self](msg::decode_entry& e) {
                      auto& st = self->state;
                      auto& peer = st.peers[e.rank];
                      if (e.down && !peer.registered && !peer.down) {
                        // Dead before it ever connected here: its rooms fail now, not at the
                        // bootstrap timeout.
                        peer.down = true;
                        for (auto& [room, r] : st.rooms) {
                          const auto* en = st.store.find(room);
                          if (en != nullptr && !is_terminal(en->state) &&
                              std::find(r.expected.begin(), r.expected.end(), e.rank) != r.expected.end())
                            fail_room(self, room, "decode rank " + std::to_string(e.rank) + " down");
                        }
                        return;
                      }
                      if (e.handle && !peer.handle) {
                        peer.handle = e.handle;
                        self->monitor(e.handle);
                      }
                    },
                    // The registry may be restarting: the decode rank's registration (or
                    // the bootstrap timeout) still settles the room.
                    [self, d](caf::error& e) {
                      spdlog::warn("{}: lookup of decode rank {} failed: {}", self->state.name, d,
                                   self->system().render(e));
                    });
          }
        }
        if (st.me->authoritative)
          self->delayed_send(self, std::chrono::milliseconds(st.args.tunables.bootstrap_timeout_ms),
                             msg::room_timeout{q.room, q.incarnation});
        if (auto e = st.early.find(q.room); e != st.early.end()) {
          auto early = std::move(e->second);
          st.early.erase(e);
          for (auto& d : early) accept_dst(self, room, std::move(d));
        }
      },
      [self](msg::dst_info& d) {
        auto& st = self->state;
        if (d.version != msg::wire_version) {
          refuse(self, d.decode_rank, d.room, d.incarnation,
                 "destination info of wire version " + std::to_string(d.version) +
                     ", this prefill rank speaks " + std::to_string(msg::wire_version));
          return;
        }
        auto it = st.rooms.find(d.room);
        if (it != st.rooms.end()) {
          accept_dst(self, it->second, std::move(d));  // checks it against the live request
          return;
        }
        // The decode side can be faster than this rank's scheduler: keep it for the request,
        // within bounds (remote input must not grow this rank's memory without limit).
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
        auto& waiting = st.early[d.room];
        // The request may never come here (lost, or routed elsewhere): after the bootstrap
        // timeout the buffered destinations are refused, so their decode ranks fail now.
        if (waiting.empty())
          self->delayed_send(self, std::chrono::milliseconds(st.args.tunables.bootstrap_timeout_ms),
                             msg::early_expiry{d.room});
        waiting.push_back(std::move(d));
      },
      [self](msg::kv_chunk& c) {
        auto& st = self->state;
        auto it = st.rooms.find(c.room);
        if (it == st.rooms.end() || !same(it->second, c.incarnation)) return;
        auto& r = it->second;
        const auto* e = st.store.find(c.room);
        if (e == nullptr || is_terminal(e->state)) return;  // aborted rooms send nothing more
        if (c.page_begin < 0 || c.page_end < c.page_begin || c.page_end > r.req.n_pages) {
          fail_room(self, c.room, "chunk pages out of range");
          return;
        }
        if (!st.me->authoritative) {
          // Non-authoritative: nobody reads this rank; skip chunks, done on the last one.
          if (c.is_last) st.store.update(c.room, kv_poll::success);
          return;
        }
        if (e->state == kv_poll::bootstrapping) {
          r.queued.push_back(c);
          return;
        }
        send_chunk(self, r, c);
        finish_if_done(self, r);
      },
      [self](msg::push_done& p) {
        auto& st = self->state;
        auto it = st.rooms.find(p.room);
        if (it == st.rooms.end() || !same(it->second, p.incarnation)) {
          auto d = st.draining.find({p.room, p.incarnation});
          if (d != st.draining.end() && --d->second.pending == 0) {
            st.pool->free_pages(d->second.pages);
            st.pool->free_state(d->second.state_pages);
            st.draining.erase(d);
          }
          return;
        }
        auto& r = it->second;
        --r.pending_pushes;
        if (!p.ok) {
          fail_room(self, p.room, "transport to decode rank " + std::to_string(p.decode_rank) + ": " + p.reason);
          return;
        }
        finish_if_done(self, r);
      },
      [self](msg::abort_room& a) {
        auto& st = self->state;
        st.early.erase(a.room);
        auto it = st.rooms.find(a.room);
        if (it != st.rooms.end() && same(it->second, a.incarnation)) {
          const auto* e = st.store.find(a.room);
          if (e != nullptr && e->state != kv_poll::success)
            fail_room(self, a.room, "aborted by decode rank " + std::to_string(a.decode_rank) + ": " + a.reason);
        }
        if (auto p = st.peers.find(a.decode_rank); p != st.peers.end() && !p->second.down)
          self->send(p->second.handle, msg::abort_ack{a.room, a.incarnation, st.args.rank});
      },
      [self](msg::abort_request& a) {
        // The scheduler aborts: fail unless already done (no transfer after an abort).
        auto& st = self->state;
        auto it = st.rooms.find(a.room);
        if (it == st.rooms.end() || !same(it->second, a.incarnation)) return;
        const auto* e = st.store.find(a.room);
        if (e != nullptr && e->state != kv_poll::success) fail_room(self, a.room, "aborted: " + a.reason);
      },
      [self](msg::early_expiry& x) {
        auto& st = self->state;
        auto e = st.early.find(x.room);
        if (e == st.early.end()) return;
        auto stale = std::move(e->second);
        st.early.erase(e);
        for (const auto& d : stale)
          refuse(self, d.decode_rank, d.room, d.incarnation,
                 "no request for this room reached prefill rank " + std::to_string(st.args.rank) +
                     " within the bootstrap timeout");
      },
      [self](msg::room_timeout& t) {
        auto& st = self->state;
        auto it = st.rooms.find(t.room);
        if (it == st.rooms.end() || !same(it->second, t.incarnation)) return;
        const auto* e = st.store.find(t.room);
        if (e != nullptr && e->state == kv_poll::bootstrapping)
          fail_room(self, t.room, "bootstrap timeout: destinations from " +
                                      std::to_string(it->second.dsts.size()) + " of " +
                                      std::to_string(it->second.expected.size()) + " decode ranks");
      },
  }.or_else(detail::rank_handlers(
      self, true,
      [self](std::uint64_t room, const std::string& why) { fail_room(self, room, why); },
      [self](std::uint64_t room, std::uint64_t round, kv_poll s) { release(self, room, round, s); }));
}

}  // namespace

caf::actor spawn_prefill_rank(caf::actor_system& sys, rank_args args) {
  return sys.spawn(prefill_rank, std::move(args));
}

}  // namespace kvflow
