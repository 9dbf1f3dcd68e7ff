// Target kv_status: a prefill rank's status of one request (msg::kv_status: state and reason), as a
// decode rank receives it. decode_rank.cpp's handler (a peer check, then the state as a kv_poll)
// is in its anonymous namespace, not reachable here: this target checks the decoding and its
// round trip, and the state's reading as a kv_poll (any byte is one of the enum's values).
#include "actors/kv_poll.hpp"
#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::kv_status> v{
      {5, 11, 2, static_cast<std::uint8_t>(kv_poll::success), ""},
      {5, 11, 3, static_cast<std::uint8_t>(kv_poll::failed), "bad destination info: destination page 40 outside the registered 32 pages"},
      {std::uint64_t(-1), 0, 0, static_cast<std::uint8_t>(kv_poll::transferring), ""}};
  std::vector<bytes> out;
  for (auto& m : v) out.push_back(serialize(m));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::kv_status>(data, size, [](const msg::kv_status& m) {
    const auto state = static_cast<kv_poll>(m.state);
    if (is_terminal(state) != (m.state == 0 || m.state == 4)) fail("is_terminal disagrees with the state's value");
    (void)to_string(state);
  });
}
