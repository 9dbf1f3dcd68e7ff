// Target registration_reply: the bootstrap registry's answer to a registration (msg::registration_reply), as a
// rank or a node receives it (prefill_rank.cpp, runtime/api_network.cpp: it logs the reason).
// Nothing of it is checked there beyond `ok`: this target checks the decoding and its round trip.
#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::registration_reply> v{
      {true, 1, ""}, {false, 0, "registration of (dp_group=0, cp=1, tp=0, pp=0) by prefill rank 2 refused: owned by live prefill rank 1"}};
  std::vector<bytes> out;
  for (auto& m : v) out.push_back(serialize(m));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::registration_reply>(data, size, [](const msg::registration_reply& m) {
    (void)m;
  });
}
