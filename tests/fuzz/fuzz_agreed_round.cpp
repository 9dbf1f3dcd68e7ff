// Target agreed_round: a round of the group's agreement from a TP supervisor in another process
// (msg::agreed_round), as a rank receives it: rank_common.hpp publishes it, as it came, into
// the agreed_ring the engine's polls read (the poll itself, in runtime/api_rank.cpp, is not
// reachable without a whole rank). The ring here already holds rounds 1..3, as a running rank's
// does. Properties: a round the ring serves is the round asked for, with the states published
// for it; the round that came is served (unless its slot holds it or a later round already);
// waiting for any round with no time left returns at once.
#include <algorithm>
#include <string>

#include "actors/agreed_ring.hpp"
#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

namespace {

constexpr std::size_t capacity = 8;  // small: a forged round collides with a held one often

step_states held_states(std::uint64_t round) {
  return {{1, 1, static_cast<std::uint8_t>(round % 5), false}, {4, 2, 4, round % 2 == 0}};
}

void receive(msg::agreed_round& a) {
  agreed_ring ring(capacity);
  for (std::uint64_t round = 1; round <= 3; ++round)
    ring.publish(std::make_shared<const agreed_view>(agreed_view{round, 7, held_states(round), 0}));
  // Rounds 1..3 hold their slots; any later round takes its slot (a forged one too: who may
  // send rounds is the control link's check, not the ring's).
  const bool taken = a.round > 3;
  const step_states states = a.states;
  ring.publish(std::make_shared<const agreed_view>(agreed_view{a.round, a.group, std::move(a.states), 0}));
  for (std::uint64_t round : {std::uint64_t{1}, std::uint64_t{2}, std::uint64_t{3}, a.round, a.round + 1}) {
    const agreed_view* v = ring.get(round);
    if (v != nullptr && v->round != round) fail("the ring served round " + std::to_string(v->round) + " for " + std::to_string(round));
    if (v != nullptr && round == a.round && taken && v->states != states) fail("the ring served other states for the round that came");
    if (ring.wait_for(round, std::chrono::microseconds(0)) != v) fail("wait_for without time disagrees with get");
  }
  if (taken && ring.get(a.round) == nullptr) fail("the round that came is not served");
  if (ring.latest() < std::max<std::uint64_t>(3, taken ? a.round : 0)) fail("latest() is below a published round");
}

}  // namespace

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::agreed_round> v{
      {4, 7, {{1, 1, 4, true}, {4, 2, 0, true}, {6, 1, 2, false}}},
      {2, 7, held_states(2)},
      {11, 100000, {}},
  };
  std::vector<bytes> out;
  for (auto& a : v) out.push_back(serialize(a));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::agreed_round>(data, size, [](msg::agreed_round& a) { receive(a); });
}
