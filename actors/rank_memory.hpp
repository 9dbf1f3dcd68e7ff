#pragma once
// A rank's view of the KV memory its engine owns: one buffer per layer (K and V apart for MHA),
// aux rows, state pages per layer, each in pages of a fixed size. kvflow never allocates or
// chooses pages here; it checks the description against the routing plan and addresses it.
// Pure (no actors).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "config/routing.hpp"
#include "config/status.hpp"

namespace kvflow {

// One engine buffer: page i at base + i * page_bytes, `bytes` in all.
struct buffer_view {
  std::byte* base = nullptr;
  std::uint64_t bytes = 0;
  std::uint64_t page_bytes = 0;
  std::uint64_t pages() const { return page_bytes == 0 ? 0 : bytes / page_bytes; }
};

enum class buffer_kind : std::uint8_t { k, v, latent, aux, state };

// A buffer as the engine described it (the public memory_desc, in kvflow's own types).
struct buffer_spec {
  buffer_view view;
  buffer_kind kind = buffer_kind::latent;
  int layer = -1;
};

// What lands in a decode rank's receipt slot after the aux rows: the request it belongs to and
// a checksum, so a slot that still holds an older request (or nothing) does not count as landed.
// kvflow's own memory, apart from the engine's aux rows.
struct aux_record {
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::uint64_t check = 0;
};
std::uint64_t aux_checksum(const aux_record& r);
aux_record make_receipt(std::uint64_t room, std::uint64_t incarnation);

class rank_memory {
 public:
  // Checks `buffers` against what rank `rank` of `plan` holds: a KV buffer per layer of
  // `layers` (MLA: latent; MHA: K and V) with the plan's page bytes, and state buffers per layer
  // when the model has state. Aux buffers are taken as given (whether the rank needs one is
  // its maker's check).
  static result<rank_memory> create(const config::routing_plan& plan, bool prefill, int rank,
                                    config::range layers, const std::vector<buffer_spec>& buffers);

  config::range layers() const { return layers_; }
  int buffers_per_layer() const { return buffers_per_layer_; }
  std::int64_t item_bytes() const { return item_bytes_; }
  int pages() const { return pages_; }
  int aux_rows() const { return aux_rows_; }
  int state_pages() const { return state_pages_; }
  std::int64_t state_item_bytes() const { return state_item_bytes_; }
  int local_heads() const { return local_heads_; }
  std::int64_t head_bytes() const { return head_bytes_; }
  int page_size() const { return page_size_; }

  // Whatever keeps the engine's buffers alive, when the engine lends kvflow a share in them (the
  // simulator's engines do; a serving engine keeps its memory for the rank's lifetime instead).
  // Pushes hold the rank_memory until they complete.
  std::shared_ptr<const void> owner;

  // Buffer of layer `layer` (global), `buffer` 0 (K / latent) or 1 (V).
  const buffer_view& kv(int layer, int buffer) const {
    return kv_[static_cast<std::size_t>((layer - layers_.begin) * buffers_per_layer_ + buffer)];
  }
  const std::vector<buffer_view>& kv_buffers() const { return kv_; }
  const std::vector<buffer_view>& aux_buffers() const { return aux_; }
  const std::vector<buffer_view>& state_buffers() const { return state_; }  // by layer
  std::byte* item(int layer, int buffer, int page) const {
    return kv(layer, buffer).base + std::uint64_t(page) * std::uint64_t(item_bytes_);
  }
  std::byte* state_item(int layer, int page) const {
    return state_[static_cast<std::size_t>(layer - layers_.begin)].base +
           std::uint64_t(page) * std::uint64_t(state_item_bytes_);
  }

 private:
  config::range layers_;
  int buffers_per_layer_ = 1;
  std::int64_t item_bytes_ = 0;
  int pages_ = 0;
  int aux_rows_ = 0;
  int state_pages_ = 0;
  std::int64_t state_item_bytes_ = 0;
  int local_heads_ = 0;
  std::int64_t head_bytes_ = 0;
  int page_size_ = 0;
  std::vector<buffer_view> kv_, aux_, state_;
};

}  // namespace kvflow
