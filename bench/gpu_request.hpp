#pragma once
// The DeepSeek-V3.2 fp8 request `kvflow bench gpu` moves (61 layers of 64-token pages of
// 41,984 B), laid out between a source pool and a destination pool of twice its pages. The
// destination pages are a permutation drawn from the token count, so that another process that
// holds the destination (the UCX receiver) lays it out the same from its own base.
#include <cstdint>
#include <vector>

#include "cuda/kernels.hpp"

namespace kvflow::bench {

constexpr int gpu_layers = 61;
constexpr std::uint64_t gpu_page_bytes = 64 * 656;

struct gpu_request {
  std::uint64_t pages = 0, pool_pages = 0, bytes = 0;
  std::vector<cuda::copy_desc> fragmented;  // one block per page, destination pages scattered
  std::vector<cuda::copy_desc> coalesced;   // one block per layer, contiguous on both sides
  std::vector<cuda::pattern_run> src_runs;  // the source, one run per layer
  std::vector<cuda::pattern_run> dst_runs;            // where `fragmented` puts each page
  std::vector<cuda::pattern_run> dst_runs_coalesced;  // where `coalesced` puts each layer
};

// Source bytes of the request (a pool of `pages`); destination pool bytes (twice the pages).
std::uint64_t gpu_request_src_bytes(int tokens);
std::uint64_t gpu_request_dst_bytes(int tokens);

gpu_request gpu_request_of(int tokens, std::uint64_t src_base, std::uint64_t dst_base);

}  // namespace kvflow::bench
