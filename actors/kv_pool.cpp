#include "actors/kv_pool.hpp"

#include <algorithm>
#include <cstring>

namespace kvflow {

kv_pool::kv_pool(const pool_shape& shape)
    : shape_(shape),
      kv_(std::uint64_t(shape.layers.size()) * shape.buffers_per_layer * shape.pages *
          std::uint64_t(shape.item_bytes)),
      aux_(std::uint64_t(shape.aux_slots) * sizeof(aux_record)) {
  free_pages_.reserve(shape.pages);
  for (int p = shape.pages - 1; p >= 0; --p) free_pages_.push_back(p);
  free_aux_.reserve(shape.aux_slots);
  for (int s = shape.aux_slots - 1; s >= 0; --s) free_aux_.push_back(s);
}

std::uint64_t kv_pool::offset(int layer, int buffer, int page) const {
  auto lb = std::uint64_t(layer - shape_.layers.begin) * shape_.buffers_per_layer + buffer;
  return (lb * shape_.pages + std::uint64_t(page)) * std::uint64_t(shape_.item_bytes);
}

std::optional<std::vector<std::int32_t>> kv_pool::alloc_pages(int n) {
  if (n < 0 || n > static_cast<int>(free_pages_.size())) return std::nullopt;
  std::vector<std::int32_t> out(free_pages_.end() - n, free_pages_.end());
  std::reverse(out.begin(), out.end());
  free_pages_.resize(free_pages_.size() - n);
  return out;
}

void kv_pool::free_pages(const std::vector<std::int32_t>& pages) {
  for (auto it = pages.rbegin(); it != pages.rend(); ++it) free_pages_.push_back(*it);
}

std::optional<std::int32_t> kv_pool::alloc_aux() {
  if (free_aux_.empty()) return std::nullopt;
  auto s = free_aux_.back();
  free_aux_.pop_back();
  // A recycled slot must not look landed for the next request.
  *reinterpret_cast<aux_record*>(aux_base() + aux_offset(s)) = aux_record{};
  return s;
}

void kv_pool::free_aux(std::int32_t slot) { free_aux_.push_back(slot); }

std::uint64_t aux_checksum(const aux_record& r) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  auto mix = [&](std::uint64_t v) { h = (h ^ v) * 0x100000001b3ULL; };
  mix(r.room);
  mix(r.incarnation);
  mix(static_cast<std::uint32_t>(r.first_token));
  std::uint32_t bits;
  static_assert(sizeof(bits) == sizeof(r.first_logprob));
  std::memcpy(&bits, &r.first_logprob, sizeof(bits));
  mix(bits);
  return h | 1;  // never 0, the value of an empty slot
}

}  // namespace kvflow
