/* kvflow's embedding API for C (C99; also usable from C++). The same calls as kvflow.hpp, over
 * opaque handles, with plain structs and int error codes:
 *
 *   kvflow_topology t; kvflow_topology_init(&t); t.model = "mla:2:64"; ...
 *   kvflow_node* node; if (kvflow_node_start(&t, NULL, &node)) puts(kvflow_last_error());
 *   kvflow_prefill* p; kvflow_node_add_prefill(node, &where, buffers, n, 0, layers, &p);
 *   kvflow_prefill_create(p, id, decode_dp); ... kvflow_prefill_poll(p, step, -1, &round);
 *
 * Apart from kvflow_api_version, kvflow_last_error and the *_string calls, every call returns
 * KVFLOW_OK (0) or an error code (the values of kvflow::errc) and sets the calling thread's last
 * error message (kvflow_last_error: "" after a call that succeeded). No call lets a C++ exception
 * out (an unexpected one answers KVFLOW_EINTERNAL). Threads: as in kvflow.hpp, every call may come
 * from the engine's scheduler thread; calls on one rank handle must not run concurrently (a poll's
 * room array is the handle's until its next poll). */
#ifndef KVFLOW_H
#define KVFLOW_H

#include <stddef.h>
#include <stdint.h>

#ifndef KVFLOW_API_VERSION
#define KVFLOW_API_VERSION 1 /* the same value as kvflow.hpp's */
#endif

#if defined(__cplusplus) && __cplusplus >= 201103L
#define KVFLOW_NOEXCEPT noexcept
#elif defined(__cplusplus)
#define KVFLOW_NOEXCEPT throw()
#else
#define KVFLOW_NOEXCEPT
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- errors (kvflow::errc) ---------------------------------------------------------------- */
#define KVFLOW_OK 0
#define KVFLOW_EINVAL 1        /* a malformed call (the message names the argument) */
#define KVFLOW_ENOTFOUND 2     /* no such request on this rank */
#define KVFLOW_EEXIST 3        /* a live request holds the room already */
#define KVFLOW_ENOTREADY 4     /* poll: the round is not complete yet (wait 0), or a call came too early */
#define KVFLOW_ETIMEOUT 5      /* poll: the round did not complete within the wait */
#define KVFLOW_EUNSUPPORTED 6  /* not available in this build or mode */
#define KVFLOW_EUNAVAILABLE 7  /* the node or rank stopped, or its group was lost */
#define KVFLOW_EINTERNAL 8

/* KVFLOW_API_VERSION of the library (compare with the macro the program was built with). */
int kvflow_api_version(void) KVFLOW_NOEXCEPT;
/* The message of this thread's last kvflow call that returned a code ("" when it succeeded).
 * Valid until this thread's next such call. Never NULL. */
const char* kvflow_last_error(void) KVFLOW_NOEXCEPT;
/* The name of an error code / poll state ("unknown" when out of range). Static strings. */
const char* kvflow_errc_string(int code) KVFLOW_NOEXCEPT;
const char* kvflow_poll_state_string(int state) KVFLOW_NOEXCEPT;

/* ---- handles ------------------------------------------------------------------------------ */
typedef struct kvflow_node kvflow_node;
typedef struct kvflow_prefill kvflow_prefill;
typedef struct kvflow_decode kvflow_decode;

/* ---- the cluster -------------------------------------------------------------------------- */
typedef struct kvflow_topology {
  int prefill_tp, prefill_cp, prefill_pp, prefill_dp;
  int decode_tp, decode_dp, decode_pp;
  const char* model; /* dsv32 | mla:LAYERS:BYTES[:STATE] | mha:LAYERS:KV_HEADS:HEAD_DIM; NULL: dsv32 */
  const char* dtype; /* fp8 | bf16; NULL: fp8 */
  int page_size;     /* tokens per page */
  int cp_send_all;   /* nonzero: every CP rank sends a share of the pages (else CP rank 0) */
} kvflow_topology;

/* Fills the defaults of kvflow::topology (every size 1, model and dtype NULL, page_size 64). */
int kvflow_topology_init(kvflow_topology* t) KVFLOW_NOEXCEPT;

/* Where a rank sits: attention TP, CP, PP stage, DP group. Decode ranks have cp 0. */
typedef struct kvflow_coords {
  int tp, cp, pp, dp;
} kvflow_coords;

#define KVFLOW_MEMORY_HOST 0
#define KVFLOW_MEMORY_CUDA 1

#define KVFLOW_BUFFER_K 0
#define KVFLOW_BUFFER_V 1
#define KVFLOW_BUFFER_MLA_LATENT 2
#define KVFLOW_BUFFER_AUX 3
#define KVFLOW_BUFFER_STATE 4

/* One buffer of the engine's KV memory (kvflow::buffer_desc): `bytes` at `base`, in pages of
 * `page_bytes` (page i at base + i * page_bytes). KV and state buffers name their global layer;
 * aux buffers (layer -1) hold rows, one per aux slot. The memory must outlive the rank. */
typedef struct kvflow_buffer_desc {
  void* base;
  uint64_t bytes;
  uint64_t page_bytes;
  int role;   /* KVFLOW_BUFFER_* */
  int layer;  /* global layer (k, v, mla_latent, state); -1 for aux */
  int kind;   /* KVFLOW_MEMORY_* */
  int device; /* CUDA device id when kind is KVFLOW_MEMORY_CUDA, else -1 */
} kvflow_buffer_desc;

/* ---- the node ----------------------------------------------------------------------------- */
#define KVFLOW_LOG_TRACE 0
#define KVFLOW_LOG_DEBUG 1
#define KVFLOW_LOG_INFO 2
#define KVFLOW_LOG_WARN 3
#define KVFLOW_LOG_ERROR 4
#define KVFLOW_LOG_OFF 6

/* Receives kvflow's log lines from any thread; `text` is valid during the call only. */
typedef void (*kvflow_log_fn)(void* user, int level, const char* text);

typedef struct kvflow_tunable {
  const char* name;  /* a KVFLOW_* variable name (see `kvflow --help`) */
  const char* value;
} kvflow_tunable;

typedef struct kvflow_node_options {
  /* HOST:PORT of the bootstrap registry this node joins. NULL or "": this node hosts the
   * registry; with `listen` unset too, every rank of the cluster lives in this process. */
  const char* bootstrap;
  /* HOST:PORT this node accepts other nodes on (port 0: any; see kvflow_node_address). NULL:
   * none, unless it joins a registry (then 127.0.0.1:0). Either address needs transport ucx. */
  const char* listen;
  const char* transport; /* inproc | ucx; NULL: inproc */
  const kvflow_tunable* tunables; /* `tunable_count` pairs; unset tunables keep their defaults */
  size_t tunable_count;
  int read_environment; /* nonzero: read KVFLOW_* from the process environment as well */
  int worker_threads;   /* actor scheduler threads (0: one per core, at most 4) */
  kvflow_log_fn log;    /* NULL: kvflow logs nothing */
  void* log_user;       /* passed to `log` */
  int min_level;        /* KVFLOW_LOG_*; default KVFLOW_LOG_WARN */
  /* Node links, as kvflow::node_options: a cluster token (or a file holding it) every peer must
   * prove, TLS files for mutual TLS, and leave to listen beyond loopback with neither. NULL:
   * none (or, with read_environment, the KVFLOW_AUTH_TOKEN... variables). */
  const char* auth_token;
  const char* auth_token_file;
  const char* tls_certificate;
  const char* tls_key;
  const char* tls_ca;
  int allow_insecure_listen;
} kvflow_node_options;

/* Fills the defaults of kvflow::node_options (everything NULL/0, min_level KVFLOW_LOG_WARN). */
int kvflow_node_options_init(kvflow_node_options* o) KVFLOW_NOEXCEPT;

/* Starts a node (kvflow::node::start): validates the topology (the message names the field),
 * starts the actor system and, without a bootstrap address, the registry. `options` NULL: the
 * defaults. On success *out is the node's handle; else *out is NULL. */
int kvflow_node_start(const kvflow_topology* t, const kvflow_node_options* options,
                      kvflow_node** out) KVFLOW_NOEXCEPT;
/* The HOST:PORT other nodes reach this one at (its bootstrap address when it hosts the
 * registry), NUL-terminated into `buf` of `len` bytes; "" for a one-process node.
 * KVFLOW_EINVAL when it does not fit. */
int kvflow_node_address(const kvflow_node* node, char* buf, size_t len) KVFLOW_NOEXCEPT;
/* Stops every rank and the actor system; ranks answer KVFLOW_EUNAVAILABLE afterwards. */
int kvflow_node_stop(kvflow_node* node) KVFLOW_NOEXCEPT;
/* Stops the node and frees its handle (NULL: nothing). Rank handles stay valid to destroy. */
int kvflow_node_destroy(kvflow_node* node) KVFLOW_NOEXCEPT;

/* Adds the prefill / decode rank at `where` over the engine's memory: `buffer_count` buffers and
 * the layers [layer_begin, layer_end) of its pipeline stage. */
int kvflow_node_add_prefill(kvflow_node* node, const kvflow_coords* where,
                            const kvflow_buffer_desc* buffers, size_t buffer_count,
                            int layer_begin, int layer_end, kvflow_prefill** out) KVFLOW_NOEXCEPT;
int kvflow_node_add_decode(kvflow_node* node, const kvflow_coords* where,
                           const kvflow_buffer_desc* buffers, size_t buffer_count,
                           int layer_begin, int layer_end, kvflow_decode** out) KVFLOW_NOEXCEPT;

/* ---- requests and rounds ------------------------------------------------------------------ */
#define KVFLOW_POLL_FAILED 0
#define KVFLOW_POLL_BOOTSTRAPPING 1
#define KVFLOW_POLL_WAITING_FOR_INPUT 2
#define KVFLOW_POLL_TRANSFERRING 3
#define KVFLOW_POLL_SUCCESS 4

/* A request: its room and which use of the room it is (0 when the engine does not tell). */
typedef struct kvflow_request_id {
  uint64_t room;
  uint64_t incarnation;
} kvflow_request_id;

/* A room's agreed state in one round (kvflow::room_poll). */
typedef struct kvflow_room_poll {
  uint64_t room;
  uint64_t incarnation;
  int state;    /* KVFLOW_POLL_* */
  int released; /* nonzero: the group let go of the request's memory; its pages may be reused */
} kvflow_room_poll;

/* The agreed round of a poll (kvflow::round_view): identical on every rank of the group for the
 * same step. `rooms` (sorted by room, incarnation) is valid until the next poll on that rank. */
typedef struct kvflow_round {
  uint64_t step;  /* the step polled */
  uint64_t round; /* step - lag (0: before the first round: no rooms) */
  const kvflow_room_poll* rooms;
  size_t count;
} kvflow_round;

/* What one rank did (kvflow::rank_stats). */
typedef struct kvflow_rank_stats {
  uint64_t created, succeeded, failed, aborted;
  uint64_t bytes_sent;      /* prefill: payload pushed to decode ranks */
  double transfer_seconds;  /* prefill: summed push time */
  uint64_t polls, stalls;   /* stalls: polls that had to wait for their round */
  uint64_t live_requests;   /* known to the rank, not yet cleared */
  uint64_t quarantined;     /* decode: failed requests whose pages are still held */
  uint64_t pushes_in_flight; /* prefill: handed to the transport, not completed */
} kvflow_rank_stats;

/* ---- prefill ranks ------------------------------------------------------------------------ */
/* Posts this rank's step-`step` report (steps start at 1 and rise by one) and fills *out with the
 * agreed round step - lag. `wait_us` < 0: wait the KVFLOW_POLL_WAIT_US tunable. When the round
 * does not complete in time: KVFLOW_ETIMEOUT (KVFLOW_ENOTREADY with wait 0); poll the same step
 * again. On error *out holds `step`, round 0 and no rooms. */
int kvflow_prefill_poll(kvflow_prefill* r, uint64_t step, int64_t wait_us,
                        kvflow_round* out) KVFLOW_NOEXCEPT;
/* The request enters the bootstrap queue; `decode_dp`: the decode dp group that will send its
 * destinations. */
int kvflow_prefill_create(kvflow_prefill* r, kvflow_request_id id, int decode_dp) KVFLOW_NOEXCEPT;
/* After an agreed WaitingForInput: the pages decode already holds (not to be sent). */
int kvflow_prefill_decode_prefix_pages(const kvflow_prefill* r, kvflow_request_id id,
                                       int* out_pages) KVFLOW_NOEXCEPT;
/* Before the first chunk: the request's pages after the decode prefix, and the row of this rank's
 * aux buffers holding its first output. */
int kvflow_prefill_init(kvflow_prefill* r, kvflow_request_id id, int pages, int aux_row) KVFLOW_NOEXCEPT;
/* A chunk's KV was written into `pages` (`page_count` page indices of this rank, in request order;
 * an empty last chunk is legal: pages may be NULL when page_count is 0). `state_pages`: on the last
 * chunk, one per request page when the model has state (NULL, 0 otherwise). `ready_fence`: opaque
 * handle of the write's completion (a CUDA event); 0: already written. */
int kvflow_prefill_send(kvflow_prefill* r, kvflow_request_id id, const int32_t* pages,
                        size_t page_count, int is_last, const int32_t* state_pages,
                        size_t state_page_count, uintptr_t ready_fence) KVFLOW_NOEXCEPT;
/* `reason` NULL: "". */
int kvflow_prefill_abort(kvflow_prefill* r, kvflow_request_id id, const char* reason) KVFLOW_NOEXCEPT;
/* Why the request failed ("" when it did not): copies it, NUL-terminated and truncated to fit,
 * into `buf` (`buf_size` bytes; buf may be NULL when buf_size is 0) and sets *needed (may be NULL)
 * to the size that holds it whole, terminating NUL included. */
int kvflow_prefill_failure_reason(const kvflow_prefill* r, kvflow_request_id id, char* buf,
                                  size_t buf_size, size_t* needed) KVFLOW_NOEXCEPT;
/* Forgets a request the group agreed terminal and released (idempotent). */
int kvflow_prefill_clear(kvflow_prefill* r, kvflow_request_id id) KVFLOW_NOEXCEPT;
int kvflow_prefill_stats(const kvflow_prefill* r, kvflow_rank_stats* out) KVFLOW_NOEXCEPT;
int kvflow_prefill_global_rank(const kvflow_prefill* r, int* out) KVFLOW_NOEXCEPT;
int kvflow_prefill_lag(const kvflow_prefill* r, uint64_t* out) KVFLOW_NOEXCEPT;
/* Frees the handle (NULL: nothing). */
int kvflow_prefill_destroy(kvflow_prefill* r) KVFLOW_NOEXCEPT;

/* ---- decode ranks ------------------------------------------------------------------------- */
int kvflow_decode_poll(kvflow_decode* r, uint64_t step, int64_t wait_us,
                       kvflow_round* out) KVFLOW_NOEXCEPT;
/* The request enters the pre-allocation queue; `prefill_dp`: the prefill dp group serving it. */
int kvflow_decode_create(kvflow_decode* r, kvflow_request_id id, int prefill_dp) KVFLOW_NOEXCEPT;
/* After an agreed WaitingForInput: where the request's KV goes. `pages`: one entry per request
 * page (the first `prefix_pages` are cached here already and not sent); `aux_slot`: the row of
 * this rank's aux buffers; `state_pages`: one per page when the model has state (NULL, 0 else). */
int kvflow_decode_send_destinations(kvflow_decode* r, kvflow_request_id id, const int32_t* pages,
                                    size_t page_count, int aux_slot, const int32_t* state_pages,
                                    size_t state_page_count, int prefix_pages) KVFLOW_NOEXCEPT;
/* Fails the request on every prefill peer; its pages stay quarantined (released 0) until every
 * peer acknowledged that its writes drained, or was disconnected. `reason` NULL: "". */
int kvflow_decode_abort(kvflow_decode* r, kvflow_request_id id, const char* reason) KVFLOW_NOEXCEPT;
int kvflow_decode_failure_reason(const kvflow_decode* r, kvflow_request_id id, char* buf,
                                 size_t buf_size, size_t* needed) KVFLOW_NOEXCEPT;
int kvflow_decode_clear(kvflow_decode* r, kvflow_request_id id) KVFLOW_NOEXCEPT;
int kvflow_decode_stats(const kvflow_decode* r, kvflow_rank_stats* out) KVFLOW_NOEXCEPT;
int kvflow_decode_global_rank(const kvflow_decode* r, int* out) KVFLOW_NOEXCEPT;
int kvflow_decode_lag(const kvflow_decode* r, uint64_t* out) KVFLOW_NOEXCEPT;
int kvflow_decode_destroy(kvflow_decode* r) KVFLOW_NOEXCEPT;

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVFLOW_H */
