#pragma once
// The active messages of the staged path across hosts (transport/ucx_staged_transport.hpp), as
// they travel: fixed headers (copied out of the message, never read in place) and the payload
// each carries. Everything a receiver reads here came from another process, which may lie.
#include <cstdint>
#include <type_traits>

namespace kvflow::transport::staged_wire {

constexpr std::uint32_t version = 3;

// UCX active-message ids on the transport's own worker.
enum am_id : unsigned {
  hello = 1,    // sender -> receiver: asks for a lane; payload: the sender's worker address, where the
                // welcome and the verdicts go (one lane per such address: ucx_staged_transport.cpp)
  welcome = 2,  // receiver -> sender: the lane, or why none; payload: slot addresses, or the reason
  filled = 3,   // sender -> receiver: a slot's data was put and flushed; payload: its runs
  verdict = 4,  // receiver -> sender: a slot's outcome; payload: the reason when refused
  goodbye = 5,  // sender -> receiver: the lane is no longer needed
};

struct hello_header {
  std::uint32_t version = staged_wire::version;
  std::uint32_t reserved = 0;
  std::uint64_t nonce = 0;  // the welcome echoes it
  // The receiver's secret, from its endpoint: only a peer that got the endpoint (in a
  // registration, over the cluster's authenticated links) is given a lane. UCX's own listener
  // takes anyone who reaches its port.
  std::uint64_t secret[2] = {0, 0};
  // The lane this sender's worker was last welcomed to by this receiver, and that welcome's
  // token (-1 and 0: none): a sender whose link failed and that asks again on a new one. The
  // receiver then gives it that lane under a new token instead of the same one again.
  std::int32_t held_lane = -1;
  std::uint32_t reserved2 = 0;
  std::uint64_t held_token = 0;
};

struct welcome_header {
  std::uint64_t nonce = 0;
  std::int32_t lane = -1;    // -1: refused (payload: the reason)
  std::uint32_t slots = 0;   // payload: this many slot data addresses in the receiver (u64 each)
  std::uint64_t token = 0;   // what every later message about the lane must carry
};

struct filled_header {
  std::uint32_t lane = 0, slot = 0;
  std::uint64_t token = 0;
  std::uint64_t seq = 0;     // the sender's number for the slot, echoed in its verdict
  std::uint32_t count = 0;   // runs in the payload (staged_desc each)
  std::uint32_t reserved = 0;
};

struct verdict_header {
  std::uint32_t lane = 0, slot = 0;
  std::uint64_t token = 0;
  std::uint64_t seq = 0;
  std::uint32_t ok = 0;      // 1: every byte of the slot landed
  std::uint32_t reserved = 0;
};

struct goodbye_header {
  std::uint32_t lane = 0, reserved = 0;
  std::uint64_t token = 0;
};

static_assert(std::is_trivially_copyable_v<hello_header> && std::is_trivially_copyable_v<welcome_header> &&
                  std::is_trivially_copyable_v<filled_header> && std::is_trivially_copyable_v<verdict_header> &&
                  std::is_trivially_copyable_v<goodbye_header>,
              "headers travel as bytes");

}  // namespace kvflow::transport::staged_wire
