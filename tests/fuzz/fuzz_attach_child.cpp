// Target attach_child: a child's attachment to its agreement parent (msg::attach_child: index and handle),
// as a supervisor in another process receives it. supervisor.cpp's handler (index range, then a
// monitor of the handle) is an actor's: this target checks the decoding (the handle of another
// node included) and its round trip.
#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::attach_child> v{
      {0, some_actor()}, {3, caf::actor{}}};
  std::vector<bytes> out;
  for (auto& m : v) out.push_back(serialize(m));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::attach_child>(data, size, [](const msg::attach_child& m) {
    (void)m;
  });
}
