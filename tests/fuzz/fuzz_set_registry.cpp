// Target set_registry: a restarted bootstrap registry's handle (msg::set_registry), as a rank receives it
// (rank_common.hpp keeps a valid one). This target checks the decoding of another node's handle
// and its round trip.
#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::set_registry> v{
      {some_actor()}, {caf::actor{}}};
  std::vector<bytes> out;
  for (auto& m : v) out.push_back(serialize(m));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::set_registry>(data, size, [](const msg::set_registry& m) {
    (void)m;
  });
}
