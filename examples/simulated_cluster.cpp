// Using kvflow as a library to run a simulated cluster in one process: here the configuration
// reported broken upstream (prefill PP2 x CP8 x TP8, SGLang #19548) with a DeepSeek-V3.2 shaped
// KV, decode TP8 reading both pipeline stages, and one decode rank killed midway.
#include <cstdio>

#include "command/simulation.hpp"

int main() {
  using namespace kvflow;
  command::simulation_options o;
  o.cluster.prefill = config::parse_prefill("pp=2,cp=8,tp=8");
  o.cluster.decode = config::parse_decode("tp=8,dp=2");
  o.cluster.dtype = config::kv_dtype::fp8;
  o.cluster.model = config::parse_model("dsv32", o.cluster.dtype);
  o.requests = 16;
  o.prompt_min = 256;
  o.prompt_max = 1024;
  o.concurrency = 4;
  o.tunables.bootstrap_timeout_ms = o.tunables.waiting_timeout_ms = 5000;
  o.faults.push_back(command::parse_fault("kill:decode:9@6"));
  auto r = command::run_simulation(o);
  std::printf("%d requests: %d succeeded, %d failed (%d not explained by the fault), %d stalled; "
              "%.1f MB verified, %llu pages leaked\n",
              r.requests, r.succeeded, r.failed, r.unexpected_failures, r.stalled,
              double(r.bytes_verified) / 1e6, static_cast<unsigned long long>(r.leaked_pages));
  for (const auto& out : r.outcomes)
    if (out.state != "Success") std::printf("  request %d: %s (%s)\n", out.index, out.state.c_str(), out.reason.c_str());
  return r.exit_code();
}
