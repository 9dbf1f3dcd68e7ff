// The JSON report of `kvflow simulate` (architecture.md: outside tests read these fields).
#include <nlohmann/json.hpp>

#include "command/simulation.hpp"

namespace kvflow::command {

std::string simulation_report::to_json() const {
  using nlohmann::json;
  const auto& c = options.cluster;
  json j;
  j["topology"] = {
      {"prefill", {{"tp", c.prefill.tp}, {"cp", c.prefill.cp}, {"pp", c.prefill.pp}, {"dp", c.prefill.dp}}},
      {"decode", {{"tp", c.decode.tp}, {"dp", c.decode.dp}, {"pp", c.decode.pp}}},
      {"model", config::describe(c.model)},
      {"dtype", config::to_string(c.dtype)},
      {"page_size", c.page_size},
      {"cp_send", c.cp_send_all ? "all" : "rank0"},
      {"transport", options.transport}};
  j["requests"] = requests;
  j["succeeded"] = succeeded;
  j["failed"] = failed;
  j["stalled"] = stalled;
  j["unexpected_failures"] = unexpected_failures;
  j["bytes_expected"] = bytes_expected;
  j["bytes_verified"] = bytes_verified;
  j["mismatched_pages"] = mismatched_pages;
  j["leaked_pages"] = leaked_pages;
  j["leaked_aux_slots"] = leaked_aux_slots;
  j["leaked_rooms"] = leaked_rooms;
  j["agreement_violations"] = agreement_violations;
  j["agreement_rounds_checked"] = agreement_rounds_checked;
  if (options.interleave_seed != 0) j["scheduled_events"] = scheduled_events;
  if (options.delay_transfers) j["transfers_delayed"] = transfers_delayed;
  // gbps: bytes over the workload's wall time (goodput, bounded here by filling and verifying);
  // copy_gbps: bytes over the time the transport spent copying them.
  j["transfer"] = {{"bytes", transfer_bytes}, {"seconds", transfer_seconds}, {"gbps", goodput_gbps()},
                   {"copy_seconds", copy_seconds}, {"copy_gbps", copy_gbps()}};
  j["latency_ms"] = {{"p50", latency_p50_ms}, {"p99", latency_p99_ms}, {"max", latency_max_ms}};
  j["peak_rss_bytes"] = peak_rss_bytes;
  j["faults"] = faults_applied;
  if (options.soak_s > 0)
    j["soak"] = {{"seconds", soak_seconds},
                 {"requests_per_second", requests_per_second},
                 {"faults_applied", faults_applied_total},
                 {"outcomes_omitted", outcomes_omitted},
                 {"rss_warm_bytes", rss_warm_bytes},
                 {"rss_end_bytes", rss_end_bytes},
                 {"heap_warm_bytes", heap_warm_bytes},
                 {"heap_end_bytes", heap_end_bytes}};
  j["problems"] = problems;
  json outs = json::array();
  for (const auto& o : outcomes) {
    json e = {{"room", o.room}, {"index", o.index}, {"prefill_dp", o.prefill_dp},
              {"decode_dp", o.decode_dp}, {"state", o.state}, {"touched", o.touched},
              {"latency_ms", o.latency_ms}};
    if (!o.reason.empty()) e["reason"] = o.reason;
    outs.push_back(std::move(e));
  }
  j["outcomes"] = std::move(outs);
  return j.dump(2);
}

}  // namespace kvflow::command
