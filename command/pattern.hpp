#pragma once
// The synthetic KV content of `kvflow simulate`: every slab (one page of one layer buffer, or of
// one head for MHA) holds a pattern derived from (room, request, layer, buffer, page, head,
// source rank), so decode can tell a byte that came from the wrong place or the wrong rank.
#include <cstddef>
#include <cstdint>

namespace kvflow::pattern {

struct slab_id {
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  int layer = 0;
  int buffer = 0;
  int page = 0;  // index of the page within the request (token / page_size)
  int head = 0;  // global KV head (MHA), 0 for MLA
  int source_rank = 0;
};

std::uint64_t seed_of(const slab_id& id);
void fill(std::byte* dst, std::size_t len, std::uint64_t seed);
// True when every byte of the slab equals the pattern.
bool check(const std::byte* src, std::size_t len, std::uint64_t seed);

}  // namespace kvflow::pattern
