// Target topology_reply: the bootstrap registry's prefill topology and registration table
// (msg::topology_reply: every prefill rank's key, name, handle, generation and the handshake it
// registered), as a decode rank receives it. decode_rank.cpp's on_topology (its anonymous
// namespace) checks the version and the topology, then each peer's registered handshake; that
// check is reachable and runs here on every entry, for the MLA fixture's decode rank: refused
// exactly when a field differs from the decode rank's own configuration.
#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"
#include "tests/fuzz/handshake_check.hpp"
#include "tests/fuzz/plan_fixture.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

std::vector<bytes> kvflow::fuzz::seeds() {
  const auto& c = mla_fixture().plan->config();
  const auto mine = handshake_of(c);
  auto rank_send = mine;
  rank_send.cp_send_all = false;  // a prefill rank configured to send from CP rank 0 only
  msg::topology_reply all{msg::wire_version, c.prefill.tp, c.prefill.cp, c.prefill.pp, c.prefill.dp, {}};
  for (int pp = 0; pp < c.prefill.pp; ++pp)
    for (int cp = 0; cp < c.prefill.cp; ++cp)
      all.entries.push_back({{0, cp, 0, pp}, "prefill rank " + std::to_string(pp * c.prefill.cp + cp),
                             pp == 1 ? some_actor() : caf::actor{}, 1, mine});
  auto mixed = all;
  mixed.entries.back().shape = rank_send;
  mixed.entries.back().generation = 2;
  std::vector<msg::topology_reply> v{all, mixed, {msg::wire_version, 0, 0, 0, 0, {}}};
  std::vector<bytes> out;
  for (auto& m : v) out.push_back(serialize(m));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::topology_reply>(data, size, [](const msg::topology_reply& t) {
    const auto& c = mla_fixture().plan->config();
    if (t.version != msg::wire_version) return;
    if (t.tp != c.prefill.tp || t.cp != c.prefill.cp || t.pp != c.prefill.pp || t.dp != c.prefill.dp) return;
    const auto mine = handshake_of(c);
    for (const auto& e : t.entries) (void)handshake_accepts(mine, e.shape);
  });
}
