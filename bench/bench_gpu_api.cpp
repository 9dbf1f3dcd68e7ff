// `kvflow bench gpu`'s API rows: the whole path an engine sees. A prefill engine in this process
// and a decode engine in another (this binary again: `kvflow bench gpu --serve-api BOOTSTRAP`),
// each a node of the public API (include/kvflow/) over its own memory on the same GPU: one device
// buffer per layer (and one per layer of state when the model has state) holding a pool of pages
// for every request in flight, aux rows in host memory. Every request is in flight at once; at
// each scheduler step the prefill engine writes one chunk of each request with a fill kernel on
// its compute stream, records its CUDA event after it and hands that to send() as the ready fence.
// Both engines poll at a fixed cadence. The decode engine notes when its poll first shows each
// request Success, checks every byte on the GPU and reports back on its stdout (lines "api: ...").
// Printed beside the gather kernel's figure for one request, measured in the same run.
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "bench/bench.hpp"
#include "bench/bench_gpu_internal.hpp"
#include "command/child_process.hpp"
#include "command/percentile.hpp"
#include "config/topology.hpp"
#include "cuda/gpu.hpp"
#include "cuda/kernels.hpp"
#include "cuda/pattern_check.hpp"
#include "kvflow/kvflow.hpp"
#include "runtime/engine_host.hpp"
#include "transport/transport_set.hpp"

namespace kvflow::bench {

namespace {

using namespace kvflow::cuda;
using clock_type = std::chrono::steady_clock;
using std::chrono::microseconds;
using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr std::uint64_t aux_row_bytes = 64;
// The prefill node's transports whose bytes the rows report (transport_set members by name).
constexpr const char* member_names[] = {"cuda_ipc", "staged", "staged_ucx", "ucx", "inproc"};

kvflow::topology api_topology(const std::string& model) {
  kvflow::topology t;  // one prefill rank, one decode rank
  t.model = model;
  t.dtype = "fp8";
  t.page_size = 64;
  return t;
}

struct api_shape {
  std::string model;
  int tokens = 0;
  int layers = 0;
  std::uint64_t page_bytes = 0;        // KV of one page of one layer
  std::uint64_t state_page_bytes = 0;  // 0: the model has no state
  int pages = 0;                       // per request
  int chunk_pages = 0;
  int requests = 0;
  int pool_pages() const { return requests * pages; }
  int chunks() const { return (pages + chunk_pages - 1) / chunk_pages; }
  std::uint64_t kv_bytes_per_request() const { return std::uint64_t(layers) * std::uint64_t(pages) * page_bytes; }
  std::uint64_t state_bytes_per_request() const {
    return std::uint64_t(layers) * std::uint64_t(pages) * state_page_bytes;
  }
};

api_shape shape_of(const gpu_flags& f, int tokens) {
  const auto t = api_topology(f.api_model);
  auto c = runtime::to_cluster(t);
  if (!c) throw failure{"api-model: " + c.err().message()};
  if (c.value().model.kind != config::model_kind::mla)
    throw failure{"api-model: '" + f.api_model + "': the API rows take an MLA model (dsv32, mla:L:BYTES[:STATE])"};
  api_shape s;
  s.model = f.api_model;
  s.tokens = tokens;
  s.layers = c.value().model.layers;
  s.page_bytes = std::uint64_t(t.page_size) * std::uint64_t(c.value().model.mla_bytes_per_token);
  s.state_page_bytes = std::uint64_t(t.page_size) * std::uint64_t(c.value().model.state_bytes_per_token);
  s.pages = std::max(1, tokens / t.page_size);  // whole pages, as the other rows count them
  s.chunk_pages = std::max(1, f.api_chunk_tokens / t.page_size);
  s.requests = f.api_requests;
  if (std::uint64_t(s.requests) * std::uint64_t(s.pages) > INT32_MAX) throw failure{"api: the page pool is too large"};
  return s;
}

std::uint64_t address_of(const device_buffer& b) { return reinterpret_cast<std::uint64_t>(b.data()); }

// One engine's memory as it holds it: a device buffer per layer (and per layer of state), each a
// pool of every request's pages, and host aux rows (one per request).
struct api_memory {
  std::vector<device_buffer> kv, state;
  std::vector<std::byte> aux;
  kvflow::memory_desc desc;

  api_memory(const api_shape& s, int device) : aux(std::size_t(s.requests) * aux_row_bytes) {
    const auto pool = std::uint64_t(s.pool_pages());
    desc.layer_begin = 0;
    desc.layer_end = s.layers;
    auto add = [&](std::vector<device_buffer>& into, std::uint64_t page_bytes, kvflow::buffer_role role, int layer) {
      into.push_back(must(device_buffer::create(device, pool * page_bytes)));
      desc.buffers.push_back({into.back().data(), into.back().size(), page_bytes, role, layer,
                              kvflow::memory_kind::cuda, device});
    };
    for (int l = 0; l < s.layers; ++l) add(kv, s.page_bytes, kvflow::buffer_role::mla_latent, l);
    for (int l = 0; l < s.layers && s.state_page_bytes > 0; ++l)
      add(state, s.state_page_bytes, kvflow::buffer_role::state, l);
    desc.buffers.push_back({aux.data(), aux.size(), aux_row_bytes, kvflow::buffer_role::aux, -1});
  }
};

// One request's pages in an engine's pool (KV and, with state, state pages: one per request page).
struct request_pages {
  std::vector<std::int32_t> kv, state;
};

std::vector<std::int32_t> permutation(int n, std::uint64_t seed) {
  std::vector<std::int32_t> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(v.begin(), v.end(), rng);
  return v;
}

// Every request's pages: disjoint slices of one permutation of the pool, so each request's pages
// are scattered over it and no two requests in flight share a page.
std::vector<request_pages> assign_pages(const api_shape& s, std::uint64_t seed) {
  const auto kv = permutation(s.pool_pages(), seed);
  const auto st = permutation(s.state_page_bytes > 0 ? s.pool_pages() : 0, seed + 1);
  std::vector<request_pages> out(static_cast<std::size_t>(s.requests));
  for (int i = 0; i < s.requests; ++i) {
    const auto at = static_cast<std::ptrdiff_t>(i) * s.pages;
    out[std::size_t(i)].kv.assign(kv.begin() + at, kv.begin() + at + s.pages);
    if (!st.empty()) out[std::size_t(i)].state.assign(st.begin() + at, st.begin() + at + s.pages);
  }
  return out;
}

// The two engines draw their pages differently (a permutation each), from the token count.
std::uint64_t prefill_page_seed(int tokens) { return 0x70726566ull + std::uint64_t(tokens); }
std::uint64_t decode_page_seed(int tokens) { return 0x64656364ull + std::uint64_t(tokens); }

// Request i is room i + 1, incarnation 1; its bytes hold the pattern of its own seed.
kvflow::request_id id_of(int i) { return {std::uint64_t(i) + 1, 1}; }
std::uint64_t pattern_seed(const kvflow::request_id& id) { return 0x617069ull * 1000 + id.room; }
std::byte aux_value(const kvflow::request_id& id) { return static_cast<std::byte>(0x41 + id.room % 61); }

// The pattern runs of request pages [begin, end) in `m`: KV of every layer, then state, at logical
// offsets numbered layer-major over the whole request (all KV first, state after), so both engines
// number a request's bytes alike whichever pages hold them.
void append_runs(std::vector<pattern_run>& out, const api_memory& m, const api_shape& s, const request_pages& r,
                 int begin, int end) {
  const auto n = std::uint64_t(s.pages);
  for (int l = 0; l < s.layers; ++l)
    for (int i = begin; i < end; ++i)
      append_split(out, {address_of(m.kv[std::size_t(l)]) + std::uint64_t(r.kv[std::size_t(i)]) * s.page_bytes,
                         (std::uint64_t(l) * n + std::uint64_t(i)) * s.page_bytes, s.page_bytes});
  const std::uint64_t kv_total = s.kv_bytes_per_request();
  for (int l = 0; l < s.layers && s.state_page_bytes > 0; ++l)
    for (int i = begin; i < end; ++i)
      append_split(out, {address_of(m.state[std::size_t(l)]) + std::uint64_t(r.state[std::size_t(i)]) * s.state_page_bytes,
                         kv_total + (std::uint64_t(l) * n + std::uint64_t(i)) * s.state_page_bytes, s.state_page_bytes});
}

// CLOCK_MONOTONIC: one clock for every process of the host, so the decode process's Success times
// and this process's send times compare.
std::uint64_t monotonic_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::uint64_t(ts.tv_sec) * 1'000'000'000ull + std::uint64_t(ts.tv_nsec);
}

// A scheduler's fixed cadence: each step starts `interval` after the one before it started, or at
// once when that one ran over (no catching up).
class cadence {
 public:
  explicit cadence(microseconds interval) : interval_(interval), next_(clock_type::now()) {}
  void wait() {
    next_ += interval_;
    const auto now = clock_type::now();
    if (next_ <= now)
      next_ = now;
    else
      std::this_thread::sleep_until(next_);
  }

 private:
  microseconds interval_;
  clock_type::time_point next_;
};

void api_check(const kvflow::error& e, const std::string& what) {
  if (e) throw failure{what + ": " + e.message()};
}

// What a scheduler step's poll counts.
struct poll_counts {
  std::uint64_t step = 0;       // the last step polled
  std::uint64_t not_ready = 0;  // polls whose round was not agreed yet (the step polled again)
};

// One scheduler step: poll the next step without waiting. True with the agreed round in `out`;
// false when that round is not agreed yet (the same step is polled again at the next tick).
bool poll_once(kvflow::rank& r, poll_counts& c, kvflow::round_view& out, const char* who) {
  auto v = r.poll(c.step + 1, microseconds(0));
  if (v) {
    ++c.step;
    out = v.value();
    return true;
  }
  if (v.err().code() == kvflow::errc::not_ready || v.err().code() == kvflow::errc::timeout) {
    ++c.not_ready;
    return false;
  }
  throw failure{std::string(who) + " poll(" + std::to_string(c.step + 1) + "): " + v.err().message()};
}

// The rooms not yet done, with the state last seen (for a timeout's message).
template <class Request>
std::string pending_text(const std::vector<Request>& reqs) {
  std::string out;
  int listed = 0, left = 0;
  for (const auto& q : reqs) {
    if (q.done()) continue;
    ++left;
    if (listed++ < 8)
      out += (out.empty() ? "" : ", ") + std::string("room ") + std::to_string(q.id.room) + " " +
             (q.seen ? kvflow::to_string(q.last) : "not in a round yet");
  }
  if (left > listed) out += ", ...";
  return std::to_string(left) + " not done (" + out + ")";
}

std::string bytes_text(std::uint64_t b) {
  char buf[64];
  if (b >= 1'000'000'000ull)
    std::snprintf(buf, sizeof buf, "%.3f GB", double(b) / 1e9);
  else if (b >= 1'000'000ull)
    std::snprintf(buf, sizeof buf, "%.3f MB", double(b) / 1e6);
  else
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(b));
  return buf;
}

// ---- the decode engine (the child process) ------------------------------------------------

struct decode_request {
  kvflow::request_id id;
  bool seen = false, dst_sent = false, succeeded = false, cleared = false;
  kvflow::poll_state last = kvflow::poll_state::bootstrapping;
  std::uint64_t dst_step = 0, success_step = 0, success_ns = 0;
  bool done() const { return cleared; }
};

// ---- the prefill engine (this process) ----------------------------------------------------

struct prefill_request {
  kvflow::request_id id;
  bool seen = false, started = false, succeeded = false, released = false;
  kvflow::poll_state last = kvflow::poll_state::bootstrapping;
  int next_page = 0;  // request pages sent so far
  std::uint64_t first_send_ns = 0, first_send_step = 0, success_step = 0;
  bool done() const { return released; }
};

// What the decode process reported.
struct decode_report {
  std::map<std::uint64_t, std::uint64_t> success_ns;  // by room
  std::vector<double> steps_from_destinations;
  std::uint64_t wrong_bytes = 0, bad_aux_rows = 0, polls = 0, stalls = 0, not_ready = 0;
  bool verified_line = false, ended = false;
};

struct api_figures {
  api_shape shape;
  std::uint64_t kv_bytes = 0, state_bytes = 0, aux_bytes = 0;
  double wall_ms = 0;
  std::vector<double> latency_ms;
  std::vector<std::pair<std::string, std::uint64_t>> by_member;
  std::vector<double> prefill_steps, decode_steps;
  std::uint64_t prefill_polls = 0, prefill_stalls = 0, prefill_not_ready = 0;
  decode_report decode;
};

// The decode process: started with stdout and stdin piped; its protocol lines start with "api: ".
class decode_process {
 public:
  decode_process(const gpu_flags& f, const std::string& bootstrap, int tokens) {
    child_ = must(command::child_process::start(
        {command::self_executable(), "--log-level", "warn", "bench", "gpu", "--serve-api", bootstrap, "--device",
         std::to_string(f.device), "--tokens", std::to_string(tokens), "--api-requests", std::to_string(f.api_requests),
         "--api-chunk-tokens", std::to_string(f.api_chunk_tokens), "--api-step-us", std::to_string(f.api_step_us),
         "--api-model", f.api_model, "--api-timeout", std::to_string(f.api_timeout_s)},
        {}, true, true));
  }
  // The next protocol line (without "api: "), within `until`; other lines go to stderr. An
  // "error" line, an exit or a silence past `until` throws, naming what was awaited.
  std::string next(clock_type::time_point until, const std::string& awaiting) {
    for (;;) {
      const auto left = std::chrono::duration_cast<milliseconds>(until - clock_type::now());
      if (left.count() <= 0) throw failure{"the decode process: no " + awaiting + " in time"};
      auto line = child_.read_line(left);
      if (!line) throw failure{"the decode process, awaiting " + awaiting + ": " + line.error().reason() + exit_text()};
      if (line.value().rfind("api: ", 0) != 0) {
        std::fprintf(stderr, "bench gpu --serve-api: %s\n", line.value().c_str());
        continue;
      }
      auto text = line.value().substr(5);
      if (text.rfind("error ", 0) == 0) throw failure{"the decode process: " + text.substr(6) + exit_text()};
      return text;
    }
  }
  // Its exit code once it exited (without waiting), else -1.
  int exited() {
    if (code_ < 0)
      if (auto c = child_.wait(milliseconds(0))) code_ = c.value();
    return code_;
  }
  // Lets it stop (it waits for its stdin to close) and waits for its exit code.
  int finish(milliseconds timeout) {
    child_.close_input();
    if (code_ < 0) {
      auto c = child_.wait(timeout);
      if (!c) throw failure{"the decode process did not exit once told to"};
      code_ = c.value();
    }
    return code_;
  }

 private:
  std::string exit_text() {
    if (code_ < 0)
      if (auto c = child_.wait(seconds(5))) code_ = c.value();
    return code_ < 0 ? std::string{} : " (it exited " + std::to_string(code_) + ")";
  }
  command::child_process child_;  // killed and reaped by its destructor if still running
  int code_ = -1;
};

api_figures run_api(const gpu_flags& f, int tokens) {
  const api_shape s = shape_of(f, tokens);
  api_figures out;
  out.shape = s;
  // Declared before the node, so that the node (and its pushes) stops before the memory goes.
  api_memory pm(s, f.device);
  const auto pages = assign_pages(s, prefill_page_seed(tokens));
  auto forward = must(stream::create(f.device));  // the engine's compute stream
  auto written = must(event::create(f.device));   // its ready fence, recorded again for every chunk
  // Every chunk's fill list, uploaded once before the run, so that a step only queues kernels.
  std::vector<pattern_run> all;
  std::vector<std::vector<std::pair<std::size_t, std::size_t>>> chunk_runs(std::size_t(s.requests));
  for (int i = 0; i < s.requests; ++i)
    for (int b = 0; b < s.pages; b += s.chunk_pages) {
      const std::size_t first = all.size();
      append_runs(all, pm, s, pages[std::size_t(i)], b, std::min(s.pages, b + s.chunk_pages));
      chunk_runs[std::size_t(i)].push_back({first, all.size() - first});
    }
  auto fill_list = must(upload(all.data(), all.size() * sizeof(pattern_run), forward));
  const auto* fill_runs = reinterpret_cast<const pattern_run*>(fill_list.data());

  kvflow::node_options o;
  o.transport = "ucx";
  o.listen = "127.0.0.1:0";
  o.read_environment = true;
  auto started = kvflow::node::start(api_topology(s.model), o);
  if (!started) throw failure{"prefill node: " + started.err().message()};
  auto node = started.value();
  auto added = node->add_prefill({0, 0, 0, 0}, pm.desc);
  if (!added) throw failure{"add_prefill: " + added.err().message()};
  auto rank = added.value();
  auto& p = *rank;
  auto set = std::dynamic_pointer_cast<transport::transport_set>(runtime::transport_of(*node));
  std::vector<std::uint64_t> before;
  for (const char* name : member_names) {
    auto m = set ? set->member(name) : nullptr;
    before.push_back(m ? m->bytes_moved() : 0);
  }

  // The decode engine. Declared after the node: killed (if still running) before the node stops,
  // and the node, which hosts the registry, stops only after it exited.
  decode_process decode(f, node->address(), tokens);
  (void)decode.next(clock_type::now() + seconds(f.api_timeout_s), "ready line");

  std::vector<prefill_request> reqs(std::size_t(s.requests));
  for (int i = 0; i < s.requests; ++i) {
    reqs[std::size_t(i)].id = id_of(i);
    api_check(p.create(reqs[std::size_t(i)].id, 0), "prefill create");
  }
  // A few seconds past the decode engine's own timeout, so that its account of what it waits for
  // usually comes first.
  const auto deadline = clock_type::now() + seconds(f.api_timeout_s + 5);
  cadence tick(microseconds(f.api_step_us));
  poll_counts polls;
  kvflow::round_view round;
  int released = 0;
  while (released < s.requests) {
    if (clock_type::now() > deadline)
      throw failure{"the prefill engine, after " + std::to_string(f.api_timeout_s + 5) + " s: " + pending_text(reqs)};
    if (const int code = decode.exited(); code >= 0) {
      // It exits early only on a failure, which its last line names (next() throws with it).
      std::string why = "the decode process exited " + std::to_string(code) + " early";
      try {
        (void)decode.next(clock_type::now() + seconds(5), "report");
      } catch (const failure& e) {
        why = e.reason;
      }
      throw failure{why + "; prefill side: " + pending_text(reqs)};
    }
    if (poll_once(p, polls, round, "prefill")) {
      for (int i = 0; i < s.requests; ++i) {
        auto& q = reqs[std::size_t(i)];
        if (q.released) continue;
        const auto* e = round.find(q.id);
        if (e == nullptr) continue;
        q.seen = true;
        q.last = e->state;
        if (e->state == kvflow::poll_state::failed)
          throw failure{"room " + std::to_string(q.id.room) + " failed at the prefill engine: " + p.failure_reason(q.id)};
        if (!q.started && e->state >= kvflow::poll_state::waiting_for_input) {
          auto prefix = p.decode_prefix_pages(q.id);
          if (!prefix && prefix.err().code() != kvflow::errc::not_ready)
            throw failure{"decode_prefix_pages: " + prefix.err().message()};
          if (prefix && prefix.value() != 0)
            throw failure{"room " + std::to_string(q.id.room) + ": decode holds a prefix of " +
                          std::to_string(prefix.value()) + " pages; the bench sends none"};
          if (prefix) {
            api_check(p.init(q.id, s.pages, i), "init");
            q.started = true;
          }
        }
        if (q.started && q.next_page < s.pages) {
          // This step's chunk: the fill kernel writes its pages (and their state) on the compute
          // stream; the event recorded after it is the chunk's ready fence, which send() captures
          // at the call, so the same event is recorded again for the next chunk.
          const int b = q.next_page, end = std::min(s.pages, b + s.chunk_pages);
          const bool last = end == s.pages;
          const auto [first, count] = chunk_runs[std::size_t(i)][std::size_t(b / s.chunk_pages)];
          must(launch_fill(fill_runs + first, static_cast<std::uint32_t>(count), pattern_seed(q.id), 0, forward.handle()));
          must(written.record(forward));
          if (last)  // the request's first output, in its host aux row, goes after the last chunk
            std::memset(pm.aux.data() + std::size_t(i) * aux_row_bytes, std::to_integer<int>(aux_value(q.id)),
                        aux_row_bytes);
          const auto& mine = pages[std::size_t(i)];
          const std::vector<std::int32_t> chunk(mine.kv.begin() + b, mine.kv.begin() + end);
          if (b == 0) {
            q.first_send_ns = monotonic_ns();
            q.first_send_step = polls.step;
          }
          api_check(p.send(q.id, chunk, last, last ? mine.state : std::vector<std::int32_t>{},
                           reinterpret_cast<std::uintptr_t>(written.handle())),
                    "send");
          q.next_page = end;
        }
        if (e->state == kvflow::poll_state::success) {
          if (!q.succeeded) {
            q.succeeded = true;
            q.success_step = polls.step;
          }
          if (e->released) {
            api_check(p.clear(q.id), "prefill clear");  // a no-op: this round's poll forgot it already
            q.released = true;
            ++released;
          }
        }
      }
    }
    tick.wait();
  }
  for (std::size_t k = 0; k < std::size(member_names); ++k) {
    auto m = set ? set->member(member_names[k]) : nullptr;
    const std::uint64_t moved = m ? m->bytes_moved() - before[k] : 0;
    if (moved > 0) out.by_member.push_back({member_names[k], moved});
  }
  const auto stats = p.stats();
  out.prefill_polls = stats.polls;
  out.prefill_stalls = stats.stalls;
  out.prefill_not_ready = polls.not_ready;

  // The decode engine's report: "done ROOM SUCCESS_NS STEPS", then "verified WRONG_BYTES
  // BAD_AUX_ROWS POLLS STALLS NOT_READY", then "end".
  auto& rep = out.decode;
  const auto report_until = deadline + seconds(30);
  for (;;) {
    const auto text = decode.next(report_until, "report");
    std::istringstream in(text);
    std::string verb;
    in >> verb;
    if (verb == "done") {
      unsigned long long room = 0, ns = 0, steps = 0;
      if (!(in >> room >> ns >> steps)) throw failure{"the decode process: a malformed line '" + text + "'"};
      rep.success_ns[room] = ns;
      rep.steps_from_destinations.push_back(double(steps));
    } else if (verb == "verified") {
      unsigned long long wrong = 0, aux = 0, pl = 0, st = 0, nr = 0;
      if (!(in >> wrong >> aux >> pl >> st >> nr)) throw failure{"the decode process: a malformed line '" + text + "'"};
      rep.wrong_bytes = wrong;
      rep.bad_aux_rows = aux;
      rep.polls = pl;
      rep.stalls = st;
      rep.not_ready = nr;
      rep.verified_line = true;
    } else if (verb == "end") {
      break;
    }
  }
  if (const int code = decode.finish(seconds(30)); code != 0)
    throw failure{"the decode process exited " + std::to_string(code)};
  node->stop();
  must(forward.synchronize());

  if (!rep.verified_line) throw failure{"the decode process reported no verification"};
  if (rep.wrong_bytes != 0 || rep.bad_aux_rows != 0)
    throw failure{"API rows: " + std::to_string(rep.wrong_bytes) + " bytes differ on the decode GPU, " +
                  std::to_string(rep.bad_aux_rows) + " aux rows wrong"};
  std::uint64_t first = UINT64_MAX, last = 0;
  for (const auto& q : reqs) {
    auto it = rep.success_ns.find(q.id.room);
    if (it == rep.success_ns.end())
      throw failure{"the decode process reported no Success of room " + std::to_string(q.id.room)};
    first = std::min(first, q.first_send_ns);
    last = std::max(last, it->second);
    out.latency_ms.push_back((double(it->second) - double(q.first_send_ns)) / 1e6);
    out.prefill_steps.push_back(double(q.success_step - q.first_send_step));
  }
  out.decode_steps = rep.steps_from_destinations;
  out.wall_ms = (double(last) - double(first)) / 1e6;
  out.kv_bytes = s.kv_bytes_per_request() * std::uint64_t(s.requests);
  out.state_bytes = s.state_bytes_per_request() * std::uint64_t(s.requests);
  out.aux_bytes = aux_row_bytes * std::uint64_t(s.requests);
  return out;
}

double mean_of(const std::vector<double>& v) {
  return v.empty() ? 0 : std::accumulate(v.begin(), v.end(), 0.0) / double(v.size());
}
double max_of(const std::vector<double>& v) { return v.empty() ? 0 : *std::max_element(v.begin(), v.end()); }

}  // namespace

void api_gpu_rows(const gpu_flags& f, int tokens, double gather_ms, std::uint64_t gather_bytes) {
  const auto r = run_api(f, tokens);
  const auto& s = r.shape;
  const std::uint64_t total = r.kv_bytes + r.state_bytes + r.aux_bytes;
  const double gbps = r.wall_ms > 0 ? double(total) / (r.wall_ms * 1e6) : 0;
  const double gather_gbps = gather_ms > 0 ? double(gather_bytes) / (gather_ms * 1e6) : 0;
  std::printf("  kvflow API, prefill engine here, decode engine in another process, one GPU: %s, %d requests x %d "
              "tokens (%d pages) in flight at once, chunks of %d pages (each written by a fill kernel, its event the "
              "ready fence of one send() per request per step), both engines polling every %d us\n",
              s.model.c_str(), s.requests, s.tokens, s.pages, s.chunk_pages, f.api_step_us);
  std::string what = "KV " + bytes_text(r.kv_bytes);
  if (r.state_bytes > 0) what += ", state " + bytes_text(r.state_bytes);
  what += ", aux rows " + bytes_text(r.aux_bytes);
  std::printf("    moved %s (%s), first send() to the last Success the decode engine polled (fill kernels "
              "included) %9.3f ms  %8.1f GB/s  %.2fx gather kernel, list on device, one request (%.1f GB/s)  "
              "(bytes verified on the GPU)\n",
              bytes_text(total).c_str(), what.c_str(), r.wall_ms, gbps, gather_gbps > 0 ? gbps / gather_gbps : 0.0,
              gather_gbps);
  std::printf("    per request, its first send() to the decode engine's poll showing Success: p50 %.3f ms  max %.3f ms\n",
              command::percentile(r.latency_ms, 0.5), max_of(r.latency_ms));
  std::string members;
  for (const auto& [name, bytes] : r.by_member) members += (members.empty() ? "" : ", ") + name + " " + bytes_text(bytes);
  std::printf("    bytes each transport of the prefill node moved: %s\n", members.empty() ? "none" : members.c_str());
  std::printf("    poll steps per request (%d chunks): prefill, first send() to Success, mean %.1f max %.0f; decode, "
              "destinations to Success, mean %.1f max %.0f; polls prefill %llu decode %llu, stalls %llu / %llu, "
              "not agreed yet (polled again) %llu / %llu\n",
              s.chunks(), mean_of(r.prefill_steps), max_of(r.prefill_steps), mean_of(r.decode_steps),
              max_of(r.decode_steps), static_cast<unsigned long long>(r.prefill_polls),
              static_cast<unsigned long long>(r.decode.polls), static_cast<unsigned long long>(r.prefill_stalls),
              static_cast<unsigned long long>(r.decode.stalls), static_cast<unsigned long long>(r.prefill_not_ready),
              static_cast<unsigned long long>(r.decode.not_ready));
  std::fflush(stdout);
}

int serve_api_gpu(const gpu_flags& f, const std::string& bootstrap, int tokens) {
  auto say = [](const std::string& line) {
    std::printf("api: %s\n", line.c_str());
    std::fflush(stdout);
  };
  try {
    must(set_device(f.device));
    const api_shape s = shape_of(f, tokens);
    api_memory dm(s, f.device);  // declared before the node: outlives it
    const auto pages = assign_pages(s, decode_page_seed(tokens));
    auto check = must(stream::create(f.device));
    {
      // The pool holds another pattern first, so that only the transfers can make it verify.
      std::vector<pattern_run> all;
      for (const auto* bufs : {&dm.kv, &dm.state})
        for (const auto& b : *bufs) append_split(all, {address_of(b), 0, b.size()});
      auto list = must(fill_pattern(all, 0xBAD5EED, 0, check));
      must(check.synchronize());
    }
    kvflow::node_options o;
    o.transport = "ucx";
    o.bootstrap = bootstrap;
    o.read_environment = true;
    // kvflow's log lines to stderr: stdout carries the report.
    o.log = [](kvflow::log_level, const std::string& line) {
      std::fprintf(stderr, "bench gpu --serve-api: %s\n", line.c_str());
    };
    o.min_level = kvflow::log_level::warn;
    auto started = kvflow::node::start(api_topology(s.model), o);
    if (!started) throw failure{"decode node: " + started.err().message()};
    auto node = started.value();
    auto added = node->add_decode({0, 0, 0, 0}, dm.desc);
    if (!added) throw failure{"add_decode: " + added.err().message()};
    auto rank = added.value();
    auto& d = *rank;
    std::vector<decode_request> reqs(std::size_t(s.requests));
    for (int i = 0; i < s.requests; ++i) {
      reqs[std::size_t(i)].id = id_of(i);
      api_check(d.create(reqs[std::size_t(i)].id, 0), "decode create");
    }
    say("ready");

    const auto deadline = clock_type::now() + seconds(f.api_timeout_s);
    cadence tick(microseconds(f.api_step_us));
    poll_counts polls;
    kvflow::round_view round;
    int cleared = 0;
    while (cleared < s.requests) {
      if (clock_type::now() > deadline)
        throw failure{"the decode engine, after " + std::to_string(f.api_timeout_s) + " s: " + pending_text(reqs)};
      if (poll_once(d, polls, round, "decode")) {
        const std::uint64_t now = monotonic_ns();  // when this engine learnt what the round says
        for (int i = 0; i < s.requests; ++i) {
          auto& q = reqs[std::size_t(i)];
          if (q.cleared) continue;
          const auto* e = round.find(q.id);
          if (e == nullptr) continue;
          q.seen = true;
          q.last = e->state;
          if (e->state == kvflow::poll_state::failed)
            throw failure{"room " + std::to_string(q.id.room) + " failed at the decode engine: " + d.failure_reason(q.id)};
          if (e->state == kvflow::poll_state::waiting_for_input && !q.dst_sent) {
            const auto& mine = pages[std::size_t(i)];
            api_check(d.send_destinations(q.id, mine.kv, i, mine.state, 0), "send_destinations");
            q.dst_sent = true;
            q.dst_step = polls.step;
          }
          if (e->state == kvflow::poll_state::success) {
            if (!q.succeeded) {
              q.succeeded = true;
              q.success_ns = now;
              q.success_step = polls.step;
            }
            if (e->released) {
              api_check(d.clear(q.id), "decode clear");  // a no-op: this round's poll forgot it already
              q.cleared = true;
              ++cleared;
            }
          }
        }
      }
      tick.wait();
    }

    // Every byte of every request where it landed, on the GPU, and the aux rows on the host.
    std::uint64_t wrong = 0, bad_aux = 0;
    for (int i = 0; i < s.requests; ++i) {
      std::vector<pattern_run> runs;
      append_runs(runs, dm, s, pages[std::size_t(i)], 0, s.pages);
      wrong += must(count_mismatches(runs, pattern_seed(id_of(i)), check));
      const std::byte* row = dm.aux.data() + std::size_t(i) * aux_row_bytes;
      if (std::any_of(row, row + aux_row_bytes, [&](std::byte b) { return b != aux_value(id_of(i)); })) ++bad_aux;
    }
    for (const auto& q : reqs)
      say("done " + std::to_string(q.id.room) + " " + std::to_string(q.success_ns) + " " +
          std::to_string(q.success_step - q.dst_step));
    const auto stats = d.stats();
    say("verified " + std::to_string(wrong) + " " + std::to_string(bad_aux) + " " + std::to_string(stats.polls) + " " +
        std::to_string(stats.stalls) + " " + std::to_string(polls.not_ready));
    say("end");
    // The prefill process hosts the registry and is still stepping its rank: stop once it closes
    // our stdin.
    std::string line;
    while (std::getline(std::cin, line)) {
    }
    node->stop();
    return 0;
  } catch (const failure& e) {
    say("error " + e.reason);
    std::fprintf(stderr, "bench gpu --serve-api: %s\n", e.reason.c_str());
    return 1;
  }
}

}  // namespace kvflow::bench
