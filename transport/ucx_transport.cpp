#include "transport/ucx_transport.hpp"

#include <spdlog/spdlog.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "cuda/gpu.hpp"
#include "transport/host_identity.hpp"
#include "transport/local_mapping.hpp"
#include "transport/ucx_address.hpp"
#include "transport/ucx_network_policy.hpp"
#include "transport/ucx_worker.hpp"

namespace kvflow::transport {

namespace {

using clock = ucx_worker::clock;

std::string peer_name(std::uint64_t peer) { return "peer " + std::to_string(peer); }

bool same_regions(const std::vector<region_desc>& a, const std::vector<region_desc>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].id != b[i].id || a[i].size != b[i].size || a[i].address != b[i].address ||
        a[i].remote_key != b[i].remote_key)
      return false;
  return true;
}

// Where this process can be reached through UCX's shared-memory transports: same kernel boot
// and same IPC namespace (sysv segments), and not excluded by UCX_TLS. Empty when not.
std::string shared_memory_domain() {
  if (!ucx_shared_memory_allowed()) return {};
  const std::string boot = boot_id();
  char ipc[64] = {};
  auto n = ::readlink("/proc/self/ns/ipc", ipc, sizeof ipc - 1);
  if (boot.empty() || n <= 0) return {};
  return boot + "/" + std::string(ipc, static_cast<std::size_t>(n));
}

// A remote key is UCX's packed rkey after one byte that says how the memory came to be: peers
// write UCX-allocated (shared) memory directly, registered user memory only through UCX's
// emulation of puts, which needs the owner to take part, and registered CUDA memory through
// UCX's CUDA IPC lane on the same host (one-sided: the writer maps the owner's allocation).
constexpr char key_kind_allocated = 'A';
constexpr char key_kind_registered = 'R';
constexpr char key_kind_cuda = 'C';

// The endpoint a peer receives: a tag, this process's shared-memory domain, the worker address.
constexpr char endpoint_tag[] = "kvflow-ucx-1";
std::string pack_endpoint(const std::string& domain, const std::string& worker_address) {
  std::string out(endpoint_tag);
  out.push_back('\0');
  std::uint32_t n = static_cast<std::uint32_t>(domain.size());
  out.append(reinterpret_cast<const char*>(&n), sizeof n);
  out += domain;
  out += worker_address;
  return out;
}
struct unpacked_endpoint {
  std::string domain, worker_address;
};
result<unpacked_endpoint> unpack_endpoint(const std::string& e) {
  const std::size_t tag = sizeof endpoint_tag;  // with its terminating zero
  if (e.size() < tag + 4 || e.compare(0, tag, endpoint_tag, tag) != 0)
    return status::error("not a kvflow UCX endpoint (another build or transport?)");
  std::uint32_t n = 0;
  std::memcpy(&n, e.data() + tag, sizeof n);
  if (n > e.size() - tag - 4) return status::error("endpoint: truncated");
  unpacked_endpoint u;
  u.domain = e.substr(tag + 4, n);
  u.worker_address = e.substr(tag + 4 + n);
  if (u.worker_address.empty()) return status::error("endpoint: no worker address");
  return u;
}

}  // namespace

ucx_options ucx_options_from(const config::tunables& t) {
  ucx_options o;
  o.flush_timeout = std::chrono::milliseconds(t.ucx_flush_timeout_ms);
  o.probe_interval = std::chrono::milliseconds(t.ucx_probe_interval_ms);
  o.probe_interval_max = std::chrono::milliseconds(t.ucx_probe_interval_max_ms);
  o.tcp_beyond_loopback = t.ucx_tcp == 2;
  return o;
}

struct ucx_transport::impl {
  // ---- Shared with callers (mutex_) --------------------------------------------------------
  // What a peer described at connect: pushes are checked against it on the caller's thread.
  struct described {
    std::uint64_t generation = 0;  // which connect() this is; the progress thread's link matches
    std::string endpoint;
    std::vector<region_desc> regions;
    std::unordered_map<std::uint64_t, region_desc> by_id;
    std::string failure;  // set once the peer is unreachable: pushes fail at once with it
  };

  // ---- Progress thread only ----------------------------------------------------------------
  struct remote_region {
    std::uint64_t address = 0;
    std::uint64_t size = 0;
    ucp_rkey_h rkey = nullptr;  // none for an empty region
  };
  struct link {
    std::uint64_t generation = 0;
    ucp_ep_h ep = nullptr;
    bool shared = false;  // written through shared memory (no peer error handling)
    // The peer is this very worker (ranks of one process): UCX then writes the addresses it is
    // given, so a region deregistered here since the connect must not be written.
    bool same_worker = false;
    std::unordered_map<std::uint64_t, remote_region> regions;
    std::string failure;
    // Pushes in flight on the endpoint, oldest first. UCX moves an endpoint's puts in order, so
    // only the oldest one's data is moving: its flush deadline counts from when it became the
    // oldest (`head_since`), not from when it was queued behind the others.
    std::deque<std::uint64_t> in_flight;
    clock::time_point head_since{};
    // What the peer described (connect), kept to reopen the endpoint when probing it.
    std::string endpoint;
    std::vector<region_desc> descs;
    // A failed link: when it is probed next, the wait before that, and a probe in flight.
    clock::time_point probe_at = clock::time_point::max();
    std::chrono::milliseconds backoff{0};
    bool probing = false;
    clock::time_point probe_deadline{};
  };
  struct local_region {
    std::uint64_t owner = 0;
    ucp_mem_h memh = nullptr;  // none for an empty region
    std::uint64_t address = 0;  // where it starts here
  };
  // One push: its requests (puts, then a flush) complete through on_request_done.
  struct push_op {
    impl* self = nullptr;
    std::uint64_t id = 0;
    std::uint64_t peer = 0;
    std::uint64_t generation = 0;
    std::vector<block> blocks;
    completion done;
    std::uint64_t bytes = 0;
    std::size_t pending = 0;  // requests issued and not completed
    bool issued = false;      // every request is issued (or issuing stopped at an error)
    ucs_status_t status = UCS_OK;
  };
  // An endpoint on its way out. Flushed first when the peer is healthy, so the peer has sent
  // every put acknowledgement before the connection goes (UCX 1.13 aborts a process whose
  // acknowledgement of an emulated put fails: ucp_progress_rma_cmpl -> ucs_fatal), then
  // force-closed, which completes whatever is still outstanding with UCS_ERR_CANCELED.
  struct retiring {
    impl* self = nullptr;
    std::uint64_t id = 0;
    ucp_ep_h ep = nullptr;
    std::vector<ucp_rkey_h> rkeys;  // destroyed once the endpoint is closed
    bool flushing = false;          // the drain flush has not completed
    bool close_issued = false;
    bool closing = false;  // the forced close has not completed
  };

  ucx_options options;
  std::string domain;  // shared_memory_domain() of this process
  bool dying = false;  // shut_down() ran: the worker is being destroyed
  std::atomic<std::uint64_t> bytes{0};
  std::atomic<std::uint64_t> next_region{1};
  mutable std::mutex allocations_mutex;
  std::map<std::uint64_t, region_desc> allocations;  // allocate_memory's regions, by id
  std::atomic<std::uint64_t> next_push{1};

  mutable std::mutex mutex;
  std::unordered_map<std::uint64_t, described> peers;
  std::uint64_t next_generation = 1;

  // Progress thread only from here on.
  std::unordered_map<std::uint64_t, link> links;
  std::unordered_map<std::uint64_t, local_region> regions;
  std::unordered_map<std::uint64_t, push_op*> live;  // issued, not completed
  std::unordered_map<std::uint64_t, std::unique_ptr<retiring>> retiring_eps;
  std::uint64_t next_retiring = 1;
  // Deadlines of draining endpoints, in order (one timeout for all); pushes' are per link.
  std::deque<std::pair<clock::time_point, std::uint64_t>> drain_deadlines;

  std::unique_ptr<ucx_worker> worker;

  // Fenced pushes (push_after): a stream of the node's CUDA device waits for each push's fence
  // on the GPU, then a host callback hands the push to the progress thread. No thread blocks on
  // a fence and nothing polls it.
  mutable std::mutex fence_mutex;
  cuda::stream fence_stream;  // no handle until order_on_device

  ~impl() {
    if (!worker) return;
    {
      // Every fenced push handed over (its callback ran) before the worker goes.
      std::lock_guard g(fence_mutex);
      if (fence_stream.handle() != nullptr) (void)fence_stream.synchronize();
    }
    worker->call([this] { shut_down(); });
    worker.reset();
  }

  // CUDA host callback (a CUDA runtime thread; no CUDA calls here): the fence completed.
  static void on_fence_done(void* p) {
    auto* op = static_cast<push_op*>(p);
    op->self->worker->post([op] { op->self->run_push(op); });
  }

  // ---- On the progress thread ----------------------------------------------------------------

  static void on_request_done(void* request, ucs_status_t st, void* user_data) {
    auto* op = static_cast<push_op*>(user_data);
    ucp_request_free(request);
    if (op->self->dying) {  // purged by ucp_worker_destroy: no deferred work any more
      if (--op->pending == 0 && op->issued) {
        if (op->done) op->done(status::error("push to " + peer_name(op->peer) + " failed: transport shut down"));
        delete op;
      }
      return;
    }
    if (st != UCS_OK && op->status == UCS_OK) op->status = st;
    --op->pending;
    op->self->maybe_finish(op);
  }

  static void on_ep_error(void* arg, ucp_ep_h ep, ucs_status_t st) {
    auto* self = static_cast<impl*>(arg);
    for (auto& [peer, l] : self->links) {
      if (l.ep != ep) continue;
      self->mark_unreachable(peer, l, peer_name(peer) + " unreachable: " + ucs_status_string(st));
      // UCX wants a failed endpoint closed, but not from inside its own error callback.
      self->worker->defer([self, peer = peer, gen = l.generation] {
        auto it = self->links.find(peer);
        if (it != self->links.end() && it->second.generation == gen) self->close_ep(it->second);
      });
      return;
    }
  }

  // Completes `op` (after UCX returns) once every request it issued has completed: only then
  // are the source buffers free again.
  void maybe_finish(push_op* op) {
    if (!op->issued || op->pending > 0) return;
    live.erase(op->id);
    status st;
    auto l = links.find(op->peer);
    if (l != links.end() && l->second.generation == op->generation) retire_head(l->second);
    if (op->status != UCS_OK) {
      st = status::error("push to " + peer_name(op->peer) +
                         " failed: " + ucs_status_string(op->status));
    } else if (l == links.end() || l->second.generation != op->generation) {
      // The interface promises an error to pushes in flight at disconnect, even those the
      // drain let land.
      st =
          status::error("push to " + peer_name(op->peer) + " failed: disconnected while in flight");
    } else {
      bytes.fetch_add(op->bytes, std::memory_order_relaxed);
    }
    worker->defer([done = std::move(op->done), st = std::move(st)] { done(st); });
    delete op;
  }

  void fail(push_op* op, std::string reason) {
    worker->defer([done = std::move(op->done), r = std::move(reason)] { done(status::error(r)); });
    delete op;
  }

  // Drops finished pushes from the front of the link's queue; the next one's data starts
  // moving now, so its deadline starts now.
  void retire_head(link& l) {
    bool moved = false;
    while (!l.in_flight.empty() && live.count(l.in_flight.front()) == 0) {
      l.in_flight.pop_front();
      moved = true;
    }
    if (!moved) return;
    if (!l.in_flight.empty()) l.head_since = clock::now();
    arm_watchdog();
  }

  // The peer's endpoint failed: later pushes fail at once until a new connect().
  void mark_unreachable(std::uint64_t peer, link& l, std::string reason) {
    if (!l.failure.empty()) return;
    spdlog::warn("ucx: {}", reason);
    l.failure = reason;
    schedule_probe(l);
    std::lock_guard guard(mutex);
    auto it = peers.find(peer);
    if (it != peers.end() && it->second.generation == l.generation)
      it->second.failure = std::move(reason);
  }

  // Takes the link's endpoint out of service: drained first unless the peer has failed.
  // `drain`: let the puts in flight finish first; else force at once (completes them with
  // UCS_ERR_CANCELED).
  void close_ep(link& l, bool drain = true) {
    if (l.ep == nullptr) return;
    auto r = std::make_unique<retiring>();
    r->self = this;
    r->id = next_retiring++;
    r->ep = std::exchange(l.ep, nullptr);
    for (auto& [id, reg] : l.regions)
      if (reg.rkey != nullptr) r->rkeys.push_back(std::exchange(reg.rkey, nullptr));
    auto* raw = r.get();
    retiring_eps.emplace(raw->id, std::move(r));
    if (drain && l.failure.empty()) {
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      p.cb.send = on_drained;
      p.user_data = raw;
      void* req = ucp_ep_flush_nbx(raw->ep, &p);
      if (UCS_PTR_IS_PTR(req)) {
        raw->flushing = true;
        drain_deadlines.emplace_back(clock::now() + options.flush_timeout, raw->id);
        if (drain_deadlines.size() == 1) arm_watchdog();
        return;
      }
    }
    force_close(raw);
  }

  // `r` lives while its flush or close is outstanding; the deferred work looks it up again,
  // since a forced close may complete the flush (and release `r`) first.
  static void on_drained(void* request, ucs_status_t, void* user_data) {
    auto* r = static_cast<retiring*>(user_data);
    ucp_request_free(request);
    r->flushing = false;
    if (r->self->dying) return;
    r->self->worker->defer([self = r->self, id = r->id] {
      auto it = self->retiring_eps.find(id);
      if (it == self->retiring_eps.end()) return;
      if (!it->second->close_issued)
        self->force_close(it->second.get());
      else
        self->maybe_release(it->second.get());
    });
  }

  static void on_closed(void* request, ucs_status_t, void* user_data) {
    auto* r = static_cast<retiring*>(user_data);
    ucp_request_free(request);
    r->closing = false;
    if (r->self->dying) return;
    // Not from inside UCX's callback: destroying rkeys touches the worker's pools.
    r->self->worker->defer([self = r->self, id = r->id] {
      auto it = self->retiring_eps.find(id);
      if (it != self->retiring_eps.end()) self->maybe_release(it->second.get());
    });
  }

  void force_close(retiring* r) {
    ucp_request_param_t p{};
    p.op_attr_mask =
        UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.flags = UCP_EP_CLOSE_FLAG_FORCE;
    p.cb.send = on_closed;
    p.user_data = r;
    r->close_issued = true;
    r->closing = true;
    void* req = ucp_ep_close_nbx(r->ep, &p);
    // Closed at once (or failed, which for a forced close leaves nothing to wait for).
    if (!UCS_PTR_IS_PTR(req)) r->closing = false;
    maybe_release(r);
  }

  void maybe_release(retiring* r) {
    if (r->flushing || r->closing || !r->close_issued) return;
    for (auto* k : r->rkeys) ucp_rkey_destroy(k);
    retiring_eps.erase(r->id);  // deletes r
  }

  void run_connect(std::uint64_t peer, std::uint64_t gen, const std::string& endpoint,
                   const std::vector<region_desc>& descs) {
    auto& l = links[peer];
    close_ep(l);
    l = link{};
    l.generation = gen;
    l.endpoint = endpoint;
    l.descs = descs;
    if (auto st = open_ep(l); !st) mark_unreachable(peer, l, peer_name(peer) + " unreachable: " + st.reason());
  }

  // Creates the link's endpoint and unpacks its remote keys from the description it keeps.
  status open_ep(link& l) {
    auto unpacked = unpack_endpoint(l.endpoint);  // connect() checked it
    const auto& u = unpacked.value();
    // Peer error handling makes a dead peer fail its pushes instead of hanging them, but it
    // admits only transports that detect peer failure (tcp; not self, sysv, posix), over which
    // puts are emulated with active messages (~1 GB/s here, 0.4 GB/s for GPU memory). A peer in
    // this process's shared-memory domain is written through shared memory instead (its pool is
    // UCX-allocated, see allocate_memory): the sender's CPU copies into the peer's segment, no
    // peer action is needed, and a segment stays mapped here after its owner died, so a put
    // cannot fault. The same holds for its CUDA memory, written through UCX's cuda_ipc lane (the
    // driver keeps an opened allocation alive while it is mapped here). Its death is detected by
    // the control plane (CAF monitors and heartbeats), which disconnects it.
    l.same_worker = u.worker_address == worker->address();
    bool shared = options.shared_memory && !domain.empty() && u.domain == domain;
    for (const auto& d : l.descs)
      if (d.size > 0 && d.remote_key[0] != key_kind_allocated && d.remote_key[0] != key_kind_cuda) shared = false;
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.address = reinterpret_cast<const ucp_address_t*>(u.worker_address.data());
    ep.err_mode = shared ? UCP_ERR_HANDLING_MODE_NONE : UCP_ERR_HANDLING_MODE_PEER;
    l.shared = shared;
    if (!shared) {
      ep.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
      ep.err_handler.cb = on_ep_error;
      ep.err_handler.arg = this;
    }
    if (auto st = ucp_ep_create(worker->worker(), &ep, &l.ep); st != UCS_OK) {
      l.ep = nullptr;
      return status::error(std::string("ucp_ep_create: ") + ucs_status_string(st) +
                           unreachable_hint(st == UCS_ERR_UNREACHABLE, options.tcp_beyond_loopback));
    }
    l.regions.clear();
    for (const auto& d : l.descs) {
      remote_region r{d.address, d.size, nullptr};
      if (d.size > 0) {
        if (auto st = ucp_ep_rkey_unpack(l.ep, d.remote_key.data() + 1, &r.rkey); st != UCS_OK) {
          close_ep(l, false);
          return status::error("remote key of region " + std::to_string(d.id) + ": " + ucs_status_string(st));
        }
      }
      l.regions.emplace(d.id, r);
      if (d.size > 0 && l.shared) {
        if (auto s = check_mapped(d, r.rkey); !s) {
          close_ep(l, false);
          return s;
        }
      }
    }
    return {};
  }

  // A same-host peer's segment is written through its mapping in this process (UCX attached it
  // when the key was unpacked), and a put past the segment's end would land in whatever this
  // process maps after it: the region the peer describes must fit that mapping. UCX's own
  // rkey_ptr is offset arithmetic only and checks no range, so the bound is the kernel's map.
  static status check_mapped(const region_desc& d, ucp_rkey_h rkey) {
    void* local = nullptr;
    if (ucp_rkey_ptr(rkey, d.address, &local) != UCS_OK) return {};  // not through a local mapping
    auto m = mapping_of(local);
    const auto at = reinterpret_cast<std::uintptr_t>(local);
    if (!m || d.size > m.value().end - at)
      return status::error("region " + std::to_string(d.id) + " claims " + std::to_string(d.size) + " bytes, but " +
                           (m ? "its shared segment is mapped here for " + std::to_string(m.value().end - at) + " bytes"
                              : m.error().reason()));
    return {};
  }

  // ---- Probing a failed peer (upstream #13054 kept a failed peer failed) ----------------------
  // A failed link is probed with backoff (probe_interval, doubling up to probe_interval_max): a
  // new endpoint reads one byte of the peer's first region, which needs the peer's worker to
  // answer (UCX 1.13 emulates the get with active messages over tcp). Once it answers, the link
  // serves pushes again; until then they fail at once with the failure.
  struct probe_op {
    impl* self = nullptr;
    std::uint64_t peer = 0;
    std::uint64_t generation = 0;
    std::byte byte{};
  };

  void schedule_probe(link& l) {
    if (options.probe_interval.count() <= 0 || dying) return;
    l.backoff = l.backoff.count() == 0 ? options.probe_interval
                                       : std::min(l.backoff * 2, std::max(options.probe_interval_max, options.probe_interval));
    l.probe_at = clock::now() + l.backoff;
    arm_watchdog();
  }

  void start_probe(std::uint64_t peer, link& l) {
    l.probe_at = clock::time_point::max();
    close_ep(l, false);
    if (auto st = open_ep(l); !st) {
      spdlog::debug("ucx: probe of {}: {}", peer_name(peer), st.reason());
      return schedule_probe(l);
    }
    const remote_region* target = nullptr;
    for (const auto& d : l.descs)
      if (d.size > 0 && (target = &l.regions.at(d.id))) break;
    if (target == nullptr) return probe_answered(peer, l);  // nothing to read: the endpoint is all
    auto* op = new probe_op{this, peer, l.generation};
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = on_probe_done;
    p.user_data = op;
    void* req = ucp_get_nbx(l.ep, &op->byte, 1, target->address, target->rkey, &p);
    if (!UCS_PTR_IS_PTR(req)) {
      delete op;
      if (UCS_PTR_STATUS(req) == UCS_OK) return probe_answered(peer, l);
      close_ep(l, false);
      return schedule_probe(l);
    }
    l.probing = true;
    l.probe_deadline = clock::now() + options.flush_timeout;
    arm_watchdog();
  }

  static void on_probe_done(void* request, ucs_status_t st, void* user_data) {
    auto* op = static_cast<probe_op*>(user_data);
    ucp_request_free(request);
    auto* self = op->self;
    if (self->dying) return delete op;
    self->worker->defer([self, peer = op->peer, gen = op->generation, st] {
      auto it = self->links.find(peer);
      if (it == self->links.end() || it->second.generation != gen || !it->second.probing) return;
      auto& l = it->second;
      l.probing = false;
      if (st == UCS_OK) return self->probe_answered(peer, l);
      spdlog::debug("ucx: probe of {}: {}", peer_name(peer), ucs_status_string(st));
      self->close_ep(l, false);
      self->schedule_probe(l);
    });
    delete op;
  }

  void probe_answered(std::uint64_t peer, link& l) {
    spdlog::info("ucx: {} answers again after: {}", peer_name(peer), l.failure);
    l.failure.clear();
    l.backoff = std::chrono::milliseconds{0};
    std::lock_guard guard(mutex);
    auto it = peers.find(peer);
    if (it != peers.end() && it->second.generation == l.generation) it->second.failure.clear();
  }

  void run_disconnect(std::uint64_t peer) {
    auto it = links.find(peer);
    if (it == links.end()) return;
    // Shared memory: nothing the peer must acknowledge, and a dead peer never completes a
    // drain, so force. Otherwise drain (a live receiver of emulated puts aborts when their
    // acknowledgement fails; a dead one fails the drain through the error callback).
    close_ep(it->second, !it->second.shared);
    links.erase(it);
  }

  // The peer's region `id` at `address` is still registered with this worker (region ids are
  // never reused by an instance, so a new registration at the same address does not pass).
  bool locally_live(std::uint64_t id, std::uint64_t address) const {
    auto it = regions.find(id);
    return it != regions.end() && it->second.address == address;
  }

  void run_push(push_op* op) {
    auto it = links.find(op->peer);
    if (it == links.end() || it->second.generation != op->generation)
      return fail(op,
                  peer_name(op->peer) + " was disconnected or reconnected before the push started");
    auto& l = it->second;
    if (!l.failure.empty()) return fail(op, l.failure);
    if (l.ep == nullptr) return fail(op, peer_name(op->peer) + " not connected");

    if (l.same_worker) {
      std::uint64_t checked = 0;  // region ids start at 1; a push's blocks run region by region
      for (const auto& b : op->blocks) {
        if (b.len == 0 || b.region == checked) continue;
        if (!locally_live(b.region, l.regions.at(b.region).address))
          return fail(op, peer_name(op->peer) + ": region " + std::to_string(b.region) +
                              " was deregistered in this process: nothing written");
        checked = b.region;
      }
    }
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = on_request_done;
    p.user_data = op;
    for (const auto& b : op->blocks) {
      if (b.len == 0) continue;
      const auto& r = l.regions.at(b.region);  // the caller checked it against this generation
      void* req = ucp_put_nbx(l.ep, b.src, b.len, r.address + b.offset, r.rkey, &p);
      if (UCS_PTR_IS_ERR(req)) {
        op->status = UCS_PTR_STATUS(req);
        break;
      }
      if (req != nullptr) ++op->pending;
      op->bytes += b.len;
    }
    // The flush completes once every put before it is done at the peer (remote completion).
    if (op->status == UCS_OK) {
      void* req = ucp_ep_flush_nbx(l.ep, &p);
      if (UCS_PTR_IS_ERR(req))
        op->status = UCS_PTR_STATUS(req);
      else if (req != nullptr)
        ++op->pending;
    }
    op->issued = true;
    if (op->pending > 0) {
      live.emplace(op->id, op);
      l.in_flight.push_back(op->id);
      if (l.in_flight.size() == 1) {
        l.head_since = clock::now();
        arm_watchdog();
      }
    }
    maybe_finish(op);
  }

  // The link has a push in flight that can still time out (a closing link's are completing).
  static bool times_out(const link& l) {
    return !l.in_flight.empty() && l.ep != nullptr && l.failure.empty();
  }

  // Wakes the thread at the earliest deadline of a link's oldest push or a draining endpoint.
  void arm_watchdog() {
    while (!drain_deadlines.empty() && retiring_eps.count(drain_deadlines.front().second) == 0)
      drain_deadlines.pop_front();
    auto next = clock::time_point::max();
    for (const auto& [peer, l] : links) {
      if (times_out(l)) next = std::min(next, l.head_since + options.flush_timeout);
      next = std::min(next, l.probing ? l.probe_deadline : l.probe_at);
    }
    if (!drain_deadlines.empty()) next = std::min(next, drain_deadlines.front().first);
    worker->set_deadline(
        next, next == clock::time_point::max() ? ucx_worker::command{} : [this] { on_watchdog(); });
  }

  void on_watchdog() {
    auto now = clock::now();
    for (auto& [peer, l] : links) {
      if (!times_out(l) || l.head_since + options.flush_timeout > now) continue;
      // A frozen or overloaded peer: a forced close is the only way to get the requests back.
      mark_unreachable(peer, l,
                       peer_name(peer) + " unreachable: a push was not flushed within " +
                           std::to_string(options.flush_timeout.count()) + " ms");
      close_ep(l);
    }
    for (auto& [peer, l] : links) {
      if (l.probing && l.probe_deadline <= now)
        close_ep(l, false);  // completes the probe's get with an error: probed again later
      else if (!l.probing && l.probe_at <= now)
        start_probe(peer, l);
    }
    while (!drain_deadlines.empty() && drain_deadlines.front().first <= now) {
      auto it = retiring_eps.find(drain_deadlines.front().second);
      drain_deadlines.pop_front();
      if (it != retiring_eps.end() && !it->second->close_issued) force_close(it->second.get());
    }
    arm_watchdog();
  }

  void run_register(std::uint64_t owner, void* base, std::uint64_t len, region_desc& d,
                    status& err) {
    local_region reg{owner, nullptr, reinterpret_cast<std::uintptr_t>(base)};
    if (len > 0) {
      // UCX's cuda_ipc memory domain asks the calling thread's CUDA context which device it is
      // on when it registers GPU memory (1.22 logged "cuCtxGetDevice ... invalid device
      // context" from this thread, which had none): this thread works on the memory's device.
      if (auto info = cuda::query_pointer(base); info.kind == cuda::pointer_kind::device)
        (void)cuda::set_device(info.device);
      ucp_mem_map_params_t mp{};
      mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
      mp.address = base;
      mp.length = len;
      if (auto st = ucp_mem_map(worker->context(), &mp, &reg.memh); st != UCS_OK) {
        err = status::error("ucx: ucp_mem_map of " + std::to_string(len) +
                            " bytes: " + ucs_status_string(st));
        spdlog::error("{}", err.reason());
        return;
      }
      void* key = nullptr;
      std::size_t key_len = 0;
      if (auto st = ucp_rkey_pack(worker->context(), reg.memh, &key, &key_len); st != UCS_OK) {
        ucp_mem_unmap(worker->context(), reg.memh);
        err = status::error(std::string("ucx: ucp_rkey_pack: ") + ucs_status_string(st));
        spdlog::error("{}", err.reason());
        return;
      }
      ucp_mem_attr_t attr{};
      attr.field_mask = UCP_MEM_ATTR_FIELD_MEM_TYPE;
      const bool cuda = ucp_mem_query(reg.memh, &attr) == UCS_OK && attr.mem_type == UCS_MEMORY_TYPE_CUDA;
      d.remote_key = cuda ? key_kind_cuda : key_kind_registered;
      d.remote_key.append(static_cast<const char*>(key), key_len);
      ucp_rkey_buffer_release(key);
    }
    regions.emplace(d.id, reg);
  }

  void run_allocate(std::uint64_t owner, std::uint64_t len, allocation& a, status& err) {
    local_region reg{owner, nullptr};
    if (len > 0) {
      ucp_mem_map_params_t mp{};
      mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                      UCP_MEM_MAP_PARAM_FIELD_FLAGS;
      mp.address = nullptr;
      mp.length = len;
      mp.flags = UCP_MEM_MAP_ALLOCATE;
      if (auto st = ucp_mem_map(worker->context(), &mp, &reg.memh); st != UCS_OK) {
        err = status::error("ucx: allocating " + std::to_string(len) + " bytes: " + ucs_status_string(st));
        return;  // not an error for the caller, which maps memory itself then
      }
      ucp_mem_attr_t attr{};
      attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
      void* key = nullptr;
      std::size_t key_len = 0;
      if (auto st = ucp_mem_query(reg.memh, &attr); st != UCS_OK || attr.length < len ||
                                                     ucp_rkey_pack(worker->context(), reg.memh, &key, &key_len) != UCS_OK) {
        ucp_mem_unmap(worker->context(), reg.memh);
        err = status::error("ucx: describing allocated memory failed");
        return;
      }
      a.base = static_cast<std::byte*>(attr.address);
      a.desc.address = reinterpret_cast<std::uintptr_t>(attr.address);
      reg.address = a.desc.address;
      a.desc.remote_key = key_kind_allocated;
      a.desc.remote_key.append(static_cast<const char*>(key), key_len);
      ucp_rkey_buffer_release(key);
    }
    regions.emplace(a.desc.id, reg);
  }

  void run_deregister(std::uint64_t id) {
    auto it = regions.find(id);
    if (it == regions.end()) {
      spdlog::debug("ucx: deregister_memory: region {} is not registered", id);
      return;
    }
    if (it->second.memh != nullptr) {
      if (auto st = ucp_mem_unmap(worker->context(), it->second.memh); st != UCS_OK)
        spdlog::error("ucx: ucp_mem_unmap of region {}: {}", id, ucs_status_string(st));
    }
    regions.erase(it);
  }

  void shut_down() {
    for (auto& [peer, l] : links) close_ep(l);
    links.clear();
    // Drains end within the flush timeout (then they are forced, which completes the requests
    // still in flight with an error); a second for the forced closes to finish.
    bool quiet = worker->progress_until([this] { return retiring_eps.empty() && live.empty(); },
                                        options.flush_timeout + std::chrono::seconds(1));
    if (!quiet)
      spdlog::warn("ucx: shutting down with {} endpoint(s) closing and {} push(es) in flight",
                   retiring_eps.size(), live.size());
    for (auto& [id, r] : regions)
      if (r.memh != nullptr) ucp_mem_unmap(worker->context(), r.memh);
    regions.clear();
    // What is still outstanding completes inside ucp_worker_destroy (purged): its callbacks
    // must not queue work on the worker being destroyed.
    dying = true;
    live.clear();
  }
};

// ---- Public methods (any thread) -------------------------------------------------------------

ucx_transport::ucx_transport(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
ucx_transport::~ucx_transport() = default;

result<std::unique_ptr<ucx_transport>> ucx_transport::create(ucx_options options) {
  auto w = ucx_worker::create(UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP, options.tcp_beyond_loopback);
  if (!w) return w.error();
  auto p = std::make_unique<impl>();
  p->options = options;
  p->domain = shared_memory_domain();
  p->worker = std::move(w.value());
  return std::unique_ptr<ucx_transport>(new ucx_transport(std::move(p)));
}

std::string ucx_transport::endpoint() const {
  return pack_endpoint(impl_->domain, impl_->worker->address());
}

result<allocation> ucx_transport::allocate_memory(std::uint64_t owner, std::uint64_t len) {
  allocation a;
  a.desc.id = impl_->next_region.fetch_add(1, std::memory_order_relaxed);
  a.desc.size = len;
  status err;
  impl_->worker->call([&] { impl_->run_allocate(owner, len, a, err); });
  if (!err) return err;
  std::lock_guard g(impl_->allocations_mutex);
  impl_->allocations[a.desc.id] = a.desc;
  return a;
}

result<region_desc> ucx_transport::region_of(const void* base, std::uint64_t len) const {
  const auto at = reinterpret_cast<std::uintptr_t>(base);
  std::lock_guard g(impl_->allocations_mutex);
  for (const auto& [id, d] : impl_->allocations)
    if (at >= d.address && len <= d.size && at - d.address <= d.size - len) return d;
  return status::error("ucx: no allocation of this transport holds that range");
}

std::vector<memory_type> ucx_transport::memory_types() const {
  std::vector<memory_type> out;
  auto bits = impl_->worker->memory_types();
  auto has = [bits](ucs_memory_type_t t) { return (bits & (std::uint64_t{1} << t)) != 0; };
  if (has(UCS_MEMORY_TYPE_HOST)) out.push_back(memory_type::host);
  if (has(UCS_MEMORY_TYPE_CUDA)) out.push_back(memory_type::cuda);
  if (has(UCS_MEMORY_TYPE_CUDA_MANAGED)) out.push_back(memory_type::cuda_managed);
  if (has(UCS_MEMORY_TYPE_ROCM)) out.push_back(memory_type::rocm);
  return out;
}

std::uint64_t ucx_transport::bytes_moved() const {
  return impl_->bytes.load(std::memory_order_relaxed);
}

result<region_desc> ucx_transport::register_memory(std::uint64_t owner, void* base,
                                                   std::uint64_t len) {
  if (base == nullptr && len > 0) return status::error("register_memory: null base");
  region_desc d;
  d.id = impl_->next_region.fetch_add(1, std::memory_order_relaxed);
  d.size = len;
  d.address = reinterpret_cast<std::uintptr_t>(base);
  status err;
  impl_->worker->call([&] { impl_->run_register(owner, base, len, d, err); });
  if (!err) return err;
  return d;
}

void ucx_transport::deregister_memory(std::uint64_t region) {
  {
    std::lock_guard g(impl_->allocations_mutex);
    impl_->allocations.erase(region);
  }
  impl_->worker->call([&] { impl_->run_deregister(region); });
}

status ucx_transport::connect(std::uint64_t peer, const std::string& endpoint,
                              const std::vector<region_desc>& regions) {
  // A malformed description is refused here, before UCX parses any of it.
  auto refuse = [&](const std::string& why) {
    return status::error("connect " + peer_name(peer) + ": " + why);
  };
  if (endpoint.empty()) return refuse("empty endpoint");
  auto u = unpack_endpoint(endpoint);
  if (!u) return refuse(u.error().reason());
  // UCX reads a worker address without its size, trusting every length and flag inside (and
  // aborts on an address version it does not know): it must be one this UCX could have packed,
  // in this worker's format, with addresses of the lengths their transports read.
  if (auto st = check_ucx_address(u->worker_address, impl_->worker->address()); !st)
    return refuse(st.reason());
  std::unordered_map<std::uint64_t, region_desc> by_id;
  for (const auto& r : regions) {
    auto id = std::to_string(r.id);
    if (r.size > 0 && r.remote_key.size() < 2) return refuse("region " + id + " has no remote key");
    if (r.size > 0 && r.remote_key[0] != key_kind_allocated && r.remote_key[0] != key_kind_registered &&
        r.remote_key[0] != key_kind_cuda)
      return refuse("region " + id + " has a remote key of another build");
    if (r.address > std::numeric_limits<std::uint64_t>::max() - r.size)
      return refuse("region " + id + " wraps the address space");
    if (!by_id.emplace(r.id, r).second) return refuse("region " + id + " described twice");
  }

  std::lock_guard guard(impl_->mutex);
  auto it = impl_->peers.find(peer);
  // The same description again is a no-op unless the peer failed: a peer that registers again
  // gets a new endpoint (upstream #13054 kept a peer failed until it registered differently).
  if (it != impl_->peers.end() && it->second.failure.empty() && it->second.endpoint == endpoint &&
      same_regions(it->second.regions, regions))
    return {};
  impl::described d;
  d.generation = impl_->next_generation++;
  d.endpoint = endpoint;
  d.regions = regions;
  d.by_id = std::move(by_id);
  // Posted under the lock: a push that sees this generation is queued after the connect.
  impl_->worker->post([p = impl_.get(), peer, gen = d.generation, endpoint, regions] {
    p->run_connect(peer, gen, endpoint, regions);
  });
  impl_->peers[peer] = std::move(d);
  return {};
}

void ucx_transport::disconnect(std::uint64_t peer) {
  std::lock_guard guard(impl_->mutex);
  if (impl_->peers.erase(peer) == 0) return;
  impl_->worker->post([p = impl_.get(), peer] { p->run_disconnect(peer); });
}

void ucx_transport::push(std::uint64_t peer, const std::vector<block>& blocks, completion done) {
  submit(0, peer, blocks, std::move(done));
}

void ucx_transport::push_after(std::uintptr_t ready_fence, std::uint64_t peer, const std::vector<block>& blocks,
                               completion done) {
  submit(ready_fence, peer, blocks, std::move(done));
}

void ucx_transport::submit(std::uintptr_t fence, std::uint64_t peer, const std::vector<block>& blocks,
                           completion done) {
  // Every block is checked against what the peer described before anything is queued: a bad
  // block must not leave a partial write.
  std::unique_lock guard(impl_->mutex);
  auto it = impl_->peers.find(peer);
  status refused;
  if (it == impl_->peers.end()) {
    refused = status::error(peer_name(peer) + " not connected");
  } else if (!it->second.failure.empty()) {
    refused = status::error(it->second.failure);
  } else {
    bool any_bytes = false;
    for (std::size_t i = 0; i < blocks.size() && refused.ok(); ++i) {
      const auto& b = blocks[i];
      auto r = it->second.by_id.find(b.region);
      if (r == it->second.by_id.end()) {
        refused =
            status::error("block " + std::to_string(i) + ": region " + std::to_string(b.region) +
                          " is not registered by " + peer_name(peer));
      } else if (auto size = r->second.size; b.offset > size || b.len > size - b.offset) {
        refused =
            status::error("block " + std::to_string(i) + " [" + std::to_string(b.offset) + ", +" +
                          std::to_string(b.len) + ") exceeds region " + std::to_string(b.region) +
                          " of " + std::to_string(size) + " bytes");
      }
      any_bytes = any_bytes || b.len > 0;
    }
    if (refused.ok() && any_bytes) {
      auto* op = new impl::push_op;
      op->self = impl_.get();
      op->id = impl_->next_push.fetch_add(1, std::memory_order_relaxed);
      op->peer = peer;
      op->generation = it->second.generation;
      op->blocks = blocks;
      op->done = std::move(done);
      if (fence == 0) {
        impl_->worker->post([p = impl_.get(), op] { p->run_push(op); });
        return;
      }
      std::lock_guard fg(impl_->fence_mutex);
      if (impl_->fence_stream.handle() == nullptr) {
        refused = status::error("ucx: cannot order a push after a CUDA event: no CUDA device (order_on_device)");
      } else if (auto w = cuda::wait_for_external_event(impl_->fence_stream, fence); !w) {
        refused = status::error("ucx: " + w.reason());
      } else if (auto c = cuda::launch_host_callback(impl_->fence_stream, &impl::on_fence_done, op); !c) {
        refused = status::error("ucx: " + c.reason());
      } else {
        return;  // the callback owns op now
      }
      done = std::move(op->done);
      delete op;
    }
  }
  guard.unlock();
  done(std::move(refused));  // refused, or nothing to write
}

status ucx_transport::order_on_device(int device) {
  std::lock_guard g(impl_->fence_mutex);
  if (impl_->fence_stream.handle() != nullptr) {
    if (impl_->fence_stream.device() == device) return {};
    return status::error("ucx: fenced pushes are ordered on CUDA device " + std::to_string(impl_->fence_stream.device()) +
                         ", not " + std::to_string(device));
  }
  auto s = cuda::stream::create(device);
  if (!s) return status::error("ucx: " + s.error().reason());
  impl_->fence_stream = std::move(s.value());
  return {};
}

capabilities ucx_transport::query() const {
  std::lock_guard g(impl_->fence_mutex);
  return {memory_types(), true, impl_->fence_stream.handle() != nullptr};
}

std::string ucx_transport::describe_endpoint(std::uint64_t peer) const {
  std::string out;
  impl_->worker->call([&] {
    auto it = impl_->links.find(peer);
    if (it == impl_->links.end() || it->second.ep == nullptr) return;
    char* buf = nullptr;
    std::size_t size = 0;
    FILE* f = open_memstream(&buf, &size);
    if (f == nullptr) return;
    ucp_ep_print_info(it->second.ep, f);
    std::fclose(f);
    out.assign(buf, size);
    std::free(buf);
  });
  return out;
}

}  // namespace kvflow::transport
