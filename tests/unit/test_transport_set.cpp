// transport/transport_set.hpp: each region goes through the first member that can write its
// memory and reach the peer; a push is split by member and completes once; a fence is honoured or
// refused, never ignored for GPU memory. The members are in-process transports under other names,
// memory types and reach, so the set's own choices are what is tested.
#include <doctest/doctest.h>

#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "transport/inproc_transport.hpp"
#include "transport/transport_set.hpp"

using namespace kvflow;
using kvflow::transport::block;
using kvflow::transport::capabilities;
using kvflow::transport::completion;
using kvflow::transport::inproc_fabric;
using kvflow::transport::inproc_transport;
using kvflow::transport::memory_probe;
using kvflow::transport::memory_type;
using kvflow::transport::region_desc;
using kvflow::transport::transport_set;
using transport_if = kvflow::transport::transport;

namespace {

// An in-process transport that says it is another one: its name, the memory it moves, which
// endpoints it reaches ("host:<id>" on the same host) and whether it orders after a fence. It
// records the fences and the pushes it was given.
class labelled final : public transport_if {
 public:
  labelled(std::string name, std::vector<memory_type> types, std::string host, bool gpu_ordered,
           std::shared_ptr<inproc_fabric> fabric)
      : name_(std::move(name)), types_(std::move(types)), host_(std::move(host)), ordered_(gpu_ordered),
        inner_(std::move(fabric)) {}
  const char* name() const override { return name_.c_str(); }
  std::string endpoint() const override { return "host:" + host_; }
  std::vector<memory_type> memory_types() const override { return types_; }
  capabilities query() const override { return {types_, host_.empty(), ordered_}; }
  // A member with a host reaches only that host; one without reaches every host.
  bool can_connect(const std::string& e) const override { return host_.empty() || e == "host:" + host_; }
  result<region_desc> register_memory(std::uint64_t owner, void* base, std::uint64_t len) override {
    return inner_.register_memory(owner, base, len);
  }
  void deregister_memory(std::uint64_t region) override { inner_.deregister_memory(region); }
  status connect(std::uint64_t peer, const std::string& e, const std::vector<region_desc>& r) override {
    ++connects;
    return inner_.connect(peer, e, r);
  }
  void disconnect(std::uint64_t peer) override {
    ++disconnects;
    inner_.disconnect(peer);
  }
  void push(std::uint64_t peer, const std::vector<block>& blocks, completion done) override {
    ++pushes;
    blocks_seen += blocks.size();
    inner_.push(peer, blocks, std::move(done));
  }
  void push_after(std::uintptr_t fence, std::uint64_t peer, const std::vector<block>& blocks,
                  completion done) override {
    if (!ordered_) return transport_if::push_after(fence, peer, blocks, std::move(done));
    fences.push_back(fence);
    push(peer, blocks, std::move(done));
  }
  std::uint64_t bytes_moved() const override { return inner_.bytes_moved(); }
  // It learns to order after a fence (as UCX does once the node drives a GPU).
  void set_ordered(bool ordered) { ordered_ = ordered; }

  int connects = 0, disconnects = 0, pushes = 0;
  std::size_t blocks_seen = 0;
  std::vector<std::uintptr_t> fences;

 private:
  std::string name_;
  std::vector<memory_type> types_;
  std::string host_;
  bool ordered_;
  inproc_transport inner_;
};

// Buffers the probe calls GPU memory (host memory in truth, so the in-process copy works).
struct fake_gpu {
  std::map<const std::byte*, std::size_t> ranges;
  memory_probe probe() {
    return [this](const void* p) {
      const auto* b = static_cast<const std::byte*>(p);
      for (const auto& [base, len] : ranges)
        if (b >= base && b < base + len) return memory_type::cuda;
      return memory_type::host;
    };
  }
};

// One process's side: a CUDA-IPC-like member (GPU memory, this host only, GPU-ordered) preferred
// over a UCX-like one (host memory, every host), over fabrics both sides share.
struct side {
  std::shared_ptr<labelled> gpu, net;
  std::unique_ptr<transport_set> set;
  side(const std::string& host, fake_gpu& g, std::shared_ptr<inproc_fabric> gf, std::shared_ptr<inproc_fabric> nf,
       bool with_gpu = true) {
    gpu = std::make_shared<labelled>("cuda_ipc", std::vector<memory_type>{memory_type::cuda}, host, true, gf);
    net = std::make_shared<labelled>("ucx", std::vector<memory_type>{memory_type::host}, "", false, nf);
    std::vector<std::shared_ptr<transport_if>> members;
    if (with_gpu) members.push_back(gpu);
    members.push_back(net);
    set = std::make_unique<transport_set>(members, g.probe());
  }
};

struct pair_fixture {
  fake_gpu g;
  std::shared_ptr<inproc_fabric> gf = std::make_shared<inproc_fabric>(), nf = std::make_shared<inproc_fabric>();
  std::vector<std::byte> kv = std::vector<std::byte>(4096, std::byte{0});   // decode's "GPU" KV
  std::vector<std::byte> aux = std::vector<std::byte>(256, std::byte{0});   // decode's host aux
  std::vector<std::byte> src_kv = std::vector<std::byte>(4096, std::byte{0x5A});
  std::vector<std::byte> src_aux = std::vector<std::byte>(256, std::byte{0xA5});
  pair_fixture() {
    g.ranges[kv.data()] = kv.size();
    g.ranges[src_kv.data()] = src_kv.size();
  }
};

std::pair<status, int> push(transport_if& t, std::uintptr_t fence, std::uint64_t peer, const std::vector<block>& blocks) {
  status out = status::error("completion not called");
  int calls = 0;
  t.push_after(fence, peer, blocks, [&](status s) {
    out = std::move(s);
    ++calls;
  });
  return {out, calls};
}

constexpr std::uint64_t decode_id = 7;

// Both sides, decode's KV and aux registered with its set.
struct registered : pair_fixture {
  side d, p;
  region_desc kv_r, aux_r;
  explicit registered(const std::string& sender_host = "h1")
      : d("h1", g, gf, nf), p(sender_host, g, gf, nf) {
    auto a = d.set->register_memory(decode_id, kv.data(), kv.size());
    auto b = d.set->register_memory(decode_id, aux.data(), aux.size());
    REQUIRE(a);
    REQUIRE(b);
    kv_r = a.value();
    aux_r = b.value();
  }
  kvflow::status connect_both() { return p.set->connect(decode_id, d.set->endpoint(), {kv_r, aux_r}); }
};

}  // namespace

TEST_CASE("transport set: GPU memory registers with the GPU member only, host memory with the host one") {
  pair_fixture f;
  side d("h1", f.g, f.gf, f.nf);
  auto kv = d.set->register_memory(decode_id, f.kv.data(), f.kv.size());
  auto aux = d.set->register_memory(decode_id, f.aux.data(), f.aux.size());
  REQUIRE(kv);
  REQUIRE(aux);
  CHECK(kv->id != aux->id);
  CHECK(kv->address == reinterpret_cast<std::uintptr_t>(f.kv.data()));
  CHECK(kv->size == f.kv.size());
  // With no member that moves CUDA memory (one moves another kind), CUDA memory is refused,
  // naming its type. (A set of host members only never asks the probe: all is host memory.)
  side host_only("h1", f.g, f.gf, f.nf, false);
  host_only.set->add(std::make_shared<labelled>("rocm_ipc", std::vector<memory_type>{memory_type::rocm}, "h1", true, f.gf));
  auto refused = host_only.set->register_memory(decode_id, f.kv.data(), f.kv.size());
  REQUIRE_FALSE(refused);
  CHECK(refused.error().reason().find("cuda memory") != std::string::npos);
  CHECK(host_only.set->register_memory(decode_id, f.aux.data(), f.aux.size()));
}

TEST_CASE("transport set: a mixed push goes GPU KV through the GPU member and host aux through the other, once") {
  registered f;
  auto& p = f.p;
  const auto* kv = &f.kv_r;
  const auto* aux = &f.aux_r;
  REQUIRE(f.connect_both());
  CHECK(p.set->chosen(decode_id, kv->id) == "cuda_ipc");
  CHECK(p.set->chosen(decode_id, aux->id) == "ucx");
  const std::uintptr_t fence = 0x1234;
  auto [s, calls] = push(*p.set, fence, decode_id,
                         {{f.src_kv.data(), kv->id, 0, 1024}, {f.src_kv.data() + 2048, kv->id, 2048, 1024},
                          {f.src_aux.data(), aux->id, 64, 64}});
  CHECK(s.ok());
  CHECK(calls == 1);
  CHECK(p.gpu->pushes == 1);
  CHECK(p.gpu->blocks_seen == 2);
  CHECK(p.net->pushes == 1);
  CHECK(p.gpu->fences == std::vector<std::uintptr_t>{fence});  // the GPU part waits for the fence
  CHECK(f.kv[0] == std::byte{0x5A});
  CHECK(f.kv[2048 + 1023] == std::byte{0x5A});
  CHECK(f.kv[1024] == std::byte{0});
  CHECK(f.aux[64] == std::byte{0xA5});
  CHECK(f.aux[0] == std::byte{0});
  CHECK(p.set->bytes_moved() == 2048 + 64);
}

TEST_CASE("transport set: a peer's GPU memory on another host is refused at connect, naming the region") {
  registered f("h2");
  auto& d = f.d;
  auto& p = f.p;
  const auto* kv = &f.kv_r;
  const auto* aux = &f.aux_r;
  auto s = f.connect_both();
  REQUIRE_FALSE(s);
  CHECK(s.reason().find("region " + std::to_string(kv->id)) != std::string::npos);
  CHECK(s.reason().find("offers cuda_ipc") != std::string::npos);
  // Host memory alone reaches the other host.
  CHECK(p.set->connect(decode_id, d.set->endpoint(), {*aux}));
  CHECK(p.set->chosen(decode_id, aux->id) == "ucx");
}

TEST_CASE("transport set: a fence is refused for GPU memory through a member that cannot order after it") {
  // The sender's GPU KV goes to the peer's host memory: only the host member moves it, and it
  // cannot wait on the GPU. Without a fence the push goes; with one it is refused, nothing written.
  pair_fixture f;
  side d("h1", f.g, f.gf, f.nf), p("h1", f.g, f.gf, f.nf);
  auto aux = d.set->register_memory(decode_id, f.aux.data(), f.aux.size());
  REQUIRE(aux);
  REQUIRE(p.set->connect(decode_id, d.set->endpoint(), {aux.value()}));
  auto [refused, c1] = push(*p.set, 0x99, decode_id, {{f.src_kv.data(), aux->id, 0, 64}});
  CHECK_FALSE(refused.ok());
  CHECK(refused.reason().find("cannot order") != std::string::npos);
  CHECK(c1 == 1);
  CHECK(f.aux[0] == std::byte{0});
  // Host memory through it with a fence: the fence orders GPU work, host rows need none.
  auto [ok, c2] = push(*p.set, 0x99, decode_id, {{f.src_aux.data(), aux->id, 0, 64}});
  CHECK(ok.ok());
  CHECK(c2 == 1);
  auto [plain, c3] = push(*p.set, 0, decode_id, {{f.src_kv.data(), aux->id, 64, 64}});
  CHECK(plain.ok());
  CHECK(f.aux[64] == std::byte{0x5A});
}

TEST_CASE("transport set: a member that learns to order after a fence carries fenced GPU pushes once asked again") {
  pair_fixture f;
  side d("h1", f.g, f.gf, f.nf), p("h1", f.g, f.gf, f.nf);
  auto aux = d.set->register_memory(decode_id, f.aux.data(), f.aux.size());
  REQUIRE(aux);
  REQUIRE(p.set->connect(decode_id, d.set->endpoint(), {aux.value()}));
  const std::vector<block> kv_block{{f.src_kv.data(), aux->id, 0, 64}};
  p.net->set_ordered(true);
  // The set asked at add: still refused, nothing written.
  auto [before, c1] = push(*p.set, 0x99, decode_id, kv_block);
  CHECK_FALSE(before.ok());
  CHECK(c1 == 1);
  CHECK(f.aux[0] == std::byte{0});
  p.set->requery();
  CHECK(p.set->query().gpu_ordered);
  auto [after, c2] = push(*p.set, 0x99, decode_id, kv_block);
  CHECK_MESSAGE(after.ok(), after.reason());
  CHECK(c2 == 1);
  CHECK(f.aux[0] == std::byte{0x5A});
  REQUIRE(p.net->fences.size() == 1);
  CHECK(p.net->fences[0] == 0x99);  // through push_after, with the fence
}

TEST_CASE("transport set: bounds are the member's to check, a failed part fails the whole push once") {
  registered f;
  auto& p = f.p;
  const auto* kv = &f.kv_r;
  const auto* aux = &f.aux_r;
  REQUIRE(f.connect_both());
  auto [s, calls] = push(*p.set, 0, decode_id, {{f.src_kv.data(), kv->id, 0, 64}, {f.src_aux.data(), aux->id, 250, 64}});
  CHECK_FALSE(s.ok());
  CHECK(s.reason().find("exceeds region") != std::string::npos);
  CHECK(calls == 1);
  auto [u, c2] = push(*p.set, 0, decode_id, {{f.src_aux.data(), 999, 0, 8}});
  CHECK_FALSE(u.ok());
  CHECK(u.reason().find("region 999") != std::string::npos);
  CHECK(c2 == 1);
  auto [n, c3] = push(*p.set, 0, decode_id + 1, {{f.src_aux.data(), aux->id, 0, 8}});
  CHECK_FALSE(n.ok());
  CHECK(c3 == 1);
}

TEST_CASE("transport set: malformed endpoints and region keys are refused, not read past their end") {
  pair_fixture f;
  side d("h1", f.g, f.gf, f.nf), p("h1", f.g, f.gf, f.nf);
  auto aux = d.set->register_memory(decode_id, f.aux.data(), f.aux.size());
  REQUIRE(aux);
  const auto ep = d.set->endpoint();
  for (std::size_t cut = 0; cut < ep.size(); ++cut) CHECK_FALSE(p.set->connect(decode_id, ep.substr(0, cut), {aux.value()}));
  CHECK_FALSE(p.set->can_connect(ep.substr(0, ep.size() - 1)));
  for (std::size_t cut = 0; cut < aux->remote_key.size(); ++cut) {
    auto d2 = aux.value();
    d2.remote_key = d2.remote_key.substr(0, cut);
    CHECK_FALSE(p.set->connect(decode_id, ep, {d2}));
  }
  CHECK(p.set->connect(decode_id, ep, {aux.value()}));
}

TEST_CASE("transport set: reconnecting without a member's regions disconnects that member for the peer") {
  registered f;
  auto& d = f.d;
  auto& p = f.p;
  const auto* kv = &f.kv_r;
  const auto* aux = &f.aux_r;
  REQUIRE(f.connect_both());
  REQUIRE(p.set->connect(decode_id, d.set->endpoint(), {*aux}));
  CHECK(p.gpu->disconnects == 1);
  CHECK(p.set->chosen(decode_id, kv->id).empty());
  p.set->disconnect(decode_id);
  CHECK(p.net->disconnects == 1);
  auto [s, calls] = push(*p.set, 0, decode_id, {{f.src_aux.data(), aux->id, 0, 8}});
  CHECK_FALSE(s.ok());
  CHECK(calls == 1);
}
