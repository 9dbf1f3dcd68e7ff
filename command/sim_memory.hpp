#pragma once
// The KV memory of one simulated engine rank, as a serving engine would hold it: one buffer per
// layer (K and V apart for MHA), state pages per layer, aux rows; LIFO page allocators (recently
// freed pages come back first, so page lists stop being consecutive after churn, as in a real
// pool). Sparse host mappings: pages never touched cost no resident memory.
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "config/routing.hpp"
#include "cuda/host_memory.hpp"
#include "kvflow/kvflow.hpp"
#include "transport/transport.hpp"

namespace kvflow::command {

class page_allocator {
 public:
  explicit page_allocator(int n = 0);
  std::optional<std::vector<std::int32_t>> take(int n);
  void give_back(const std::vector<std::int32_t>& pages);
  int used() const { return total_ - static_cast<int>(free_.size()); }
  int total() const { return total_; }

 private:
  int total_ = 0;
  std::vector<std::int32_t> free_;
};

// What an aux row of the simulated model holds: the request and its first output token.
struct sim_aux_row {
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::int32_t first_token = 0;
  float first_logprob = 0.f;
};
constexpr std::uint64_t sim_aux_row_bytes = 64;

class sim_memory {
 public:
  // The memory of rank `rank` (prefill or decode) with `pages` KV pages (and as many state pages
  // when the model has state) and `aux_rows` aux rows, over the layers the plan gives it. With a
  // transport that allocates memory its peers write fastest (UCX: shared memory), each region
  // comes from it; else from sparse anonymous mappings.
  sim_memory(const config::routing_plan& plan, bool prefill, int rank, int pages, int aux_rows,
             std::shared_ptr<transport::transport> t = nullptr);
  ~sim_memory();
  sim_memory(const sim_memory&) = delete;
  sim_memory& operator=(const sim_memory&) = delete;

  const memory_desc& desc() const { return desc_; }
  config::range layers() const { return layers_; }
  int buffers_per_layer() const { return bpl_; }
  std::int64_t item_bytes() const { return item_; }
  std::int64_t state_item_bytes() const { return state_item_; }
  bool has_state() const { return state_item_ > 0; }
  std::byte* item(int layer, int buffer, int page) const;
  std::byte* state_item(int layer, int page) const;
  std::byte* aux_row(int row) const { return aux_.base + std::uint64_t(row) * sim_aux_row_bytes; }
  // Touches every page of the memory once, so that its resident size no longer grows with the
  // pages requests happen to use first (a soak measures the growth that is left).
  void prefault();
  // Whether `p` lies in this rank's memory (the simulator drops a killed rank's pushes by it).
  bool holds(const std::byte* p) const;

  page_allocator pages, state_pages, aux_rows;

 private:
  config::range layers_;
  int bpl_ = 1, npages_ = 0;
  std::int64_t item_ = 0, state_item_ = 0;
  // One region: from the transport when it allocates, else mapped here.
  struct region {
    cuda::host_memory mapped;
    std::byte* base = nullptr;
    std::uint64_t id = 0;  // the transport's allocation (0: mapped)
    std::uint64_t bytes = 0;
  };
  region make(std::uint64_t bytes, std::uint64_t owner);
  std::shared_ptr<transport::transport> transport_;
  region kv_, state_, aux_;
  memory_desc desc_;
};

}  // namespace kvflow::command
