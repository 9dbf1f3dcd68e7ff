// Target kv_registration: a decode rank's registration (msg::kv_registration: its memory as
// remote_pool, its transport endpoint and regions), as a prefill rank receives it. What the
// prefill rank's handler runs on it is reachable: the wire version and rank checks, the
// handshake (handshake_mismatch against the sender's own configuration: refused exactly when a
// field differs), check_remote_pool, and the transport's connect (here the in-process transport, whose fabric
// holds the fixture decode rank's real regions; the UCX connect has a target of its own). A
// registration the checks accept is then planned against as send_chunk plans: a chunk of
// pages, the state pages and the aux row at the first and the last pages and rows the
// registration claims. Property: every block planned writes inside a buffer the registration
// describes; pushed, the transport refuses or lands it in the decode rank's registered memory.
// The fixture is the MHA one when the registration has two buffers per layer, else MLA.
#include <algorithm>

#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"
#include "tests/fuzz/handshake_check.hpp"
#include "tests/fuzz/plan_fixture.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

namespace {

// `count` consecutive indices from `first`, or none when they do not fit in [0, limit).
std::vector<std::int32_t> run_of(std::int64_t first, int count, std::int64_t limit) {
  std::vector<std::int32_t> v;
  if (first < 0 || count <= 0 || first + count > limit) return v;
  for (int i = 0; i < count; ++i) v.push_back(static_cast<std::int32_t>(first + i));
  return v;
}

void receive(const msg::kv_registration& reg) {
  const plan_fixture& f = reg.pool.buffers_per_layer == 2 ? mha_fixture() : mla_fixture();
  if (reg.version != msg::wire_version) return;
  if (reg.decode_rank < 0 || reg.decode_rank >= f.plan->decode_ranks()) return;
  if (!handshake_accepts(handshake_of(f.plan->config()), reg.shape)) return;
  if (!check_remote_pool(reg.pool)) return;
  const auto& pool = reg.pool;
  const bool connected = f.transport->connect(static_cast<std::uint64_t>(reg.decode_rank), reg.endpoint, reg.regions).ok();
  const auto layers = layers_to(f, pool);
  if (layers.empty()) return;  // send_chunk sends nothing then
  const aux_record receipt = make_receipt(3, 1);
  const int k = std::min(4, f.src.mem.pages());
  for (std::int64_t first : {std::int64_t{0}, std::int64_t{pool.pages} - k}) {
    const auto sp = run_of(0, k, f.src.mem.pages());
    const auto dp = run_of(first, k, pool.pages);
    std::vector<transport::block> blocks;
    if (!dp.empty())
      if (auto kv = plan_blocks(f.src.mem, pool, {&sp, &dp, layers, f.read.heads, f.mla, true})) {
        check_blocks(f, pool, kv.value(), nullptr);
        blocks = kv.value();
      }
    const auto ss = run_of(0, std::min(k, f.src.mem.state_pages()), f.src.mem.state_pages());
    const auto ds = run_of(std::int64_t{first == 0 ? 0 : pool.state_pages - std::int64_t(ss.size())}, static_cast<int>(ss.size()),
                           pool.state_pages);
    if (!ss.empty() && ds.size() == ss.size())
      if (auto st = plan_state_blocks(f.src.mem, pool, ss, ds, layers)) {
        check_blocks(f, pool, st.value(), nullptr);
        blocks.insert(blocks.end(), st.value().begin(), st.value().end());
      }
    const int row = first == 0 ? 0 : pool.aux_rows - 1;
    if (auto aux = plan_aux_blocks(f.src.mem, pool, 0, row, &receipt)) {
      check_blocks(f, pool, aux.value(), &receipt);
      blocks.insert(blocks.end(), aux.value().begin(), aux.value().end());
    }
    // Another decode rank's id, or regions it does not own: the transport refuses them here.
    if (connected && static_cast<std::uint64_t>(reg.decode_rank) == static_cast<std::uint64_t>(f.decode_rank))
      (void)push(f, blocks);
  }
}

msg::kv_registration registration(const plan_fixture& f) {
  msg::kv_registration r;
  r.decode_rank = f.decode_rank;
  r.dp = 0;
  r.pp = 0;
  r.tp = 0;
  r.tp_size = f.plan->config().decode.tp;
  r.pool = f.pool;
  r.decode = some_actor();
  r.regions = f.regions;
  r.shape = handshake_of(f.plan->config());
  return r;
}

}  // namespace

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::kv_registration> v{registration(mla_fixture()), registration(mha_fixture())};
  // One that described its memory at an offset inside larger regions, without state.
  auto shifted = registration(mla_fixture());
  for (auto& b : shifted.pool.kv) b.offset += 64;
  shifted.pool.state.clear();
  shifted.pool.state_pages = 0;
  v.push_back(shifted);
  // A decode rank configured with another page size (refused at the handshake).
  auto other = registration(mha_fixture());
  other.shape.page_size = 8;
  v.push_back(other);
  std::vector<bytes> out;
  for (auto& r : v) out.push_back(serialize(r));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::kv_registration>(data, size, [](const msg::kv_registration& r) { receive(r); });
}
