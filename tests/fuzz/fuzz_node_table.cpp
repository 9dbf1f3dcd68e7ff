// Target node_table: the bootstrap registry's table of rank processes (msg::node_table), as a node
// receives it (runtime/api_network.cpp dials the listed hosts; not reachable without a network).
// This target checks the decoding of the list and its round trip.
#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::node_table> v{
      {{{"prefill 0", "127.0.0.1", 40100, true, some_actor()}, {"decode 0", "127.0.0.1", 40200, false, caf::actor{}}}},
      {{}}};
  std::vector<bytes> out;
  for (auto& m : v) out.push_back(serialize(m));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::node_table>(data, size, [](const msg::node_table& m) {
    (void)m;
  });
}
