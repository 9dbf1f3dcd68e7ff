#pragma once
// `kvflow simulate`: a whole prefill/decode cluster as actors in one process, every request's KV
// verified byte for byte at the decode side. No CAF types in this header.
#include <cstdint>
#include <string>
#include <vector>

#include "config/topology.hpp"
#include "config/tunables.hpp"

namespace kvflow::command {

struct fault_spec {
  enum class kind {
    kill_prefill, kill_decode, abort_decode, drop_dst_info, corrupt, duplicate_room,
    abort_decode_in_transfer,       // a decode rank aborts a few rounds after sending destinations
    freeze_prefill, freeze_decode,  // SIGSTOP the rank's process (launch only)
    restart_bootstrap,              // kill the bootstrap process and start it again (launch only)
    kill_bootstrap, freeze_bootstrap  // SIGKILL (for good) / SIGSTOP the bootstrap (launch only)
  };
  kind what = kind::kill_prefill;
  int rank = -1;  // kill faults
  int at = 0;     // request number (1-based): "after N requests have started" / "request N"
  std::string text;
};

// kill:prefill:R@N | kill:decode:R@N | abort:decode@N | abort-in-transfer:decode@N | drop-dst-info@N | corrupt@N | dup-room@N
// | freeze:prefill:R@N | freeze:decode:R@N | restart:bootstrap@N | kill:bootstrap@N
// | freeze:bootstrap@N (the last five: launch only)
fault_spec parse_fault(const std::string& text);

struct simulation_options {
  config::cluster_config cluster;
  int requests = 64;
  int prompt_min = 512;
  int prompt_max = 2048;
  int chunk_tokens = 1024;
  int concurrency = 8;
  std::string transport = "inproc";
  std::vector<fault_spec> faults;
  double deadline_s = 60;
  std::uint64_t seed = 1;
  int room_pool = 0;  // >0: draw rooms from this many values, reused once cleared
  // 0: real threads. Else every message of the cluster runs on CAF's deterministic test
  // scheduler, one at a time, the next one picked at random from this seed: a reproducible
  // random interleaving of every rank's events (the property tests use it).
  std::uint64_t interleave_seed = 0;
  // Interleaved runs: every push is held in flight and lands later, the held pushes in random
  // order among the messages (command/sim_delayed_transport.hpp).
  bool delay_transfers = false;
  bool processes = false;  // one process per rank (`kvflow launch`), not actors in this one
  // > 0: a soak. The load stays on for this many seconds (batches of `requests` requests, the
  // next batch once the last one started) with a random request fault (abort:decode,
  // drop-dst-info, dup-room) about every `soak_fault_every` requests. Simulate touches every
  // page of its pools first, so the resident-memory growth it reports is not first use.
  double soak_s = 0;
  int soak_fault_every = 8;
  config::tunables tunables;
};

// Throws config_error (one line naming the field) for options that cannot run.
void validate(const simulation_options& o);

struct request_outcome {
  std::uint64_t room = 0;
  int index = 0;
  int prefill_dp = 0;
  int decode_dp = 0;
  std::string state;  // "Success" | "Failed" | "Stalled"
  std::string reason;
  bool touched = false;
  double latency_ms = 0;
};

struct simulation_report {
  simulation_options options;
  int requests = 0, succeeded = 0, failed = 0, stalled = 0, unexpected_failures = 0;
  std::uint64_t bytes_expected = 0, bytes_verified = 0, mismatched_pages = 0;
  std::uint64_t leaked_pages = 0, leaked_aux_slots = 0, leaked_rooms = 0;
  std::uint64_t agreement_violations = 0;  // ranks of one group acting at different rounds/states
  std::uint64_t agreement_rounds_checked = 0;
  std::uint64_t transfer_bytes = 0;
  double transfer_seconds = 0;  // the workload's wall time: first request start to last finish
  double copy_seconds = 0;      // time the transport spent copying, summed over threads
  double latency_p50_ms = 0, latency_p99_ms = 0, latency_max_ms = 0;
  std::uint64_t peak_rss_bytes = 0;
  // Every fault applied; a soak keeps the first 256 texts only (it applies one every few requests).
  std::vector<std::string> faults_applied;
  std::uint64_t faults_applied_total = 0;
  // Soak: how long the load was on, requests finished per second over it, and this process's
  // resident memory and its allocator's bytes in use once a quarter of the soak had passed and
  // at its end.
  double soak_seconds = 0, requests_per_second = 0;
  std::uint64_t rss_warm_bytes = 0, rss_end_bytes = 0;
  std::uint64_t heap_warm_bytes = 0, heap_end_bytes = 0;
  // By request index. A soak keeps only the first 256 outcomes other than Success (its counts
  // above cover every request) and counts the others here.
  std::vector<request_outcome> outcomes;
  std::uint64_t outcomes_omitted = 0;
  std::vector<std::string> problems;  // why the exit code is 1, one line each
  bool complete = false;              // the driver finished (set by the simulation)
  std::uint64_t scheduled_events = 0; // interleaved mode: messages run
  std::uint64_t transfers_delayed = 0; // delay_transfers: pushes held in flight

  int exit_code() const { return problems.empty() ? 0 : 1; }
  // Bytes over the workload's wall time (goodput), and over the time spent copying them.
  double goodput_gbps() const { return transfer_seconds > 0 ? double(transfer_bytes) / 1e9 / transfer_seconds : 0; }
  double copy_gbps() const { return copy_seconds > 0 ? double(transfer_bytes) / 1e9 / copy_seconds : 0; }
  std::string to_json() const;
};

simulation_report run_simulation(const simulation_options& options);

}  // namespace kvflow::command
