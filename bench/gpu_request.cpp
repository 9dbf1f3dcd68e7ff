#include "bench/gpu_request.hpp"

#include <algorithm>
#include <numeric>
#include <random>

namespace kvflow::bench {

namespace {
std::uint64_t pages_of(int tokens) { return static_cast<std::uint64_t>(std::max(1, tokens / 64)); }
}  // namespace

std::uint64_t gpu_request_src_bytes(int tokens) { return gpu_layers * pages_of(tokens) * gpu_page_bytes; }
std::uint64_t gpu_request_dst_bytes(int tokens) { return 2 * gpu_request_src_bytes(tokens); }

gpu_request gpu_request_of(int tokens, std::uint64_t src_base, std::uint64_t dst_base) {
  gpu_request r;
  r.pages = pages_of(tokens);
  r.pool_pages = 2 * r.pages;
  r.bytes = gpu_layers * r.pages * gpu_page_bytes;
  std::mt19937_64 rng(static_cast<std::uint64_t>(tokens));
  std::vector<std::uint64_t> slots(r.pool_pages);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng);
  const std::uint64_t layer_bytes = r.pages * gpu_page_bytes;
  for (std::uint64_t l = 0; l < gpu_layers; ++l) {
    const std::uint64_t s0 = src_base + l * layer_bytes;
    const std::uint64_t d0 = dst_base + l * r.pool_pages * gpu_page_bytes;
    r.coalesced.push_back({s0, d0, layer_bytes});
    r.src_runs.push_back({s0, l * layer_bytes, layer_bytes});
    r.dst_runs_coalesced.push_back({d0, l * layer_bytes, layer_bytes});
    for (std::uint64_t p = 0; p < r.pages; ++p) {
      r.fragmented.push_back({s0 + p * gpu_page_bytes, d0 + slots[p] * gpu_page_bytes, gpu_page_bytes});
      r.dst_runs.push_back({d0 + slots[p] * gpu_page_bytes, l * layer_bytes + p * gpu_page_bytes, gpu_page_bytes});
    }
  }
  return r;
}

}  // namespace kvflow::bench
