#pragma once
// The simulated serving engine of one rank, as `kvflow simulate` and `kvflow rank` run it: it
// owns the rank's KV memory, chooses page indices, drives its scheduler steps through the public
// API (poll every step, act on the agreed round like SGLang's scheduler queues: init and send
// chunks once WaitingForInput is agreed, release at an agreed terminal state) and writes / checks
// the synthetic KV content. The router (the driver) hands it requests as msg::new_request and
// it reports every request it released as msg::rank_released. Internal to runtime/.
#include <caf/all.hpp>

#include <memory>
#include <mutex>
#include <set>

#include "actors/rank.hpp"
#include "config/routing.hpp"
#include "kvflow/kvflow.hpp"
#include "runtime/agreement_checker.hpp"
#include "runtime/sim_memory.hpp"

namespace kvflow::runtime {

// Fault flags the router attaches to a request (msg::new_request::fault).
enum request_fault : std::uint8_t {
  fault_none = 0,
  fault_drop_dst_info = 1,  // decode: the first destination message of the request is lost
  fault_corrupt = 2,        // prefill: one byte of the request's KV is flipped before sending
};

// Requests whose first destination message is lost (the drop-dst-info fault), shared with the
// node's control-link fault seam.
struct dst_drops {
  std::mutex mutex;
  std::set<std::pair<std::uint64_t, std::uint64_t>> pending;  // (room, incarnation)
};

// The node's control-link fault seam over `drops`: drops the first destination message of each
// request listed there.
dst_filter drop_filter(std::shared_ptr<dst_drops> drops);

struct sim_engine_args {
  std::shared_ptr<const config::routing_plan> plan;
  bool prefill = true;
  int rank = 0;
  int group = 0;  // agreement group id (for the checker)
  std::shared_ptr<prefill_rank> prefill_api;
  std::shared_ptr<decode_rank> decode_api;
  caf::actor rank_actor;  // linked: the engine and its rank live and die together
  std::shared_ptr<sim_memory> memory;
  int chunk_tokens = 1024;
  std::int64_t step_interval_us = 2000;
  caf::actor observer;
  std::shared_ptr<agreement_checker> checker;  // may be null
  std::shared_ptr<dst_drops> drops;            // may be null
};

caf::actor spawn_sim_engine(caf::actor_system& sys, sim_engine_args args);

}  // namespace kvflow::runtime
