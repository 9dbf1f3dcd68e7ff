// Prefill and decode rank actors (semantics.md sections 2, 4, 5) with a real in-process
// transport, a real bootstrap registry and test actors as peers and parents.
#include <algorithm>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>

#include "actor_helpers.hpp"
#include "actors/block_plan.hpp"
#include "actors/bootstrap_registry.hpp"
#include "actors/kv_pool.hpp"
#include "actors/rank.hpp"
#include "config/routing.hpp"
#include "transport/inproc_transport.hpp"

namespace kvflow::actor_test {
namespace {

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

constexpr int page_size = 4;

// MLA, 4 layers of 16 bytes per token: one page of one layer is 64 bytes.
config::cluster_config mla_config(int prefill_tp, int prefill_cp, int decode_tp, bool cp_send_all = false) {
  config::cluster_config c;
  c.prefill.tp = prefill_tp;
  c.prefill.cp = prefill_cp;
  c.decode.tp = decode_tp;
  c.dtype = config::kv_dtype::fp8;
  c.model = config::parse_model("mla:4:16", c.dtype);
  c.page_size = page_size;
  c.cp_send_all = cp_send_all;
  return c;
}

// The byte a prefill rank computed at byte k of page index i (of the request) of layer l.
std::byte pattern_byte(std::uint64_t room, int layer, int page_index, std::int64_t k) {
  return static_cast<std::byte>((room * 37 + static_cast<std::uint64_t>(layer) * 11 +
                                 static_cast<std::uint64_t>(page_index) * 5 + static_cast<std::uint64_t>(k)) &
                                0xff);
}

void fill_pattern(kv_pool& pool, const request_view& req, const std::vector<std::int32_t>& pages,
                  const std::vector<std::int32_t>& /*state_pages: mla:4:16 has none*/, config::range fill) {
  const auto& s = pool.shape();
  for (int i = fill.begin; i < fill.end; ++i)
    for (int l = s.layers.begin; l < s.layers.end; ++l)
      for (int b = 0; b < s.buffers_per_layer; ++b) {
        auto* item = pool.item(l, b, pages[i]);
        for (std::int64_t k = 0; k < s.item_bytes; ++k) item[k] = pattern_byte(req.room, l, i, k);
      }
}

msg::new_request request(std::uint64_t room, std::uint64_t incarnation, int tokens) {
  msg::new_request q;
  q.room = room;
  q.incarnation = incarnation;
  q.prompt_tokens = tokens;
  return q;
}

msg::kv_chunk chunk(std::uint64_t room, int begin, int end, bool last, std::uint64_t incarnation = 1) {
  return msg::kv_chunk{room, incarnation, begin, end, last};
}

// A peer standing in for the other side: a recorder actor, and for a decode peer its KV pool
// registered with the shared transport.
struct fake_peer {
  caf::actor handle;
  inbox_ptr box;
  kv_pool* pool = nullptr;
  remote_pool remote;
};

// One rank under test with everything around it: registry, transport, a loopback parent (the
// agreement), an observer. One rank per fixture, so the parent's inbox is that rank's reports.
struct rank_fixture : actor_fixture {
  config::cluster_config config;
  std::shared_ptr<const config::routing_plan> plan;
  std::shared_ptr<transport::inproc_transport> transport =
      std::make_shared<transport::inproc_transport>(std::make_shared<transport::inproc_fabric>());
  caf::actor registry;
  inbox_ptr parent_box = std::make_shared<inbox>();
  std::shared_ptr<std::atomic<bool>> echo = std::make_shared<std::atomic<bool>>(false);
  caf::actor parent;
  caf::actor observer;
  inbox_ptr observer_box;
  config::tunables tunables;
  caf::actor rank;
  std::shared_ptr<transport::transport> rank_transport;  // what ranks push through (default: transport)
  std::vector<std::unique_ptr<kv_pool>> pools;  // fake decode pools: outlive every pusher
  std::vector<std::uint64_t> regions;

  explicit rank_fixture(const config::cluster_config& c)
      : config(c), plan(std::make_shared<const config::routing_plan>(c)) {
    registry = own(spawn_bootstrap_registry(sys, c));
    parent = own(sys.spawn(loopback_parent, parent_box, echo, 7));
    std::tie(observer, observer_box) = spawn_recorder();
    tunables.step_interval_us = 1000;
  }
  ~rank_fixture() {
    // No push may land in a pool once it is freed: forget the regions, then stop every actor.
    for (auto id : regions) transport->deregister_memory(id);
    for (auto& a : owned) self->send_exit(a, caf::exit_reason::kill);
  }

  rank_args base_args(int r) {
    rank_args a;
    a.plan = plan;
    a.rank = r;
    a.tunables = tunables;
    a.transport = rank_transport ? rank_transport : transport;
    a.parent = parent;
    a.registry = registry;
    a.observer = observer;
    return a;
  }

  caf::actor spawn_prefill(int r) {
    const auto& me = plan->prefill(r);
    auto a = base_args(r);
    a.shape = prefill_pool_shape(*plan, r, 32);
    a.child_index = me.coord.cp;
    a.hooks.fill = fill_pattern;
    rank = own(spawn_prefill_rank(sys, std::move(a)));
    return rank;
  }

  // A decode rank's memory registered with the transport, behind a recorder actor.
  fake_peer fake_decode(int decode_rank, int pages = 16, int aux_slots = 4) {
    pool_shape shape = decode_pool_shape(*plan, decode_rank, pages, aux_slots);
    pools.push_back(std::make_unique<kv_pool>(shape));
    fake_peer p;
    p.pool = pools.back().get();
    auto kv = transport->register_memory(decode_rank, p.pool->kv_base(), p.pool->kv_bytes());
    auto aux = transport->register_memory(decode_rank, p.pool->aux_base(), p.pool->aux_bytes());
    auto state = transport->register_memory(decode_rank, p.pool->state_base(), p.pool->state_bytes());
    REQUIRE(kv.ok());
    REQUIRE(aux.ok());
    REQUIRE(state.ok());
    regions.push_back(kv.value().id);
    regions.push_back(aux.value().id);
    regions.push_back(state.value().id);
    p.remote = describe(*p.pool, kv.value().id, aux.value().id, state.value().id);
    std::tie(p.handle, p.box) = spawn_recorder();
    return p;
  }

  // The fake decode rank connects to the prefill rank under test (as on_topology does).
  void connect(const fake_peer& d, int decode_rank) {
    const auto& me = plan->decode(decode_rank);
    msg::kv_registration reg;
    reg.decode_rank = decode_rank;
    reg.dp = me.coord.dp;
    reg.pp = me.coord.pp;
    reg.tp = me.coord.tp;
    reg.tp_size = config.decode.tp;
    reg.pool = d.remote;
    reg.decode = d.handle;
    caf::anon_send(rank, reg);
  }

  void send_dst(std::uint64_t room, std::uint64_t incarnation, int decode_rank,
                std::vector<std::int32_t> pages, std::int32_t aux_slot) {
    msg::dst_info d;
    d.room = room;
    d.incarnation = incarnation;
    d.decode_rank = decode_rank;
    d.dst_pages = std::move(pages);
    d.aux_slot = aux_slot;
    caf::anon_send(rank, d);
  }

  // Every message sent to the rank before this call has been processed once it returns.
  msg::pool_usage sync() {
    msg::pool_usage u;
    bool answered = false;
    self->request(rank, long_wait, msg::pool_usage_query{})
        .receive(
            [&](msg::pool_usage& x) {
              u = x;
              answered = true;
            },
            [&](caf::error& e) { FAIL_CHECK("rank did not answer: " << sys.render(e)); });
    REQUIRE(answered);
    return u;
  }

  // The state of `room` in the first step report that mentions it.
  int first_state(std::uint64_t room) {
    auto r = parent_box->wait_for<msg::step_report>(
        [room](const msg::step_report& s) { return state_of(s.states, room) >= 0; });
    REQUIRE(r);
    return state_of(r->states, room);
  }

  // Waits for a step report with `room` in state `s`.
  bool reaches(std::uint64_t room, kv_poll s, ms timeout = long_wait) {
    return parent_box
        ->wait_for<msg::step_report>(
            [room, s](const msg::step_report& r) { return state_of(r.states, room) == as_int(s); },
            timeout)
        .has_value();
  }

  // The state of `room` as of now: every message sent to the rank before this call has been
  // processed (-1: the room is not in the rank's store).
  int state_now(std::uint64_t room) {
    sync();
    // At most one report sent before the sync may still be on its way into the parent's inbox;
    // any report after that one reflects the rank as of the sync or later.
    auto from = parent_box->size() + 1;
    auto r = parent_box->wait_any<msg::step_report>(long_wait, from);
    REQUIRE(r);
    return state_of(r->states, room);
  }

  std::optional<msg::rank_released> released(std::uint64_t room, std::uint64_t incarnation = 1) {
    return observer_box->wait_for<msg::rank_released>([room, incarnation](const msg::rank_released& e) {
      return e.room == room && e.incarnation == incarnation;
    });
  }
};

std::optional<msg::kv_status> status_of(const fake_peer& p, std::uint64_t room, kv_poll state,
                                        std::uint64_t incarnation = 1, ms timeout = long_wait) {
  return p.box->wait_for<msg::kv_status>(
      [=](const msg::kv_status& s) {
        return s.room == room && s.incarnation == incarnation && s.state == static_cast<std::uint8_t>(state);
      },
      timeout);
}

// Test transports wrap the in-process one and change only how pushes complete.
class wrapped_transport : public kvflow::transport::transport {
 public:
  explicit wrapped_transport(std::shared_ptr<kvflow::transport::inproc_transport> inner) : inner_(std::move(inner)) {}
  std::string endpoint() const override { return inner_->endpoint(); }
  std::vector<kvflow::transport::memory_type> memory_types() const override { return inner_->memory_types(); }
  result<kvflow::transport::region_desc> register_memory(std::uint64_t owner, void* base, std::uint64_t len) override {
    return inner_->register_memory(owner, base, len);
  }
  void deregister_memory(std::uint64_t region) override { inner_->deregister_memory(region); }
  status connect(std::uint64_t peer, const std::string& endpoint,
                 const std::vector<kvflow::transport::region_desc>& regions) override {
    return inner_->connect(peer, endpoint, regions);
  }
  void disconnect(std::uint64_t peer) override { inner_->disconnect(peer); }
  std::uint64_t bytes_moved() const override { return inner_->bytes_moved(); }

 protected:
  std::shared_ptr<kvflow::transport::inproc_transport> inner_;
};

// A transport whose pushes complete only when the test says so, as UCX's do when the network
// is slow: the bytes are copied at once, the completion callback is held back.
class deferred_transport final : public wrapped_transport {
 public:
  explicit deferred_transport(std::shared_ptr<kvflow::transport::inproc_transport> inner)
      : wrapped_transport(std::move(inner)) {}
  const char* name() const override { return "deferred"; }
  void push(std::uint64_t peer, const std::vector<kvflow::transport::block>& blocks, kvflow::transport::completion done) override {
    status result;
    inner_->push(peer, blocks, [&result](status s) { result = std::move(s); });
    std::lock_guard<std::mutex> g(mutex_);
    held_.push_back([done = std::move(done), result] { done(result); });
  }
  std::size_t held() {
    std::lock_guard<std::mutex> g(mutex_);
    return held_.size();
  }
  void complete_all() {
    std::vector<std::function<void()>> now;
    {
      std::lock_guard<std::mutex> g(mutex_);
      now.swap(held_);
    }
    for (auto& f : now) f();
  }

 private:
  std::mutex mutex_;
  std::vector<std::function<void()>> held_;
};

// A transport whose first `failures` pushes fail (a transient network error), then works.
class flaky_transport final : public wrapped_transport {
 public:
  flaky_transport(std::shared_ptr<kvflow::transport::inproc_transport> inner, int failures)
      : wrapped_transport(std::move(inner)), failures_(failures) {}
  const char* name() const override { return "flaky"; }
  void push(std::uint64_t peer, const std::vector<kvflow::transport::block>& blocks,
            kvflow::transport::completion done) override {
    if (failures_.fetch_sub(1) > 0) {
      done(status::error("connection reset by peer"));
      return;
    }
    inner_->push(peer, blocks, std::move(done));
  }

 private:
  std::atomic<int> failures_;
};

}  // namespace

// ---- prefill ---------------------------------------------------------------------------------

TEST_CASE("regression #13054: a transient transport error fails that room only; the peer keeps serving") {
  // SGLang marked the peer session bad until decode re-registered: one error, then every later
  // request to that peer failed. Here the error fails the room it hit and nothing else.
  rank_fixture f(mla_config(1, 1, 1));
  f.rank_transport = std::make_shared<flaky_transport>(f.transport, 1);
  auto d = f.fake_decode(0);
  f.spawn_prefill(0);
  f.connect(d, 0);
  caf::anon_send(f.rank, request(81, 1, 8));
  f.send_dst(81, 1, 0, {1, 2}, 0);
  caf::anon_send(f.rank, chunk(81, 0, 2, true));
  auto failed = status_of(d, 81, kv_poll::failed);
  REQUIRE(failed);
  CHECK(contains(failed->reason, "connection reset"));
  caf::anon_send(f.rank, request(82, 2, 8));
  f.send_dst(82, 2, 0, {3, 4}, 1);
  caf::anon_send(f.rank, msg::kv_chunk{82, 2, 0, 2, true});
  CHECK(status_of(d, 82, kv_poll::success, 2));
  CHECK(f.transport->bytes_moved() > 0);
}

TEST_CASE("prefill: state pages land at the destination's state indices; a bad state index fails only its room") {
  // mla:4:16:8: 4 layers, 16 latent bytes and 8 state bytes (an indexer cache) per token.
  auto c = mla_config(1, 1, 1);
  c.model = config::parse_model("mla:4:16:8", c.dtype);
  rank_fixture f(c);
  auto d = f.fake_decode(0);
  REQUIRE(d.remote.state_pages == 16);
  f.spawn_prefill(0);
  f.connect(d, 0);
  caf::anon_send(f.rank, request(101, 1, 8));  // 2 pages
  msg::dst_info good;
  good.room = 101;
  good.incarnation = 1;
  good.dst_pages = {5, 6};
  good.state_indices = {9, 3};
  caf::anon_send(f.rank, good);
  caf::anon_send(f.rank, chunk(101, 0, 2, true));
  REQUIRE(status_of(d, 101, kv_poll::success));
  // 2 pages x 4 layers x (64 B of KV + 32 B of state) + the aux record.
  CHECK(f.transport->bytes_moved() == 2u * 4 * (64 + 32) + sizeof(aux_record));
  // A hostile state index fails only its own room; the next room on the same rank succeeds.
  caf::anon_send(f.rank, request(102, 2, 8));
  caf::anon_send(f.rank, request(103, 3, 8));
  auto bad = good;
  bad.room = 102;
  bad.incarnation = 2;
  bad.state_indices = {1, 16};  // 16 is past the registered 16 state pages
  caf::anon_send(f.rank, bad);
  auto fine = good;
  fine.room = 103;
  fine.incarnation = 3;
  fine.dst_pages = {7, 8};
  fine.state_indices = {0, 1};
  caf::anon_send(f.rank, fine);
  caf::anon_send(f.rank, chunk(102, 0, 2, true, 2));
  caf::anon_send(f.rank, chunk(103, 0, 2, true, 3));
  auto failed = status_of(d, 102, kv_poll::failed, 2);
  REQUIRE(failed);
  CHECK(contains(failed->reason, "state index 16"));
  CHECK(status_of(d, 103, kv_poll::success, 3));
}

TEST_CASE("prefill: destinations for a request that never arrives are refused at the bootstrap timeout") {
  // Buffered early destinations must not stay forever (memory) nor leave decode waiting for its
  // own, longer timeout.
  rank_fixture f(mla_config(1, 1, 1));
  f.tunables.bootstrap_timeout_ms = 50;
  auto d = f.fake_decode(0);
  f.spawn_prefill(0);
  f.connect(d, 0);
  f.send_dst(111, 1, 0, {1, 2}, 0);  // no new_request for room 111 ever comes
  auto refused = status_of(d, 111, kv_poll::failed);
  REQUIRE(refused);
  CHECK(contains(refused->reason, "no request for this room"));
  // A request that does come in time uses its early destinations as before.
  f.send_dst(112, 1, 0, {3, 4}, 1);
  caf::anon_send(f.rank, request(112, 1, 8));
  caf::anon_send(f.rank, chunk(112, 0, 2, true));
  CHECK(status_of(d, 112, kv_poll::success));
}

TEST_CASE("prefill keeps a released room's pages until its pushes complete") {
  // An aborted room is agreed Failed and released while its push is still in flight: the pages
  // the transport reads from must not go back to the pool (and to the next request) before the
  // push completes.
  rank_fixture f(mla_config(1, 1, 1));
  auto deferred = std::make_shared<deferred_transport>(f.transport);
  f.rank_transport = deferred;
  auto d = f.fake_decode(0);
  f.spawn_prefill(0);
  f.connect(d, 0);
  const std::uint64_t room = 71;
  caf::anon_send(f.rank, request(room, 1, 8));  // 2 pages
  f.send_dst(room, 1, 0, {4, 5}, 0);
  caf::anon_send(f.rank, chunk(room, 0, 2, true));
  CHECK(f.sync().used_pages == 2);
  REQUIRE(deferred->held() == 1);
  caf::anon_send(f.rank, msg::abort_room{room, 1, 0, "decode gave up"});
  f.echo->store(true);
  auto ev = f.released(room);
  REQUIRE(ev);
  CHECK(ev->state == static_cast<std::uint8_t>(kv_poll::failed));
  auto held = f.sync();
  CHECK(held.used_pages == 2);  // released, but the push still reads its pages...
  CHECK(held.draining_pages == 2);  // ...and says they are only lent (leak accounting waits)
  deferred->complete_all();
  bool freed = false;
  for (int i = 0; i < 200 && !freed; ++i) {
    freed = f.sync().used_pages == 0;
    if (!freed) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  CHECK(freed);
  CHECK(f.sync().draining_pages == 0);
}

TEST_CASE("prefill CP rank 1 is non-authoritative: starts WaitingForInput, Success on an empty last chunk") {
  rank_fixture f(mla_config(1, 2, 1));
  REQUIRE_FALSE(f.plan->prefill(1).authoritative);
  auto d = f.fake_decode(0);
  f.spawn_prefill(1);
  f.connect(d, 0);
  caf::anon_send(f.rank, request(5, 1, 10));  // 3 pages
  CHECK(f.first_state(5) == as_int(kv_poll::waiting_for_input));
  // Non-last chunks are skipped: no Transferring, nothing moved.
  caf::anon_send(f.rank, chunk(5, 0, 1, false));
  caf::anon_send(f.rank, chunk(5, 1, 3, false));
  CHECK(f.state_now(5) == as_int(kv_poll::waiting_for_input));
  // The last chunk carries no pages (everything came in earlier chunks): still Success.
  caf::anon_send(f.rank, chunk(5, 3, 3, true));
  CHECK(f.reaches(5, kv_poll::success));
  CHECK(f.transport->bytes_moved() == 0);
  // Nobody reads from this rank: it tells no decode rank anything.
  CHECK(d.box->all<msg::kv_status>().empty());
  // Acting on the agreed Success, it releases the room.
  f.echo->store(true);
  auto ev = f.released(5);
  REQUIRE(ev);
  CHECK(ev->prefill);
  CHECK(ev->rank == 1);
  CHECK(ev->state == as_int(kv_poll::success));
  CHECK(f.sync().used_pages == 0);
}

TEST_CASE("prefill TP rank 1 for MLA with decode TP1 is non-authoritative and never waits for destinations") {
  rank_fixture f(mla_config(2, 1, 1));
  REQUIRE_FALSE(f.plan->prefill(1).authoritative);
  f.tunables.bootstrap_timeout_ms = 50;  // would fail it, were it (wrongly) waiting in Bootstrapping
  f.spawn_prefill(1);
  caf::anon_send(f.rank, request(6, 1, 8));
  CHECK(f.first_state(6) == as_int(kv_poll::waiting_for_input));
  caf::anon_send(f.rank, chunk(6, 0, 2, true));
  CHECK(f.reaches(6, kv_poll::success));
  CHECK(f.state_now(6) == as_int(kv_poll::success));
}

TEST_CASE("prefill authoritative rank: Bootstrapping, WaitingForInput, Success, bytes at the destination pages") {
  rank_fixture f(mla_config(1, 2, 1));
  REQUIRE(f.plan->prefill(0).authoritative);
  auto d = f.fake_decode(0);
  f.spawn_prefill(0);
  f.connect(d, 0);
  const std::uint64_t room = 9;
  caf::anon_send(f.rank, request(room, 1, 10));  // 3 pages
  CHECK(f.first_state(room) == as_int(kv_poll::bootstrapping));
  CHECK(f.state_now(room) == as_int(kv_poll::bootstrapping));

  const std::vector<std::int32_t> dst{7, 8, 2};
  f.send_dst(room, 1, 0, dst, 1);
  CHECK(f.reaches(room, kv_poll::waiting_for_input));
  caf::anon_send(f.rank, chunk(room, 0, 2, false));
  CHECK(f.reaches(room, kv_poll::transferring));
  CHECK(f.state_now(room) == as_int(kv_poll::transferring));
  caf::anon_send(f.rank, chunk(room, 2, 3, true));
  CHECK(f.reaches(room, kv_poll::success));

  auto st = status_of(d, room, kv_poll::success);
  REQUIRE(st);
  CHECK(st->prefill_rank == 0);
  CHECK(d.box->all<msg::kv_status>().size() == 1);

  // Every byte of every layer landed at the destination page of its request page.
  const auto& s = d.pool->shape();
  std::uint64_t mismatched = 0;
  for (int i = 0; i < 3; ++i)
    for (int l = s.layers.begin; l < s.layers.end; ++l) {
      const auto* item = d.pool->item(l, 0, dst[i]);
      for (std::int64_t k = 0; k < s.item_bytes; ++k)
        if (item[k] != pattern_byte(room, l, i, k)) ++mismatched;
    }
  CHECK(mismatched == 0);
  // Pages that are not destinations stay untouched.
  for (int l = s.layers.begin; l < s.layers.end; ++l)
    for (int p : {0, 1, 3, 6, 9}) {
      const auto* item = d.pool->item(l, 0, p);
      CHECK(std::all_of(item, item + s.item_bytes, [](std::byte b) { return b == std::byte{0}; }));
    }
  // The aux metadata landed in the destination slot, naming the room.
  aux_record rec;
  std::memcpy(&rec, d.pool->aux_base() + d.pool->aux_offset(1), sizeof rec);
  CHECK(rec.room == room);
  CHECK(rec.incarnation == 1);
  CHECK(rec.check == aux_checksum(rec));
  CHECK(f.transport->bytes_moved() ==
        3 * static_cast<std::uint64_t>(s.layers.size() * s.item_bytes) + sizeof(aux_record));

  f.echo->store(true);
  auto ev = f.released(room);
  REQUIRE(ev);
  CHECK(ev->state == as_int(kv_poll::success));
  CHECK(f.sync().used_pages == 0);
}

TEST_CASE("prefill regression SGLang 30233 and 30325: an aborted room transfers nothing") {
  rank_fixture f(mla_config(1, 1, 1));
  auto d = f.fake_decode(0);
  f.spawn_prefill(0);
  f.connect(d, 0);
  const std::uint64_t room = 11;
  caf::anon_send(f.rank, request(room, 1, 10));
  f.send_dst(room, 1, 0, {3, 4, 5}, 0);
  CHECK(f.reaches(room, kv_poll::waiting_for_input));
  caf::anon_send(f.rank, msg::abort_room{room, 1, 0, "client went away"});
  caf::anon_send(f.rank, chunk(room, 0, 2, false));
  caf::anon_send(f.rank, chunk(room, 2, 3, true));

  auto ack = d.box->wait_for<msg::abort_ack>([room](const msg::abort_ack& a) { return a.room == room; });
  REQUIRE(ack);
  CHECK(ack->incarnation == 1);
  CHECK(ack->prefill_rank == 0);
  CHECK(f.state_now(room) == as_int(kv_poll::failed));
  CHECK(f.transport->bytes_moved() == 0);
  CHECK_FALSE(status_of(d, room, kv_poll::success, 1, ms(0)));
  f.echo->store(true);
  auto ev = f.released(room);
  REQUIRE(ev);
  CHECK(ev->state == as_int(kv_poll::failed));
  CHECK(contains(ev->reason, "abort"));
  CHECK(contains(ev->reason, "client went away"));
  CHECK(f.transport->bytes_moved() == 0);
}

TEST_CASE("prefill: hostile destination info fails only that room, a second room still succeeds") {
  rank_fixture f(mla_config(1, 1, 1));
  auto d = f.fake_decode(0, 16, 4);
  f.spawn_prefill(0);
  f.connect(d, 0);
  for (std::uint64_t room : {21, 22, 23, 24}) caf::anon_send(f.rank, request(room, 1, 10));  // 3 pages
  f.send_dst(21, 1, 0, {1, 99, 2}, 0);  // page beyond the 16 registered
  f.send_dst(22, 1, 0, {1, 2}, 1);      // 2 pages for a 3-page request
  f.send_dst(23, 1, 0, {4, 5, 6}, 2);   // fine
  f.send_dst(24, 1, 0, {7, 8, 9}, 40);  // aux slot beyond the 4 registered
  for (std::uint64_t room : {21, 22, 23, 24}) {
    caf::anon_send(f.rank, chunk(room, 0, 2, false));
    caf::anon_send(f.rank, chunk(room, 2, 3, true));
  }

  auto bad_page = status_of(d, 21, kv_poll::failed);
  REQUIRE(bad_page);
  INFO("room 21: " << bad_page->reason);
  CHECK(contains(bad_page->reason, "99"));
  auto bad_count = status_of(d, 22, kv_poll::failed);
  REQUIRE(bad_count);
  INFO("room 22: " << bad_count->reason);
  CHECK(contains(bad_count->reason, "destination pages"));
  auto bad_aux = status_of(d, 24, kv_poll::failed);
  REQUIRE(bad_aux);
  INFO("room 24: " << bad_aux->reason);
  CHECK(contains(bad_aux->reason, "aux slot"));
  auto good = status_of(d, 23, kv_poll::success);
  REQUIRE(good);

  CHECK(f.state_now(21) == as_int(kv_poll::failed));
  CHECK(f.state_now(22) == as_int(kv_poll::failed));
  CHECK(f.state_now(23) == as_int(kv_poll::success));
  CHECK(f.state_now(24) == as_int(kv_poll::failed));
  // Only room 23 moved bytes.
  const auto& s = d.pool->shape();
  CHECK(f.transport->bytes_moved() ==
        3 * static_cast<std::uint64_t>(s.layers.size() * s.item_bytes) + sizeof(aux_record));
  CHECK_FALSE(status_of(d, 21, kv_poll::success, 1, ms(0)));
  CHECK_FALSE(status_of(d, 23, kv_poll::failed, 1, ms(0)));
}

TEST_CASE("prefill: destinations for another incarnation of a live room do not fail the live room") {
  rank_fixture f(mla_config(1, 1, 1));
  auto d = f.fake_decode(0);
  f.spawn_prefill(0);
  f.connect(d, 0);
  const std::uint64_t room = 31;
  caf::anon_send(f.rank, request(room, 1, 8));  // 2 pages
  CHECK(f.first_state(room) == as_int(kv_poll::bootstrapping));
  // A duplicate request of the same room (n>1 sampling, client reuse) sends its destinations.
  f.send_dst(room, 2, 0, {1, 2}, 0);
  auto dup = status_of(d, room, kv_poll::failed, 2);
  REQUIRE(dup);
  INFO("duplicate: " << dup->reason);
  CHECK(contains(dup->reason, "duplicate"));
  CHECK(f.state_now(room) == as_int(kv_poll::bootstrapping));
  // The same duplicate reaching the rank's scheduler is refused too, leaving the live one.
  caf::anon_send(f.rank, request(room, 2, 8));
  auto refused = f.released(room, 2);
  REQUIRE(refused);
  CHECK(refused->state == as_int(kv_poll::failed));
  CHECK(f.state_now(room) == as_int(kv_poll::bootstrapping));
  CHECK(f.sync().live_rooms == 1);

  // The live request proceeds normally.
  f.send_dst(room, 1, 0, {5, 6}, 1);
  CHECK(f.reaches(room, kv_poll::waiting_for_input));
  caf::anon_send(f.rank, chunk(room, 0, 2, true));
  CHECK(status_of(d, room, kv_poll::success, 1));
  CHECK(f.reaches(room, kv_poll::success));
  CHECK_FALSE(status_of(d, room, kv_poll::failed, 1, ms(0)));
}

TEST_CASE("prefill: bootstrap timeout fails the room with a reason and tells the decode rank") {
  rank_fixture f(mla_config(1, 1, 1));
  f.tunables.bootstrap_timeout_ms = 100;
  auto d = f.fake_decode(0);
  // Known to the registry (so the prefill rank can watch it) but never sends destinations.
  caf::anon_send(f.registry, msg::register_decode{0, d.handle});
  f.spawn_prefill(0);
  const std::uint64_t room = 41;
  caf::anon_send(f.rank, request(room, 1, 8));
  CHECK(f.first_state(room) == as_int(kv_poll::bootstrapping));
  CHECK(f.reaches(room, kv_poll::failed));
  auto st = status_of(d, room, kv_poll::failed);
  REQUIRE(st);
  INFO("kv_status reason: " << st->reason);
  CHECK(contains(st->reason, "timeout"));
  f.echo->store(true);
  auto ev = f.released(room);
  REQUIRE(ev);
  CHECK(ev->state == as_int(kv_poll::failed));
  INFO("released reason: " << ev->reason);
  CHECK(contains(ev->reason, "bootstrap timeout"));
}

TEST_CASE("prefill CP-parallel sending: a rank with an empty share finishes when its chunks came before the destinations") {
  // 1-page request over 3 CP ranks: CP rank 1's share is empty and CP rank 0 writes the aux
  // slot, so rank 1 pushes nothing at all. Its last chunk arrives while it still waits for
  // destinations (the usual order: prefill computes while decode connects).
  rank_fixture f(mla_config(1, 3, 1, true));
  REQUIRE(f.plan->prefill(1).authoritative);
  REQUIRE(config::cp_share(1, 3, 1).empty());
  auto d = f.fake_decode(0);
  f.spawn_prefill(1);
  f.connect(d, 0);
  const std::uint64_t room = 45;
  caf::anon_send(f.rank, request(room, 1, page_size));
  caf::anon_send(f.rank, chunk(room, 0, 1, true));
  CHECK(f.state_now(room) == as_int(kv_poll::bootstrapping));
  f.send_dst(room, 1, 0, {3}, 0);
  CHECK(f.reaches(room, kv_poll::success));
  CHECK(status_of(d, room, kv_poll::success));
  CHECK(f.transport->bytes_moved() == 0);
}

TEST_CASE("regression: prefill rank fails a room its own scheduler aborts") {
  // semantics.md section 2, sender: Failed on "abort from either side". Before the fix the
  // prefill rank had no handler for msg::abort_request: the room went on and transferred.
  rank_fixture f(mla_config(1, 1, 1));
  auto d = f.fake_decode(0);
  f.spawn_prefill(0);
  f.connect(d, 0);
  const std::uint64_t room = 47;
  caf::anon_send(f.rank, request(room, 1, 8));
  f.send_dst(room, 1, 0, {1, 2}, 0);
  CHECK(f.reaches(room, kv_poll::waiting_for_input));
  caf::anon_send(f.rank, msg::abort_request{room, 1, "prefill scheduler aborted the request"});
  caf::anon_send(f.rank, chunk(room, 0, 2, true));
  CHECK(f.state_now(room) == as_int(kv_poll::failed));
  CHECK(status_of(d, room, kv_poll::failed, 1, short_wait));
  CHECK(f.transport->bytes_moved() == 0);
}

TEST_CASE("regression: an oversized dst_info of another incarnation leaves the live room alone") {
  // The duplicate-room rule (a dst_info whose incarnation differs from the live room's refuses
  // only that request) once was bypassed for page lists longer than max_pages_per_request: the
  // size check ran first and failed the LIVE request.
  rank_fixture f(mla_config(1, 1, 1));
  f.tunables.max_pages_per_request = 8;
  auto d = f.fake_decode(0);
  f.spawn_prefill(0);
  f.connect(d, 0);
  const std::uint64_t room = 61;
  caf::anon_send(f.rank, request(room, 1, 8));  // 2 pages
  CHECK(f.first_state(room) == as_int(kv_poll::bootstrapping));
  f.send_dst(room, 2, 0, std::vector<std::int32_t>(9, 1), 0);
  CHECK(f.state_now(room) == as_int(kv_poll::bootstrapping));
  CHECK_FALSE(status_of(d, room, kv_poll::failed, 1, ms(0)));
}

// ---- decode ----------------------------------------------------------------------------------

namespace {

// MHA with decode TP1 < prefill TP2: decode rank 0 reads both prefill ranks (each sends its
// heads), so it needs two distinct Success responses; prefill rank 0 writes the aux slot.
config::cluster_config mha_config() {
  config::cluster_config c;
  c.prefill.tp = 2;
  c.decode.tp = 1;
  c.dtype = config::kv_dtype::fp8;
  c.model = config::parse_model("mha:2:2:4", c.dtype);
  c.page_size = page_size;
  return c;
}

struct decode_fixture : rank_fixture {
  std::vector<fake_peer> prefill;  // fake prefill ranks 0 and 1
  struct verified {
    std::vector<std::int32_t> pages;
    std::int32_t aux_slot = -1;
  };
  std::shared_ptr<std::mutex> verify_mutex = std::make_shared<std::mutex>();
  std::shared_ptr<std::vector<verified>> verify_calls = std::make_shared<std::vector<verified>>();

  explicit decode_fixture(config::tunables t = {}) : rank_fixture(mha_config()) {
    tunables = t;
    tunables.step_interval_us = 1000;
    REQUIRE(plan->decode(0).required_prefill_response_num == 2);
    REQUIRE(plan->decode(0).expects_aux);
    // The fake prefill ranks register in the registry under their keys, as real ones do.
    for (int tp = 0; tp < 2; ++tp) {
      fake_peer p;
      std::tie(p.handle, p.box) = spawn_recorder();
      std::optional<msg::registration_reply> reply;
      self->request(registry, long_wait,
                    msg::register_rank{msg::wire_version, {0, 0, tp, 0}, "fake prefill " + std::to_string(tp),
                                       p.handle})
          .receive([&](msg::registration_reply& r) { reply = r; },
                   [&](caf::error& e) { FAIL_CHECK(sys.render(e)); });
      REQUIRE(reply);
      REQUIRE(reply->ok);
      prefill.push_back(p);
    }
  }

  void spawn_decode() {
    const auto& me = plan->decode(0);
    auto a = base_args(0);
    a.shape = {me.layers, plan->buffers_per_layer(), plan->decode_item_bytes(), 16, 4, page_size,
               me.local_heads, config.model.head_bytes()};
    a.child_index = 0;
    auto m = verify_mutex;
    auto calls = verify_calls;
    a.hooks.verify = [m, calls](const kv_pool&, const request_view&, const std::vector<std::int32_t>& pages,
                                const std::vector<std::int32_t>&, std::int32_t aux_slot) {
      std::lock_guard<std::mutex> g(*m);
      calls->push_back({pages, aux_slot});
      return verify_counts{100, 100, 0};
    };
    rank = own(spawn_decode_rank(sys, std::move(a)));
    // It resolves its peers through the registry and registers its memory with each.
    for (int tp = 0; tp < 2; ++tp) {
      auto reg = prefill[tp].box->wait_any<msg::kv_registration>();
      REQUIRE(reg);
      CHECK(reg->version == msg::wire_version);
      CHECK(reg->decode_rank == 0);
      CHECK(reg->tp_size == 1);
      CHECK(reg->decode == rank);
      CHECK(check_remote_pool(reg->pool).ok());
      CHECK(reg->pool.pages == 16);
      CHECK(reg->pool.aux_slots == 4);
    }
  }

  // Both fake prefill ranks received the room's destinations; returns prefill rank 0's copy.
  msg::dst_info destinations(std::uint64_t room, std::uint64_t incarnation = 1) {
    std::optional<msg::dst_info> first;
    for (int tp = 0; tp < 2; ++tp) {
      auto di = prefill[tp].box->wait_for<msg::dst_info>([=](const msg::dst_info& x) {
        return x.room == room && x.incarnation == incarnation;
      });
      INFO("fake prefill " << tp);
      REQUIRE(di);
      CHECK(di->decode_rank == 0);
      if (!first) {
        first = di;
      } else {
        CHECK(di->dst_pages == first->dst_pages);
        CHECK(di->aux_slot == first->aux_slot);
      }
    }
    return *first;
  }

  // Writes the aux record into the decode rank's slot through the transport, as prefill does.
  void land_aux(std::uint64_t room, std::uint64_t incarnation, std::int32_t slot) {
    auto reg = prefill[0].box->wait_any<msg::kv_registration>();
    REQUIRE(reg);
    aux_record rec{room, incarnation, static_cast<std::int32_t>(room % 32000), -0.5f, 0};
    rec.check = aux_checksum(rec);
    bool ok = false;
    std::string why;
    transport->push(0,
                    {transport::block{reinterpret_cast<const std::byte*>(&rec), reg->pool.aux_region,
                                      std::uint64_t(slot) * sizeof(aux_record), sizeof(aux_record)}},
                    [&](status s) {
                      ok = s.ok();
                      why = s.reason();
                    });
    INFO(why);
    REQUIRE(ok);
  }

  void status_from(int prefill_rank, std::uint64_t room, kv_poll s, const std::string& reason = {},
                   std::uint64_t incarnation = 1) {
    caf::anon_send(rank, msg::kv_status{room, incarnation, prefill_rank, static_cast<std::uint8_t>(s), reason});
  }

  // Both fake prefill ranks were told to abort the room; returns prefill rank 0's copy.
  msg::abort_room aborted_on_both(std::uint64_t room, std::uint64_t incarnation = 1) {
    std::optional<msg::abort_room> first;
    for (int tp = 0; tp < 2; ++tp) {
      auto a = prefill[tp].box->wait_for<msg::abort_room>(
          [=](const msg::abort_room& x) { return x.room == room && x.incarnation == incarnation; });
      INFO("fake prefill " << tp);
      REQUIRE(a);
      CHECK(a->decode_rank == 0);
      if (!first) first = a;
    }
    return *first;
  }
};

}  // namespace

TEST_CASE("decode rank: registers, sends destinations, Success after both prefill ranks and the aux slot") {
  decode_fixture f;
  f.spawn_decode();
  const std::uint64_t room = 51;
  caf::anon_send(f.rank, request(room, 1, 8));  // 2 pages
  auto dst = f.destinations(room);
  CHECK(dst.dst_pages.size() == 2);
  CHECK(dst.aux_slot >= 0);
  CHECK(dst.aux_slot < 4);
  CHECK(f.reaches(room, kv_poll::waiting_for_input));

  f.land_aux(room, 1, dst.aux_slot);
  f.status_from(0, room, kv_poll::success);
  f.status_from(0, room, kv_poll::success);  // the same rank twice is still one response
  CHECK(f.state_now(room) == as_int(kv_poll::waiting_for_input));
  f.status_from(1, room, kv_poll::success);
  CHECK(f.reaches(room, kv_poll::success));

  f.echo->store(true);
  auto ev = f.released(room);
  REQUIRE(ev);
  CHECK_FALSE(ev->prefill);
  CHECK(ev->state == as_int(kv_poll::success));
  CHECK(ev->bytes_verified == 100);
  {
    std::lock_guard<std::mutex> g(*f.verify_mutex);
    REQUIRE(f.verify_calls->size() == 1);
    CHECK(f.verify_calls->front().pages == dst.dst_pages);
    CHECK(f.verify_calls->front().aux_slot == dst.aux_slot);
  }
  auto usage = f.sync();
  CHECK(usage.used_pages == 0);
  CHECK(usage.used_aux == 0);
  for (const auto& p : f.prefill) CHECK(p.box->all<msg::abort_room>().empty());
}

TEST_CASE("decode rank: Success from every prefill rank without the aux slot landed is not Success") {
  decode_fixture f;
  f.spawn_decode();
  const std::uint64_t room = 52;
  caf::anon_send(f.rank, request(room, 1, 8));
  f.destinations(room);
  f.status_from(0, room, kv_poll::success);
  f.status_from(1, room, kv_poll::success);
  CHECK(f.reaches(room, kv_poll::failed));
  CHECK_FALSE(f.reaches(room, kv_poll::success, ms(0)));
  auto a = f.aborted_on_both(room);
  INFO(a.reason);
  CHECK(contains(a.reason, "aux"));
}

TEST_CASE("decode rank: a Failed status from one prefill rank fails the room and aborts every peer") {
  decode_fixture f;
  f.spawn_decode();
  const std::uint64_t room = 53;
  caf::anon_send(f.rank, request(room, 1, 8));
  f.destinations(room);
  f.status_from(0, room, kv_poll::success);
  f.status_from(1, room, kv_poll::failed, "transport error: link down");
  CHECK(f.reaches(room, kv_poll::failed));
  auto a = f.aborted_on_both(room);
  INFO(a.reason);
  CHECK(contains(a.reason, "link down"));
  f.echo->store(true);
  auto ev = f.released(room);
  REQUIRE(ev);
  CHECK(ev->state == as_int(kv_poll::failed));
  CHECK(contains(ev->reason, "prefill rank 1"));
  {
    std::lock_guard<std::mutex> g(*f.verify_mutex);
    CHECK(f.verify_calls->empty());
  }
  CHECK(f.sync().used_pages == 0);
}

TEST_CASE("decode rank: waiting timeout fails the room and aborts every prefill peer") {
  config::tunables t;
  t.waiting_timeout_ms = 150;
  decode_fixture f(t);
  f.spawn_decode();
  const std::uint64_t room = 54;
  caf::anon_send(f.rank, request(room, 1, 8));
  f.destinations(room);
  f.status_from(0, room, kv_poll::success);  // one of two: not enough
  CHECK(f.reaches(room, kv_poll::failed));
  auto a = f.aborted_on_both(room);
  INFO(a.reason);
  CHECK(contains(a.reason, "waiting timeout"));
  f.echo->store(true);
  auto ev = f.released(room);
  REQUIRE(ev);
  CHECK(contains(ev->reason, "waiting timeout"));
}

TEST_CASE("decode rank: when a prefill peer dies its unfinished rooms fail and the others are aborted") {
  decode_fixture f;
  f.spawn_decode();
  for (std::uint64_t room : {55, 56}) caf::anon_send(f.rank, request(room, 1, 8));
  f.destinations(55);
  f.destinations(56);
  f.kill(f.prefill[1].handle);
  CHECK(f.reaches(55, kv_poll::failed));
  CHECK(f.reaches(56, kv_poll::failed));
  // The live peer is told to stop; the dead one is not written to.
  for (std::uint64_t room : {55, 56}) {
    auto a = f.prefill[0].box->wait_for<msg::abort_room>([room](const msg::abort_room& x) { return x.room == room; });
    REQUIRE(a);
    INFO(a->reason);
    CHECK(contains(a->reason, "prefill rank 1"));
    CHECK(contains(a->reason, "down"));
  }
  // A request after the death fails at once instead of waiting out a timeout.
  caf::anon_send(f.rank, request(57, 1, 8));
  CHECK(f.reaches(57, kv_poll::failed, ms(2000)));
  f.echo->store(true);
  for (std::uint64_t room : {55, 56, 57}) {
    auto ev = f.released(room);
    REQUIRE(ev);
    CHECK(ev->state == as_int(kv_poll::failed));
    CHECK(contains(ev->reason, "down"));
  }
}

TEST_CASE("regression: a decode abort_request for a stale incarnation leaves the reused room alone") {
  // Every per-room message is matched on (room, incarnation); abort_request on the decode rank
  // once failed the room by room id alone, so a late abort of an earlier request killed the
  // request reusing the room (section 2: a reused room must not inherit the old request's fate).
  decode_fixture f;
  f.spawn_decode();
  const std::uint64_t room = 58;
  caf::anon_send(f.rank, request(room, 2, 8));
  f.destinations(room, 2);
  CHECK(f.reaches(room, kv_poll::waiting_for_input));
  caf::anon_send(f.rank, msg::abort_request{room, 1, "late abort of the previous request"});
  CHECK(f.state_now(room) == as_int(kv_poll::waiting_for_input));
  for (const auto& p : f.prefill) CHECK(p.box->all<msg::abort_room>().empty());
}

TEST_CASE("decode rank: a prefill side with another page size fails every request with a clear reason") {
  // semantics.md section 4: a page-size or dtype mismatch is a clear error, not corrupt data.
  decode_fixture f;  // registry and fake prefill ranks: page size 4
  auto other = f.config;
  other.page_size = 8;
  auto plan = std::make_shared<const config::routing_plan>(other);
  const auto& me = plan->decode(0);
  auto a = f.base_args(0);
  a.plan = plan;
  a.shape = {me.layers, plan->buffers_per_layer(), plan->decode_item_bytes(), 16, 4, 8,
             me.local_heads, other.model.head_bytes()};
  f.rank = f.own(spawn_decode_rank(f.sys, std::move(a)));
  caf::anon_send(f.rank, request(91, 1, 16));
  f.echo->store(true);
  auto ev = f.released(91);
  REQUIRE(ev);
  CHECK(ev->state == static_cast<std::uint8_t>(kv_poll::failed));
  CHECK(contains(ev->reason, "page size 4 != decode page size 8"));
  // It never registered memory with, nor sent destinations to, an incompatible prefill side.
  for (const auto& p : f.prefill) {
    CHECK(p.box->all<msg::kv_registration>().empty());
    CHECK(p.box->all<msg::dst_info>().empty());
  }
}

TEST_CASE("a rank whose agreement supervisor goes down fails and releases its rooms, and refuses new ones") {
  // Rank processes host their group's supervisors: when one goes, a rank of the group went with
  // it, so no round will come again. The rank must not hold the room (or its memory) forever.
  rank_fixture f(mla_config(1, 1, 1));
  auto d = f.fake_decode(0);
  f.spawn_prefill(0);
  f.connect(d, 0);
  caf::anon_send(f.rank, request(91, 1, 8));
  f.send_dst(91, 1, 0, {1, 2}, 0);
  f.kill(f.parent);
  auto gone = f.released(91);
  REQUIRE(gone);
  CHECK(gone->state == static_cast<std::uint8_t>(kv_poll::failed));
  CHECK(gone->reason.find("agreement group lost") != std::string::npos);
  // Its readers were told.
  CHECK(status_of(d, 91, kv_poll::failed));
  // A later request is refused at once, not left to stall.
  caf::anon_send(f.rank, request(92, 1, 8));
  auto refused = f.released(92);
  REQUIRE(refused);
  CHECK(refused->state == static_cast<std::uint8_t>(kv_poll::failed));
  // Nothing is held.
  std::optional<msg::pool_usage> u;
  f.self->request(f.rank, long_wait, msg::pool_usage_query{}).receive([&](msg::pool_usage& x) { u = x; },
                                                                      [](caf::error&) {});
  REQUIRE(u);
  CHECK(u->used_pages == 0);
  CHECK(u->live_rooms == 0);
}

}  // namespace kvflow::actor_test
