#pragma once
// kvflow's embedding API (C++17). A serving engine owns the KV memory, chooses every page index
// and drives the scheduler steps; kvflow moves each request's KV from prefill to decode ranks
// and tells every rank of a group the same thing at the same step. No CAF, UCX, CUDA or spdlog
// types here: everything behind it is private (pimpl).
//
//   auto node = kvflow::node::start(topology, options);          // one per process
//   auto rank = node->add_prefill({tp, cp, pp, dp}, memory);     // several per node are fine
//   rank->create(id, decode_dp); ... rank->init(id, pages, aux_row); rank->send(id, chunk, last);
//   auto round = rank->poll(step);   // at step k: the agreed round k - L, the same on every rank
//
// Threads: every call may come from the engine's scheduler thread; none blocks except poll()
// while its round is not complete (bounded, counted as a stall). Errors are values.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#define KVFLOW_API_VERSION 1

namespace kvflow {

// ---- errors: a code and a message, never an exception across the API ---------------------
enum class errc : int {
  ok = 0,
  invalid_argument = 1,  // a malformed call (the message names the argument)
  not_found = 2,         // no such request on this rank
  exists = 3,            // a live request holds the room already
  not_ready = 4,         // poll: the round is not complete yet (wait 0), or a call came too early
  timeout = 5,           // poll: the round did not complete within the wait
  unsupported = 6,       // not available in this build or mode
  unavailable = 7,       // the node or rank stopped, or its group was lost
  internal = 8,
};
const char* to_string(errc e);

class error {
 public:
  error() = default;
  error(errc code, std::string message) : code_(code), message_(std::move(message)) {}
  errc code() const { return code_; }
  const std::string& message() const { return message_; }
  bool ok() const { return code_ == errc::ok; }
  explicit operator bool() const { return !ok(); }  // true when there is an error

 private:
  errc code_ = errc::ok;
  std::string message_;
};

// A value or an error.
template <class T>
class expected {
 public:
  expected(T value) : value_(std::move(value)), has_(true) {}  // NOLINT: implicit by design
  expected(error e) : error_(std::move(e)) {}                  // NOLINT
  bool has_value() const { return has_; }
  explicit operator bool() const { return has_; }
  T& value() { return value_; }
  const T& value() const { return value_; }
  T* operator->() { return &value_; }
  const T* operator->() const { return &value_; }
  T& operator*() { return value_; }
  const error& err() const { return error_; }

 private:
  T value_{};
  error error_;
  bool has_ = false;
};

// ---- the cluster ------------------------------------------------------------------------
struct topology {
  struct prefill_side { int tp = 1, cp = 1, pp = 1, dp = 1; } prefill;
  struct decode_side { int tp = 1, dp = 1, pp = 1; } decode;
  std::string model = "dsv32";  // dsv32 | mla:LAYERS:BYTES[:STATE] | mha:LAYERS:KV_HEADS:HEAD_DIM
  std::string dtype = "fp8";    // fp8 | bf16
  int page_size = 64;           // tokens per page
  bool cp_send_all = false;     // every CP rank sends a share of the pages (else CP rank 0)
};

// Where a rank sits: attention TP, CP, PP stage, DP group. Decode ranks have cp 0.
struct coords {
  int tp = 0, cp = 0, pp = 0, dp = 0;
};

enum class memory_kind : int { host = 0, cuda = 1 };
enum class buffer_role : int { k = 0, v = 1, mla_latent = 2, aux = 3, state = 4 };

// One buffer of the engine's KV memory: `bytes` at `base`, in pages of `page_bytes` (page i at
// base + i * page_bytes). KV and state buffers name their global layer; aux buffers hold rows
// (one per aux slot, paired by position on both sides: aux buffer j goes to aux buffer j).
struct buffer_desc {
  void* base = nullptr;
  std::uint64_t bytes = 0;
  std::uint64_t page_bytes = 0;
  buffer_role role = buffer_role::mla_latent;
  int layer = -1;  // global layer (k, v, mla_latent, state); -1 for aux
  memory_kind kind = memory_kind::host;
  int device = -1;  // CUDA device id when kind is cuda
};

// The memory of one rank: every buffer it holds, and the layers [layer_begin, layer_end) of its
// pipeline stage (from the engine, not from a formula of kvflow's). Must outlive the rank.
struct memory_desc {
  std::vector<buffer_desc> buffers;
  int layer_begin = 0, layer_end = 0;
};

// ---- requests and rounds ------------------------------------------------------------------
enum class poll_state : std::uint8_t {
  failed = 0,
  bootstrapping = 1,
  waiting_for_input = 2,
  transferring = 3,
  success = 4,
};
const char* to_string(poll_state s);

// A request: its room (unique among live requests) and which use of the room it is (rooms are
// reused once cleared; 0 when the engine does not distinguish, as SGLang does not).
struct request_id {
  std::uint64_t room = 0;
  std::uint64_t incarnation = 0;
};

// A room's agreed state in one round. `released`: every rank of the group has let go of the
// request's memory (no write into its pages can still come), so the engine may reuse its pages.
// An agreed terminal state is final; the room leaves the rounds after the group released it.
struct room_poll {
  request_id id;
  poll_state state = poll_state::bootstrapping;
  bool released = false;
};

// The agreed round a poll returns: identical on every rank of the group for the same step.
// `rooms` is sorted by (room, incarnation) and valid until this rank's next poll.
struct round_view {
  std::uint64_t step = 0;   // the step polled
  std::uint64_t round = 0;  // step - lag (0: before the first round: no rooms)
  const room_poll* rooms = nullptr;
  std::size_t count = 0;
  const room_poll* begin() const { return rooms; }
  const room_poll* end() const { return rooms + count; }
  // The room's entry, or null when the round does not hold it.
  const room_poll* find(const request_id& id) const;
};

// What one rank did, for metrics.
struct rank_stats {
  std::uint64_t created = 0, succeeded = 0, failed = 0, aborted = 0;
  std::uint64_t bytes_sent = 0;         // prefill: payload pushed to decode ranks
  double transfer_seconds = 0;          // prefill: summed push time (first byte to completion)
  std::uint64_t polls = 0, stalls = 0;  // polls that had to wait for their round
  std::uint64_t live_requests = 0;      // known to the rank, not yet cleared
  std::uint64_t quarantined = 0;        // decode: failed requests whose pages are still held
  std::uint64_t pushes_in_flight = 0;   // prefill: handed to the transport, not completed
};

class prefill_rank;
class decode_rank;
struct internal_access;

// ---- the node -----------------------------------------------------------------------------
enum class log_level : int { trace = 0, debug = 1, info = 2, warn = 3, error = 4, off = 6 };

struct node_options {
  // HOST:PORT of the bootstrap registry this node joins. Empty: this node hosts the registry;
  // with `listen` empty too, every rank of the cluster lives in this process.
  std::string bootstrap;
  // HOST:PORT this node accepts other nodes on (port 0: any; see address()). Set on the node
  // that hosts the registry for others to join; a joining node listens on 127.0.0.1:0 unless
  // told otherwise. A node with either address needs the ucx transport. When one node holds
  // several ranks of a group, add the group's leads (cp 0; tp 0 and pp 0) first.
  std::string listen;
  std::string transport = "inproc";  // inproc (one process) | ucx
  // KVFLOW_* tunables by variable name (see `kvflow --help`); unset ones keep their defaults.
  // The process environment is not read unless read_environment is set.
  std::vector<std::pair<std::string, std::string>> tunables;
  bool read_environment = false;
  int worker_threads = 0;  // actor scheduler threads (0: one per core, at most 4)
  // Node links (a node with a bootstrap or listen address). With a cluster token (at least 16
  // bytes) every peer proves it before any message of its is accepted: an HMAC challenge, the
  // token never crosses the link. With TLS files every link is mutual TLS; a peer's certificate
  // must chain to tls_ca. Empty fields come from KVFLOW_AUTH_TOKEN, KVFLOW_AUTH_TOKEN_FILE,
  // KVFLOW_TLS_CERT, KVFLOW_TLS_KEY, KVFLOW_TLS_CA when read_environment is set. Listening on a
  // non-loopback address with neither is refused unless allow_insecure_listen.
  std::string auth_token, auth_token_file;
  std::string tls_certificate, tls_key, tls_ca;
  bool allow_insecure_listen = false;
  // Receives kvflow's log lines (level, text) from any thread. Empty: kvflow logs nothing.
  std::function<void(log_level, const std::string&)> log;
  log_level min_level = log_level::warn;
};

class node {
 public:
  // Starts a node: validates the topology (errors name the field), starts the actor system and
  // (without a bootstrap address) the registry. No signal handlers, no process-wide state.
  static expected<std::shared_ptr<node>> start(const topology& t, node_options options);
  ~node();
  node(const node&) = delete;
  node& operator=(const node&) = delete;

  // Adds the prefill / decode rank at `where`, over the engine's memory.
  expected<std::shared_ptr<prefill_rank>> add_prefill(const coords& where, const memory_desc& memory);
  expected<std::shared_ptr<decode_rank>> add_decode(const coords& where, const memory_desc& memory);

  // HOST:PORT other nodes reach this one at (its `bootstrap` when it hosts the registry);
  // empty for a one-process node.
  std::string address() const;

  // Stops every rank and the actor system; ranks answer errc::unavailable afterwards.
  void stop();

  struct impl;

 private:
  friend struct internal_access;
  explicit node(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

// ---- ranks --------------------------------------------------------------------------------
// What prefill and decode ranks share.
class rank {
 public:
  virtual ~rank();
  // Posts this rank's states as its step-`step` report (once per step; steps start at 1 and
  // rise by one) and returns the agreed round step - lag. When that round is complete the call
  // is wait-free; else it waits up to `wait` (default: the KVFLOW_POLL_WAIT_US tunable) and
  // counts a stall, then answers errc::timeout (call again with the same step) — never a
  // different round.
  expected<round_view> poll(std::uint64_t step);
  expected<round_view> poll(std::uint64_t step, std::chrono::microseconds wait);
  // Why the request failed (after an agreed Failed); empty when it did not.
  std::string failure_reason(const request_id& id) const;
  // Forgets a request (SGLang's clear()). The poll that hands out a round showing the request
  // terminal and released already forgot it, on every rank at the same step: then this is a
  // no-op; before, it is refused (invalid_argument).
  error clear(const request_id& id);
  // Fails the request on this rank and tells its peers. Prefill: unless it succeeded already;
  // its pushes for the room finish or are cancelled before it acknowledges a decode abort.
  // Decode: its pages stay quarantined (released false) until every prefill peer that got its
  // destinations acknowledged that its writes drained, or was disconnected.
  error abort(const request_id& id, const std::string& reason);
  rank_stats stats() const;
  int global_rank() const;
  std::uint64_t lag() const;

  struct impl;

 protected:
  friend struct internal_access;
  explicit rank(std::shared_ptr<impl> p);
  std::shared_ptr<impl> impl_;
};

class prefill_rank final : public rank {
 public:
  // The request enters the bootstrap queue: Bootstrapping (WaitingForInput on a rank no decode
  // rank reads). `decode_dp`: the decode dp group that will send its destinations.
  error create(const request_id& id, int decode_dp);
  // The group agreed WaitingForInput: pages decode already holds (not to be sent).
  expected<int> decode_prefix_pages(const request_id& id) const;
  // Before the first chunk: the request's pages after the decode prefix, and the row of this
  // rank's aux buffers holding its first output (sent after the last chunk).
  error init(const request_id& id, int pages, int aux_row);
  // A chunk's KV was written into `pages` (this rank's page indices, in request order after the
  // pages already sent). `state_pages`: on the last chunk, the request's state pages (one per
  // request page, prefix included) when the model has state. `ready_fence`: opaque handle of
  // the write's completion (a CUDA event on the GPU data plane); 0: already written.
  error send(const request_id& id, const std::vector<std::int32_t>& pages, bool is_last,
             const std::vector<std::int32_t>& state_pages = {}, std::uintptr_t ready_fence = 0);

  explicit prefill_rank(std::shared_ptr<impl> p) : rank(std::move(p)) {}
};

class decode_rank final : public rank {
 public:
  // The request enters the pre-allocation queue: Bootstrapping until its prefill peers (of
  // dp group `prefill_dp`) are resolved, then WaitingForInput.
  error create(const request_id& id, int prefill_dp);
  // The group agreed WaitingForInput: where the request's KV goes. `pages` has one entry per
  // request page (the first `prefix_pages` are cached here already and not sent); `aux_slot`
  // is the row of this rank's aux buffers; `state_pages` one per page when the model has state.
  error send_destinations(const request_id& id, const std::vector<std::int32_t>& pages, int aux_slot,
                          const std::vector<std::int32_t>& state_pages = {}, int prefix_pages = 0);

  explicit decode_rank(std::shared_ptr<impl> p) : rank(std::move(p)) {}
};

}  // namespace kvflow
