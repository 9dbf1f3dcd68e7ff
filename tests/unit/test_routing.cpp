// config/routing.hpp: rank numbering, stage/CP splits and the routing table of semantics.md §4.
#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <tuple>
#include <vector>

#include "config/routing.hpp"

using namespace kvflow::config;

namespace {

cluster_config make_config(int p_tp, int d_tp, bool mha = false, int kv_heads = 8) {
  cluster_config c;
  c.prefill.tp = p_tp;
  c.decode.tp = d_tp;
  if (mha) {
    c.model = parse_model("mha:32:" + std::to_string(kv_heads) + ":128", kv_dtype::bf16);
    c.dtype = kv_dtype::bf16;
  }
  return c;
}

bool names(const peer_read& pe, const prefill_coord& pc) {
  return pe.pp == pc.pp && pe.cp == pc.cp && pe.tp == pc.tp;
}

// The prefill rank of dp group 0 a peer entry names.
int rank_of_peer(const routing_plan& plan, const peer_read& pe) {
  return prefill_rank_of(plan.config().prefill, {0, pe.pp, pe.cp, pe.tp});
}

std::vector<std::tuple<int, int, int>> peer_keys(const decode_rank_plan& d) {
  std::vector<std::tuple<int, int, int>> out;
  for (const auto& pe : d.peers) out.emplace_back(pe.pp, pe.cp, pe.tp);
  return out;
}

std::vector<std::pair<int, int>> reader_keys(const prefill_rank_plan& p) {
  std::vector<std::pair<int, int>> out;
  for (const auto& r : p.readers) out.emplace_back(r.pp, r.tp);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

TEST_CASE("routing: prefill rank numbering round-trips (tp fastest, then cp, pp, dp)") {
  for (int tp = 1; tp <= 4; ++tp)
    for (int cp = 1; cp <= 3; ++cp)
      for (int pp = 1; pp <= 3; ++pp)
        for (int dp = 1; dp <= 3; ++dp) {
          prefill_topology t{tp, cp, pp, dp};
          std::set<int> seen;
          for (int d = 0; d < dp; ++d)
            for (int p = 0; p < pp; ++p)
              for (int c = 0; c < cp; ++c)
                for (int r = 0; r < tp; ++r) {
                  prefill_coord pc{d, p, c, r};
                  int rank = prefill_rank_of(t, pc);
                  CHECK(rank == ((d * pp + p) * cp + c) * tp + r);
                  CHECK(prefill_coord_of(t, rank) == pc);
                  seen.insert(rank);
                }
          // A bijection onto [0, ranks()).
          REQUIRE(static_cast<int>(seen.size()) == t.ranks());
          CHECK(*seen.begin() == 0);
          CHECK(*seen.rbegin() == t.ranks() - 1);
        }
}

TEST_CASE("routing: decode rank numbering round-trips (tp fastest, then pp, dp)") {
  for (int tp = 1; tp <= 5; ++tp)
    for (int pp = 1; pp <= 3; ++pp)
      for (int dp = 1; dp <= 3; ++dp) {
        decode_topology t{tp, dp, pp};
        std::set<int> seen;
        for (int d = 0; d < dp; ++d)
          for (int p = 0; p < pp; ++p)
            for (int r = 0; r < tp; ++r) {
              decode_coord dc{d, p, r};
              int rank = decode_rank_of(t, dc);
              CHECK(rank == (d * pp + p) * tp + r);
              CHECK(decode_coord_of(t, rank) == dc);
              seen.insert(rank);
            }
        REQUIRE(static_cast<int>(seen.size()) == t.ranks());
        CHECK(*seen.rbegin() == t.ranks() - 1);
      }
}

TEST_CASE("routing: stage_layers tiles layers 0..L-1 with sizes differing by at most 1") {
  for (int layers = 1; layers <= 80; ++layers)
    for (int pp = 1; pp <= std::min(layers, 16); ++pp) {
      CAPTURE(layers);
      CAPTURE(pp);
      int next = 0, lo = layers, hi = 0;
      for (int s = 0; s < pp; ++s) {
        auto r = stage_layers(layers, pp, s);
        CHECK(r.begin == next);
        CHECK_FALSE(r.empty());
        next = r.end;
        lo = std::min(lo, r.size());
        hi = std::max(hi, r.size());
        // Earlier stages take the remainder: sizes never grow along the pipeline.
        if (s > 0) CHECK(stage_layers(layers, pp, s - 1).size() >= r.size());
      }
      CHECK(next == layers);
      CHECK(hi - lo <= 1);
    }
  CHECK(stage_layers(61, 2, 0) == range{0, 31});
  CHECK(stage_layers(61, 2, 1) == range{31, 61});
}

TEST_CASE("routing: cp_share partitions pages 0..n-1 into contiguous disjoint shares") {
  for (int cp = 1; cp <= 9; ++cp)
    for (int n = 0; n <= 120; ++n) {
      CAPTURE(cp);
      CAPTURE(n);
      int next = 0, lo = n, hi = 0, empty = 0;
      for (int k = 0; k < cp; ++k) {
        auto r = cp_share(n, cp, k);
        CHECK(r.begin == next);
        CHECK(r.end >= r.begin);
        next = r.end;
        lo = std::min(lo, r.size());
        hi = std::max(hi, r.size());
        if (r.empty()) ++empty;
      }
      CHECK(next == n);
      CHECK(hi - lo <= 1);
      // Fewer pages than CP ranks: exactly cp - n ranks send nothing.
      if (n < cp) CHECK(empty == cp - n);
      else CHECK(empty == 0);
    }
  // Large requests do not overflow the intermediate product.
  const int big = 1 << 30;
  CHECK(cp_share(big, 7, 6).end == big);
  CHECK(cp_share(big, 7, 3).begin == static_cast<int>(std::int64_t{big} * 3 / 7));
}

TEST_CASE("routing: D == P (tp 2 / 2) reads the same tp rank") {
  routing_plan plan(make_config(2, 2));
  REQUIRE(plan.prefill_ranks() == 2);
  REQUIRE(plan.decode_ranks() == 2);
  for (int r = 0; r < 2; ++r) {
    const auto& d = plan.decode(r);
    REQUIRE(d.peers.size() == 1);
    CHECK(d.peers[0].tp == r);
    CHECK(d.peers[0].pp == 0);
    CHECK(d.peers[0].cp == 0);
    CHECK_FALSE(d.peers[0].cp_share);
    CHECK(d.peers[0].writes_aux);
    CHECK(d.expects_aux);
    CHECK(d.required_prefill_response_num == 1);
    CHECK(d.layers == range{0, 61});
    CHECK(d.peers[0].layers == range{0, 61});

    const auto& p = plan.prefill(r);
    CHECK(p.authoritative);
    CHECK(p.required_dst_info_num == 1);
    REQUIRE(p.readers.size() == 1);
    CHECK(p.readers[0].tp == r);
  }
  CHECK(plan.buffers_per_layer() == 1);
  CHECK(plan.prefill_item_bytes() == 64 * 656);
  CHECK(plan.decode_item_bytes() == 64 * 656);
}

TEST_CASE("routing: D > P (P tp2, D tp4): decode rank r reads r/2, MHA takes its head slice") {
  for (bool mha : {false, true}) {
    CAPTURE(mha);
    routing_plan plan(make_config(2, 4, mha, 8));
    for (int r = 0; r < 4; ++r) {
      const auto& d = plan.decode(r);
      REQUIRE(d.peers.size() == 1);
      CHECK(d.peers[0].tp == r / 2);
      CHECK(d.required_prefill_response_num == 1);
      if (mha) {
        CHECK(d.local_heads == 2);
        // Prefill rank r/2 holds heads [4*(r/2), 4*(r/2)+4); decode rank r needs [2r, 2r+2).
        CHECK(d.peers[0].heads.src_begin == 2 * (r % 2));
        CHECK(d.peers[0].heads.dst_begin == 0);
        CHECK(d.peers[0].heads.count == 2);
      }
    }
    for (int p = 0; p < 2; ++p) {
      const auto& pr = plan.prefill(p);
      CHECK(pr.authoritative);
      CHECK(pr.required_dst_info_num == 2);
      CHECK(reader_keys(pr) == std::vector<std::pair<int, int>>{{0, 2 * p}, {0, 2 * p + 1}});
      if (mha) CHECK(pr.local_heads == 4);
    }
    if (mha) {
      CHECK(plan.buffers_per_layer() == 2);
      CHECK(plan.prefill_item_bytes() == 64 * 4 * 256);
      CHECK(plan.decode_item_bytes() == 64 * 2 * 256);
    }
  }
}

TEST_CASE("routing: D < P MLA (P tp4, D tp2): one reader per decode rank, others non-authoritative") {
  routing_plan plan(make_config(4, 2));
  for (int r = 0; r < 2; ++r) {
    const auto& d = plan.decode(r);
    REQUIRE(d.peers.size() == 1);
    CHECK(d.peers[0].tp >= 2 * r);
    CHECK(d.peers[0].tp < 2 * r + 2);
    CHECK(d.required_prefill_response_num == 1);
  }
  int authoritative = 0;
  for (int p = 0; p < 4; ++p) {
    const auto& pr = plan.prefill(p);
    CAPTURE(p);
    CHECK(pr.authoritative == (pr.required_dst_info_num > 0));
    CHECK(pr.required_dst_info_num == static_cast<int>(pr.readers.size()));
    if (pr.authoritative) {
      ++authoritative;
      CHECK(pr.required_dst_info_num == 1);
      CHECK(pr.readers[0].tp == p / 2);
    } else {
      CHECK(pr.required_dst_info_num == 0);
    }
  }
  CHECK(authoritative == 2);
  // Exactly one authoritative rank inside each decode rank's range.
  CHECK(plan.prefill(0).authoritative != plan.prefill(1).authoritative);
  CHECK(plan.prefill(2).authoritative != plan.prefill(3).authoritative);
}

TEST_CASE("routing: D < P MHA (P tp4, D tp2): each decode rank reads 2 prefill ranks' heads") {
  routing_plan plan(make_config(4, 2, true, 8));
  for (int r = 0; r < 2; ++r) {
    const auto& d = plan.decode(r);
    CHECK(d.local_heads == 4);
    REQUIRE(d.peers.size() == 2);
    CHECK(d.required_prefill_response_num == 2);
    CHECK(d.peers[0].tp == 2 * r);
    CHECK(d.peers[1].tp == 2 * r + 1);
    for (int i = 0; i < 2; ++i) {
      CHECK(d.peers[i].heads.src_begin == 0);
      CHECK(d.peers[i].heads.dst_begin == 2 * i);
      CHECK(d.peers[i].heads.count == 2);
    }
    // One aux writer among the two.
    CHECK(d.peers[0].writes_aux + d.peers[1].writes_aux == 1);
  }
  for (int p = 0; p < 4; ++p) {
    const auto& pr = plan.prefill(p);
    CHECK(pr.authoritative);
    CHECK(pr.required_dst_info_num == 1);
    CHECK(pr.readers[0].tp == p / 2);
    CHECK(pr.local_heads == 2);
  }
}

TEST_CASE("routing: CP rank-0 mode: only cp 0 of each shard is authoritative") {
  auto c = make_config(2, 2);
  c.prefill.cp = 4;
  routing_plan plan(c);
  REQUIRE(plan.prefill_ranks() == 8);
  for (int r = 0; r < 2; ++r) {
    const auto& d = plan.decode(r);
    REQUIRE(d.peers.size() == 1);
    CHECK(d.peers[0].cp == 0);
    CHECK(d.peers[0].tp == r);
    CHECK_FALSE(d.peers[0].cp_share);
    CHECK(d.required_prefill_response_num == 1);
  }
  for (int p = 0; p < plan.prefill_ranks(); ++p) {
    const auto& pr = plan.prefill(p);
    CAPTURE(p);
    CHECK(pr.authoritative == (pr.coord.cp == 0));
    CHECK(pr.required_dst_info_num == (pr.coord.cp == 0 ? 1 : 0));
    CHECK(pr.readers.size() == (pr.coord.cp == 0 ? 1u : 0u));
  }
}

TEST_CASE("routing: CP-parallel sending: every cp rank authoritative, responses x cp") {
  auto c = make_config(2, 2);
  c.prefill.cp = 4;
  c.cp_send_all = true;
  routing_plan plan(c);
  for (int r = 0; r < 2; ++r) {
    const auto& d = plan.decode(r);
    REQUIRE(d.peers.size() == 4);
    CHECK(d.required_prefill_response_num == 4);
    std::set<int> cps;
    int aux = 0;
    for (const auto& pe : d.peers) {
      CHECK(pe.tp == r);
      CHECK(pe.cp_share);
      cps.insert(pe.cp);
      aux += pe.writes_aux;
    }
    CHECK(cps == std::set<int>{0, 1, 2, 3});
    CHECK(aux == 1);
  }
  for (int p = 0; p < plan.prefill_ranks(); ++p) {
    const auto& pr = plan.prefill(p);
    CHECK(pr.authoritative);
    CHECK(pr.required_dst_info_num == 1);
    CHECK(pr.readers[0].tp == pr.coord.tp);
  }
  // With cp 1 there is nothing to share.
  auto c1 = make_config(2, 2);
  c1.cp_send_all = true;
  routing_plan plan1(c1);
  CHECK_FALSE(plan1.decode(0).peers.at(0).cp_share);
}

TEST_CASE("routing: PP equal: decode stage s reads prefill stage s, layer ranges match") {
  auto c = make_config(2, 2);
  c.prefill.pp = 2;
  c.decode.pp = 2;
  routing_plan plan(c);
  for (int r = 0; r < plan.decode_ranks(); ++r) {
    const auto& d = plan.decode(r);
    CAPTURE(r);
    REQUIRE(d.peers.size() == 1);
    CHECK(d.peers[0].pp == d.coord.pp);
    CHECK(d.peers[0].tp == d.coord.tp);
    CHECK(d.layers == stage_layers(61, 2, d.coord.pp));
    CHECK(d.peers[0].layers == d.layers);
    // Only the last stage carries the aux metadata.
    CHECK(d.expects_aux == (d.coord.pp == 1));
    CHECK(d.peers[0].writes_aux == (d.coord.pp == 1));
    CHECK(d.required_prefill_response_num == 1);
  }
  for (int p = 0; p < plan.prefill_ranks(); ++p) {
    const auto& pr = plan.prefill(p);
    CHECK(pr.layers == stage_layers(61, 2, pr.coord.pp));
    REQUIRE(pr.readers.size() == 1);
    CHECK(pr.readers[0].pp == pr.coord.pp);
    CHECK(pr.readers[0].tp == pr.coord.tp);
  }
}

TEST_CASE("routing: decode pp 1 reads every prefill stage, responses x pp, aux from the last") {
  auto c = make_config(2, 2);
  c.prefill.pp = 3;
  c.decode.pp = 1;
  routing_plan plan(c);
  for (int r = 0; r < plan.decode_ranks(); ++r) {
    const auto& d = plan.decode(r);
    CHECK(d.layers == range{0, 61});
    REQUIRE(d.peers.size() == 3);
    CHECK(d.required_prefill_response_num == 3);
    int next = 0;
    for (int s = 0; s < 3; ++s) {
      CHECK(d.peers[s].pp == s);
      CHECK(d.peers[s].layers == stage_layers(61, 3, s));
      CHECK(d.peers[s].layers.begin == next);
      next = d.peers[s].layers.end;
      CHECK(d.peers[s].writes_aux == (s == 2));
    }
    CHECK(next == 61);
    CHECK(d.expects_aux);
  }
  for (int p = 0; p < plan.prefill_ranks(); ++p) {
    const auto& pr = plan.prefill(p);
    REQUIRE(pr.readers.size() == 1);
    CHECK(pr.readers[0].pp == 0);
    CHECK(pr.readers[0].tp == pr.coord.tp);
  }
}

TEST_CASE("routing: DP: readers identical for each prefill dp group, peers for each decode dp group") {
  auto c = make_config(4, 2);
  c.prefill.dp = 3;
  c.prefill.cp = 2;
  c.decode.dp = 2;
  routing_plan plan(c);
  const auto& P = c.prefill;
  for (int g = 1; g < P.dp; ++g)
    for (int p = 0; p < P.pp; ++p)
      for (int k = 0; k < P.cp; ++k)
        for (int t = 0; t < P.tp; ++t) {
          const auto& a = plan.prefill(prefill_rank_of(P, {0, p, k, t}));
          const auto& b = plan.prefill(prefill_rank_of(P, {g, p, k, t}));
          CHECK(reader_keys(a) == reader_keys(b));
          CHECK(a.required_dst_info_num == b.required_dst_info_num);
          CHECK(a.authoritative == b.authoritative);
          CHECK(b.coord.dp == g);
        }
  const auto& D = c.decode;
  for (int t = 0; t < D.tp; ++t) {
    const auto& a = plan.decode(decode_rank_of(D, {0, 0, t}));
    const auto& b = plan.decode(decode_rank_of(D, {1, 0, t}));
    CHECK(peer_keys(a) == peer_keys(b));
    CHECK(b.coord.dp == 1);
  }
  // Readers count one decode dp group only: required_dst_info_num does not grow with decode dp.
  for (int p = 0; p < plan.prefill_ranks(); ++p) CHECK(plan.prefill(p).required_dst_info_num <= 1);
}

TEST_CASE("routing: routing_plan validates its config") {
  auto c = make_config(4, 6);
  CHECK_THROWS_AS(routing_plan{c}, config_error);
}

// For every decode rank: each (layer, head, cp share) it holds is written by exactly one peer.
// For every prefill rank: readers == the decode ranks (of one dp group) whose peers name it.
TEST_CASE("routing: property: random valid topologies route every byte exactly once") {
  std::mt19937 rng(20240611);
  auto pick = [&](std::initializer_list<int> xs) {
    std::vector<int> v(xs);
    return v[std::uniform_int_distribution<std::size_t>(0, v.size() - 1)(rng)];
  };
  int checked = 0;
  for (int iter = 0; iter < 400; ++iter) {
    cluster_config c;
    c.prefill.tp = pick({1, 2, 3, 4, 6, 8});
    // Decode tp: a divisor or a multiple of prefill tp.
    std::vector<int> dtp;
    for (int x = 1; x <= 16; ++x)
      if (x % c.prefill.tp == 0 || c.prefill.tp % x == 0) dtp.push_back(x);
    c.decode.tp = dtp[std::uniform_int_distribution<std::size_t>(0, dtp.size() - 1)(rng)];
    c.prefill.cp = pick({1, 2, 3, 4});
    c.prefill.pp = pick({1, 2, 3, 4});
    c.decode.pp = pick({1, 2}) == 1 ? 1 : c.prefill.pp;
    c.prefill.dp = pick({1, 2});
    c.decode.dp = pick({1, 2});
    c.cp_send_all = pick({0, 1}) == 1;
    const bool mha = pick({0, 1}) == 1;
    const int layers = std::uniform_int_distribution<int>(c.prefill.pp, 40)(rng);
    if (mha) {
      int lcm = std::max(c.prefill.tp, c.decode.tp);  // one is a multiple of the other
      c.model = parse_model("mha:" + std::to_string(layers) + ":" +
                                std::to_string(lcm * pick({1, 2, 3})) + ":16",
                            kv_dtype::fp8);
    } else {
      c.model = parse_model("mla:" + std::to_string(layers) + ":656", kv_dtype::fp8);
    }
    INFO("P tp" << c.prefill.tp << " cp" << c.prefill.cp << " pp" << c.prefill.pp << " dp"
                << c.prefill.dp << " / D tp" << c.decode.tp << " pp" << c.decode.pp << " dp"
                << c.decode.dp << (mha ? " mha heads " : " mla ") << c.model.kv_heads
                << " layers " << layers << (c.cp_send_all ? " cp_send_all" : ""));
    routing_plan plan(c);
    const auto& P = c.prefill;
    const auto& D = c.decode;
    REQUIRE(plan.prefill_ranks() == P.ranks());
    REQUIRE(plan.decode_ranks() == D.ranks());
    const int shares = c.cp_send_all ? P.cp : 1;

    for (int r = 0; r < plan.decode_ranks(); ++r) {
      const auto& d = plan.decode(r);
      REQUIRE(d.coord == decode_coord_of(D, r));
      CHECK(d.required_prefill_response_num == static_cast<int>(d.peers.size()));
      // Peers are distinct prefill ranks.
      auto keys = peer_keys(d);
      std::sort(keys.begin(), keys.end());
      CHECK(std::adjacent_find(keys.begin(), keys.end()) == keys.end());

      const bool holds_last = d.layers.end == layers;
      int aux = 0;
      for (const auto& pe : d.peers) {
        aux += pe.writes_aux;
        if (pe.writes_aux) CHECK(pe.layers.end == layers);
        CHECK(pe.cp_share == (c.cp_send_all && P.cp > 1));
        if (!c.cp_send_all) CHECK(pe.cp == 0);
        CHECK(pe.layers == stage_layers(layers, P.pp, pe.pp));
        CHECK(pe.layers.begin >= d.layers.begin);
        CHECK(pe.layers.end <= d.layers.end);
        if (mha) {
          CHECK(pe.heads.count > 0);
          CHECK(pe.heads.src_begin >= 0);
          const int p_heads = plan.prefill(rank_of_peer(plan, pe)).local_heads;
          CHECK(pe.heads.src_begin + pe.heads.count <= p_heads);
          // The slice moves the same global heads: prefill tp p holds [p*Hp, (p+1)*Hp),
          // decode tp t holds [t*Hd, (t+1)*Hd).
          CHECK(pe.tp * p_heads + pe.heads.src_begin == d.coord.tp * d.local_heads + pe.heads.dst_begin);
        }
      }
      CHECK(aux == (holds_last ? 1 : 0));
      CHECK(d.expects_aux == holds_last);

      // Coverage: (layer, head, share) -> number of peers writing it; must be 1 everywhere.
      const int heads = mha ? d.local_heads : 1;
      std::map<std::tuple<int, int, int>, int> cover;
      for (const auto& pe : d.peers) {
        const int share = c.cp_send_all ? pe.cp : 0;
        const int h0 = mha ? pe.heads.dst_begin : 0;
        const int hn = mha ? pe.heads.count : 1;
        for (int l = pe.layers.begin; l < pe.layers.end; ++l)
          for (int h = h0; h < h0 + hn; ++h) ++cover[{l, h, share}];
      }
      bool exact = static_cast<int>(cover.size()) == d.layers.size() * heads * shares;
      for (const auto& [k, n] : cover) {
        const auto& [l, h, share] = k;
        exact = exact && n == 1 && l >= d.layers.begin && l < d.layers.end && h >= 0 &&
                h < heads && share >= 0 && share < shares;
      }
      CHECK(exact);

      // Decode dp groups route identically.
      if (d.coord.dp > 0)
        CHECK(peer_keys(d) == peer_keys(plan.decode(decode_rank_of(D, {0, d.coord.pp, d.coord.tp}))));
    }

    for (int p = 0; p < plan.prefill_ranks(); ++p) {
      const auto& pr = plan.prefill(p);
      REQUIRE(pr.coord == prefill_coord_of(P, p));
      CHECK(pr.required_dst_info_num == static_cast<int>(pr.readers.size()));
      CHECK(pr.authoritative == !pr.readers.empty());
      CHECK(pr.layers == stage_layers(layers, P.pp, pr.coord.pp));
      std::vector<std::pair<int, int>> expected;
      for (int dpp = 0; dpp < D.pp; ++dpp)
        for (int t = 0; t < D.tp; ++t) {
          const auto& d = plan.decode(decode_rank_of(D, {0, dpp, t}));
          for (const auto& pe : d.peers)
            if (names(pe, pr.coord)) expected.emplace_back(dpp, t);
        }
      std::sort(expected.begin(), expected.end());
      CHECK(reader_keys(pr) == expected);
    }
    ++checked;
  }
  CHECK(checked == 400);
}
