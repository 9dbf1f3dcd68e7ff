// Target any_message: a whole caf::message as a node's network layer decodes it from a peer:
// element type names looked up among the types msg::add_message_types registers (every kvflow
// message, whichever actor it was meant for), then each element through its inspector. Its
// seeds hold one message of every registered kvflow type, so this target also covers the types
// that have no target of their own because every byte string of their size is a valid value
// (abort_ack, lookup_decode, lookup_supervisor, topology_query, node_query). Its seeds also
// hold the types only a rank's own process sends (board_round, room_timeout, early_expiry,
// push_done, api_*): they are not registered, so they decode as nothing. Property: no crash,
// bounded memory, and a message that decoded round-trips, except one holding a push_done whose
// `seconds` is not finite (CAF 0.17's serializer, caf/detail/ieee_754.hpp pack754, loops forever
// on an infinite double); regressions/any_message/ holds such a message, from when push_done
// was registered.
#include <cmath>

#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

std::vector<bytes> kvflow::fuzz::seeds() {
  using namespace kvflow::msg;
  const auto a = some_actor();
  const step_states states{{1, 1, 4, true}, {2, 3, 0, false}};
  remote_pool pool;
  pool.layer_count = 1;
  pool.pages = 2;
  pool.item_bytes = 64;
  pool.page_size = 4;
  pool.kv = {{1, 0, 128, 64}};
  pool.receipts = {2, 0, 24, 24};
  std::vector<caf::message> v{
      caf::make_message(step_report{1, 0, states}),
      caf::make_message(agreed_round{2, 100000, states}),
      caf::make_message(attach_child{1, a}),
      caf::make_message(attach_rank{a}),
      caf::make_message(board_round{3}),
      caf::make_message(room_timeout{4, 1}),
      caf::make_message(early_expiry{4, 1}),
      caf::make_message(push_done{4, 1, 0, false, "peer 0 unreachable", 4096, 0.25}),
      caf::make_message(register_rank{wire_version, {0, 0, 0, 0}, "prefill rank 0", a, {}}),
      caf::make_message(registration_reply{true, 1, ""}),
      caf::make_message(register_decode{0, a}),
      caf::make_message(lookup_decode{0}),
      caf::make_message(decode_entry{0, a, false}),
      caf::make_message(register_node{wire_version, "decode 0", "127.0.0.1", 40200, true, a}),
      caf::make_message(node_entry{"decode 0", "127.0.0.1", 40200, true, a}),
      caf::make_message(node_query{}),
      caf::make_message(node_table{{{"prefill 0", "127.0.0.1", 40100, false, a}}}),
      caf::make_message(register_supervisor{0, -1, a, "/kvflow-agree-0-1"}),
      caf::make_message(lookup_supervisor{0, -1}),
      caf::make_message(supervisor_entry{0, -1, a, ""}),
      caf::make_message(set_registry{a}),
      caf::make_message(transport::region_desc{1, 4096, 0x7f0000000000, "Rkey"}),
      caf::make_message(remote_buffer{1, 0, 128, 64}),
      caf::make_message(topology_query{wire_version}),
      caf::make_message(topology_reply{wire_version, 1, 1, 1, 1, {{{0, 0, 0, 0}, "prefill rank 0", a, 1, {}}}}),
      caf::make_message(kv_registration{wire_version, 0, 0, 0, 0, 1, pool, a, "", {{1, 128, 0, ""}, {2, 24, 0, ""}}, {}}),
      caf::make_message(dst_info{wire_version, 4, 1, 0, {0, 1}, 0, {}, 0}),
      caf::make_message(abort_room{4, 1, 0, "aborted"}),
      caf::make_message(kv_status{4, 1, 0, 4, ""}),
      caf::make_message(abort_ack{4, 1, 0}),
      caf::make_message(api_create{4, 1, 0}),
      caf::make_message(api_init{4, 1, 2, 0}),
      caf::make_message(api_send{4, 1, {0, 1}, true, {}}),
      caf::make_message(api_destinations{4, 1, {0, 1}, 0, {}, 0}),
      caf::make_message(api_abort{4, 1, "engine"}),
      caf::make_message(api_apply{states, states}),
      // Two elements, as a request's reply may carry.
      caf::make_message(abort_ack{5, 1, 1}, kv_status{5, 1, 1, 0, "failed"}),
  };
  std::vector<bytes> out;
  for (auto& m : v) out.push_back(serialize(m));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  caf::message m;
  if (!decode(data, size, nullptr, m)) return 0;
  for (std::size_t i = 0; i < m.size(); ++i)
    if (m.match_element<msg::push_done>(i) && !std::isfinite(m.get_as<msg::push_done>(i).seconds)) return 0;
  check_round_trip(m);
  return 0;
}
