// actors/block_plan.hpp: run coalescing, MHA head slices, validation of remote-provided indices
// and registrations, and an end-to-end copy of the planned blocks through the in-process transport.
#include <doctest/doctest.h>

#include <cstring>
#include <limits>
#include <string>
#include <memory>
#include <vector>

#include "actors/block_plan.hpp"
#include "transport/inproc_transport.hpp"

using namespace kvflow;
using pages_t = std::vector<std::int32_t>;

namespace {

pool_shape mla_shape(config::range layers, int pages) {
  pool_shape s;
  s.layers = layers;
  s.buffers_per_layer = 1;
  s.page_size = 4;
  s.item_bytes = 4 * 40;  // page_size x bytes per token
  s.pages = pages;
  s.aux_slots = 4;
  return s;
}

pool_shape mha_shape(int heads, int pages) {
  pool_shape s;
  s.layers = {0, 3};
  s.buffers_per_layer = 2;
  s.page_size = 4;
  s.head_bytes = 6;
  s.local_heads = heads;
  s.item_bytes = std::int64_t{heads} * s.page_size * s.head_bytes;
  s.pages = pages;
  s.aux_slots = 4;
  return s;
}

// A recognisable, never-zero byte for every position of the source region.
std::byte pattern(std::uint64_t i) { return static_cast<std::byte>(i * 131 % 251 + 1); }

void fill(const kv_pool& p) {
  for (std::uint64_t i = 0; i < p.kv_bytes(); ++i) p.kv_base()[i] = pattern(i);
}

// The decode side's offset of (layer, buffer, page), as the planner must compute it.
std::uint64_t dst_off(const remote_pool& r, int layer, int buffer, int page) {
  auto lb = std::uint64_t(layer - r.layer_begin) * r.buffers_per_layer + buffer;
  return (lb * std::uint64_t(r.pages) + std::uint64_t(page)) * std::uint64_t(r.item_bytes);
}

block_request mla_req(const pages_t& src, const pages_t& dst, config::range layers,
                      bool coalesce = true) {
  block_request r;
  r.src_pages = &src;
  r.dst_pages = &dst;
  r.layers = layers;
  r.mla = true;
  r.coalesce = coalesce;
  return r;
}

block_request mha_req(const pages_t& src, const pages_t& dst, config::head_slice h) {
  block_request r;
  r.src_pages = &src;
  r.dst_pages = &dst;
  r.layers = {0, 3};
  r.heads = h;
  r.mla = false;
  return r;
}

// Pushes blocks synchronously, returns the completion status (and how often it was called).
status push_sync(transport::transport& t, std::uint64_t peer, const std::vector<transport::block>& b,
                 int* calls = nullptr) {
  status out = status::error("completion not called");
  int n = 0;
  t.push(peer, b, [&](status s) {
    ++n;
    out = std::move(s);
  });
  if (calls != nullptr) *calls = n;
  return out;
}

constexpr std::uint64_t decode_endpoint = 21;

}  // namespace

TEST_CASE("block_plan: runs of consecutive src AND dst pages make one block per layer buffer") {
  kv_pool src(mla_shape({0, 3}, 16));
  kv_pool dst(mla_shape({0, 3}, 16));
  auto remote = describe(dst, 5, 6);
  pages_t sp{3, 4, 5, 9}, dp{10, 11, 12, 13};
  auto plan = plan_blocks(src, remote, mla_req(sp, dp, {0, 3}));
  REQUIRE(plan.ok());
  const auto& blocks = plan.value();
  REQUIRE(blocks.size() == 6);  // 2 runs x 3 layers x 1 buffer
  const std::uint64_t item = 160;
  for (const auto& b : blocks) CHECK(b.region == 5);
  // Runs are the outer loop, layers the inner one.
  for (int l = 0; l < 3; ++l) {
    const auto& a = blocks[l];
    CHECK(a.src == src.item(l, 0, 3));
    CHECK(a.offset == dst_off(remote, l, 0, 10));
    CHECK(a.len == 3 * item);
    const auto& b = blocks[3 + l];
    CHECK(b.src == src.item(l, 0, 9));
    CHECK(b.offset == dst_off(remote, l, 0, 13));
    CHECK(b.len == item);
  }
}

TEST_CASE("block_plan: a non-consecutive destination breaks a run") {
  kv_pool src(mla_shape({0, 2}, 16));
  kv_pool dst(mla_shape({0, 2}, 16));
  auto remote = describe(dst, 1, 2);
  {
    pages_t sp{0, 1, 2, 3}, dp{5, 6, 8, 9};
    auto plan = plan_blocks(src, remote, mla_req(sp, dp, {0, 2}));
    REQUIRE(plan.ok());
    REQUIRE(plan.value().size() == 4);  // runs {0,1} and {2,3}, 2 layers
    CHECK(plan.value()[0].len == 2 * 160);
    CHECK(plan.value()[2].len == 2 * 160);
    CHECK(plan.value()[2].offset == dst_off(remote, 0, 0, 8));
  }
  {
    pages_t sp{1, 2}, dp{6, 5};  // descending destination: no run
    auto plan = plan_blocks(src, remote, mla_req(sp, dp, {0, 2}));
    REQUIRE(plan.ok());
    CHECK(plan.value().size() == 4);
  }
  {
    pages_t sp{0, 1, 2, 3, 4, 5}, dp{0, 1, 2, 3, 4, 5};  // one long run
    auto plan = plan_blocks(src, remote, mla_req(sp, dp, {0, 2}));
    REQUIRE(plan.ok());
    REQUIRE(plan.value().size() == 2);
    CHECK(plan.value()[0].len == 6 * 160);
  }
  {
    pages_t none;  // an empty chunk plans no blocks
    auto plan = plan_blocks(src, remote, mla_req(none, none, {0, 2}));
    REQUIRE(plan.ok());
    CHECK(plan.value().empty());
  }
}

TEST_CASE("block_plan: coalesce=false gives one block per page") {
  kv_pool src(mla_shape({0, 3}, 16));
  kv_pool dst(mla_shape({0, 3}, 16));
  auto remote = describe(dst, 1, 2);
  pages_t sp{3, 4, 5, 9}, dp{10, 11, 12, 13};
  auto plan = plan_blocks(src, remote, mla_req(sp, dp, {0, 3}, false));
  REQUIRE(plan.ok());
  REQUIRE(plan.value().size() == 12);
  for (const auto& b : plan.value()) CHECK(b.len == 160);
}

TEST_CASE("block_plan: PP: a stage writes only its layers, at the destination's layer offset") {
  kv_pool src(mla_shape({4, 8}, 8));    // prefill stage owning layers 4..7
  kv_pool dst(mla_shape({0, 8}, 8));    // decode pp 1 holds every layer
  auto remote = describe(dst, 1, 2);
  pages_t sp{0}, dp{2};
  auto plan = plan_blocks(src, remote, mla_req(sp, dp, {4, 8}));
  REQUIRE(plan.ok());
  REQUIRE(plan.value().size() == 4);
  for (int i = 0; i < 4; ++i) {
    CHECK(plan.value()[i].src == src.item(4 + i, 0, 0));
    CHECK(plan.value()[i].offset == dst.offset(4 + i, 0, 2));
  }
}

TEST_CASE("block_plan: MHA head slices make per-page blocks with the right offsets and length") {
  const std::int64_t per_head = 4 * 6;  // page_size x head_bytes
  SUBCASE("D > P: decode takes heads [2, 4) of the prefill rank's 4") {
    kv_pool src(mha_shape(4, 8));
    kv_pool dst(mha_shape(2, 8));
    auto remote = describe(dst, 1, 2);
    pages_t sp{0, 1, 2}, dp{3, 4, 5};  // consecutive, but partial items never coalesce
    auto plan = plan_blocks(src, remote, mha_req(sp, dp, {2, 0, 2}));
    REQUIRE(plan.ok());
    REQUIRE(plan.value().size() == 3 * 3 * 2);  // pages x layers x (K, V)
    std::size_t i = 0;
    for (int pg = 0; pg < 3; ++pg)
      for (int l = 0; l < 3; ++l)
        for (int b = 0; b < 2; ++b, ++i) {
          const auto& blk = plan.value()[i];
          CHECK(blk.src == src.item(l, b, sp[pg]) + 2 * per_head);
          CHECK(blk.offset == dst.offset(l, b, dp[pg]));
          CHECK(blk.len == std::uint64_t(2 * per_head));
        }
  }
  SUBCASE("D < P: the prefill rank's 2 heads land at heads [2, 4) of the decode rank") {
    kv_pool src(mha_shape(2, 8));
    kv_pool dst(mha_shape(4, 8));
    auto remote = describe(dst, 1, 2);
    pages_t sp{7}, dp{0};
    auto plan = plan_blocks(src, remote, mha_req(sp, dp, {0, 2, 2}));
    REQUIRE(plan.ok());
    REQUIRE(plan.value().size() == 6);
    CHECK(plan.value()[0].src == src.item(0, 0, 7));
    CHECK(plan.value()[0].offset == dst.offset(0, 0, 0) + 2 * per_head);
    CHECK(plan.value()[1].offset == dst.offset(0, 1, 0) + 2 * per_head);
    CHECK(plan.value()[0].len == std::uint64_t(2 * per_head));
  }
  SUBCASE("D == P: the whole item moves and runs coalesce") {
    kv_pool src(mha_shape(2, 8));
    kv_pool dst(mha_shape(2, 8));
    auto remote = describe(dst, 1, 2);
    pages_t sp{0, 1}, dp{4, 5};
    auto plan = plan_blocks(src, remote, mha_req(sp, dp, {0, 0, 2}));
    REQUIRE(plan.ok());
    REQUIRE(plan.value().size() == 6);  // 1 run x 3 layers x 2 buffers
    CHECK(plan.value()[0].len == std::uint64_t(2 * src.shape().item_bytes));
  }
}

TEST_CASE("block_plan: invalid requests are returned as a status with a reason, never thrown") {
  kv_pool src(mla_shape({0, 3}, 8));
  kv_pool dst(mla_shape({0, 3}, 8));
  auto remote = describe(dst, 1, 2);
  // The reason of a refused plan ("" when planned, "threw" when it threw instead).
  auto reason = [&](const kv_pool& s, const remote_pool& r, const block_request& req) {
    try {
      auto plan = plan_blocks(s, r, req);
      return plan.ok() ? std::string{} : plan.error().reason();
    } catch (...) {
      return std::string("threw");
    }
  };
  auto refused = [&](const kv_pool& s, const remote_pool& r, const block_request& req,
                     const char* says) {
    auto why = reason(s, r, req);
    INFO("reason: " << why);
    return !why.empty() && why != "threw" && why.find(says) != std::string::npos;
  };
  pages_t ok1{1}, neg{-1}, big{8}, two{1, 2};
  CHECK(reason(src, remote, mla_req(ok1, ok1, {0, 3})).empty());  // the valid request
  CHECK(refused(src, remote, mla_req(neg, ok1, {0, 3}), "source page -1"));
  CHECK(refused(src, remote, mla_req(big, ok1, {0, 3}), "source page 8"));
  CHECK(refused(src, remote, mla_req(ok1, neg, {0, 3}), "destination page -1"));
  CHECK(refused(src, remote, mla_req(ok1, big, {0, 3}), "destination page 8"));
  CHECK(refused(src, remote, mla_req(two, ok1, {0, 3}), "2 source pages but 1"));
  CHECK(refused(src, remote, mla_req(ok1, two, {0, 3}), "1 source pages but 2"));
  {
    // The destination registered fewer pages than the source has.
    kv_pool small(mla_shape({0, 3}, 4));
    pages_t p5{5};
    CHECK(refused(src, describe(small, 1, 2), mla_req(ok1, p5, {0, 3}), "destination page 5"));
  }
  {
    // Layers outside the destination's registered layers (a decode stage owning 0..1 only).
    kv_pool stage(mla_shape({0, 2}, 8));
    CHECK(refused(src, describe(stage, 1, 2), mla_req(ok1, ok1, {0, 3}), "outside the destination"));
    kv_pool later(mla_shape({1, 3}, 8));
    CHECK(refused(src, describe(later, 1, 2), mla_req(ok1, ok1, {0, 3}), "outside the destination"));
    // A region larger than its layers need (allowed) must not let layer 2 in either.
    auto roomy = describe(dst, 1, 2);
    roomy.layer_count = 2;
    REQUIRE(check_remote_pool(roomy).ok());
    CHECK(refused(src, roomy, mla_req(ok1, ok1, {0, 3}), "outside the destination"));
  }
  {
    // Even an unchecked registration cannot make a block leave its region.
    auto shrunk = remote;
    shrunk.kv_bytes -= 1;
    pages_t last{7};
    CHECK(refused(src, shrunk, mla_req(ok1, last, {0, 3}), "exceeds"));
  }
  // Layers outside the source's own layers.
  CHECK(refused(src, remote, mla_req(ok1, ok1, {0, 4}), "layers"));
  {
    // MLA item size mismatch (page size or dtype differ).
    auto other = mla_shape({0, 3}, 8);
    other.item_bytes = 4 * 41;
    kv_pool odd(other);
    CHECK(refused(src, describe(odd, 1, 2), mla_req(ok1, ok1, {0, 3}), "164"));
  }
  {
    // Buffers per layer differ (MHA source, MLA-shaped destination).
    kv_pool msrc(mha_shape(2, 8));
    auto r = describe(dst, 1, 2);
    CHECK(refused(msrc, r, mha_req(ok1, ok1, {0, 0, 2}), "buffers per layer"));
  }
}

TEST_CASE("block_plan: head slices outside the registered heads are refused") {
  kv_pool src(mha_shape(4, 8));
  kv_pool dst(mha_shape(2, 8));
  auto remote = describe(dst, 1, 2);
  pages_t p{0};
  auto refused = [&](config::head_slice h, const remote_pool& r) {
    auto plan = plan_blocks(src, r, mha_req(p, p, h));
    return !plan.ok() && !plan.error().reason().empty();
  };
  CHECK_FALSE(refused({2, 0, 2}, remote));  // the valid slice, for contrast
  CHECK(refused({3, 0, 2}, remote));        // past the source's 4 heads
  CHECK(refused({-1, 0, 2}, remote));
  CHECK(refused({0, 1, 2}, remote));        // past the destination's 2 heads
  CHECK(refused({0, -1, 1}, remote));
  CHECK(refused({0, 0, 0}, remote));        // nothing to move
  CHECK(refused({0, 0, 3}, remote));
  {
    // Head bytes differ.
    auto r = remote;
    r.head_bytes = 12;
    r.item_bytes = 2 * 4 * 12;
    CHECK(refused({2, 0, 2}, r));
  }
}

TEST_CASE("block_plan: check_remote_pool accepts a real pool and rejects inconsistent ones") {
  kv_pool mla(mla_shape({0, 3}, 8));
  kv_pool mha(mha_shape(2, 8));
  CHECK(check_remote_pool(describe(mla, 1, 2)).ok());
  CHECK(check_remote_pool(describe(mha, 1, 2)).ok());
  auto base = describe(mha, 1, 2);
  auto rejected = [](const remote_pool& r) {
    auto s = check_remote_pool(r);
    return !s.ok() && !s.reason().empty();
  };
  {
    auto r = base;
    r.kv_bytes -= 1;  // sizes exceed the region
    CHECK(rejected(r));
    r = base;
    r.pages += 1;
    CHECK(rejected(r));
    r = base;
    r.layer_count += 1;
    CHECK(rejected(r));
  }
  // Negative or out-of-range fields.
  for (int field = 0; field < 8; ++field) {
    auto r = base;
    switch (field) {
      case 0: r.layer_begin = -1; break;
      case 1: r.layer_count = -1; break;
      case 2: r.pages = -1; break;
      case 3: r.item_bytes = -1; break;
      case 4: r.aux_slots = -1; break;
      case 5: r.local_heads = -1; break;
      case 6: r.head_bytes = -1; break;
      case 7: r.buffers_per_layer = 3; break;
    }
    CAPTURE(field);
    CHECK(rejected(r));
  }
  {
    auto r = base;
    r.buffers_per_layer = 0;
    CHECK(rejected(r));
  }
  {
    // heads x page size x head bytes must equal the item size.
    auto r = base;
    r.local_heads = 3;
    CHECK(rejected(r));
  }
  {
    // A product that overflows 64 bits is not "small".
    auto r = describe(mla, 1, 2);
    r.pages = std::numeric_limits<std::int32_t>::max();
    r.item_bytes = std::numeric_limits<std::int64_t>::max();
    r.kv_bytes = std::numeric_limits<std::uint64_t>::max();
    CHECK(rejected(r));
  }
}

TEST_CASE("block_plan: planned MLA blocks copied through the transport land where expected") {
  auto fabric = std::make_shared<transport::inproc_fabric>();
  transport::inproc_transport prefill_side(fabric), decode_side(fabric);
  kv_pool src(mla_shape({0, 3}, 16));
  kv_pool dst(mla_shape({0, 3}, 16));
  fill(src);
  auto kv = decode_side.register_memory(decode_endpoint, dst.kv_base(), dst.kv_bytes());
  auto aux = decode_side.register_memory(decode_endpoint, dst.aux_base(), dst.aux_bytes());
  REQUIRE(kv.ok());
  REQUIRE(aux.ok());
  auto remote = describe(dst, kv.value().id, aux.value().id);
  REQUIRE(check_remote_pool(remote).ok());

  pages_t sp{3, 4, 5, 9, 0}, dp{10, 11, 12, 13, 2};
  auto plan = plan_blocks(src, remote, mla_req(sp, dp, {0, 3}));
  REQUIRE(plan.ok());
  int calls = 0;
  REQUIRE(push_sync(prefill_side, decode_endpoint, plan.value(), &calls).ok());
  CHECK(calls == 1);

  const auto item = std::uint64_t(src.shape().item_bytes);
  for (int l = 0; l < 3; ++l)
    for (int pg = 0; pg < 16; ++pg) {
      CAPTURE(l);
      CAPTURE(pg);
      const std::byte* got = dst.item(l, 0, pg);
      int from = -1;
      for (std::size_t i = 0; i < dp.size(); ++i)
        if (dp[i] == pg) from = sp[i];
      if (from >= 0) {
        CHECK(std::memcmp(got, src.item(l, 0, from), item) == 0);
      } else {
        bool zero = true;
        for (std::uint64_t i = 0; i < item; ++i) zero = zero && got[i] == std::byte{0};
        CHECK(zero);  // pages outside the chunk stay untouched
      }
    }
}

TEST_CASE("block_plan: planned MHA head slices copied through the transport land in place") {
  auto fabric = std::make_shared<transport::inproc_fabric>();
  transport::inproc_transport t(fabric);
  // D < P: two prefill ranks (2 heads each) fill one decode rank's 4 heads.
  kv_pool p0(mha_shape(2, 8)), p1(mha_shape(2, 8));
  kv_pool dst(mha_shape(4, 8));
  fill(p0);
  for (std::uint64_t i = 0; i < p1.kv_bytes(); ++i) p1.kv_base()[i] = pattern(i + 17);
  auto kv = t.register_memory(decode_endpoint, dst.kv_base(), dst.kv_bytes());
  REQUIRE(kv.ok());
  auto remote = describe(dst, kv.value().id, 0);
  pages_t sp{1, 2}, dp{6, 3};
  auto a = plan_blocks(p0, remote, mha_req(sp, dp, {0, 0, 2}));
  auto b = plan_blocks(p1, remote, mha_req(sp, dp, {0, 2, 2}));
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  REQUIRE(push_sync(t, decode_endpoint, a.value()).ok());
  REQUIRE(push_sync(t, decode_endpoint, b.value()).ok());

  const std::uint64_t per_head = 4 * 6;
  for (int l = 0; l < 3; ++l)
    for (int buf = 0; buf < 2; ++buf)
      for (std::size_t i = 0; i < sp.size(); ++i) {
        const std::byte* got = dst.item(l, buf, dp[i]);
        CHECK(std::memcmp(got, p0.item(l, buf, sp[i]), 2 * per_head) == 0);
        CHECK(std::memcmp(got + 2 * per_head, p1.item(l, buf, sp[i]), 2 * per_head) == 0);
      }
  // A page no chunk named is still zero.
  const std::byte* untouched = dst.item(1, 1, 0);
  bool zero = true;
  for (std::uint64_t i = 0; i < std::uint64_t(dst.shape().item_bytes); ++i)
    zero = zero && untouched[i] == std::byte{0};
  CHECK(zero);
}

// ---- Regressions: each failed before its fix (registrations are remote input). -------------

// check_remote_pool checks every size field for sign except page_size: an MLA registration with
// a negative page size is accepted.
TEST_CASE("regression: check_remote_pool refuses a negative page_size") {
  kv_pool mla(mla_shape({0, 3}, 8));
  auto r = describe(mla, 1, 2);
  r.page_size = -64;
  CHECK_FALSE(check_remote_pool(r).ok());
}

// The heads check multiplies remote-provided int64 values without overflow protection (signed
// overflow, UB): 4 heads x 1 token x 2^62 bytes wraps to 0 and "equals" item_bytes 0, so a
// registration claiming 4 heads of 2^62 bytes in 0-byte items is accepted.
TEST_CASE("regression: check_remote_pool heads x page_size x head_bytes does not overflow") {
  kv_pool mha(mha_shape(2, 8));
  auto r = describe(mha, 1, 2);
  r.local_heads = 4;
  r.page_size = 1;
  r.head_bytes = std::int64_t{1} << 62;
  r.item_bytes = 0;
  CHECK_FALSE(check_remote_pool(r).ok());
}

// layer_begin + layer_count is not checked against overflow; plan_blocks then computes
// dst.layer_begin + dst.layer_count in int32 (signed overflow, UB) to range-check layers.
TEST_CASE("regression: check_remote_pool refuses layer_begin + layer_count beyond int32") {
  kv_pool mla(mla_shape({0, 3}, 8));
  auto r = describe(mla, 1, 2);
  r.layer_begin = std::numeric_limits<std::int32_t>::max();
  r.layer_count = 3;
  CHECK_FALSE(check_remote_pool(r).ok());
}

// ---- state pages (e.g. the DSv3.2 indexer cache) -------------------------------------------

namespace {

pool_shape state_shape(int pages) {
  auto s = mla_shape({0, 2}, pages);
  s.state_item_bytes = 4 * 12;  // page_size x 12 state bytes per token
  s.state_pages = pages;
  return s;
}

}  // namespace

TEST_CASE("block_plan: state pages move as runs of their own, after the KV") {
  kv_pool src(state_shape(8)), dst(state_shape(8));
  for (std::uint64_t i = 0; i < src.state_bytes(); ++i) src.state_base()[i] = pattern(i);
  auto remote = describe(dst, 1, 2, 3);
  CHECK(remote.state_pages == 8);
  CHECK(remote.state_bytes == dst.state_bytes());
  CHECK(check_remote_pool(remote).ok());
  const pages_t sp{0, 1}, dp{2, 3}, ss{4, 5, 6}, ds{1, 2, 5};
  const pages_t kv_src{0, 1, 2}, kv_dst{3, 4, 5};
  auto req = mla_req(kv_src, kv_dst, {0, 2});
  req.src_state = &ss;
  req.dst_state = &ds;
  auto planned = plan_blocks(src, remote, req);
  REQUIRE(planned.ok());
  // KV: one run of 3 pages per layer (2 blocks); state: runs {4,5}->{1,2} and {6}->{5} per layer.
  REQUIRE(planned.value().size() == 2 + 4);
  const auto& b = planned.value();
  CHECK(b[2].region == 3);
  CHECK(b[2].src == src.state_item(0, 4));
  CHECK(b[2].offset == dst.state_offset(0, 1));
  CHECK(b[2].len == 2u * 48);
  CHECK(b[3].src == src.state_item(1, 4));
  CHECK(b[3].offset == dst.state_offset(1, 1));
  CHECK(b[4].offset == dst.state_offset(0, 5));
  CHECK(b[4].len == 48u);
  // Copied through the transport, every state byte lands where the planner said.
  auto fabric = std::make_shared<transport::inproc_fabric>();
  transport::inproc_transport t(fabric);
  auto kv = t.register_memory(9, dst.kv_base(), dst.kv_bytes());
  auto aux = t.register_memory(9, dst.aux_base(), dst.aux_bytes());
  auto state = t.register_memory(9, dst.state_base(), dst.state_bytes());
  REQUIRE((kv.ok() && aux.ok() && state.ok()));
  auto real = describe(dst, kv->id, aux->id, state->id);
  auto again = plan_blocks(src, real, req);
  REQUIRE(again.ok());
  bool ok = false;
  t.push(9, again.value(), [&](status s) { ok = s.ok(); });
  REQUIRE(ok);
  for (int l = 0; l < 2; ++l)
    for (std::size_t k = 0; k < ss.size(); ++k)
      CHECK(std::memcmp(dst.state_item(l, ds[k]), src.state_item(l, ss[k]), 48) == 0);
}

TEST_CASE("block_plan: remote state indices are checked before any block is planned") {
  kv_pool src(state_shape(8)), dst(state_shape(8));
  auto remote = describe(dst, 1, 2, 3);
  const pages_t kv_src{0, 1}, kv_dst{3, 4};
  auto req = mla_req(kv_src, kv_dst, {0, 2});
  const pages_t ok_src{0, 1};
  for (const pages_t& bad : {pages_t{0, 8}, pages_t{-1, 0}, pages_t{0}}) {
    req.src_state = &ok_src;
    req.dst_state = &bad;
    auto planned = plan_blocks(src, remote, req);
    CHECK_FALSE(planned.ok());
    CHECK(planned.error().reason().find("state") != std::string::npos);
  }
  // A registration whose state pages do not fit its state region is refused.
  auto lying = remote;
  lying.state_pages = 9;
  CHECK_FALSE(check_remote_pool(lying).ok());
  lying = remote;
  lying.state_item_bytes = -1;
  CHECK_FALSE(check_remote_pool(lying).ok());
  // A destination whose state pages are another size (another model) is refused.
  auto other = remote;
  other.state_item_bytes = 4 * 13;
  other.state_bytes = std::uint64_t(2) * 8 * 52;
  req.dst_state = &kv_dst;
  CHECK_FALSE(plan_blocks(src, other, req).ok());
}
