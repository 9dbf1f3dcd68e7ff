#include "actors/block_plan.hpp"

#include <limits>
#include <string>

namespace kvflow {
namespace {

using u128 = unsigned __int128;

status check_buffers(const std::vector<remote_buffer>& bufs, std::int64_t page_bytes, std::int64_t pages,
                     const char* what) {
  for (const auto& b : bufs) {
    if (b.page_bytes != static_cast<std::uint64_t>(page_bytes))
      return status::error(std::string("registration: ") + what + " buffer with pages of " +
                           std::to_string(b.page_bytes) + " B, expected " + std::to_string(page_bytes));
    if (static_cast<u128>(b.offset) + b.bytes > std::numeric_limits<std::uint64_t>::max())
      return status::error(std::string("registration: ") + what + " buffer overflows its region");
    if (static_cast<u128>(pages) * static_cast<std::uint64_t>(page_bytes) > b.bytes)
      return status::error(std::string("registration: ") + what + " buffer of " + std::to_string(b.bytes) +
                           " B cannot hold " + std::to_string(pages) + " pages");
  }
  return {};
}

}  // namespace

remote_pool describe_shape(const rank_memory& m) {
  remote_pool p;
  p.layer_begin = m.layers().begin;
  p.layer_count = m.layers().size();
  p.buffers_per_layer = m.buffers_per_layer();
  p.pages = m.pages();
  p.item_bytes = m.item_bytes();
  p.page_size = m.page_size();
  p.local_heads = m.local_heads();
  p.head_bytes = m.head_bytes();
  p.aux_rows = m.aux_rows();
  p.state_pages = m.state_pages();
  p.state_item_bytes = m.state_item_bytes();
  return p;
}

status check_remote_pool(const remote_pool& r) {
  if (r.layer_begin < 0 || r.layer_count < 0 || r.pages < 0 || r.item_bytes < 0 || r.aux_rows < 0 ||
      r.buffers_per_layer < 1 || r.buffers_per_layer > 2 || r.local_heads < 0 || r.head_bytes < 0 ||
      r.page_size < 0 || r.state_pages < 0 || r.state_item_bytes < 0)
    return status::error("registration has a negative or out-of-range size field");
  if (std::int64_t{r.layer_begin} + r.layer_count > std::numeric_limits<std::int32_t>::max())
    return status::error("registration's layer range overflows");
  if (static_cast<std::int64_t>(r.kv.size()) != std::int64_t{r.layer_count} * r.buffers_per_layer)
    return status::error("registration lists " + std::to_string(r.kv.size()) + " KV buffers for " +
                         std::to_string(r.layer_count) + " layers");
  if (!r.state.empty() && static_cast<std::int64_t>(r.state.size()) != r.layer_count)
    return status::error("registration lists " + std::to_string(r.state.size()) + " state buffers for " +
                         std::to_string(r.layer_count) + " layers");
  if (auto s = check_buffers(r.kv, r.item_bytes, r.pages, "KV"); !s) return s;
  if (auto s = check_buffers(r.state, r.state_item_bytes, r.state_pages, "state"); !s) return s;
  auto wraps = [](const remote_buffer& b) {
    return static_cast<u128>(b.offset) + b.bytes > std::numeric_limits<std::uint64_t>::max();
  };
  for (const auto& a : r.aux) {
    if (wraps(a)) return status::error("registration: aux buffer overflows its region");
    if (a.page_bytes == 0 || static_cast<u128>(r.aux_rows) * a.page_bytes > a.bytes)
      return status::error("registration: an aux buffer cannot hold " + std::to_string(r.aux_rows) + " rows");
  }
  if (wraps(r.receipts)) return status::error("registration: receipts overflow their region");
  if (static_cast<u128>(r.aux_rows) * sizeof(aux_record) > r.receipts.bytes)
    return status::error("registration: receipts cannot hold " + std::to_string(r.aux_rows) + " slots");
  if (r.local_heads > 0 && static_cast<__int128>(r.local_heads) * r.page_size * r.head_bytes !=
                               static_cast<__int128>(r.item_bytes))
    return status::error("registration: heads x page size x head bytes != item bytes");
  return {};
}

namespace {

// One block per layer (and buffer) per run of pages consecutive on both sides (or per page when
// `coalesce` is off), each checked against the destination buffer's registered length.
template <class SrcAt, class DstBuf>
status append_runs(std::vector<transport::block>& out, const std::vector<std::int32_t>& sp,
                   const std::vector<std::int32_t>& dp, config::range layers, int buffers,
                   std::uint64_t len, std::uint64_t dst_item, std::uint64_t dst_in, bool coalesce,
                   SrcAt src_at, DstBuf dst_buf) {
  std::size_t i = 0;
  while (i < sp.size()) {
    std::size_t j = i + 1;
    if (coalesce)
      while (j < sp.size() && sp[j] == sp[j - 1] + 1 && dp[j] == dp[j - 1] + 1) ++j;
    const auto run = static_cast<std::uint64_t>(j - i);
    for (int l = layers.begin; l < layers.end; ++l)
      for (int b = 0; b < buffers; ++b) {
        const remote_buffer& d = dst_buf(l, b);
        transport::block blk;
        blk.src = src_at(l, b, sp[i]);
        blk.region = d.region;
        const std::uint64_t in = std::uint64_t(dp[i]) * dst_item + dst_in;
        blk.len = run * len;
        if (in + blk.len > d.bytes) return status::error("block exceeds the destination's registered buffer");
        blk.offset = d.offset + in;
        out.push_back(blk);
      }
    i = j;
  }
  return {};
}

status check_layers(const rank_memory& src, const remote_pool& dst, config::range layers) {
  if (layers.begin < src.layers().begin || layers.end > src.layers().end)
    return status::error("layers outside this rank's layers");
  if (layers.begin < dst.layer_begin || layers.end > dst.layer_begin + dst.layer_count)
    return status::error("layers [" + std::to_string(layers.begin) + ", " + std::to_string(layers.end) +
                         ") outside the destination's [" + std::to_string(dst.layer_begin) + ", " +
                         std::to_string(dst.layer_begin + dst.layer_count) + ")");
  return {};
}

status check_pages(const std::vector<std::int32_t>& pages, int limit, const char* what) {
  for (auto p : pages)
    if (p < 0 || p >= limit)
      return status::error(std::string(what) + " page " + std::to_string(p) + " out of range [0, " +
                           std::to_string(limit) + ")");
  return {};
}

}  // namespace

result<std::vector<transport::block>> plan_blocks(const rank_memory& src, const remote_pool& dst,
                                                  const block_request& req) {
  const auto& sp = *req.src_pages;
  const auto& dp = *req.dst_pages;
  if (sp.size() != dp.size())
    return status::error("chunk has " + std::to_string(sp.size()) + " source pages but " +
                         std::to_string(dp.size()) + " destination pages");
  if (auto s = check_layers(src, dst, req.layers); !s) return s;
  if (dst.buffers_per_layer != src.buffers_per_layer())
    return status::error("destination layout has " + std::to_string(dst.buffers_per_layer) +
                         " buffers per layer, source " + std::to_string(src.buffers_per_layer()));
  if (auto s = check_pages(sp, src.pages(), "source"); !s) return s;
  if (auto s = check_pages(dp, dst.pages, "destination"); !s) return s;

  // Bytes moved per page, and where they start inside the source and destination items.
  std::int64_t len = 0, src_in = 0, dst_in = 0;
  if (req.mla) {
    if (dst.item_bytes != src.item_bytes())
      return status::error("destination item of " + std::to_string(dst.item_bytes) + " bytes, source " +
                           std::to_string(src.item_bytes()) + " (page size or dtype mismatch)");
    len = src.item_bytes();
  } else {
    const auto& h = req.heads;
    if (dst.head_bytes != src.head_bytes() || dst.page_size != src.page_size())
      return status::error("destination head bytes or page size differ from the source");
    if (h.count <= 0 || h.src_begin < 0 || h.src_begin + h.count > src.local_heads() || h.dst_begin < 0 ||
        h.dst_begin + h.count > dst.local_heads)
      return status::error("head slice outside the registered heads");
    const std::int64_t per_head = std::int64_t(src.page_size()) * src.head_bytes();
    len = h.count * per_head;
    src_in = h.src_begin * per_head;
    dst_in = h.dst_begin * per_head;
  }
  const bool whole = len == src.item_bytes() && len == dst.item_bytes;
  std::vector<transport::block> out;
  const int bpl = src.buffers_per_layer();
  auto kv = append_runs(
      out, sp, dp, req.layers, bpl, std::uint64_t(len), std::uint64_t(dst.item_bytes), std::uint64_t(dst_in),
      whole && req.coalesce, [&](int l, int b, int page) { return src.item(l, b, page) + src_in; },
      [&](int l, int b) -> const remote_buffer& {
        return dst.kv[static_cast<std::size_t>((l - dst.layer_begin) * bpl + b)];
      });
  if (!kv) return kv;
  return out;
}

result<std::vector<transport::block>> plan_state_blocks(const rank_memory& src, const remote_pool& dst,
                                                        const std::vector<std::int32_t>& ss,
                                                        const std::vector<std::int32_t>& ds,
                                                        config::range layers, bool coalesce) {
  if (ss.size() != ds.size())
    return status::error("state index list of " + std::to_string(ds.size()) + " for " + std::to_string(ss.size()) +
                         " pages");
  std::vector<transport::block> out;
  if (ss.empty()) return out;
  if (auto s = check_layers(src, dst, layers); !s) return s;
  if (src.state_pages() == 0 || dst.state.empty())
    return status::error("state pages, but a side registered no state buffers");
  if (dst.state_item_bytes != src.state_item_bytes())
    return status::error("destination state page of " + std::to_string(dst.state_item_bytes) + " bytes, source " +
                         std::to_string(src.state_item_bytes()));
  if (auto s = check_pages(ss, src.state_pages(), "source state"); !s) return s;
  if (auto s = check_pages(ds, dst.state_pages, "destination state"); !s) return s;
  auto st = append_runs(
      out, ss, ds, layers, 1, std::uint64_t(src.state_item_bytes()), std::uint64_t(dst.state_item_bytes), 0,
      coalesce, [&](int l, int, int page) { return src.state_item(l, page); },
      [&](int l, int) -> const remote_buffer& { return dst.state[static_cast<std::size_t>(l - dst.layer_begin)]; });
  if (!st) return st;
  return out;
}

result<std::vector<transport::block>> plan_aux_blocks(const rank_memory& src, const remote_pool& dst,
                                                      int src_row, int dst_row, const aux_record* receipt) {
  std::vector<transport::block> out;
  if (dst_row < 0 || dst_row >= dst.aux_rows)
    return status::error("aux slot " + std::to_string(dst_row) + " outside the registered " +
                         std::to_string(dst.aux_rows));
  const auto& mine = src.aux_buffers();
  if (mine.size() != dst.aux.size())
    return status::error("this rank has " + std::to_string(mine.size()) + " aux buffers, the destination " +
                         std::to_string(dst.aux.size()));
  if (!mine.empty() && (src_row < 0 || src_row >= src.aux_rows()))
    return status::error("aux row " + std::to_string(src_row) + " outside this rank's " +
                         std::to_string(src.aux_rows()));
  for (std::size_t j = 0; j < mine.size(); ++j) {
    if (mine[j].page_bytes != dst.aux[j].page_bytes)
      return status::error("aux buffer " + std::to_string(j) + ": rows of " + std::to_string(mine[j].page_bytes) +
                           " B here, " + std::to_string(dst.aux[j].page_bytes) + " B at the destination");
    const auto row = mine[j].page_bytes;
    out.push_back({mine[j].base + std::uint64_t(src_row) * row, dst.aux[j].region,
                   dst.aux[j].offset + std::uint64_t(dst_row) * row, row});
  }
  out.push_back({reinterpret_cast<const std::byte*>(receipt), dst.receipts.region,
                 dst.receipts.offset + std::uint64_t(dst_row) * sizeof(aux_record), sizeof(aux_record)});
  return out;
}

}  // namespace kvflow
