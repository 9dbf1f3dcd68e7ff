// Prefill and decode ranks (semantics.md sections 2, 3 and 5), made the one way every engine
// makes them (runtime::make_rank) and driven through the public API exactly as an engine's
// scheduler drives them: create(), poll(step) once per step, init()/send() (prefill) or
// send_destinations() (decode) once the round shows WaitingForInput, abort(). Around each rank:
// a real in-process transport, a real bootstrap registry, test actors as its peers, and a
// loopback parent as its agreement group (a rank alone in its group sees its own states agreed).
#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <set>
#include <thread>

#include "actor_helpers.hpp"
#include "actors/agreed_ring.hpp"
#include "actors/block_plan.hpp"
#include "actors/bootstrap_registry.hpp"
#include "actors/rank.hpp"
#include "config/routing.hpp"
#include "cuda/host_memory.hpp"
#include "kvflow/kvflow.hpp"
#include "runtime/api_internal.hpp"
#include "command/sim_memory.hpp"
#include "transport/inproc_transport.hpp"

// Readable API errors in failed assertions: "code: message".
namespace doctest {
template <>
struct StringMaker<kvflow::error> {
  static String convert(const kvflow::error& e) {
    return (std::string(kvflow::to_string(e.code())) + ": " + e.message()).c_str();
  }
};
}  // namespace doctest

namespace kvflow::actor_test {
namespace {

using std::chrono::microseconds;

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

std::string name(poll_state s) { return kvflow::to_string(s); }
std::string name(errc e) { return kvflow::to_string(e); }
std::string code(const kvflow::error& e) { return name(e.code()); }

constexpr int page_size = 4;
constexpr int prefill_pages = 32;  // KV (and state) pages of a prefill rank's memory
constexpr int aux_rows = 4;

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

// The byte a prefill engine computed at byte k of request page i of layer l.
std::byte pattern_byte(std::uint64_t room, int layer, int page_index, std::int64_t k) {
  return static_cast<std::byte>((room * 37 + static_cast<std::uint64_t>(layer) * 11 +
                                 static_cast<std::uint64_t>(page_index) * 5 + static_cast<std::uint64_t>(k)) &
                                0xff);
}

// ---- driving a rank as an engine does ----------------------------------------------------------

// One agreed round as a poll returned it (a round_view is valid only until the next poll).
struct round_copy {
  std::uint64_t step = 0, round = 0;
  std::vector<room_poll> rooms;
  const room_poll* find(std::uint64_t room, std::uint64_t incarnation = 1) const {
    for (const auto& r : rooms)
      if (r.id.room == room && r.id.incarnation == incarnation) return &r;
    return nullptr;
  }
};

// The scheduler of one rank: poll(step) once per step, steps 1, 2, ..., a step about every
// millisecond (the pace of a scheduler, not a wait for anything).
class scheduler {
 public:
  explicit scheduler(kvflow::rank& r) : rank_(&r) {}

  std::uint64_t step() const { return step_; }

  // The next step's round. The loopback parent answers each post at once, so the round of the
  // previous step is there or on its way.
  round_copy next() {
    auto v = rank_->poll(step_ + 1, std::chrono::duration_cast<microseconds>(long_wait));
    INFO("poll of step " << step_ + 1 << ": " << (v ? std::string("ok") : v.err().message()));
    REQUIRE(v.has_value());
    ++step_;
    round_copy out;
    out.step = v->step;
    out.round = v->round;
    out.rooms.assign(v->begin(), v->end());
    return out;
  }

  // Steps until `pred(round)` holds (that round), or nothing after `timeout`.
  template <class Pred>
  std::optional<round_copy> until(Pred pred, ms timeout = long_wait) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      auto r = next();
      if (pred(r)) return r;
      if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
      std::this_thread::sleep_for(ms(1));
    }
  }

  // Steps for `period`: true when `pred(round)` held in every round.
  template <class Pred>
  bool holds(Pred pred, ms period = short_wait) {
    const auto deadline = std::chrono::steady_clock::now() + period;
    while (std::chrono::steady_clock::now() < deadline) {
      if (!pred(next())) return false;
      std::this_thread::sleep_for(ms(1));
    }
    return true;
  }

  // The room's entry in the first round that has it in `state`.
  std::optional<room_poll> reaches(const request_id& id, poll_state state, ms timeout = long_wait) {
    auto r = until(
        [&](const round_copy& c) {
          const auto* p = c.find(id.room, id.incarnation);
          return p != nullptr && p->state == state;
        },
        timeout);
    if (!r) return std::nullopt;
    return *r->find(id.room, id.incarnation);
  }

  // The room's entry in the first round that has it terminal and released (the engine may
  // reuse its memory; the next rounds no longer hold it).
  std::optional<room_poll> released(const request_id& id, ms timeout = long_wait) {
    auto r = until(
        [&](const round_copy& c) {
          const auto* p = c.find(id.room, id.incarnation);
          return p != nullptr && p->released;
        },
        timeout);
    if (!r) return std::nullopt;
    return *r->find(id.room, id.incarnation);
  }

  // Every room of `ids` terminal and released, each as the first round that showed it so (a
  // poll clears every room its round shows released, so several may go in one round).
  std::optional<std::vector<room_poll>> released_all(const std::vector<request_id>& ids, ms timeout = long_wait) {
    std::vector<std::optional<room_poll>> seen(ids.size());
    auto r = until(
        [&](const round_copy& c) {
          bool all = true;
          for (std::size_t i = 0; i < ids.size(); ++i) {
            const auto* p = c.find(ids[i].room, ids[i].incarnation);
            if (!seen[i] && p != nullptr && p->released) seen[i] = *p;
            all = all && seen[i].has_value();
          }
          return all;
        },
        timeout);
    if (!r) return std::nullopt;
    std::vector<room_poll> out;
    for (auto& x : seen) out.push_back(*x);
    return out;
  }

  // The room's state in the first round that holds it.
  std::optional<poll_state> first_state(const request_id& id) {
    auto r = until([&](const round_copy& c) { return c.find(id.room, id.incarnation) != nullptr; });
    if (!r) return std::nullopt;
    return r->find(id.room, id.incarnation)->state;
  }

  // True when every round for `period` holds the room in `state` and not released.
  bool stays(const request_id& id, poll_state state, ms period = short_wait) {
    return holds(
        [&](const round_copy& c) {
          const auto* p = c.find(id.room, id.incarnation);
          if (p == nullptr || p->state != state || p->released) {
            MESSAGE("room " << id.room << " in round " << c.round << ": "
                            << (p == nullptr ? std::string("absent")
                                             : name(p->state) + (p->released ? " released" : "")));
            return false;
          }
          return true;
        },
        period);
  }

 private:
  kvflow::rank* rank_;
  std::uint64_t step_ = 0;
};

// A rank under test: its engine memory, its agreement parent, the API object an engine holds.
struct tested_rank {
  bool prefill = true;
  int rank = 0;
  std::shared_ptr<command::sim_memory> memory;
  caf::actor actor;
  caf::actor parent;
  inbox_ptr parent_box = std::make_shared<inbox>();
  std::shared_ptr<parent_control> control = std::make_shared<parent_control>();
  std::shared_ptr<kvflow::prefill_rank> p;
  std::shared_ptr<kvflow::decode_rank> d;
  std::unique_ptr<scheduler> sched;

  kvflow::rank& api() { return p ? static_cast<kvflow::rank&>(*p) : static_cast<kvflow::rank&>(*d); }
  scheduler& steps() { return *sched; }

  // Writes the request's KV pattern into `src` pages (request pages [first, first + n)), and its
  // first output into aux row `row`, as the engine's forward pass does before send().
  void compute(std::uint64_t room, std::uint64_t incarnation, const std::vector<std::int32_t>& src, int first,
               int row) {
    auto& m = *memory;
    for (std::size_t i = 0; i < src.size(); ++i)
      for (int l = m.layers().begin; l < m.layers().end; ++l)
        for (int b = 0; b < m.buffers_per_layer(); ++b) {
          auto* item = m.item(l, b, src[i]);
          for (std::int64_t k = 0; k < m.item_bytes(); ++k)
            item[k] = pattern_byte(room, l, first + static_cast<int>(i), k);
        }
    command::sim_aux_row a{room, incarnation, static_cast<std::int32_t>(room % 32000), -0.5f};
    std::memcpy(m.aux_row(row), &a, sizeof a);
  }
};

// A decode rank's memory, as its engine would hold it, registered with the fabric by an
// endpoint of its own, behind a recorder actor that stands in for the decode rank.
struct fake_decode {
  int rank = 0;
  caf::actor handle;
  inbox_ptr box;
  std::unique_ptr<command::sim_memory> memory;
  cuda::host_memory receipts;  // one aux_record per aux row (kvflow's own memory on a decode rank)
  remote_pool remote;
  std::vector<transport::region_desc> regions;

  const aux_record& receipt(int slot) const {
    return *reinterpret_cast<const aux_record*>(receipts.data() + std::uint64_t(slot) * sizeof(aux_record));
  }
};

// ---- test transports -------------------------------------------------------------------------

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

// A transport whose pushes are held, nothing copied and nothing completed, until the test
// releases them (a slow network): then the in-process transport copies the bytes and completes.
// `on_release` runs just before each held push is carried out.
class held_transport final : public wrapped_transport {
 public:
  explicit held_transport(std::shared_ptr<kvflow::transport::inproc_transport> inner)
      : wrapped_transport(std::move(inner)) {}
  const char* name() const override { return "held"; }

  void push(std::uint64_t peer, const std::vector<kvflow::transport::block>& blocks,
            kvflow::transport::completion done) override {
    {
      std::lock_guard<std::mutex> g(mutex_);
      held_.push_back({peer, blocks, std::move(done)});
    }
    cv_.notify_all();
  }

  // A dead peer's pushes complete now, with an error (as the interface asks).
  void disconnect(std::uint64_t peer) override {
    std::vector<held_push> gone;
    {
      std::lock_guard<std::mutex> g(mutex_);
      auto it = std::stable_partition(held_.begin(), held_.end(), [&](const held_push& h) { return h.peer != peer; });
      gone.assign(std::make_move_iterator(it), std::make_move_iterator(held_.end()));
      held_.erase(it, held_.end());
    }
    for (auto& h : gone) h.done(status::error("peer disconnected"));
    inner_->disconnect(peer);
  }

  // Waits until at least `n` pushes are held.
  bool wait_held(std::size_t n, ms timeout = long_wait) {
    std::unique_lock<std::mutex> g(mutex_);
    return cv_.wait_for(g, timeout, [&] { return held_.size() >= n; });
  }
  std::size_t held() {
    std::lock_guard<std::mutex> g(mutex_);
    return held_.size();
  }

  void release_all() {
    std::vector<held_push> now;
    {
      std::lock_guard<std::mutex> g(mutex_);
      now.swap(held_);
    }
    for (auto& h : now) {
      if (on_release) on_release();
      inner_->push(h.peer, h.blocks, std::move(h.done));
    }
  }

  std::function<void()> on_release;

 private:
  struct held_push {
    std::uint64_t peer;
    std::vector<kvflow::transport::block> blocks;
    kvflow::transport::completion done;
  };
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<held_push> held_;
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

// ---- the fixture -----------------------------------------------------------------------------

struct rank_options {
  std::shared_ptr<transport::transport> transport;    // default: the fixture's inproc endpoint
  caf::actor registry;                                 // default: the fixture's registry
  std::shared_ptr<const config::routing_plan> plan;  // default: the fixture's plan
  int pages = 0;  // KV pages of the rank's memory; 0: prefill_pages on prefill, 16 on decode
  int aux_rows = actor_test::aux_rows;
};

rank_options through(std::shared_ptr<transport::transport> t) {
  rank_options o;
  o.transport = std::move(t);
  return o;
}

// Ranks under test with everything around them: registry, fabric, loopback parents, fake peers.
struct rank_fixture : actor_fixture {
  config::cluster_config config;
  std::shared_ptr<const config::routing_plan> plan;
  std::shared_ptr<transport::inproc_fabric> fabric = std::make_shared<transport::inproc_fabric>();
  // What ranks push through and register with (unless a test gives them another).
  std::shared_ptr<transport::inproc_transport> transport = std::make_shared<transport::inproc_transport>(fabric);
  // The fake peers' own endpoint on the same fabric.
  std::shared_ptr<transport::inproc_transport> peer_transport = std::make_shared<transport::inproc_transport>(fabric);
  caf::actor registry;
  config::tunables tunables;
  std::shared_ptr<std::atomic<bool>> stopped = std::make_shared<std::atomic<bool>>(false);
  std::vector<std::unique_ptr<tested_rank>> ranks;
  std::vector<std::unique_ptr<fake_decode>> fakes;
  std::vector<std::uint64_t> peer_regions;

  explicit rank_fixture(const config::cluster_config& c)
      : config(c), plan(std::make_shared<const config::routing_plan>(c)) {
    registry = own(spawn_bootstrap_registry(sys, c));
  }
  ~rank_fixture() {
    // The ranks go first, each waited for (a decode rank's memory leaves the transport as it
    // goes); then the fakes' regions leave the fabric (waiting for pushes in progress), so no
    // write lands in memory this fixture frees.
    for (auto& r : ranks) stop(r->actor);
    for (auto id : peer_regions) peer_transport->deregister_memory(id);
  }

  // Makes rank `r` through runtime::make_rank, as every engine does, with a loopback parent.
  tested_rank& add(bool prefill, int r, rank_options o = {}) {
    auto t = std::make_unique<tested_rank>();
    const auto p = o.plan ? o.plan : plan;
    t->prefill = prefill;
    t->rank = r;
    const int pages = o.pages > 0 ? o.pages : prefill ? prefill_pages : 16;
    t->memory = std::make_shared<command::sim_memory>(*p, prefill, r, pages, o.aux_rows);
    const auto& c = p->config();
    runtime::agreement_link link;
    if (prefill) {
      const auto pc = config::prefill_coord_of(c.prefill, r);
      link.group = config::prefill_group_of(c.prefill, pc);
      link.child = pc.cp;
    } else {
      const auto dc = config::decode_coord_of(c.decode, r);
      link.group = config::decode_group_of(c.decode, dc);
      link.child = config::decode_child_of(c.decode, dc);
    }
    t->parent = own(sys.spawn(loopback_parent, t->parent_box, t->control, link.group));
    link.parent = link.root = t->parent;
    link.board = nullptr;  // the rank reports each step by message
    link.ring = std::make_shared<agreed_ring>();
    runtime::rank_context ctx{sys,      p,  tunables, o.transport ? o.transport : transport,
                              o.registry ? o.registry : registry, {}, stopped};
    auto made = runtime::make_rank(ctx, prefill, r, t->memory->desc(), link);
    INFO("make_rank: " << (made ? std::string("ok") : made.err().message()));
    REQUIRE(made.has_value());
    t->actor = own(made.value()->actor);
    if (prefill)
      t->p = std::make_shared<kvflow::prefill_rank>(made.value());
    else
      t->d = std::make_shared<kvflow::decode_rank>(made.value());
    t->sched = std::make_unique<scheduler>(t->api());
    ranks.push_back(std::move(t));
    return *ranks.back();
  }
  tested_rank& add_prefill(int r, rank_options o = {}) { return add(true, r, std::move(o)); }
  tested_rank& add_decode(int r, rank_options o = {}) { return add(false, r, std::move(o)); }

  // Decode rank `d`'s memory (`pages` KV pages, `rows` aux rows) registered with the fabric by
  // the peers' endpoint, described as a decode rank describes it, behind a recorder actor.
  fake_decode& fake_decode_rank(int d, int pages = 16, int rows = aux_rows) {
    auto f = std::make_unique<fake_decode>();
    f->rank = d;
    f->memory = std::make_unique<command::sim_memory>(*plan, false, d, pages, rows);
    auto specs = runtime::to_buffer_specs(f->memory->desc());
    REQUIRE(specs.has_value());
    auto mem = rank_memory::create(*plan, false, d, f->memory->layers(), specs.value());
    INFO((mem.ok() ? std::string() : mem.error().reason()));
    REQUIRE(mem.ok());
    const auto& m = mem.value();
    auto reg = [&](const buffer_view& b, remote_buffer& out) {
      auto r = peer_transport->register_memory(static_cast<std::uint64_t>(d), b.base, b.bytes);
      REQUIRE(r.ok());
      peer_regions.push_back(r->id);
      f->regions.push_back(r.value());
      out = {r->id, 0, b.bytes, b.page_bytes};
    };
    auto& p = f->remote;
    p = describe_shape(m);
    for (const auto& b : m.kv_buffers()) reg(b, p.kv.emplace_back());
    for (const auto& b : m.aux_buffers()) reg(b, p.aux.emplace_back());
    for (const auto& b : m.state_buffers()) reg(b, p.state.emplace_back());
    f->receipts = cuda::host_memory(std::uint64_t(std::max(1, rows)) * sizeof(aux_record));
    reg({f->receipts.data(), f->receipts.size(), sizeof(aux_record)}, p.receipts);
    REQUIRE(check_remote_pool(p).ok());
    std::tie(f->handle, f->box) = spawn_recorder();
    fakes.push_back(std::move(f));
    return *fakes.back();
  }

  // The fake decode rank registers its memory with `rank` (as a decode rank's on_topology does),
  // with the KV configuration `shape` (the fixture's own unless given).
  void connect(const fake_decode& d, const tested_rank& rank, std::optional<kv_handshake> shape = {}) {
    const auto& me = plan->decode(d.rank);
    msg::kv_registration reg;
    reg.decode_rank = d.rank;
    reg.dp = me.coord.dp;
    reg.pp = me.coord.pp;
    reg.tp = me.coord.tp;
    reg.tp_size = config.decode.tp;
    reg.pool = d.remote;
    reg.decode = d.handle;
    reg.endpoint = peer_transport->endpoint();
    reg.regions = d.regions;
    reg.shape = shape ? *shape : handshake_of(config);
    caf::anon_send(rank.actor, reg);
  }

  // The fake decode rank sends a room's destinations to `rank`.
  void send_dst(const tested_rank& rank, std::uint64_t room, std::uint64_t incarnation, int decode_rank,
                std::vector<std::int32_t> pages, std::int32_t aux_slot, std::vector<std::int32_t> state = {}) {
    msg::dst_info d;
    d.room = room;
    d.incarnation = incarnation;
    d.decode_rank = decode_rank;
    d.dst_pages = std::move(pages);
    d.aux_slot = aux_slot;
    d.state_indices = std::move(state);
    caf::anon_send(rank.actor, d);
  }
};

std::optional<msg::kv_status> status_of(const fake_decode& p, std::uint64_t room, kv_poll state,
                                        std::uint64_t incarnation = 1, ms timeout = long_wait) {
  return p.box->wait_for<msg::kv_status>(
      [=](const msg::kv_status& s) {
        return s.room == room && s.incarnation == incarnation && s.state == static_cast<std::uint8_t>(state);
      },
      timeout);
}

std::vector<std::int32_t> iota_pages(int first, int n) {
  std::vector<std::int32_t> v(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = first + i;
  return v;
}

// KV bytes of `pages` pages of every layer of an mla:4:16 prefill rank, and what the last chunk
// adds on an aux writer: its aux row and the receipt.
constexpr std::uint64_t mla_page_bytes = 4 * 64;
constexpr std::uint64_t aux_bytes = command::sim_aux_row_bytes + sizeof(aux_record);

}  // namespace

// ---- prefill ---------------------------------------------------------------------------------

TEST_CASE("prefill: a failed push fails the room it carried, the next room to the same peer is pushed") {
  // The rank keeps no mark of a peer whose push failed: whether the peer is usable is the
  // transport's to say (the real path of upstream #13054 is tested in test_ucx_transport.cpp).
  rank_fixture f(mla_config(1, 1, 1));
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(0, through(std::make_shared<flaky_transport>(f.transport, 1)));
  f.connect(d, p);
  const request_id first{81, 1}, second{82, 2};
  REQUIRE_FALSE(p.p->create(first, 0));
  f.send_dst(p, 81, 1, 0, {1, 2}, 0);
  REQUIRE(p.steps().reaches(first, poll_state::waiting_for_input));
  CHECK_FALSE(p.p->init(first, 2, 0));
  CHECK_FALSE(p.p->send(first, {0, 1}, true));
  auto failed = status_of(d, 81, kv_poll::failed);
  REQUIRE(failed);
  CHECK(contains(failed->reason, "connection reset"));
  auto gone = p.steps().released(first);
  REQUIRE(gone);
  CHECK(gone->state == poll_state::failed);

  REQUIRE_FALSE(p.p->create(second, 0));
  f.send_dst(p, 82, 2, 0, {3, 4}, 1);
  REQUIRE(p.steps().reaches(second, poll_state::waiting_for_input));
  CHECK_FALSE(p.p->init(second, 2, 1));
  CHECK_FALSE(p.p->send(second, {2, 3}, true));
  CHECK(status_of(d, 82, kv_poll::success, 2));
  auto ok = p.steps().released(second);
  REQUIRE(ok);
  CHECK(ok->state == poll_state::success);
  CHECK(f.transport->bytes_moved() == 2 * mla_page_bytes + aux_bytes);
}

TEST_CASE("prefill: state pages land at the destination's state indices, a bad state index fails only its room") {
  // mla:4:16:8: 4 layers, 16 latent bytes and 8 state bytes (an indexer cache) per token.
  auto c = mla_config(1, 1, 1);
  c.model = config::parse_model("mla:4:16:8", c.dtype);
  rank_fixture f(c);
  auto& d = f.fake_decode_rank(0);
  REQUIRE(d.remote.state_pages == 16);
  auto& p = f.add_prefill(0);
  f.connect(d, p);
  const request_id good{101, 1};
  REQUIRE_FALSE(p.p->create(good, 0));
  f.send_dst(p, 101, 1, 0, {5, 6}, 0, {9, 3});
  REQUIRE(p.steps().reaches(good, poll_state::waiting_for_input));
  // The engine's state pages of the request, one per page, written by its forward pass.
  auto& m = *p.memory;
  for (int l = m.layers().begin; l < m.layers().end; ++l)
    for (int sp : {7, 8})
      std::memset(m.state_item(l, sp), 0x40 + sp + l, static_cast<std::size_t>(m.state_item_bytes()));
  CHECK_FALSE(p.p->init(good, 2, 0));
  CHECK_FALSE(p.p->send(good, {0, 1}, true, {7, 8}));
  REQUIRE(status_of(d, 101, kv_poll::success));
  // 2 pages x 4 layers x (64 B of KV + 32 B of state) + the aux row and the receipt.
  CHECK(f.transport->bytes_moved() == 2u * 4 * (64 + 32) + aux_bytes);
  // State page 7 went to state index 9, state page 8 to state index 3.
  for (int l = m.layers().begin; l < m.layers().end; ++l) {
    CHECK(std::memcmp(d.memory->state_item(l, 9), m.state_item(l, 7), 32) == 0);
    CHECK(std::memcmp(d.memory->state_item(l, 3), m.state_item(l, 8), 32) == 0);
  }
  // A hostile state index fails only its own room; the next room on the same rank succeeds.
  const request_id bad{102, 2}, fine{103, 3};
  REQUIRE_FALSE(p.p->create(bad, 0));
  REQUIRE_FALSE(p.p->create(fine, 0));
  f.send_dst(p, 102, 2, 0, {5, 6}, 0, {1, 16});  // 16 is past the registered 16 state pages
  f.send_dst(p, 103, 3, 0, {7, 8}, 1, {0, 1});
  auto failed = status_of(d, 102, kv_poll::failed, 2);
  REQUIRE(failed);
  CHECK(contains(failed->reason, "state index 16"));
  REQUIRE(p.steps().reaches(fine, poll_state::waiting_for_input));
  CHECK_FALSE(p.p->init(fine, 2, 1));
  CHECK_FALSE(p.p->send(fine, {2, 3}, true, {7, 8}));
  CHECK(status_of(d, 103, kv_poll::success, 3));
  auto r = p.steps().until([&](const round_copy& c) { return c.find(102, 2) == nullptr && c.find(103, 3) == nullptr; });
  CHECK(r);  // both released and cleared
  CHECK(p.api().failure_reason(bad).find("state index 16") != std::string::npos);
}

TEST_CASE("prefill: destinations for a request that never arrives are refused at the bootstrap timeout") {
  // Buffered early destinations must not stay forever (memory) nor leave decode waiting for its
  // own, longer timeout.
  rank_fixture f(mla_config(1, 1, 1));
  f.tunables.bootstrap_timeout_ms = 100;
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(0);
  f.connect(d, p);
  f.send_dst(p, 111, 1, 0, {1, 2}, 0);  // no request for room 111 is ever created
  auto refused = status_of(d, 111, kv_poll::failed);
  REQUIRE(refused);
  CHECK(contains(refused->reason, "no request for this room"));
  // A request that does come in time uses its early destinations as before.
  const request_id id{112, 1};
  f.send_dst(p, 112, 1, 0, {3, 4}, 1);
  REQUIRE_FALSE(p.p->create(id, 0));
  REQUIRE(p.steps().reaches(id, poll_state::waiting_for_input));
  CHECK_FALSE(p.p->init(id, 2, 0));
  CHECK_FALSE(p.p->send(id, {0, 1}, true));
  CHECK(status_of(d, 112, kv_poll::success));
}

TEST_CASE("regression: early destinations wait their own bootstrap timeout, not an earlier one's of the same room") {
  // The expiry timer was keyed by room alone: destinations of another incarnation, or of the
  // same (room, incarnation) once the room was reused (SGLang's incarnation is always 0), that
  // came after the first were refused when the first timed out, however briefly they had
  // waited, and their request, arriving in time, stayed in Bootstrapping.
  rank_fixture f(mla_config(1, 1, 1));
  f.tunables.bootstrap_timeout_ms = 600;
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(0);
  f.connect(d, p);
  const auto start = std::chrono::steady_clock::now();
  f.send_dst(p, 31, 1, 0, {1, 2}, 0);  // incarnation 1's request never comes here
  f.send_dst(p, 33, 0, 0, {1, 2}, 0);  // the first use of room 33: its request comes, ends, is cleared
  const request_id first{33, 0};
  REQUIRE_FALSE(p.p->create(first, 0));
  REQUIRE(p.steps().reaches(first, poll_state::waiting_for_input));
  CHECK_FALSE(p.p->init(first, 2, 0));
  CHECK_FALSE(p.p->send(first, {0, 1}, true));
  REQUIRE(p.steps().until([&](const round_copy& c) { return c.find(33, 0) == nullptr; }));
  REQUIRE(std::chrono::steady_clock::now() - start < ms(300));
  std::this_thread::sleep_until(start + ms(350));
  f.send_dst(p, 31, 2, 0, {3, 4}, 1);  // another incarnation of room 31
  f.send_dst(p, 33, 0, 0, {5, 6}, 2);  // room 33 reused
  // Incarnation 1 of room 31 is refused at its own timeout (600 ms)...
  auto refused = status_of(d, 31, kv_poll::failed, 1);
  REQUIRE(refused);
  CHECK(contains(refused->reason, "no request for this room"));
  // ... while the later ones, 400 ms into their 600, still serve their requests.
  std::this_thread::sleep_until(start + ms(750));
  const request_id second{31, 2}, reused{33, 0};
  REQUIRE_FALSE(p.p->create(second, 0));
  REQUIRE_FALSE(p.p->create(reused, 0));
  CHECK(p.steps().reaches(second, poll_state::waiting_for_input, ms(150)));
  CHECK(p.steps().reaches(reused, poll_state::waiting_for_input, ms(150)));
  CHECK_FALSE(p.p->init(second, 2, 0));
  CHECK_FALSE(p.p->send(second, {0, 1}, true));
  CHECK(status_of(d, 31, kv_poll::success, 2));
}

TEST_CASE("prefill: a room failed while its push is in flight is not released until the push completes") {
  // A room aborted by decode is agreed Failed while its push is still in flight: the rank must
  // not report it released (the engine would reuse the pages the transport still reads), nor
  // acknowledge the abort, before the push completes.
  rank_fixture f(mla_config(1, 1, 1));
  auto held = std::make_shared<held_transport>(f.transport);
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(0, through(held));
  f.connect(d, p);
  const request_id id{71, 1};
  REQUIRE_FALSE(p.p->create(id, 0));
  f.send_dst(p, 71, 1, 0, {4, 5}, 0);
  REQUIRE(p.steps().reaches(id, poll_state::waiting_for_input));
  p.compute(71, 1, {0, 1}, 0, 0);
  CHECK_FALSE(p.p->init(id, 2, 0));
  CHECK_FALSE(p.p->send(id, {0, 1}, true));
  REQUIRE(held->wait_held(1));
  CHECK(p.steps().reaches(id, poll_state::transferring));
  CHECK(p.api().stats().pushes_in_flight == 1);

  caf::anon_send(p.actor, msg::abort_room{71, 1, 0, "decode gave up"});
  auto failed = p.steps().reaches(id, poll_state::failed);
  REQUIRE(failed);
  CHECK_FALSE(failed->released);
  CHECK(p.steps().stays(id, poll_state::failed));  // failed, never released while the push reads
  CHECK(d.box->all<msg::abort_ack>().empty());
  CHECK(p.api().stats().pushes_in_flight == 1);
  CHECK(code(p.api().clear(id)) == "invalid argument");  // the engine may not clear it yet

  held->release_all();
  auto gone = p.steps().released(id);
  REQUIRE(gone);
  CHECK(gone->state == poll_state::failed);
  auto ack = d.box->wait_for<msg::abort_ack>([](const msg::abort_ack& a) { return a.room == 71; });
  REQUIRE(ack);
  CHECK(ack->incarnation == 1);
  CHECK(p.api().stats().pushes_in_flight == 0);
  // Released rooms leave the rounds (the API cleared it) and count as failed.
  CHECK(p.steps().until([&](const round_copy& c) { return c.find(71) == nullptr; }));
  CHECK(p.api().stats().live_requests == 0);
  CHECK(p.api().stats().failed == 1);
}

TEST_CASE("prefill CP rank 1 is non-authoritative: starts WaitingForInput, Success on an empty last chunk") {
  rank_fixture f(mla_config(1, 2, 1));
  REQUIRE_FALSE(f.plan->prefill(1).authoritative);
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(1);
  f.connect(d, p);
  const request_id id{5, 1};
  REQUIRE_FALSE(p.p->create(id, 0));
  CHECK(p.steps().first_state(id) == poll_state::waiting_for_input);
  auto prefix = p.p->decode_prefix_pages(id);
  REQUIRE(prefix);
  CHECK(*prefix == 0);
  CHECK_FALSE(p.p->init(id, 3, 0));
  // Non-last chunks are skipped: no Transferring, nothing moved.
  CHECK_FALSE(p.p->send(id, {0}, false));
  CHECK_FALSE(p.p->send(id, {1, 2}, false));
  CHECK(p.steps().stays(id, poll_state::waiting_for_input));
  // The last chunk carries no pages (everything came in earlier chunks): still Success.
  CHECK_FALSE(p.p->send(id, {}, true));
  auto done = p.steps().released(id);
  REQUIRE(done);
  CHECK(done->state == poll_state::success);
  CHECK(f.transport->bytes_moved() == 0);
  // Nobody reads from this rank: it tells no decode rank anything.
  CHECK(d.box->all<msg::kv_status>().empty());
  CHECK(p.api().global_rank() == 1);
  CHECK(p.steps().until([&](const round_copy& c) { return c.find(5) == nullptr; }));
  CHECK(p.api().stats().live_requests == 0);
  CHECK(p.api().stats().succeeded == 1);
}

TEST_CASE("prefill TP rank 1 for MLA with decode TP1 is non-authoritative and never waits for destinations") {
  rank_fixture f(mla_config(2, 1, 1));
  REQUIRE_FALSE(f.plan->prefill(1).authoritative);
  f.tunables.bootstrap_timeout_ms = 50;  // would fail it, were it (wrongly) waiting in Bootstrapping
  auto& p = f.add_prefill(1);
  const request_id id{6, 1};
  REQUIRE_FALSE(p.p->create(id, 0));
  CHECK(p.steps().first_state(id) == poll_state::waiting_for_input);
  CHECK(p.steps().stays(id, poll_state::waiting_for_input, ms(150)));  // past the bootstrap timeout
  CHECK_FALSE(p.p->init(id, 2, 0));
  CHECK_FALSE(p.p->send(id, {0, 1}, true));
  auto done = p.steps().released(id);
  REQUIRE(done);
  CHECK(done->state == poll_state::success);
}

TEST_CASE("prefill authoritative rank: Bootstrapping, WaitingForInput, Success, bytes at the destination pages") {
  rank_fixture f(mla_config(1, 2, 1));
  REQUIRE(f.plan->prefill(0).authoritative);
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(0);
  f.connect(d, p);
  const std::uint64_t room = 9;
  const request_id id{room, 1};
  REQUIRE_FALSE(p.p->create(id, 0));
  CHECK(p.steps().first_state(id) == poll_state::bootstrapping);
  CHECK(p.steps().stays(id, poll_state::bootstrapping));

  const std::vector<std::int32_t> dst{7, 8, 2};
  f.send_dst(p, room, 1, 0, dst, 1);
  REQUIRE(p.steps().reaches(id, poll_state::waiting_for_input));
  auto prefix = p.p->decode_prefix_pages(id);
  REQUIRE(prefix);
  CHECK(*prefix == 0);
  // The engine's pages for the request: not consecutive, not the destination's.
  const std::vector<std::int32_t> src{12, 13, 3};
  p.compute(room, 1, src, 0, 2);
  CHECK_FALSE(p.p->init(id, 3, 2));
  CHECK_FALSE(p.p->send(id, {12, 13}, false));
  CHECK(p.steps().reaches(id, poll_state::transferring));
  CHECK_FALSE(p.p->send(id, {3}, true));
  auto done = p.steps().released(id);
  REQUIRE(done);
  CHECK(done->state == poll_state::success);

  auto st = status_of(d, room, kv_poll::success);
  REQUIRE(st);
  CHECK(st->prefill_rank == 0);
  CHECK(d.box->all<msg::kv_status>().size() == 1);

  // Every byte of every layer landed at the destination page of its request page.
  const auto& m = *d.memory;
  std::uint64_t mismatched = 0;
  for (int i = 0; i < 3; ++i)
    for (int l = m.layers().begin; l < m.layers().end; ++l) {
      const auto* item = m.item(l, 0, dst[i]);
      for (std::int64_t k = 0; k < m.item_bytes(); ++k)
        if (item[k] != pattern_byte(room, l, i, k)) ++mismatched;
    }
  CHECK(mismatched == 0);
  // Pages that are not destinations stay untouched.
  for (int l = m.layers().begin; l < m.layers().end; ++l)
    for (int pg : {0, 1, 3, 6, 9}) {
      const auto* item = m.item(l, 0, pg);
      CHECK(std::all_of(item, item + m.item_bytes(), [](std::byte b) { return b == std::byte{0}; }));
    }
  // The engine's aux row went to the destination's row 1, and the receipt names the request.
  command::sim_aux_row row;
  std::memcpy(&row, m.aux_row(1), sizeof row);
  CHECK(row.room == room);
  CHECK(row.incarnation == 1);
  CHECK(row.first_token == static_cast<std::int32_t>(room));
  const auto& rec = d.receipt(1);
  CHECK(rec.room == room);
  CHECK(rec.incarnation == 1);
  CHECK(rec.check == aux_checksum(rec));
  CHECK(f.transport->bytes_moved() == 3 * mla_page_bytes + aux_bytes);
  const auto s = p.api().stats();
  CHECK(s.bytes_sent == 3 * mla_page_bytes + aux_bytes);
  CHECK(s.pushes_in_flight == 0);
  CHECK(p.steps().until([&](const round_copy& c) { return c.find(room) == nullptr; }));
  CHECK(p.api().stats().live_requests == 0);
}

TEST_CASE("prefill regression SGLang 30233 and 30325: an aborted room transfers nothing") {
  rank_fixture f(mla_config(1, 1, 1));
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(0);
  f.connect(d, p);
  const std::uint64_t room = 11;
  const request_id id{room, 1};
  REQUIRE_FALSE(p.p->create(id, 0));
  f.send_dst(p, room, 1, 0, {3, 4, 5}, 0);
  REQUIRE(p.steps().reaches(id, poll_state::waiting_for_input));
  caf::anon_send(p.actor, msg::abort_room{room, 1, 0, "client went away"});
  // The engine had already decided to run the request: its chunks come after the abort.
  CHECK_FALSE(p.p->init(id, 3, 0));
  CHECK_FALSE(p.p->send(id, {0, 1}, false));
  CHECK_FALSE(p.p->send(id, {2}, true));

  auto ack = d.box->wait_for<msg::abort_ack>([room](const msg::abort_ack& a) { return a.room == room; });
  REQUIRE(ack);
  CHECK(ack->incarnation == 1);
  CHECK(ack->prefill_rank == 0);
  auto gone = p.steps().released(id);
  REQUIRE(gone);
  CHECK(gone->state == poll_state::failed);
  CHECK(f.transport->bytes_moved() == 0);
  CHECK_FALSE(status_of(d, room, kv_poll::success, 1, ms(0)));
  const auto why = p.api().failure_reason(id);
  INFO(why);
  CHECK(contains(why, "abort"));
  CHECK(contains(why, "client went away"));
  CHECK(f.transport->bytes_moved() == 0);
}

TEST_CASE("prefill: hostile destination info fails only that room, a second room still succeeds") {
  rank_fixture f(mla_config(1, 1, 1));
  auto& d = f.fake_decode_rank(0, 16, 4);
  auto& p = f.add_prefill(0);
  f.connect(d, p);
  for (std::uint64_t room : {21, 22, 23, 24}) REQUIRE_FALSE(p.p->create({room, 1}, 0));
  f.send_dst(p, 21, 1, 0, {1, 99, 2}, 0);  // page beyond the 16 registered
  f.send_dst(p, 22, 1, 0, {1, 2}, 1);      // 2 pages for the engine's 3-page request
  f.send_dst(p, 23, 1, 0, {4, 5, 6}, 2);   // fine
  f.send_dst(p, 24, 1, 0, {7, 8, 9}, 40);  // aux slot beyond the 4 registered
  // The engine runs every request that its round shows ready, each of 3 pages.
  std::set<std::uint64_t> started;
  int next_page = 0;
  bool seen = false;
  auto r = p.steps().until([&](const round_copy& c) {
    seen = seen || !c.rooms.empty();
    for (const auto& x : c.rooms)
      if (x.state == poll_state::waiting_for_input && started.insert(x.id.room).second) {
        CHECK_FALSE(p.p->init(x.id, 3, 0));
        CHECK_FALSE(p.p->send(x.id, iota_pages(next_page, 3), true));
        next_page += 3;
      }
    return seen && c.rooms.empty();  // every room terminal, released and cleared
  });
  REQUIRE(r);
  CHECK(started == std::set<std::uint64_t>{22, 23});

  auto bad_page = status_of(d, 21, kv_poll::failed);
  REQUIRE(bad_page);
  INFO("room 21: " << bad_page->reason);
  CHECK(contains(bad_page->reason, "99"));
  auto bad_count = status_of(d, 22, kv_poll::failed);
  REQUIRE(bad_count);
  INFO("room 22: " << bad_count->reason);
  CHECK(contains(bad_count->reason, "init with 3 pages; decode expects 2"));
  auto bad_aux = status_of(d, 24, kv_poll::failed);
  REQUIRE(bad_aux);
  INFO("room 24: " << bad_aux->reason);
  CHECK(contains(bad_aux->reason, "aux slot"));
  REQUIRE(status_of(d, 23, kv_poll::success));

  CHECK(p.api().stats().succeeded == 1);
  CHECK(p.api().stats().failed == 3);
  // Only room 23 moved bytes.
  CHECK(f.transport->bytes_moved() == 3 * mla_page_bytes + aux_bytes);
  CHECK_FALSE(status_of(d, 21, kv_poll::success, 1, ms(0)));
  CHECK_FALSE(status_of(d, 23, kv_poll::failed, 1, ms(0)));
}

TEST_CASE("prefill: destinations for another incarnation of a live room do not fail the live room") {
  rank_fixture f(mla_config(1, 1, 1));
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(0);
  f.connect(d, p);
  const std::uint64_t room = 31;
  const request_id live{room, 1};
  REQUIRE_FALSE(p.p->create(live, 0));
  CHECK(p.steps().first_state(live) == poll_state::bootstrapping);
  // A duplicate request of the same room (n>1 sampling, client reuse) sends its destinations.
  f.send_dst(p, room, 2, 0, {1, 2}, 0);
  auto dup = status_of(d, room, kv_poll::failed, 2);
  REQUIRE(dup);
  INFO("duplicate: " << dup->reason);
  CHECK(contains(dup->reason, "duplicate"));
  CHECK(p.steps().stays(live, poll_state::bootstrapping));
  // The same duplicate reaching the rank's engine is refused too, at once, leaving the live one.
  auto refused = p.p->create({room, 2}, 0);
  CHECK(refused.code() == errc::exists);
  CHECK(p.api().stats().live_requests == 1);
  CHECK(p.steps().stays(live, poll_state::bootstrapping, ms(20)));

  // The live request proceeds normally.
  f.send_dst(p, room, 1, 0, {5, 6}, 1);
  REQUIRE(p.steps().reaches(live, poll_state::waiting_for_input));
  CHECK_FALSE(p.p->init(live, 2, 0));
  CHECK_FALSE(p.p->send(live, {0, 1}, true));
  CHECK(status_of(d, room, kv_poll::success, 1));
  auto done = p.steps().released(live);
  REQUIRE(done);
  CHECK(done->state == poll_state::success);
  CHECK_FALSE(status_of(d, room, kv_poll::failed, 1, ms(0)));
}

TEST_CASE("prefill: bootstrap timeout fails the room with a reason and tells the decode rank") {
  rank_fixture f(mla_config(1, 1, 1));
  f.tunables.bootstrap_timeout_ms = 300;
  auto& d = f.fake_decode_rank(0);
  // Known to the registry (so the prefill rank can watch it) but never sends destinations.
  caf::send_as(d.handle, f.registry, msg::register_decode{0, d.handle});
  auto& p = f.add_prefill(0);
  const request_id id{41, 1};
  REQUIRE_FALSE(p.p->create(id, 0));
  CHECK(p.steps().first_state(id) == poll_state::bootstrapping);
  auto failed = p.steps().released(id);
  REQUIRE(failed);
  CHECK(failed->state == poll_state::failed);
  auto st = status_of(d, 41, kv_poll::failed);
  REQUIRE(st);
  INFO("kv_status reason: " << st->reason);
  CHECK(contains(st->reason, "timeout"));
  const auto why = p.api().failure_reason(id);
  INFO("failure reason: " << why);
  CHECK(contains(why, "bootstrap timeout"));
}

TEST_CASE("prefill CP-parallel sending: a rank with an empty share finishes without pushing anything") {
  // 1-page request over 3 CP ranks: CP rank 1's share is empty and CP rank 0 writes the aux
  // slot, so rank 1 pushes nothing at all; its last chunk must still end the request (nothing
  // in flight to wait for). (The old form sent the chunk before the destinations arrived; the
  // API now refuses init before WaitingForInput, see the API checks case.)
  rank_fixture f(mla_config(1, 3, 1, true));
  REQUIRE(f.plan->prefill(1).authoritative);
  REQUIRE(config::cp_share(1, 3, 1).empty());
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(1);
  f.connect(d, p);
  const request_id id{45, 1};
  REQUIRE_FALSE(p.p->create(id, 0));
  CHECK(p.steps().first_state(id) == poll_state::bootstrapping);
  CHECK(p.steps().stays(id, poll_state::bootstrapping, ms(20)));
  f.send_dst(p, 45, 1, 0, {3}, 0);
  REQUIRE(p.steps().reaches(id, poll_state::waiting_for_input));
  CHECK_FALSE(p.p->init(id, 1, 0));
  CHECK_FALSE(p.p->send(id, {0}, true));
  auto done = p.steps().released(id);
  REQUIRE(done);
  CHECK(done->state == poll_state::success);
  CHECK(status_of(d, 45, kv_poll::success));
  CHECK(f.transport->bytes_moved() == 0);
}

TEST_CASE("regression: prefill rank fails a room its own scheduler aborts") {
  // semantics.md section 2, sender: Failed on "abort from either side". Before the fix the
  // prefill rank ignored its own scheduler's abort: the room went on and transferred.
  rank_fixture f(mla_config(1, 1, 1));
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(0);
  f.connect(d, p);
  const request_id id{47, 1};
  REQUIRE_FALSE(p.p->create(id, 0));
  f.send_dst(p, 47, 1, 0, {1, 2}, 0);
  REQUIRE(p.steps().reaches(id, poll_state::waiting_for_input));
  CHECK_FALSE(p.p->init(id, 2, 0));
  CHECK_FALSE(p.p->abort(id, "prefill scheduler aborted the request"));
  CHECK_FALSE(p.p->send(id, {0, 1}, true));
  auto gone = p.steps().released(id);
  REQUIRE(gone);
  CHECK(gone->state == poll_state::failed);
  auto st = status_of(d, 47, kv_poll::failed);
  REQUIRE(st);
  CHECK(contains(st->reason, "prefill scheduler aborted"));
  CHECK(f.transport->bytes_moved() == 0);
  CHECK(p.api().stats().aborted == 1);
}

TEST_CASE("regression: an oversized dst_info of another incarnation leaves the live room alone") {
  // The duplicate-room rule (a dst_info whose incarnation differs from the live room's refuses
  // only that request) once was bypassed for page lists longer than max_pages_per_request: the
  // size check ran first and failed the LIVE request.
  rank_fixture f(mla_config(1, 1, 1));
  f.tunables.max_pages_per_request = 8;
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(0);
  f.connect(d, p);
  const request_id id{61, 1};
  REQUIRE_FALSE(p.p->create(id, 0));
  CHECK(p.steps().first_state(id) == poll_state::bootstrapping);
  f.send_dst(p, 61, 2, 0, std::vector<std::int32_t>(9, 1), 0);
  CHECK(status_of(d, 61, kv_poll::failed, 2));  // the other incarnation is refused...
  CHECK(p.steps().stays(id, poll_state::bootstrapping));  // ...the live one goes on
  CHECK_FALSE(status_of(d, 61, kv_poll::failed, 1, ms(0)));
}

// ---- decode ----------------------------------------------------------------------------------

namespace {

// A fake prefill rank: a recorder registered in the registry under its key.
struct fake_prefill {
  int rank = 0;
  caf::actor handle;
  inbox_ptr box;
};

struct decode_fixture : rank_fixture {
  std::vector<fake_prefill> prefill;  // fake prefill ranks 0 and 1
  tested_rank* dec = nullptr;

  explicit decode_fixture(config::tunables t = {}) : rank_fixture(mha_config()) {
    tunables = t;
    REQUIRE(plan->decode(0).required_prefill_response_num == 2);
    REQUIRE(plan->decode(0).expects_aux);
    // The fake prefill ranks register in the registry under their keys, as real ones do.
    for (int tp = 0; tp < 2; ++tp) {
      fake_prefill p;
      p.rank = tp;
      std::tie(p.handle, p.box) = spawn_recorder();
      std::optional<msg::registration_reply> reply;
      self->request(registry, long_wait,
                    msg::register_rank{msg::wire_version, {0, 0, tp, 0}, "fake prefill " + std::to_string(tp),
                                       p.handle, handshake_of(config)})
          .receive([&](msg::registration_reply& r) { reply = r; },
                   [&](caf::error& e) { FAIL_CHECK(sys.render(e)); });
      REQUIRE(reply);
      REQUIRE(reply->ok);
      prefill.push_back(p);
    }
  }

  kvflow::decode_rank& api() { return *dec->d; }
  scheduler& steps() { return dec->steps(); }

  void spawn_decode() {
    dec = &add_decode(0);
    // It resolves its peers through the registry and registers its memory with each.
    for (int tp = 0; tp < 2; ++tp) {
      auto reg = prefill[tp].box->wait_any<msg::kv_registration>();
      INFO("fake prefill " << tp);
      REQUIRE(reg);
      CHECK(reg->version == msg::wire_version);
      CHECK(reg->decode_rank == 0);
      CHECK(reg->tp_size == 1);
      CHECK(reg->decode == dec->actor);
      CHECK(check_remote_pool(reg->pool).ok());
      CHECK(reg->pool.pages == 16);
      CHECK(reg->pool.aux_rows == aux_rows);
      CHECK(reg->pool.kv.size() == 2u * 2);  // 2 layers, K and V
      CHECK(reg->regions.size() == 2u * 2 + 1 + 1);  // KV, the aux rows, the receipts
    }
  }

  // The engine creates the request; once the round shows WaitingForInput it sends its pages.
  void start(const request_id& id, const std::vector<std::int32_t>& pages, int aux_slot) {
    REQUIRE_FALSE(api().create(id, 0));
    REQUIRE(steps().reaches(id, poll_state::waiting_for_input));
    REQUIRE_FALSE(api().send_destinations(id, pages, aux_slot));
  }

  // Both fake prefill ranks received the room's destinations; returns prefill rank 0's copy.
  msg::dst_info destinations(std::uint64_t room, std::uint64_t incarnation = 1) {
    std::optional<msg::dst_info> first;
    for (int tp = 0; tp < 2; ++tp) {
      auto di = prefill[tp].box->wait_for<msg::dst_info>(
          [=](const msg::dst_info& x) { return x.room == room && x.incarnation == incarnation; });
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

  // Writes the receipt into the decode rank's slot through the fabric, as prefill rank 0 does
  // after the aux rows.
  void land_aux(std::uint64_t room, std::uint64_t incarnation, std::int32_t slot) {
    auto reg = prefill[0].box->wait_any<msg::kv_registration>();
    REQUIRE(reg);
    const aux_record rec = make_receipt(room, incarnation);
    bool ok = false;
    std::string why;
    peer_transport->push(0,
                         {transport::block{reinterpret_cast<const std::byte*>(&rec), reg->pool.receipts.region,
                                           reg->pool.receipts.offset + std::uint64_t(slot) * sizeof(aux_record),
                                           sizeof(aux_record)}},
                         [&](status s) {
                           ok = s.ok();
                           why = s.reason();
                         });
    INFO(why);
    REQUIRE(ok);
  }

  void status_from(int prefill_rank, std::uint64_t room, kv_poll s, const std::string& reason = {},
                   std::uint64_t incarnation = 1) {
    caf::anon_send(dec->actor, msg::kv_status{room, incarnation, prefill_rank, static_cast<std::uint8_t>(s), reason});
  }

  // Fake prefill rank `p` says its writes for the room drained.
  void ack_from(int p, std::uint64_t room, std::uint64_t incarnation = 1) {
    caf::anon_send(dec->actor, msg::abort_ack{room, incarnation, p});
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
  const request_id id{room, 1};
  f.start(id, {9, 3}, 2);
  auto dst = f.destinations(room);
  CHECK(dst.dst_pages == std::vector<std::int32_t>{9, 3});
  CHECK(dst.aux_slot == 2);
  CHECK(dst.prefix_pages == 0);
  CHECK(f.steps().stays(id, poll_state::waiting_for_input, ms(20)));

  f.land_aux(room, 1, dst.aux_slot);
  f.status_from(0, room, kv_poll::success);
  f.status_from(0, room, kv_poll::success);  // the same rank twice is still one response
  CHECK(f.steps().stays(id, poll_state::waiting_for_input));
  f.status_from(1, room, kv_poll::success);
  auto done = f.steps().released(id);
  REQUIRE(done);
  CHECK(done->state == poll_state::success);
  CHECK(f.steps().until([&](const round_copy& c) { return c.find(room) == nullptr; }));
  const auto s = f.api().stats();
  CHECK(s.succeeded == 1);
  CHECK(s.live_requests == 0);
  CHECK(s.quarantined == 0);
  for (const auto& p : f.prefill) CHECK(p.box->all<msg::abort_room>().empty());
}

TEST_CASE("decode rank: Success from every prefill rank without the aux slot landed is not Success") {
  decode_fixture f;
  f.spawn_decode();
  const std::uint64_t room = 52;
  const request_id id{room, 1};
  f.start(id, {1, 2}, 0);
  f.destinations(room);
  f.status_from(0, room, kv_poll::success);
  f.status_from(1, room, kv_poll::success);
  auto failed = f.steps().reaches(id, poll_state::failed);
  REQUIRE(failed);
  auto a = f.aborted_on_both(room);
  INFO(a.reason);
  CHECK(contains(a.reason, "aux"));
  CHECK(contains(f.api().failure_reason(id), "aux"));
}

TEST_CASE("decode rank: a Failed status from one prefill rank fails the room and aborts every peer") {
  decode_fixture f;
  f.spawn_decode();
  const std::uint64_t room = 53;
  const request_id id{room, 1};
  f.start(id, {1, 2}, 0);
  f.destinations(room);
  f.status_from(0, room, kv_poll::success);
  f.status_from(1, room, kv_poll::failed, "transport error: link down");
  auto failed = f.steps().reaches(id, poll_state::failed);
  REQUIRE(failed);
  auto a = f.aborted_on_both(room);
  INFO(a.reason);
  CHECK(contains(a.reason, "link down"));
  // Both got the destinations: the pages stay quarantined until both say their writes drained.
  CHECK_FALSE(failed->released);
  f.ack_from(0, room);
  f.ack_from(1, room);
  auto gone = f.steps().released(id);
  REQUIRE(gone);
  CHECK(gone->state == poll_state::failed);
  CHECK(contains(f.api().failure_reason(id), "prefill rank 1"));
  CHECK(f.steps().until([&](const round_copy& c) { return c.find(room) == nullptr; }));
  CHECK(f.api().stats().live_requests == 0);
}

TEST_CASE("regression: a stopping decode rank keeps its memory registered until its prefill peers' writes drained") {
  // Issue 9: the decode rank deregistered (and, for memory its transport allocated, freed) its
  // regions the moment it stopped, while a prefill peer could still be writing into them (UCX
  // 1.13's emulated puts write whatever address they carry). Asked to stop, it fails its rooms,
  // tells its peers and goes only once each acknowledged that its writes drained.
  decode_fixture f;
  f.spawn_decode();
  const std::uint64_t room = 58;
  const request_id id{room, 1};
  f.start(id, {1, 2}, 0);
  f.destinations(room);
  f.self->monitor(f.dec->actor);
  f.self->send_exit(f.dec->actor, caf::exit_reason::user_shutdown);
  auto a = f.aborted_on_both(room);
  CHECK(contains(a.reason, "decode rank stopping"));
  auto gone = [&](ms wait) {
    bool down = false;
    f.self->receive([&](const caf::down_msg& dm) { down = dm.source == f.dec->actor.address(); },
                    caf::after(wait) >> [] {});
    return down;
  };
  CHECK_FALSE(gone(ms(300)));
  f.land_aux(room, 1, 0);  // a late write of prefill rank 0 still lands in registered memory
  f.ack_from(0, room);
  CHECK_FALSE(gone(ms(200)));
  f.ack_from(1, room);
  CHECK(gone(long_wait));
}

TEST_CASE("decode rank: waiting timeout fails the room and aborts every prefill peer") {
  config::tunables t;
  t.waiting_timeout_ms = 150;
  decode_fixture f(t);
  f.spawn_decode();
  const std::uint64_t room = 54;
  const request_id id{room, 1};
  f.start(id, {1, 2}, 0);
  f.destinations(room);
  f.status_from(0, room, kv_poll::success);  // one of two: not enough
  REQUIRE(f.steps().reaches(id, poll_state::failed));
  auto a = f.aborted_on_both(room);
  INFO(a.reason);
  CHECK(contains(a.reason, "waiting timeout"));
  f.ack_from(0, room);
  f.ack_from(1, room);
  REQUIRE(f.steps().released(id));
  CHECK(contains(f.api().failure_reason(id), "waiting timeout"));
}

TEST_CASE("decode rank: when a prefill peer dies its unfinished rooms fail and the others are aborted") {
  decode_fixture f;
  f.spawn_decode();
  for (std::uint64_t room : {55, 56}) f.start({room, 1}, {static_cast<std::int32_t>(room - 55)}, 0);
  f.destinations(55);
  f.destinations(56);
  f.kill(f.prefill[1].handle);
  REQUIRE(f.steps().reaches({55, 1}, poll_state::failed));
  REQUIRE(f.steps().reaches({56, 1}, poll_state::failed));
  // The live peer is told to stop; the dead one is not written to.
  for (std::uint64_t room : {55, 56}) {
    auto a = f.prefill[0].box->wait_for<msg::abort_room>([room](const msg::abort_room& x) { return x.room == room; });
    REQUIRE(a);
    INFO(a->reason);
    CHECK(contains(a->reason, "prefill rank 1"));
    CHECK(contains(a->reason, "down"));
  }
  // A request after the death fails at once instead of waiting out a timeout; it never sent
  // destinations, so nothing can write into its pages: released at once.
  REQUIRE_FALSE(f.api().create({57, 1}, 0));
  auto late = f.steps().released({57, 1}, ms(2000));
  REQUIRE(late);
  CHECK(late->state == poll_state::failed);
  // The live peer drains: the rooms it got destinations for are released.
  f.ack_from(0, 55);
  f.ack_from(0, 56);
  auto drained = f.steps().released_all({{55, 1}, {56, 1}});
  REQUIRE(drained);
  for (const auto& x : *drained) CHECK(x.state == poll_state::failed);
  for (std::uint64_t room : {55, 56, 57}) {
    const auto why = f.api().failure_reason({room, 1});
    INFO("room " << room << ": " << why);
    CHECK(contains(why, "down"));
  }
}

TEST_CASE("regression: a decode abort for a stale incarnation leaves the reused room alone") {
  // Every per-room message is matched on (room, incarnation); the decode rank once failed the
  // room by room id alone, so a late abort of an earlier request killed the request reusing the
  // room (section 2: a reused room must not inherit the old request's fate).
  decode_fixture f;
  f.spawn_decode();
  const std::uint64_t room = 58;
  const request_id reused{room, 2};
  f.start(reused, {1, 2}, 0);
  f.destinations(room, 2);
  // The API refuses it at once, and a late abort that reaches the rank's actor changes nothing.
  CHECK(f.api().abort({room, 1}, "late abort of the previous request").code() == errc::not_found);
  caf::anon_send(f.dec->actor, msg::api_abort{room, 1, "late abort of the previous request"});
  CHECK(f.steps().stays(reused, poll_state::waiting_for_input));
  for (const auto& p : f.prefill) CHECK(p.box->all<msg::abort_room>().empty());
}

TEST_CASE("decode rank: a prefill side with another page size fails every request with a clear reason") {
  // semantics.md section 4: a page-size or dtype mismatch is a clear error, not corrupt data.
  // What counts is what each prefill rank registered (issue 9: the check compared the
  // registry's own flags), here page size 4.
  decode_fixture f;
  auto other = f.config;
  other.page_size = 8;
  auto plan = std::make_shared<const config::routing_plan>(other);
  rank_options o;
  o.plan = plan;
  auto& d = f.add_decode(0, o);
  const request_id id{91, 1};
  REQUIRE_FALSE(d.d->create(id, 0));
  auto failed = d.steps().released(id);
  REQUIRE(failed);
  CHECK(failed->state == poll_state::failed);
  const auto why = d.api().failure_reason(id);
  INFO(why);
  CHECK(contains(why, "prefill rank 0 registered another KV configuration: page size 4 there, 8 here"));
  // It sent no destinations to an incompatible prefill side; its registration went, with its
  // own configuration, so that the prefill side refuses it too.
  for (const auto& p : f.prefill) {
    CHECK(p.box->all<msg::dst_info>().empty());
    auto reg = p.box->wait_any<msg::kv_registration>();
    REQUIRE(reg);
    CHECK(reg->shape.page_size == 8);
  }
}

TEST_CASE("regression: a decode rank whose registry dies before it is ready works with the restarted one") {
  // Issue 9: a registry error left the decode rank failing every request for good (and a query
  // parked in a registry that died was never answered: CAF 0.17 sends nothing). The rooms
  // waiting fail with the reason; a restarted registry (set_registry) is asked again.
  decode_fixture f;  // its registry is ready: both fake prefill ranks registered
  rank_options o;
  o.registry = spawn_bootstrap_registry(f.sys, f.config);  // no prefill rank registers in it
  auto& d = f.add_decode(0, o);
  const request_id first{41, 1};
  REQUIRE_FALSE(d.d->create(first, 0));
  CHECK_FALSE(d.steps().reaches(first, poll_state::failed, ms(200)));  // waits for the topology
  f.self->send_exit(o.registry, caf::exit_reason::kill);
  REQUIRE(d.steps().reaches(first, poll_state::failed, ms(3000)));
  CHECK(contains(d.api().failure_reason(first), "bootstrap registry down"));

  // Only this process's keeper says the registry restarted: from nobody (a peer's anonymous
  // message), it is not taken.
  caf::anon_send(d.actor, msg::set_registry{f.registry});
  const request_id early{40, 1};
  REQUIRE_FALSE(d.d->create(early, 0));
  CHECK_FALSE(d.steps().reaches(early, poll_state::waiting_for_input, ms(300)));
  f.self->send(d.actor, msg::set_registry{f.registry});
  const request_id second{42, 1};
  bool ready = false;
  for (int i = 0; i < 50 && !ready; ++i) {  // a room created before the new topology came fails
    const request_id id{second.room + static_cast<std::uint64_t>(i), 1};
    REQUIRE_FALSE(d.d->create(id, 0));
    ready = d.steps().reaches(id, poll_state::waiting_for_input, ms(200)).has_value();
  }
  CHECK(ready);
  for (const auto& p : f.prefill) CHECK(p.box->wait_any<msg::kv_registration>());
}

TEST_CASE("regression: a forged agreed round does not wedge the rank's ring") {
  // Issue 9: round 2^64-1 sent to a rank whose rounds come by message took its ring slot
  // (255 of 256) for good: every later round of that slot was refused as older, and the
  // scheduler stalled from step 256 on. A round this rank has not posted, or of another group,
  // is refused.
  rank_fixture f(mla_config(1, 1, 1));
  auto& p = f.add_prefill(0);
  // As the rank's own supervisor: these are refused by what they claim, not by who sent them.
  caf::send_as(p.parent, p.actor, msg::agreed_round{std::numeric_limits<std::uint64_t>::max(), 0, {}});
  caf::send_as(p.parent, p.actor, msg::agreed_round{300, 0, {}});
  caf::send_as(p.parent, p.actor, msg::agreed_round{2, 5, {}});  // another group's
  for (std::uint64_t k = 1; k <= 300; ++k) {
    auto v = p.api().poll(k, std::chrono::microseconds(2000000));
    REQUIRE_MESSAGE(v.has_value(), "step " << k << ": " << v.err().message());
    CHECK(v->round == k - 1);
  }
}

TEST_CASE("hostile: a rank takes agreed rounds only from its group's supervisor, and outlives a stray error") {
  rank_fixture f(mla_config(1, 1, 1));
  auto& p = f.add_prefill(0);
  p.control->answer.store(false);  // its supervisor stays silent: only forged rounds come
  REQUIRE(p.api().poll(1, std::chrono::microseconds(0)));
  f.self->send(p.actor, msg::agreed_round{1, 0, {}});  // another actor's
  caf::anon_send(p.actor, msg::agreed_round{1, 0, {}});  // nobody's
  auto forged = p.api().poll(2, std::chrono::microseconds(300000));
  CHECK_FALSE(forged.has_value());
  caf::send_as(p.parent, p.actor, msg::agreed_round{1, 0, {}});
  auto real = p.api().poll(2, std::chrono::microseconds(2000000));
  REQUIRE_MESSAGE(real.has_value(), real.err().message());
  CHECK(real->round == 1);

  f.self->monitor(p.actor);
  caf::anon_send(p.actor, caf::make_error(caf::sec::runtime_error));
  bool down = false;
  f.self->receive([&](const caf::down_msg&) { down = true; }, caf::after(short_wait) >> [] {});
  CHECK_FALSE(down);
  CHECK_FALSE(p.p->create({77, 1}, 0));  // not "agreement group lost"
}

TEST_CASE("regression: a decode rank that registered another CP send mode fails the prefill rooms at once") {
  // semantics.md section 7, 17: SGLang never exchanges its per-side CP-send flag, and a P/D
  // mismatch stalls 300 s. The prefill rank refuses the registration and fails the rooms that
  // wait for that decode rank's destinations now, not at the bootstrap timeout.
  rank_fixture f(mla_config(1, 1, 1));
  f.tunables.bootstrap_timeout_ms = 60000;
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(0);
  const request_id before{31, 1};
  REQUIRE_FALSE(p.p->create(before, 0));
  auto other = handshake_of(f.config);
  other.cp_send_all = !other.cp_send_all;
  f.connect(d, p, other);
  const request_id after{32, 1};
  REQUIRE_FALSE(p.p->create(after, 0));
  for (const auto& id : {before, after}) {
    CHECK(p.steps().reaches(id, poll_state::failed, ms(2000)));
    const auto why = p.api().failure_reason(id);
    INFO(why);
    CHECK(contains(why, "decode rank 0 registered another KV configuration: CP send mode"));
  }
}

TEST_CASE("a rank whose agreement supervisor goes down fails and releases its rooms, and refuses new ones") {
  // Rank processes host their group's supervisors: when one goes, a rank of the group went with
  // it, so no round will come again. The rank must not hold the room (or its memory) forever,
  // and its engine must hear that the group is lost instead of waiting for rounds.
  rank_fixture f(mla_config(1, 1, 1));
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(0);
  f.connect(d, p);
  const request_id id{91, 1};
  REQUIRE_FALSE(p.p->create(id, 0));
  f.send_dst(p, 91, 1, 0, {1, 2}, 0);
  REQUIRE(p.steps().reaches(id, poll_state::waiting_for_input));
  f.kill(p.parent);
  // Polls answer that the group is lost (the round of the step before the loss may still come).
  std::optional<kvflow::error> lost;
  std::uint64_t step = p.steps().step();
  const auto deadline = std::chrono::steady_clock::now() + long_wait;
  while (!lost && std::chrono::steady_clock::now() < deadline) {
    auto v = p.api().poll(step + 1, microseconds(10000));
    if (v)
      ++step;
    else if (v.err().code() != errc::timeout)
      lost = v.err();
  }
  REQUIRE(lost);
  CHECK(lost->code() == errc::unavailable);
  CHECK(contains(lost->message(), "agreement group lost"));
  // A later request is refused at once, not left to stall.
  auto refused = p.p->create({92, 1}, 0);
  CHECK(refused.code() == errc::unavailable);
  // Its readers were told.
  auto st = status_of(d, 91, kv_poll::failed);
  REQUIRE(st);
  CHECK(contains(st->reason, "agreement group lost"));
  CHECK(contains(p.api().failure_reason(id), "agreement group lost"));
  // The room failed and let go of its memory; nothing is in flight.
  {
    auto& sh = *runtime::internals(p.api()).shared;
    std::lock_guard<std::mutex> g(sh.mutex);
    const auto* e = sh.store.find(91);
    REQUIRE(e != nullptr);
    CHECK(e->state == kv_poll::failed);
    CHECK(e->released);
  }
  CHECK(p.api().stats().pushes_in_flight == 0);
  CHECK_FALSE(p.api().clear(id));  // the engine may clear it
  CHECK(p.api().stats().live_requests == 0);
}

// ---- the quarantine (semantics.md section 5 "No write after free") ----------------------------

namespace {

// Stands between a decode rank and a prefill rank: registered in the registry as the prefill
// rank, so the decode rank talks to it; it records every message either way and passes it on.
using target_atom = caf::atom_constant<caf::atom("target")>;

caf::behavior wire_tap(caf::event_based_actor* self, inbox_ptr box) {
  // Each message is passed on before it is recorded: once the test sees it, it is on its way.
  auto prefill = std::make_shared<caf::actor>();
  auto decode = std::make_shared<caf::actor>();
  return {
      [prefill](target_atom, caf::actor p) { *prefill = std::move(p); },
      [self, box, prefill, decode](msg::kv_registration& r) {
        auto seen = caf::make_message(r);
        *decode = r.decode;
        r.decode = caf::actor_cast<caf::actor>(self);
        self->send(*prefill, std::move(r));
        box->push(std::move(seen));
      },
      [self, box, prefill](msg::dst_info& d) {
        self->send(*prefill, d);
        box->push(caf::make_message(std::move(d)));
      },
      [self, box, prefill](msg::abort_room& a) {
        self->send(*prefill, a);
        box->push(caf::make_message(std::move(a)));
      },
      [self, box, decode](msg::kv_status& s) {
        self->send(*decode, s);
        box->push(caf::make_message(std::move(s)));
      },
      [self, box, decode](msg::abort_ack& a) {
        self->send(*decode, a);
        box->push(caf::make_message(std::move(a)));
      },
  };
}

}  // namespace

TEST_CASE("quarantine: a decode abort while the prefill push is held releases decode's pages only after the ack") {
  // A real prefill rank and a real decode rank, the wire between them tapped. Decode aborts the
  // room while prefill's push into its pages is held by the network: decode must keep the
  // pages (agreed Failed, not released) until prefill acknowledges, and prefill must not
  // acknowledge before its push completed. Releasing at once would let the engine hand the
  // pages to another request while the push still lands in them.
  rank_fixture f(mla_config(1, 1, 1));
  auto wire = std::make_shared<inbox>();
  auto tap = f.own(f.sys.spawn(wire_tap, wire));
  {
    std::optional<msg::registration_reply> reply;
    f.self->request(f.registry, long_wait, msg::register_rank{msg::wire_version, {0, 0, 0, 0}, "tap", tap, handshake_of(f.config)})
        .receive([&](msg::registration_reply& r) { reply = r; }, [&](caf::error& e) { FAIL_CHECK(f.sys.render(e)); });
    REQUIRE(reply);
    REQUIRE(reply->ok);
  }
  auto held = std::make_shared<held_transport>(f.transport);
  // The prefill rank's own registrations go to a recorder: the tap holds its key.
  auto [prefill_registry, prefill_registry_box] = f.spawn_recorder();
  rank_options po;
  po.transport = held;
  po.registry = prefill_registry;
  auto& p = f.add_prefill(0, po);
  caf::anon_send(tap, target_atom::value, p.actor);
  auto& d = f.add_decode(0);
  REQUIRE(wire->wait_any<msg::kv_registration>());

  const std::uint64_t room = 77;
  const request_id id{room, 1};
  REQUIRE_FALSE(d.d->create(id, 0));
  REQUIRE_FALSE(p.p->create(id, 0));
  REQUIRE(d.steps().reaches(id, poll_state::waiting_for_input));
  const std::vector<std::int32_t> dst{4, 5};
  REQUIRE_FALSE(d.d->send_destinations(id, dst, 1));
  REQUIRE(p.steps().reaches(id, poll_state::waiting_for_input));
  p.compute(room, 1, {0, 1}, 0, 0);
  REQUIRE_FALSE(p.p->init(id, 2, 0));
  REQUIRE_FALSE(p.p->send(id, {0, 1}, true));
  REQUIRE(held->wait_held(1));

  // Decode's engine gives up on the request.
  REQUIRE_FALSE(d.d->abort(id, "client went away"));
  auto failed = d.steps().reaches(id, poll_state::failed);
  REQUIRE(failed);
  CHECK_FALSE(failed->released);
  REQUIRE(wire->wait_for<msg::abort_room>([&](const msg::abort_room& a) { return a.room == room; }));
  auto pf = p.steps().reaches(id, poll_state::failed);
  REQUIRE(pf);
  CHECK_FALSE(pf->released);
  // While the push is held: decode keeps the pages, prefill neither releases nor acknowledges.
  CHECK(d.steps().stays(id, poll_state::failed));
  CHECK(p.steps().stays(id, poll_state::failed, ms(50)));
  CHECK(wire->all<msg::abort_ack>().empty());
  CHECK(d.api().stats().quarantined == 1);
  CHECK(p.api().stats().pushes_in_flight == 1);
  CHECK(code(d.api().clear(id)) == "invalid argument");

  // The network delivers: the push lands (in the quarantined pages), then completes.
  held->on_release = [w = wire] { w->push(caf::make_message(std::string("push completed"))); };
  held->release_all();
  auto ack = wire->wait_for<msg::abort_ack>([&](const msg::abort_ack& a) { return a.room == room; });
  REQUIRE(ack);
  CHECK(ack->incarnation == 1);
  CHECK(ack->prefill_rank == 0);
  const auto completed = wire->index_of<std::string>([](const std::string& s) { return s == "push completed"; });
  const auto acked = wire->index_of<msg::abort_ack>([&](const msg::abort_ack& a) { return a.room == room; });
  REQUIRE(completed >= 0);
  CHECK(completed < acked);
  auto gone = d.steps().released(id);
  REQUIRE(gone);
  CHECK(gone->state == poll_state::failed);
  CHECK(d.api().stats().quarantined == 0);
  REQUIRE(p.steps().released(id));
  // What the quarantine protected: the late push did write into the room's pages.
  const auto& m = *d.memory;
  CHECK(m.item(0, 0, dst[0])[0] == pattern_byte(room, 0, 0, 0));
  CHECK(m.item(3, 0, dst[1])[5] == pattern_byte(room, 3, 1, 5));
}

TEST_CASE("quarantine: a failed decode room is released once the prefill peer that got destinations goes down") {
  decode_fixture f;
  f.spawn_decode();
  const std::uint64_t room = 59;
  const request_id id{room, 1};
  f.start(id, {1, 2}, 0);
  f.destinations(room);
  REQUIRE_FALSE(f.api().abort(id, "engine gave up"));
  auto failed = f.steps().reaches(id, poll_state::failed);
  REQUIRE(failed);
  CHECK_FALSE(failed->released);
  f.aborted_on_both(room);
  CHECK(f.api().stats().aborted == 1);
  CHECK(f.api().stats().quarantined == 1);
  // One peer drained; the other (which got the destinations too) may still write.
  f.ack_from(0, room);
  CHECK(f.steps().stays(id, poll_state::failed));
  // It dies: it writes no more.
  f.kill(f.prefill[1].handle);
  auto gone = f.steps().released(id);
  REQUIRE(gone);
  CHECK(gone->state == poll_state::failed);
  CHECK(f.api().stats().quarantined == 0);
}

// ---- the API's synchronous checks --------------------------------------------------------------

TEST_CASE("API: engine calls are checked at once, and poll answers only the round of its step") {
  rank_fixture f(mla_config(1, 1, 1));
  auto& p = f.add_prefill(0);
  auto& d = f.add_decode(0);  // real ranks, wired through the registry
  const request_id id{33, 1};

  // create of a live room: exists (the same request or another one of the room).
  REQUIRE_FALSE(p.p->create(id, 0));
  CHECK(p.p->create(id, 0).code() == errc::exists);
  CHECK(p.p->create({33, 2}, 0).code() == errc::exists);
  CHECK(p.p->create({34, 1}, 5).code() == errc::invalid_argument);  // no decode dp group 5
  // init before WaitingForInput: not ready; send before init: invalid.
  CHECK(p.p->init(id, 2, 0).code() == errc::not_ready);
  CHECK(p.p->send(id, {0, 1}, true).code() == errc::invalid_argument);
  CHECK(p.p->init({35, 1}, 2, 0).code() == errc::not_found);

  REQUIRE_FALSE(d.d->create(id, 0));
  REQUIRE(d.steps().reaches(id, poll_state::waiting_for_input));
  // A destination page outside the decode rank's 16 pages, or an aux slot outside its rows.
  CHECK(d.d->send_destinations(id, {0, 16}, 1).code() == errc::invalid_argument);
  CHECK(d.d->send_destinations(id, {0, -1}, 1).code() == errc::invalid_argument);
  CHECK(d.d->send_destinations(id, {0, 1}, aux_rows).code() == errc::invalid_argument);
  REQUIRE_FALSE(d.d->send_destinations(id, {4, 5}, 1));
  CHECK(d.d->send_destinations(id, {4, 5}, 1).code() == errc::invalid_argument);  // twice

  REQUIRE(p.steps().reaches(id, poll_state::waiting_for_input));
  REQUIRE_FALSE(p.p->init(id, 2, 0));
  CHECK(p.p->init(id, 2, 0).code() == errc::invalid_argument);  // twice
  // More pages than init said, a page outside the memory, a last chunk short of the total.
  CHECK(p.p->send(id, {0, 1, 2}, false).code() == errc::invalid_argument);
  CHECK(p.p->send(id, {0, prefill_pages}, true).code() == errc::invalid_argument);
  CHECK(p.p->send(id, {0}, true).code() == errc::invalid_argument);
  REQUIRE_FALSE(p.p->send(id, {0}, false));
  CHECK(p.p->send(id, {1, 2}, true).code() == errc::invalid_argument);
  REQUIRE_FALSE(p.p->send(id, {1}, true));
  CHECK(p.p->send(id, {}, true).code() == errc::invalid_argument);  // after the last chunk
  auto pdone = p.steps().released(id);
  REQUIRE(pdone);
  CHECK(pdone->state == poll_state::success);
  auto ddone = d.steps().released(id);
  REQUIRE(ddone);
  CHECK(ddone->state == poll_state::success);

  // Steps start at 1 and rise by one.
  auto& api = p.api();
  const auto step = p.steps().step();
  CHECK(api.poll(step + 2, microseconds(0)).err().code() == errc::invalid_argument);
  CHECK(api.poll(0, microseconds(0)).err().code() == errc::invalid_argument);
  CHECK(api.poll(step - 1, microseconds(0)).err().code() == errc::invalid_argument);
  // Polling the same step again answers the same round.
  auto again = api.poll(step, microseconds(0));
  REQUIRE(again);
  CHECK(again->round == step - 1);

  // A round that does not come: not ready without waiting, timeout after waiting (a stall),
  // never another round. The parent falls silent: the report of step `step` may still have been
  // answered, so the first silent step is found by polling.
  p.control->answer = false;
  std::uint64_t k = step + 1;
  auto first = api.poll(k, microseconds(200000));
  if (first) {
    CHECK(first->round == step);
    ++k;  // round `step` was answered before the parent fell silent; round k - 1 never comes
  } else {
    CHECK(first.err().code() == errc::timeout);  // round k - 1 == step never comes
  }
  auto not_ready = api.poll(k, microseconds(0));
  REQUIRE_FALSE(not_ready);
  CHECK(not_ready.err().code() == errc::not_ready);
  const auto stalls = api.stats().stalls;
  CHECK(api.poll(k, microseconds(0)).err().code() == errc::not_ready);
  CHECK(api.stats().stalls == stalls);  // not waiting is not a stall
  auto timed_out = api.poll(k, microseconds(50000));
  REQUIRE_FALSE(timed_out);
  CHECK(timed_out.err().code() == errc::timeout);
  CHECK(api.stats().stalls == stalls + 1);
  // The same step again (the engine retries), not the next one: skipping ahead is refused.
  CHECK(api.poll(k, microseconds(0)).err().code() == errc::not_ready);
  CHECK(api.poll(k + 2, microseconds(0)).err().code() == errc::invalid_argument);
}

TEST_CASE("regression: an early abort is remembered for failure_memory_ms, then forgotten") {
  // Prefill kept every failed or early-aborted (room, incarnation) until 65536 of them had piled
  // up (about 12 MB a rank, reached within an hour of faults). They are now kept for
  // failure_memory_ms: within it the request fails at once, after it the request is served.
  rank_fixture f(mla_config(1, 1, 1));
  f.tunables.bootstrap_timeout_ms = 5000;
  f.tunables.failure_memory_ms = 300;
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(0);
  f.connect(d, p);
  caf::anon_send(p.actor, msg::abort_room{25, 1, 0, "client went away"});
  caf::anon_send(p.actor, msg::abort_room{26, 1, 0, "client went away"});
  REQUIRE(d.box->wait_for<msg::abort_ack>([](const msg::abort_ack& a) { return a.room == 26; }));
  const request_id within{25, 1}, after{26, 1};
  REQUIRE_FALSE(p.p->create(within, 0));
  CHECK(p.steps().reaches(within, poll_state::failed, ms(1000)));
  std::this_thread::sleep_for(ms(400));
  REQUIRE_FALSE(p.p->create(after, 0));
  f.send_dst(p, 26, 1, 0, {1, 2}, 0);
  CHECK(p.steps().reaches(after, poll_state::waiting_for_input, ms(2000)));
}

// Prefill's failed_before went by age only as a new request came (api_create expires it): a rank
// that got no more requests held its last failures, up to max_rooms_per_rank of them, for good.
// A timer of its own (msg::failure_expiry, due at the oldest entry's end) expires them now.
TEST_CASE("regression: prefill forgets its remembered failures after failure_memory_ms without a new request") {
  rank_fixture f(mla_config(1, 1, 1));
  f.tunables.bootstrap_timeout_ms = 5000;
  f.tunables.failure_memory_ms = 1000;
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(0);
  f.connect(d, p);
  auto& sh = *runtime::internals(p.api()).shared;
  auto remembered = [&sh] {
    std::lock_guard<std::mutex> g(sh.mutex);
    return sh.counters.failures_remembered;
  };
  // Gone within `timeout`, with nothing but time passing (no request, destination or step).
  auto forgotten = [&](ms timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (remembered() != 0 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(ms(10));
    return remembered() == 0;
  };
  caf::anon_send(p.actor, msg::abort_room{27, 1, 0, "client went away"});
  caf::anon_send(p.actor, msg::abort_room{28, 1, 0, "client went away"});
  REQUIRE(d.box->wait_for<msg::abort_ack>([](const msg::abort_ack& a) { return a.room == 28; }));
  CHECK(remembered() == 2);
  CHECK(forgotten(ms(10000)));
  // A later failure sets the timer again.
  caf::anon_send(p.actor, msg::abort_room{29, 1, 0, "client went away"});
  REQUIRE(d.box->wait_for<msg::abort_ack>([](const msg::abort_ack& a) { return a.room == 29; }));
  CHECK(remembered() == 1);
  CHECK(forgotten(ms(10000)));
}

// finished and failed_unheld (4096 requests each) dropped old entries only as a create came. The
// step's poll expires them too now, past the window in which they answer a create (the
// bootstrap timeout); what is within it still refuses a late create.
TEST_CASE("rank: a step's poll forgets finished and failed requests past the bootstrap timeout without a create") {
  rank_fixture f(mla_config(1, 1, 1));
  f.tunables.bootstrap_timeout_ms = 60000;
  auto& p = f.add_prefill(0);
  auto& sh = *runtime::internals(p.api()).shared;
  {
    std::lock_guard<std::mutex> g(sh.mutex);
    const auto now = std::chrono::steady_clock::now();
    sh.finished.remember(31, 1, now - ms(120000));
    sh.failed_unheld.remember(32, 1, now - ms(120000));
    sh.finished.remember(33, 1, now);
    sh.failed_unheld.remember(34, 1, now);
  }
  p.steps().next();
  {
    std::lock_guard<std::mutex> g(sh.mutex);
    CHECK(sh.finished.size() == 1);
    CHECK(sh.failed_unheld.size() == 1);
  }
  // Within the window a late create of what the group finished is still refused.
  CHECK(p.p->create({33, 1}, 0).code() == errc::exists);
}

}  // namespace kvflow::actor_test

// ---- regressions found while porting these tests -----------------------------------------------

namespace kvflow::actor_test {

TEST_CASE("regression: a room the engine clear()s before a poll showed it released can be reused") {
  // rank::clear used to accept a room released on this rank only (not agreed released by a
  // round) without telling the rank actor, which kept the room: a later create of the same room
  // was ignored, never became ready, and its destinations were refused as a duplicate. Now
  // clear() refuses until a round showed the release (when the poll has forgotten it already).
  rank_fixture f(mla_config(1, 1, 1));
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(0);
  f.connect(d, p);
  const request_id first{21, 1}, second{21, 2};
  REQUIRE_FALSE(p.p->create(first, 0));
  REQUIRE(p.steps().first_state(first) == poll_state::bootstrapping);
  REQUIRE_FALSE(p.p->abort(first, "engine gave up"));
  // clear() before any round showed the release is refused; the rounds then release it.
  CHECK(p.api().clear(first).code() == errc::invalid_argument);
  REQUIRE(p.steps().released(first, ms(2000)));
  CHECK_FALSE(p.api().clear(first));
  REQUIRE_FALSE(p.p->create(second, 0));
  f.send_dst(p, 21, 2, 0, {1, 2}, 0);
  CHECK(p.steps().reaches(second, poll_state::waiting_for_input, ms(2000)));
  auto refused = status_of(d, 21, kv_poll::failed, 2, ms(0));
  CHECK_FALSE_MESSAGE(refused, (refused ? refused->reason : std::string{}));  // was: "duplicate room 21: live request 1 holds it"
}

TEST_CASE("regression: an abort that reaches prefill before the request fails it at once") {
  // semantics.md section 5: "An abort that reaches P before the request does is remembered (room
  // and incarnation) for a bounded time, so the request fails at once when it arrives". The
  // abort_room handler used to drop the buffered destinations and remember nothing: the request
  // waited out its bootstrap timeout.
  rank_fixture f(mla_config(1, 1, 1));
  f.tunables.bootstrap_timeout_ms = 5000;
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(0);
  f.connect(d, p);
  f.send_dst(p, 23, 1, 0, {1, 2}, 0);
  caf::anon_send(p.actor, msg::abort_room{23, 1, 0, "client went away"});
  REQUIRE(d.box->wait_for<msg::abort_ack>([](const msg::abort_ack& a) { return a.room == 23; }));
  const request_id id{23, 1};
  REQUIRE_FALSE(p.p->create(id, 0));
  CHECK(p.steps().reaches(id, poll_state::failed, ms(1000)));
}

TEST_CASE("regression: an abort of a later incarnation that comes while an earlier one is live is remembered") {
  // The abort_room handler remembered an early abort only when the room was not held at all;
  // with an earlier incarnation still live, the next incarnation then waited out its bootstrap
  // timeout (issue 9: "other incarnations").
  rank_fixture f(mla_config(1, 1, 1));
  f.tunables.bootstrap_timeout_ms = 5000;
  auto& d = f.fake_decode_rank(0);
  auto& p = f.add_prefill(0);
  f.connect(d, p);
  const request_id first{24, 1}, second{24, 2};
  REQUIRE_FALSE(p.p->create(first, 0));
  REQUIRE(p.steps().first_state(first) == poll_state::bootstrapping);
  caf::anon_send(p.actor, msg::abort_room{24, 2, 0, "client went away"});
  REQUIRE(d.box->wait_for<msg::abort_ack>([](const msg::abort_ack& a) { return a.room == 24 && a.incarnation == 2; }));
  REQUIRE_FALSE(p.p->abort(first, "engine gave up"));
  REQUIRE(p.steps().released(first, ms(2000)));
  REQUIRE_FALSE(p.api().clear(first));
  REQUIRE_FALSE(p.p->create(second, 0));
  CHECK(p.steps().reaches(second, poll_state::failed, ms(1000)));
  CHECK(contains(p.api().failure_reason(second), "before it arrived"));
}

}  // namespace kvflow::actor_test
