#pragma once
// Builds small simulation runs and checks what every passing run must satisfy.
#include <doctest/doctest.h>

#include <string>

#include "config/topology.hpp"
#include "command/simulation.hpp"

namespace kvflow::test {

// A small, fast workload: few layers, short prompts, several chunks per request.
inline command::simulation_options small_run(const std::string& prefill, const std::string& decode,
                                             const std::string& model = "mla:4:64") {
  command::simulation_options o;
  o.cluster.prefill = config::parse_prefill(prefill);
  o.cluster.decode = config::parse_decode(decode);
  o.cluster.dtype = config::kv_dtype::bf16;
  o.cluster.model = config::parse_model(model, o.cluster.dtype);
  o.cluster.page_size = 16;
  o.requests = 12;
  o.prompt_min = 40;
  o.prompt_max = 300;
  o.chunk_tokens = 64;
  o.concurrency = 4;
  o.deadline_s = 30;
  o.tunables.bootstrap_timeout_ms = 5000;
  o.tunables.waiting_timeout_ms = 5000;
  return o;
}

inline std::string problems(const command::simulation_report& r) {
  std::string s;
  for (const auto& p : r.problems) s += p + "; ";
  int shown = 0;
  for (const auto& o : r.outcomes)
    if (o.state != "Success" && shown++ < 4)
      s += "request " + std::to_string(o.index) + " " + o.state + ": " + o.reason + "; ";
  return s;
}

// Every request succeeded and every byte verified; nothing leaked or stalled.
inline void check_clean(const command::simulation_report& r) {
  INFO(problems(r));
  CHECK(r.exit_code() == 0);
  CHECK(r.succeeded == r.requests);
  CHECK(r.stalled == 0);
  CHECK(r.bytes_expected > 0);
  CHECK(r.bytes_verified == r.bytes_expected);
  CHECK(r.mismatched_pages == 0);
  CHECK(r.leaked_pages == 0);
  CHECK(r.leaked_aux_slots == 0);
  CHECK(r.agreement_violations == 0);
  CHECK(r.agreement_rounds_checked > 0);
}

// Faults ran: whatever failed was touched by a fault, nothing stalled, nothing leaked.
inline void check_survived(const command::simulation_report& r) {
  INFO(problems(r));
  CHECK(r.exit_code() == 0);
  CHECK(r.stalled == 0);
  CHECK(r.unexpected_failures == 0);
  CHECK(r.leaked_pages == 0);
  CHECK(r.leaked_aux_slots == 0);
  CHECK(r.agreement_violations == 0);
  CHECK(r.bytes_verified == r.bytes_expected);
}

}  // namespace kvflow::test
