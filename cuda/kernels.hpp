#pragma once
// The GPU data plane's kernels, launched on a caller's stream (an opaque cudaStream_t):
//  - gather: one kernel copies a whole request's block list (fragmented pages into fragmented
//    pages, also into a peer's IPC-mapped memory), instead of one copy call per page;
//  - fill/verify: a byte pattern that is a function of (seed, logical offset), written and
//    checked on the GPU, so tests and benchmarks verify every byte without moving it back.
// Built with nvcc when the toolkit is found; otherwise every launch answers "built without CUDA".
#include <cstdint>
#include <vector>

#include "config/status.hpp"

namespace kvflow::cuda {

// One contiguous copy of the gather kernel (device addresses).
struct copy_desc {
  std::uint64_t src = 0;
  std::uint64_t dst = 0;
  std::uint64_t len = 0;
};

// The kernels give each descriptor one CUDA block, so a long run is cut into pieces of at most
// `max_piece` bytes (kept 16-byte aligned) to spread it over the GPU.
constexpr std::uint64_t max_piece = 256u << 10;
inline void append_split(std::vector<copy_desc>& out, const copy_desc& c) {
  for (std::uint64_t at = 0; at < c.len; at += max_piece)
    out.push_back({c.src + at, c.dst + at, c.len - at < max_piece ? c.len - at : max_piece});
}

// Copies descs[0..n) (an array in device memory, or in mapped pinned memory) on `stream`.
status launch_gather(const copy_desc* descs, std::uint32_t n, void* stream);

// One run of pattern bytes: `len` bytes at device address `ptr` holding the pattern from logical
// offset `offset` on.
struct pattern_run {
  std::uint64_t ptr = 0;
  std::uint64_t offset = 0;
  std::uint64_t len = 0;
};

inline void append_split(std::vector<pattern_run>& out, const pattern_run& r) {
  for (std::uint64_t at = 0; at < r.len; at += max_piece)
    out.push_back({r.ptr + at, r.offset + at, r.len - at < max_piece ? r.len - at : max_piece});
}

// Writes the pattern of `seed` into runs[0..n), after sleeping `delay_ns` on the GPU (a late
// writer: the ordering test's producer that finishes well after it was queued).
status launch_fill(const pattern_run* runs, std::uint32_t n, std::uint64_t seed, std::uint64_t delay_ns,
                   void* stream);

// Counts bytes of runs[0..n) that differ from the pattern of `seed` into *mismatches (device or
// mapped memory, zeroed by the caller before).
status launch_verify(const pattern_run* runs, std::uint32_t n, std::uint64_t seed,
                     unsigned long long* mismatches, void* stream);

}  // namespace kvflow::cuda
