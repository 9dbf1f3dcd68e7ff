#pragma once
// Turns a chunk (source pages -> destination pages) into transport blocks: pages whose source and
// destination indices are both consecutive form a run, one block per layer buffer per run.
// Every remote-provided index and size is checked against what the peer registered.
#include <cstdint>
#include <vector>

#include "actors/kv_pool.hpp"
#include "config/routing.hpp"
#include "config/status.hpp"
#include "transport/transport.hpp"

namespace kvflow {

// A decode rank's pool as it described it in its registration message.
struct remote_pool {
  std::uint64_t kv_region = 0;
  std::uint64_t kv_bytes = 0;
  std::int32_t layer_begin = 0;
  std::int32_t layer_count = 0;
  std::int32_t buffers_per_layer = 1;
  std::int32_t pages = 0;
  std::int64_t item_bytes = 0;
  std::uint64_t aux_region = 0;
  std::int32_t aux_slots = 0;
  std::int32_t page_size = 0;
  std::int32_t local_heads = 0;
  std::int64_t head_bytes = 0;
  std::uint64_t state_region = 0;  // state pages (e.g. the DSv3.2 indexer cache); 0 pages: none
  std::uint64_t state_bytes = 0;
  std::int32_t state_pages = 0;
  std::int64_t state_item_bytes = 0;
};

remote_pool describe(const kv_pool& pool, std::uint64_t kv_region, std::uint64_t aux_region,
                     std::uint64_t state_region = 0);

// Checks a registration's internal consistency (its sizes add up, nothing overflows).
status check_remote_pool(const remote_pool& r);

struct block_request {
  const std::vector<std::int32_t>* src_pages = nullptr;
  const std::vector<std::int32_t>* dst_pages = nullptr;
  config::range layers;      // global layers to move
  config::head_slice heads;  // MHA slice; ignored for MLA
  bool mla = true;
  bool coalesce = true;      // false: one block per page (for benchmarks)
  // State pages moving with the KV pages (same request pages, MLA): source and destination
  // state indices, or null when the model has no state.
  const std::vector<std::int32_t>* src_state = nullptr;
  const std::vector<std::int32_t>* dst_state = nullptr;
};

// Blocks for `req`, or why the request is invalid (bad index, layer or head range).
result<std::vector<transport::block>> plan_blocks(const kv_pool& src, const remote_pool& dst,
                                                  const block_request& req);

}  // namespace kvflow
