// `kvflow bench transfer`: two processes, prefill pushing into decode's registered memory through
// kvflow's UCX transport: a block-size sweep and whole DeepSeek-V3.2 requests (with and without
// page-run coalescing). Anchor, same run: ucx_perftest -t ucp_put_bw at the same sizes.
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <thread>

#include "actors/block_plan.hpp"
#include "actors/rank_memory.hpp"
#include "runtime/api_internal.hpp"
#include "command/sim_memory.hpp"
#include "bench/bench.hpp"
#include "command/child_process.hpp"
#include "transport/ucx_transport.hpp"

namespace kvflow::bench {

using command::child_process;
using command::sim_memory;
using runtime::to_buffer_specs;
namespace {

using clock_type = std::chrono::steady_clock;
constexpr std::uint64_t MiB = 1 << 20;

// ---- a tiny length-prefixed pipe protocol between the two processes -----------------------
bool write_all(int fd, const void* p, std::size_t n) {
  auto* c = static_cast<const char*>(p);
  while (n > 0) {
    auto w = ::write(fd, c, n);
    if (w <= 0) return false;
    c += w;
    n -= static_cast<std::size_t>(w);
  }
  return true;
}
bool read_all(int fd, void* p, std::size_t n) {
  auto* c = static_cast<char*>(p);
  while (n > 0) {
    auto r = ::read(fd, c, n);
    if (r <= 0) return false;
    c += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}
bool put_u64(int fd, std::uint64_t v) { return write_all(fd, &v, sizeof v); }
std::uint64_t get_u64(int fd) {
  std::uint64_t v = 0;
  return read_all(fd, &v, sizeof v) ? v : ~std::uint64_t{0};
}
bool put_str(int fd, const std::string& s) { return put_u64(fd, s.size()) && write_all(fd, s.data(), s.size()); }
std::string get_str(int fd) {
  auto n = get_u64(fd);
  if (n > (1ull << 30)) return {};
  std::string s(n, '\0');
  return read_all(fd, s.data(), n) ? s : std::string{};
}

std::uint64_t fnv1a(const std::byte* p, std::uint64_t n) {
  std::uint64_t h = 1469598103934665603ull;
  for (std::uint64_t i = 0; i < n; ++i) h = (h ^ std::to_integer<std::uint64_t>(p[i])) * 1099511628211ull;
  return h;
}

// The DeepSeek-V3.2 request layout: one prefill rank to one decode rank, fp8, page 64.
config::cluster_config dsv32_pair() {
  config::cluster_config c;
  c.prefill = config::parse_prefill("tp=1");
  c.decode = config::parse_decode("tp=1");
  c.dtype = config::kv_dtype::fp8;
  c.model = config::parse_model("dsv32", c.dtype);
  c.page_size = 64;
  return c;
}

struct region_set {
  std::vector<transport::region_desc> descs;  // sweep buffer, then the pool's KV, aux, state
  std::vector<std::byte*> bases;
};

// Allocates (transport memory when offered, else own mapping) and registers `len` bytes.
struct registered {
  transport::region_desc desc;
  std::byte* base = nullptr;
  std::unique_ptr<cuda::host_memory> own;
};
result<registered> make_region(transport::transport& t, std::uint64_t len) {
  registered r;
  if (auto a = t.allocate_memory(2, len)) {
    r.desc = a.value().desc;
    r.base = a.value().base;
    return r;
  }
  r.own = std::make_unique<cuda::host_memory>(len);
  r.base = r.own->data();
  auto d = t.register_memory(2, r.base, len);
  if (!d) return d.error();
  r.desc = d.value();
  return r;
}

// Decode side: registers a sweep buffer and a decode pool, hands their description to the parent
// and answers checksum requests until told to stop.
int receiver(int in, int out, std::uint64_t sweep_bytes, int pool_pages) {
  auto made = transport::ucx_transport::create();
  if (!made) return 1;
  auto t = std::move(made.value());
  config::routing_plan plan(dsv32_pair());
  // The decode pool: every layer's KV pages one after another, one aux row, the state pages.
  const auto& model = plan.config().model;
  const std::uint64_t layers = std::uint64_t(model.layers), pages = std::uint64_t(pool_pages);
  const std::uint64_t kv = layers * pages * std::uint64_t(plan.decode_item_bytes());
  const std::uint64_t state = layers * pages * std::uint64_t(plan.config().page_size) * std::uint64_t(model.state_bytes_per_token);
  std::vector<registered> regions;
  for (auto len : {sweep_bytes, kv, std::uint64_t(64), state}) {
    auto r = make_region(*t, len);
    if (!r) {
      std::fprintf(stderr, "bench transfer: receiver: %s\n", r.error().reason().c_str());
      return 1;
    }
    std::memset(r.value().base, 0, len);  // resident before the clock starts, as a live pool is
    regions.push_back(std::move(r.value()));
  }
  put_str(out, t->endpoint());
  put_u64(out, regions.size());
  for (const auto& r : regions) {
    put_u64(out, r.desc.id);
    put_u64(out, r.desc.size);
    put_u64(out, r.desc.address);
    put_str(out, r.desc.remote_key);
  }
  for (;;) {
    auto cmd = get_u64(in);
    if (cmd != 1) break;  // 1: checksum(region index, offset, len); anything else: stop
    auto idx = get_u64(in), off = get_u64(in), len = get_u64(in);
    std::uint64_t h = idx < regions.size() && off + len <= regions[idx].desc.size ? fnv1a(regions[idx].base + off, len) : 0;
    put_u64(out, h);
  }
  for (auto& r : regions) t->deregister_memory(r.desc.id);
  return 0;
}

// Pushes with at most `window` pushes in flight; the wall time until all completed.
class pusher {
 public:
  explicit pusher(transport::transport& t) : t_(t) {}
  void push(const std::vector<transport::block>& blocks, int window) {
    std::unique_lock lk(m_);
    cv_.wait(lk, [&] { return inflight_ < window; });
    ++inflight_;
    lk.unlock();
    t_.push(1, blocks, [this](status s) {
      std::lock_guard g(m_);
      if (!s && error_.empty()) error_ = s.reason();
      --inflight_;
      cv_.notify_all();
    });
  }
  status drain() {
    std::unique_lock lk(m_);
    cv_.wait(lk, [&] { return inflight_ == 0; });
    return error_.empty() ? status{} : status::error(error_);
  }

 private:
  transport::transport& t_;
  std::mutex m_;
  std::condition_variable cv_;
  int inflight_ = 0;
  std::string error_;
};

std::string human(std::uint64_t b) {
  char buf[32];
  if (b >= MiB) std::snprintf(buf, sizeof buf, "%llu MiB", static_cast<unsigned long long>(b / MiB));
  else std::snprintf(buf, sizeof buf, "%llu KiB", static_cast<unsigned long long>(b / 1024));
  return buf;
}

}  // namespace

double perftest_gbps(std::uint64_t size, std::uint64_t iters, bool error_handling, int port, const char* memory) {
  std::vector<std::string> common{"-t", "ucp_put_bw", "-s", std::to_string(size), "-n", std::to_string(iters),
                                  "-p", std::to_string(port)};
  if (error_handling) common.push_back("-e");
  if (memory != nullptr) {
    common.push_back("-m");
    common.push_back(memory);
  }
  // The ucx_perftest of the UCX kvflow is built against, with that UCX's libraries (the wheel's
  // binaries carry no RUNPATH to them).
  // The same lanes as kvflow's transport (transport/ucx_worker.cpp: no cma unless UCX_TLS is set).
  std::vector<std::pair<std::string, std::string>> env{{"LD_LIBRARY_PATH", KVFLOW_UCX_LIBDIR}};
  if (const char* tls = std::getenv("UCX_TLS"); tls == nullptr || *tls == '\0') env.emplace_back("UCX_TLS", "^cma");
  std::vector<std::string> srv{KVFLOW_UCX_PERFTEST};
  srv.insert(srv.end(), common.begin(), common.end());
  auto server = child_process::start(srv, env, true);
  if (!server) return 0;
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  std::vector<std::string> cli{KVFLOW_UCX_PERFTEST, "127.0.0.1"};
  cli.insert(cli.end(), common.begin(), common.end());
  auto client = child_process::start(cli, env, true);
  if (!client) return 0;
  double mbps = 0;
  for (;;) {
    auto line = client.value().read_line(std::chrono::seconds(60));
    if (!line) break;
    if (line.value().rfind("Final:", 0) == 0) {
      std::istringstream in(line.value().substr(6));
      double v[8] = {};
      for (auto& x : v) in >> x;
      mbps = v[5];  // iterations, latency typical/avg/overall, bandwidth avg, overall, ...
    }
  }
  (void)client.value().wait(std::chrono::seconds(10));
  server.value().stop(std::chrono::seconds(2));
  return mbps * double(MiB) / 1e9;
}

int run_bench_transfer(const transfer_flags& f) {
  std::uint64_t max_size = 0;
  for (auto s : f.sizes) max_size = std::max<std::uint64_t>(max_size, s);
  int max_tokens = 0;
  for (auto t : f.request_tokens) max_tokens = std::max(max_tokens, t);
  const std::uint64_t batch = 4 * MiB;  // bytes per push in the sweep (one chunk's worth)
  const int window = 8;
  const std::uint64_t sweep_bytes = std::max(max_size, batch) * window;
  const int pool_pages = std::max(1, (max_tokens + 63) / 64);

  int to_child[2], from_child[2];
  if (::pipe(to_child) != 0 || ::pipe(from_child) != 0) return 1;
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close(to_child[1]);
    ::close(from_child[0]);
    ::_exit(receiver(to_child[0], from_child[1], sweep_bytes, pool_pages));
  }
  ::close(to_child[0]);
  ::close(from_child[1]);
  const int cmd = to_child[1], rep = from_child[0];
  auto fail = [&](const std::string& why) {
    std::fprintf(stderr, "kvflow: bench transfer: %s\n", why.c_str());
    put_u64(cmd, 0);
    ::waitpid(pid, nullptr, 0);
    return 1;
  };

  auto made = transport::ucx_transport::create();
  if (!made) return fail("transport ucx: " + made.error().reason());
  auto t = std::move(made.value());
  std::string endpoint = get_str(rep);
  std::vector<transport::region_desc> regions(get_u64(rep));
  if (endpoint.empty() || regions.size() != 4) return fail("the receiver did not start");
  for (auto& r : regions) {
    r.id = get_u64(rep);
    r.size = get_u64(rep);
    r.address = get_u64(rep);
    r.remote_key = get_str(rep);
  }
  if (auto s = t->connect(1, endpoint, regions); !s) return fail(s.reason());

  // ---- block-size sweep ---------------------------------------------------------------------
  cuda::host_memory src(sweep_bytes);
  std::memset(src.data(), 0x5a, sweep_bytes);
  std::printf("bench transfer: kvflow UCX push (prefill process -> decode process) vs ucx_perftest ucp_put_bw\n"
              "same: every put from one source buffer to one destination address, as ucx_perftest does "
              "(small blocks stay in cache); stream: blocks spread over %llu MiB on both sides, as a pool's pages are\n",
              static_cast<unsigned long long>(sweep_bytes / MiB));
  std::printf("%10s %12s %14s %8s %13s %17s\n", "block", "same GB/s", "perftest GB/s", "ratio", "stream GB/s",
              "perftest -e GB/s");
  // Touch the whole destination once: the first streaming size would otherwise pay the
  // receiver's first-touch page faults (1.5 GB/s instead of 7 at 16 KiB).
  {
    pusher p(*t);
    for (std::uint64_t off = 0; off < sweep_bytes; off += batch)
      p.push({{src.data() + off, regions[0].id, off, std::min(batch, sweep_bytes - off)}}, window);
    if (auto s = p.drain(); !s) return fail("warm-up: " + s.reason());
  }
  double put64 = 0;
  for (auto size : f.sizes) {
    const std::uint64_t per_push = std::max<std::uint64_t>(1, batch / size);
    const std::uint64_t pushes = std::max<std::uint64_t>(window * 2, f.bytes_per_size / (per_push * size));
    auto measure = [&](bool stream) -> result<double> {
      pusher p(*t);
      std::uint64_t slot = 0;
      auto make_blocks = [&] {
        std::vector<transport::block> b;
        for (std::uint64_t i = 0; i < per_push; ++i, ++slot) {
          std::uint64_t off = stream ? (slot % (sweep_bytes / size)) * size : 0;
          b.push_back({src.data() + off, regions[0].id, off, size});
        }
        return b;
      };
      for (int w = 0; w < window; ++w) p.push(make_blocks(), window);  // warm-up: connection, rkeys
      if (auto s = p.drain(); !s) return s;
      auto t0 = clock_type::now();
      for (std::uint64_t i = 0; i < pushes; ++i) p.push(make_blocks(), window);
      if (auto s = p.drain(); !s) return s;
      double secs = std::chrono::duration<double>(clock_type::now() - t0).count();
      return double(pushes * per_push * size) / 1e9 / secs;
    };
    auto same = measure(false);
    if (!same) return fail(same.error().reason());
    auto stream = measure(true);
    if (!stream) return fail(stream.error().reason());
    std::uint64_t iters = std::max<std::uint64_t>(50, std::min<std::uint64_t>(100000, f.bytes_per_size / size));
    double pt = f.perftest ? perftest_gbps(size, iters, false, 13571, nullptr) : 0;
    double pte = f.perftest ? perftest_gbps(size, std::max<std::uint64_t>(10, iters / 20), true, 13573, nullptr) : 0;
    if (size == 64 * MiB) put64 = pt;
    std::printf("%10s %12.2f %14.2f %7.0f%% %13.2f %17.2f\n", human(size).c_str(), same.value(), pt,
                pt > 0 ? 100 * same.value() / pt : 0, stream.value(), pte);
    std::fflush(stdout);
  }
  if (put64 == 0 && f.perftest) put64 = perftest_gbps(64 * MiB, 200, false, 13575, nullptr);

  // ---- whole requests ----------------------------------------------------------------------
  config::routing_plan plan(dsv32_pair());
  const auto& cfg = plan.config();
  std::printf("\nDeepSeek-V3.2 requests (fp8, page 64, 61 layers, latent KV + indexer cache), one chunk push per 1024 tokens;"
              " anchor: ucx_perftest put_bw at 64 MiB = %.2f GB/s\n", put64);
  std::printf("%8s %10s %9s %10s %12s %10s %9s\n", "tokens", "coalesce", "blocks", "GB", "kvflow GB/s", "of 64MiB", "verified");
  for (int tokens : f.request_tokens) {
    const int n = (tokens + 63) / 64;
    // The prefill side as an engine holds it; the decode side as the child process allocated it
    // (one region per kind, layers one after another).
    sim_memory engine_memory(plan, true, 0, n, 1);
    auto specs = to_buffer_specs(engine_memory.desc());
    if (!specs) return fail(specs.err().message());
    auto made_pool = rank_memory::create(plan, true, 0, plan.prefill(0).layers, specs.value());
    if (!made_pool) return fail(made_pool.error().reason());
    const auto& pool = made_pool.value();
    for (int l = 0; l < cfg.model.layers; ++l) {
      auto* base = pool.item(l, 0, 0);
      const auto len = std::uint64_t(n) * std::uint64_t(pool.item_bytes());
      for (std::uint64_t i = 0; i < len; ++i) base[i] = static_cast<std::byte>((i + std::uint64_t(l) * len) * 131 + 7);
      auto* sb = pool.state_item(l, 0);
      const auto slen = std::uint64_t(n) * std::uint64_t(pool.state_item_bytes());
      for (std::uint64_t i = 0; i < slen; ++i) sb[i] = static_cast<std::byte>(i * 17 + 3);
    }
    const std::uint64_t item = std::uint64_t(plan.decode_item_bytes());
    const std::uint64_t state_item = std::uint64_t(pool.state_item_bytes());
    remote_pool remote;
    remote.layer_begin = 0;
    remote.layer_count = cfg.model.layers;
    remote.pages = pool_pages;
    remote.item_bytes = plan.decode_item_bytes();
    remote.page_size = cfg.page_size;
    remote.state_pages = pool_pages;
    remote.state_item_bytes = pool.state_item_bytes();
    for (int l = 0; l < cfg.model.layers; ++l) {
      const std::uint64_t per = std::uint64_t(pool_pages) * item, sper = std::uint64_t(pool_pages) * state_item;
      remote.kv.push_back({regions[1].id, std::uint64_t(l) * per, per, item});
      remote.state.push_back({regions[3].id, std::uint64_t(l) * sper, sper, state_item});
    }
    auto decode_offset = [&](int layer) { return std::uint64_t(layer) * std::uint64_t(pool_pages) * item; };
    for (bool coalesce : {true, false}) {
      std::vector<std::vector<transport::block>> chunks;
      std::uint64_t bytes = 0, blocks = 0;
      for (int b = 0; b < n; b += 16) {
        std::vector<std::int32_t> pages;
        for (int p = b; p < std::min(n, b + 16); ++p) pages.push_back(p);
        block_request br{&pages, &pages, plan.prefill(0).layers, {}, true, coalesce};
        auto planned = plan_blocks(pool, remote, br);
        if (!planned) return fail(planned.error().reason());
        auto state = plan_state_blocks(pool, remote, pages, pages, plan.prefill(0).layers, coalesce);
        if (!state) return fail(state.error().reason());
        planned.value().insert(planned.value().end(), state.value().begin(), state.value().end());
        for (const auto& bl : planned.value()) bytes += bl.len;
        blocks += planned.value().size();
        chunks.push_back(std::move(planned.value()));
      }
      double best = 0;
      for (int rep_i = 0; rep_i < 3; ++rep_i) {
        pusher p(*t);
        auto t0 = clock_type::now();
        for (const auto& c : chunks) p.push(c, 1 << 30);
        if (auto s = p.drain(); !s) return fail(s.reason());
        best = std::max(best, double(bytes) / 1e9 / std::chrono::duration<double>(clock_type::now() - t0).count());
      }
      // What landed: the decode pool's first n pages of every layer equal the prefill pool's.
      bool ok = true;
      for (int l = 0; l < cfg.model.layers && ok; ++l) {
        auto len = std::uint64_t(n) * std::uint64_t(pool.item_bytes());
        put_u64(cmd, 1);
        put_u64(cmd, 1);
        put_u64(cmd, decode_offset(l));
        put_u64(cmd, len);
        ok = get_u64(rep) == fnv1a(pool.item(l, 0, 0), len);
      }
      std::printf("%8d %10s %9llu %10.3f %12.2f %9.0f%% %9s\n", tokens, coalesce ? "yes" : "no",
                  static_cast<unsigned long long>(blocks), double(bytes) / 1e9, best, put64 > 0 ? 100 * best / put64 : 0,
                  ok ? "yes" : "NO");
      std::fflush(stdout);
      if (!ok) return fail("bytes of the " + std::to_string(tokens) + "-token request did not land");
    }
  }
  put_u64(cmd, 0);
  int st = 0;
  ::waitpid(pid, &st, 0);
  return 0;
}

}  // namespace kvflow::bench
