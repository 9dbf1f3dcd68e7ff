#pragma once
// Prefill (sender) and decode (receiver) rank actors: their arguments and the hooks through which
// the serving process (or the simulator) fills and checks KV memory. No CAF types beyond handles.
#include <caf/fwd.hpp>
#include <caf/actor.hpp>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "actors/agreement.hpp"
#include "actors/kv_pool.hpp"
#include "config/routing.hpp"
#include "config/tunables.hpp"
#include "transport/transport.hpp"

namespace kvflow {

class step_board;
class agreed_board;

// What a rank knows of one request.
struct request_view {
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  int prompt_tokens = 0;
  int n_pages = 0;
  int prefill_dp = 0;
  int decode_dp = 0;
  int prefix_pages = 0;
};

struct verify_counts {
  std::uint64_t bytes_expected = 0;
  std::uint64_t bytes_verified = 0;
  std::uint64_t mismatched_pages = 0;
};

struct rank_hooks {
  // Prefill: the request's KV was computed into `pages` (and its state into `state_pages`,
  // empty when the model has none); fill request pages [fill.begin, fill.end).
  std::function<void(kv_pool&, const request_view&, const std::vector<std::int32_t>& pages,
                     const std::vector<std::int32_t>& state_pages, config::range fill)>
      fill;
  // Prefill: the request's first output (token, logprob) for its aux slot; room, incarnation
  // and checksum are filled in by the rank.
  std::function<aux_record(const request_view&)> aux;
  // Decode: after an agreed Success, check what landed in `pages` and the aux slot.
  std::function<verify_counts(const kv_pool&, const request_view&,
                              const std::vector<std::int32_t>& pages,
                              const std::vector<std::int32_t>& state_pages, std::int32_t aux_slot)>
      verify;
  // Every agreed round this rank received (tests and the simulator check agreement with it).
  std::function<void(int group, std::uint64_t round, const step_states&)> agreed;
};

// Fault flags a scheduler may attach to a request (tests and `kvflow simulate --fault`).
enum request_fault : std::uint8_t {
  fault_none = 0,
  fault_drop_dst_info = 1,  // decode: the first destination message of the request is lost
  fault_corrupt = 2,        // prefill: one byte of the request's KV is flipped before sending
};

struct rank_args {
  std::shared_ptr<const config::routing_plan> plan;
  int rank = 0;  // global prefill or decode rank
  config::tunables tunables;
  std::shared_ptr<transport::transport> transport;
  pool_shape shape;
  caf::actor parent;    // shard supervisor (prefill) or TP supervisor (decode)
  int child_index = 0;  // index among the parent's children
  // In-process agreement: post steps on the parent's board, read agreed rounds from the group's
  // board. Both null: report and receive by message (the parent in another process).
  std::shared_ptr<step_board> board;
  std::shared_ptr<agreed_board> agreed;
  caf::actor registry;
  caf::actor observer;  // receives msg::rank_released
  rank_hooks hooks;
};

caf::actor spawn_prefill_rank(caf::actor_system& sys, rank_args args);
caf::actor spawn_decode_rank(caf::actor_system& sys, rank_args args);

}  // namespace kvflow
