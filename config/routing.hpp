#pragma once
// The routing plan of semantics.md section 4: for every rank, whom it exchanges KV with.
// Pure code derived from a validated cluster_config.
#include <vector>

#include "config/topology.hpp"

namespace kvflow::config {

// Rank numbering (architecture.md): tp fastest, then cp, then pp, then dp.
struct prefill_coord {
  int dp = 0, pp = 0, cp = 0, tp = 0;
  bool operator==(const prefill_coord& o) const {
    return dp == o.dp && pp == o.pp && cp == o.cp && tp == o.tp;
  }
};
struct decode_coord {
  int dp = 0, pp = 0, tp = 0;
  bool operator==(const decode_coord& o) const { return dp == o.dp && pp == o.pp && tp == o.tp; }
};

int prefill_rank_of(const prefill_topology& t, const prefill_coord& c);
prefill_coord prefill_coord_of(const prefill_topology& t, int rank);
int decode_rank_of(const decode_topology& t, const decode_coord& c);
decode_coord decode_coord_of(const decode_topology& t, int rank);
// Agreement group ids, the same in every process that hosts a supervisor or reads a group's
// rounds: one per prefill dp group and one per decode dp group, each across its PP stages (a
// request has one outcome, not one per stage: semantics.md section 3).
inline int prefill_group_of(const prefill_topology&, const prefill_coord& c) { return c.dp; }
inline int decode_group_of(const decode_topology&, const decode_coord& c) { return 100000 + c.dp; }
// A shard's index among its group's TP supervisor's children (prefill: shards of every stage;
// decode: the ranks of every stage).
inline int prefill_shard_of(const prefill_topology& t, const prefill_coord& c) { return c.pp * t.tp + c.tp; }
inline int decode_child_of(const decode_topology& t, const decode_coord& c) { return c.pp * t.tp + c.tp; }

struct range {
  int begin = 0, end = 0;
  int size() const { return end - begin; }
  bool empty() const { return end <= begin; }
  bool operator==(const range& o) const { return begin == o.begin && end == o.end; }
};

// Layers [begin, end) owned by pipeline stage `stage` of `pp` (earlier stages take the remainder).
range stage_layers(int layers, int pp, int stage);
// Pages of an n-page request that CP rank `cp_rank` of `cp` sends under CP-parallel sending:
// a contiguous share computed over the whole request (never per chunk).
range cp_share(int n_pages, int cp, int cp_rank);

// Which KV heads move (MHA only): `count` heads from local head `src_begin` of the prefill rank
// land at local head `dst_begin` of the decode rank. For MLA the whole item moves.
struct head_slice {
  int src_begin = 0, dst_begin = 0, count = 0;
};

// One prefill rank a decode rank reads, inside the request's prefill dp group.
struct peer_read {
  int pp = 0, cp = 0, tp = 0;
  range layers;            // global layer indices this peer writes to the decode rank
  head_slice heads;        // MHA only
  bool cp_share = false;   // true: sends only cp_share(n, cp, this->cp) of the pages
  bool writes_aux = false; // this peer writes the aux metadata slot
};

struct decode_rank_plan {
  decode_coord coord;
  std::vector<peer_read> peers;
  int required_prefill_response_num = 1;  // == peers.size(): distinct prefill ranks
  bool expects_aux = false;
  range layers;     // global layers held by this decode rank
  int local_heads = 0;  // MHA: heads held by this decode rank
};

// A decode rank (inside the request's decode dp group) that sends destinations to a prefill rank.
struct reader {
  int pp = 0, tp = 0;
};

struct prefill_rank_plan {
  prefill_coord coord;
  bool authoritative = false;         // some decode rank reads from it
  int required_dst_info_num = 0;      // == readers.size()
  std::vector<reader> readers;
  range layers;
  int local_heads = 0;  // MHA: heads held by this prefill rank
};

class routing_plan {
 public:
  explicit routing_plan(const cluster_config& c);  // validates; throws config_error

  const cluster_config& config() const { return config_; }
  int prefill_ranks() const { return static_cast<int>(prefill_.size()); }
  int decode_ranks() const { return static_cast<int>(decode_.size()); }
  const prefill_rank_plan& prefill(int rank) const { return prefill_.at(rank); }
  const decode_rank_plan& decode(int rank) const { return decode_.at(rank); }

  // Bytes of one page of one layer buffer (K or V for MHA) on a prefill / decode rank.
  std::int64_t prefill_item_bytes() const;
  std::int64_t decode_item_bytes() const;
  // Buffers per layer: 1 for MLA, 2 (K, V) for MHA.
  int buffers_per_layer() const;

 private:
  cluster_config config_;
  std::vector<prefill_rank_plan> prefill_;
  std::vector<decode_rank_plan> decode_;
};

}  // namespace kvflow::config
