#pragma once
// The synthetic KV content of `kvflow simulate` on whole pools: what a prefill rank writes into
// the pages it will send, and the byte-for-byte check a decode rank makes of what landed.
#include <cstdint>
#include <vector>

#include "config/routing.hpp"
#include "command/sim_memory.hpp"

namespace kvflow::command {

// Pattern slabs of state pages carry this buffer number (KV buffers are 0 and 1).
constexpr int state_buffer = 7;

// What the simulated engine knows of a request.
struct request_view {
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  int n_pages = 0;
  int prefix_pages = 0;
  int prefill_dp = 0;
};

struct verify_counts {
  std::uint64_t bytes_expected = 0;
  std::uint64_t bytes_verified = 0;
  std::uint64_t mismatched_pages = 0;
};

// Prefill rank `rank`: writes the pattern of pages [fill.begin, fill.end) of the request, KV and
// state (when the model has state). `pages` and `state_pages` are indexed by request page.
void fill_pages(const config::routing_plan& plan, int rank, const sim_memory& mem, const request_view& req,
                const std::vector<std::int32_t>& pages, const std::vector<std::int32_t>& state_pages,
                config::range fill);

// The simulated model's first output of a request, which the aux row carries to decode.
sim_aux_row simulated_first_output(const request_view& req);

// Decode rank `rank`: checks every slab each of its peers should have written, and the aux row.
verify_counts verify_pages(const config::routing_plan& plan, int rank, const sim_memory& mem,
                           const request_view& req, const std::vector<std::int32_t>& pages,
                           const std::vector<std::int32_t>& state_pages, std::int32_t aux_slot);

}  // namespace kvflow::command
