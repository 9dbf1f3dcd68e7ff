#pragma once
// UCX transport: puts (ucp_put_nbx) into memory the peer mapped with ucp_mem_map, made visible
// with ucp_ep_flush_nbx (with peer error handling UCX carries them as active messages over tcp,
// even on one host: see open_ep). One UCX context and worker per instance, driven by a progress
// thread the instance owns (transport/ucx_worker.hpp); every public method may be called from
// any thread and only queues work for that thread, except register_memory / deregister_memory,
// which wait for it (they are rare: rank start and stop).
//
// Completions (`done` of push) run on the progress thread, or on the calling thread when a push
// is refused before anything was queued (bad block, unknown or unreachable peer). They must not
// block: post a message and return. They may call the transport again.
//
// A peer whose endpoint fails (UCX error callback, or a push not flushed within flush_timeout
// of its data starting to move) is unreachable: its pushes in flight complete with an error and
// later ones fail at once, until a probe finds it answering again (probe_interval, with
// backoff) or connect() is called for it again (a re-registration or a restarted peer).
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "config/tunables.hpp"
#include "transport/transport.hpp"

namespace kvflow::transport {

struct ucx_options {
  // A push whose puts and flush have not completed in this time, counted from when its data
  // starts moving (the endpoint's pushes before it completed), fails and marks its peer
  // unreachable; draining a closing endpoint waits as long (KVFLOW_UCX_FLUSH_TIMEOUT_MS).
  // UCX reports a dead peer when its connection breaks, but not a frozen one, and an
  // event-driven worker that sleeps runs no keepalive.
  std::chrono::milliseconds flush_timeout{config::tunables{}.ucx_flush_timeout_ms};
  // An unreachable peer is probed this long after it failed, then at doubling intervals up to
  // probe_interval_max; it serves pushes again once it answers (KVFLOW_UCX_PROBE_INTERVAL_MS,
  // KVFLOW_UCX_PROBE_INTERVAL_MAX_MS). 0: never probed (only a new connect() revives it).
  std::chrono::milliseconds probe_interval{config::tunables{}.ucx_probe_interval_ms};
  std::chrono::milliseconds probe_interval_max{config::tunables{}.ucx_probe_interval_max_ms};
  // Peers in this process's shared-memory domain (same boot and IPC namespace, shared memory
  // not excluded by UCX_TLS) whose regions all came from allocate_memory or are CUDA memory are
  // written through UCX's shared-memory and CUDA IPC transports without peer error handling
  // (with it UCX emulates the puts over tcp); their death is the control plane's to detect.
  // false: every peer gets peer error handling.
  bool shared_memory = true;
  // UCX's tcp on every interface, not only loopback (KVFLOW_UCX_TCP=2): see
  // transport/ucx_network_policy.hpp for why loopback is the default.
  bool tcp_beyond_loopback = false;
};

// The options the tunables give (every other field at its default).
ucx_options ucx_options_from(const config::tunables& t);

class ucx_transport final : public transport {
 public:
  // Initializes UCX (context, worker, progress thread); an error (logged here) instead of a
  // throw when UCX cannot start.
  static result<std::unique_ptr<ucx_transport>> create(ucx_options options = {});
  // Closes every endpoint (drained for up to flush_timeout, then forced: pushes still in flight
  // fail), unmaps every region still registered, destroys the worker and context and joins the
  // progress thread. Must not run on the progress thread (not from a completion).
  ~ucx_transport() override;

  const char* name() const override { return "ucx"; }
  // The packed UCX worker address (bytes).
  std::string endpoint() const override;
  std::vector<memory_type> memory_types() const override;
  // Reaches other hosts (tcp here; a site UCX brings RDMA); orders pushes after a CUDA event
  // once order_on_device succeeded.
  capabilities query() const override;
  // Fenced pushes (push_after) wait for their fence on a stream of CUDA device `device`; a CUDA
  // host callback then hands each to the progress thread, which starts its puts (no thread
  // blocks on a fence, nothing polls it). Without it a fence is refused. One device per instance.
  status order_on_device(int device);
  // Shared memory UCX allocates (ucp_mem_map with UCP_MEM_MAP_ALLOCATE: sysv/posix segments),
  // which same-host peers write with plain CPU copies; deregister_memory frees it.
  result<allocation> allocate_memory(std::uint64_t owner, std::uint64_t len) override;
  result<region_desc> region_of(const void* base, std::uint64_t len) const override;
  // len == 0 maps nothing: the descriptor has an empty remote_key and only empty blocks fit it.
  result<region_desc> register_memory(std::uint64_t owner, void* base, std::uint64_t len) override;
  // Returns once ucp_mem_unmap is done. Caution (UCX 1.13): puts to user memory are emulated
  // over active messages, and the receiving worker writes them without checking the region is
  // still mapped: a peer still connected with the old description can write into it. Peers
  // must be disconnected (or stopped) before the memory is freed.
  void deregister_memory(std::uint64_t region) override;
  // Checks the description here; the endpoint is created (and the rkeys unpacked) on the
  // progress thread, so this never waits for the network. The same description again is a
  // no-op unless the peer is unreachable (then it reconnects); a different one force-closes
  // the old endpoint first.
  status connect(std::uint64_t peer, const std::string& endpoint,
                 const std::vector<region_desc>& regions) override;
  void disconnect(std::uint64_t peer) override;
  void push(std::uint64_t peer, const std::vector<block>& blocks, completion done) override;
  // The push's puts start once `ready_fence` completed (see order_on_device).
  void push_after(std::uintptr_t ready_fence, std::uint64_t peer, const std::vector<block>& blocks,
                  completion done) override;
  std::uint64_t bytes_moved() const override;

  // What UCX chose to reach `peer` (lanes, transports, devices), as ucp_ep_print_info prints
  // it; empty when the peer has no endpoint. Waits for the progress thread.
  std::string describe_endpoint(std::uint64_t peer) const;

 private:
  struct impl;
  explicit ucx_transport(std::unique_ptr<impl> p);
  void submit(std::uintptr_t fence, std::uint64_t peer, const std::vector<block>& blocks, completion done);
  std::unique_ptr<impl> impl_;
};

}  // namespace kvflow::transport
