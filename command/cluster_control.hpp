#pragma once
// How the workload driver (the router) reaches the cluster it drives: the simulated engines of
// ranks in its own process (`kvflow simulate`) or of rank processes a launcher started (`kvflow
// launch`); each engine drives its rank through the public API. CAF types are fine here (the
// command's router and engines are actors); the public embedding API has none.
#include <caf/all.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "command/engine_messages.hpp"
#include "config/status.hpp"

namespace kvflow::command {

struct cluster_handles {
  caf::actor registry;
  std::vector<caf::actor> prefill, decode;  // each rank's engine
};

class cluster_control {
 public:
  virtual ~cluster_control() = default;
  // Once, before the first request: every rank's engine (`self` is the driver, the engines'
  // observer).
  virtual cluster_handles start(caf::event_based_actor* self) = 0;
  // Fault injection. kill: the rank stops at once; freeze: its process stops answering;
  // restart_bootstrap: the registry goes away and comes back; stop_bootstrap: it goes for good
  // (freeze false) or stops answering (true). Unsupported kinds return a reason.
  virtual status kill(caf::event_based_actor* self, bool prefill, int rank) = 0;
  virtual status freeze(bool prefill, int rank) = 0;
  virtual status restart_bootstrap() = 0;
  virtual status stop_bootstrap(bool freeze) = 0;
  // Bytes the transports moved, given every live rank's pool usage reply.
  virtual std::uint64_t transfer_bytes(const std::vector<msg::pool_usage>& usage) const = 0;
  virtual double copy_seconds() const { return 0; }
  // After the report: stop what start() started.
  virtual void stop(caf::event_based_actor* self) = 0;
};

}  // namespace kvflow::command
