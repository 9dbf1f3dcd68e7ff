#pragma once
// What the two sides of a transfer must agree on before any byte moves, as each side itself was
// configured: every prefill rank registers its own (the registry hands it to decode ranks with
// the rank's entry) and every decode rank sends its own with its KV registration. A mismatch is
// refused at once with the field named (semantics.md section 7, 17: SGLang's per-side CP-send
// flags are never exchanged, and a mismatch stalls 300 s).
#include <cstdint>
#include <string>

#include "config/topology.hpp"

namespace kvflow {

struct kv_handshake {
  std::int32_t page_size = 0;
  std::string dtype;
  std::string layout;  // config::describe of the model: "dsv32", "mha:32:8:128", ...
  bool cp_send_all = false;
  std::int32_t prefill_tp = 0, prefill_cp = 0, prefill_pp = 0, prefill_dp = 0;
  std::int32_t decode_tp = 0, decode_pp = 0, decode_dp = 0;
};

kv_handshake handshake_of(const config::cluster_config& c);

// The first field in which `theirs` differs from `mine`, as "page size 32 there, 16 here";
// empty when they agree.
std::string handshake_mismatch(const kv_handshake& mine, const kv_handshake& theirs);

}  // namespace kvflow
