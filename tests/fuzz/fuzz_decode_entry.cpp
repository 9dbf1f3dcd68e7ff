// Target decode_entry: the bootstrap registry's answer to a lookup of a decode rank (msg::decode_entry:
// rank, handle, down), as a prefill rank receives it (prefill_rank.cpp's watch_decode, in its
// anonymous namespace). This target checks the decoding and its round trip.
#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::decode_entry> v{
      {0, some_actor(), false}, {3, caf::actor{}, true}};
  std::vector<bytes> out;
  for (auto& m : v) out.push_back(serialize(m));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::decode_entry>(data, size, [](const msg::decode_entry& m) {
    (void)m;
  });
}
