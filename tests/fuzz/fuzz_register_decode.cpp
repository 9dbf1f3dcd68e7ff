// Target register_decode: a decode rank's registration with the bootstrap registry (msg::register_decode:
// rank and handle), as the registry receives it (bootstrap_registry.cpp, an actor's handler in its
// anonymous namespace). This target checks the decoding and its round trip.
#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::register_decode> v{
      {0, some_actor()}, {7, caf::actor{}}};
  std::vector<bytes> out;
  for (auto& m : v) out.push_back(serialize(m));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::register_decode>(data, size, [](const msg::register_decode& m) {
    (void)m;
  });
}
