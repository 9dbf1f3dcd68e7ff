#pragma once
// A UCX context and worker driven by the one thread allowed to touch the worker (internal to
// transport/: UCX headers stay out of ucx_transport.hpp).
//
// The worker runs in UCS_THREAD_MODE_SINGLE, so every UCX call on it happens on the progress
// thread; other threads post() commands. The thread sleeps in epoll on the worker's event fd and
// an eventfd for commands, and never busy-polls (machines here have 2 cores shared by several
// rank processes):
//   drain commands -> ucp_worker_progress until it returns 0 -> run deferred work ->
//   ucp_worker_arm (UCS_ERR_BUSY: progress again) -> epoll_wait.
// epoll_wait has no timeout unless the owner asks for a wake-up (a deadline, see set_deadline).
#include <ucp/api/ucp.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "config/status.hpp"

namespace kvflow::transport {

// Whether UCX may use its shared-memory transports (sysv, posix): UCX_TLS unset, or naming them
// (or sm, all) without excluding ("^...").
bool ucx_shared_memory_allowed();

class ucx_worker {
 public:
  using clock = std::chrono::steady_clock;
  using command = std::function<void()>;

  // ucp_init with `features` (UCP_FEATURE_WAKEUP is added), a single-threaded worker, its event
  // fd, and the progress thread. An error names the UCX call that failed. UCX's tcp transport
  // listens on loopback only unless `tcp_beyond_loopback` (transport/ucx_network_policy.hpp): a
  // worker whose address shows it elsewhere all the same is refused.
  static result<std::unique_ptr<ucx_worker>> create(std::uint64_t features, bool tcp_beyond_loopback = false);
  // Runs the commands already posted, destroys the worker on its thread, joins the thread and
  // cleans the context up. The owner closes its endpoints and unmaps its memory before (call()).
  ~ucx_worker();
  ucx_worker(const ucx_worker&) = delete;
  ucx_worker& operator=(const ucx_worker&) = delete;

  // Context-level calls (ucp_mem_map, ucp_rkey_pack) are made on the thread as well.
  ucp_context_h context() const { return context_; }
  // Only on the progress thread.
  ucp_worker_h worker() const { return worker_; }
  // The packed worker address (ucp_worker_get_address), taken before the thread started.
  const std::string& address() const { return address_; }
  // Memory types the context can access (UCP_ATTR_FIELD_MEMORY_TYPES), a bit per ucs_memory_type.
  std::uint64_t memory_types() const { return memory_types_; }

  // Runs `c` on the progress thread, after everything posted before it (FIFO across threads).
  void post(command c);
  // Runs `c` on the progress thread and waits for it; runs it inline when already on the thread
  // (a completion that re-enters the owner must not wait for itself).
  void call(const command& c);
  bool on_thread() const { return std::this_thread::get_id() == thread_id_; }

  // On the thread only. Work to run after the current ucp_worker_progress returns: UCX
  // callbacks queue their consequences here instead of calling out from inside UCX.
  void defer(command c) { deferred_.push_back(std::move(c)); }
  // On the thread only. Wake up no later than `t` and run `fn` (one deadline; a later call
  // replaces it; clock::time_point::max() clears it).
  void set_deadline(clock::time_point t, command fn);
  // On the thread only, outside UCX callbacks: progresses (sleeping in epoll between rounds)
  // until `done()` or `timeout`. For teardown, which must wait for closes to complete.
  bool progress_until(const std::function<bool()>& done, std::chrono::milliseconds timeout);

 private:
  ucx_worker() = default;
  void loop();
  // One round: progress until idle and run deferred work; true if anything happened.
  bool progress_round();
  bool run_commands();
  // Arms the worker and sleeps; returns after an event, a command or the deadline.
  void wait(int timeout_ms);
  void wake();

  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  std::string address_;
  std::uint64_t memory_types_ = 0;
  int worker_fd_ = -1;
  int command_fd_ = -1;  // eventfd: a post() wakes the thread
  int epoll_fd_ = -1;

  std::mutex mutex_;  // guards commands_ and stopping_
  std::vector<command> commands_;
  bool stopping_ = false;

  std::vector<command> deferred_;  // thread only
  clock::time_point deadline_ = clock::time_point::max();
  command on_deadline_;
  bool arm_failed_logged_ = false;
  std::thread thread_;
  std::thread::id thread_id_;
};

}  // namespace kvflow::transport
