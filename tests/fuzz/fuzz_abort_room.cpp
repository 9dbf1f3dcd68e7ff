// Target abort_room: a decode rank's abort of one request (msg::abort_room), as a prefill rank receives
// it. prefill_rank.cpp's handler (which remembers the abort for a request not seen yet, bounded)
// is in its anonymous namespace, not reachable here: this target checks the decoding and its
// round trip.
#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::abort_room> v{
      {5, 11, 0, "aborted: the engine gave up"}, {7, 1, 3, ""}};
  std::vector<bytes> out;
  for (auto& m : v) out.push_back(serialize(m));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::abort_room>(data, size, [](const msg::abort_room& m) {
    (void)m;
  });
}
