#pragma once
// A fixed pair of ranks for the targets that plan transfers from what a peer sent: a prefill
// rank's memory, the decode rank that reads it with its memory registered with an in-process
// transport (as decode_rank.cpp registers it when the transport allocates none), and the
// registration that decode rank sends (`pool`, `regions`). Two topologies: MLA with state and
// CP-parallel sending across two PP stages, and MHA whose decode rank gathers heads from two
// prefill TP ranks. Built once per process, identically in every process (region ids included),
// so seeds made by one process describe the fixture of another.
#include <cstdint>
#include <memory>
#include <vector>

#include "actors/block_plan.hpp"
#include "actors/rank_memory.hpp"
#include "config/routing.hpp"
#include "transport/inproc_transport.hpp"

namespace kvflow::fuzz {

struct engine_memory {
  std::vector<std::byte> kv, state, aux;
  std::vector<buffer_spec> specs;
  rank_memory mem;
};

struct plan_fixture {
  std::shared_ptr<const config::routing_plan> plan;
  bool mla = true;
  int prefill_rank = 0;  // the sender
  int decode_rank = 0;   // the receiver, which reads `read` from the sender
  config::peer_read read;
  engine_memory src, dst;
  std::vector<aux_record> receipts;  // the decode rank's receipt slots
  std::shared_ptr<transport::inproc_fabric> fabric;
  std::shared_ptr<transport::inproc_transport> transport;
  remote_pool pool;                          // dst as the decode rank registers it
  std::vector<transport::region_desc> regions;
};

const plan_fixture& mla_fixture();
const plan_fixture& mha_fixture();

// The layers a chunk to `pool` moves (send_chunk: the sender's, within the pool's).
config::range layers_to(const plan_fixture& f, const remote_pool& pool);

// Fails unless every block reads inside the sender's memory (or is the receipt `receipt`) and
// writes inside one buffer that `pool` describes (KV, state, aux or receipts).
void check_blocks(const plan_fixture& f, const remote_pool& pool, const std::vector<transport::block>& blocks,
                  const aux_record* receipt);

// Pushes `blocks` to the fixture's decode rank through its transport; the completion's status.
status push(const plan_fixture& f, const std::vector<transport::block>& blocks);

}  // namespace kvflow::fuzz
