// `kvflow bench gpu`: the GPU copy paths for one DeepSeek-V3.2 fp8 request (61 layers of 64-token
// pages of 41,984 B; destination pages scattered over a pool, as in a real one), each beside the
// raw anchors of the same run:
//   coalesced  one cudaMemcpyAsync per layer (contiguous pages on both sides: the upper bound)
//   per-page   one cudaMemcpyAsync per page (what a transfer engine that issues a copy per page gets)
//   gather     kvflow's gather kernel over the whole block list, the list already on the device
//   gather, list in pinned  the same reading its block list in place from mapped pinned memory,
//              as a push does
//   d2h pinned one cudaMemcpyAsync of the request into pinned host memory (the staging bound),
//              and h2d pinned back; gather into pinned: the fragmented pages into pinned memory by
//              the gather kernel (the staged path's first half)
// plus a block-size sweep of the gather kernel, and the API rows (bench_gpu_api.cpp: requests
// through the public API between two processes, beside the gather kernel). Bytes are checked on the
// GPU after each path.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <numeric>
#include <random>
#include <vector>

#include "bench/bench.hpp"
#include "bench/bench_gpu_internal.hpp"
#include "bench/gpu_request.hpp"
#include "cuda/device.hpp"
#include "cuda/gpu.hpp"
#include "cuda/kernels.hpp"
#include "cuda/pattern_check.hpp"
#include "transport/cuda_ipc_transport.hpp"
#include "transport/staged_transport.hpp"
#include "transport/staging_ring.hpp"

namespace kvflow::bench {

namespace {

using namespace kvflow::cuda;

constexpr int layers = gpu_layers;
constexpr std::uint64_t page_bytes = gpu_page_bytes;

// Best-of-`reps` GPU time in ms of `enqueue` on `s` (timed by events).
template <class F>
double best_ms(const stream& s, int reps, F&& enqueue) {
  auto a = must(event::create(s.device(), true)), b = must(event::create(s.device(), true));
  double best = 1e30;
  for (int i = 0; i < reps + 1; ++i) {  // the first is a warm-up
    must(a.record(s));
    enqueue();
    must(b.record(s));
    must(b.synchronize());
    if (i > 0) best = std::min<double>(best, must(event::elapsed_ms(a, b)));
  }
  return best;
}

template <class T>
device_buffer upload(const std::vector<T>& v, const stream& s) {
  return must(cuda::upload(v.data(), v.size() * sizeof(T), s));
}

std::uint64_t mismatches(const std::vector<pattern_run>& runs, std::uint64_t seed, const stream& s) {
  return must(count_mismatches(runs, seed, s));
}

// The request's copies as blocks of a push into the region that starts at `region_base`.
std::vector<transport::block> blocks_into(const std::vector<copy_desc>& copies, std::uint64_t region,
                                          std::uint64_t region_base) {
  std::vector<transport::block> blocks;
  blocks.reserve(copies.size());
  for (const auto& c : copies)
    blocks.push_back({reinterpret_cast<const std::byte*>(c.src), region, c.dst - region_base, c.len});
  return blocks;
}

// Host wall time in ms of the best of `reps` runs of `enqueue` (after a warm-up), every stream in
// `wait` synchronised before and after each.
template <class F>
double best_wall_ms(const std::vector<const stream*>& wait, int reps, F&& enqueue) {
  double best = 1e30;
  for (int i = 0; i < reps + 1; ++i) {
    for (const auto* w : wait) must(w->synchronize());
    const auto t0 = std::chrono::steady_clock::now();
    enqueue();
    for (const auto* w : wait) must(w->synchronize());
    const auto t1 = std::chrono::steady_clock::now();
    if (i > 0) best = std::min(best, std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return best;
}

// The staged path's ceiling on this machine: `bytes` from `src` to `dst` (device memory) through
// `slots` slots of `slot_bytes` at `ring` (pinned host memory), device-to-host on one stream and
// host-to-device on another, each slot's two copies ordered by events on the GPU alone: no host
// thread hands anything over, no gather or scatter. Wall ms, best of `reps`.
double pipeline_ms(std::byte* dst, const std::byte* src, std::uint64_t bytes, std::byte* ring, int slots,
                   std::uint64_t slot_bytes, int device, int reps) {
  auto down = must(stream::create(device)), up = must(stream::create(device));
  std::vector<event> filled, emptied;
  for (int i = 0; i < slots; ++i) {
    filled.push_back(must(event::create(device)));
    emptied.push_back(must(event::create(device)));
  }
  return best_wall_ms({&down, &up}, reps, [&] {
    std::uint64_t at = 0;
    for (std::uint64_t i = 0; at < bytes; ++i) {
      const auto k = static_cast<std::size_t>(i % static_cast<std::uint64_t>(slots));
      const std::uint64_t n = std::min(slot_bytes, bytes - at);
      std::byte* slot = ring + k * slot_bytes;
      if (i >= static_cast<std::uint64_t>(slots)) must(emptied[k].wait_on(down));
      must(copy_async(slot, src + at, n, down));
      must(filled[k].record(down));
      must(filled[k].wait_on(up));
      must(copy_async(dst + at, slot, n, up));
      must(emptied[k].record(up));
      at += n;
    }
  });
}

double gbps(std::uint64_t bytes, double ms) { return ms > 0 ? double(bytes) / (ms * 1e6) : 0; }

int run(const gpu_flags& f) {
  const int dev = f.device;
  must(set_device(dev));
  auto s = must(stream::create(dev));
  for (int tokens : f.request_tokens) {
    auto src = must(device_buffer::create(dev, gpu_request_src_bytes(tokens)));
    auto dst = must(device_buffer::create(dev, gpu_request_dst_bytes(tokens)));
    auto base = [](const device_buffer& b) { return reinterpret_cast<std::uint64_t>(b.data()); };
    const auto req = gpu_request_of(tokens, base(src), base(dst));
    const std::uint64_t pages = req.pages, pool_pages = req.pool_pages, bytes = req.bytes;
    const auto& frag = req.fragmented;
    const auto& coalesced = req.coalesced;
    const auto& src_runs = req.src_runs;
    const auto& dst_runs = req.dst_runs;
    auto fill_list = must(fill_pattern(src_runs, 7, 0, s));
    must(s.synchronize());
    auto print_header = [&] {
      std::printf("bench gpu: DSv3.2 fp8 request of %d tokens = %d layers x %llu pages x %llu B = %.3f GB "
                  "(destination pages scattered over a pool of %llu), device %d\n",
                  tokens, layers, static_cast<unsigned long long>(pages), static_cast<unsigned long long>(page_bytes),
                  double(bytes) / 1e9, static_cast<unsigned long long>(pool_pages), dev);
    };
    if (f.api_only) {
      // The API rows and the anchor they are compared with: the gather kernel over this request.
      auto frag_list = upload(frag, s);
      const auto n = static_cast<std::uint32_t>(frag.size());
      const double gather_ms = best_ms(s, f.reps, [&] {
        must(launch_gather(reinterpret_cast<const copy_desc*>(frag_list.data()), n, s.handle()));
      });
      const bool verified = mismatches(dst_runs, 7, s) == 0;
      print_header();
      std::printf("  kvflow gather kernel, list on device      %9.3f ms  %8.1f GB/s  (%s)\n", gather_ms,
                  gbps(bytes, gather_ms), verified ? "bytes verified" : "BYTES WRONG");
      if (!verified) return 1;
      api_gpu_rows(f, tokens, gather_ms, bytes);
      continue;
    }
    auto pinned = must(pinned_buffer::create(bytes));

    const int reps = f.reps;
    double coalesced_ms = best_ms(s, reps, [&] {
      for (const auto& c : coalesced)
        must(copy_async(reinterpret_cast<void*>(c.dst), reinterpret_cast<const void*>(c.src), c.len, s));
    });
    double per_page_ms = best_ms(s, std::min(reps, 3), [&] {
      for (const auto& c : frag) must(copy_async(reinterpret_cast<void*>(c.dst), reinterpret_cast<const void*>(c.src), c.len, s));
    });
    const std::uint64_t bad_per_page = mismatches(dst_runs, 7, s);

    auto frag_list = upload(frag, s);
    const auto* list = reinterpret_cast<const copy_desc*>(frag_list.data());
    const auto n = static_cast<std::uint32_t>(frag.size());
    double gather_ms = best_ms(s, reps, [&] { must(launch_gather(list, n, s.handle())); });
    // As a push does it: the kernel reads the block list in place from mapped pinned memory.
    auto list_host = must(pinned_buffer::create(frag.size() * sizeof(copy_desc)));
    std::copy(frag.begin(), frag.end(), reinterpret_cast<copy_desc*>(list_host.data()));
    double gather_inplace_ms = best_ms(s, reps, [&] {
      must(launch_gather(reinterpret_cast<const copy_desc*>(list_host.device_data()), n, s.handle()));
    });
    const std::uint64_t bad_gather = mismatches(dst_runs, 7, s);
    double d2h_ms = best_ms(s, reps, [&] { must(copy_async(pinned.data(), src.data(), bytes, s)); });
    double h2d_ms = best_ms(s, reps, [&] { must(copy_async(src.data(), pinned.data(), bytes, s)); });
    // Both directions at once, on two streams (what a staged push asks of the link), and the
    // staged pipeline with nothing but the GPU in it, through cudaMallocHost memory and through
    // shared memory registered with cudaHostRegister (what a staging ring is).
    double both_ms = 0, pipe_pinned_ms = 0, pipe_shared_ms = 0;
    constexpr int pipe_slots = 8;
    constexpr std::uint64_t pipe_slot_bytes = 16u << 20;
    {
      auto back = must(pinned_buffer::create(bytes));
      auto dst2 = must(device_buffer::create(dev, bytes));
      auto other = must(stream::create(dev));
      both_ms = best_wall_ms({&s, &other}, reps, [&] {
        must(copy_async(pinned.data(), src.data(), bytes, s));
        must(copy_async(dst2.data(), back.data(), bytes, other));
      });
      pipe_pinned_ms = pipeline_ms(dst2.data(), src.data(), bytes, back.data(), pipe_slots, pipe_slot_bytes, dev, reps);
      auto ring = must(transport::staging_ring::create("/kvflow-bench-" + std::to_string(::getpid()),
                                                       {1, pipe_slots, pipe_slot_bytes, 16}));
      auto reg = must(host_registration::create(ring->base(), ring->bytes()));
      pipe_shared_ms = pipeline_ms(dst2.data(), src.data(), bytes, ring->data(0, 0), pipe_slots, pipe_slot_bytes, dev, reps);
    }
    // The fragmented pages gathered straight into mapped pinned memory, contiguous there.
    double gather_pinned_ms = 0;
    {
      std::vector<copy_desc> into;
      std::uint64_t at = 0;
      for (const auto& c : frag) {
        append_split(into, {c.src, reinterpret_cast<std::uint64_t>(pinned.data()) + at, c.len});
        at += c.len;
      }
      auto l = upload(into, s);
      gather_pinned_ms = best_ms(s, reps, [&] {
        must(launch_gather(reinterpret_cast<const copy_desc*>(l.data()), static_cast<std::uint32_t>(into.size()),
                           s.handle()));
      });
    }

    // The whole push through the CUDA IPC transport (its block list built from the request's
    // blocks, bounds-checked, gathered, completion learnt by its thread), wall clock.
    struct push_figure {
      std::uint64_t chunk;
      double wall_ms, call_ms;
    };
    std::vector<push_figure> pushes;
    std::uint64_t bad_push = 0;
    // What a push pays whatever its size, beside the same wait on the calling thread: the whole
    // list's kernel waited for by spinning (cudaStreamSynchronize) or asleep on a blocking event
    // (as the completion thread waits), and a push of one block.
    auto blocking = must(event::create_blocking(dev));
    auto wall_of = [&](auto&& fn) {
      double best = 1e30;
      for (int i = 0; i < reps + 1; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        fn();
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        if (i > 0) best = std::min(best, ms);
      }
      return best;
    };
    const double gather_spin_ms = wall_of([&] {
      must(launch_gather(list, n, s.handle()));
      must(s.synchronize());
    });
    const double gather_sleep_ms = wall_of([&] {
      must(launch_gather(list, n, s.handle()));
      must(blocking.record(s));
      must(blocking.synchronize());
    });
    double one_block_ms = 0;
    for (std::uint64_t chunk : {0ull, 2048ull, 4096ull, 16384ull}) {
      transport::cuda_ipc_options o;
      o.device = dev;
      o.chunk_descs = chunk;
      auto receiver = must(transport::cuda_ipc_transport::create(o));
      auto sender = must(transport::cuda_ipc_transport::create(o));
      auto region = must(receiver->register_memory(1, dst.data(), dst.size()));
      must(sender->connect(1, receiver->endpoint(), {region}));
      auto blocks = blocks_into(frag, region.id, base(dst));
      // Overwrite the destination first, so that only the pushes can make it verify again.
      auto dst_list = must(fill_pattern(dst_runs, 8, 0, s));
      must(s.synchronize());
      auto times = time_push(*sender, 1, blocks, reps);
      push_figure fig{chunk, times.wall_ms, times.call_ms};
      if (chunk == transport::cuda_ipc_options{}.chunk_descs)
        one_block_ms = time_push(*sender, 1, {blocks.front()}, reps).wall_ms;
      bad_push += mismatches(dst_runs, 7, s);
      pushes.push_back(fig);
    }

    // The whole push through the staged transport (a pinned ring both ends map: gather into a
    // slot, then out of it into the destination pages), for a few ring shapes.
    struct staged_figure {
      transport::ring_shape ring;
      double wall_ms;
    };
    std::vector<staged_figure> staged;
    std::uint64_t bad_staged = 0;
    for (auto shape : {transport::ring_shape{2, 4, 4u << 20, 4096}, transport::ring_shape{2, 4, 16u << 20, 4096},
                       transport::ring_shape{2, 8, 16u << 20, 4096}}) {
      transport::staged_options o;
      o.device = dev;
      o.ring = shape;
      auto receiver = must(transport::staged_transport::create(o));
      auto sender = must(transport::staged_transport::create(o));
      auto region = must(receiver->register_memory(1, dst.data(), dst.size()));
      must(sender->connect(1, receiver->endpoint(), {region}));
      auto blocks = blocks_into(frag, region.id, base(dst));
      auto dst_list = must(fill_pattern(dst_runs, 10, 0, s));
      must(s.synchronize());
      staged.push_back({shape, time_push(*sender, 1, blocks, reps).wall_ms});
      bad_staged += mismatches(dst_runs, 7, s);
      sender.reset();
      receiver->deregister_memory(region.id);
    }

    // The same request through the UCX transport into another process's GPU pool.
    const auto ucx = ucx_gpu_rows(f, tokens, src, s);
    print_header();
    std::printf("  anchor coalesced cudaMemcpyAsync x%d      %9.3f ms  %8.1f GB/s\n", layers, coalesced_ms,
                gbps(bytes, coalesced_ms));
    std::printf("  anchor per-page cudaMemcpyAsync x%-6u  %9.3f ms  %8.1f GB/s  (%s)\n", n, per_page_ms,
                gbps(bytes, per_page_ms), bad_per_page == 0 ? "bytes verified" : "BYTES WRONG");
    std::printf("  kvflow gather kernel, list on device      %9.3f ms  %8.1f GB/s  %.2fx coalesced\n", gather_ms,
                gbps(bytes, gather_ms), coalesced_ms / gather_ms);
    std::printf("  kvflow gather kernel, list in pinned      %9.3f ms  %8.1f GB/s  %.2fx coalesced  (%s)\n",
                gather_inplace_ms, gbps(bytes, gather_inplace_ms), coalesced_ms / gather_inplace_ms,
                bad_gather == 0 ? "bytes verified" : "BYTES WRONG");
    std::printf("  anchor gather kernel, wall, spin wait     %9.3f ms  (launch to cudaStreamSynchronize)\n", gather_spin_ms);
    std::printf("  anchor gather kernel, wall, asleep        %9.3f ms  (launch to a blocking event's synchronize)\n",
                gather_sleep_ms);
    std::printf("  kvflow cuda_ipc push of one block         %9.3f ms  (what every push pays: launch, completion "
                "thread, callback)\n",
                one_block_ms);
    for (const auto& p : pushes)
      std::printf("  kvflow cuda_ipc push, %5llu-entry launches %6.3f ms  %8.1f GB/s  %.2fx gather kernel, +%.3f ms "
                  "(push() returned after %.3f ms; %s)\n",
                  static_cast<unsigned long long>(p.chunk), p.wall_ms, gbps(bytes, p.wall_ms), gather_ms / p.wall_ms,
                  p.wall_ms - gather_ms, p.call_ms, bad_push == 0 ? "bytes verified" : "BYTES WRONG");
    std::printf("  kvflow ucx push to another process, coalesced (%zu puts of %llu B, one flush) %9.3f ms  %8.1f GB/s  "
                "%.2fx ucx_perftest put_bw cuda at that size (%.1f GB/s), %.2fx coalesced cudaMemcpyAsync  (%s)\n",
                ucx.puts_coalesced, static_cast<unsigned long long>(pages * page_bytes), ucx.coalesced_ms,
                gbps(bytes, ucx.coalesced_ms), ucx.perftest_gbps > 0 ? gbps(bytes, ucx.coalesced_ms) / ucx.perftest_gbps : 0.0,
                ucx.perftest_gbps, coalesced_ms / ucx.coalesced_ms, ucx.verified ? "bytes verified" : "BYTES WRONG");
    std::printf("  kvflow ucx push to another process, fragmented (%zu puts, one flush) %9.3f ms  %8.1f GB/s  %.2fx gather "
                "kernel\n",
                ucx.puts_fragmented, ucx.fragmented_ms, gbps(bytes, ucx.fragmented_ms), gather_ms / ucx.fragmented_ms);
    std::printf("  ucx endpoint's lanes:\n");
    for (std::size_t at = 0; at < ucx.lanes.size();) {
      auto nl = ucx.lanes.find('\n', at);
      auto one = ucx.lanes.substr(at, nl == std::string::npos ? std::string::npos : nl - at);
      if (one.find("lane[") != std::string::npos) std::printf("   %s\n", one.c_str());
      at = nl == std::string::npos ? ucx.lanes.size() : nl + 1;
    }
    std::printf("  anchor pinned device-to-host              %9.3f ms  %8.1f GB/s\n", d2h_ms, gbps(bytes, d2h_ms));
    std::printf("  anchor pinned host-to-device              %9.3f ms  %8.1f GB/s\n", h2d_ms, gbps(bytes, h2d_ms));
    std::printf("  anchor pinned d2h and h2d at once         %9.3f ms  %8.1f GB/s each way\n", both_ms,
                gbps(bytes, both_ms));
    std::printf("  anchor staged pipeline, GPU alone, %d x %llu MiB: cudaMallocHost %.3f ms %.1f GB/s (%.2fx d2h); "
                "registered shared memory %.3f ms %.1f GB/s (%.2fx d2h)\n",
                pipe_slots, static_cast<unsigned long long>(pipe_slot_bytes >> 20), pipe_pinned_ms,
                gbps(bytes, pipe_pinned_ms), d2h_ms / pipe_pinned_ms, pipe_shared_ms, gbps(bytes, pipe_shared_ms),
                d2h_ms / pipe_shared_ms);
    std::printf("  gather kernel into pinned memory          %9.3f ms  %8.1f GB/s  %.2fx pinned device-to-host\n",
                gather_pinned_ms, gbps(bytes, gather_pinned_ms), d2h_ms / gather_pinned_ms);
    for (const auto& p : staged)
      std::printf("  kvflow staged push, %u slots x %3llu MiB   %9.3f ms  %8.1f GB/s  %.2fx pinned device-to-host  (%s)\n",
                  p.ring.slots, static_cast<unsigned long long>(p.ring.slot_bytes >> 20), p.wall_ms,
                  gbps(bytes, p.wall_ms), d2h_ms / p.wall_ms, bad_staged == 0 ? "bytes verified" : "BYTES WRONG");
    if (bad_per_page != 0 || bad_gather != 0 || bad_push != 0 || !ucx.verified || bad_staged != 0) return 1;
    // The public API across two processes, beside the gather kernel over this request.
    if (f.api) api_gpu_rows(f, tokens, gather_ms, bytes);
  }
  if (f.api_only) return 0;

  // The gather kernel over blocks of one size, scattered over a 2 GiB pool.
  std::printf("bench gpu: gather kernel by block size (512 MiB scattered per size) vs one cudaMemcpyAsync of 512 MiB\n");
  const std::uint64_t total = 512ull << 20, pool = 2 * total;
  auto src = must(device_buffer::create(dev, total)), dst = must(device_buffer::create(dev, pool));
  double one_ms = best_ms(s, f.reps, [&] { must(copy_async(dst.data(), src.data(), total, s)); });
  std::printf("  anchor cudaMemcpyAsync 512 MiB  %8.3f ms  %8.1f GB/s\n", one_ms, gbps(total, one_ms));
  std::mt19937_64 rng(99);
  for (std::uint64_t bs : {4096ull, 16384ull, 41984ull, 65536ull, 262144ull, 1048576ull}) {
    const std::uint64_t blocks = total / bs, slots = pool / bs;
    std::vector<std::uint64_t> perm(slots);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<copy_desc> list;
    for (std::uint64_t i = 0; i < blocks; ++i)
      list.push_back({reinterpret_cast<std::uint64_t>(src.data()) + i * bs,
                      reinterpret_cast<std::uint64_t>(dst.data()) + perm[i] * bs, bs});
    auto d = upload(list, s);
    double ms = best_ms(s, f.reps, [&] {
      must(launch_gather(reinterpret_cast<const copy_desc*>(d.data()), static_cast<std::uint32_t>(list.size()), s.handle()));
    });
    std::printf("  gather %7llu B blocks x%-7llu %8.3f ms  %8.1f GB/s  %.2fx one copy\n",
                static_cast<unsigned long long>(bs), static_cast<unsigned long long>(blocks), ms, gbps(blocks * bs, ms),
                gbps(blocks * bs, ms) / gbps(total, one_ms));
  }
  std::printf("bench gpu: anchor ucx_perftest put_bw cuda -> cuda between two processes\n");
  int port = 13591;
  for (std::uint64_t size : {1ull << 20, 64ull << 20, 256ull << 20})
    std::printf("  %4llu MiB  %8.1f GB/s\n", static_cast<unsigned long long>(size >> 20),
                perftest_gbps(size, size >= (64ull << 20) ? 200 : 2000, false, port++, "cuda,cuda"));
  return 0;
}

}  // namespace

push_times time_push(transport::transport& t, std::uint64_t peer, const std::vector<transport::block>& blocks, int reps) {
  push_times best;
  for (int i = 0; i < reps + 1; ++i) {
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    status got;
    std::chrono::steady_clock::time_point t2;
    const auto t0 = std::chrono::steady_clock::now();
    // Timed to the completion's call (when an engine learns of it), not to this thread's wake-up.
    t.push(peer, blocks, [&](status st) {
      const auto now = std::chrono::steady_clock::now();
      std::lock_guard<std::mutex> g(m);
      t2 = now;
      got = std::move(st);
      done = true;
      cv.notify_one();
    });
    const auto t1 = std::chrono::steady_clock::now();
    std::unique_lock<std::mutex> g(m);
    cv.wait(g, [&] { return done; });
    must(got);
    if (i > 0) {
      best.wall_ms = std::min(best.wall_ms, std::chrono::duration<double, std::milli>(t2 - t0).count());
      best.call_ms = std::min(best.call_ms, std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
  }
  return best;
}

int run_bench_gpu(const gpu_flags& f) {
  auto devices = probe_devices();
  if (devices.count == 0) {
    std::fprintf(stderr, "bench gpu: %s\n", devices.reason.c_str());
    return 77;
  }
  try {
    return run(f);
  } catch (const failure& e) {
    std::fprintf(stderr, "bench gpu: %s\n", e.reason.c_str());
    return 1;
  }
}

}  // namespace kvflow::bench
