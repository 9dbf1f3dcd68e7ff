#include "command/sim_memory.hpp"

#include <unistd.h>

#include <algorithm>

namespace kvflow::command {

page_allocator::page_allocator(int n) : total_(n) {
  free_.reserve(static_cast<std::size_t>(n));
  for (int p = n - 1; p >= 0; --p) free_.push_back(p);
}

std::optional<std::vector<std::int32_t>> page_allocator::take(int n) {
  if (n < 0 || n > static_cast<int>(free_.size())) return std::nullopt;
  std::vector<std::int32_t> out(free_.end() - n, free_.end());
  std::reverse(out.begin(), out.end());
  free_.resize(free_.size() - static_cast<std::size_t>(n));
  return out;
}

void page_allocator::give_back(const std::vector<std::int32_t>& pages) {
  for (auto it = pages.rbegin(); it != pages.rend(); ++it) free_.push_back(*it);
}

sim_memory::region sim_memory::make(std::uint64_t bytes, std::uint64_t owner) {
  region r;
  r.bytes = bytes;
  if (transport_ && bytes > 0)
    if (auto a = transport_->allocate_memory(owner, bytes)) {
      r.base = a->base;
      r.id = a->desc.id;
      return r;
    }
  r.mapped = cuda::host_memory(bytes);
  r.base = r.mapped.data();
  return r;
}

void sim_memory::prefault() {
  const auto step = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  for (auto* r : {&kv_, &state_, &aux_})
    for (std::uint64_t off = 0; off < r->bytes; off += step) {
      // A read-modify-write of the byte there: it may already hold data (not here, at start).
      volatile std::byte* p = r->base + off;
      *p = *p;
    }
}

bool sim_memory::holds(const std::byte* p) const {
  for (const auto* r : {&kv_, &state_, &aux_})
    if (r->base != nullptr && p >= r->base && p < r->base + r->bytes) return true;
  return false;
}

sim_memory::~sim_memory() {
  for (auto* r : {&kv_, &state_, &aux_})
    if (r->id != 0) transport_->deregister_memory(r->id);
}

sim_memory::sim_memory(const config::routing_plan& plan, bool prefill, int rank, int npages, int rows,
                       std::shared_ptr<transport::transport> t)
    : layers_(prefill ? plan.prefill(rank).layers : plan.decode(rank).layers),
      bpl_(plan.buffers_per_layer()),
      npages_(npages),
      item_(prefill ? plan.prefill_item_bytes() : plan.decode_item_bytes()),
      transport_(prefill ? nullptr : std::move(t)) {  // only decode memory is written by peers
  const auto& c = plan.config();
  if (c.model.kind == config::model_kind::mla) state_item_ = std::int64_t{c.page_size} * c.model.state_bytes_per_token;
  const auto nl = static_cast<std::uint64_t>(layers_.size());
  const auto per_buffer = std::uint64_t(npages) * std::uint64_t(item_);
  const auto owner = static_cast<std::uint64_t>(rank);
  kv_ = make(nl * bpl_ * per_buffer, owner);
  if (state_item_ > 0) state_ = make(nl * std::uint64_t(npages) * std::uint64_t(state_item_), owner);
  aux_ = make(std::uint64_t(std::max(rows, 1)) * sim_aux_row_bytes, owner);
  pages = page_allocator(npages);
  state_pages = page_allocator(state_item_ > 0 ? npages : 0);
  aux_rows = page_allocator(rows);
  desc_.layer_begin = layers_.begin;
  desc_.layer_end = layers_.end;
  const bool mla = c.model.kind == config::model_kind::mla;
  for (int l = layers_.begin; l < layers_.end; ++l)
    for (int b = 0; b < bpl_; ++b) {
      buffer_desc d;
      d.base = item(l, b, 0);
      d.bytes = per_buffer;
      d.page_bytes = std::uint64_t(item_);
      d.role = mla ? buffer_role::mla_latent : (b == 0 ? buffer_role::k : buffer_role::v);
      d.layer = l;
      desc_.buffers.push_back(d);
    }
  for (int l = layers_.begin; l < layers_.end && state_item_ > 0; ++l) {
    buffer_desc d;
    d.base = state_item(l, 0);
    d.bytes = std::uint64_t(npages) * std::uint64_t(state_item_);
    d.page_bytes = std::uint64_t(state_item_);
    d.role = buffer_role::state;
    d.layer = l;
    desc_.buffers.push_back(d);
  }
  if (rows > 0) {
    buffer_desc d;
    d.base = aux_.base;
    d.bytes = std::uint64_t(std::max(rows, 1)) * sim_aux_row_bytes;
    d.page_bytes = sim_aux_row_bytes;
    d.role = buffer_role::aux;
    desc_.buffers.push_back(d);
  }
}

std::byte* sim_memory::item(int layer, int buffer, int page) const {
  const auto lb = std::uint64_t(layer - layers_.begin) * bpl_ + buffer;
  return kv_.base + (lb * std::uint64_t(npages_) + std::uint64_t(page)) * std::uint64_t(item_);
}

std::byte* sim_memory::state_item(int layer, int page) const {
  return state_.base +
         (std::uint64_t(layer - layers_.begin) * std::uint64_t(npages_) + std::uint64_t(page)) * std::uint64_t(state_item_);
}

}  // namespace kvflow::command
