// Target attach_rank: a rank's attachment to its group's root supervisor (msg::attach_rank: a handle), as
// the supervisor in another process receives it (supervisor.cpp, an actor's handler). This
// target checks the decoding of another node's handle and its round trip.
#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::attach_rank> v{
      {some_actor()}, {caf::actor{}}};
  std::vector<bytes> out;
  for (auto& m : v) out.push_back(serialize(m));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::attach_rank>(data, size, [](const msg::attach_rank& m) {
    (void)m;
  });
}
