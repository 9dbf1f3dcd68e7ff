// The C API (include/kvflow/kvflow.h) over the public C++ API only: handles own shared_ptrs of the
// C++ objects, every call catches everything, and each thread keeps its last error message.
#include "kvflow/kvflow.h"

#include <chrono>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "kvflow/kvflow.hpp"

static_assert(KVFLOW_OK == static_cast<int>(kvflow::errc::ok), "errc");
static_assert(KVFLOW_EINVAL == static_cast<int>(kvflow::errc::invalid_argument), "errc");
static_assert(KVFLOW_ENOTFOUND == static_cast<int>(kvflow::errc::not_found), "errc");
static_assert(KVFLOW_EEXIST == static_cast<int>(kvflow::errc::exists), "errc");
static_assert(KVFLOW_ENOTREADY == static_cast<int>(kvflow::errc::not_ready), "errc");
static_assert(KVFLOW_ETIMEOUT == static_cast<int>(kvflow::errc::timeout), "errc");
static_assert(KVFLOW_EUNSUPPORTED == static_cast<int>(kvflow::errc::unsupported), "errc");
static_assert(KVFLOW_EUNAVAILABLE == static_cast<int>(kvflow::errc::unavailable), "errc");
static_assert(KVFLOW_EINTERNAL == static_cast<int>(kvflow::errc::internal), "errc");
static_assert(KVFLOW_POLL_FAILED == static_cast<int>(kvflow::poll_state::failed), "poll_state");
static_assert(KVFLOW_POLL_BOOTSTRAPPING == static_cast<int>(kvflow::poll_state::bootstrapping), "poll_state");
static_assert(KVFLOW_POLL_WAITING_FOR_INPUT == static_cast<int>(kvflow::poll_state::waiting_for_input),
              "poll_state");
static_assert(KVFLOW_POLL_TRANSFERRING == static_cast<int>(kvflow::poll_state::transferring), "poll_state");
static_assert(KVFLOW_POLL_SUCCESS == static_cast<int>(kvflow::poll_state::success), "poll_state");
static_assert(KVFLOW_LOG_TRACE == static_cast<int>(kvflow::log_level::trace), "log_level");
static_assert(KVFLOW_LOG_DEBUG == static_cast<int>(kvflow::log_level::debug), "log_level");
static_assert(KVFLOW_LOG_INFO == static_cast<int>(kvflow::log_level::info), "log_level");
static_assert(KVFLOW_LOG_WARN == static_cast<int>(kvflow::log_level::warn), "log_level");
static_assert(KVFLOW_LOG_ERROR == static_cast<int>(kvflow::log_level::error), "log_level");
static_assert(KVFLOW_LOG_OFF == static_cast<int>(kvflow::log_level::off), "log_level");
static_assert(KVFLOW_MEMORY_HOST == static_cast<int>(kvflow::memory_kind::host), "memory_kind");
static_assert(KVFLOW_MEMORY_CUDA == static_cast<int>(kvflow::memory_kind::cuda), "memory_kind");
static_assert(KVFLOW_BUFFER_K == static_cast<int>(kvflow::buffer_role::k), "buffer_role");
static_assert(KVFLOW_BUFFER_V == static_cast<int>(kvflow::buffer_role::v), "buffer_role");
static_assert(KVFLOW_BUFFER_MLA_LATENT == static_cast<int>(kvflow::buffer_role::mla_latent), "buffer_role");
static_assert(KVFLOW_BUFFER_AUX == static_cast<int>(kvflow::buffer_role::aux), "buffer_role");
static_assert(KVFLOW_BUFFER_STATE == static_cast<int>(kvflow::buffer_role::state), "buffer_role");
static_assert(KVFLOW_API_VERSION == 1, "kvflow.h and kvflow.hpp disagree on KVFLOW_API_VERSION");

// The handles: complete types of kvflow.h's opaque structs. A rank handle keeps its node alive
// (the C++ objects' lifetimes do not depend on the order the C handles are destroyed in).
struct kvflow_node {
  std::shared_ptr<kvflow::node> node;
};

struct kvflow_prefill {
  std::shared_ptr<kvflow::node> node;
  std::shared_ptr<kvflow::prefill_rank> rank;
  std::vector<kvflow_room_poll> rooms;  // the last poll's rooms, until the next poll
};

struct kvflow_decode {
  std::shared_ptr<kvflow::node> node;
  std::shared_ptr<kvflow::decode_rank> rank;
  std::vector<kvflow_room_poll> rooms;
};

namespace {

// ---- the thread's last error ------------------------------------------------------------
struct last_error {
  std::string text;
  bool lost = false;  // recording the message itself failed (out of memory)
};
thread_local last_error t_last_error;

int record(int code, const char* a, const char* b = nullptr) noexcept {
  last_error& e = t_last_error;
  try {
    e.text.assign(a ? a : "");
    if (b) e.text.append(b);
    e.lost = false;
  } catch (...) {
    e.text.clear();
    e.lost = true;
  }
  return code;
}

int succeed() noexcept {
  t_last_error.text.clear();
  t_last_error.lost = false;
  return KVFLOW_OK;
}

int from_error(const kvflow::error& err) noexcept {
  if (err.ok()) return succeed();
  int code = static_cast<int>(err.code());
  if (code < KVFLOW_OK || code > KVFLOW_EINTERNAL) code = KVFLOW_EINTERNAL;
  return record(code, err.message().c_str());
}

int invalid(const char* what) noexcept { return record(KVFLOW_EINVAL, what); }

// Runs f (which returns a code), mapping any exception to KVFLOW_EINTERNAL.
template <class F>
int guarded(F&& f) noexcept {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return record(KVFLOW_EINTERNAL, "kvflow: out of memory");
  } catch (const std::exception& ex) {
    return record(KVFLOW_EINTERNAL, "kvflow: internal error: ", ex.what());
  } catch (...) {
    return record(KVFLOW_EINTERNAL, "kvflow: internal error (unknown exception)");
  }
}

kvflow::request_id to_id(kvflow_request_id id) { return kvflow::request_id{id.room, id.incarnation}; }

std::string str_or(const char* s, const char* fallback) { return std::string(s ? s : fallback); }

// Checks (ptr, count) of a caller's array; fills `out`.
template <class T>
bool to_vector(const T* p, std::size_t n, std::vector<T>& out) {
  if (n != 0 && p == nullptr) return false;
  out.assign(p, p + n);
  return true;
}

int to_memory(const kvflow_buffer_desc* buffers, std::size_t count, int layer_begin, int layer_end,
              kvflow::memory_desc& m) {
  if (count != 0 && buffers == nullptr) return invalid("buffers is null while buffer_count is not 0");
  m.buffers.reserve(count);
  for (std::size_t i = 0; i < count; ++i) {
    const kvflow_buffer_desc& b = buffers[i];
    std::string at = "buffers[" + std::to_string(i) + "]";
    if (b.role < KVFLOW_BUFFER_K || b.role > KVFLOW_BUFFER_STATE)
      return record(KVFLOW_EINVAL, (at + ".role: not a KVFLOW_BUFFER_* value: " + std::to_string(b.role)).c_str());
    if (b.kind != KVFLOW_MEMORY_HOST && b.kind != KVFLOW_MEMORY_CUDA)
      return record(KVFLOW_EINVAL, (at + ".kind: not a KVFLOW_MEMORY_* value: " + std::to_string(b.kind)).c_str());
    kvflow::buffer_desc d;
    d.base = b.base;
    d.bytes = b.bytes;
    d.page_bytes = b.page_bytes;
    d.role = static_cast<kvflow::buffer_role>(b.role);
    d.layer = b.layer;
    d.kind = static_cast<kvflow::memory_kind>(b.kind);
    d.device = b.device;
    m.buffers.push_back(d);
  }
  m.layer_begin = layer_begin;
  m.layer_end = layer_end;
  return KVFLOW_OK;
}

template <class Handle>
int poll_rank(Handle* r, std::uint64_t step, std::int64_t wait_us, kvflow_round* out) {
  if (out == nullptr) return invalid("out is null");
  out->step = step;
  out->round = 0;
  out->rooms = nullptr;
  out->count = 0;
  if (r == nullptr) return invalid("rank is null");
  auto res = wait_us < 0 ? r->rank->poll(step) : r->rank->poll(step, std::chrono::microseconds(wait_us));
  if (!res) return from_error(res.err());
  const kvflow::round_view& v = res.value();
  r->rooms.clear();
  r->rooms.reserve(v.count);
  for (const kvflow::room_poll& p : v) {
    kvflow_room_poll c;
    c.room = p.id.room;
    c.incarnation = p.id.incarnation;
    c.state = static_cast<int>(p.state);
    c.released = p.released ? 1 : 0;
    r->rooms.push_back(c);
  }
  out->step = v.step;
  out->round = v.round;
  out->rooms = r->rooms.empty() ? nullptr : r->rooms.data();
  out->count = r->rooms.size();
  return succeed();
}

template <class Handle>
int failure_reason(const Handle* r, kvflow_request_id id, char* buf, std::size_t buf_size, std::size_t* needed) {
  if (needed) *needed = 0;
  if (r == nullptr) return invalid("rank is null");
  if (buf == nullptr && buf_size != 0) return invalid("buf is null while buf_size is not 0");
  std::string reason = r->rank->failure_reason(to_id(id));
  if (needed) *needed = reason.size() + 1;
  if (buf_size != 0) {
    std::size_t n = reason.size() < buf_size - 1 ? reason.size() : buf_size - 1;
    std::memcpy(buf, reason.data(), n);
    buf[n] = '\0';
  }
  return succeed();
}

template <class Handle>
int clear_rank(Handle* r, kvflow_request_id id) {
  if (r == nullptr) return invalid("rank is null");
  return from_error(r->rank->clear(to_id(id)));
}

template <class Handle>
int abort_rank(Handle* r, kvflow_request_id id, const char* reason) {
  if (r == nullptr) return invalid("rank is null");
  return from_error(r->rank->abort(to_id(id), str_or(reason, "")));
}

template <class Handle>
int rank_stats(const Handle* r, kvflow_rank_stats* out) {
  if (r == nullptr) return invalid("rank is null");
  if (out == nullptr) return invalid("out is null");
  kvflow::rank_stats s = r->rank->stats();
  out->created = s.created;
  out->succeeded = s.succeeded;
  out->failed = s.failed;
  out->aborted = s.aborted;
  out->bytes_sent = s.bytes_sent;
  out->transfer_seconds = s.transfer_seconds;
  out->polls = s.polls;
  out->stalls = s.stalls;
  out->live_requests = s.live_requests;
  out->quarantined = s.quarantined;
  out->pushes_in_flight = s.pushes_in_flight;
  return succeed();
}

template <class Handle>
int global_rank(const Handle* r, int* out) {
  if (r == nullptr) return invalid("rank is null");
  if (out == nullptr) return invalid("out is null");
  *out = r->rank->global_rank();
  return succeed();
}

template <class Handle>
int rank_lag(const Handle* r, std::uint64_t* out) {
  if (r == nullptr) return invalid("rank is null");
  if (out == nullptr) return invalid("out is null");
  *out = r->rank->lag();
  return succeed();
}

}  // namespace

extern "C" {

int kvflow_api_version(void) noexcept { return KVFLOW_API_VERSION; }

const char* kvflow_last_error(void) noexcept {
  const last_error& e = t_last_error;
  return e.lost ? "kvflow: out of memory (the error message was lost)" : e.text.c_str();
}

const char* kvflow_errc_string(int code) noexcept {
  if (code < KVFLOW_OK || code > KVFLOW_EINTERNAL) return "unknown";
  try {
    const char* s = kvflow::to_string(static_cast<kvflow::errc>(code));
    return s ? s : "unknown";
  } catch (...) {
    return "unknown";
  }
}

const char* kvflow_poll_state_string(int state) noexcept {
  if (state < KVFLOW_POLL_FAILED || state > KVFLOW_POLL_SUCCESS) return "unknown";
  try {
    const char* s = kvflow::to_string(static_cast<kvflow::poll_state>(state));
    return s ? s : "unknown";
  } catch (...) {
    return "unknown";
  }
}

int kvflow_topology_init(kvflow_topology* t) noexcept {
  return guarded([&] {
    if (t == nullptr) return invalid("t is null");
    const kvflow::topology d;
    t->prefill_tp = d.prefill.tp;
    t->prefill_cp = d.prefill.cp;
    t->prefill_pp = d.prefill.pp;
    t->prefill_dp = d.prefill.dp;
    t->decode_tp = d.decode.tp;
    t->decode_dp = d.decode.dp;
    t->decode_pp = d.decode.pp;
    t->model = nullptr;
    t->dtype = nullptr;
    t->page_size = d.page_size;
    t->cp_send_all = d.cp_send_all ? 1 : 0;
    return succeed();
  });
}

int kvflow_node_options_init(kvflow_node_options* o) noexcept {
  return guarded([&] {
    if (o == nullptr) return invalid("options is null");
    const kvflow::node_options d;
    o->bootstrap = nullptr;
    o->listen = nullptr;
    o->transport = nullptr;
    o->tunables = nullptr;
    o->tunable_count = 0;
    o->read_environment = d.read_environment ? 1 : 0;
    o->worker_threads = d.worker_threads;
    o->log = nullptr;
    o->log_user = nullptr;
    o->min_level = static_cast<int>(d.min_level);
    o->auth_token = nullptr;
    o->auth_token_file = nullptr;
    o->tls_certificate = nullptr;
    o->tls_key = nullptr;
    o->tls_ca = nullptr;
    o->allow_insecure_listen = 0;
    return succeed();
  });
}

int kvflow_node_start(const kvflow_topology* t, const kvflow_node_options* options, kvflow_node** out) noexcept {
  return guarded([&] {
    if (out == nullptr) return invalid("out is null");
    *out = nullptr;
    if (t == nullptr) return invalid("topology is null");
    kvflow::topology topo;  // model and dtype keep their defaults when NULL
    topo.prefill.tp = t->prefill_tp;
    topo.prefill.cp = t->prefill_cp;
    topo.prefill.pp = t->prefill_pp;
    topo.prefill.dp = t->prefill_dp;
    topo.decode.tp = t->decode_tp;
    topo.decode.dp = t->decode_dp;
    topo.decode.pp = t->decode_pp;
    if (t->model) topo.model = t->model;
    if (t->dtype) topo.dtype = t->dtype;
    topo.page_size = t->page_size;
    topo.cp_send_all = t->cp_send_all != 0;

    kvflow::node_options o;
    if (options) {
      o.bootstrap = str_or(options->bootstrap, "");
      o.listen = str_or(options->listen, "");
      if (options->transport) o.transport = options->transport;
      if (options->tunable_count != 0 && options->tunables == nullptr)
        return invalid("options.tunables is null while options.tunable_count is not 0");
      for (std::size_t i = 0; i < options->tunable_count; ++i) {
        const kvflow_tunable& tu = options->tunables[i];
        if (tu.name == nullptr || tu.value == nullptr)
          return record(KVFLOW_EINVAL, ("options.tunables[" + std::to_string(i) + "]: name or value is null").c_str());
        o.tunables.emplace_back(tu.name, tu.value);
      }
      o.read_environment = options->read_environment != 0;
      o.worker_threads = options->worker_threads;
      o.auth_token = str_or(options->auth_token, "");
      o.auth_token_file = str_or(options->auth_token_file, "");
      o.tls_certificate = str_or(options->tls_certificate, "");
      o.tls_key = str_or(options->tls_key, "");
      o.tls_ca = str_or(options->tls_ca, "");
      o.allow_insecure_listen = options->allow_insecure_listen != 0;
      if (options->min_level < KVFLOW_LOG_TRACE || options->min_level > KVFLOW_LOG_OFF)
        return record(KVFLOW_EINVAL, ("options.min_level: not a KVFLOW_LOG_* value: " +
                                      std::to_string(options->min_level)).c_str());
      o.min_level = static_cast<kvflow::log_level>(options->min_level);
      if (options->log) {
        kvflow_log_fn fn = options->log;
        void* user = options->log_user;
        o.log = [fn, user](kvflow::log_level level, const std::string& text) {
          try {
            fn(user, static_cast<int>(level), text.c_str());
          } catch (...) {  // a C++ callback that throws: nothing to do with it here
          }
        };
      }
    }
    auto started = kvflow::node::start(topo, std::move(o));
    if (!started) return from_error(started.err());
    if (!started.value()) return record(KVFLOW_EINTERNAL, "kvflow: node::start returned no node");
    auto* h = new kvflow_node;
    h->node = std::move(started.value());
    *out = h;
    return succeed();
  });
}

int kvflow_node_address(const kvflow_node* node, char* buf, size_t len) noexcept {
  return guarded([&] {
    if (node == nullptr || buf == nullptr) return invalid("node and buf must not be null");
    const std::string a = node->node->address();
    if (a.size() + 1 > len) return invalid("buf: too small for the address");
    std::memcpy(buf, a.c_str(), a.size() + 1);
    return succeed();
  });
}

int kvflow_node_stop(kvflow_node* node) noexcept {
  return guarded([&] {
    if (node == nullptr) return invalid("node is null");
    node->node->stop();
    return succeed();
  });
}

int kvflow_node_destroy(kvflow_node* node) noexcept {
  return guarded([&] {
    if (node == nullptr) return succeed();
    std::unique_ptr<kvflow_node> owned(node);
    owned->node->stop();
    return succeed();
  });
}

int kvflow_node_add_prefill(kvflow_node* node, const kvflow_coords* where, const kvflow_buffer_desc* buffers,
                            size_t buffer_count, int layer_begin, int layer_end, kvflow_prefill** out) noexcept {
  return guarded([&] {
    if (out == nullptr) return invalid("out is null");
    *out = nullptr;
    if (node == nullptr) return invalid("node is null");
    if (where == nullptr) return invalid("where is null");
    kvflow::memory_desc m;
    if (int rc = to_memory(buffers, buffer_count, layer_begin, layer_end, m)) return rc;
    auto added = node->node->add_prefill(kvflow::coords{where->tp, where->cp, where->pp, where->dp}, m);
    if (!added) return from_error(added.err());
    if (!added.value()) return record(KVFLOW_EINTERNAL, "kvflow: add_prefill returned no rank");
    auto* h = new kvflow_prefill;
    h->node = node->node;
    h->rank = std::move(added.value());
    *out = h;
    return succeed();
  });
}

int kvflow_node_add_decode(kvflow_node* node, const kvflow_coords* where, const kvflow_buffer_desc* buffers,
                           size_t buffer_count, int layer_begin, int layer_end, kvflow_decode** out) noexcept {
  return guarded([&] {
    if (out == nullptr) return invalid("out is null");
    *out = nullptr;
    if (node == nullptr) return invalid("node is null");
    if (where == nullptr) return invalid("where is null");
    kvflow::memory_desc m;
    if (int rc = to_memory(buffers, buffer_count, layer_begin, layer_end, m)) return rc;
    auto added = node->node->add_decode(kvflow::coords{where->tp, where->cp, where->pp, where->dp}, m);
    if (!added) return from_error(added.err());
    if (!added.value()) return record(KVFLOW_EINTERNAL, "kvflow: add_decode returned no rank");
    auto* h = new kvflow_decode;
    h->node = node->node;
    h->rank = std::move(added.value());
    *out = h;
    return succeed();
  });
}

// ---- prefill ----------------------------------------------------------------------------
int kvflow_prefill_poll(kvflow_prefill* r, uint64_t step, int64_t wait_us, kvflow_round* out) noexcept {
  return guarded([&] { return poll_rank(r, step, wait_us, out); });
}

int kvflow_prefill_create(kvflow_prefill* r, kvflow_request_id id, int decode_dp) noexcept {
  return guarded([&] {
    if (r == nullptr) return invalid("rank is null");
    return from_error(r->rank->create(to_id(id), decode_dp));
  });
}

int kvflow_prefill_decode_prefix_pages(const kvflow_prefill* r, kvflow_request_id id, int* out_pages) noexcept {
  return guarded([&] {
    if (r == nullptr) return invalid("rank is null");
    if (out_pages == nullptr) return invalid("out_pages is null");
    *out_pages = 0;
    auto pages = r->rank->decode_prefix_pages(to_id(id));
    if (!pages) return from_error(pages.err());
    *out_pages = pages.value();
    return succeed();
  });
}

int kvflow_prefill_init(kvflow_prefill* r, kvflow_request_id id, int pages, int aux_row) noexcept {
  return guarded([&] {
    if (r == nullptr) return invalid("rank is null");
    return from_error(r->rank->init(to_id(id), pages, aux_row));
  });
}

int kvflow_prefill_send(kvflow_prefill* r, kvflow_request_id id, const int32_t* pages, size_t page_count,
                        int is_last, const int32_t* state_pages, size_t state_page_count,
                        uintptr_t ready_fence) noexcept {
  return guarded([&] {
    if (r == nullptr) return invalid("rank is null");
    std::vector<std::int32_t> p, s;
    if (!to_vector(pages, page_count, p)) return invalid("pages is null while page_count is not 0");
    if (!to_vector(state_pages, state_page_count, s))
      return invalid("state_pages is null while state_page_count is not 0");
    return from_error(r->rank->send(to_id(id), p, is_last != 0, s, ready_fence));
  });
}

int kvflow_prefill_abort(kvflow_prefill* r, kvflow_request_id id, const char* reason) noexcept {
  return guarded([&] { return abort_rank(r, id, reason); });
}

int kvflow_prefill_failure_reason(const kvflow_prefill* r, kvflow_request_id id, char* buf, size_t buf_size,
                                  size_t* needed) noexcept {
  return guarded([&] { return failure_reason(r, id, buf, buf_size, needed); });
}

int kvflow_prefill_clear(kvflow_prefill* r, kvflow_request_id id) noexcept {
  return guarded([&] { return clear_rank(r, id); });
}

int kvflow_prefill_stats(const kvflow_prefill* r, kvflow_rank_stats* out) noexcept {
  return guarded([&] { return rank_stats(r, out); });
}

int kvflow_prefill_global_rank(const kvflow_prefill* r, int* out) noexcept {
  return guarded([&] { return global_rank(r, out); });
}

int kvflow_prefill_lag(const kvflow_prefill* r, uint64_t* out) noexcept {
  return guarded([&] { return rank_lag(r, out); });
}

int kvflow_prefill_destroy(kvflow_prefill* r) noexcept {
  return guarded([&] {
    delete r;
    return succeed();
  });
}

// ---- decode -----------------------------------------------------------------------------
int kvflow_decode_poll(kvflow_decode* r, uint64_t step, int64_t wait_us, kvflow_round* out) noexcept {
  return guarded([&] { return poll_rank(r, step, wait_us, out); });
}

int kvflow_decode_create(kvflow_decode* r, kvflow_request_id id, int prefill_dp) noexcept {
  return guarded([&] {
    if (r == nullptr) return invalid("rank is null");
    return from_error(r->rank->create(to_id(id), prefill_dp));
  });
}

int kvflow_decode_send_destinations(kvflow_decode* r, kvflow_request_id id, const int32_t* pages,
                                    size_t page_count, int aux_slot, const int32_t* state_pages,
                                    size_t state_page_count, int prefix_pages) noexcept {
  return guarded([&] {
    if (r == nullptr) return invalid("rank is null");
    std::vector<std::int32_t> p, s;
    if (!to_vector(pages, page_count, p)) return invalid("pages is null while page_count is not 0");
    if (!to_vector(state_pages, state_page_count, s))
      return invalid("state_pages is null while state_page_count is not 0");
    return from_error(r->rank->send_destinations(to_id(id), p, aux_slot, s, prefix_pages));
  });
}

int kvflow_decode_abort(kvflow_decode* r, kvflow_request_id id, const char* reason) noexcept {
  return guarded([&] { return abort_rank(r, id, reason); });
}

int kvflow_decode_failure_reason(const kvflow_decode* r, kvflow_request_id id, char* buf, size_t buf_size,
                                 size_t* needed) noexcept {
  return guarded([&] { return failure_reason(r, id, buf, buf_size, needed); });
}

int kvflow_decode_clear(kvflow_decode* r, kvflow_request_id id) noexcept {
  return guarded([&] { return clear_rank(r, id); });
}

int kvflow_decode_stats(const kvflow_decode* r, kvflow_rank_stats* out) noexcept {
  return guarded([&] { return rank_stats(r, out); });
}

int kvflow_decode_global_rank(const kvflow_decode* r, int* out) noexcept {
  return guarded([&] { return global_rank(r, out); });
}

int kvflow_decode_lag(const kvflow_decode* r, uint64_t* out) noexcept {
  return guarded([&] { return rank_lag(r, out); });
}

int kvflow_decode_destroy(kvflow_decode* r) noexcept {
  return guarded([&] {
    delete r;
    return succeed();
  });
}

}  // extern "C"
