#pragma once
// A rank's KV memory: pages of every layer buffer it holds, plus aux metadata slots, with the
// page/slot allocators the scheduler uses. Pure (no actors); the rank actor owns one.
#include <cstdint>
#include <optional>
#include <vector>

#include "config/routing.hpp"
#include "cuda/host_memory.hpp"

namespace kvflow {

// What the aux slot of a request holds once the prefill side finished (first output token,
// its logprob, and the room so decode can tell the slot really landed).
struct aux_record {
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::int32_t first_token = 0;
  float first_logprob = 0.f;
  std::uint64_t check = 0;  // hash of the fields above: a torn or stale slot is not "landed"
};

struct pool_shape {
  config::range layers;        // global layer indices held
  int buffers_per_layer = 1;   // 1 for MLA, 2 (K, V) for MHA
  std::int64_t item_bytes = 0; // one page of one layer buffer
  int pages = 0;
  int aux_slots = 0;
  int page_size = 0;
  int local_heads = 0;         // MHA: heads per page, head-major within a page
  std::int64_t head_bytes = 0; // MHA: bytes of one head of one token
  std::int64_t state_item_bytes = 0;  // one state page of one layer (0: the model has no state)
  int state_pages = 0;
};

// The pool of a prefill / decode rank of `plan` holding `pages` KV pages (and as many state
// pages when the model carries state).
pool_shape prefill_pool_shape(const config::routing_plan& plan, int rank, int pages);
pool_shape decode_pool_shape(const config::routing_plan& plan, int rank, int pages, int aux_slots);

// Bytes of each region of a pool of `shape`.
struct pool_sizes {
  std::uint64_t kv = 0, aux = 0, state = 0;
};
pool_sizes sizes_of(const pool_shape& shape);

// Memory a pool lives in when it does not map its own (e.g. shared memory the transport
// allocated so that same-host peers write into it directly). Not owned by the pool.
struct pool_memory {
  std::byte* kv = nullptr;
  std::byte* aux = nullptr;
  std::byte* state = nullptr;
};

class kv_pool {
 public:
  explicit kv_pool(const pool_shape& shape);
  // A pool in `memory`, which must hold sizes_of(shape) bytes per region and outlive the pool.
  kv_pool(const pool_shape& shape, const pool_memory& memory);

  const pool_shape& shape() const { return shape_; }
  std::byte* kv_base() const { return base_.kv; }
  std::uint64_t kv_bytes() const { return sizes_.kv; }
  std::byte* aux_base() const { return base_.aux; }
  std::uint64_t aux_bytes() const { return sizes_.aux; }
  std::byte* state_base() const { return base_.state; }
  std::uint64_t state_bytes() const { return sizes_.state; }

  // Byte offset of page `page` of buffer `buffer` of global layer `layer` in the KV region.
  std::uint64_t offset(int layer, int buffer, int page) const;
  std::byte* item(int layer, int buffer, int page) const { return kv_base() + offset(layer, buffer, page); }
  std::uint64_t aux_offset(int slot) const { return std::uint64_t(slot) * sizeof(aux_record); }
  // Byte offset of state page `page` of global layer `layer` in the state region.
  std::uint64_t state_offset(int layer, int page) const;
  std::byte* state_item(int layer, int page) const { return state_base() + state_offset(layer, page); }

  // LIFO allocators: recently freed pages come back first (keeps resident memory small and
  // makes page lists non-consecutive after churn, as in a real pool).
  std::optional<std::vector<std::int32_t>> alloc_pages(int n);
  void free_pages(const std::vector<std::int32_t>& pages);
  std::optional<std::int32_t> alloc_aux();
  void free_aux(std::int32_t slot);
  std::optional<std::vector<std::int32_t>> alloc_state(int n);
  void free_state(const std::vector<std::int32_t>& pages);
  int used_pages() const { return shape_.pages - static_cast<int>(free_pages_.size()); }
  int used_aux() const { return shape_.aux_slots - static_cast<int>(free_aux_.size()); }
  int used_state_pages() const { return shape_.state_pages - static_cast<int>(free_state_.size()); }

 private:
  void init_free_lists();
  pool_shape shape_;
  pool_sizes sizes_;
  cuda::host_memory kv_, aux_, state_;  // own mappings (empty when in external memory)
  pool_memory base_;
  std::vector<std::int32_t> free_pages_;
  std::vector<std::int32_t> free_aux_;
  std::vector<std::int32_t> free_state_;
};

std::uint64_t aux_checksum(const aux_record& r);

}  // namespace kvflow
