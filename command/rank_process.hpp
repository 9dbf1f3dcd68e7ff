#pragma once
// `kvflow bootstrap` and `kvflow rank`: the bootstrap registry and one rank as their own
// processes, the way a serving deployment runs them. No CAF types here.
#include <cstdint>
#include <string>

#include "config/topology.hpp"
#include "config/link_security.hpp"
#include "config/tunables.hpp"

namespace kvflow::command {

struct bootstrap_options {
  config::cluster_config cluster;
  std::string listen = "127.0.0.1:0";
  config::tunables tunables;
  config::link_security links;
};

// Publishes the registry, prints "kvflow bootstrap listening on HOST:PORT" on stdout (the port
// it got when asked for 0), and serves until SIGTERM/SIGINT. Exit 0, or 1 when it cannot listen.
int run_bootstrap(const bootstrap_options& o);

struct rank_options {
  config::cluster_config cluster;
  bool prefill = true;
  int rank = 0;
  std::string bootstrap;               // HOST:PORT of the registry
  std::string listen = "127.0.0.1:0";  // where this rank's node accepts its peers
  std::string report_to;               // HOST:PORT of the launcher (the observer); may be empty
  std::string transport = "ucx";
  int pool_pages = 0;                  // KV (and state) pages of the rank's pool
  int aux_slots = 0;                   // aux rows
  int chunk_tokens = 1024;             // prefill: tokens per chunk of the simulated engine
  std::uint32_t wire_version = 0;      // 0: this build's; else pretend another (compatibility tests)
  config::tunables tunables;
  config::link_security links;
};

// Runs one rank until SIGTERM/SIGINT: joins the registry, hosts the agreement supervisors its
// rank leads, serves requests with the synthetic KV content of `kvflow simulate`, re-registers
// when the registry restarts. Exit 0 on a signal; 1 when it cannot start (reason on stderr) or
// the rank died; 2 when the registry refuses this build's wire version.
int run_rank(const rank_options& o);

}  // namespace kvflow::command
