#include "actors/block_plan.hpp"

#include <limits>
#include <string>

namespace kvflow {

remote_pool describe(const kv_pool& pool, std::uint64_t kv_region, std::uint64_t aux_region,
                     std::uint64_t state_region) {
  const auto& s = pool.shape();
  remote_pool r;
  r.kv_region = kv_region;
  r.kv_bytes = pool.kv_bytes();
  r.layer_begin = s.layers.begin;
  r.layer_count = s.layers.size();
  r.buffers_per_layer = s.buffers_per_layer;
  r.pages = s.pages;
  r.item_bytes = s.item_bytes;
  r.aux_region = aux_region;
  r.aux_slots = s.aux_slots;
  r.page_size = s.page_size;
  r.local_heads = s.local_heads;
  r.head_bytes = s.head_bytes;
  r.state_region = state_region;
  r.state_bytes = pool.state_bytes();
  r.state_pages = s.state_pages;
  r.state_item_bytes = s.state_item_bytes;
  return r;
}

status check_remote_pool(const remote_pool& r) {
  if (r.layer_begin < 0 || r.layer_count < 0 || r.pages < 0 || r.item_bytes < 0 ||
      r.aux_slots < 0 || r.buffers_per_layer < 1 || r.buffers_per_layer > 2 || r.local_heads < 0 ||
      r.head_bytes < 0 || r.page_size < 0 || r.state_pages < 0 || r.state_item_bytes < 0)
    return status::error("registration has a negative or out-of-range size field");
  if (std::int64_t{r.layer_begin} + r.layer_count > std::numeric_limits<std::int32_t>::max())
    return status::error("registration's layer range overflows");
  // layers * buffers * pages * item must fit in the region it claims (and not overflow).
  unsigned __int128 need = static_cast<unsigned __int128>(r.layer_count) * r.buffers_per_layer *
                           static_cast<unsigned __int128>(r.pages) * r.item_bytes;
  if (need > r.kv_bytes)
    return status::error("registration describes " + std::to_string(static_cast<std::uint64_t>(need)) +
                         " KV bytes in a region of " + std::to_string(r.kv_bytes));
  unsigned __int128 state = static_cast<unsigned __int128>(r.layer_count) *
                           static_cast<unsigned __int128>(r.state_pages) * r.state_item_bytes;
  if (state > r.state_bytes)
    return status::error("registration describes " + std::to_string(static_cast<std::uint64_t>(state)) +
                         " state bytes in a region of " + std::to_string(r.state_bytes));
  if (r.local_heads > 0 && static_cast<__int128>(r.local_heads) * r.page_size * r.head_bytes !=
                               static_cast<__int128>(r.item_bytes))
    return status::error("registration: heads x page size x head bytes != item bytes");
  return {};
}

namespace {

struct region_bounds {
  std::uint64_t id = 0;
  std::uint64_t bytes = 0;
};

// One block per layer (and buffer) per run of pages consecutive on both sides (or per page when
// `coalesce` is off), each checked against the destination region's registered size.
template <class SrcAt, class DstOffset>
status append_runs(std::vector<transport::block>& out, const std::vector<std::int32_t>& sp,
                   const std::vector<std::int32_t>& dp, config::range layers, int buffers,
                   std::uint64_t len, bool coalesce, region_bounds region, SrcAt src_at,
                   DstOffset dst_offset) {
  std::size_t i = 0;
  while (i < sp.size()) {
    std::size_t j = i + 1;
    if (coalesce)
      while (j < sp.size() && sp[j] == sp[j - 1] + 1 && dp[j] == dp[j - 1] + 1) ++j;
    const auto run = static_cast<std::uint64_t>(j - i);
    for (int l = layers.begin; l < layers.end; ++l)
      for (int b = 0; b < buffers; ++b) {
        transport::block blk;
        blk.src = src_at(l, b, sp[i]);
        blk.region = region.id;
        blk.offset = dst_offset(l, b, dp[i]);
        blk.len = run * len;
        if (blk.offset + blk.len > region.bytes)
          return status::error("block exceeds the destination's registered region");
        out.push_back(blk);
      }
    i = j;
  }
  return {};
}

}  // namespace

result<std::vector<transport::block>> plan_blocks(const kv_pool& src, const remote_pool& dst,
                                                  const block_request& req) {
  const auto& s = src.shape();
  const auto& sp = *req.src_pages;
  const auto& dp = *req.dst_pages;
  if (sp.size() != dp.size())
    return status::error("chunk has " + std::to_string(sp.size()) + " source pages but " +
                         std::to_string(dp.size()) + " destination pages");
  if (req.layers.begin < s.layers.begin || req.layers.end > s.layers.end)
    return status::error("layers outside this rank's layers");
  if (req.layers.begin < dst.layer_begin || req.layers.end > dst.layer_begin + dst.layer_count)
    return status::error("layers [" + std::to_string(req.layers.begin) + ", " +
                         std::to_string(req.layers.end) + ") outside the destination's [" +
                         std::to_string(dst.layer_begin) + ", " +
                         std::to_string(dst.layer_begin + dst.layer_count) + ")");
  if (dst.buffers_per_layer != s.buffers_per_layer)
    return status::error("destination layout has " + std::to_string(dst.buffers_per_layer) +
                         " buffers per layer, source " + std::to_string(s.buffers_per_layer));
  for (auto p : sp)
    if (p < 0 || p >= s.pages) return status::error("source page " + std::to_string(p) + " out of range");
  for (auto p : dp)
    if (p < 0 || p >= dst.pages)
      return status::error("destination page " + std::to_string(p) + " out of range [0, " +
                           std::to_string(dst.pages) + ")");

  // Bytes moved per page, and where they start inside the source and destination items.
  std::int64_t len = 0, src_in = 0, dst_in = 0;
  if (req.mla) {
    if (dst.item_bytes != s.item_bytes)
      return status::error("destination item of " + std::to_string(dst.item_bytes) +
                           " bytes, source " + std::to_string(s.item_bytes) +
                           " (page size or dtype mismatch)");
    len = s.item_bytes;
  } else {
    const auto& h = req.heads;
    if (dst.head_bytes != s.head_bytes || dst.page_size != s.page_size)
      return status::error("destination head bytes or page size differ from the source");
    if (h.count <= 0 || h.src_begin < 0 || h.src_begin + h.count > s.local_heads ||
        h.dst_begin < 0 || h.dst_begin + h.count > dst.local_heads)
      return status::error("head slice outside the registered heads");
    const std::int64_t per_head = std::int64_t(s.page_size) * s.head_bytes;
    len = h.count * per_head;
    src_in = h.src_begin * per_head;
    dst_in = h.dst_begin * per_head;
  }
  const bool whole = len == s.item_bytes && len == dst.item_bytes;
  auto dst_offset = [&](int layer, int buffer, std::int64_t page) {
    auto lb = std::uint64_t(layer - dst.layer_begin) * dst.buffers_per_layer + buffer;
    return (lb * std::uint64_t(dst.pages) + std::uint64_t(page)) * std::uint64_t(dst.item_bytes) + dst_in;
  };
  std::vector<transport::block> out;
  auto kv = append_runs(out, sp, dp, req.layers, s.buffers_per_layer, std::uint64_t(len),
                        whole && req.coalesce, {dst.kv_region, dst.kv_bytes},
                        [&](int l, int b, int page) { return src.item(l, b, page) + src_in; }, dst_offset);
  if (!kv) return kv;

  if (req.src_state == nullptr || req.dst_state == nullptr) return out;
  const auto& ss = *req.src_state;
  const auto& ds = *req.dst_state;
  if (ss.size() != sp.size() || ds.size() != dp.size())
    return status::error("state index list of " + std::to_string(ds.size()) + " for " +
                         std::to_string(dp.size()) + " pages");
  if (ss.empty()) return out;
  if (dst.state_item_bytes != s.state_item_bytes)
    return status::error("destination state page of " + std::to_string(dst.state_item_bytes) +
                         " bytes, source " + std::to_string(s.state_item_bytes));
  for (auto p : ss)
    if (p < 0 || p >= s.state_pages) return status::error("source state page " + std::to_string(p) + " out of range");
  for (auto p : ds)
    if (p < 0 || p >= dst.state_pages)
      return status::error("destination state page " + std::to_string(p) + " out of range [0, " +
                           std::to_string(dst.state_pages) + ")");
  auto state_offset = [&](int layer, int, std::int64_t page) {
    return (std::uint64_t(layer - dst.layer_begin) * std::uint64_t(dst.state_pages) + std::uint64_t(page)) *
           std::uint64_t(dst.state_item_bytes);
  };
  auto st = append_runs(out, ss, ds, req.layers, 1, std::uint64_t(s.state_item_bytes), req.coalesce,
                        {dst.state_region, dst.state_bytes},
                        [&](int l, int, int page) { return src.state_item(l, page); }, state_offset);
  if (!st) return st;
  return out;
}

}  // namespace kvflow
