/* kvflow embedded through kvflow.h (C99) alone; tests/install builds it with CMake's kvflow::kvflow and
 * with `cc $(pkg-config --cflags --libs kvflow)`. The same run as embedded_loop.cpp: a node with one
 * prefill and one decode rank over host memory this program owns, one request driven through
 * them step by step, and the KV and aux bytes checked where they landed. Prints OK, exits 0. */
#define _POSIX_C_SOURCE 200809L
#include <kvflow/kvflow.h>

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* model mla:2:64, page_size 16: 2 layers of 64 B per token, 1024 B per page. */
#define LAYERS 2
#define PAGES 8 /* pages per layer buffer */
#define PAGE_BYTES (64 * 16)
#define AUX_ROWS 4
#define AUX_ROW_BYTES 64
#define REQUEST_PAGES 4
#define PREFILL_AUX_ROW 0
#define DECODE_AUX_SLOT 1

static const int32_t prefill_pages[REQUEST_PAGES] = {0, 1, 2, 3};
static const int32_t decode_pages[REQUEST_PAGES] = {4, 5, 6, 7};

typedef struct rank_memory {
  unsigned char* kv[LAYERS];
  unsigned char* aux;
  kvflow_buffer_desc buffers[LAYERS + 1];
} rank_memory;

static unsigned char kv_byte(int layer, int page, size_t i) {
  return (unsigned char)((layer * 131 + page * 29 + i * 7 + 3) & 0xff);
}
static unsigned char aux_byte(int row, size_t i) { return (unsigned char)((0xa0 + row * 16 + i * 3) & 0xff); }

static int fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("FAIL: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  return 1;
}

/* A kvflow call that must succeed. */
static int check(int rc, const char* what) {
  if (rc == KVFLOW_OK) return 0;
  return fail("%s: %s (%d): %s", what, kvflow_errc_string(rc), rc, kvflow_last_error());
}

static int memory_init(rank_memory* m, int prefill) {
  int l, p, r;
  size_t i;
  memset(m, 0, sizeof *m);
  for (l = 0; l < LAYERS; ++l) {
    m->kv[l] = malloc((size_t)PAGES * PAGE_BYTES);
    if (!m->kv[l]) return fail("out of memory");
    for (p = 0; p < PAGES; ++p)
      for (i = 0; i < PAGE_BYTES; ++i) m->kv[l][(size_t)p * PAGE_BYTES + i] = prefill ? kv_byte(l, p, i) : 0xee;
    m->buffers[l].base = m->kv[l];
    m->buffers[l].bytes = (uint64_t)PAGES * PAGE_BYTES;
    m->buffers[l].page_bytes = PAGE_BYTES;
    m->buffers[l].role = KVFLOW_BUFFER_MLA_LATENT;
    m->buffers[l].layer = l;
    m->buffers[l].kind = KVFLOW_MEMORY_HOST;
    m->buffers[l].device = -1;
  }
  m->aux = malloc((size_t)AUX_ROWS * AUX_ROW_BYTES);
  if (!m->aux) return fail("out of memory");
  for (r = 0; r < AUX_ROWS; ++r)
    for (i = 0; i < AUX_ROW_BYTES; ++i) m->aux[(size_t)r * AUX_ROW_BYTES + i] = prefill ? aux_byte(r, i) : 0x5a;
  m->buffers[LAYERS].base = m->aux;
  m->buffers[LAYERS].bytes = (uint64_t)AUX_ROWS * AUX_ROW_BYTES;
  m->buffers[LAYERS].page_bytes = AUX_ROW_BYTES;
  m->buffers[LAYERS].role = KVFLOW_BUFFER_AUX;
  m->buffers[LAYERS].layer = -1;
  m->buffers[LAYERS].kind = KVFLOW_MEMORY_HOST;
  m->buffers[LAYERS].device = -1;
  return 0;
}

static void memory_free(rank_memory* m) {
  int l;
  for (l = 0; l < LAYERS; ++l) free(m->kv[l]);
  free(m->aux);
}

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static const kvflow_room_poll* find_room(const kvflow_round* v, kvflow_request_id id) {
  size_t i;
  for (i = 0; i < v->count; ++i)
    if (v->rooms[i].room == id.room && v->rooms[i].incarnation == id.incarnation) return &v->rooms[i];
  return NULL;
}

static void log_line(void* user, int level, const char* text) {
  fprintf(stderr, "kvflow[%d] (%s): %s\n", level, (const char*)user, text);
}

/* What the scheduler of one rank saw of the request. */
typedef struct side {
  int acted; /* prefill: init + send; decode: send_destinations */
  int done;  /* agreed Success and released */
  int last;  /* last agreed state seen, -1 before */
} side;

/* poll(k): a late round is waited for again (the same step) until the deadline. */
static int poll_prefill(kvflow_prefill* r, uint64_t k, double deadline, kvflow_round* out) {
  for (;;) {
    int rc = kvflow_prefill_poll(r, k, 100000, out);
    if (rc != KVFLOW_ETIMEOUT && rc != KVFLOW_ENOTREADY) return rc;
    if (now_seconds() > deadline) return rc;
  }
}
static int poll_decode(kvflow_decode* r, uint64_t k, double deadline, kvflow_round* out) {
  for (;;) {
    int rc = kvflow_decode_poll(r, k, 100000, out);
    if (rc != KVFLOW_ETIMEOUT && rc != KVFLOW_ENOTREADY) return rc;
    if (now_seconds() > deadline) return rc;
  }
}

static int check_round(const kvflow_round* v, uint64_t k, uint64_t lag, const char* name) {
  uint64_t want = k > lag ? k - lag : 0;
  if (v->step != k || v->round != want)
    return fail("%s: poll(%llu) answered step %llu round %llu, want round %llu", name, (unsigned long long)k,
                (unsigned long long)v->step, (unsigned long long)v->round, (unsigned long long)want);
  if (v->count != 0 && v->rooms == NULL) return fail("%s: %zu rooms at NULL", name, v->count);
  return 0;
}

static int run(rank_memory* pmem, rank_memory* dmem) {
  kvflow_topology topo;
  kvflow_node_options options;
  kvflow_tunable tunables[2];
  kvflow_node* node = NULL;
  kvflow_prefill* prefill = NULL;
  kvflow_decode* decode = NULL;
  kvflow_coords where = {0, 0, 0, 0};
  kvflow_request_id id = {42, 1}, other = {43, 0};
  kvflow_round round;
  kvflow_rank_stats ps_stats, ds_stats;
  side ps = {0, 0, -1}, ds = {0, 0, -1};
  uint64_t k = 0, plag = 0, dlag = 0;
  int rank = -1, prefix = -1, rc, l, j, r;
  size_t i, needed = 0;
  char reason[256];
  double deadline;
  const kvflow_room_poll* e;

  if (check(kvflow_topology_init(&topo), "kvflow_topology_init")) return 1;
  topo.prefill_tp = 1;
  topo.prefill_cp = 1;
  topo.decode_tp = 1;
  topo.model = "mla:2:64";
  topo.dtype = "bf16";
  topo.page_size = 16;
  if (check(kvflow_node_options_init(&options), "kvflow_node_options_init")) return 1;
  if (options.min_level != KVFLOW_LOG_WARN) return fail("default min_level %d", options.min_level);
  /* A lost message fails the request inside the 20 s of the run instead of stalling it. */
  tunables[0].name = "KVFLOW_BOOTSTRAP_TIMEOUT_MS";
  tunables[0].value = "15000";
  tunables[1].name = "KVFLOW_WAITING_TIMEOUT_MS";
  tunables[1].value = "15000";
  options.tunables = tunables;
  options.tunable_count = 2;
  options.worker_threads = 2;
  options.log = log_line;
  options.log_user = "consumer.c";
  options.min_level = KVFLOW_LOG_WARN;

  /* Errors are codes with a message; nothing starts. */
  if (kvflow_node_start(NULL, &options, &node) != KVFLOW_EINVAL || node != NULL || kvflow_last_error()[0] == '\0')
    return fail("kvflow_node_start(NULL topology) is not KVFLOW_EINVAL with a message");
  topo.page_size = 0;
  rc = kvflow_node_start(&topo, &options, &node);
  if (rc != KVFLOW_EINVAL || node != NULL)
    return fail("kvflow_node_start(page_size 0) answered %d (%s), not KVFLOW_EINVAL", rc, kvflow_last_error());
  printf("page_size 0: %s\n", kvflow_last_error());
  topo.page_size = 16;

  if (check(kvflow_node_start(&topo, &options, &node), "kvflow_node_start")) return 1;
  if (kvflow_last_error()[0] != '\0') return fail("kvflow_last_error after a success: %s", kvflow_last_error());
  if (check(kvflow_node_add_prefill(node, &where, pmem->buffers, LAYERS + 1, 0, LAYERS, &prefill),
            "kvflow_node_add_prefill"))
    return 1;
  if (check(kvflow_node_add_decode(node, &where, dmem->buffers, LAYERS + 1, 0, LAYERS, &decode),
            "kvflow_node_add_decode"))
    return 1;
  if (check(kvflow_prefill_global_rank(prefill, &rank), "kvflow_prefill_global_rank")) return 1;
  if (rank != 0) return fail("prefill global rank %d", rank);
  if (check(kvflow_decode_global_rank(decode, &rank), "kvflow_decode_global_rank")) return 1;
  if (rank != 0) return fail("decode global rank %d", rank);
  if (check(kvflow_prefill_lag(prefill, &plag), "kvflow_prefill_lag")) return 1;
  if (check(kvflow_decode_lag(decode, &dlag), "kvflow_decode_lag")) return 1;

  if (check(kvflow_prefill_create(prefill, id, 0), "kvflow_prefill_create")) return 1;
  if (check(kvflow_decode_create(decode, id, 0), "kvflow_decode_create")) return 1;

  deadline = now_seconds() + 20.0;
  while (!(ps.done && ds.done)) {
    ++k;
    if (now_seconds() > deadline)
      return fail("not done after 20 s (step %llu): prefill %s, decode %s", (unsigned long long)k,
                  kvflow_poll_state_string(ps.last), kvflow_poll_state_string(ds.last));

    if (check(poll_prefill(prefill, k, deadline, &round), "kvflow_prefill_poll")) return 1;
    if (check_round(&round, k, plag, "prefill")) return 1;
    if ((e = find_room(&round, id)) != NULL) {
      ps.last = e->state;
      if (e->state == KVFLOW_POLL_FAILED) {
        kvflow_prefill_failure_reason(prefill, id, reason, sizeof reason, &needed);
        return fail("prefill: the request failed: %s", reason);
      }
      if (e->state >= KVFLOW_POLL_TRANSFERRING && !ps.acted)
        return fail("prefill: %s before init/send", kvflow_poll_state_string(e->state));
      if (e->state == KVFLOW_POLL_WAITING_FOR_INPUT && !ps.acted) {
        if (check(kvflow_prefill_decode_prefix_pages(prefill, id, &prefix), "kvflow_prefill_decode_prefix_pages"))
          return 1;
        if (prefix != 0) return fail("decode prefix pages %d, want 0", prefix);
        if (check(kvflow_prefill_init(prefill, id, REQUEST_PAGES, PREFILL_AUX_ROW), "kvflow_prefill_init")) return 1;
        if (check(kvflow_prefill_send(prefill, id, prefill_pages, REQUEST_PAGES, 1, NULL, 0, 0), "kvflow_prefill_send"))
          return 1;
        ps.acted = 1;
      }
      if (e->state == KVFLOW_POLL_SUCCESS && e->released) ps.done = 1;
    }

    if (check(poll_decode(decode, k, deadline, &round), "kvflow_decode_poll")) return 1;
    if (check_round(&round, k, dlag, "decode")) return 1;
    if ((e = find_room(&round, id)) != NULL) {
      ds.last = e->state;
      if (e->state == KVFLOW_POLL_FAILED) {
        kvflow_decode_failure_reason(decode, id, reason, sizeof reason, &needed);
        return fail("decode: the request failed: %s", reason);
      }
      if (e->state >= KVFLOW_POLL_TRANSFERRING && !ds.acted)
        return fail("decode: %s before send_destinations", kvflow_poll_state_string(e->state));
      if (e->state == KVFLOW_POLL_WAITING_FOR_INPUT && !ds.acted) {
        if (check(kvflow_decode_send_destinations(decode, id, decode_pages, REQUEST_PAGES, DECODE_AUX_SLOT, NULL, 0, 0),
                  "kvflow_decode_send_destinations"))
          return 1;
        ds.acted = 1;
      }
      if (e->state == KVFLOW_POLL_SUCCESS && e->released) ds.done = 1;
    }
  }
  printf("request %llu done at step %llu (lag %llu/%llu)\n", (unsigned long long)id.room, (unsigned long long)k,
         (unsigned long long)plag, (unsigned long long)dlag);

  /* The bytes: prefill pages 0..3 of every layer in decode pages 4..7, decode pages 0..3 untouched,
   * prefill aux row 0 in decode aux row 1 and no other row written; prefill memory unchanged. */
  for (l = 0; l < LAYERS; ++l)
    for (j = 0; j < REQUEST_PAGES; ++j) {
      if (memcmp(dmem->kv[l] + (size_t)decode_pages[j] * PAGE_BYTES, pmem->kv[l] + (size_t)prefill_pages[j] * PAGE_BYTES,
                 PAGE_BYTES) != 0)
        return fail("layer %d: decode page %d does not hold prefill page %d", l, decode_pages[j], prefill_pages[j]);
      for (i = 0; i < PAGE_BYTES; ++i)
        if (dmem->kv[l][(size_t)j * PAGE_BYTES + i] != 0xee) return fail("layer %d: decode page %d was written", l, j);
    }
  for (l = 0; l < LAYERS; ++l)
    for (j = 0; j < PAGES; ++j)
      for (i = 0; i < PAGE_BYTES; ++i)
        if (pmem->kv[l][(size_t)j * PAGE_BYTES + i] != kv_byte(l, j, i)) return fail("prefill memory was written");
  if (memcmp(dmem->aux + (size_t)DECODE_AUX_SLOT * AUX_ROW_BYTES, pmem->aux + (size_t)PREFILL_AUX_ROW * AUX_ROW_BYTES,
             AUX_ROW_BYTES) != 0)
    return fail("decode aux row %d does not hold prefill aux row %d", DECODE_AUX_SLOT, PREFILL_AUX_ROW);
  for (r = 0; r < AUX_ROWS; ++r)
    for (i = 0; r != DECODE_AUX_SLOT && i < AUX_ROW_BYTES; ++i)
      if (dmem->aux[(size_t)r * AUX_ROW_BYTES + i] != 0x5a) return fail("decode aux row %d was written", r);

  /* failure_reason of a request that succeeded: "" (one byte with its NUL), also into no buffer. */
  if (check(kvflow_prefill_failure_reason(prefill, id, reason, sizeof reason, &needed), "failure_reason")) return 1;
  if (needed != 1 || reason[0] != '\0') return fail("failure reason of a success: '%s' (needed %zu)", reason, needed);
  if (check(kvflow_decode_failure_reason(decode, id, NULL, 0, &needed), "failure_reason(NULL, 0)")) return 1;
  if (needed != 1) return fail("failure reason of a success needs %zu bytes", needed);

  if (check(kvflow_prefill_clear(prefill, id), "kvflow_prefill_clear")) return 1;
  if (check(kvflow_decode_clear(decode, id), "kvflow_decode_clear")) return 1;
  if (check(kvflow_prefill_clear(prefill, id), "kvflow_prefill_clear (again: idempotent)")) return 1;

  if (check(kvflow_prefill_stats(prefill, &ps_stats), "kvflow_prefill_stats")) return 1;
  if (check(kvflow_decode_stats(decode, &ds_stats), "kvflow_decode_stats")) return 1;
  printf("prefill: created %llu succeeded %llu failed %llu bytes_sent %llu polls %llu stalls %llu\n",
         (unsigned long long)ps_stats.created, (unsigned long long)ps_stats.succeeded,
         (unsigned long long)ps_stats.failed, (unsigned long long)ps_stats.bytes_sent,
         (unsigned long long)ps_stats.polls, (unsigned long long)ps_stats.stalls);
  printf("decode: created %llu succeeded %llu failed %llu polls %llu stalls %llu\n",
         (unsigned long long)ds_stats.created, (unsigned long long)ds_stats.succeeded,
         (unsigned long long)ds_stats.failed, (unsigned long long)ds_stats.polls, (unsigned long long)ds_stats.stalls);
  if (ps_stats.created != 1 || ps_stats.succeeded != 1 || ps_stats.failed != 0 || ds_stats.created != 1 ||
      ds_stats.succeeded != 1 || ds_stats.failed != 0)
    return fail("the stats do not count one request created and succeeded on each rank");
  if (ps_stats.bytes_sent < (uint64_t)LAYERS * REQUEST_PAGES * PAGE_BYTES)
    return fail("prefill bytes_sent %llu < the request's KV", (unsigned long long)ps_stats.bytes_sent);

  /* Bad arguments are KVFLOW_EINVAL, with a message. */
  if (kvflow_prefill_send(prefill, other, NULL, 2, 1, NULL, 0, 0) != KVFLOW_EINVAL || kvflow_last_error()[0] == '\0')
    return fail("kvflow_prefill_send(NULL pages, 2) is not KVFLOW_EINVAL with a message");
  if (kvflow_decode_poll(decode, k + 1, 0, NULL) != KVFLOW_EINVAL) return fail("kvflow_decode_poll(NULL out)");

  {
    char address[64] = "x";
    if (check(kvflow_node_address(node, address, sizeof address), "kvflow_node_address")) return 1;
    if (address[0] != '\0') return fail("a one-process node has an address");
    if (kvflow_node_address(node, address, 0) != KVFLOW_EINVAL) return fail("kvflow_node_address into 0 bytes");
  }
  if (check(kvflow_node_stop(node), "kvflow_node_stop")) return 1;
  rc = kvflow_prefill_create(prefill, other, 0);
  if (rc != KVFLOW_EUNAVAILABLE) return fail("create after stop answered %d (%s), not KVFLOW_EUNAVAILABLE", rc, kvflow_last_error());
  if (check(kvflow_prefill_destroy(prefill), "kvflow_prefill_destroy")) return 1;
  if (check(kvflow_decode_destroy(decode), "kvflow_decode_destroy")) return 1;
  if (check(kvflow_node_destroy(node), "kvflow_node_destroy")) return 1;
  if (check(kvflow_node_destroy(NULL), "kvflow_node_destroy(NULL)")) return 1;
  return 0;
}

int main(void) {
  rank_memory pmem, dmem;
  int rc;
  setvbuf(stdout, NULL, _IOLBF, 0); /* what it printed survives a kill by the test's timeout */
  if (kvflow_api_version() != KVFLOW_API_VERSION)
    return fail("kvflow_api_version() %d, built with KVFLOW_API_VERSION %d", kvflow_api_version(), KVFLOW_API_VERSION);
  if (memory_init(&pmem, 1) || memory_init(&dmem, 0)) return 1;
  /* The memory outlives the node and its ranks: run() destroys them before it returns (on the
   * success path; on failure the process exits). */
  rc = run(&pmem, &dmem);
  if (rc == 0) {
    memory_free(&pmem);
    memory_free(&dmem);
    printf("OK\n");
  }
  return rc;
}
