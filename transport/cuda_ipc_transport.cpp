#include "transport/cuda_ipc_transport.hpp"

#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "cuda/gpu.hpp"
#include "cuda/kernels.hpp"
#include "transport/byte_codec.hpp"
#include "transport/completion_pacer.hpp"
#include "transport/host_identity.hpp"

namespace kvflow::transport {

namespace {

constexpr char endpoint_tag[] = "kvflow-cudaipc-1";
constexpr char key_kind_ipc = 'I';
constexpr std::size_t key_bytes = 1 + cuda::ipc_handle_bytes + 8 + 4;

using codec::get;
using codec::put;

struct peer_endpoint {
  std::string boot;
  std::uint64_t pid = 0;
  std::int32_t device = -1;
};

result<peer_endpoint> unpack_endpoint(const std::string& e) {
  const std::size_t tag = sizeof endpoint_tag;  // with its terminating zero
  if (e.size() < tag || std::memcmp(e.data(), endpoint_tag, tag) != 0)
    return status::error("not a cuda_ipc endpoint");
  std::size_t at = tag;
  peer_endpoint p;
  if (!codec::get_string(e, at, p.boot, 64)) return status::error("cuda_ipc endpoint: bad host identity");
  if (!get(e, at, p.pid) || !get(e, at, p.device) || at != e.size())
    return status::error("cuda_ipc endpoint: truncated or trailing bytes");
  return p;
}

}  // namespace

struct cuda_ipc_transport::impl {
  struct local_region {
    std::uint64_t owner;
    std::byte* base;
    std::uint64_t len;
  };
  struct remote_region {
    std::byte* base;
    std::uint64_t size;
  };
  struct link {
    std::vector<std::shared_ptr<cuda::ipc_mapping>> mappings;  // kept open while pushes use them
    std::unordered_map<std::uint64_t, remote_region> regions;
  };
  // A pinned block list the kernels read in place, reused across pushes (no allocation in
  // steady state).
  struct staging {
    cuda::pinned_buffer host;
  };
  struct inflight {
    completion done;
    std::shared_ptr<link> l;
    std::unique_ptr<staging> st;
    cuda::event started;  // before the push's first kernel, on `stream` (timing)
    cuda::event ev;       // after its last kernel (blocking, timing)
    std::chrono::steady_clock::time_point launched;  // when its first kernel was queued
    std::uint64_t bytes = 0;
  };

  cuda_ipc_options options;
  std::string boot = boot_id();
  cuda::stream stream;

  std::mutex m;  // everything below, and the order of work queued on the stream
  std::uint64_t next_region = 1;
  std::unordered_map<std::uint64_t, local_region> regions;
  std::unordered_map<std::uint64_t, std::shared_ptr<link>> links;
  std::map<std::string, std::weak_ptr<cuda::ipc_mapping>> opened;  // by handle: one open per allocation
  std::vector<std::unique_ptr<staging>> free_staging;
  std::vector<cuda::event> free_events;        // blocking: the completion thread sleeps on them
  std::vector<cuda::event> free_start_events;  // timing only

  std::mutex done_m;
  std::condition_variable done_cv;
  std::deque<std::unique_ptr<inflight>> queued;  // in stream order, which is completion order
  bool stopping = false;
  std::thread completer;
  std::atomic<std::uint64_t> bytes{0};

  // Waits for each queued push in turn (pushes share one stream, so they complete in the order
  // queued), paced by `pacer`: asleep until shortly before its predicted end, a few looks, then
  // asleep on its event. No CUDA callback thread in between.
  void complete_loop() {
    (void)cuda::set_device(options.device);
    // The looks are microseconds apart: the default 50 us timer slack would stretch each sleep.
    (void)::prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL);
    completion_pacer pacer;
    std::chrono::steady_clock::time_point previous_done{};
    for (;;) {
      std::unique_ptr<inflight> f;
      {
        std::unique_lock<std::mutex> g(done_m);
        done_cv.wait(g, [&] { return stopping || !queued.empty(); });
        if (queued.empty()) return;
        f = std::move(queued.front());
        queued.pop_front();
      }
      status s = wait_for(*f, pacer, previous_done);
      previous_done = std::chrono::steady_clock::now();
      if (!s) s = status::error("cuda_ipc push failed on the GPU: " + s.reason());
      if (s) {
        bytes.fetch_add(f->bytes, std::memory_order_relaxed);
        if (f->launched != std::chrono::steady_clock::time_point{})
          if (auto ms = cuda::event::elapsed_ms(f->started, f->ev)) pacer.observed(f->bytes, ms.value());
      }
      {
        std::lock_guard<std::mutex> g(m);
        give_back(*f);
        f->l.reset();  // the last push of a disconnected peer closes its mappings here
      }
      f->done(std::move(s));
    }
  }

  // An error here is the kernel's (or the stream's) failure.
  static status wait_for(const inflight& f, const completion_pacer& pacer,
                         std::chrono::steady_clock::time_point previous_done) {
    if (auto p = pacer.plan_for(f.bytes)) {
      // Its GPU work starts once queued and once the push before it is done.
      std::this_thread::sleep_until(std::max(f.launched, previous_done) + p->first_look);
      for (int i = 0; i < p->looks; ++i) {
        auto d = f.ev.done();
        if (!d) return d.error();
        if (d.value()) return {};
        std::this_thread::sleep_for(p->interval);
      }
    }
    return f.ev.synchronize();
  }

  // Returns a push's staging and events to the pools (under `m`).
  void give_back(inflight& f) {
    if (f.st) free_staging.push_back(std::move(f.st));
    if (f.ev.handle() != nullptr) free_events.push_back(std::move(f.ev));
    if (f.started.handle() != nullptr) free_start_events.push_back(std::move(f.started));
  }

  result<std::unique_ptr<staging>> take_staging(std::uint64_t bytes_needed) {
    for (auto it = free_staging.begin(); it != free_staging.end(); ++it)
      if ((*it)->host.size() >= bytes_needed) {
        auto st = std::move(*it);
        free_staging.erase(it);
        return st;
      }
    std::uint64_t cap = 64u << 10;
    while (cap < bytes_needed) cap *= 2;
    auto host = cuda::pinned_buffer::create(cap);
    if (!host) return host.error();
    auto st = std::make_unique<staging>();
    st->host = std::move(host.value());
    return st;
  }

  result<cuda::event> take_event(std::vector<cuda::event>& pool, bool blocking) {
    if (!pool.empty()) {
      auto e = std::move(pool.back());
      pool.pop_back();
      return e;
    }
    // Both kinds time: a push's GPU time is what the completion thread paces its looks by.
    return blocking ? cuda::event::create_blocking(options.device, true) : cuda::event::create(options.device, true);
  }

  // Checks every block against the peer's registered regions (before any byte moves), then
  // writes the block list straight into pinned memory in chunks, each gathered as soon as it is
  // written, so the GPU copies while the rest of the list is still being built. The kernels read
  // the list in place (mapped pinned memory): no upload, and no wait between streams, stands
  // between one chunk's kernel and the next.
  void submit(std::uintptr_t fence, std::uint64_t peer, const std::vector<block>& blocks, completion done) {
    std::unique_lock<std::mutex> g(m);
    // Pushes come from any thread (an actor's worker): the stream's device must be current there.
    if (auto s = cuda::set_device(options.device); !s) {
      g.unlock();
      return done(status::error("cuda_ipc: " + s.reason()));
    }
    auto refuse = [&](std::string reason) {
      g.unlock();
      done(status::error(std::move(reason)));
    };
    auto it = links.find(peer);
    if (it == links.end()) return refuse("cuda_ipc: peer " + std::to_string(peer) + " is not connected");
    std::shared_ptr<link> l = it->second;
    // Blocks of one push mostly name the same region: look it up once per run of them.
    std::uint64_t last_id = 0;
    const remote_region* last = nullptr;
    auto region_of = [&](std::uint64_t id) -> const remote_region* {
      if (last != nullptr && id == last_id) return last;
      auto r = l->regions.find(id);
      last_id = id;
      last = r == l->regions.end() ? nullptr : &r->second;
      return last;
    };
    std::uint64_t pieces = 0, total = 0;
    for (const auto& b : blocks) {
      const remote_region* r = region_of(b.region);
      if (r == nullptr)
        return refuse("cuda_ipc: region " + std::to_string(b.region) + " is not registered by peer " + std::to_string(peer));
      if (b.offset > r->size || b.len > r->size - b.offset)
        return refuse("cuda_ipc: block [" + std::to_string(b.offset) + ", +" + std::to_string(b.len) + ") outside region " +
                      std::to_string(b.region) + " of " + std::to_string(r->size) + " bytes");
      pieces += (b.len + cuda::max_piece - 1) / cuda::max_piece;
      total += b.len;
    }
    auto f = std::make_unique<inflight>();
    f->done = std::move(done);
    f->l = l;
    f->bytes = total;
    // Only before any work was queued: once a kernel may run, the push completes through the
    // completion thread (its staging stays in use until the GPU is done with it).
    auto fail = [&](const status& s) {
      give_back(*f);
      g.unlock();
      f->done(s);
    };
    auto st = take_staging(std::max<std::uint64_t>(pieces, 1) * sizeof(cuda::copy_desc));
    if (!st) return fail(st.error());
    f->st = std::move(st.value());
    auto ev = take_event(free_events, true);
    if (!ev) return fail(ev.error());
    f->ev = std::move(ev.value());
    auto started = take_event(free_start_events, false);
    if (!started) return fail(started.error());
    f->started = std::move(started.value());
    const std::uint64_t chunk = options.chunk_descs == 0 ? std::max<std::uint64_t>(pieces, 1) : options.chunk_descs;
    status s;
    if (fence != 0) s = cuda::wait_for_external_event(stream, fence);
    auto* host = reinterpret_cast<cuda::copy_desc*>(f->st->host.data());
    const auto* mapped = reinterpret_cast<const cuda::copy_desc*>(f->st->host.device_data());
    std::uint64_t written = 0, launched = 0;
    auto flush = [&] {
      if (!s || written == launched) return;
      const std::uint64_t n = written - launched;
      if (launched == 0) {
        // The push's GPU time (what paces the completion thread) starts with its first kernel.
        s = f->started.record(stream);
        f->launched = std::chrono::steady_clock::now();
        if (!s) return;
      }
      s = cuda::launch_gather(mapped + launched, static_cast<std::uint32_t>(n), stream.handle());
      launched = written;
    };
    for (const auto& b : blocks) {
      if (!s) break;
      const std::uint64_t dst = reinterpret_cast<std::uint64_t>(region_of(b.region)->base + b.offset);
      const std::uint64_t src = reinterpret_cast<std::uint64_t>(b.src);
      for (std::uint64_t at = 0; at < b.len; at += cuda::max_piece)
        host[written++] = {src + at, dst + at, std::min(cuda::max_piece, b.len - at)};
      if (written - launched >= chunk) flush();
    }
    flush();
    if (s) s = f->ev.record(stream);
    if (!s) {
      // Kernels may be queued already: wait them out before the staging goes back to the pool.
      (void)stream.synchronize();
      return fail(s);
    }
    g.unlock();
    {
      std::lock_guard<std::mutex> q(done_m);
      queued.push_back(std::move(f));
    }
    done_cv.notify_one();
  }
};

result<std::unique_ptr<cuda_ipc_transport>> cuda_ipc_transport::create(const cuda_ipc_options& options) {
  auto p = std::make_unique<impl>();
  p->options = options;
  auto s = cuda::stream::create(options.device);
  if (!s) return status::error("cuda_ipc: " + s.error().reason());
  p->stream = std::move(s.value());
  // The kernels may be missing from this build (no nvcc, or a sanitizer build): find out now.
  if (auto k = cuda::launch_gather(nullptr, 0, p->stream.handle()); !k) return status::error("cuda_ipc: " + k.reason());
  auto* raw = p.get();
  p->completer = std::thread([raw] { raw->complete_loop(); });
  return std::unique_ptr<cuda_ipc_transport>(new cuda_ipc_transport(std::move(p)));
}

cuda_ipc_transport::cuda_ipc_transport(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

cuda_ipc_transport::~cuda_ipc_transport() {
  // Every push queued so far completes (its completion runs) before the completion thread stops.
  (void)impl_->stream.synchronize();
  {
    std::lock_guard<std::mutex> g(impl_->done_m);
    impl_->stopping = true;
  }
  impl_->done_cv.notify_one();
  impl_->completer.join();
}

std::string cuda_ipc_transport::endpoint() const {
  std::string out(endpoint_tag, sizeof endpoint_tag);
  codec::put_string(out, impl_->boot);
  put(out, static_cast<std::uint64_t>(::getpid()));
  put(out, static_cast<std::int32_t>(impl_->options.device));
  return out;
}

bool cuda_ipc_transport::can_connect(const std::string& endpoint) const {
  auto p = unpack_endpoint(endpoint);
  return p && !impl_->boot.empty() && p.value().boot == impl_->boot;
}

result<region_desc> cuda_ipc_transport::register_memory(std::uint64_t owner, void* base, std::uint64_t len) {
  auto info = cuda::query_pointer(base);
  if (info.kind != cuda::pointer_kind::device) return status::error("cuda_ipc: registered memory is not device memory");
  auto range = cuda::allocation_of(base);
  if (!range) return status::error("cuda_ipc: " + range.error().reason());
  const auto addr = reinterpret_cast<std::uintptr_t>(base);
  const std::uint64_t offset = addr - range.value().base;
  if (offset > range.value().size || len > range.value().size - offset)
    return status::error("cuda_ipc: [base, base + len) is not inside one allocation");
  auto handle = cuda::export_ipc_handle(base);
  if (!handle) return status::error("cuda_ipc: " + handle.error().reason());
  std::string key(1, key_kind_ipc);
  key += handle.value();
  put(key, offset);
  put(key, static_cast<std::int32_t>(info.device));
  std::lock_guard<std::mutex> g(impl_->m);
  const std::uint64_t id = impl_->next_region++;
  impl_->regions.emplace(id, impl::local_region{owner, static_cast<std::byte*>(base), len});
  return region_desc{id, len, addr, std::move(key)};
}

void cuda_ipc_transport::deregister_memory(std::uint64_t region) {
  // Peers write through their own mappings: the control plane's release (every sender let go)
  // is what makes the memory free, as for UCX's one-sided puts.
  std::lock_guard<std::mutex> g(impl_->m);
  impl_->regions.erase(region);
}

status cuda_ipc_transport::connect(std::uint64_t peer, const std::string& endpoint,
                                   const std::vector<region_desc>& regions) {
  auto p = unpack_endpoint(endpoint);
  if (!p) return p.error();
  if (p.value().boot != impl_->boot) return status::error("cuda_ipc: peer " + std::to_string(peer) + " is on another host");
  const bool same_process = p.value().pid == static_cast<std::uint64_t>(::getpid());
  auto l = std::make_shared<impl::link>();
  std::lock_guard<std::mutex> g(impl_->m);
  for (const auto& d : regions) {
    if (d.size == 0) {
      l->regions.emplace(d.id, impl::remote_region{nullptr, 0});
      continue;
    }
    if (d.remote_key.size() != key_bytes || d.remote_key[0] != key_kind_ipc)
      return status::error("cuda_ipc: region " + std::to_string(d.id) + " has no IPC key");
    std::string handle = d.remote_key.substr(1, cuda::ipc_handle_bytes);
    std::size_t at = 1 + cuda::ipc_handle_bytes;
    std::uint64_t offset = 0;
    std::int32_t device = -1;
    get(d.remote_key, at, offset);
    get(d.remote_key, at, device);
    std::byte* base = nullptr;
    if (same_process) {
      // A process cannot open its own handles; its pointers are valid as they are.
      base = reinterpret_cast<std::byte*>(d.address);
    } else {
      std::shared_ptr<cuda::ipc_mapping> mapping = impl_->opened[handle].lock();
      if (!mapping) {
        auto opened = cuda::ipc_mapping::open(impl_->options.device, handle);
        if (!opened) return status::error("cuda_ipc: region " + std::to_string(d.id) + ": " + opened.error().reason());
        mapping = std::make_shared<cuda::ipc_mapping>(std::move(opened.value()));
        impl_->opened[handle] = mapping;
      }
      l->mappings.push_back(mapping);
      base = mapping->data() + offset;
    }
    // The described size is the peer's word: it must fit the allocation as mapped here.
    auto range = cuda::allocation_of(base);
    if (!range) return status::error("cuda_ipc: region " + std::to_string(d.id) + ": " + range.error().reason());
    const auto b = reinterpret_cast<std::uintptr_t>(base);
    if (b < range.value().base || d.size > range.value().size - (b - range.value().base))
      return status::error("cuda_ipc: region " + std::to_string(d.id) + " of " + std::to_string(d.size) +
                           " bytes is larger than its allocation");
    l->regions.emplace(d.id, impl::remote_region{base, d.size});
  }
  impl_->links[peer] = std::move(l);
  return {};
}

void cuda_ipc_transport::disconnect(std::uint64_t peer) {
  std::lock_guard<std::mutex> g(impl_->m);
  impl_->links.erase(peer);  // pushes in flight keep the mappings until they completed
}

void cuda_ipc_transport::push(std::uint64_t peer, const std::vector<block>& blocks, completion done) {
  impl_->submit(0, peer, blocks, std::move(done));
}

void cuda_ipc_transport::push_after(std::uintptr_t ready_fence, std::uint64_t peer, const std::vector<block>& blocks,
                                    completion done) {
  impl_->submit(ready_fence, peer, blocks, std::move(done));
}

std::uint64_t cuda_ipc_transport::bytes_moved() const { return impl_->bytes.load(std::memory_order_relaxed); }

}  // namespace kvflow::transport
