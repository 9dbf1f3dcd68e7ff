#pragma once
// The simulated serving engine of one rank, as `kvflow simulate` and `kvflow rank` run it: it
// owns the rank's KV memory, chooses page indices, drives its scheduler steps through the public
// API (poll every step, act on the agreed round like SGLang's scheduler queues: init and send
// chunks once WaitingForInput is agreed, release at an agreed terminal state) and writes / checks
// the synthetic KV content. The router (the driver) hands it requests as msg::new_request and
// it reports every request it released as msg::rank_released (command/engine_messages.hpp).
#include <caf/all.hpp>

#include <memory>
#include <mutex>
#include <set>

#include "command/agreement_checker.hpp"
#include "command/sim_memory.hpp"
#include "config/routing.hpp"
#include "kvflow/kvflow.hpp"
#include "runtime/engine_host.hpp"

namespace kvflow::command {

// Fault flags the router attaches to a request (msg::new_request::fault).
enum request_fault : std::uint8_t {
  fault_none = 0,
  fault_drop_dst_info = 1,  // decode: the first destination message of the request is lost
  fault_corrupt = 2,        // prefill: one byte of the request's KV is flipped before sending
  fault_abort_in_transfer = 4,  // decode: the engine aborts a few rounds after its destinations went
};

// Requests whose first destination message is lost (the drop-dst-info fault), shared with the
// node's control-link fault seam.
struct dst_drops {
  std::mutex mutex;
  std::set<std::pair<std::uint64_t, std::uint64_t>> pending;  // (room, incarnation)
};

// The node's drop-dst-info seam (runtime::internal_options::drop_dst) over `drops`: drops the
// first destination message of each request listed there.
std::function<bool(std::uint64_t, std::uint64_t)> drop_filter(std::shared_ptr<dst_drops> drops);

struct sim_engine_args {
  std::shared_ptr<const config::routing_plan> plan;
  bool prefill = true;
  int rank = 0;
  runtime::added_rank rank_api;  // its actor is linked: the engine and its rank live and die together
  std::shared_ptr<sim_memory> memory;
  int chunk_tokens = 1024;
  std::int64_t step_interval_us = 2000;
  caf::actor observer;
  std::shared_ptr<agreement_checker> checker;  // may be null
  std::shared_ptr<dst_drops> drops;            // may be null
};

namespace msg {
struct new_request;
}
// Why the engine cannot serve `q` with pages of `page_size` tokens and a pool of `pool_pages`
// pages (empty: it can). In launch mode the request comes from another process: it is checked
// before any arithmetic on it, and one that cannot be served fails alone.
std::string request_problem(const msg::new_request& q, int page_size, int pool_pages);

caf::actor spawn_sim_engine(caf::actor_system& sys, sim_engine_args args);

}  // namespace kvflow::command
