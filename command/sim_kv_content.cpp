#include "command/sim_kv_content.hpp"

#include <algorithm>
#include <cstring>

#include "command/pattern.hpp"

namespace kvflow::command {

void fill_pages(const config::routing_plan& plan, int rank, const sim_memory& pool, const request_view& req,
                const std::vector<std::int32_t>& pages, const std::vector<std::int32_t>& state_pages,
                config::range fill) {
  const auto& me = plan.prefill(rank);
  const auto& m = plan.config().model;
  const int page_size = plan.config().page_size;
  const int local_heads = me.local_heads;
  const std::int64_t head_bytes = m.head_bytes();
  for (int i = fill.begin; i < fill.end && !state_pages.empty(); ++i)
    for (int l = me.layers.begin; l < me.layers.end; ++l)
      pattern::fill(pool.state_item(l, state_pages[i]), pool.state_item_bytes(),
                    pattern::seed_of({req.room, req.incarnation, l, state_buffer, i, 0, rank}));
  for (int i = fill.begin; i < fill.end; ++i)
    for (int l = me.layers.begin; l < me.layers.end; ++l)
      for (int b = 0; b < pool.buffers_per_layer(); ++b) {
        auto* item = pool.item(l, b, pages[i]);
        if (m.kind == config::model_kind::mla) {
          pattern::fill(item, pool.item_bytes(), pattern::seed_of({req.room, req.incarnation, l, b, i, 0, rank}));
          continue;
        }
        const std::int64_t slab = std::int64_t(page_size) * head_bytes;
        for (int h = 0; h < local_heads; ++h) {
          int global = me.coord.tp * local_heads + h;
          pattern::fill(item + h * slab, slab,
                        pattern::seed_of({req.room, req.incarnation, l, b, i, global, rank}));
        }
      }
}

sim_aux_row simulated_first_output(const request_view& req) {
  sim_aux_row a;
  a.room = req.room;
  a.incarnation = req.incarnation;
  a.first_token = static_cast<std::int32_t>(req.room % 32000);
  a.first_logprob = -0.5f;
  return a;
}

verify_counts verify_pages(const config::routing_plan& plan, int rank, const sim_memory& pool,
                           const request_view& req, const std::vector<std::int32_t>& pages,
                           const std::vector<std::int32_t>& state_pages, std::int32_t aux_slot) {
  verify_counts v;
  const auto& me = plan.decode(rank);
  const auto& c = plan.config();
  const bool mla = c.model.kind == config::model_kind::mla;
  const int prefill_heads = mla ? 0 : c.model.kv_heads / c.prefill.tp;
  const std::int64_t slab = mla ? pool.item_bytes() : std::int64_t(c.page_size) * c.model.head_bytes();
  const std::int64_t state_bytes = pool.state_item_bytes();
  for (const auto& pe : me.peers) {
    int src = config::prefill_rank_of(c.prefill, {req.prefill_dp, pe.pp, pe.cp, pe.tp});
    config::range range{req.prefix_pages, req.n_pages};
    if (pe.cp_share) {
      auto share = config::cp_share(req.n_pages, c.prefill.cp, pe.cp);
      range = {std::max(range.begin, share.begin), std::min(range.end, share.end)};
    }
    for (int i = range.begin; i < range.end && !state_pages.empty(); ++i)
      for (int l = pe.layers.begin; l < pe.layers.end; ++l) {
        v.bytes_expected += state_bytes;
        if (pattern::check(pool.state_item(l, state_pages[i]), state_bytes,
                           pattern::seed_of({req.room, req.incarnation, l, state_buffer, i, 0, src})))
          v.bytes_verified += state_bytes;
        else
          ++v.mismatched_pages;
      }
    for (int i = range.begin; i < range.end; ++i)
      for (int l = pe.layers.begin; l < pe.layers.end; ++l)
        for (int b = 0; b < pool.buffers_per_layer(); ++b) {
          const auto* item = pool.item(l, b, pages[i]);
          int heads = mla ? 1 : pe.heads.count;
          for (int k = 0; k < heads; ++k) {
            int global = mla ? 0 : pe.tp * prefill_heads + pe.heads.src_begin + k;
            const auto* at = mla ? item : item + (pe.heads.dst_begin + k) * slab;
            v.bytes_expected += slab;
            if (pattern::check(at, slab, pattern::seed_of({req.room, req.incarnation, l, b, i, global, src})))
              v.bytes_verified += slab;
            else
              ++v.mismatched_pages;
          }
        }
  }
  if (me.expects_aux) {
    sim_aux_row rec;
    std::memcpy(&rec, pool.aux_row(aux_slot), sizeof rec);
    const auto want = simulated_first_output(req);
    if (rec.room != want.room || rec.incarnation != want.incarnation || rec.first_token != want.first_token)
      ++v.mismatched_pages;
  }
  return v;
}

}  // namespace kvflow::command
