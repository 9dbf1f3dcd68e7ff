#pragma once
// Host-side drivers of the pattern kernels for tests and benchmarks: write or check the pattern
// over a list of runs (cut into kernel pieces and uploaded here), on a stream.
#include <vector>

#include "cuda/gpu.hpp"
#include "cuda/kernels.hpp"

namespace kvflow::cuda {

// Copies `bytes` of host memory into a new device buffer and waits for it.
result<device_buffer> upload(const void* data, std::uint64_t bytes, const stream& s);

// Queues the pattern fill of `runs` (after `delay_ns` of GPU time); the returned buffer holds the
// kernel's run list and must outlive the kernel.
result<device_buffer> fill_pattern(const std::vector<pattern_run>& runs, std::uint64_t seed, std::uint64_t delay_ns,
                                   const stream& s);

// Bytes of `runs` that differ from the pattern of `seed` (waits for the stream).
result<std::uint64_t> count_mismatches(const std::vector<pattern_run>& runs, std::uint64_t seed, const stream& s);

}  // namespace kvflow::cuda
