#include "actors/kv_pool.hpp"

#include <algorithm>
#include <cstring>

namespace kvflow {

pool_sizes sizes_of(const pool_shape& shape) {
  pool_sizes s;
  s.kv = std::uint64_t(shape.layers.size()) * shape.buffers_per_layer * shape.pages * std::uint64_t(shape.item_bytes);
  s.aux = std::uint64_t(shape.aux_slots) * sizeof(aux_record);
  s.state = std::uint64_t(shape.layers.size()) * std::uint64_t(shape.state_pages) * std::uint64_t(shape.state_item_bytes);
  return s;
}

kv_pool::kv_pool(const pool_shape& shape)
    : shape_(shape), sizes_(sizes_of(shape)), kv_(sizes_.kv), aux_(sizes_.aux), state_(sizes_.state) {
  base_ = {kv_.data(), aux_.data(), state_.data()};
  init_free_lists();
}

kv_pool::kv_pool(const pool_shape& shape, const pool_memory& memory)
    : shape_(shape), sizes_(sizes_of(shape)), base_(memory) {
  init_free_lists();
}

void kv_pool::init_free_lists() {
  const auto& shape = shape_;
  free_pages_.reserve(shape.pages);
  for (int p = shape.pages - 1; p >= 0; --p) free_pages_.push_back(p);
  free_state_.reserve(shape.state_pages);
  for (int p = shape.state_pages - 1; p >= 0; --p) free_state_.push_back(p);
  free_aux_.reserve(shape.aux_slots);
  for (int s = shape.aux_slots - 1; s >= 0; --s) free_aux_.push_back(s);
}

std::uint64_t kv_pool::offset(int layer, int buffer, int page) const {
  auto lb = std::uint64_t(layer - shape_.layers.begin) * shape_.buffers_per_layer + buffer;
  return (lb * shape_.pages + std::uint64_t(page)) * std::uint64_t(shape_.item_bytes);
}

namespace {

std::optional<std::vector<std::int32_t>> take(std::vector<std::int32_t>& free, int n) {
  if (n < 0 || n > static_cast<int>(free.size())) return std::nullopt;
  std::vector<std::int32_t> out(free.end() - n, free.end());
  std::reverse(out.begin(), out.end());
  free.resize(free.size() - n);
  return out;
}

void give_back(std::vector<std::int32_t>& free, const std::vector<std::int32_t>& pages) {
  for (auto it = pages.rbegin(); it != pages.rend(); ++it) free.push_back(*it);
}

}  // namespace

std::optional<std::vector<std::int32_t>> kv_pool::alloc_pages(int n) { return take(free_pages_, n); }
void kv_pool::free_pages(const std::vector<std::int32_t>& pages) { give_back(free_pages_, pages); }
std::optional<std::vector<std::int32_t>> kv_pool::alloc_state(int n) { return take(free_state_, n); }
void kv_pool::free_state(const std::vector<std::int32_t>& pages) { give_back(free_state_, pages); }

std::uint64_t kv_pool::state_offset(int layer, int page) const {
  return (std::uint64_t(layer - shape_.layers.begin) * std::uint64_t(shape_.state_pages) +
          std::uint64_t(page)) *
         std::uint64_t(shape_.state_item_bytes);
}

namespace {

pool_shape shape_of(const config::routing_plan& plan, config::range layers, int local_heads,
                    std::int64_t item_bytes, int pages, int aux_slots) {
  const auto& c = plan.config();
  const bool mla = c.model.kind == config::model_kind::mla;
  pool_shape s;
  s.layers = layers;
  s.buffers_per_layer = plan.buffers_per_layer();
  s.item_bytes = item_bytes;
  s.pages = pages;
  s.aux_slots = aux_slots;
  s.page_size = c.page_size;
  s.local_heads = local_heads;
  s.head_bytes = mla ? 0 : c.model.head_bytes();
  // State (MLA only): replicated like the latent KV, one state page per KV page.
  s.state_item_bytes = mla ? std::int64_t{c.page_size} * c.model.state_bytes_per_token : 0;
  s.state_pages = s.state_item_bytes > 0 ? pages : 0;
  return s;
}

}  // namespace

pool_shape prefill_pool_shape(const config::routing_plan& plan, int rank, int pages) {
  const auto& me = plan.prefill(rank);
  return shape_of(plan, me.layers, me.local_heads, plan.prefill_item_bytes(), pages, 0);
}

pool_shape decode_pool_shape(const config::routing_plan& plan, int rank, int pages, int aux_slots) {
  const auto& me = plan.decode(rank);
  return shape_of(plan, me.layers, me.local_heads, plan.decode_item_bytes(), pages, aux_slots);
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
