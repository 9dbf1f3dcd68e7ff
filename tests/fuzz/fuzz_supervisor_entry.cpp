// Target supervisor_entry: the bootstrap registry's answer to a lookup of an agreement
// supervisor (msg::supervisor_entry: group, index, handle, shared-memory segment name), as a
// rank process receives it. runtime/api_network.cpp then opens the named segment for the group
// (shm_segment::open): that is reachable and runs here on the decoded name and group, against
// whatever /dev/shm holds (the segment target fuzzes the contents of one). Property: open
// refuses, or maps a segment that is the one its name and group promise; nothing is written.
#include "actors/messages.hpp"
#include "actors/shm_agreement.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::supervisor_entry> v{
      {100000, -1, some_actor(), "/kvflow-agree-100000-4242"},
      {3, 1, some_actor(), ""},
      {0, -1, caf::actor{}, ""},
  };
  std::vector<bytes> out;
  for (auto& m : v) out.push_back(serialize(m));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::supervisor_entry>(data, size, [](const msg::supervisor_entry& m) {
    if (m.shared_memory.empty()) return;  // the group agrees through messages
    auto seg = shm_segment::open(m.shared_memory, m.group);
    if (seg && seg.value()->name() != m.shared_memory) fail("open mapped a segment of another name");
  });
}
