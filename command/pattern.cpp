#include "command/pattern.hpp"

#include <cstring>

namespace kvflow::pattern {
namespace {

inline std::uint64_t mix(std::uint64_t x) {  // splitmix64 finalizer
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

}  // namespace

std::uint64_t seed_of(const slab_id& id) {
  std::uint64_t h = mix(id.room ^ 0x6b76666c6f77ULL);
  h = mix(h ^ id.incarnation);
  h = mix(h ^ (std::uint64_t(id.layer) << 32 | std::uint32_t(id.buffer)));
  h = mix(h ^ (std::uint64_t(id.page) << 32 | std::uint32_t(id.head)));
  return mix(h ^ std::uint64_t(id.source_rank));
}

// Word i of a slab is seed + i * odd constant, scrambled: cheap, and no two slabs alike.
void fill(std::byte* dst, std::size_t len, std::uint64_t seed) {
  std::size_t words = len / 8;
  std::uint64_t x = seed;
  for (std::size_t i = 0; i < words; ++i) {
    x += 0x9E3779B97F4A7C15ULL;
    std::uint64_t v = x ^ (x >> 29);
    std::memcpy(dst + i * 8, &v, 8);
  }
  if (std::size_t tail = len % 8; tail != 0) {
    x += 0x9E3779B97F4A7C15ULL;
    std::uint64_t v = x ^ (x >> 29);
    std::memcpy(dst + words * 8, &v, tail);
  }
}

bool check(const std::byte* src, std::size_t len, std::uint64_t seed) {
  std::size_t words = len / 8;
  std::uint64_t x = seed, diff = 0;
  for (std::size_t i = 0; i < words; ++i) {
    x += 0x9E3779B97F4A7C15ULL;
    std::uint64_t v = x ^ (x >> 29), got;
    std::memcpy(&got, src + i * 8, 8);
    diff |= v ^ got;
  }
  if (std::size_t tail = len % 8; tail != 0) {
    x += 0x9E3779B97F4A7C15ULL;
    std::uint64_t v = x ^ (x >> 29), got = 0, want = 0;
    std::memcpy(&got, src + words * 8, tail);
    std::memcpy(&want, &v, tail);
    diff |= want ^ got;
  }
  return diff == 0;
}

}  // namespace kvflow::pattern
