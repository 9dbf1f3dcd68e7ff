#pragma once
// `kvflow launch`: the cluster of `kvflow simulate` as one process per rank on this host (or
// across network namespaces), with the same workload, report and exit codes. No CAF types here.
#include <string>
#include <vector>

#include "command/simulation.hpp"
#include "config/link_security.hpp"

namespace kvflow::command {

struct launch_options {
  std::string host = "127.0.0.1";  // where the launcher and the bootstrap listen
  std::string prefill_host;        // where prefill ranks listen (default: host)
  std::string decode_host;         // where decode ranks listen (default: host)
  // Command prefixes for rank processes (e.g. "ip netns exec kv-b"), split on spaces.
  std::string prefill_exec, decode_exec;
  // The topology and model flags as given (--prefill ..., --model ...), passed to every process.
  std::vector<std::string> cluster_flags;
  std::string log_level = "warn";
  // Node links of the cluster; without a token the launcher makes a random one for it.
  config::link_security links;
};

// Starts the bootstrap and every rank as processes of this binary, drives the workload, stops
// them. Problems starting the cluster are reported (exit code 1), not thrown.
simulation_report run_launch(const simulation_options& o, const launch_options& l);

}  // namespace kvflow::command
