#pragma once
// The synthetic KV content of `kvflow simulate` on whole pools: what a prefill rank writes into
// the pages it will send, and the byte-for-byte check a decode rank makes of what landed.
#include <cstdint>
#include <vector>

#include "actors/kv_pool.hpp"
#include "actors/rank.hpp"
#include "config/routing.hpp"

namespace kvflow::runtime {

// Pattern slabs of state pages carry this buffer number (KV buffers are 0 and 1).
constexpr int state_buffer = 7;

// Prefill rank `rank`: writes the pattern of pages [fill.begin, fill.end) of the request, KV and
// state (when the model has state).
void fill_pages(const config::routing_plan& plan, int rank, kv_pool& pool, const request_view& req,
                const std::vector<std::int32_t>& pages, const std::vector<std::int32_t>& state_pages,
                config::range fill);

// The simulated model's first output of a request, which the aux slot carries to decode.
aux_record simulated_first_output(const request_view& req);

// Decode rank `rank`: checks every slab each of its peers should have written, and the aux slot.
verify_counts verify_pages(const config::routing_plan& plan, int rank, const kv_pool& pool,
                           const request_view& req, const std::vector<std::int32_t>& pages,
                           const std::vector<std::int32_t>& state_pages, std::int32_t aux_slot);

}  // namespace kvflow::runtime
