// kvflow embedded in two processes, on its public headers alone: this process runs a prefill
// node that hosts the bootstrap registry (listening on 127.0.0.1, any port) and starts itself
// again as the decode process, which joins that registry. Each process owns its KV memory and
// drives its own rank with its own scheduler loop; the KV crosses processes over UCX. The decode
// process checks the bytes where they landed. Prints OK and exits 0 when both succeeded.
//
//   embedded_two_process                 prefill (and starts the decode process)
//   embedded_two_process decode ADDRESS  decode, joining the registry at ADDRESS
#include <kvflow/kvflow.hpp>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>

#include "embedded_common.hpp"

using namespace example;

namespace {

constexpr int kDeadlineSeconds = 30;

kvflow::topology topology() {
  kvflow::topology topo;
  topo.model = "mla:2:64";
  topo.dtype = "bf16";
  topo.page_size = 16;
  return topo;
}

kvflow::node_options options(const char* bootstrap) {
  kvflow::node_options o;
  o.transport = "ucx";
  if (bootstrap != nullptr)
    o.bootstrap = bootstrap;
  else
    o.listen = "127.0.0.1:0";
  o.worker_threads = 2;
  // A lost message fails the request inside the run instead of stalling it.
  o.tunables = {{"KVFLOW_BOOTSTRAP_TIMEOUT_MS", "20000"}, {"KVFLOW_WAITING_TIMEOUT_MS", "20000"}};
  o.log = log_line;
  o.min_level = kvflow::log_level::warn;
  return o;
}

// One rank's scheduler loop for the request: poll every step, act on the agreed round, until
// the request is agreed Success and released. `act` runs once, at the agreed WaitingForInput.
template <class Rank, class Act>
int drive(Rank& rank, const char* name, const kvflow::request_id& id, Act act) {
  const auto deadline = clock_type::now() + std::chrono::seconds(kDeadlineSeconds);
  bool acted = false;
  std::string last = "absent", why;
  for (std::uint64_t k = 1;; ++k) {
    if (clock_type::now() > deadline) return fail(std::string(name) + ": not done in time, last " + last);
    auto v = poll_step(rank, k, deadline);
    if (!v) return fail(std::string(name) + " poll(" + std::to_string(k) + ")", v.err());
    if (!check_round(v.value(), k, rank.lag(), name, why)) return fail(why);
    const kvflow::room_poll* e = v->find(id);
    if (e == nullptr) continue;
    last = std::string(kvflow::to_string(e->state)) + (e->released ? "+released" : "");
    if (e->state == kvflow::poll_state::failed) return fail(std::string(name) + ": failed: " + rank.failure_reason(id));
    if (e->state == kvflow::poll_state::waiting_for_input && !acted) {
      if (auto err = act()) return fail(std::string(name) + ": acting on WaitingForInput", err);
      acted = true;
    }
    if (e->state == kvflow::poll_state::success && e->released) {
      std::printf("%s: request %llu done at step %llu\n", name, static_cast<unsigned long long>(id.room),
                  static_cast<unsigned long long>(k));
      return 0;
    }
  }
}

const kvflow::request_id kRequest{7, 1};

int run_decode(const char* bootstrap) {
  rank_memory mem(false);  // outlives the node
  auto n = kvflow::node::start(topology(), options(bootstrap));
  if (!n) return fail("decode node::start", n.err());
  auto d = n.value()->add_decode(kvflow::coords{0, 0, 0, 0}, mem.desc());
  if (!d) return fail("add_decode", d.err());
  auto& decode = *d.value();
  if (auto e = decode.create(kRequest, 0)) return fail("decode create", e);
  int rc = drive(decode, "decode", kRequest, [&] { return decode.send_destinations(kRequest, kDecodePages, kDecodeAuxSlot); });
  if (rc == 0) {
    const rank_memory sent(true);  // what the prefill process's memory holds
    if (auto wrong = check_landed(mem, sent); !wrong.empty()) rc = fail("decode: " + wrong);
  }
  n.value()->stop();
  return rc;
}

int run_prefill(const char* self) {
  rank_memory mem(true);
  auto n = kvflow::node::start(topology(), options(nullptr));
  if (!n) return fail("prefill node::start", n.err());
  const std::string address = n.value()->address();
  if (address.empty()) return fail("a listening node has no address");
  auto p = n.value()->add_prefill(kvflow::coords{0, 0, 0, 0}, mem.desc());
  if (!p) return fail("add_prefill", p.err());
  auto& prefill = *p.value();
  if (auto e = prefill.create(kRequest, 0)) return fail("prefill create", e);

  const pid_t child = ::fork();
  if (child < 0) return fail(std::string("fork: ") + std::strerror(errno));
  if (child == 0) {
    ::execl(self, self, "decode", address.c_str(), static_cast<char*>(nullptr));
    static const char msg[] = "FAIL: exec of the decode process\n";  // only async-signal-safe calls here
    [[maybe_unused]] auto w = ::write(2, msg, sizeof msg - 1);
    ::_exit(127);
  }
  int rc = drive(prefill, "prefill", kRequest, [&]() -> kvflow::error {
    if (auto e = prefill.init(kRequest, kRequestPages, kPrefillAuxRow)) return e;
    return prefill.send(kRequest, kPrefillPages, true);
  });
  // The registry lives in this process: stop only once the decode process is done with it.
  int status = 0;
  while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
  const int decode_rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  n.value()->stop();
  if (decode_rc != 0) return fail("the decode process exited " + std::to_string(decode_rc));
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if (argc == 3 && std::string(argv[1]) == "decode") return run_decode(argv[2]);
  if (argc != 1) {
    std::fprintf(stderr, "usage: %s [decode BOOTSTRAP_ADDRESS]\n", argv[0]);
    return 2;
  }
  int rc = run_prefill("/proc/self/exe");
  if (rc == 0) std::printf("OK\n");
  return rc;
}
