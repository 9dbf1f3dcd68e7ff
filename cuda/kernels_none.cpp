// The kernels' entry points in a build without nvcc (or a sanitizer build): every launch fails.
#include "cuda/kernels.hpp"

namespace kvflow::cuda {

namespace {
status no_kernels() { return status::error("no device: built without the CUDA kernels"); }
}  // namespace

status launch_gather(const copy_desc*, std::uint32_t, void*) { return no_kernels(); }
status launch_fill(const pattern_run*, std::uint32_t, std::uint64_t, std::uint64_t, void*) { return no_kernels(); }
status launch_verify(const pattern_run*, std::uint32_t, std::uint64_t, unsigned long long*, void*) {
  return no_kernels();
}

}  // namespace kvflow::cuda
