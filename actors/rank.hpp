#pragma once
// Prefill (sender) and decode (receiver) rank actors and what they share with the engine's
// scheduler thread (rank_shared): the state store, the requests' engine-side progress, and the
// agreement client state. The engine calls reach the actor as msg::api_* messages; poll() reads
// the shared part directly. No CAF types beyond handles.
#include <caf/fwd.hpp>
#include <caf/actor.hpp>
#include <cstdint>
#include <algorithm>
#include <chrono>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "actors/agreement.hpp"
#include "actors/failure_memory.hpp"
#include "actors/rank_memory.hpp"
#include "actors/state_store.hpp"
#include "config/routing.hpp"
#include "config/tunables.hpp"
#include "transport/transport.hpp"

namespace kvflow {

class step_board;
class agreed_ring;
namespace msg {
struct dst_info;
}

}  // namespace kvflow

namespace kvflow::cuda {
class fence_pool;
}

namespace kvflow {

// A request as the engine drove it so far (what the API checks calls against).
struct engine_room {
  std::uint64_t incarnation = 0;
  bool inited = false;       // prefill: init() came; decode: destinations were sent
  int pages = 0;             // prefill: pages to send (after the decode prefix)
  int sent = 0;              // prefill: pages handed over in chunks so far
  bool last = false;         // prefill: the last chunk came
  int prefix_pages = -1;     // prefill: the decode prefix, once every destination arrived
  bool agreed_ready = false; // a round showed the group past Bootstrapping for it
};

// Counters for the engine's metrics (under rank_shared::mutex).
struct rank_counters {
  std::uint64_t created = 0, succeeded = 0, failed = 0, aborted = 0;
  std::uint64_t bytes_sent = 0;
  double transfer_seconds = 0;
  std::uint64_t polls = 0, stalls = 0;
  std::uint64_t quarantined = 0, pushes_in_flight = 0;
  std::uint64_t failures_remembered = 0;  // prefill: entries of its actor's failed_before, now
};

// (room, incarnation) pairs an agreed round showed while this rank did not hold them, each kept
// for a while only (bounded) and answering one create: a room reused under the same key
// (SGLang's incarnation is always 0) is a new request. Timed by the steady clock, passed in (a
// test drives it without waiting).
class recent_requests {
 public:
  using time_point = std::chrono::steady_clock::time_point;
  void remember(std::uint64_t room, std::uint64_t incarnation, time_point now) {
    seen_.push_back({room, incarnation, now});
    while (seen_.size() > 4096) seen_.pop_front();
  }
  // True once for (room, incarnation) remembered within `window`.
  bool take(std::uint64_t room, std::uint64_t incarnation, std::chrono::milliseconds window, time_point now) {
    expire(now, window);
    auto it = std::find_if(seen_.begin(), seen_.end(),
                           [&](const entry& f) { return f.room == room && f.incarnation == incarnation; });
    if (it == seen_.end()) return false;
    seen_.erase(it);
    return true;
  }
  void drop(std::uint64_t room, std::uint64_t incarnation) {
    seen_.erase(std::remove_if(seen_.begin(), seen_.end(),
                               [&](const entry& f) { return f.room == room && f.incarnation == incarnation; }),
                seen_.end());
  }
  // Drops what was remembered longer ago than `window` (take never answers it any more).
  // Remembered in time order, so those are a prefix: looks at the oldest only when none is due.
  void expire(time_point now, std::chrono::milliseconds window) {
    while (!seen_.empty() && now - seen_.front().at > window) seen_.pop_front();
  }
  std::size_t size() const { return seen_.size(); }

 private:
  struct entry {
    std::uint64_t room, incarnation;
    time_point at;
  };
  std::deque<entry> seen_;
};

struct rank_shared {
  std::mutex mutex;  // guards everything below; the actor holds it while it handles a message
  state_store store;
  std::unordered_map<std::uint64_t, engine_room> engine;  // by room
  // Reasons of failed requests the rank already cleared, the latest of each key: at most 4096,
  // each for failure_memory_ms (make_rank sets it). Timed by the steady clock, which the
  // engine's thread and the actor both read.
  failure_memory cleared_reasons{4096, std::chrono::milliseconds(config::tunables{}.failure_memory_ms)};
  rank_counters counters;
  bool lost = false;  // the group's agreement is gone: the rank refuses new requests
  // The latest step this rank posted by message (the engine's thread writes it before the post
  // goes): no round above it can have completed, so an agreed round above it is forged.
  std::atomic<std::uint64_t> posted_step{0};
  std::string lost_reason;
  using time_point = std::chrono::steady_clock::time_point;
  void remember_reason(std::uint64_t room, std::uint64_t incarnation, const std::string& reason, time_point now) {
    cleared_reasons.replace({room, incarnation}, reason, now);
  }
  // Requests the group finished (terminal and released in an agreed round) while this rank did
  // not hold them: its engine's create that comes after that is late, and taken it would be a
  // room no other rank holds, so it is refused.
  recent_requests finished;
  // Requests the group failed but had not released yet while this rank did not hold them: this
  // rank's later create is the group's request and takes part in letting it go, but no later
  // round tells it the request failed (its view shows it failed already), so it fails at once.
  recent_requests failed_unheld;
  // The rank's periodic look at what it remembers (every step's poll): reasons past their age,
  // and finished and failed_unheld's requests past `late_window` (the bootstrap timeout, the
  // window in which they answer a create), go even while no request fails or is created. Costs
  // a look at each one's oldest entry when none is due.
  void expire(time_point now, std::chrono::milliseconds late_window) {
    if (cleared_reasons.size() != 0) cleared_reasons.expire(now);
    finished.expire(now, late_window);
    failed_unheld.expire(now, late_window);
  }
  // Why (room, incarnation) failed: from the store, or from the cleared requests' reasons.
  std::string failure_of(std::uint64_t room, std::uint64_t incarnation, time_point now) const {
    if (const auto* e = store.find(room); e != nullptr && e->incarnation == incarnation) return e->reason;
    if (const auto* r = cleared_reasons.find({room, incarnation}, now)) return *r;
    return {};
  }
};

// Test seam of the control link: true drops a destination message before it is sent (the
// simulator's drop-dst-info fault). Empty in production.
using dst_filter = std::function<bool(const msg::dst_info&)>;

struct rank_args {
  std::shared_ptr<const config::routing_plan> plan;
  int rank = 0;  // global prefill or decode rank
  config::tunables tunables;
  std::shared_ptr<transport::transport> transport;
  std::shared_ptr<const rank_memory> memory;  // the engine's memory (outlives the rank)
  std::shared_ptr<rank_shared> shared;
  caf::actor parent;    // shard supervisor (prefill) or TP supervisor (decode)
  int child_index = 0;  // index among the parent's children
  int group = 0;        // the agreement group, named by every agreed round of it
  // In one process: the parent's step board. Null: steps go by message (parent elsewhere).
  std::shared_ptr<step_board> board;
  // Where the group's agreed rounds are read; with a remote parent the rank publishes the
  // rounds it receives here.
  std::shared_ptr<agreed_ring> ring;
  caf::actor root;  // the group's TP supervisor: the only sender of its agreed rounds by message
  caf::actor registry;
  dst_filter drop_dst;  // decode only
  // Prefill with GPU memory: where the engine's ready fences were captured (the actor gives
  // each back once the pushes waiting on it were queued). Null: host memory, no fences.
  std::shared_ptr<cuda::fence_pool> fences;
};

caf::actor spawn_prefill_rank(caf::actor_system& sys, rank_args args);
caf::actor spawn_decode_rank(caf::actor_system& sys, rank_args args);

}  // namespace kvflow
