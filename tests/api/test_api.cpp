// The public embedding API as an engine uses it: one scheduler thread per rank, each stepping at
// its own pace, engine-owned memory and page indices. Checks what semantics.md section 3 and 5
// promise: poll(k) is the same record on every rank of a group for every k, and a failed
// request's pages are released only once no write into them can still come.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include "kvflow/kvflow.hpp"
#include "actors/messages.hpp"
#include "command/agreement_checker.hpp"
#include "runtime/api_internal.hpp"
#include "transport/inproc_transport.hpp"

using namespace std::chrono_literals;

namespace {

// Host memory of one rank: `layers` MLA latent buffers of `pages` pages and one aux buffer.
struct engine_memory {
  std::vector<std::vector<std::byte>> kv;
  std::vector<std::byte> aux;
  kvflow::memory_desc desc;
  engine_memory(int layers, int pages, std::uint64_t page_bytes, int rows) : kv(layers), aux(rows * 64) {
    desc.layer_begin = 0;
    desc.layer_end = layers;
    for (int l = 0; l < layers; ++l) {
      kv[l].assign(pages * page_bytes, std::byte{0});
      desc.buffers.push_back({kv[l].data(), kv[l].size(), page_bytes, kvflow::buffer_role::mla_latent, l});
    }
    desc.buffers.push_back({aux.data(), aux.size(), 64, kvflow::buffer_role::aux, -1});
  }
};

// A digest of a round as an engine sees it.
std::uint64_t digest(const kvflow::round_view& v) {
  std::uint64_t h = 1469598103934665603ULL ^ v.round;
  for (const auto& r : v) {
    for (std::uint64_t x : {r.id.room, r.id.incarnation, std::uint64_t(r.state), std::uint64_t(r.released)})
      h = (h ^ x) * 1099511628211ULL;
  }
  return h;
}

kvflow::topology small(int ptp, int pcp, int ppp, int dtp) {
  kvflow::topology t;
  t.prefill = {ptp, pcp, ppp, 1};
  t.decode = {dtp, 1, 1};
  t.model = "mla:4:64";
  t.dtype = "bf16";
  t.page_size = 16;
  return t;
}

}  // namespace

TEST_CASE("api: a node refuses a bad topology, bad coordinates and memory that does not fit, naming the field") {
  auto bad = small(3, 1, 1, 2);  // decode TP 2 does not divide prefill TP 3
  auto n = kvflow::node::start(bad, {});
  REQUIRE_FALSE(n);
  CHECK(n.err().code() == kvflow::errc::invalid_argument);
  auto good = kvflow::node::start(small(1, 1, 1, 1), {});
  REQUIRE(good);
  engine_memory m(4, 8, 16 * 64, 4);
  auto outside = good.value()->add_prefill({0, 1, 0, 0}, m.desc);
  REQUIRE_FALSE(outside);
  CHECK(outside.err().message().find("coords") != std::string::npos);
  engine_memory wrong(4, 8, 100, 4);  // pages of the wrong size for mla:4:64 at page 16
  auto w = good.value()->add_prefill({0, 0, 0, 0}, wrong.desc);
  REQUIRE_FALSE(w);
  CHECK(w.err().message().find("memory") != std::string::npos);
  kvflow::node_options unknown;
  unknown.tunables = {{"KVFLOW_NO_SUCH", "1"}};
  auto u = kvflow::node::start(small(1, 1, 1, 1), unknown);
  REQUIRE_FALSE(u);
  CHECK(u.err().message().find("KVFLOW_NO_SUCH") != std::string::npos);
}

// Each rank's scheduler thread runs its own loop, at its own random pace: it creates the same
// requests at the same steps (the group runs the same batch), acts on agreed rounds like SGLang's
// queues, and records the digest of every round it got. Every rank of a group must record the
// same digest for the same step.
namespace {

struct rank_run {
  bool prefill;
  int group_key;  // which group (for comparing)
  std::shared_ptr<kvflow::rank> api;
  std::unique_ptr<engine_memory> mem;
  std::map<std::uint64_t, std::uint64_t> digests;  // step -> digest
  int finished = 0;
  std::string error;
};

// Adds a random group's ranks (prefill TP x CP x PP, decode TP) to the nodes `place` picks,
// then runs every rank's scheduler loop on a thread of its own at a random pace until each
// finished `requests` requests, and checks that every rank of a group got the same round at
// every step it polled.
void run_groups(std::mt19937_64& rng, int ptp, int pcp, int ppp, int dtp,
                const std::function<kvflow::node&(bool prefill, int index)>& place) {
  const int layers = 2 * ppp;
  const int pages = 64, request_pages = 5, requests = 6;
  const std::uint64_t page_bytes = 16 * 64;
  std::vector<rank_run> ranks;
  int index = 0;
  for (int pp = 0; pp < ppp; ++pp)
    for (int cp = 0; cp < pcp; ++cp)
      for (int tp = 0; tp < ptp; ++tp) {
        rank_run r{true, 0, nullptr, std::make_unique<engine_memory>(layers, pages, page_bytes, 8), {}, 0, {}};
        r.mem->desc.layer_begin = pp * 2;
        r.mem->desc.layer_end = pp * 2 + 2;
        r.mem->desc.buffers.erase(r.mem->desc.buffers.begin(), r.mem->desc.buffers.begin() + pp * 2);
        r.mem->desc.buffers.erase(r.mem->desc.buffers.begin() + 2, r.mem->desc.buffers.end() - 1);
        auto a = place(true, index++).add_prefill({tp, cp, pp, 0}, r.mem->desc);
        REQUIRE_MESSAGE(a, a.err().message());
        r.api = a.value();
        ranks.push_back(std::move(r));
      }
  index = 0;
  for (int tp = 0; tp < dtp; ++tp) {
    rank_run r{false, 1, nullptr, std::make_unique<engine_memory>(layers, pages, page_bytes, 8), {}, 0, {}};
    auto a = place(false, index++).add_decode({tp, 0, 0, 0}, r.mem->desc);
    REQUIRE_MESSAGE(a, a.err().message());
    r.api = a.value();
    ranks.push_back(std::move(r));
  }
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < ranks.size(); ++i)
    threads.emplace_back([&, i, seed = rng()] {
      auto& me = ranks[i];
      std::mt19937_64 pace(seed);
      auto* pre = me.prefill ? static_cast<kvflow::prefill_rank*>(me.api.get()) : nullptr;
      auto* dec = me.prefill ? nullptr : static_cast<kvflow::decode_rank*>(me.api.get());
      std::map<std::uint64_t, bool> started;  // room -> init / destinations done
      const auto until = std::chrono::steady_clock::now() + 20s;
      for (std::uint64_t k = 1; me.finished < requests && std::chrono::steady_clock::now() < until;) {
        // Requests enter at fixed steps on every rank (the same batch).
        if (k % 3 == 1 && static_cast<int>(k / 3) < requests) {
          kvflow::request_id id{100 + k / 3, 1};
          auto e = pre ? pre->create(id, 0) : dec->create(id, 0);
          if (e) me.error = e.message();
        }
        auto v = me.api->poll(k, 200ms);
        if (!v) {
          if (v.err().code() == kvflow::errc::timeout) continue;  // the same step again
          me.error = v.err().message();
          break;
        }
        me.digests[k] = digest(v.value());
        for (const auto& r : v.value()) {
          if (r.state == kvflow::poll_state::waiting_for_input && !started[r.id.room]) {
            started[r.id.room] = true;
            std::vector<std::int32_t> pg;
            for (int p = 0; p < request_pages; ++p) pg.push_back(static_cast<int>(r.id.room % 8) * 6 + p);
            if (pre) {
              auto prefix = pre->decode_prefix_pages(r.id);
              if (auto e = pre->init(r.id, request_pages - (prefix ? prefix.value() : 0), 0)) me.error = e.message();
              if (auto e = pre->send(r.id, pg, true)) me.error = e.message();
            } else if (auto e = dec->send_destinations(r.id, pg, static_cast<int>(r.id.room % 8))) {
              me.error = e.message();
            }
          }
          if ((r.state == kvflow::poll_state::success || r.state == kvflow::poll_state::failed) && r.released &&
              started.count(r.id.room) && started[r.id.room]) {
            started[r.id.room] = false;
            started.erase(r.id.room);
            ++me.finished;
          }
        }
        ++k;
        std::this_thread::sleep_for(std::chrono::microseconds(pace() % 400));
      }
    });
  for (auto& t : threads) t.join();
  // Identical rounds within each group; every request finished on every rank.
  for (const auto& r : ranks) {
    CHECK_MESSAGE(r.error.empty(), r.error);
    CHECK(r.finished == requests);
  }
  for (const auto& a : ranks)
    for (const auto& b : ranks) {
      if (&a == &b || a.group_key != b.group_key) continue;
      std::size_t compared = 0;
      for (const auto& [k, d] : a.digests) {
        auto it = b.digests.find(k);
        if (it == b.digests.end()) continue;
        ++compared;
        if (it->second != d) {
          FAIL_CHECK("ranks " << a.api->global_rank() << " and " << b.api->global_rank() << " got different rounds at step " << k);
          break;
        }
      }
      CHECK(compared > 10);
    }
}

}  // namespace

TEST_CASE("api: poll(k) is the same record on every rank of a group, for every k (random topologies and paces)") {
  std::mt19937_64 rng(20261201);
  const int cases = 6;
  for (int c = 0; c < cases; ++c) {
    const int ptp = 1 << (rng() % 2), pcp = 1 + static_cast<int>(rng() % 3), ppp = 1 + static_cast<int>(rng() % 2);
    const int dtp = 1 << (rng() % 2);
    auto top = small(ptp, pcp, ppp, dtp);
    top.model = "mla:" + std::to_string(2 * ppp) + ":64";
    CAPTURE(ptp);
    CAPTURE(pcp);
    CAPTURE(ppp);
    CAPTURE(dtp);
    // In one process a group agrees through a segment of shared memory (1), or through the tree
    // of supervisors (2): both paths, alternately.
    const char* via = c % 2 == 0 ? "1" : "2";
    CAPTURE(via);
    kvflow::node_options o;
    o.tunables = {{"KVFLOW_BOOTSTRAP_TIMEOUT_MS", "5000"},
                  {"KVFLOW_WAITING_TIMEOUT_MS", "5000"},
                  {"KVFLOW_AGREEMENT_VIA", via}};
    auto started = kvflow::node::start(top, o);
    REQUIRE(started);
    auto node = started.value();
    run_groups(rng, ptp, pcp, ppp, dtp, [&](bool, int) -> kvflow::node& { return *node; });
    node->stop();
  }
}

// The same property with each rank on one of three networked nodes (an actor system each, linked
// over loopback TCP, KV over UCX): the ranks of the leader's host agree through its group's
// shared-memory segment, a node told KVFLOW_AGREEMENT_VIA=2 reports by message to the same merge,
// and a group whose leader sits on such a node agrees through the tree of supervisors.
TEST_CASE("api: poll(k) is the same record on every rank across networked nodes: shared memory, messages, and both") {
  std::mt19937_64 rng(20261202);
  const int cases = 4;
  for (int c = 0; c < cases; ++c) {
    const int ptp = 1 << (rng() % 2), pcp = 1 + static_cast<int>(rng() % 3), ppp = 1 + static_cast<int>(rng() % 2);
    const int dtp = 1 + static_cast<int>(rng() % 2);
    auto top = small(ptp, pcp, ppp, dtp);
    top.model = "mla:" + std::to_string(2 * ppp) + ":64";
    const int messages_node = static_cast<int>(rng() % 3);  // this node's ranks post by message
    CAPTURE(c);
    CAPTURE(ptp);
    CAPTURE(pcp);
    CAPTURE(ppp);
    CAPTURE(dtp);
    CAPTURE(messages_node);
    std::vector<std::shared_ptr<kvflow::node>> nodes;
    for (int i = 0; i < 3; ++i) {
      kvflow::node_options o;
      o.transport = "ucx";
      o.tunables = {{"KVFLOW_BOOTSTRAP_TIMEOUT_MS", "5000"},
                    {"KVFLOW_WAITING_TIMEOUT_MS", "5000"},
                    {"KVFLOW_AGREEMENT_VIA", i == messages_node ? "2" : "1"}};
      if (i == 0)
        o.listen = "127.0.0.1:0";
      else
        o.bootstrap = nodes[0]->address();
      auto started = kvflow::node::start(top, o);
      REQUIRE_MESSAGE(started, started.err().message());
      nodes.push_back(started.value());
    }
    std::vector<int> where;  // node of each rank, prefill then decode
    run_groups(rng, ptp, pcp, ppp, dtp, [&](bool prefill, int index) -> kvflow::node& {
      (void)prefill;
      (void)index;
      where.push_back(static_cast<int>(rng() % 3));
      return *nodes[where.back()];
    });
    for (int i = 2; i >= 0; --i) nodes[i]->stop();
  }
}

namespace {

// The joining node's row of the registry's node table, as a launcher reads it.
std::optional<kvflow::msg::node_entry> table_row(kvflow::node& host, const std::string& name) {
  auto& n = kvflow::runtime::internals(host);
  caf::scoped_actor self{n.system()};
  std::optional<kvflow::msg::node_entry> out;
  self->request(n.registry, 2s, kvflow::msg::node_query{})
      .receive(
          [&](kvflow::msg::node_table& t) {
            for (auto& e : t.nodes)
              if (e.name == name) out = e;
          },
          [](caf::error&) {});
  return out;
}

}  // namespace

TEST_CASE("api: a node's engine announced before it meshed does not mark it unmeshed after it did") {
  // A rank process sets its engine once, right after its rank: that registration can be queued
  // behind the keeper's tick that registers the node meshed. Forwarded as it was made, it set the
  // row back to unmeshed for good, and `kvflow launch` waited for that node until its timeout
  // ("prefill 4 not meshed", once in some 90 loaded launches).
  auto top = small(1, 1, 1, 1);
  kvflow::node_options o;
  o.transport = "ucx";
  o.listen = "127.0.0.1:0";
  auto host = kvflow::node::start(top, o);
  REQUIRE_MESSAGE(host, host.err().message());
  kvflow::node_options j;
  j.transport = "ucx";
  j.bootstrap = host.value()->address();
  kvflow::runtime::internal_options in;
  in.node_name = "joiner";
  auto joiner = kvflow::runtime::start_node(top, j, in);
  REQUIRE_MESSAGE(joiner, joiner.err().message());
  auto& sys = kvflow::runtime::internals(*joiner.value()).system();
  auto engine = sys.spawn([]() -> caf::behavior { return {[](int) {}}; });
  // The registration as set_node_engine made it before the node meshed.
  kvflow::msg::register_node stale;
  {
    auto row = table_row(*host.value(), "joiner");
    REQUIRE(row);
    stale = {kvflow::msg::wire_version, row->name, row->host, row->port, false, engine};
  }
  const auto until = std::chrono::steady_clock::now() + 10s;
  while (std::chrono::steady_clock::now() < until) {
    auto row = table_row(*host.value(), "joiner");
    if (row && row->meshed) break;
    std::this_thread::sleep_for(20ms);
  }
  REQUIRE(table_row(*host.value(), "joiner")->meshed);
  caf::anon_send(kvflow::runtime::node_keeper(*joiner.value()), stale);
  std::this_thread::sleep_for(300ms);
  auto row = table_row(*host.value(), "joiner");
  REQUIRE(row);
  CHECK(row->meshed);
  caf::anon_send_exit(engine, caf::exit_reason::user_shutdown);
  joiner.value()->stop();
  host.value()->stop();
}

namespace {

// A transport double that holds every push until the test lets it go, then copies for real.
class held_transport final : public kvflow::transport::transport {
 public:
  explicit held_transport(std::shared_ptr<kvflow::transport::inproc_fabric> f) : real_(std::move(f)) {}
  const char* name() const override { return "held"; }
  std::string endpoint() const override { return {}; }
  std::vector<kvflow::transport::memory_type> memory_types() const override { return real_.memory_types(); }
  kvflow::result<kvflow::transport::region_desc> register_memory(std::uint64_t o, void* b, std::uint64_t l) override {
    return real_.register_memory(o, b, l);
  }
  void deregister_memory(std::uint64_t r) override { real_.deregister_memory(r); }
  kvflow::status connect(std::uint64_t p, const std::string& e, const std::vector<kvflow::transport::region_desc>& r) override {
    return real_.connect(p, e, r);
  }
  void disconnect(std::uint64_t p) override { real_.disconnect(p); }
  void push(std::uint64_t peer, const std::vector<kvflow::transport::block>& blocks,
            kvflow::transport::completion done) override {
    std::lock_guard<std::mutex> g(mutex_);
    held_.push_back({peer, blocks, std::move(done)});
  }
  std::uint64_t bytes_moved() const override { return real_.bytes_moved(); }
  std::size_t held() {
    std::lock_guard<std::mutex> g(mutex_);
    return held_.size();
  }
  void let_go() {
    std::deque<pending> now;
    {
      std::lock_guard<std::mutex> g(mutex_);
      now.swap(held_);
    }
    for (auto& p : now) real_.push(p.peer, p.blocks, std::move(p.done));
  }

 private:
  struct pending {
    std::uint64_t peer;
    std::vector<kvflow::transport::block> blocks;
    kvflow::transport::completion done;
  };
  kvflow::transport::inproc_transport real_;
  std::mutex mutex_;
  std::deque<pending> held_;
};

// One prefill and one decode rank (tp 1) in `node`, over memory of 16 pages each.
// A node whose waiting and bootstrap timeouts (30 s) are far beyond what a test waits: an
// answer seen in time is the runtime's, not a timeout's.
std::shared_ptr<kvflow::node> patient_node(const kvflow::topology& t) {
  kvflow::node_options o;
  o.tunables = {{"KVFLOW_WAITING_TIMEOUT_MS", "30000"}, {"KVFLOW_BOOTSTRAP_TIMEOUT_MS", "30000"}};
  auto started = kvflow::node::start(t, o);
  REQUIRE(started);
  return started.value();
}

struct one_pair {
  engine_memory pm{4, 16, 16 * 64, 4}, dm{4, 16, 16 * 64, 4};
  std::shared_ptr<kvflow::prefill_rank> pre;
  std::shared_ptr<kvflow::decode_rank> dec;
  explicit one_pair(kvflow::node& node) {
    auto p = node.add_prefill({0, 0, 0, 0}, pm.desc);
    auto d = node.add_decode({0, 0, 0, 0}, dm.desc);
    REQUIRE(p);
    REQUIRE(d);
    pre = p.value();
    dec = d.value();
  }
};

}  // namespace

TEST_CASE("api: an aborted request's decode pages stay quarantined while a push into them is in flight") {
  auto transport = std::make_shared<held_transport>(std::make_shared<kvflow::transport::inproc_fabric>());
  kvflow::runtime::internal_options in;
  in.transport = transport;
  auto started = kvflow::runtime::start_node(small(1, 1, 1, 1), {}, in);
  REQUIRE(started);
  auto node = started.value();
  one_pair ranks(*node);
  auto& p = *ranks.pre;
  auto& d = *ranks.dec;
  const kvflow::request_id id{42, 1};
  REQUIRE_FALSE(p.create(id, 0));
  REQUIRE_FALSE(d.create(id, 0));
  std::uint64_t pk = 0, dk = 0;
  // Both schedulers step until the condition holds on the round they got (bounded).
  auto step_until = [&](auto pred) {
    for (int i = 0; i < 2000; ++i) {
      auto pv = p.poll(++pk, 100ms);
      auto dv = d.poll(++dk, 100ms);
      REQUIRE(pv);
      REQUIRE(dv);
      if (pred(pv.value(), dv.value())) return true;
    }
    return false;
  };
  auto state_in = [&](const kvflow::round_view& v) -> const kvflow::room_poll* { return v.find(id); };
  REQUIRE(step_until([&](auto&, auto& dv) {
    auto* r = state_in(dv);
    return r != nullptr && r->state == kvflow::poll_state::waiting_for_input;
  }));
  std::vector<std::int32_t> dst{3, 4, 9, 10};
  REQUIRE_FALSE(d.send_destinations(id, dst, 1));
  REQUIRE(step_until([&](auto& pv, auto&) {
    auto* r = state_in(pv);
    return r != nullptr && r->state == kvflow::poll_state::waiting_for_input;
  }));
  REQUIRE_FALSE(p.init(id, 4, 0));
  REQUIRE_FALSE(p.send(id, {0, 1, 2, 3}, true));
  // The push is now held in the transport; decode aborts the request.
  for (int i = 0; i < 200 && transport->held() == 0; ++i) std::this_thread::sleep_for(5ms);
  REQUIRE(transport->held() == 1);
  REQUIRE_FALSE(d.abort(id, "client went away"));
  REQUIRE(step_until([&](auto& pv, auto& dv) {
    auto* a = state_in(pv);
    auto* b = state_in(dv);
    return a != nullptr && b != nullptr && a->state == kvflow::poll_state::failed && b->state == kvflow::poll_state::failed;
  }));
  // Agreed Failed on both sides, but nothing released while the push may still write.
  for (int i = 0; i < 20; ++i) {
    auto pv = p.poll(++pk, 100ms);
    auto dv = d.poll(++dk, 100ms);
    REQUIRE(pv);
    REQUIRE(dv);
    auto* a = state_in(pv.value());
    auto* b = state_in(dv.value());
    REQUIRE(a != nullptr);
    REQUIRE(b != nullptr);
    CHECK_FALSE(a->released);
    CHECK_FALSE(b->released);
  }
  CHECK(d.stats().quarantined == 1);
  CHECK(d.failure_reason(id).find("client went away") != std::string::npos);
  transport->let_go();
  REQUIRE(step_until([&](auto& pv, auto& dv) {
    auto* a = state_in(pv);
    auto* b = state_in(dv);
    return a != nullptr && b != nullptr && a->released && b->released;
  }));
  CHECK(d.stats().quarantined == 0);
  // Released and then cleared: the room leaves the rounds; the reason stays available.
  REQUIRE(step_until([&](auto& pv, auto& dv) { return state_in(pv) == nullptr && state_in(dv) == nullptr; }));
  CHECK(d.failure_reason(id).find("client went away") != std::string::npos);
  CHECK(d.stats().live_requests == 0);
  CHECK(p.stats().live_requests == 0);
  node->stop();
  CHECK(p.poll(pk + 1).err().code() == kvflow::errc::unavailable);
}

TEST_CASE("api: the launcher's agreement check counts ranks that report different digests of one round") {
  kvflow::command::agreement_checker c;
  using kvflow::poll_state;
  auto round_of = [](const std::vector<kvflow::room_poll>& rooms) {
    kvflow::round_view v;
    v.round = 5;
    v.rooms = rooms.data();
    v.count = rooms.size();
    return v;
  };
  std::vector<kvflow::room_poll> a{{{7, 1}, poll_state::waiting_for_input, false}};
  std::vector<kvflow::room_poll> b{{{7, 1}, poll_state::transferring, false}};
  c.on_digest(0, 5, kvflow::command::round_digest(round_of(a)));
  c.on_round(0, round_of(a));
  CHECK(c.violations() == 0);
  c.on_digest(0, 5, kvflow::command::round_digest(round_of(b)));
  CHECK(c.violations() == 1);
  // The released flag is part of the record.
  std::vector<kvflow::room_poll> r{{{7, 1}, poll_state::waiting_for_input, true}};
  CHECK(kvflow::command::round_digest(round_of(a)) != kvflow::command::round_digest(round_of(r)));
  CHECK(c.rounds_checked() == 1);
}

TEST_CASE("api: the agreement check forgets a round once every rank of its group reported it, and still catches a split") {
  // The one-hour soak's resident memory grew 11% from a quarter to the end: the checker kept
  // every (group, round) it had seen, 4.7 million of them.
  kvflow::command::agreement_checker c;
  c.add_rank(0);
  c.add_rank(0);
  c.add_rank(1);
  for (std::uint64_t k = 1; k <= 1000; ++k) {
    c.on_digest(0, k, k);
    c.on_digest(1, k, k);
    c.on_digest(0, k, k);
  }
  CHECK(c.rounds_checked() == 2000);
  CHECK(c.rounds_tracked() == 0);
  c.on_digest(0, 1001, 1);
  CHECK(c.rounds_tracked() == 1);
  c.on_digest(0, 1001, 2);
  CHECK(c.violations() == 1);
  CHECK(c.rounds_tracked() == 0);
  // A group never counted keeps what it saw, so a late report is still compared.
  c.on_digest(5, 1, 1);
  c.on_digest(5, 1, 1);
  c.on_digest(5, 1, 3);
  CHECK(c.violations() == 2);
  CHECK(c.rounds_tracked() == 1);
}

TEST_CASE("api: the agreement check counts a room whose agreed state goes back, or leaves a terminal state") {
  using kvflow::poll_state;
  auto feed = [](kvflow::command::agreement_checker& c, std::uint64_t round, poll_state s) {
    std::vector<kvflow::room_poll> rooms{{{7, 1}, s, false}};
    kvflow::round_view v;
    v.round = round;
    v.rooms = rooms.data();
    v.count = rooms.size();
    c.on_round(0, v);
  };
  kvflow::command::agreement_checker rising;
  feed(rising, 1, poll_state::bootstrapping);
  feed(rising, 2, poll_state::transferring);
  feed(rising, 3, poll_state::failed);  // Failed may come from any state
  feed(rising, 4, poll_state::failed);
  CHECK(rising.violations() == 0);
  CHECK(rising.rounds_checked() == 4);
  kvflow::command::agreement_checker back;
  feed(back, 1, poll_state::transferring);
  feed(back, 2, poll_state::waiting_for_input);
  CHECK(back.violations() == 1);
  kvflow::command::agreement_checker terminal;
  feed(terminal, 1, poll_state::success);
  feed(terminal, 2, poll_state::failed);
  CHECK(terminal.violations() == 1);
  CHECK(terminal.problems().at(0).find("Success then Failed") != std::string::npos);
}

TEST_CASE("api: destinations for a request the prefill side already failed are answered at once, not at a timeout") {
  // Failed and still held there (its group has not polled the release yet), or failed and
  // cleared already: either way the late destinations get the failure, with its reason.
  for (bool cleared : {false, true}) {
    CAPTURE(cleared);
    auto node = patient_node(small(1, 1, 1, 1));
    one_pair ranks(*node);
    auto& p = *ranks.pre;
    auto& d = *ranks.dec;
    const kvflow::request_id id{7, 1};
    // The prefill side fails the request before decode has even created it.
    REQUIRE_FALSE(p.create(id, 0));
    REQUIRE_FALSE(p.abort(id, "prefill gave up"));
    // The prefill rank has failed it (so its failure notice went out before decode had the room).
    for (int i = 0; i < 500 && p.failure_reason(id).empty(); ++i) std::this_thread::sleep_for(2ms);
    REQUIRE_FALSE(p.failure_reason(id).empty());
    std::uint64_t pk = 0, dk = 0;
    if (cleared) {
      for (int i = 0; i < 50; ++i) REQUIRE(p.poll(++pk, 20ms));
      CHECK(p.stats().live_requests == 0);
    }
    REQUIRE_FALSE(d.create(id, 0));
    // 400 steps of 5 to 25 ms, a scheduler's pace (a step that does not wait for anything can
    // take microseconds, and 400 of them ended before the answer came on a loaded machine):
    // well inside the 30 s timeouts, so a failure seen here is the prefill side's answer.
    bool sent = false, failed = false;
    for (int i = 0; i < 400 && !failed; ++i) {
      std::this_thread::sleep_for(5ms);
      auto dv = d.poll(++dk, 20ms);
      REQUIRE(dv);
      const auto* r = dv.value().find(id);
      if (r == nullptr) continue;
      if (r->state == kvflow::poll_state::waiting_for_input && !sent) {
        REQUIRE_FALSE(d.send_destinations(id, {0, 1}, 0));
        sent = true;
      }
      failed = r->state == kvflow::poll_state::failed;
    }
    CHECK(sent);
    REQUIRE(failed);
    CHECK(d.failure_reason(id).find("prefill gave up") != std::string::npos);
    node->stop();
  }
}

// One prefill rank and a decode group of two ranks (decode tp 2) in one node, with the given
// bootstrap timeout.
struct decode_pair {
  explicit decode_pair(const std::string& bootstrap_timeout_ms) {
    kvflow::node_options o;
    o.tunables = {{"KVFLOW_WAITING_TIMEOUT_MS", "30000"}, {"KVFLOW_BOOTSTRAP_TIMEOUT_MS", bootstrap_timeout_ms}};
    auto started = kvflow::node::start(small(1, 1, 1, 2), o);
    REQUIRE(started);
    node = started.value();
    auto p = node->add_prefill({0, 0, 0, 0}, pm.desc);
    auto a = node->add_decode({0, 0, 0, 0}, dm0.desc);
    auto b = node->add_decode({1, 0, 0, 0}, dm1.desc);
    REQUIRE(p);
    REQUIRE(a);
    REQUIRE(b);
    pre = p.value();
    d0 = a.value();
    d1 = b.value();
  }
  // Steps both decode ranks (a scheduler step each, `pause` apart) until `done` holds for what
  // decode rank `which` sees of `id`; false after 400 steps.
  template <class Done>
  bool step_until(int which, const kvflow::request_id& id, Done done, std::chrono::milliseconds pause) {
    for (int i = 0; i < 400; ++i) {
      ++step;
      auto v0 = d0->poll(step, 50ms);
      auto v1 = d1->poll(step, 50ms);
      REQUIRE(v0);
      REQUIRE(v1);
      if (const auto* r = (which == 0 ? v0 : v1).value().find(id); r != nullptr && done(*r)) return true;
      std::this_thread::sleep_for(pause);
    }
    return false;
  }
  engine_memory pm{4, 32, 16 * 64, 4}, dm0{4, 32, 16 * 64, 4}, dm1{4, 32, 16 * 64, 4};
  std::uint64_t step = 0;
  std::shared_ptr<kvflow::node> node;
  std::shared_ptr<kvflow::prefill_rank> pre;
  std::shared_ptr<kvflow::decode_rank> d0, d1;
};

TEST_CASE("regression: a request one rank of a group does not hold fails on the others within the bootstrap timeout") {
  // Found by the soak (a duplicate room that some ranks of a group refused while the others
  // took it): the merge counts a room a rank does not hold as Bootstrapping, so the ranks that
  // held it waited without end. Every rank bounds the time its group takes to agree past
  // Bootstrapping on a request.
  decode_pair g("600");
  auto& node = g.node;
  auto& d0 = g.d0;
  const kvflow::request_id id{9, 1};
  REQUIRE_FALSE(d0->create(id, 0));  // decode rank 1 never creates it
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(g.step_until(0, id, [](const auto& r) { return r.state == kvflow::poll_state::failed; }, 5ms));
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(took < 5);
  CHECK(d0->failure_reason(id).find("did not agree on the request within the bootstrap timeout") !=
        std::string::npos);
  node->stop();
}

TEST_CASE("regression: a create that comes after its group finished the request is refused, not left held alone") {
  // Seen under load in launch.kill_decode_early and the abort storm: one rank's engine created a
  // request only after the others had failed and released it (a room a rank does not hold
  // counts as released in the merge). That rank then acted on it a round after its group, and
  // its room was left in its store for good.
  decode_pair g("30000");
  auto& node = g.node;
  auto& d0 = g.d0;
  auto& d1 = g.d1;
  const kvflow::request_id id{12, 1};
  REQUIRE_FALSE(d0->create(id, 0));
  REQUIRE_FALSE(d0->abort(id, "client went away"));
  REQUIRE(g.step_until(
      1, id, [](const auto& r) { return r.state == kvflow::poll_state::failed && r.released; }, 2ms));
  auto late = d1->create(id, 0);
  REQUIRE(late);
  CHECK(late.message().find("already finished") != std::string::npos);
  // Worded as an echo of the group, so a report keeps the cause another rank gave over it
  // (command/outcome_reason.hpp; launch.kill_decode_early).
  CHECK(late.message().find("another rank of the group") != std::string::npos);
  // A new incarnation of the room is a new request.
  CHECK_FALSE(d1->create({12, 2}, 0));
  node->stop();
}

TEST_CASE("regression: a create that comes after its group failed the request, before it let go, fails at once") {
  // launch.kill_decode_early under load: one prefill rank failed a request at once (its decode
  // peer was down) while another rank of the group held it and a third had not created it yet.
  // The third rank's poll showed the failure first and its engine created the request after:
  // no later round tells it the request failed, so its room waited out the bootstrap timeout
  // (15 s there) and held the whole group's release with it.
  auto node = patient_node(small(1, 1, 1, 4));
  engine_memory pm{4, 32, 16 * 64, 4};
  std::vector<std::unique_ptr<engine_memory>> dm;
  std::vector<std::shared_ptr<kvflow::decode_rank>> d;
  auto p = node->add_prefill({0, 0, 0, 0}, pm.desc);
  REQUIRE(p);
  for (int t = 0; t < 4; ++t) {
    dm.push_back(std::make_unique<engine_memory>(4, 32, 16 * 64, 4));
    auto r = node->add_decode({t, 0, 0, 0}, dm.back()->desc);
    REQUIRE(r);
    d.push_back(r.value());
  }
  const kvflow::request_id id{21, 1};
  // Rank 1 holds the request (Bootstrapping: nothing comes from prefill) and rank 0 fails it;
  // ranks 2 and 3 create it only once their view shows it failed and not released yet.
  REQUIRE_FALSE(d[1]->create(id, 0));
  REQUIRE_FALSE(d[0]->create(id, 0));
  REQUIRE_FALSE(d[0]->abort(id, "client went away"));
  std::uint64_t step = 0;
  bool late_created = false, released = false;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 400 && !released; ++i) {
    ++step;
    for (int t = 0; t < 4; ++t) {
      auto v = d[t]->poll(step, 50ms);
      REQUIRE(v);
      const auto* r = v.value().find(id);
      if (t == 3 && r != nullptr && r->state == kvflow::poll_state::failed && !r->released && !late_created) {
        REQUIRE_FALSE(d[2]->create(id, 0));
        REQUIRE_FALSE(d[3]->create(id, 0));
        late_created = true;
      }
      if (t == 3 && r != nullptr && r->released) released = true;
    }
    std::this_thread::sleep_for(5ms);
  }
  REQUIRE(late_created);
  CHECK(released);
  // Well inside the 30 s bootstrap timeout: the late rooms failed at once.
  CHECK(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < 10);
  CHECK(d[2]->failure_reason(id).find("another rank of the decode group failed the room") != std::string::npos);
  node->stop();
}

TEST_CASE("regression: upstream 7: a create one side refuses as a duplicate fails the request on the other side at once") {
  // Two live requests of one room (n>1 sampling): the side whose engine refused the second
  // create must tell the other side, which otherwise waits out its bootstrap timeout for it
  // (seen in the upstream-7 simulation: the first request ended on prefill before the second's
  // destinations came, and they were kept there for a request that never would).
  auto run = [](bool refused_on_prefill) {
    auto node = patient_node(small(1, 1, 1, 1));
    one_pair ranks(*node);
    auto& p = *ranks.pre;
    auto& d = *ranks.dec;
    const kvflow::request_id first{31, 1}, second{31, 2};
    std::uint64_t pk = 0, dk = 0;
    if (refused_on_prefill) {
      REQUIRE_FALSE(p.create(first, 0));
      auto dup = p.create(second, 0);
      REQUIRE(dup);
      CHECK(dup.message().find("duplicate room") != std::string::npos);
      // The first request ends on prefill and is cleared before the second's destinations come.
      REQUIRE_FALSE(p.abort(first, "sample 1 done"));
      bool cleared = false;
      for (int i = 0; i < 400 && !cleared; ++i) {
        REQUIRE(p.poll(++pk, 20ms));
        cleared = p.stats().live_requests == 0;
        std::this_thread::sleep_for(2ms);
      }
      REQUIRE(cleared);
      REQUIRE_FALSE(d.create(second, 0));
    } else {
      REQUIRE_FALSE(d.create(first, 0));
      REQUIRE_FALSE(p.create(second, 0));
      auto dup = d.create(second, 0);
      REQUIRE(dup);
      CHECK(dup.message().find("duplicate room") != std::string::npos);
    }
    // 400 steps of about 5 ms: well inside the 30 s timeouts.
    bool sent = false, failed = false;
    for (int i = 0; i < 400 && !failed; ++i) {
      std::this_thread::sleep_for(5ms);
      auto dv = d.poll(++dk, 20ms);
      auto pv = p.poll(++pk, 20ms);
      REQUIRE(dv);
      REQUIRE(pv);
      if (refused_on_prefill) {
        const auto* r = dv.value().find(second);
        if (r != nullptr && r->state == kvflow::poll_state::waiting_for_input && !sent) {
          REQUIRE_FALSE(d.send_destinations(second, {0, 1}, 0));
          sent = true;
        }
        failed = r != nullptr && r->state == kvflow::poll_state::failed;
      } else {
        const auto* r = pv.value().find(second);
        failed = r != nullptr && r->state == kvflow::poll_state::failed;
      }
    }
    REQUIRE(failed);
    const auto why = refused_on_prefill ? d.failure_reason(second) : p.failure_reason(second);
    CHECK(why.find("duplicate room 31") != std::string::npos);
    if (refused_on_prefill) CHECK(sent);
    node->stop();
  };
  SUBCASE("refused on prefill") { run(true); }
  SUBCASE("refused on decode") { run(false); }
}

TEST_CASE("regression: a decode request that fails before its rank knows its prefill peers still aborts them") {
  // The decode rank joins first, so its topology (and with it its peers' handles) comes only
  // once the prefill rank registered. A request it fails meanwhile told nobody: the prefill
  // rank that later gets the request waited for its destinations until the bootstrap timeout.
  auto node = patient_node(small(1, 1, 1, 1));
  engine_memory pm{4, 16, 16 * 64, 4}, dm{4, 16, 16 * 64, 4};
  auto dec = node->add_decode({0, 0, 0, 0}, dm.desc);
  REQUIRE(dec);
  auto& d = *dec.value();
  const kvflow::request_id id{53, 1};
  REQUIRE_FALSE(d.create(id, 0));
  REQUIRE_FALSE(d.abort(id, "client went away"));
  std::uint64_t dk = 0, pk = 0;
  bool failed_here = false;
  for (int i = 0; i < 400 && !failed_here; ++i) {
    auto dv = d.poll(++dk, 20ms);
    REQUIRE(dv);
    const auto* r = dv.value().find(id);
    failed_here = r != nullptr && r->state == kvflow::poll_state::failed;
  }
  REQUIRE(failed_here);
  auto pre = node->add_prefill({0, 0, 0, 0}, pm.desc);
  REQUIRE(pre);
  auto& p = *pre.value();
  REQUIRE_FALSE(p.create(id, 0));
  // 400 steps of about 5 ms: well inside the 30 s timeouts.
  bool failed_there = false;
  for (int i = 0; i < 400 && !failed_there; ++i) {
    std::this_thread::sleep_for(5ms);
    REQUIRE(d.poll(++dk, 20ms));
    auto pv = p.poll(++pk, 20ms);
    REQUIRE(pv);
    const auto* r = pv.value().find(id);
    failed_there = r != nullptr && r->state == kvflow::poll_state::failed;
  }
  REQUIRE(failed_there);
  CHECK(p.failure_reason(id).find("client went away") != std::string::npos);
  node->stop();
}

TEST_CASE("api: GPU-only inputs on host memory are refused at the call, naming why") {
  kvflow::node_options o;
  auto started = kvflow::node::start(small(1, 1, 1, 1), o);
  REQUIRE(started);
  auto node = started.value();
  // A buffer declared CUDA memory that is not device memory: a transport would write it as such.
  engine_memory pm{4, 16, 16 * 64, 4};
  auto desc = pm.desc;
  desc.buffers[1].kind = kvflow::memory_kind::cuda;
  desc.buffers[1].device = 0;
  auto bad = node->add_prefill({0, 0, 0, 0}, desc);
  REQUIRE_FALSE(bad);
  CHECK(bad.err().message().find("buffer 1") != std::string::npos);
  // A ready fence on a rank whose KV is host memory: nothing on the GPU to order after.
  one_pair ranks(*node);
  const kvflow::request_id id{41, 1};
  REQUIRE_FALSE(ranks.pre->create(id, 0));
  auto e = ranks.pre->send(id, {0}, true, {}, 0x1000);
  REQUIRE(e);
  CHECK(e.code() == kvflow::errc::unsupported);
  CHECK(e.message().find("host memory") != std::string::npos);
  node->stop();
}
