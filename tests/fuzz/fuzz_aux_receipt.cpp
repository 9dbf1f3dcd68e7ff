// Target aux_receipt: a decode rank's receipt slot (actors/rank_memory.hpp aux_record: room,
// incarnation, checksum), which a prefill rank writes after the aux rows and the decode rank
// then reads (decode_rank.cpp's aux_landed, in its anonymous namespace: the slot's room and
// incarnation are the request's and its check is aux_checksum of it). Input: the 24 bytes in
// the slot, then optionally the (room, incarnation) the decode rank waits for (else the slot's).
// Properties: the only slot that counts as landed for a request is make_receipt's of it; an
// empty (zeroed) slot never does; the checksum depends on room and incarnation only; and a
// receipt planned (plan_aux_blocks) and pushed into the fixture's real slots lands.
#include <cstring>

#include "actors/block_plan.hpp"
#include "actors/rank_memory.hpp"
#include "tests/fuzz/fuzz_support.hpp"
#include "tests/fuzz/plan_fixture.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

namespace {

bool landed(const aux_record& slot, std::uint64_t room, std::uint64_t incarnation) {
  return slot.room == room && slot.incarnation == incarnation && slot.check == aux_checksum(slot);
}

bytes record_bytes(const aux_record& r, bool with_key, std::uint64_t room = 0, std::uint64_t incarnation = 0) {
  bytes out(sizeof r);
  std::memcpy(out.data(), &r, sizeof r);
  if (with_key) {
    out.resize(sizeof r + 16);
    std::memcpy(out.data() + sizeof r, &room, 8);
    std::memcpy(out.data() + sizeof r + 8, &incarnation, 8);
  }
  return out;
}

}  // namespace

std::vector<bytes> kvflow::fuzz::seeds() {
  return {
      record_bytes(make_receipt(5, 11), false),
      record_bytes(make_receipt(5, 10), true, 5, 11),  // an earlier request of the room
      record_bytes(aux_record{}, true, 0, 0),          // an empty slot
      record_bytes(make_receipt(~0ULL, ~0ULL), false),
  };
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  aux_record slot;
  if (size < sizeof slot) return 0;
  std::memcpy(&slot, data, sizeof slot);  // as the decode rank reads its slot
  std::uint64_t room = slot.room, incarnation = slot.incarnation;
  if (size >= sizeof slot + 16) {
    std::memcpy(&room, data + sizeof slot, 8);
    std::memcpy(&incarnation, data + sizeof slot + 8, 8);
  }
  const aux_record want = make_receipt(room, incarnation);
  if (!landed(want, room, incarnation)) fail("make_receipt's record does not count as landed");
  if (landed(aux_record{}, room, incarnation)) fail("an empty slot counts as landed");
  if (landed(slot, room, incarnation) && std::memcmp(&slot, &want, sizeof slot) != 0)
    fail("a slot other than the request's receipt counts as landed");
  aux_record other = slot;
  other.check = ~slot.check;
  if (aux_checksum(slot) == 0 || aux_checksum(other) != aux_checksum(slot))
    fail("the checksum is 0, or depends on the check it is compared with");

  // The receipt through the real path: planned into a slot of the fixture's decode rank, pushed.
  const auto& f = mla_fixture();
  const int row = static_cast<int>(room % static_cast<std::uint64_t>(f.pool.aux_rows));
  auto blocks = plan_aux_blocks(f.src.mem, f.pool, 0, row, &want);
  if (!blocks) fail("aux plan refused: " + blocks.error().reason());
  check_blocks(f, f.pool, blocks.value(), &want);
  if (auto s = push(f, blocks.value()); !s) fail("receipt push refused: " + s.reason());
  aux_record got;
  std::memcpy(&got, &f.receipts[static_cast<std::size_t>(row)], sizeof got);
  if (!landed(got, room, incarnation)) fail("the pushed receipt did not land");
  return 0;
}
