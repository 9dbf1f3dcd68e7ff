#include "config/routing.hpp"

namespace kvflow::config {

int prefill_rank_of(const prefill_topology& t, const prefill_coord& c) {
  return ((c.dp * t.pp + c.pp) * t.cp + c.cp) * t.tp + c.tp;
}

prefill_coord prefill_coord_of(const prefill_topology& t, int rank) {
  prefill_coord c;
  c.tp = rank % t.tp;
  rank /= t.tp;
  c.cp = rank % t.cp;
  rank /= t.cp;
  c.pp = rank % t.pp;
  c.dp = rank / t.pp;
  return c;
}

int decode_rank_of(const decode_topology& t, const decode_coord& c) {
  return (c.dp * t.pp + c.pp) * t.tp + c.tp;
}

decode_coord decode_coord_of(const decode_topology& t, int rank) {
  decode_coord c;
  c.tp = rank % t.tp;
  rank /= t.tp;
  c.pp = rank % t.pp;
  c.dp = rank / t.pp;
  return c;
}

range stage_layers(int layers, int pp, int stage) {
  int base = layers / pp, extra = layers % pp;
  int begin = stage * base + (stage < extra ? stage : extra);
  return {begin, begin + base + (stage < extra ? 1 : 0)};
}

range cp_share(int n_pages, int cp, int cp_rank) {
  auto at = [&](int c) {
    return static_cast<int>(static_cast<std::int64_t>(n_pages) * c / cp);
  };
  return {at(cp_rank), at(cp_rank + 1)};
}

routing_plan::routing_plan(const cluster_config& c) : config_(c) {
  validate(c);
  const auto& P = c.prefill;
  const auto& D = c.decode;
  const bool mha = c.model.kind == model_kind::mha;
  const int H = c.model.kv_heads;

  prefill_.resize(P.ranks());
  for (int r = 0; r < P.ranks(); ++r) {
    auto& pr = prefill_[r];
    pr.coord = prefill_coord_of(P, r);
    pr.layers = stage_layers(c.model.layers, P.pp, pr.coord.pp);
    pr.local_heads = mha ? H / P.tp : 0;
  }

  decode_.resize(D.ranks());
  for (int r = 0; r < D.ranks(); ++r) {
    auto& dr = decode_[r];
    dr.coord = decode_coord_of(D, r);
    const int t = dr.coord.tp;
    dr.layers = D.pp == 1 ? range{0, c.model.layers} : stage_layers(c.model.layers, D.pp, dr.coord.pp);
    dr.local_heads = mha ? H / D.tp : 0;

    // Prefill tp ranks this decode rank reads, with the head slice each contributes.
    struct tp_read {
      int tp;
      head_slice heads;
    };
    std::vector<tp_read> tps;
    if (D.tp == P.tp) {
      tps.push_back({t, {0, 0, mha ? H / P.tp : 0}});
    } else if (D.tp > P.tp) {
      int ratio = D.tp / P.tp, p = t / ratio;
      int src = mha ? t * (H / D.tp) - p * (H / P.tp) : 0;
      tps.push_back({p, {src, 0, mha ? H / D.tp : 0}});
    } else {
      int ratio = P.tp / D.tp;
      if (!mha) {
        // MLA is replicated: the first prefill rank of the range is enough; the others are
        // non-authoritative.
        tps.push_back({t * ratio, {0, 0, 0}});
      } else {
        for (int p = t * ratio; p < (t + 1) * ratio; ++p)
          tps.push_back({p, {0, p * (H / P.tp) - t * (H / D.tp), H / P.tp}});
      }
    }
    std::vector<int> stages;
    if (D.pp == P.pp) {
      stages.push_back(dr.coord.pp);
    } else {
      for (int s = 0; s < P.pp; ++s) stages.push_back(s);
    }
    std::vector<int> cps;
    if (c.cp_send_all) {
      for (int k = 0; k < P.cp; ++k) cps.push_back(k);
    } else {
      cps.push_back(0);
    }
    for (int s : stages)
      for (int k : cps)
        for (const auto& tr : tps) {
          peer_read pe;
          pe.pp = s;
          pe.cp = k;
          pe.tp = tr.tp;
          pe.layers = stage_layers(c.model.layers, P.pp, s);
          pe.heads = tr.heads;
          pe.cp_share = c.cp_send_all && P.cp > 1;
          dr.peers.push_back(pe);
        }
    // The aux metadata (first output tokens) comes from the last pipeline stage, one writer.
    for (auto& pe : dr.peers)
      if (pe.pp == P.pp - 1) {
        pe.writes_aux = true;
        dr.expects_aux = true;
        break;
      }
    dr.required_prefill_response_num = static_cast<int>(dr.peers.size());

    // Record this decode rank as a reader of each peer, in every prefill dp group alike.
    for (const auto& pe : dr.peers)
      for (int g = 0; g < P.dp; ++g) {
        if (dr.coord.dp != 0) continue;  // readers are expressed within one decode dp group
        auto& pr = prefill_[prefill_rank_of(P, {g, pe.pp, pe.cp, pe.tp})];
        pr.readers.push_back({dr.coord.pp, t});
      }
  }
  for (auto& pr : prefill_) {
    pr.required_dst_info_num = static_cast<int>(pr.readers.size());
    pr.authoritative = !pr.readers.empty();
  }
}

std::int64_t routing_plan::prefill_item_bytes() const {
  const auto& m = config_.model;
  if (m.kind == model_kind::mla) return config_.page_size * m.mla_bytes_per_token;
  return std::int64_t{config_.page_size} * (m.kv_heads / config_.prefill.tp) * m.head_bytes();
}

std::int64_t routing_plan::decode_item_bytes() const {
  const auto& m = config_.model;
  if (m.kind == model_kind::mla) return config_.page_size * m.mla_bytes_per_token;
  return std::int64_t{config_.page_size} * (m.kv_heads / config_.decode.tp) * m.head_bytes();
}

int routing_plan::buffers_per_layer() const {
  return config_.model.kind == model_kind::mha ? 2 : 1;
}

}  // namespace kvflow::config
