// Target dst_info: a decode rank's destinations for one request (msg::dst_info), as a prefill
// rank receives them. The checks accept_dst runs first are in prefill_rank.cpp's anonymous
// namespace (not reachable from here); what runs is the planning every destination goes
// through before a byte moves (actors/block_plan.hpp), against the fixtures' real
// registrations, as send_chunk plans it: the sender's CP share of the pages after the prefix,
// the state indices and the aux slot. Each plan must be accepted exactly when every index is
// inside what the decode rank registered, every planned block must write inside a registered
// buffer, and the blocks are then pushed through the in-process transport into the real memory.
#include <algorithm>

#include "actors/messages.hpp"
#include "tests/fuzz/fuzz_support.hpp"
#include "tests/fuzz/plan_fixture.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

namespace {

bool all_below(const std::vector<std::int32_t>& v, std::int64_t limit) {
  return std::all_of(v.begin(), v.end(), [&](std::int32_t p) { return p >= 0 && p < limit; });
}

std::uint64_t total_len(const std::vector<transport::block>& blocks) {
  std::uint64_t n = 0;
  for (const auto& b : blocks) n += b.len;
  return n;
}

void plan(const plan_fixture& f, const msg::dst_info& d) {
  const auto& pool = f.pool;
  const auto& cfg = f.plan->config();
  const auto layers = layers_to(f, pool);
  const int n = static_cast<int>(d.dst_pages.size());
  const int prefix = std::clamp(d.prefix_pages, 0, n);
  config::range part{prefix, n};
  if (f.read.cp_share) {
    const auto share = config::cp_share(n, cfg.prefill.cp, f.plan->prefill(f.prefill_rank).coord.cp);
    part = {std::max(part.begin, share.begin), std::min(part.end, share.end)};
  }
  std::vector<transport::block> all;
  bool planned = true;
  if (!part.empty()) {
    std::vector<std::int32_t> sp, dp(d.dst_pages.begin() + part.begin, d.dst_pages.begin() + part.end);
    for (int i = 0; i < part.size(); ++i) sp.push_back(i % f.src.mem.pages());
    auto kv = plan_blocks(f.src.mem, pool, {&sp, &dp, layers, f.read.heads, f.mla, true});
    if (kv.ok() != all_below(dp, pool.pages))
      fail(std::string("plan_blocks ") + (kv.ok() ? "accepted" : "refused (" + kv.error().reason() + ")") +
           " destination pages that are " + (kv.ok() ? "not " : "") + "all registered");
    planned = planned && kv.ok();
    if (kv) {
      check_blocks(f, pool, kv.value(), nullptr);
      // One block per page moves the same bytes as the coalesced runs.
      auto each = plan_blocks(f.src.mem, pool, {&sp, &dp, layers, f.read.heads, f.mla, false});
      if (!each || total_len(each.value()) != total_len(kv.value())) fail("uncoalesced plan differs");
      all = std::move(kv.value());
    }
  }
  if (f.mla && !d.state_indices.empty()) {
    // The state part (its own indices, the same positions as the pages), as the last chunk plans it.
    std::vector<std::int32_t> ds = d.state_indices;
    if (static_cast<int>(ds.size()) == n) {
      ds.clear();
      if (!part.empty()) ds.assign(d.state_indices.begin() + part.begin, d.state_indices.begin() + part.end);
    }
    std::vector<std::int32_t> ss;
    for (std::size_t i = 0; i < ds.size(); ++i) ss.push_back(static_cast<std::int32_t>(i % f.src.mem.state_pages()));
    auto st = plan_state_blocks(f.src.mem, pool, ss, ds, layers);
    if (!ds.empty() && st.ok() != all_below(ds, pool.state_pages))
      fail(std::string("plan_state_blocks ") + (st.ok() ? "accepted" : "refused") + " state indices that are " +
           (st.ok() ? "not " : "") + "all registered");
    planned = planned && st.ok();
    if (st) {
      check_blocks(f, pool, st.value(), nullptr);
      all.insert(all.end(), st.value().begin(), st.value().end());
    }
  }
  const aux_record receipt = make_receipt(d.room, d.incarnation);
  auto aux = plan_aux_blocks(f.src.mem, pool, 0, d.aux_slot, &receipt);
  if (aux.ok() != (d.aux_slot >= 0 && d.aux_slot < pool.aux_rows))
    fail(std::string("plan_aux_blocks ") + (aux.ok() ? "accepted" : "refused") + " aux slot " +
         std::to_string(d.aux_slot) + " of " + std::to_string(pool.aux_rows));
  planned = planned && aux.ok();
  if (aux) {
    check_blocks(f, pool, aux.value(), &receipt);
    all.insert(all.end(), aux.value().begin(), aux.value().end());
  }
  // What planned lies in registered buffers, so the transport must take it whole.
  if (planned)
    if (auto s = push(f, all); !s) fail("push of planned blocks refused: " + s.reason());
}

msg::dst_info destinations(std::uint64_t room, std::vector<std::int32_t> pages, std::vector<std::int32_t> state,
                           std::int32_t aux_slot, std::int32_t prefix) {
  msg::dst_info d;
  d.room = room;
  d.incarnation = room * 7 + 1;
  d.decode_rank = 0;
  d.dst_pages = std::move(pages);
  d.state_indices = std::move(state);
  d.aux_slot = aux_slot;
  d.prefix_pages = prefix;
  return d;
}

}  // namespace

std::vector<bytes> kvflow::fuzz::seeds() {
  const auto& m = mla_fixture().pool;
  const auto& h = mha_fixture().pool;
  std::vector<msg::dst_info> v{
      destinations(1, {0, 1, 2, 3, 4, 5, 6, 7}, {8, 9, 10, 11, 12, 13, 14, 15}, 1, 2),
      destinations(2, {m.pages - 1, 3, 4, 9}, {}, m.aux_rows - 1, 0),
      destinations(3, {5, 6, 9}, {}, 0, 1),
      destinations(4, {h.pages - 2, h.pages - 1}, {}, h.aux_rows - 1, 0),
  };
  std::vector<bytes> out;
  for (auto& d : v) out.push_back(serialize(d));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::dst_info>(data, size, [](const msg::dst_info& d) {
    plan(mla_fixture(), d);
    plan(mha_fixture(), d);
  });
}
