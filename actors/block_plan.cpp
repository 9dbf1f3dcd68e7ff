#include "actors/block_plan.hpp"

#include <limits>
#include <string>

namespace kvflow {

remote_pool describe(const kv_pool& pool, std::uint64_t kv_region, std::uint64_t aux_region) {
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
  return r;
}

status check_remote_pool(const remote_pool& r) {
  if (r.layer_begin < 0 || r.layer_count < 0 || r.pages < 0 || r.item_bytes < 0 ||
      r.aux_slots < 0 || r.buffers_per_layer < 1 || r.buffers_per_layer > 2 || r.local_heads < 0 ||
      r.head_bytes < 0 || r.page_size < 0)
    return status::error("registration has a negative or out-of-range size field");
  if (std::int64_t{r.layer_begin} + r.layer_count > std::numeric_limits<std::int32_t>::max())
    return status::error("registration's layer range overflows");
  // layers * buffers * pages * item must fit in the region it claims (and not overflow).
  unsigned __int128 need = static_cast<unsigned __int128>(r.layer_count) * r.buffers_per_layer *
                           static_cast<unsigned __int128>(r.pages) * r.item_bytes;
  if (need > r.kv_bytes)
    return status::error("registration describes " + std::to_string(static_cast<std::uint64_t>(need)) +
                         " KV bytes in a region of " + std::to_string(r.kv_bytes));
  if (r.local_heads > 0 && static_cast<__int128>(r.local_heads) * r.page_size * r.head_bytes !=
                               static_cast<__int128>(r.item_bytes))
    return status::error("registration: heads x page size x head bytes != item bytes");
  return {};
}

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
    return (lb * std::uint64_t(dst.pages) + std::uint64_t(page)) * std::uint64_t(dst.item_bytes);
  };

  std::vector<transport::block> out;
  std::size_t i = 0;
  while (i < sp.size()) {
    std::size_t j = i + 1;
    if (whole && req.coalesce)
      while (j < sp.size() && sp[j] == sp[j - 1] + 1 && dp[j] == dp[j - 1] + 1) ++j;
    const auto run = static_cast<std::uint64_t>(j - i);
    for (int l = req.layers.begin; l < req.layers.end; ++l)
      for (int b = 0; b < s.buffers_per_layer; ++b) {
        transport::block blk;
        blk.src = src.item(l, b, sp[i]) + src_in;
        blk.region = dst.kv_region;
        blk.offset = dst_offset(l, b, dp[i]) + dst_in;
        blk.len = whole ? run * std::uint64_t(len) : std::uint64_t(len);
        if (blk.offset + blk.len > dst.kv_bytes)
          return status::error("block exceeds the destination's registered region");
        out.push_back(blk);
      }
    i = j;
  }
  return out;
}

}  // namespace kvflow
