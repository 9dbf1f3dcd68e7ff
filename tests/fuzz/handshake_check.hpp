#pragma once
// The handshake check both sides run on what the other registered (actors/handshake.hpp), with
// its property: handshake_mismatch is empty exactly when every field is equal.
#include "actors/handshake.hpp"
#include "tests/fuzz/fuzz_support.hpp"

namespace kvflow::fuzz {

// True when `theirs` is accepted against `mine`, as the receiver decides it.
inline bool handshake_accepts(const kv_handshake& mine, const kv_handshake& theirs) {
  const bool equal = mine.page_size == theirs.page_size && mine.dtype == theirs.dtype &&
                     mine.layout == theirs.layout && mine.cp_send_all == theirs.cp_send_all &&
                     mine.prefill_tp == theirs.prefill_tp && mine.prefill_cp == theirs.prefill_cp &&
                     mine.prefill_pp == theirs.prefill_pp && mine.prefill_dp == theirs.prefill_dp &&
                     mine.decode_tp == theirs.decode_tp && mine.decode_pp == theirs.decode_pp &&
                     mine.decode_dp == theirs.decode_dp;
  const auto why = handshake_mismatch(mine, theirs);
  if (why.empty() != equal)
    fail(equal ? "handshake_mismatch refused an equal handshake: " + why : "handshake_mismatch accepted another configuration");
  return equal;
}

}  // namespace kvflow::fuzz
