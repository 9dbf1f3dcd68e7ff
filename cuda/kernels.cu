#include <cuda_runtime.h>

#include <string>

#include "cuda/kernels.hpp"

namespace kvflow::cuda {

namespace {

status launch_status(const char* what) {
  if (auto e = cudaGetLastError(); e != cudaSuccess)
    return status::error(std::string(what) + ": " + cudaGetErrorString(e));
  return {};
}

constexpr int copy_threads = 512;
constexpr int pattern_threads = 256;
// Grids larger than this loop over their work (the y dimension is not used).
constexpr std::uint32_t max_grid = 1u << 20;

// One CUDA block per descriptor: a page of tens of KiB keeps 512 threads busy with 16-byte moves,
// four loads in flight per thread before their stores. Unaligned descriptors go byte by byte.
__global__ void gather_kernel(const copy_desc* descs, std::uint32_t n) {
  for (std::uint32_t i = blockIdx.x; i < n; i += gridDim.x) {
    const copy_desc c = descs[i];
    if (((c.src | c.dst | c.len) & 15u) == 0) {
      const uint4* s = reinterpret_cast<const uint4*>(c.src);
      uint4* d = reinterpret_cast<uint4*>(c.dst);
      const std::uint64_t m = c.len >> 4;
      std::uint64_t j = threadIdx.x;
      for (; j + 3 * blockDim.x < m; j += 4 * blockDim.x) {
        uint4 a = s[j], b = s[j + blockDim.x], e = s[j + 2 * blockDim.x], f = s[j + 3 * blockDim.x];
        d[j] = a;
        d[j + blockDim.x] = b;
        d[j + 2 * blockDim.x] = e;
        d[j + 3 * blockDim.x] = f;
      }
      for (; j < m; j += blockDim.x) d[j] = s[j];
    } else {
      const unsigned char* s = reinterpret_cast<const unsigned char*>(c.src);
      unsigned char* d = reinterpret_cast<unsigned char*>(c.dst);
      for (std::uint64_t j = threadIdx.x; j < c.len; j += blockDim.x) d[j] = s[j];
    }
  }
}

// The pattern: word w of a request (bytes 8w..8w+7 at logical offset) is mix(seed, w).
__device__ __forceinline__ std::uint64_t mix(std::uint64_t seed, std::uint64_t w) {
  std::uint64_t x = seed ^ (w * 0x9E3779B97F4A7C15ull);
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return x;
}

__device__ __forceinline__ unsigned char pattern_byte(std::uint64_t seed, std::uint64_t offset) {
  return static_cast<unsigned char>(mix(seed, offset >> 3) >> (8 * (offset & 7)));
}

__global__ void fill_kernel(const pattern_run* runs, std::uint32_t n, std::uint64_t seed) {
  for (std::uint32_t i = blockIdx.x; i < n; i += gridDim.x) {
    const pattern_run r = runs[i];
    if (((r.ptr | r.offset | r.len) & 7u) == 0) {
      auto* p = reinterpret_cast<std::uint64_t*>(r.ptr);
      const std::uint64_t w0 = r.offset >> 3;
      for (std::uint64_t j = threadIdx.x; j < (r.len >> 3); j += blockDim.x) p[j] = mix(seed, w0 + j);
    } else {
      auto* p = reinterpret_cast<unsigned char*>(r.ptr);
      for (std::uint64_t j = threadIdx.x; j < r.len; j += blockDim.x) p[j] = pattern_byte(seed, r.offset + j);
    }
  }
}

__global__ void verify_kernel(const pattern_run* runs, std::uint32_t n, std::uint64_t seed,
                              unsigned long long* mismatches) {
  unsigned long long bad = 0;
  for (std::uint32_t i = blockIdx.x; i < n; i += gridDim.x) {
    const pattern_run r = runs[i];
    if (((r.ptr | r.offset | r.len) & 7u) == 0) {
      const auto* p = reinterpret_cast<const std::uint64_t*>(r.ptr);
      const std::uint64_t w0 = r.offset >> 3;
      for (std::uint64_t j = threadIdx.x; j < (r.len >> 3); j += blockDim.x) {
        std::uint64_t diff = p[j] ^ mix(seed, w0 + j);
        for (; diff != 0; diff >>= 8) bad += (diff & 0xff) != 0;
      }
    } else {
      const auto* p = reinterpret_cast<const unsigned char*>(r.ptr);
      for (std::uint64_t j = threadIdx.x; j < r.len; j += blockDim.x) bad += p[j] != pattern_byte(seed, r.offset + j);
    }
  }
  if (bad != 0) atomicAdd(mismatches, bad);
}

// Holds the stream for `ns` of GPU time, so that what is queued behind it runs late.
__global__ void sleep_kernel(std::uint64_t ns) {
  std::uint64_t start = 0, now = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(100000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

unsigned grid_for(std::uint32_t n) { return n < max_grid ? n : max_grid; }

}  // namespace

status launch_gather(const copy_desc* descs, std::uint32_t n, void* stream) {
  if (n == 0) return {};
  gather_kernel<<<grid_for(n), copy_threads, 0, static_cast<cudaStream_t>(stream)>>>(descs, n);
  return launch_status("gather kernel");
}

status launch_fill(const pattern_run* runs, std::uint32_t n, std::uint64_t seed, std::uint64_t delay_ns,
                   void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (delay_ns > 0) {
    sleep_kernel<<<1, 1, 0, s>>>(delay_ns);
    if (auto st = launch_status("sleep kernel"); !st) return st;
  }
  if (n == 0) return {};
  fill_kernel<<<grid_for(n), pattern_threads, 0, s>>>(runs, n, seed);
  return launch_status("fill kernel");
}

status launch_verify(const pattern_run* runs, std::uint32_t n, std::uint64_t seed,
                     unsigned long long* mismatches, void* stream) {
  if (n == 0) return {};
  verify_kernel<<<grid_for(n), pattern_threads, 0, static_cast<cudaStream_t>(stream)>>>(runs, n, seed, mismatches);
  return launch_status("verify kernel");
}

}  // namespace kvflow::cuda
