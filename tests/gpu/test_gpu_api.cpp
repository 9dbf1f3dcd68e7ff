// The public API over GPU memory, as an engine drives it: KV buffers on the device (one per
// layer), aux rows in host memory, a forward pass that writes the pages late on its own stream and
// hands its CUDA event to send() as the ready fence. The node chooses CUDA IPC for the KV and its
// host transport for the aux rows; every byte is checked on the GPU.
#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "cuda/gpu.hpp"
#include "cuda/kernels.hpp"
#include "cuda/pattern_check.hpp"
#include "kvflow/kvflow.hpp"
#include "transport/staging_ring.hpp"

using namespace std::chrono_literals;

namespace {

constexpr int api_layers = 8;
constexpr std::uint64_t api_page_bytes = 64 * 656;  // DSv3.2: 64 tokens of 656 B
constexpr int api_pool_pages = 96;
constexpr int aux_rows = 8;
constexpr std::uint64_t aux_row_bytes = 64;

template <class T>
T ok_or_fail(kvflow::result<T> r) {
  REQUIRE_MESSAGE(r.ok(), r.error().reason());
  return std::move(r.value());
}

// One rank's memory as an engine holds it: a device buffer per layer, zeroed, and a host aux buffer.
// What went wrong making it is in `problem` (the decode child process has no doctest context).
struct gpu_memory {
  std::vector<kvflow::cuda::device_buffer> layers;
  std::vector<std::byte> aux = std::vector<std::byte>(aux_rows * aux_row_bytes);
  kvflow::memory_desc desc;
  std::string problem;
  gpu_memory() {
    auto s = kvflow::cuda::stream::create(0);
    if (!s) {
      problem = s.error().reason();
      return;
    }
    std::vector<std::byte> zero(api_pool_pages * api_page_bytes);
    desc.layer_begin = 0;
    desc.layer_end = api_layers;
    for (int l = 0; l < api_layers; ++l) {
      auto b = kvflow::cuda::device_buffer::create(0, zero.size());
      if (!b) {
        problem = b.error().reason();
        return;
      }
      layers.push_back(std::move(b.value()));
      if (auto c = kvflow::cuda::copy_async(layers.back().data(), zero.data(), zero.size(), s.value()); !c) problem = c.reason();
      kvflow::buffer_desc d{layers.back().data(), zero.size(), api_page_bytes, kvflow::buffer_role::mla_latent, l};
      d.kind = kvflow::memory_kind::cuda;
      d.device = 0;
      desc.buffers.push_back(d);
    }
    if (auto c = s.value().synchronize(); !c) problem = c.reason();
    desc.buffers.push_back({aux.data(), aux.size(), aux_row_bytes, kvflow::buffer_role::aux, -1});
  }
  // The pattern runs of a request's pages (layer-major logical offsets, as the fill numbers them).
  std::vector<kvflow::cuda::pattern_run> runs(const std::vector<std::int32_t>& pages) const {
    std::vector<kvflow::cuda::pattern_run> out;
    for (int l = 0; l < api_layers; ++l)
      for (std::size_t i = 0; i < pages.size(); ++i)
        out.push_back({reinterpret_cast<std::uint64_t>(layers[l].data()) + std::uint64_t(pages[i]) * api_page_bytes,
                       (std::uint64_t(l) * pages.size() + i) * api_page_bytes, api_page_bytes});
    return out;
  }
};

std::vector<std::int32_t> random_pages(int n, std::mt19937& rng) {
  std::vector<std::int32_t> all(api_pool_pages);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(n);
  return all;
}

kvflow::topology one_to_one() {
  kvflow::topology t;
  t.prefill = {1, 1, 1, 1};
  t.decode = {1, 1, 1};
  t.model = "mla:" + std::to_string(api_layers) + ":656";
  t.dtype = "fp8";
  t.page_size = 64;
  return t;
}

// Steps both ranks (the same step each) until `done` holds for what `which` rank sees of `id`.
template <class Done>
const kvflow::room_poll* step_until(kvflow::prefill_rank& p, kvflow::decode_rank& d, std::uint64_t& step, bool decode_side,
                                    const kvflow::request_id& id, Done done) {
  for (int i = 0; i < 2000; ++i) {
    ++step;
    auto pv = p.poll(step, 50ms);
    auto dv = d.poll(step, 50ms);
    REQUIRE(pv);
    REQUIRE(dv);
    const auto* r = (decode_side ? dv : pv).value().find(id);
    if (r != nullptr && done(*r)) return r;
    if (r != nullptr && r->state == kvflow::poll_state::failed) {
      FAIL_CHECK("failed: prefill says '" << p.failure_reason(id) << "', decode says '" << d.failure_reason(id) << "'");
      return nullptr;
    }
    std::this_thread::sleep_for(1ms);
  }
  return nullptr;
}

}  // namespace

TEST_CASE("gpu: the API moves GPU KV after the engine's ready fence, with the engine's event gone at once") {
  for (bool fenced : {true, false}) {
    CAPTURE(fenced);
    auto started = kvflow::node::start(one_to_one(), {});
    REQUIRE_MESSAGE(started, started.err().message());
    auto node = started.value();
    gpu_memory pm, dm;
    REQUIRE_MESSAGE(pm.problem.empty(), pm.problem);
    REQUIRE_MESSAGE(dm.problem.empty(), dm.problem);
    auto pa = node->add_prefill({0, 0, 0, 0}, pm.desc);
    REQUIRE_MESSAGE(pa, pa.err().message());
    auto da = node->add_decode({0, 0, 0, 0}, dm.desc);
    REQUIRE_MESSAGE(da, da.err().message());
    auto& p = *pa.value();
    auto& d = *da.value();
    std::mt19937 rng(fenced ? 5 : 6);
    const int pages = 48;
    const auto src = random_pages(pages, rng), dst = random_pages(pages, rng);
    const kvflow::request_id id{fenced ? 100u : 101u, 1};
    std::uint64_t step = 0;
    REQUIRE_FALSE(p.create(id, 0));
    REQUIRE_FALSE(d.create(id, 0));
    REQUIRE(step_until(p, d, step, true, id, [](const auto& r) { return r.state == kvflow::poll_state::waiting_for_input; }));
    REQUIRE_FALSE(d.send_destinations(id, dst, 3));
    REQUIRE(step_until(p, d, step, false, id, [](const auto& r) { return r.state == kvflow::poll_state::waiting_for_input; }));
    REQUIRE_FALSE(p.init(id, pages, 2));
    std::memset(pm.aux.data() + 2 * aux_row_bytes, 0x6B, aux_row_bytes);
    // The forward pass writes the KV after 200 ms of GPU time and records its event.
    auto forward = ok_or_fail(kvflow::cuda::stream::create(0));
    const std::uint64_t seed = fenced ? 91 : 92;
    auto keep = ok_or_fail(kvflow::cuda::fill_pattern(pm.runs(src), seed, 200'000'000, forward));
    {
      auto written = ok_or_fail(kvflow::cuda::event::create(0));
      REQUIRE(written.record(forward).ok());
      auto e = p.send(id, src, true, {}, fenced ? reinterpret_cast<std::uintptr_t>(written.handle()) : 0);
      REQUIRE_MESSAGE(!e, e.message());
    }  // the engine's event is destroyed here: the rank took the fence over at the call
    const auto* r = step_until(p, d, step, true, id, [](const auto& x) { return x.state == kvflow::poll_state::success || x.state == kvflow::poll_state::failed; });
    REQUIRE(r != nullptr);
    REQUIRE_MESSAGE(r->state == kvflow::poll_state::success, d.failure_reason(id));
    auto check = ok_or_fail(kvflow::cuda::stream::create(0));
    const auto wrong = ok_or_fail(kvflow::cuda::count_mismatches(dm.runs(dst), seed, check));
    if (fenced) {
      CHECK(wrong == 0);
      CHECK(dm.aux[3 * aux_row_bytes] == std::byte{0x6B});  // the host aux row went its own way
    } else {
      CHECK(wrong > 0);  // without the fence the push read the pages before the forward wrote them
    }
    REQUIRE(forward.synchronize().ok());
    node->stop();
  }
}

// The decode process of the next case: joins the prefill process's node at `bootstrap`, holds its
// KV on the GPU, receives request (room 200, incarnation 1) into pages drawn from `seed`, checks
// every byte on the GPU. Exit 0: the bytes and the aux row verified; else what failed.
// Whether this run asks for the staged path first (the CTest entry gpu.api_process_staged).
bool staged_first() {
  const char* v = std::getenv("KVFLOW_GPU_STAGED");
  return v != nullptr && std::string(v) == "2";
}

// Slots this process's staged ring gave back (its lanes' bells): how the test tells which path
// moved the KV. The node's staged transport is the process's first, so its ring is "...-0".
std::uint64_t staged_slots_returned() {
  auto ring = kvflow::transport::staging_ring::open("/kvflow-staged-" + std::to_string(::getpid()) + "-0");
  if (!ring) return 0;
  std::uint64_t n = 0;
  for (std::uint32_t l = 0; l < ring.value()->shape().lanes; ++l) n += ring.value()->bell(static_cast<int>(l)).load();
  return n;
}

int api_decode_child(const char* bootstrap, std::uint64_t seed) {
  kvflow::node_options o;
  o.transport = "ucx";
  o.bootstrap = bootstrap;
  o.read_environment = true;
  auto started = kvflow::node::start(one_to_one(), o);
  if (!started) {
    std::fprintf(stderr, "decode child: %s\n", started.err().message().c_str());
    return 2;
  }
  auto node = started.value();
  gpu_memory dm;
  if (!dm.problem.empty()) {
    std::fprintf(stderr, "decode child: %s\n", dm.problem.c_str());
    return 12;
  }
  auto da = node->add_decode({0, 0, 0, 0}, dm.desc);
  if (!da) {
    std::fprintf(stderr, "decode child: %s\n", da.err().message().c_str());
    return 3;
  }
  auto& d = *da.value();
  std::mt19937 rng(static_cast<unsigned>(seed));
  (void)random_pages(48, rng);  // the prefill side's source pages come first from the same seed
  const auto dst = random_pages(48, rng);
  const kvflow::request_id id{200, 1};
  if (d.create(id, 0)) return 4;
  bool sent = false;
  for (std::uint64_t step = 1; step < 20000; ++step) {
    auto v = d.poll(step, 50ms);
    if (!v) return 5;
    const auto* r = v.value().find(id);
    if (r != nullptr && r->state == kvflow::poll_state::waiting_for_input && !sent) {
      if (d.send_destinations(id, dst, 3)) return 6;
      sent = true;
    }
    if (r != nullptr && r->state == kvflow::poll_state::failed) {
      std::fprintf(stderr, "decode child: failed: %s\n", d.failure_reason(id).c_str());
      return 7;
    }
    if (r != nullptr && r->state == kvflow::poll_state::success) {
      auto s = kvflow::cuda::stream::create(0);
      if (!s) return 8;
      auto wrong = kvflow::cuda::count_mismatches(dm.runs(dst), seed, s.value());
      if (!wrong || wrong.value() != 0) {
        std::fprintf(stderr, "decode child: %llu bytes differ\n", wrong ? static_cast<unsigned long long>(wrong.value()) : 0ULL);
        return 9;
      }
      if (dm.aux[3 * aux_row_bytes] != std::byte{0x6B}) return 10;
      const auto returned = staged_slots_returned();
      if ((returned > 0) != staged_first()) {
        std::fprintf(stderr, "decode child: the staged ring gave back %llu slots; expected the %s path\n",
                     static_cast<unsigned long long>(returned), staged_first() ? "staged" : "CUDA IPC");
        return 13;
      }
      node->stop();
      return 0;
    }
    std::this_thread::sleep_for(1ms);
  }
  return 11;
}

// With KVFLOW_GPU_STAGED=2 the GPU KV goes through the staged ring instead (and the child checks so).
TEST_CASE("gpu: a decode engine in another process gets GPU KV by IPC and its aux row by UCX, via the API") {
  kvflow::node_options o;
  o.transport = "ucx";
  o.listen = "127.0.0.1:0";
  o.read_environment = true;
  auto started = kvflow::node::start(one_to_one(), o);
  REQUIRE_MESSAGE(started, started.err().message());
  auto node = started.value();
  const std::uint64_t seed = 93;
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // A fresh image: CUDA and CAF's threads do not survive fork, exec does.
    const std::string addr = node->address(), sd = std::to_string(seed);
    ::execl("/proc/self/exe", "/proc/self/exe", "--api-decode-child", addr.c_str(), sd.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  gpu_memory pm;
  REQUIRE_MESSAGE(pm.problem.empty(), pm.problem);
  auto pa = node->add_prefill({0, 0, 0, 0}, pm.desc);
  REQUIRE_MESSAGE(pa, pa.err().message());
  auto& p = *pa.value();
  std::mt19937 rng(static_cast<unsigned>(seed));
  const auto src = random_pages(48, rng);
  const kvflow::request_id id{200, 1};
  REQUIRE_FALSE(p.create(id, 0));
  auto forward = ok_or_fail(kvflow::cuda::stream::create(0));
  kvflow::cuda::device_buffer keep;
  bool sent = false;
  int wstatus = 0;
  pid_t done = 0;
  for (std::uint64_t step = 1; step < 20000 && done == 0; ++step) {
    auto v = p.poll(step, 50ms);
    REQUIRE(v);
    const auto* r = v.value().find(id);
    if (r != nullptr && r->state == kvflow::poll_state::waiting_for_input && !sent) {
      REQUIRE_FALSE(p.init(id, 48, 2));
      std::memset(pm.aux.data() + 2 * aux_row_bytes, 0x6B, aux_row_bytes);
      keep = ok_or_fail(kvflow::cuda::fill_pattern(pm.runs(src), seed, 100'000'000, forward));
      auto written = ok_or_fail(kvflow::cuda::event::create(0));
      REQUIRE(written.record(forward).ok());
      auto e = p.send(id, src, true, {}, reinterpret_cast<std::uintptr_t>(written.handle()));
      REQUIRE_MESSAGE(!e, e.message());
      sent = true;
    }
    if (r != nullptr && r->state == kvflow::poll_state::failed) FAIL("prefill: " << p.failure_reason(id));
    done = ::waitpid(pid, &wstatus, WNOHANG);
    std::this_thread::sleep_for(1ms);
  }
  if (done == 0) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &wstatus, 0);
    FAIL("the decode process did not finish");
  }
  CHECK(sent);
  REQUIRE(WIFEXITED(wstatus));
  CHECK(WEXITSTATUS(wstatus) == 0);
  REQUIRE(forward.synchronize().ok());
  node->stop();
}
