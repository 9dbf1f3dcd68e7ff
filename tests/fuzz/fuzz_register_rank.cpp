// Target register_rank: a prefill rank's registration with the bootstrap registry
// (msg::register_rank), as the registry receives it. The registry actor's own checks (version,
// handle) are in bootstrap_registry.cpp's anonymous namespace; the table it keeps is reachable:
// registry_table::add of the key and name, against the MLA fixture's prefill topology (PP 2 x
// CP 2). Properties: a key is accepted exactly when it lies inside the topology; the same owner
// registering again keeps its generation; another live owner of an accepted key is refused and
// named; once the first owner is down, the other takes the key at the next generation.
#include "actors/bootstrap_registry.hpp"
#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"
#include "tests/fuzz/plan_fixture.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

namespace {

void receive(const msg::register_rank& r) {
  const auto& t = mla_fixture().plan->config().prefill;
  registry_table table(t);
  const auto& k = r.key;
  const bool inside = k.dp_group >= 0 && k.dp_group < t.dp && k.cp >= 0 && k.cp < t.cp && k.tp >= 0 && k.tp < t.tp &&
                      k.pp >= 0 && k.pp < t.pp;
  auto first = table.add(k, 1, r.name);
  if (first.ok() != inside) fail(std::string("key ") + to_string(k) + (inside ? " refused" : " accepted"));
  if (!first) return;
  auto again = table.add(k, 1, r.name);
  if (!again || again.value() != first.value()) fail("the same owner registering again changed its generation");
  auto other = table.add(k, 2, "another rank");
  if (other || other.error().reason().find(r.name) == std::string::npos) fail("a live owner's key was taken, or not named");
  table.owner_down(1);
  auto next = table.add(k, 2, "another rank");
  if (!next || next.value() != first.value() + 1) fail("a dead owner's key was not taken at the next generation");
}

}  // namespace

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::register_rank> v{
      {msg::wire_version, {0, 1, 0, 1}, "prefill rank 3", some_actor(), {64, "fp8", "dsv32", false, 1, 2, 1, 1, 1, 1, 2}},
      {msg::wire_version, {0, 0, 0, 0}, "prefill rank 0", caf::actor{}, {}},
      {msg::wire_version - 1, {1, 0, 0, 0}, "prefill rank 4 (another build)", some_actor(), {}},
  };
  std::vector<bytes> out;
  for (auto& r : v) out.push_back(serialize(r));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::register_rank>(data, size, [](const msg::register_rank& r) { receive(r); });
}
