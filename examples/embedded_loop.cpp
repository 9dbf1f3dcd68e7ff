// kvflow embedded, on its public headers alone (find_package(kvflow), kvflow::kvflow): a node with one
// prefill and one decode rank over host memory this program owns, one request driven through
// them as a serving engine's scheduler would (a poll per rank per step, acting on the agreed
// round), and the KV and aux bytes checked where they landed. Prints OK and exits 0 on success.
#include <kvflow/kvflow.hpp>
// Both public headers in one translation unit, in either order.
#include <kvflow/kvflow.h>

#include "embedded_common.hpp"

static_assert(KVFLOW_API_VERSION == 1, "KVFLOW_API_VERSION");
static_assert(KVFLOW_EINVAL == static_cast<int>(kvflow::errc::invalid_argument), "errc");
static_assert(KVFLOW_EINTERNAL == static_cast<int>(kvflow::errc::internal), "errc");

using namespace example;

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // what it printed survives a kill by the test's timeout
  kvflow::topology topo;
  topo.prefill.tp = 1;
  topo.prefill.cp = 1;
  topo.decode.tp = 1;
  topo.model = "mla:2:64";
  topo.dtype = "bf16";
  topo.page_size = 16;

  kvflow::node_options options;
  options.worker_threads = 2;
  // A lost message fails the request inside the 20 s of the run instead of stalling it.
  options.tunables = {{"KVFLOW_BOOTSTRAP_TIMEOUT_MS", "15000"}, {"KVFLOW_WAITING_TIMEOUT_MS", "15000"}};
  options.log = log_line;
  options.min_level = kvflow::log_level::warn;

  // An invalid topology is an error value, not an exception or an exit.
  {
    kvflow::topology bad = topo;
    bad.page_size = 0;
    auto n = kvflow::node::start(bad, options);
    if (n) return fail("node::start accepted page_size 0");
    if (n.err().code() != kvflow::errc::invalid_argument)
      return fail("node::start(page_size 0) is not invalid_argument", n.err());
  }

  // The engine's memory outlives the node and its ranks (declared first, destroyed last).
  rank_memory pmem(true), dmem(false);
  const rank_memory pmem_before = pmem;

  auto started = kvflow::node::start(topo, options);
  if (!started) return fail("node::start", started.err());
  std::shared_ptr<kvflow::node> node = started.value();

  auto p = node->add_prefill(kvflow::coords{0, 0, 0, 0}, pmem.desc());
  if (!p) return fail("add_prefill", p.err());
  auto d = node->add_decode(kvflow::coords{0, 0, 0, 0}, dmem.desc());
  if (!d) return fail("add_decode", d.err());
  kvflow::prefill_rank& prefill = *p.value();
  kvflow::decode_rank& decode = *d.value();
  if (prefill.global_rank() != 0 || decode.global_rank() != 0)
    return fail("global ranks " + std::to_string(prefill.global_rank()) + ", " + std::to_string(decode.global_rank()));
  const std::uint64_t plag = prefill.lag(), dlag = decode.lag();

  const kvflow::request_id id{42, 1};
  if (auto e = prefill.create(id, 0)) return fail("prefill create", e);
  if (auto e = decode.create(id, 0)) return fail("decode create", e);

  side ps{"prefill"}, ds{"decode"};
  const auto deadline = clock_type::now() + std::chrono::seconds(20);
  std::uint64_t k = 0;
  std::string why;
  while (!(ps.done && ds.done)) {
    ++k;
    if (clock_type::now() > deadline)
      return fail("not done after 20 s (step " + std::to_string(k) + "): prefill " + ps.last + ", decode " + ds.last);

    auto pr = poll_step(prefill, k, deadline);
    if (!pr) return fail("prefill poll(" + std::to_string(k) + ")", pr.err());
    if (!check_round(pr.value(), k, plag, "prefill", why)) return fail(why);
    if (const kvflow::room_poll* e = pr->find(id)) {
      ps.last = std::string(kvflow::to_string(e->state)) + (e->released ? "+released" : "");
      if (e->state == kvflow::poll_state::failed)
        return fail("prefill: the request failed: " + prefill.failure_reason(id));
      if (e->state >= kvflow::poll_state::transferring && !ps.acted)
        return fail("prefill: " + ps.last + " before init/send");
      if (e->state == kvflow::poll_state::waiting_for_input && !ps.acted) {
        auto prefix = prefill.decode_prefix_pages(id);
        if (!prefix) return fail("decode_prefix_pages", prefix.err());
        if (prefix.value() != 0) return fail("decode_prefix_pages: " + std::to_string(prefix.value()) + ", want 0");
        if (auto err = prefill.init(id, kRequestPages, kPrefillAuxRow)) return fail("prefill init", err);
        if (auto err = prefill.send(id, kPrefillPages, true)) return fail("prefill send", err);
        ps.acted = true;
      }
      if (e->state == kvflow::poll_state::success && e->released) ps.done = true;
    }

    auto dr = poll_step(decode, k, deadline);
    if (!dr) return fail("decode poll(" + std::to_string(k) + ")", dr.err());
    if (!check_round(dr.value(), k, dlag, "decode", why)) return fail(why);
    if (const kvflow::room_poll* e = dr->find(id)) {
      ds.last = std::string(kvflow::to_string(e->state)) + (e->released ? "+released" : "");
      if (e->state == kvflow::poll_state::failed)
        return fail("decode: the request failed: " + decode.failure_reason(id));
      if (e->state >= kvflow::poll_state::transferring && !ds.acted)
        return fail("decode: " + ds.last + " before send_destinations");
      if (e->state == kvflow::poll_state::waiting_for_input && !ds.acted) {
        if (auto err = decode.send_destinations(id, kDecodePages, kDecodeAuxSlot)) return fail("send_destinations", err);
        ds.acted = true;
      }
      if (e->state == kvflow::poll_state::success && e->released) ds.done = true;
    }
  }
  std::printf("request %llu done at step %llu (lag %llu/%llu)\n", static_cast<unsigned long long>(id.room),
              static_cast<unsigned long long>(k), static_cast<unsigned long long>(plag),
              static_cast<unsigned long long>(dlag));

  // The bytes where they landed; the prefill memory not written.
  if (auto wrong = check_landed(dmem, pmem); !wrong.empty()) return fail(wrong);
  if (pmem.kv != pmem_before.kv || pmem.aux != pmem_before.aux) return fail("the prefill memory was written");

  if (!prefill.failure_reason(id).empty()) return fail("a failure reason for a request that succeeded");
  if (auto e = prefill.clear(id)) return fail("prefill clear", e);
  if (auto e = decode.clear(id)) return fail("decode clear", e);
  if (auto e = prefill.clear(id)) return fail("prefill clear (again: idempotent)", e);

  const kvflow::rank_stats psx = prefill.stats(), dsx = decode.stats();
  std::printf("prefill: created %llu succeeded %llu failed %llu bytes_sent %llu polls %llu stalls %llu live %llu\n",
              static_cast<unsigned long long>(psx.created), static_cast<unsigned long long>(psx.succeeded),
              static_cast<unsigned long long>(psx.failed), static_cast<unsigned long long>(psx.bytes_sent),
              static_cast<unsigned long long>(psx.polls), static_cast<unsigned long long>(psx.stalls),
              static_cast<unsigned long long>(psx.live_requests));
  std::printf("decode: created %llu succeeded %llu failed %llu polls %llu stalls %llu live %llu\n",
              static_cast<unsigned long long>(dsx.created), static_cast<unsigned long long>(dsx.succeeded),
              static_cast<unsigned long long>(dsx.failed), static_cast<unsigned long long>(dsx.polls),
              static_cast<unsigned long long>(dsx.stalls), static_cast<unsigned long long>(dsx.live_requests));
  if (psx.created != 1 || psx.succeeded != 1 || psx.failed != 0 || dsx.created != 1 || dsx.succeeded != 1 ||
      dsx.failed != 0)
    return fail("the stats do not count one request created and succeeded on each rank");
  if (psx.bytes_sent < kLayers * kRequestPages * kPageBytes)
    return fail("prefill bytes_sent " + std::to_string(psx.bytes_sent) + " < the request's KV");

  node->stop();
  if (auto e = prefill.create(kvflow::request_id{43, 0}, 0); !e || e.code() != kvflow::errc::unavailable)
    return fail("create after stop is not unavailable", e);
  std::printf("OK\n");
  return 0;
}
