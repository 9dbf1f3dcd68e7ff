#pragma once
// What the `kvflow bench gpu` translation units share: failures as exceptions inside the bench
// (turned into one line and exit 1 at its top), and how a push is timed.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "bench/bench.hpp"
#include "config/status.hpp"
#include "cuda/gpu.hpp"
#include "transport/transport.hpp"

namespace kvflow::bench {

struct failure {
  std::string reason;
};

template <class T>
T must(result<T> r) {
  if (!r) throw failure{r.error().reason()};
  return std::move(r.value());
}
inline void must(const status& s) {
  if (!s) throw failure{s.reason()};
}

// Best-of-`reps` times of one whole push (after a warm-up): until push() returned, and until its
// completion ran.
struct push_times {
  double wall_ms = 1e30, call_ms = 1e30;
};
push_times time_push(transport::transport& t, std::uint64_t peer, const std::vector<transport::block>& blocks, int reps);

// The UCX rows (bench_gpu_ucx.cpp): one request of `tokens` from `src` (holding the pattern of
// seed 7) into another process's GPU pool.
struct ucx_gpu_figures {
  double coalesced_ms = 0, fragmented_ms = 0;
  std::size_t puts_coalesced = 0, puts_fragmented = 0;
  double perftest_gbps = 0;  // ucx_perftest put_bw cuda -> cuda at the coalesced put's size
  bool verified = true;
  std::string lanes;  // what UCX chose for the endpoint (ucp_ep_print_info)
};
ucx_gpu_figures ucx_gpu_rows(const gpu_flags& f, int tokens, const cuda::device_buffer& src, const cuda::stream& s);

// The API rows (bench_gpu_api.cpp): f.api_requests requests of `tokens` through the public API
// across two processes on one GPU, printed beside the gather kernel's figure of the same run for
// one request (`gather_bytes` in `gather_ms`). Throws failure when a request fails, a byte differs
// or the run outlives f.api_timeout_s.
void api_gpu_rows(const gpu_flags& f, int tokens, double gather_ms, std::uint64_t gather_bytes);

}  // namespace kvflow::bench
