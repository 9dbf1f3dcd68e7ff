// Target topology_reply: the bootstrap registry's topology and registration table (msg::topology_reply), as
// a decode rank receives it. decode_rank.cpp's on_topology compares it with its own
// configuration and looks its peers up by key, in its anonymous namespace (not reachable here):
// this target checks the decoding (the table of entries, each with a key, a name and another
// node's handle) and its round trip.
#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::topology_reply> v{
      {msg::wire_version, 1, 2, 2, 1,
       {{{0, 0, 0, 0}, "prefill rank 0", some_actor(), 1, {4, "fp8", "mla:4:40:8", false, 1, 2, 2, 1, 1, 1, 1}},
        {{0, 1, 0, 1}, "prefill rank 3", caf::actor{}, 2, {}}}},
      {msg::wire_version, 0, 0, 0, 0, {}}};
  std::vector<bytes> out;
  for (auto& m : v) out.push_back(serialize(m));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::topology_reply>(data, size, [](const msg::topology_reply& m) {
    (void)m;
  });
}
