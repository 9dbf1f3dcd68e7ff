#include "transport/ucx_staged_transport.hpp"

#include <sys/random.h>

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "transport/byte_codec.hpp"
#include "transport/host_identity.hpp"
#include "transport/shared_futex.hpp"
#include "transport/staging_ring.hpp"
#include "transport/ucx_address.hpp"
#include "transport/ucx_network_policy.hpp"
#include "transport/ucx_staged_wire.hpp"
#include "transport/ucx_worker.hpp"

namespace kvflow::transport {

namespace {

constexpr char endpoint_tag[] = "kvflow-staged-ucx-1";
constexpr char region_key[] = "staged-ucx";
constexpr char staged_region_key[] = "staged";  // what the inner staged transport describes
// How the ring words a refusal it read back (staging_ring::read_verdict); the sender's ring
// words it again, so it travels without.
constexpr char refused_prefix[] = "refused by the receiver: ";
constexpr std::uint32_t max_address = 1u << 16;
constexpr std::uint32_t max_reason = 512;

using clock_type = ucx_worker::clock;

struct remote_endpoint {
  std::string host, worker_address, rkey;
  ring_shape shape;
  std::uint64_t secret[2] = {0, 0};
};

std::string pack_endpoint(const std::string& host, const std::string& address, const std::string& rkey,
                          const ring_shape& shape, const std::uint64_t (&secret)[2]) {
  std::string out(endpoint_tag, sizeof endpoint_tag);
  codec::put_string(out, host);
  codec::put_string(out, address);
  codec::put_string(out, rkey);
  codec::put(out, shape.slots);
  codec::put(out, shape.slot_bytes);
  codec::put(out, shape.max_descs);
  codec::put(out, secret[0]);
  codec::put(out, secret[1]);
  return out;
}

// 128 bits from the kernel's generator: a secret peers cannot guess from the tokens they see.
status make_secret(std::uint64_t (&out)[2]) {
  auto* p = reinterpret_cast<unsigned char*>(out);
  std::size_t got = 0;
  while (got < sizeof out) {
    const auto n = ::getrandom(p + got, sizeof out - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return status::error(std::string("staged_ucx: getrandom: ") + std::strerror(errno));
    got += static_cast<std::size_t>(n);
  }
  return {};
}

// Constant time: how much of a secret a hello got right must not show in how long it takes.
bool same_secret(const std::uint64_t (&a)[2], const std::uint64_t (&b)[2]) {
  return ((a[0] ^ b[0]) | (a[1] ^ b[1])) == 0;
}

result<remote_endpoint> unpack_endpoint(const std::string& e) {
  const std::size_t tag = sizeof endpoint_tag;
  if (e.size() < tag || std::memcmp(e.data(), endpoint_tag, tag) != 0) return status::error("not a staged_ucx endpoint");
  std::size_t at = tag;
  remote_endpoint r;
  if (!codec::get_string(e, at, r.host, 256) || !codec::get_string(e, at, r.worker_address, max_address) ||
      !codec::get_string(e, at, r.rkey, max_address) || !codec::get(e, at, r.shape.slots) ||
      !codec::get(e, at, r.shape.slot_bytes) || !codec::get(e, at, r.shape.max_descs) || !codec::get(e, at, r.secret[0]) ||
      !codec::get(e, at, r.secret[1]) || at != e.size())
    return status::error("staged_ucx endpoint: malformed");
  if (r.worker_address.empty()) return status::error("staged_ucx endpoint: no worker address");
  if (!r.rkey.empty()) {
    // The sender's own ring of one lane takes this shape: it must be one a ring may have.
    r.shape.lanes = 1;
    if (r.shape.slots < 1 || r.shape.slots > 64 || r.shape.slot_bytes < (64u << 10) || r.shape.slot_bytes > (1ull << 30) ||
        r.shape.slot_bytes % (64u << 10) != 0 || r.shape.max_descs < 1 || r.shape.max_descs > (1u << 16))
      return status::error("staged_ucx endpoint: a ring shape no ring has");
  }
  return r;
}

std::uint64_t random_token() {
  static std::mutex m;
  static std::mt19937_64 rng{(static_cast<std::uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}()};
  std::lock_guard<std::mutex> g(m);
  return rng() | 1;  // never 0
}

template <class T>
bool read_header(const void* header, std::size_t length, T& out) {
  if (header == nullptr || length != sizeof(T)) return false;
  std::memcpy(&out, header, sizeof(T));
  return true;
}

void free_request(void* request, ucs_status_t, void*) { ucp_request_free(request); }

std::string strip_refused(std::string reason) {
  if (reason.rfind(refused_prefix, 0) == 0) reason.erase(0, sizeof refused_prefix - 1);
  return reason;
}

}  // namespace

struct ucx_staged_transport::impl {
  // ---- sending: one link per remote receiver (and connect generation) ----
  enum class out_state { none, waiting, putting, announced };
  struct slot_out {
    out_state st = out_state::none;
    std::uint64_t seq = 0;
    clock_type::time_point since;
  };
  struct link {
    std::uint64_t id = 0;
    remote_endpoint remote;
    std::unique_ptr<staging_ring> proxy;  // the local bounce copy of the lane's slots: one lane
    std::thread forwarder;
    std::atomic<bool> stop{false};
    // Under impl::m.
    std::unordered_set<std::uint64_t> peers;
    status failure;  // an error once the receiver failed: pushes fail at once with it
    // UCX thread only.
    ucp_ep_h ep = nullptr;
    ucp_rkey_h rkey = nullptr;
    std::uint64_t nonce = 0;
    bool welcomed = false;
    int lane = -1;
    std::uint64_t token = 0;
    std::vector<std::uint64_t> slot_addr;  // of the lane's slots, in the receiver
    std::vector<slot_out> out;
    std::string why;  // the failure, once failed
  };

  // ---- receiving: a lane of this endpoint's ring a remote sender holds (UCX thread) ----
  struct remote_lane {
    std::uint64_t token = 0, claimant = 0;
    ucp_ep_h ep = nullptr;  // back to the sender: welcome and verdicts
    // Per slot, the token its runs came with: a slot's verdict goes only to the sender that
    // filled it. A slot the ring's receiver was still copying when the lane changed hands is
    // done later, and its verdict, sent with the new holder's token, would complete the new
    // holder's slot of the same number and sequence (each link numbers its slots from 1).
    std::vector<std::uint64_t> filled_by;
    std::string sender;  // the worker address its hello named (see accept)
  };

  // An active message in flight: its payload lives until UCX is done with it.
  struct am_op {
    impl* self = nullptr;
    std::string payload;
    ucp_ep_h close_after = nullptr;  // an endpoint to close once the message went
  };
  struct flush_op {
    impl* self = nullptr;
    std::uint64_t link = 0;
    int slot = 0;
    std::uint64_t seq = 0;
  };

  ucx_staged_options options;
  std::string host;
  std::shared_ptr<staged_transport> recv;
  std::unique_ptr<staged_transport> send;
  std::unique_ptr<ucx_worker> worker;

  // connect() and disconnect() one at a time: two connects to one receiver at once each made a
  // link (two lanes of its ring for one sender), and a disconnect that retired the link a
  // concurrent connect had just chosen left that peer on a stopped link.
  std::mutex connecting;
  mutable std::mutex m;  // the maps below, link::peers / failure, and the ring's description
  std::unordered_map<std::uint64_t, std::shared_ptr<link>> by_peer;
  std::map<std::string, std::shared_ptr<link>> by_address;  // the newest link to each receiver
  std::uint64_t next_link = 1;
  bool ring_mapped = false;
  ring_shape shape;
  std::string ring_rkey;
  std::uint64_t secret[2] = {0, 0};  // what a remote sender's hello must carry (see hello_header)

  // UCX thread only.
  std::unordered_map<std::uint64_t, std::shared_ptr<link>> links;  // by id
  staging_ring* ring = nullptr;  // the receiving ring, once registered with UCX
  ucp_mem_h ring_memh = nullptr;
  std::unordered_map<int, remote_lane> lanes;
  std::map<std::string, int> holders;  // a sender's worker address -> its lane (see accept)
  // Sending: the lane and token this worker was last welcomed with, by receiver worker address
  // (the next hello to that receiver carries them).
  std::map<std::string, std::pair<int, std::uint64_t>> welcomed_at;
  int closes = 0;  // endpoint closes not completed
  bool dying = false;

  std::atomic<std::uint64_t> unrung_wakeups{0};  // forwarder_unrung_wakeups()

  // ---- UCX thread: plumbing ----

  static void on_am_sent(void* request, ucs_status_t, void* user_data) {
    ucp_request_free(request);
    auto* op = static_cast<am_op*>(user_data);
    if (op->close_after != nullptr && !op->self->dying)
      op->self->worker->defer([self = op->self, ep = op->close_after] { self->close_ep(ep); });
    delete op;
  }

  void send_am(ucp_ep_h ep, unsigned id, const void* header, std::size_t header_len, std::string payload,
               bool close_after = false) {
    auto* op = new am_op{this, std::move(payload), close_after ? ep : nullptr};
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.flags = UCP_AM_SEND_FLAG_EAGER | UCP_AM_SEND_FLAG_COPY_HEADER;
    p.cb.send = on_am_sent;
    p.user_data = op;
    void* req = ucp_am_send_nbx(ep, id, header, header_len, op->payload.data(), op->payload.size(), &p);
    if (UCS_PTR_IS_PTR(req)) return;
    // Done at once, or failed (the endpoint's error callback tells the rest).
    if (op->close_after != nullptr) close_ep(op->close_after);
    delete op;
  }

  static void on_closed(void* request, ucs_status_t, void* user_data) {
    ucp_request_free(request);
    --static_cast<impl*>(user_data)->closes;
  }

  void close_ep(ucp_ep_h ep) {
    if (ep == nullptr) return;
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.flags = UCP_EP_CLOSE_FLAG_FORCE;
    p.cb.send = on_closed;
    p.user_data = this;
    void* req = ucp_ep_close_nbx(ep, &p);
    if (UCS_PTR_IS_PTR(req)) ++closes;
  }

  ucp_ep_h open_ep(const std::string& address, std::string& err) {
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.address = reinterpret_cast<const ucp_address_t*>(address.data());
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;  // a dead peer fails its endpoint instead of hanging it
    ep.err_handler.cb = on_ep_error;
    ep.err_handler.arg = this;
    ucp_ep_h h = nullptr;
    if (auto st = ucp_ep_create(worker->worker(), &ep, &h); st != UCS_OK) {
      err = std::string("ucp_ep_create: ") + ucs_status_string(st) +
            unreachable_hint(st == UCS_ERR_UNREACHABLE, options.tcp_beyond_loopback);
      return nullptr;
    }
    return h;
  }

  static void on_ep_error(void* arg, ucp_ep_h ep, ucs_status_t st) {
    auto* self = static_cast<impl*>(arg);
    for (auto& [id, l] : self->links)
      if (l->ep == ep)
        self->worker->defer([self, id = id, st] {
          auto it = self->links.find(id);
          if (it != self->links.end())
            self->fail_link(*it->second, "staged_ucx: the receiver at " + it->second->remote.host +
                                             " is unreachable: " + ucs_status_string(st));
        });
    for (auto& [lane, rl] : self->lanes)
      if (rl.ep == ep)
        self->worker->defer([self, lane = lane, token = rl.token, st] {
          auto it = self->lanes.find(lane);
          if (it == self->lanes.end() || it->second.token != token) return;
          spdlog::info("staged_ucx: the sender of lane {} is unreachable ({}): lane released", lane,
                       ucs_status_string(st));
          self->release_lane(lane);
        });
  }

  status set_handlers() {
    const std::pair<unsigned, ucp_am_recv_callback_t> handlers[] = {{staged_wire::hello, on_hello},
                                                                     {staged_wire::welcome, on_welcome},
                                                                     {staged_wire::filled, on_filled},
                                                                     {staged_wire::verdict, on_verdict},
                                                                     {staged_wire::goodbye, on_goodbye}};
    for (const auto& [id, cb] : handlers) {
      ucp_am_handler_param_t p{};
      p.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS | UCP_AM_HANDLER_PARAM_FIELD_CB |
                     UCP_AM_HANDLER_PARAM_FIELD_ARG;
      p.id = id;
      p.flags = UCP_AM_FLAG_WHOLE_MSG;
      p.cb = cb;
      p.arg = this;
      if (auto st = ucp_worker_set_am_recv_handler(worker->worker(), &p); st != UCS_OK)
        return status::error(std::string("staged_ucx: ucp_worker_set_am_recv_handler: ") + ucs_status_string(st));
    }
    return {};
  }

  // Eager messages only: their data is here during the callback (a rendezvous one is dropped).
  static bool eager(const ucp_am_recv_param_t* param) {
    return (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) == 0;
  }

  // ---- UCX thread: sending ----

  // Completes local slot `s` with `st`: the inner transport reaps it as a receiver's verdict.
  void finish_slot(link& l, int s, const status& st) {
    l.out[s] = {};
    l.proxy->write_verdict(0, s, st);
    l.proxy->store_state(0, s, slot_state::done);
    futex_bump(l.proxy->bell(0));
  }

  // The receiver failed: the link's pushes fail with `why`, later ones at once.
  void fail_link(link& l, const std::string& why) {
    if (!l.why.empty()) return;
    l.why = why;
    spdlog::warn("{}", why);
    const status s = status::error(why);
    std::vector<std::uint64_t> peers;
    {
      std::lock_guard<std::mutex> g(m);
      l.failure = s;
      peers.assign(l.peers.begin(), l.peers.end());
    }
    // The inner transport fails the pushes first (with the reason), then gets its slots back.
    for (auto p : peers) send->fail_peer(p, s);
    for (int i = 0; i < static_cast<int>(l.out.size()); ++i)
      if (l.out[i].st != out_state::none) finish_slot(l, i, s);
    close_link_ep(l);
    arm_watchdog();
  }

  void close_link_ep(link& l) {
    if (l.rkey != nullptr) ucp_rkey_destroy(l.rkey);
    l.rkey = nullptr;
    close_ep(std::exchange(l.ep, nullptr));
  }

  void open_link(link& l) {
    std::string err;
    l.ep = open_ep(l.remote.worker_address, err);
    if (l.ep == nullptr) return fail_link(l, "staged_ucx: the receiver at " + l.remote.host + ": " + err);
    if (auto st = ucp_ep_rkey_unpack(l.ep, l.remote.rkey.data(), &l.rkey); st != UCS_OK) {
      l.rkey = nullptr;
      return fail_link(l, std::string("staged_ucx: the receiver's ring key: ") + ucs_status_string(st));
    }
    staged_wire::hello_header h;
    h.nonce = l.nonce = random_token();
    h.secret[0] = l.remote.secret[0];
    h.secret[1] = l.remote.secret[1];
    // A link before this one to the same receiver was welcomed and failed: the receiver still
    // holds that lane for this worker, and gives it to this link under a new token.
    if (auto it = welcomed_at.find(l.remote.worker_address); it != welcomed_at.end()) {
      h.held_lane = it->second.first;
      h.held_token = it->second.second;
    }
    send_am(l.ep, staged_wire::hello, &h, sizeof h, worker->address());
  }

  // The forwarder took local slot `s` (filled by the inner transport).
  void forward(std::uint64_t id, int s) {
    auto it = links.find(id);
    if (it == links.end()) return;
    auto& l = *it->second;
    l.out[s].seq = l.proxy->seq(0, s);
    l.out[s].since = clock_type::now();
    if (!l.why.empty()) return finish_slot(l, s, status::error(l.why));
    l.out[s].st = out_state::waiting;
    if (l.welcomed) put_slot(l, s);
    arm_watchdog();
  }

  // Puts the slot's data into the receiver's slot and flushes; the runs follow in `filled`.
  void put_slot(link& l, int s) {
    auto runs = l.proxy->read_descs(0, s);
    if (!runs) return finish_slot(l, s, runs.error());
    std::uint64_t total = 0;
    for (const auto& r : runs.value()) total += r.len;
    l.out[s].st = out_state::putting;
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK;
    p.cb.send = free_request;
    if (total > 0) {
      void* req = ucp_put_nbx(l.ep, l.proxy->data(0, s), total, l.slot_addr[s], l.rkey, &p);
      if (UCS_PTR_IS_ERR(req))
        return fail_link(l, "staged_ucx: the receiver at " + l.remote.host + " is unreachable (put: " +
                                ucs_status_string(UCS_PTR_STATUS(req)) + ")");
    }
    auto* op = new flush_op{this, l.id, s, l.out[s].seq};
    p.op_attr_mask |= UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = on_flushed;
    p.user_data = op;
    void* req = ucp_ep_flush_nbx(l.ep, &p);
    if (UCS_PTR_IS_PTR(req)) return;
    delete op;
    if (UCS_PTR_IS_ERR(req))
      return fail_link(l, "staged_ucx: the receiver at " + l.remote.host + " is unreachable (flush: " +
                              ucs_status_string(UCS_PTR_STATUS(req)) + ")");
    announce(l, s);
  }

  static void on_flushed(void* request, ucs_status_t st, void* user_data) {
    ucp_request_free(request);
    auto* op = static_cast<flush_op*>(user_data);
    auto* self = op->self;
    if (!self->dying)
      self->worker->defer([self, id = op->link, s = op->slot, seq = op->seq, st] {
        auto it = self->links.find(id);
        if (it == self->links.end()) return;
        auto& l = *it->second;
        if (l.out[s].st != out_state::putting || l.out[s].seq != seq) return;
        if (st != UCS_OK)
          return self->fail_link(l, "staged_ucx: the receiver at " + l.remote.host + " is unreachable (flush: " +
                                        ucs_status_string(st) + ")");
        self->announce(l, s);
      });
    delete op;
  }

  // The slot's bytes are in the receiver's slot: hand it its runs.
  void announce(link& l, int s) {
    auto runs = l.proxy->read_descs(0, s);
    if (!runs) return finish_slot(l, s, runs.error());
    staged_wire::filled_header h;
    h.lane = static_cast<std::uint32_t>(l.lane);
    h.slot = static_cast<std::uint32_t>(s);
    h.token = l.token;
    h.seq = l.out[s].seq;
    h.count = static_cast<std::uint32_t>(runs.value().size());
    std::string payload(reinterpret_cast<const char*>(runs.value().data()), runs.value().size() * sizeof(staged_desc));
    l.out[s].st = out_state::announced;
    send_am(l.ep, staged_wire::filled, &h, sizeof h, std::move(payload));
  }

  static ucs_status_t on_welcome(void* arg, const void* header, std::size_t header_length, void* data,
                                 std::size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<impl*>(arg);
    staged_wire::welcome_header h;
    if (!read_header(header, header_length, h) || !eager(param)) return UCS_OK;
    for (auto& [id, lp] : self->links) {
      auto& l = *lp;
      if (l.welcomed || l.nonce != h.nonce || !l.why.empty()) continue;
      if (h.lane < 0) {
        self->welcomed_at.erase(l.remote.worker_address);  // it holds no lane for this worker
        std::string reason(static_cast<const char*>(data), std::min<std::size_t>(length, max_reason));
        self->worker->defer([self, id = id, reason] {
          auto it = self->links.find(id);
          if (it != self->links.end())
            self->fail_link(*it->second, "staged_ucx: the receiver at " + it->second->remote.host +
                                             " gave no lane: " + reason);
        });
        return UCS_OK;
      }
      if (h.slots != l.out.size() || length != h.slots * sizeof(std::uint64_t)) {
        self->worker->defer([self, id = id] {
          auto it = self->links.find(id);
          if (it != self->links.end()) self->fail_link(*it->second, "staged_ucx: a malformed welcome");
        });
        return UCS_OK;
      }
      l.slot_addr.resize(h.slots);
      std::memcpy(l.slot_addr.data(), data, length);
      l.lane = h.lane;
      l.token = h.token;
      l.welcomed = true;
      self->welcomed_at[l.remote.worker_address] = {h.lane, h.token};
      self->worker->defer([self, id = id] {
        auto it = self->links.find(id);
        if (it == self->links.end()) return;
        auto& w = *it->second;
        for (int s = 0; s < static_cast<int>(w.out.size()) && w.why.empty(); ++s)
          if (w.out[s].st == out_state::waiting) self->put_slot(w, s);
      });
      return UCS_OK;
    }
    return UCS_OK;
  }

  static ucs_status_t on_verdict(void* arg, const void* header, std::size_t header_length, void* data,
                                 std::size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<impl*>(arg);
    staged_wire::verdict_header h;
    if (!read_header(header, header_length, h) || !eager(param)) return UCS_OK;
    for (auto& [id, lp] : self->links) {
      auto& l = *lp;
      if (!l.welcomed || l.token != h.token || l.lane != static_cast<int>(h.lane)) continue;
      // Only a verdict on a slot this link handed over, of the same number, counts.
      if (h.slot >= l.out.size() || l.out[h.slot].st != out_state::announced || l.out[h.slot].seq != h.seq) break;
      status st;
      if (h.ok != 1)
        st = status::error(std::string(static_cast<const char*>(data), std::min<std::size_t>(length, max_reason)));
      self->finish_slot(l, static_cast<int>(h.slot), st);
      self->arm_watchdog();
      break;
    }
    return UCS_OK;
  }

  // Wakes at the oldest slot's deadline: a receiver that answered none in slot_timeout is frozen.
  void arm_watchdog() {
    auto next = clock_type::time_point::max();
    for (const auto& [id, l] : links)
      if (l->why.empty())
        for (const auto& o : l->out)
          if (o.st != out_state::none) next = std::min(next, o.since + options.staged.slot_timeout);
    worker->set_deadline(next, next == clock_type::time_point::max() ? ucx_worker::command{} : [this] { on_watchdog(); });
  }

  void on_watchdog() {
    const auto now = clock_type::now();
    for (auto& [id, l] : links) {
      bool late = false;
      for (const auto& o : l->out) late = late || (o.st != out_state::none && o.since + options.staged.slot_timeout <= now);
      if (late && l->why.empty())
        fail_link(*l, "staged_ucx: the receiver at " + l->remote.host + " answered no slot in " +
                          std::to_string(options.staged.slot_timeout.count()) + " ms");
    }
    arm_watchdog();
  }

  // The link is no longer used (its peers left the inner transport; its forwarder stopped).
  void drop_link(const std::shared_ptr<link>& lp) {
    auto& l = *lp;
    for (int s = 0; s < static_cast<int>(l.out.size()); ++s)
      if (l.out[s].st != out_state::none) finish_slot(l, s, status::error("staged_ucx: disconnected"));
    if (l.ep != nullptr && l.welcomed && l.why.empty()) {
      staged_wire::goodbye_header h;
      h.lane = static_cast<std::uint32_t>(l.lane);
      h.token = l.token;
      if (auto it = welcomed_at.find(l.remote.worker_address); it != welcomed_at.end() && it->second.second == l.token)
        welcomed_at.erase(it);
      if (l.rkey != nullptr) ucp_rkey_destroy(l.rkey);
      l.rkey = nullptr;
      send_am(std::exchange(l.ep, nullptr), staged_wire::goodbye, &h, sizeof h, {}, true);
    }
    close_link_ep(l);
    links.erase(l.id);
    arm_watchdog();
  }

  // ---- forwarder thread (one per link) ----

  // Sleeps on the local ring's doorbell until the inner transport fills a slot or retire()
  // stops it (it rings the same doorbell): no timeout, so an idle link costs no wake-ups. The
  // slots' deadlines are the UCX thread's watchdog, not this thread's.
  void forward_loop(link& l) {
    auto& doorbell = l.proxy->doorbell();
    const int slots = static_cast<int>(l.proxy->shape().slots);
    for (;;) {
      // The bell before the stop flag: a stop that this load missed bumps the bell after it, so
      // the wait below returns at once; one whose bump this load saw is seen below (retire stores
      // the flag before its release bump).
      const std::uint32_t seen = doorbell.load(std::memory_order_acquire);
      if (l.stop.load(std::memory_order_acquire)) return;
      bool found = false;
      for (int s = 0; s < slots; ++s) {
        if (!l.proxy->exchange_state(0, s, slot_state::filled, slot_state::taken)) continue;
        found = true;
        worker->post([this, id = l.id, s] { forward(id, s); });
      }
      if (found) continue;
      futex_wait(doorbell, seen);
      // Woken with the bell where it was: a timed-out or spurious sleep, what a poll would cost.
      if (doorbell.load(std::memory_order_acquire) == seen) unrung_wakeups.fetch_add(1, std::memory_order_relaxed);
    }
  }

  // ---- UCX thread: receiving ----

  static ucs_status_t on_hello(void* arg, const void* header, std::size_t header_length, void* data,
                               std::size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<impl*>(arg);
    std::uint32_t version = 0;  // first: the header's size is the version's
    if (header == nullptr || header_length < sizeof version) return UCS_OK;
    std::memcpy(&version, header, sizeof version);
    if (version != staged_wire::version) {
      spdlog::warn("staged_ucx: a sender of wire version {} (this is {}) ignored", version, staged_wire::version);
      return UCS_OK;
    }
    staged_wire::hello_header h;
    if (!read_header(header, header_length, h) || !eager(param) || length == 0 || length > max_address) return UCS_OK;
    if (!same_secret(h.secret, self->secret)) {
      spdlog::warn("staged_ucx: a hello without this endpoint's secret ignored (a peer that never got the endpoint)");
      return UCS_OK;
    }
    self->worker->defer([self, h, address = std::string(static_cast<const char*>(data), length)] {
      self->accept(address, h.nonce, h.held_lane, h.held_token);
    });
    return UCS_OK;
  }

  // A remote sender asks for a lane. The rule: one lane per sender, a sender being the worker
  // address its hello names. That address is what this receiver can hold a sender to: its
  // endpoint goes back there, and the welcome (with the token every later message about the
  // lane must carry) and the verdicts go nowhere else. The secret is shared by every peer the
  // endpoint reached, and a process or host a hello might claim could be anyone's. So:
  // - an address that holds no lane claims a free one, under a new token;
  // - an address that holds a lane gets that lane again, never a second one, welcomed over the
  //   lane's own endpoint (to that address): under a new token when the hello carries the
  //   current one (its holder asking again on a new link after its old one failed: the slots
  //   the old link handed over are withdrawn, and their verdicts are not sent), else under the
  //   same token, so a hello that names another sender's address learns nothing and changes
  //   nothing (the holder drops a welcome it did not ask for);
  // - a lane comes back when its sender says goodbye or its endpoint fails (on_ep_error).
  // An honest sender takes one lane of a receiver: its transport has one worker (a node has one
  // per GPU) and one link to each receiver at a time (connect()). Not bounded: a peer that holds
  // the secret and names addresses that reach it, other workers of its or its own address with
  // a byte UCX does not check changed (the worker id), takes a lane for each (docs/reliability.md).
  void accept(const std::string& address, std::uint64_t nonce, std::int32_t held_lane, std::uint64_t held_token) {
    std::string err;
    // UCX reads a worker address trusting every length in it: checked first.
    if (auto a = check_ucx_address(address, worker->address()); !a) {
      spdlog::warn("staged_ucx: a sender's worker address ignored: {}", a.reason());
      return;
    }
    staged_wire::welcome_header w;
    w.nonce = nonce;
    if (auto held = holders.find(address); held != holders.end()) {
      const int lane = held->second;
      auto& rl = lanes.at(lane);
      if (held_lane == lane && held_token == rl.token) {
        withdraw(lane);
        rl.token = random_token();
        spdlog::info("staged_ucx: the sender of lane {} asks again on a new link: the lane's token is renewed", lane);
      } else {
        spdlog::debug("staged_ucx: a hello for the sender of lane {} again: the same lane", lane);
      }
      return send_welcome(rl.ep, w, lane, rl.token);
    }
    ucp_ep_h ep = open_ep(address, err);
    if (ep == nullptr) {
      spdlog::warn("staged_ucx: no endpoint back to a sender: {}", err);
      return;
    }
    static std::atomic<std::uint32_t> serial{1};
    const std::uint64_t claimant = (static_cast<std::uint64_t>(::getpid()) << 32) | serial.fetch_add(1);
    const int lane = ring != nullptr ? ring->claim_lane(claimant) : -1;
    if (lane < 0) {
      const std::string why = ring == nullptr ? "this endpoint has no receiving ring"
                                              : "every lane of the ring is held (" + std::to_string(ring->shape().lanes) +
                                                    " senders)";
      spdlog::warn("staged_ucx: a sender refused: {}", why);
      return send_am(ep, staged_wire::welcome, &w, sizeof w, why, true);
    }
    withdraw(lane);  // a slot its former holder handed over (nobody waits for its verdict)
    const std::uint64_t token = random_token();
    lanes[lane] = {token, claimant, ep, std::vector<std::uint64_t>(ring->shape().slots, 0), address};
    holders[address] = lane;
    send_welcome(ep, w, lane, token);
  }

  // The slots of `lane` handed over and not taken yet go back to free.
  void withdraw(int lane) {
    for (int s = 0; s < static_cast<int>(ring->shape().slots); ++s)
      ring->exchange_state(lane, s, slot_state::filled, slot_state::free);
  }

  // `w` (its nonce set) with `lane`, `token` and the lane's slot addresses, over `ep`.
  void send_welcome(ucp_ep_h ep, staged_wire::welcome_header w, int lane, std::uint64_t token) {
    w.lane = lane;
    w.slots = ring->shape().slots;
    w.token = token;
    std::string addresses;
    for (std::uint32_t s = 0; s < w.slots; ++s)
      codec::put(addresses, reinterpret_cast<std::uint64_t>(ring->data(lane, static_cast<int>(s))));
    send_am(ep, staged_wire::welcome, &w, sizeof w, std::move(addresses));
  }

  void send_verdict(int lane, std::uint64_t token, std::uint32_t slot, std::uint64_t seq, const status& st) {
    auto it = lanes.find(lane);
    if (it == lanes.end() || it->second.token != token) return;
    staged_wire::verdict_header v;
    v.lane = static_cast<std::uint32_t>(lane);
    v.slot = slot;
    v.token = token;
    v.seq = seq;
    v.ok = st ? 1 : 0;
    send_am(it->second.ep, staged_wire::verdict, &v, sizeof v, st ? std::string() : strip_refused(st.reason()));
  }

  static ucs_status_t on_filled(void* arg, const void* header, std::size_t header_length, void* data,
                                std::size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<impl*>(arg);
    staged_wire::filled_header h;
    if (!read_header(header, header_length, h)) return UCS_OK;
    auto* r = self->ring;
    auto it = self->lanes.find(static_cast<int>(h.lane));
    if (r == nullptr || it == self->lanes.end() || it->second.token != h.token) {
      // Not the sender's lane: the lane whose token it carries (its own, if any) hears why.
      for (const auto& [lane, rl] : self->lanes)
        if (rl.token == h.token)
          self->worker->defer([self, lane = lane, h] {
            auto lie = status::error("lane " + std::to_string(h.lane) + " is not this sender's");
            self->send_verdict_as(lane, h, lie);
          });
      spdlog::warn("staged_ucx: a slot announced for lane {} by a sender that does not hold it: ignored", h.lane);
      return UCS_OK;
    }
    const int lane = static_cast<int>(h.lane);
    auto refuse = [&](std::string why) {
      spdlog::warn("staged_ucx: lane {} slot {} refused: {}", h.lane, h.slot, why);
      self->worker->defer([self, lane, h, why = std::move(why)] { self->send_verdict(lane, h.token, h.slot, h.seq, status::error(why)); });
      return UCS_OK;
    };
    const auto& shape = r->shape();
    if (!eager(param)) return refuse("runs must come in an eager message");
    if (h.slot >= shape.slots)
      return refuse("slot " + std::to_string(h.slot) + " of a lane of " + std::to_string(shape.slots));
    if (h.count > shape.max_descs)
      return refuse(std::to_string(h.count) + " runs announced; a slot holds at most " + std::to_string(shape.max_descs));
    if (length != std::uint64_t{h.count} * sizeof(staged_desc))
      return refuse(std::to_string(length) + " bytes of runs for " + std::to_string(h.count) + " runs");
    const auto st = r->load_state(lane, static_cast<int>(h.slot));
    if (st == slot_state::filled || st == slot_state::taken)
      return refuse("slot " + std::to_string(h.slot) + " is still the receiver's");
    std::vector<staged_desc> runs(h.count);
    if (h.count > 0) std::memcpy(static_cast<void*>(runs.data()), data, length);
    it->second.filled_by[h.slot] = h.token;
    // From here the ring's own receiver takes it: checks every run, copies, gives it back.
    r->write_descs(lane, static_cast<int>(h.slot), runs, h.seq);
    r->store_state(lane, static_cast<int>(h.slot), slot_state::filled);
    futex_bump(r->doorbell());
    return UCS_OK;
  }

  // A refusal to the sender of lane `lane` about a message that named another lane.
  void send_verdict_as(int lane, const staged_wire::filled_header& h, const status& st) {
    auto it = lanes.find(lane);
    if (it == lanes.end()) return;
    staged_wire::verdict_header v;
    v.lane = h.lane;
    v.slot = h.slot;
    v.token = h.token;
    v.seq = h.seq;
    send_am(it->second.ep, staged_wire::verdict, &v, sizeof v, st.reason());
  }

  // The ring's receiver gave a slot of `lane` back: the verdicts of its done slots go to their sender.
  void scan_lane(int lane) {
    auto it = lanes.find(lane);
    if (it == lanes.end() || ring == nullptr) return;
    for (int s = 0; s < static_cast<int>(ring->shape().slots); ++s) {
      if (ring->load_state(lane, s) != slot_state::done) continue;
      const std::uint64_t seq = ring->seq(lane, s);
      const status verdict = ring->read_verdict(lane, s);
      if (!ring->exchange_state(lane, s, slot_state::done, slot_state::free)) continue;
      // Filled by a former holder of the lane (or under its former token): nobody to tell.
      if (std::exchange(it->second.filled_by[s], 0) != it->second.token) continue;
      send_verdict(lane, it->second.token, static_cast<std::uint32_t>(s), seq, verdict);
    }
  }

  static ucs_status_t on_goodbye(void* arg, const void* header, std::size_t header_length, void*, std::size_t,
                                 const ucp_am_recv_param_t*) {
    auto* self = static_cast<impl*>(arg);
    staged_wire::goodbye_header h;
    if (!read_header(header, header_length, h)) return UCS_OK;
    self->worker->defer([self, h] {
      auto it = self->lanes.find(static_cast<int>(h.lane));
      if (it != self->lanes.end() && it->second.token == h.token) self->release_lane(static_cast<int>(h.lane));
    });
    return UCS_OK;
  }

  // The lane's sender is gone or done: slots it handed over and that were not taken yet are
  // withdrawn, the lane is free for the next sender.
  void release_lane(int lane) {
    auto it = lanes.find(lane);
    if (it == lanes.end()) return;
    withdraw(lane);
    if (auto held = holders.find(it->second.sender); held != holders.end() && held->second == lane) holders.erase(held);
    ring->release_lane(lane, it->second.claimant);
    close_ep(it->second.ep);
    lanes.erase(it);
  }

  // ---- any thread ----

  status map_ring() {
    {
      std::lock_guard<std::mutex> g(m);
      if (ring_mapped) return {};
    }
    if (recv->receiving_ring() == nullptr)
      if (auto s = recv->prepare_receiving(); !s) return s;
    staging_ring* r = recv->receiving_ring();
    status err;
    std::string key;
    worker->call([&] {
      if (ring != nullptr) return;
      ucp_mem_map_params_t mp{};
      mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
      mp.address = r->base();
      mp.length = r->bytes();
      if (auto st = ucp_mem_map(worker->context(), &mp, &ring_memh); st != UCS_OK) {
        ring_memh = nullptr;
        err = status::error(std::string("staged_ucx: ucp_mem_map of the ring: ") + ucs_status_string(st));
        return;
      }
      void* packed = nullptr;
      std::size_t packed_len = 0;
      if (auto st = ucp_rkey_pack(worker->context(), ring_memh, &packed, &packed_len); st != UCS_OK) {
        ucp_mem_unmap(worker->context(), ring_memh);
        ring_memh = nullptr;
        err = status::error(std::string("staged_ucx: ucp_rkey_pack: ") + ucs_status_string(st));
        return;
      }
      key.assign(static_cast<const char*>(packed), packed_len);
      ucp_rkey_buffer_release(packed);
      ring = r;
    });
    if (!err) {
      spdlog::error("{}", err.reason());
      return err;
    }
    recv->set_return_hook([this](int lane) { worker->post([this, lane] { scan_lane(lane); }); });
    std::lock_guard<std::mutex> g(m);
    if (!key.empty()) {
      ring_rkey = key;
      shape = r->shape();
      ring_mapped = true;
    }
    return {};
  }

  result<std::shared_ptr<link>> make_link(const remote_endpoint& remote) {
    auto l = std::make_shared<link>();
    l->remote = remote;
    static std::atomic<std::uint32_t> serial{0};
    const std::string name = "/kvflow-stgfwd-" + std::to_string(::getpid()) + "-" + std::to_string(serial.fetch_add(1));
    auto p = staging_ring::create(name, remote.shape);
    if (!p) return p.error();
    l->proxy = std::move(p.value());
    l->out.resize(remote.shape.slots);
    {
      std::lock_guard<std::mutex> g(m);
      l->id = next_link++;
    }
    l->forwarder = std::thread([this, raw = l.get()] { forward_loop(*raw); });
    worker->post([this, l] {
      links[l->id] = l;
      open_link(*l);
    });
    return l;
  }

  // Stops a link no peer uses: its forwarder first (so that every slot it took was posted
  // before), then its endpoint, after a goodbye.
  void retire(const std::shared_ptr<link>& l) {
    l->stop.store(true, std::memory_order_release);
    futex_bump(l->proxy->doorbell());
    if (l->forwarder.joinable()) l->forwarder.join();
    worker->post([this, l] { drop_link(l); });
  }

  // `peer` leaves `l`; the link retires with its last peer.
  void leave(std::uint64_t peer, const std::shared_ptr<link>& l) {
    bool last = false;
    {
      std::lock_guard<std::mutex> g(m);
      last = l->peers.erase(peer) > 0 && l->peers.empty();
      if (last) {
        auto it = by_address.find(l->remote.worker_address);
        if (it != by_address.end() && it->second == l) by_address.erase(it);
      }
    }
    if (last) retire(l);
  }
};

result<std::unique_ptr<ucx_staged_transport>> ucx_staged_transport::create(const ucx_staged_options& options,
                                                                          std::shared_ptr<staged_transport> receiving) {
  auto p = std::make_unique<impl>();
  p->options = options;
  p->host = options.host_identity.empty() ? boot_id() : options.host_identity;
  if (p->host.empty()) return status::error("staged_ucx: no host identity (the boot id cannot be read)");
  if (auto st = make_secret(p->secret); !st) return st;
  // The inner transport's lanes go to the links' local rings, whose slots the forwarder takes at
  // once: a slot's deadline is the UCX thread's watchdog, which marks the link failed, then fails
  // its pushes. The inner lane's deadline for the same slot starts earlier (before the forward):
  // were it as long, it would fail a push first, while connect() still took the link for a live
  // one and reused it (since the inner lane stopped polling every 20 ms, it comes exactly on
  // time). Twice as long, it only backs the watchdog up.
  staged_options inner = options.staged;
  inner.slot_timeout = 2 * options.staged.slot_timeout;
  auto send = staged_transport::create(inner);
  if (!send) return send.error();
  p->send = std::move(send.value());
  if (receiving) {
    p->recv = std::move(receiving);
  } else {
    auto recv = staged_transport::create(options.staged);
    if (!recv) return recv.error();
    p->recv = std::move(recv.value());
  }
  auto w = ucx_worker::create(UCP_FEATURE_RMA | UCP_FEATURE_AM, options.tcp_beyond_loopback);
  if (!w) return w.error();
  p->worker = std::move(w.value());
  status handlers;
  p->worker->call([&] { handlers = p->set_handlers(); });
  if (!handlers) {
    spdlog::error("{}", handlers.reason());
    return handlers;
  }
  return std::unique_ptr<ucx_staged_transport>(new ucx_staged_transport(std::move(p)));
}

ucx_staged_transport::ucx_staged_transport(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

ucx_staged_transport::~ucx_staged_transport() {
  auto& p = *impl_;
  p.recv->set_return_hook({});  // returns once no call of it is running
  std::vector<std::uint64_t> peers;
  std::vector<std::shared_ptr<impl::link>> links;
  {
    std::lock_guard<std::mutex> g(p.m);
    for (auto& [peer, l] : p.by_peer) {
      peers.push_back(peer);
      if (std::find(links.begin(), links.end(), l) == links.end()) links.push_back(l);
    }
    for (auto& [address, l] : p.by_address)
      if (std::find(links.begin(), links.end(), l) == links.end()) links.push_back(l);
    p.by_peer.clear();
    p.by_address.clear();
  }
  for (auto peer : peers) p.send->disconnect(peer);  // their pushes fail now
  for (auto& l : links) p.retire(l);
  links.clear();
  p.worker->call([&p] {
    std::vector<int> held;
    for (const auto& [lane, rl] : p.lanes) held.push_back(lane);
    for (int lane : held) p.release_lane(lane);
    for (auto& [id, l] : p.links) p.close_link_ep(*l);  // a link whose retire is still queued
    p.worker->progress_until([&p] { return p.closes == 0; }, std::chrono::seconds(2));
    if (p.ring_memh != nullptr) ucp_mem_unmap(p.worker->context(), p.ring_memh);
    p.ring_memh = nullptr;
    p.dying = true;  // what is still outstanding completes inside the worker's destruction
  });
  p.send.reset();  // its lanes end: every slot they handed over is done
  p.worker.reset();
  p.links.clear();
}

std::string ucx_staged_transport::endpoint() const {
  std::lock_guard<std::mutex> g(impl_->m);
  return pack_endpoint(impl_->host, impl_->worker->address(), impl_->ring_rkey, impl_->shape, impl_->secret);
}

std::vector<memory_type> ucx_staged_transport::memory_types() const {
  return {impl_->options.staged.host_copies ? memory_type::host : memory_type::cuda};
}

capabilities ucx_staged_transport::query() const { return {memory_types(), true, !impl_->options.staged.host_copies}; }

bool ucx_staged_transport::can_connect(const std::string& endpoint) const {
  auto r = unpack_endpoint(endpoint);
  return r && r.value().host != impl_->host && !r.value().rkey.empty();
}

status ucx_staged_transport::prepare_receiving() { return impl_->map_ring(); }

result<region_desc> ucx_staged_transport::register_memory(std::uint64_t owner, void* base, std::uint64_t len) {
  auto d = impl_->recv->register_memory(owner, base, len);
  if (!d) return d;
  if (auto s = impl_->map_ring(); !s) {
    impl_->recv->deregister_memory(d.value().id);
    return s;
  }
  d.value().remote_key = region_key;
  return d;
}

void ucx_staged_transport::deregister_memory(std::uint64_t region) { impl_->recv->deregister_memory(region); }

status ucx_staged_transport::connect(std::uint64_t peer, const std::string& endpoint,
                                     const std::vector<region_desc>& regions) {
  auto refuse = [&](const std::string& why) {
    return status::error("staged_ucx: connect peer " + std::to_string(peer) + ": " + why);
  };
  auto r = unpack_endpoint(endpoint);
  if (!r) return refuse(r.error().reason());
  if (r.value().host == impl_->host) return refuse("it is on this host (the staged transport's shared ring reaches it)");
  if (r.value().rkey.empty()) return refuse("it has no receiving ring");
  // UCX reads a worker address trusting every length in it: checked here first.
  if (auto a = check_ucx_address(r.value().worker_address, impl_->worker->address()); !a) return refuse(a.reason());
  std::vector<region_desc> inner = regions;
  for (auto& d : inner) {
    if (d.remote_key != region_key) return refuse("region " + std::to_string(d.id) + " is not staged_ucx");
    d.remote_key = staged_region_key;
  }
  std::lock_guard<std::mutex> one_at_a_time(impl_->connecting);
  std::shared_ptr<impl::link> l;
  {
    std::lock_guard<std::mutex> g(impl_->m);
    auto it = impl_->by_address.find(r.value().worker_address);
    if (it != impl_->by_address.end() && it->second->failure) l = it->second;  // a live link to it
  }
  bool made = false;
  if (!l) {
    auto fresh = impl_->make_link(r.value());
    if (!fresh) return refuse(fresh.error().reason());
    l = std::move(fresh.value());
    made = true;
  }
  if (auto s = impl_->send->connect(peer, staged_transport::endpoint_of_ring(l->proxy->name()), inner); !s) {
    if (made) impl_->retire(l);
    return refuse(s.reason());
  }
  std::shared_ptr<impl::link> old;
  {
    std::lock_guard<std::mutex> g(impl_->m);
    auto it = impl_->by_peer.find(peer);
    if (it != impl_->by_peer.end() && it->second != l) old = it->second;
    l->peers.insert(peer);
    impl_->by_peer[peer] = l;
    impl_->by_address[r.value().worker_address] = l;
  }
  if (old) impl_->leave(peer, old);
  return {};
}

void ucx_staged_transport::disconnect(std::uint64_t peer) {
  std::lock_guard<std::mutex> one_at_a_time(impl_->connecting);
  std::shared_ptr<impl::link> l;
  {
    std::lock_guard<std::mutex> g(impl_->m);
    auto it = impl_->by_peer.find(peer);
    if (it == impl_->by_peer.end()) return;
    l = it->second;
    impl_->by_peer.erase(it);
  }
  impl_->send->disconnect(peer);
  impl_->leave(peer, l);
}

void ucx_staged_transport::push(std::uint64_t peer, const std::vector<block>& blocks, completion done) {
  push_after(0, peer, blocks, std::move(done));
}

void ucx_staged_transport::push_after(std::uintptr_t ready_fence, std::uint64_t peer, const std::vector<block>& blocks,
                                      completion done) {
  status failed;
  {
    std::lock_guard<std::mutex> g(impl_->m);
    auto it = impl_->by_peer.find(peer);
    if (it == impl_->by_peer.end())
      failed = status::error("staged_ucx: peer " + std::to_string(peer) + " is not connected");
    else
      failed = it->second->failure;
  }
  if (!failed) return done(std::move(failed));
  impl_->send->push_after(ready_fence, peer, blocks, std::move(done));
}

std::uint64_t ucx_staged_transport::bytes_moved() const { return impl_->send->bytes_moved(); }

std::uint64_t ucx_staged_transport::forwarder_unrung_wakeups() const {
  return impl_->unrung_wakeups.load(std::memory_order_relaxed);
}

}  // namespace kvflow::transport
