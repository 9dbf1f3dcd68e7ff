#pragma once
// Turns a chunk (source pages -> destination pages) into transport blocks: pages whose source and
// destination indices are both consecutive form a run, one block per layer buffer per run.
// Every remote-provided index and size is checked against what the peer registered.
#include <cstdint>
#include <vector>

#include "actors/rank_memory.hpp"
#include "config/routing.hpp"
#include "config/status.hpp"
#include "transport/transport.hpp"

namespace kvflow {

// One buffer of a decode rank as it described it: `bytes` at `offset` of transport region
// `region`, in pages of `page_bytes`.
struct remote_buffer {
  std::uint64_t region = 0;
  std::uint64_t offset = 0;
  std::uint64_t bytes = 0;
  std::uint64_t page_bytes = 0;
};

// A decode rank's memory as it described it in its registration message.
struct remote_pool {
  std::int32_t layer_begin = 0;
  std::int32_t layer_count = 0;
  std::int32_t buffers_per_layer = 1;
  std::int32_t pages = 0;
  std::int64_t item_bytes = 0;
  std::int32_t page_size = 0;
  std::int32_t local_heads = 0;
  std::int64_t head_bytes = 0;
  std::vector<remote_buffer> kv;     // layer-major, buffers_per_layer per layer
  std::vector<remote_buffer> aux;    // aux rows, paired by position with the sender's
  std::int32_t aux_rows = 0;
  std::vector<remote_buffer> state;  // per layer (empty: no state)
  std::int32_t state_pages = 0;
  std::int64_t state_item_bytes = 0;
  remote_buffer receipts;            // one aux_record per aux row (kvflow's own memory)
};

// The shape of `m` as a registration describes it; the buffer lists stay empty (the registering
// rank places each buffer in its transport's regions).
remote_pool describe_shape(const rank_memory& m);

// Checks a registration's internal consistency (its sizes add up, nothing overflows).
status check_remote_pool(const remote_pool& r);

struct block_request {
  const std::vector<std::int32_t>* src_pages = nullptr;
  const std::vector<std::int32_t>* dst_pages = nullptr;
  config::range layers;      // global layers to move (held by both sides)
  config::head_slice heads;  // MHA slice; ignored for MLA
  bool mla = true;
  bool coalesce = true;      // false: one block per page (for benchmarks)
};

// KV blocks for `req`, or why the request is invalid (bad index, layer or head range).
result<std::vector<transport::block>> plan_blocks(const rank_memory& src, const remote_pool& dst,
                                                  const block_request& req);

// State blocks: source state pages -> destination state pages of `layers`, coalesced in runs.
result<std::vector<transport::block>> plan_state_blocks(const rank_memory& src, const remote_pool& dst,
                                                        const std::vector<std::int32_t>& src_state,
                                                        const std::vector<std::int32_t>& dst_state,
                                                        config::range layers, bool coalesce = true);

// Aux rows `src_row` of the sender -> `dst_row` of the receiver (every aux buffer, by position),
// then the receipt of (room, incarnation) from `receipt` (which must outlive the push).
result<std::vector<transport::block>> plan_aux_blocks(const rank_memory& src, const remote_pool& dst,
                                                      int src_row, int dst_row, const aux_record* receipt);

}  // namespace kvflow
