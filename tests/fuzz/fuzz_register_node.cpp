// Target register_node: a rank process's registration of where it listens (msg::register_node), as the
// bootstrap registry receives it (an actor's handler; it keeps the entry by name and hands it to
// every node that asks). This target checks the decoding and its round trip.
#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::register_node> v{
      {msg::wire_version, "prefill 3", "127.0.0.1", 40123, true, some_actor()},
      {msg::wire_version, "launcher", "::1", 0, false, caf::actor{}}};
  std::vector<bytes> out;
  for (auto& m : v) out.push_back(serialize(m));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::register_node>(data, size, [](const msg::register_node& m) {
    (void)m;
  });
}
