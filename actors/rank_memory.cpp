#include "actors/rank_memory.hpp"

#include <algorithm>
#include <cstring>
#include <string>

namespace kvflow {

std::uint64_t aux_checksum(const aux_record& r) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  auto mix = [&](std::uint64_t v) { h = (h ^ v) * 0x100000001b3ULL; };
  mix(r.room);
  mix(r.incarnation);
  return h | 1;  // never 0, the value of an empty slot
}

aux_record make_receipt(std::uint64_t room, std::uint64_t incarnation) {
  aux_record r{room, incarnation, 0};
  r.check = aux_checksum(r);
  return r;
}

namespace {

const char* kind_name(buffer_kind k) {
  switch (k) {
    case buffer_kind::k: return "K";
    case buffer_kind::v: return "V";
    case buffer_kind::latent: return "MLA latent";
    case buffer_kind::aux: return "aux";
    case buffer_kind::state: return "state";
  }
  return "?";
}

}  // namespace

result<rank_memory> rank_memory::create(const config::routing_plan& plan, bool prefill, int rank,
                                        config::range layers, const std::vector<buffer_spec>& buffers) {
  const auto& c = plan.config();
  const bool mla = c.model.kind == config::model_kind::mla;
  rank_memory m;
  if (layers.begin < 0 || layers.end > c.model.layers || layers.empty())
    return status::error("memory: layers [" + std::to_string(layers.begin) + ", " + std::to_string(layers.end) +
                         ") outside the model's " + std::to_string(c.model.layers));
  m.layers_ = layers;
  m.buffers_per_layer_ = plan.buffers_per_layer();
  m.item_bytes_ = prefill ? plan.prefill_item_bytes() : plan.decode_item_bytes();
  m.local_heads_ = prefill ? plan.prefill(rank).local_heads : plan.decode(rank).local_heads;
  m.head_bytes_ = mla ? 0 : c.model.head_bytes();
  m.page_size_ = c.page_size;
  m.state_item_bytes_ = mla ? std::int64_t{c.page_size} * c.model.state_bytes_per_token : 0;
  const std::size_t nl = static_cast<std::size_t>(layers.size());
  m.kv_.assign(nl * static_cast<std::size_t>(m.buffers_per_layer_), buffer_view{});
  if (m.state_item_bytes_ > 0) m.state_.assign(nl, buffer_view{});
  auto where = [](const buffer_spec& b) {
    return std::string(kind_name(b.kind)) + " buffer of layer " + std::to_string(b.layer);
  };
  for (const auto& b : buffers) {
    if (b.view.base == nullptr || b.view.bytes == 0 || b.view.page_bytes == 0)
      return status::error("memory: " + where(b) + " has no base, length or page size");
    if (b.kind == buffer_kind::aux) {
      m.aux_.push_back(b.view);
      continue;
    }
    if (b.layer < layers.begin || b.layer >= layers.end)
      return status::error("memory: " + where(b) + " outside the rank's layers [" + std::to_string(layers.begin) +
                           ", " + std::to_string(layers.end) + ")");
    const auto li = static_cast<std::size_t>(b.layer - layers.begin);
    buffer_view* slot = nullptr;
    std::int64_t want = m.item_bytes_;
    if (b.kind == buffer_kind::state) {
      if (m.state_.empty()) return status::error("memory: " + where(b) + ", but the model has no state");
      slot = &m.state_[li];
      want = m.state_item_bytes_;
    } else if (mla != (b.kind == buffer_kind::latent)) {
      return status::error(std::string("memory: ") + where(b) + " for an " + (mla ? "MLA" : "MHA") + " model");
    } else {
      slot = &m.kv_[li * static_cast<std::size_t>(m.buffers_per_layer_) + (b.kind == buffer_kind::v ? 1 : 0)];
    }
    if (slot->base != nullptr) return status::error("memory: two " + where(b) + "s");
    if (b.view.page_bytes != static_cast<std::uint64_t>(want))
      return status::error("memory: " + where(b) + " has pages of " + std::to_string(b.view.page_bytes) +
                           " B, the topology needs " + std::to_string(want) + " B");
    *slot = b.view;
  }
  std::uint64_t pages = UINT64_MAX, state_pages = UINT64_MAX, rows = UINT64_MAX;
  for (std::size_t i = 0; i < m.kv_.size(); ++i) {
    if (m.kv_[i].base == nullptr)
      return status::error("memory: no " + std::string(mla ? "MLA latent" : (i % 2 ? "V" : "K")) +
                           " buffer for layer " + std::to_string(layers.begin + static_cast<int>(i) / m.buffers_per_layer_));
    pages = std::min(pages, m.kv_[i].pages());
  }
  for (std::size_t i = 0; i < m.state_.size(); ++i) {
    if (m.state_[i].base == nullptr)
      return status::error("memory: no state buffer for layer " + std::to_string(layers.begin + static_cast<int>(i)));
    state_pages = std::min(state_pages, m.state_[i].pages());
  }
  for (const auto& a : m.aux_) rows = std::min(rows, a.pages());
  const std::uint64_t cap = INT32_MAX;
  m.pages_ = static_cast<int>(std::min(pages, cap));
  m.state_pages_ = m.state_.empty() ? 0 : static_cast<int>(std::min(state_pages, cap));
  m.aux_rows_ = m.aux_.empty() ? 0 : static_cast<int>(std::min(rows, cap));
  return m;
}

}  // namespace kvflow
