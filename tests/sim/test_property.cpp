// Property: over random topologies, random workloads, random faults and random interleavings
// of every rank's events, all ranks of a group receive identical agreed states each round, a
// room's agreed state only rises (or drops to Failed), nothing stalls, nothing leaks, and
// every request no fault touched succeeds with its bytes verified.
#include <cstdlib>
#include <random>

#include "sim_helpers.hpp"

using kvflow::command::parse_fault;

namespace {

std::string pick(std::mt19937_64& g, std::initializer_list<const char*> xs) {
  auto i = g() % xs.size();
  return *(xs.begin() + i);
}

}  // namespace

TEST_CASE("property: agreement and delivery over random topologies and interleavings") {
  // KVFLOW_PROPERTY_CASES / KVFLOW_PROPERTY_SEED widen a run by hand (a soak); CI runs the default.
  const char* n = std::getenv("KVFLOW_PROPERTY_CASES");
  const char* seed = std::getenv("KVFLOW_PROPERTY_SEED");
  std::mt19937_64 g(seed ? std::strtoull(seed, nullptr, 10) : 20261128);
  const int cases = n ? std::atoi(n) : 100;
  for (int k = 0; k < cases; ++k) {
    int ptp = 1 << (g() % 3), cp = 1 << (g() % 3), pp = 1 + g() % 2, pdp = 1 + g() % 2;
    int dtp = ptp;
    switch (g() % 3) {
      case 0: dtp = ptp; break;
      case 1: dtp = ptp * 2; break;
      default: dtp = ptp > 1 ? ptp / 2 : ptp * 2;
    }
    int dpp = (g() % 2) ? pp : 1, ddp = 1 + g() % 2;
    bool mha = g() % 2;
    bool state = !mha && g() % 2;  // MLA with state pages (an indexer cache) half the time
    std::string prefill = "tp=" + std::to_string(ptp) + ",cp=" + std::to_string(cp) + ",pp=" +
                          std::to_string(pp) + ",dp=" + std::to_string(pdp);
    std::string decode = "tp=" + std::to_string(dtp) + ",pp=" + std::to_string(dpp) + ",dp=" + std::to_string(ddp);
    const std::string model = mha ? "mha:3:8:16" : state ? "mla:3:48:8" : "mla:3:48";
    auto o = kvflow::test::small_run(prefill, decode, model);
    o.cluster.cp_send_all = g() % 2;
    o.requests = 6 + static_cast<int>(g() % 8);
    o.concurrency = 1 + static_cast<int>(g() % 4);
    o.interleave_seed = g() | 1;
    o.seed = g();
    // Up to two faults, at random requests.
    int faults = static_cast<int>(g() % 3);
    for (int f = 0; f < faults; ++f) {
      int at = 1 + static_cast<int>(g() % o.requests);
      auto kind = pick(g, {"kill:prefill", "kill:decode", "abort:decode", "drop-dst-info"});
      std::string spec;
      if (kind == "kill:prefill")
        spec = kind + ":" + std::to_string(g() % o.cluster.prefill.ranks()) + "@" + std::to_string(at);
      else if (kind == "kill:decode")
        spec = kind + ":" + std::to_string(g() % o.cluster.decode.ranks()) + "@" + std::to_string(at);
      else
        spec = kind + "@" + std::to_string(at);
      o.faults.push_back(parse_fault(spec));
    }
    std::string what = "case " + std::to_string(k) + ": --prefill " + prefill + " --decode " + decode +
                       " --model " + model +
                       (o.cluster.cp_send_all ? " --cp-send all" : "") + " --requests " +
                       std::to_string(o.requests) + " --concurrency " + std::to_string(o.concurrency) +
                       " --seed " + std::to_string(o.seed) + " --interleave " + std::to_string(o.interleave_seed);
    for (const auto& f : o.faults) what += " --fault " + f.text;
    INFO(what);
    auto r = run_simulation(o);
    kvflow::test::check_survived(r);
    if (o.faults.empty()) CHECK(r.succeeded == r.requests);
  }
}
