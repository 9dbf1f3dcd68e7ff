#pragma once
// Per-request state (semantics.md section 2). Ordered so that MIN is the group rule.
#include <cstdint>

namespace kvflow {

enum class kv_poll : std::uint8_t {
  failed = 0,
  bootstrapping = 1,
  waiting_for_input = 2,
  transferring = 3,
  success = 4,
};

inline const char* to_string(kv_poll s) {
  switch (s) {
    case kv_poll::failed: return "Failed";
    case kv_poll::bootstrapping: return "Bootstrapping";
    case kv_poll::waiting_for_input: return "WaitingForInput";
    case kv_poll::transferring: return "Transferring";
    case kv_poll::success: return "Success";
  }
  return "?";
}

inline bool is_terminal(kv_poll s) { return s == kv_poll::failed || s == kv_poll::success; }

}  // namespace kvflow
