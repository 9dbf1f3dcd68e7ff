// Target node_entry: one rank process's listening address (msg::node_entry), as a node receives it (in a
// node_table, or on its own: the type is registered, so any peer may send it). This target checks
// the decoding and its round trip.
#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::node_entry> v{
      {"decode 0", "10.0.0.2", 40200, true, some_actor()}, {"", "", 0, false, caf::actor{}}};
  std::vector<bytes> out;
  for (auto& m : v) out.push_back(serialize(m));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::node_entry>(data, size, [](const msg::node_entry& m) {
    (void)m;
  });
}
