// Target register_supervisor: an agreement supervisor's registration (msg::register_supervisor: group, index,
// handle, shared-memory segment name), as the bootstrap registry receives it and keeps it for
// lookups (an actor's handler). What its lookups hand out is fuzzed by the supervisor_entry
// target; this one checks the decoding and its round trip.
#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::register_supervisor> v{
      {100000, -1, some_actor(), "/kvflow-agree-100000-4242"}, {0, 2, some_actor(), ""}};
  std::vector<bytes> out;
  for (auto& m : v) out.push_back(serialize(m));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::register_supervisor>(data, size, [](const msg::register_supervisor& m) {
    (void)m;
  });
}
