#pragma once
// The messages between the `kvflow` command's router (the workload driver) and the simulated
// engines it drives, in one process (simulate) or in rank processes (launch). The library's own
// messages are not here: these are the command's, registered beside them.
#include <caf/atom.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/meta/type_name.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace kvflow::command::msg {

using start_atom = caf::atom_constant<caf::atom("start")>;

// ---- the router and schedulers -> the engines -----------------------------------------------
struct new_request {
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::int32_t prompt_tokens = 0;
  std::int32_t prefill_dp = 0;
  std::int32_t decode_dp = 0;
  std::int32_t prefix_pages = 0;
  std::uint8_t fault = 0;  // request_fault flags (fault injection)
};
struct abort_request {  // the scheduler aborts a request on this rank
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::string reason;
};

// ---- engine -> observer (the simulator's bookkeeping) ----------------------------------------
struct rank_released {  // the engine acted on an agreed terminal state and freed the room
  bool prefill = true;
  std::int32_t rank = 0;
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
  std::uint64_t round = 0;
  std::uint8_t state = 0;
  std::string reason;
  std::uint64_t bytes_expected = 0;
  std::uint64_t bytes_verified = 0;
  std::uint64_t mismatched_pages = 0;
};

// The digests of the agreed rounds a rank's engine received (the launcher checks that every
// rank of a group got the same record for each round, across processes).
struct round_digests {
  std::int32_t group = 0;
  std::vector<std::uint64_t> rounds;
  std::vector<std::uint64_t> digests;
};

struct pool_usage_query {};
struct pool_usage {
  bool prefill = true;
  std::int32_t rank = 0;
  std::int64_t used_pages = 0;
  std::int64_t used_aux = 0;
  std::int64_t live_rooms = 0;
  std::uint64_t bytes_moved = 0;  // through this rank's transport (a process's own transport)
  std::uint64_t peak_rss_bytes = 0;  // of the rank's process
  std::int64_t draining_pages = 0;   // of used_pages: lent to pushes still in flight (come back)
};

template <class I>
typename I::result_type inspect(I& f, new_request& x) {
  return f(caf::meta::type_name("new_request"), x.room, x.incarnation, x.prompt_tokens,
           x.prefill_dp, x.decode_dp, x.prefix_pages, x.fault);
}
template <class I>
typename I::result_type inspect(I& f, abort_request& x) {
  return f(caf::meta::type_name("abort_request"), x.room, x.incarnation, x.reason);
}
template <class I>
typename I::result_type inspect(I& f, rank_released& x) {
  return f(caf::meta::type_name("rank_released"), x.prefill, x.rank, x.room, x.incarnation,
           x.round, x.state, x.reason, x.bytes_expected, x.bytes_verified, x.mismatched_pages);
}

template <class I>
typename I::result_type inspect(I& f, round_digests& x) {
  return f(caf::meta::type_name("round_digests"), x.group, x.rounds, x.digests);
}
template <class I>
typename I::result_type inspect(I& f, pool_usage_query&) {
  return f(caf::meta::type_name("pool_usage_query"));
}
template <class I>
typename I::result_type inspect(I& f, pool_usage& x) {
  return f(caf::meta::type_name("pool_usage"), x.prefill, x.rank, x.used_pages, x.used_aux,
           x.live_rooms, x.bytes_moved, x.peak_rss_bytes, x.draining_pages);
}

// Registers these types with an actor system config (they cross processes under launch).
void add_engine_message_types(caf::actor_system_config& cfg);

}  // namespace kvflow::command::msg
