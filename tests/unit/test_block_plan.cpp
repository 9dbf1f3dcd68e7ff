// actors/block_plan.hpp: run coalescing, MHA head slices, state and aux blocks, validation of
// remote-provided indices and registrations (per-buffer remote_pool), and end-to-end copies of
// the planned blocks through the in-process transport.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "actors/block_plan.hpp"
#include "actors/rank_memory.hpp"
#include "config/routing.hpp"
#include "transport/inproc_transport.hpp"

using namespace kvflow;
using pages_t = std::vector<std::int32_t>;

namespace {

constexpr auto u64_max = std::numeric_limits<std::uint64_t>::max();

// MLA, 4 tokens per page: `bytes` B of latent per token (item = 4 x bytes), optional state.
config::routing_plan mla_plan(int layers = 8, std::int64_t bytes = 40, std::int64_t state = 0) {
  config::cluster_config c;
  c.model.kind = config::model_kind::mla;
  c.model.name = "mla";
  c.model.layers = layers;
  c.model.mla_bytes_per_token = bytes;
  c.model.state_bytes_per_token = state;
  c.page_size = 4;
  return config::routing_plan(c);
}

// MHA, 3 layers, `heads` KV heads of 6 B per token (head_dim 3 x 2 B), 4 tokens per page: a
// rank holding h heads has items of h x 24 B.
config::routing_plan mha_plan(int prefill_tp, int decode_tp, int heads = 4) {
  config::cluster_config c;
  c.model.kind = config::model_kind::mha;
  c.model.name = "mha";
  c.model.layers = 3;
  c.model.kv_heads = heads;
  c.model.head_dim = 3;
  c.model.elem_size = 2;
  c.model.state_bytes_per_token = 0;
  c.page_size = 4;
  c.prefill.tp = prefill_tp;
  c.decode.tp = decode_tp;
  return config::routing_plan(c);
}

// The memory of one rank as an engine holds it: one zero-filled arena per kind (KV, state,
// aux), its buffers one after another in it (layer-major, K before V), the buffer_specs that
// describe them, and the rank_memory over them. `receipts` stands for the decode rank's own
// receipt slots (kvflow's memory).
struct engine_memory {
  std::vector<std::byte> kv, state, aux;
  std::vector<buffer_spec> specs;
  std::vector<aux_record> receipts;
  rank_memory mem;
};

std::unique_ptr<engine_memory> make_memory(const config::routing_plan& plan, bool prefill, config::range layers,
                                           int pages, int aux_rows = 4,
                                           const std::vector<std::uint64_t>& aux_row_bytes = {64}, int rank = 0) {
  auto e = std::make_unique<engine_memory>();
  const auto& c = plan.config();
  const bool mla = c.model.kind == config::model_kind::mla;
  const int bpl = plan.buffers_per_layer();
  const auto item = std::uint64_t(prefill ? plan.prefill_item_bytes() : plan.decode_item_bytes());
  const auto state_item = mla ? std::uint64_t(c.page_size) * std::uint64_t(c.model.state_bytes_per_token) : 0;
  const auto nl = std::uint64_t(layers.size());
  const auto per = std::uint64_t(pages) * item, sper = std::uint64_t(pages) * state_item;
  e->kv.resize(nl * std::uint64_t(bpl) * per);
  e->state.resize(nl * sper);
  std::uint64_t aux_total = 0;
  for (auto r : aux_row_bytes) aux_total += r * std::uint64_t(aux_rows);
  e->aux.resize(aux_total);
  e->receipts.resize(std::size_t(std::max(1, aux_rows)));
  for (int l = layers.begin; l < layers.end; ++l)
    for (int b = 0; b < bpl; ++b) {
      auto* base = e->kv.data() + (std::uint64_t(l - layers.begin) * std::uint64_t(bpl) + std::uint64_t(b)) * per;
      e->specs.push_back({{base, per, item}, mla ? buffer_kind::latent : (b == 0 ? buffer_kind::k : buffer_kind::v), l});
    }
  if (state_item > 0)
    for (int l = layers.begin; l < layers.end; ++l)
      e->specs.push_back({{e->state.data() + std::uint64_t(l - layers.begin) * sper, sper, state_item},
                          buffer_kind::state, l});
  if (aux_rows > 0) {
    std::uint64_t off = 0;
    for (auto r : aux_row_bytes) {
      e->specs.push_back({{e->aux.data() + off, r * std::uint64_t(aux_rows), r}, buffer_kind::aux, -1});
      off += r * std::uint64_t(aux_rows);
    }
  }
  auto m = rank_memory::create(plan, prefill, rank, layers, e->specs);
  REQUIRE_MESSAGE(m.ok(), m.error().reason());
  e->mem = m.value();
  return e;
}

// A destination's registration, each buffer placed by `where` (buffer_view -> remote_buffer).
template <class Where>
remote_pool describe_with(const rank_memory& m, Where where, remote_buffer receipts) {
  remote_pool p = describe_shape(m);
  for (const auto& b : m.kv_buffers()) p.kv.push_back(where(b));
  for (const auto& b : m.aux_buffers()) p.aux.push_back(where(b));
  for (const auto& b : m.state_buffers()) p.state.push_back(where(b));
  p.receipts = receipts;
  return p;
}

// The registration of a decode rank with fake transport regions: ids 1, 2, ... (KV in layer
// order, aux, state, then the receipts), every buffer at `offset` of its own region.
remote_pool describe(const rank_memory& m, std::uint64_t offset = 0) {
  std::uint64_t region = 1;
  auto p = describe_with(m, [&](const buffer_view& b) { return remote_buffer{region++, offset, b.bytes, b.page_bytes}; },
                         {});
  const std::uint64_t slots = std::uint64_t(std::max(1, m.aux_rows()));
  p.receipts = {region++, offset, slots * sizeof(aux_record), sizeof(aux_record)};
  return p;
}

// The registration of `e` as a decode rank would make it, registered with `t` for `owner`: one
// region per arena (so buffers sit at their offsets inside it) and one for the receipts.
remote_pool register_pool(transport::transport& t, std::uint64_t owner, engine_memory& e) {
  struct arena {
    std::vector<std::byte>* bytes;
    std::uint64_t id;
  };
  std::vector<arena> arenas;
  for (auto* a : {&e.kv, &e.state, &e.aux})
    if (!a->empty()) {
      auto r = t.register_memory(owner, a->data(), a->size());
      REQUIRE_MESSAGE(r.ok(), r.error().reason());
      arenas.push_back({a, r.value().id});
    }
  auto where = [&](const buffer_view& b) {
    for (const auto& a : arenas)
      if (b.base >= a.bytes->data() && b.base < a.bytes->data() + a.bytes->size())
        return remote_buffer{a.id, std::uint64_t(b.base - a.bytes->data()), b.bytes, b.page_bytes};
    FAIL("buffer outside every arena");
    return remote_buffer{};
  };
  const std::uint64_t rbytes = e.receipts.size() * sizeof(aux_record);
  auto rec = t.register_memory(owner, e.receipts.data(), rbytes);
  REQUIRE(rec.ok());
  return describe_with(e.mem, where, remote_buffer{rec.value().id, 0, rbytes, sizeof(aux_record)});
}

// A recognisable, never-zero byte for every position of a source buffer.
std::byte pattern(std::uint64_t i) { return static_cast<std::byte>(i * 131 % 251 + 1); }

void fill(std::vector<std::byte>& arena, std::uint64_t salt = 0) {
  for (std::uint64_t i = 0; i < arena.size(); ++i) arena[i] = pattern(i + salt);
}

bool all_zero(const std::byte* p, std::uint64_t n) {
  return std::all_of(p, p + n, [](std::byte b) { return b == std::byte{0}; });
}

// The block lands in the destination's buffer of (layer, buffer) at page `page`, `in` bytes
// into the item.
void check_lands(const transport::block& blk, const remote_pool& r, int layer, int buffer, int page,
                 std::uint64_t in = 0) {
  INFO("layer " << layer << " buffer " << buffer << " page " << page);
  const auto& d = r.kv[static_cast<std::size_t>((layer - r.layer_begin) * r.buffers_per_layer + buffer)];
  CHECK(blk.region == d.region);
  CHECK(blk.offset == d.offset + std::uint64_t(page) * std::uint64_t(r.item_bytes) + in);
}

block_request mla_req(const pages_t& src, const pages_t& dst, config::range layers, bool coalesce = true) {
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

// The reason a plan was refused ("" when planned, "threw" when it threw instead).
template <class Plan>
std::string reason_of(Plan plan) {
  try {
    auto p = plan();
    return p.ok() ? std::string{} : p.error().reason();
  } catch (...) {
    return std::string("threw");
  }
}

// Refused with a reason that says `says`.
template <class Plan>
bool refused_with(Plan plan, const char* says) {
  auto why = reason_of(plan);
  INFO("reason: " << why);
  return !why.empty() && why != "threw" && why.find(says) != std::string::npos;
}

constexpr std::uint64_t decode_endpoint = 21;

}  // namespace

TEST_CASE("block_plan: runs of consecutive src AND dst pages make one block per layer buffer") {
  const auto plan = mla_plan();
  auto src = make_memory(plan, true, {0, 3}, 16);
  auto dst = make_memory(plan, false, {0, 3}, 16);
  const auto remote = describe(dst->mem, 1000);  // buffers 1000 B into their regions
  REQUIRE(check_remote_pool(remote).ok());
  pages_t sp{3, 4, 5, 9}, dp{10, 11, 12, 13};
  auto planned = plan_blocks(src->mem, remote, mla_req(sp, dp, {0, 3}));
  REQUIRE(planned.ok());
  const auto& blocks = planned.value();
  REQUIRE(blocks.size() == 6);  // 2 runs x 3 layers x 1 buffer
  const std::uint64_t item = 160;
  // Runs are the outer loop, layers the inner one; each layer goes to its own buffer.
  for (int l = 0; l < 3; ++l) {
    const auto& a = blocks[l];
    CHECK(a.src == src->mem.item(l, 0, 3));
    check_lands(a, remote, l, 0, 10);
    CHECK(a.len == 3 * item);
    const auto& b = blocks[3 + l];
    CHECK(b.src == src->mem.item(l, 0, 9));
    check_lands(b, remote, l, 0, 13);
    CHECK(b.len == item);
  }
  CHECK(blocks[0].region != blocks[1].region);  // layer buffers are separate registrations
}

TEST_CASE("block_plan: a non-consecutive destination (or source) breaks a run") {
  const auto plan = mla_plan();
  auto src = make_memory(plan, true, {0, 2}, 16);
  auto dst = make_memory(plan, false, {0, 2}, 16);
  const auto remote = describe(dst->mem);
  {
    pages_t sp{0, 1, 2, 3}, dp{5, 6, 8, 9};
    auto planned = plan_blocks(src->mem, remote, mla_req(sp, dp, {0, 2}));
    REQUIRE(planned.ok());
    REQUIRE(planned.value().size() == 4);  // runs {0,1} and {2,3}, 2 layers
    CHECK(planned.value()[0].len == 2 * 160);
    CHECK(planned.value()[2].len == 2 * 160);
    check_lands(planned.value()[2], remote, 0, 0, 8);
    CHECK(planned.value()[2].src == src->mem.item(0, 0, 2));
  }
  {
    pages_t sp{0, 1, 3, 4}, dp{5, 6, 7, 8};  // consecutive destination, gap in the source
    auto planned = plan_blocks(src->mem, remote, mla_req(sp, dp, {0, 2}));
    REQUIRE(planned.ok());
    REQUIRE(planned.value().size() == 4);
    CHECK(planned.value()[2].src == src->mem.item(0, 0, 3));
    check_lands(planned.value()[2], remote, 0, 0, 7);
  }
  {
    pages_t sp{1, 2}, dp{6, 5};  // descending destination: no run
    auto planned = plan_blocks(src->mem, remote, mla_req(sp, dp, {0, 2}));
    REQUIRE(planned.ok());
    CHECK(planned.value().size() == 4);
  }
  {
    pages_t sp{0, 1, 2, 3, 4, 5}, dp{0, 1, 2, 3, 4, 5};  // one long run
    auto planned = plan_blocks(src->mem, remote, mla_req(sp, dp, {0, 2}));
    REQUIRE(planned.ok());
    REQUIRE(planned.value().size() == 2);
    CHECK(planned.value()[0].len == 6 * 160);
  }
  {
    pages_t none;  // an empty chunk plans no blocks
    auto planned = plan_blocks(src->mem, remote, mla_req(none, none, {0, 2}));
    REQUIRE(planned.ok());
    CHECK(planned.value().empty());
  }
}

TEST_CASE("block_plan: coalesce=false gives one block per page") {
  const auto plan = mla_plan();
  auto src = make_memory(plan, true, {0, 3}, 16);
  auto dst = make_memory(plan, false, {0, 3}, 16);
  const auto remote = describe(dst->mem);
  pages_t sp{3, 4, 5, 9}, dp{10, 11, 12, 13};
  auto planned = plan_blocks(src->mem, remote, mla_req(sp, dp, {0, 3}, false));
  REQUIRE(planned.ok());
  REQUIRE(planned.value().size() == 12);
  for (const auto& b : planned.value()) CHECK(b.len == 160);
  check_lands(planned.value()[3], remote, 0, 0, 11);  // page-major, then layers
}

TEST_CASE("block_plan: PP: a stage writes only its layers, at the destination's layer offset") {
  const auto plan = mla_plan(8);
  auto src = make_memory(plan, true, {4, 8}, 8);  // prefill stage owning layers 4..7
  SUBCASE("the decode rank holds every layer") {
    auto dst = make_memory(plan, false, {0, 8}, 8);
    const auto remote = describe(dst->mem);
    pages_t sp{0}, dp{2};
    auto planned = plan_blocks(src->mem, remote, mla_req(sp, dp, {4, 8}));
    REQUIRE(planned.ok());
    REQUIRE(planned.value().size() == 4);
    for (int i = 0; i < 4; ++i) {
      CHECK(planned.value()[i].src == src->mem.item(4 + i, 0, 0));
      check_lands(planned.value()[i], remote, 4 + i, 0, 2);
      CHECK(planned.value()[i].region == remote.kv[std::size_t(4 + i)].region);
    }
  }
  SUBCASE("the decode rank is the same stage (layer_begin 4: its first buffer is layer 4)") {
    auto dst = make_memory(plan, false, {4, 8}, 8);
    const auto remote = describe(dst->mem);
    REQUIRE(remote.layer_begin == 4);
    pages_t sp{1}, dp{3};
    auto planned = plan_blocks(src->mem, remote, mla_req(sp, dp, {4, 8}));
    REQUIRE(planned.ok());
    REQUIRE(planned.value().size() == 4);
    for (int i = 0; i < 4; ++i) CHECK(planned.value()[i].region == remote.kv[std::size_t(i)].region);
    // Layers of another stage are outside it.
    auto whole = make_memory(plan, true, {0, 8}, 8);
    CHECK(refused_with([&] { return plan_blocks(whole->mem, remote, mla_req(sp, dp, {0, 8})); },
                       "outside the destination"));
  }
}

TEST_CASE("block_plan: MHA head slices make per-page blocks with the right offsets and length") {
  const std::int64_t per_head = 4 * 6;  // page_size x head_bytes
  SUBCASE("D > P: decode takes heads [2, 4) of the prefill rank's 4") {
    const auto plan = mha_plan(1, 2);
    auto src = make_memory(plan, true, {0, 3}, 8);
    auto dst = make_memory(plan, false, {0, 3}, 8, 4, {64}, 1);
    REQUIRE(src->mem.local_heads() == 4);
    REQUIRE(dst->mem.local_heads() == 2);
    const auto remote = describe(dst->mem);
    pages_t sp{0, 1, 2}, dp{3, 4, 5};  // consecutive, but partial items never coalesce
    auto planned = plan_blocks(src->mem, remote, mha_req(sp, dp, {2, 0, 2}));
    REQUIRE(planned.ok());
    REQUIRE(planned.value().size() == 3 * 3 * 2);  // pages x layers x (K, V)
    std::size_t i = 0;
    for (int pg = 0; pg < 3; ++pg)
      for (int l = 0; l < 3; ++l)
        for (int b = 0; b < 2; ++b, ++i) {
          const auto& blk = planned.value()[i];
          CHECK(blk.src == src->mem.item(l, b, sp[pg]) + 2 * per_head);
          check_lands(blk, remote, l, b, dp[pg]);
          CHECK(blk.len == std::uint64_t(2 * per_head));
        }
  }
  SUBCASE("D < P: the prefill rank's 2 heads land at heads [2, 4) of the decode rank") {
    const auto plan = mha_plan(2, 1);
    auto src = make_memory(plan, true, {0, 3}, 8, 4, {64}, 1);
    auto dst = make_memory(plan, false, {0, 3}, 8);
    const auto remote = describe(dst->mem);
    pages_t sp{7}, dp{0};
    auto planned = plan_blocks(src->mem, remote, mha_req(sp, dp, {0, 2, 2}));
    REQUIRE(planned.ok());
    REQUIRE(planned.value().size() == 6);
    CHECK(planned.value()[0].src == src->mem.item(0, 0, 7));
    check_lands(planned.value()[0], remote, 0, 0, 0, 2 * per_head);
    check_lands(planned.value()[1], remote, 0, 1, 0, 2 * per_head);
    CHECK(planned.value()[1].src == src->mem.item(0, 1, 7));
    CHECK(planned.value()[0].len == std::uint64_t(2 * per_head));
  }
  SUBCASE("D == P: the whole item moves and runs coalesce") {
    const auto plan = mha_plan(2, 2);
    auto src = make_memory(plan, true, {0, 3}, 8);
    auto dst = make_memory(plan, false, {0, 3}, 8);
    const auto remote = describe(dst->mem);
    pages_t sp{0, 1}, dp{4, 5};
    auto planned = plan_blocks(src->mem, remote, mha_req(sp, dp, {0, 0, 2}));
    REQUIRE(planned.ok());
    REQUIRE(planned.value().size() == 6);  // 1 run x 3 layers x 2 buffers
    CHECK(planned.value()[0].len == std::uint64_t(2 * src->mem.item_bytes()));
    check_lands(planned.value()[5], remote, 2, 1, 4);
  }
}

TEST_CASE("block_plan: invalid requests are returned as a status with a reason, never thrown") {
  const auto plan = mla_plan();
  auto src = make_memory(plan, true, {0, 3}, 8);
  auto dst = make_memory(plan, false, {0, 3}, 8);
  const auto remote = describe(dst->mem);
  const rank_memory& s = src->mem;
  auto refused = [](const rank_memory& m, const remote_pool& r, const block_request& req, const char* says) {
    return refused_with([&] { return plan_blocks(m, r, req); }, says);
  };
  pages_t ok1{1}, neg{-1}, big{8}, two{1, 2};
  CHECK(reason_of([&] { return plan_blocks(s, remote, mla_req(ok1, ok1, {0, 3})); }).empty());  // valid
  CHECK(refused(s, remote, mla_req(neg, ok1, {0, 3}), "source page -1"));
  CHECK(refused(s, remote, mla_req(big, ok1, {0, 3}), "source page 8"));
  CHECK(refused(s, remote, mla_req(ok1, neg, {0, 3}), "destination page -1"));
  CHECK(refused(s, remote, mla_req(ok1, big, {0, 3}), "destination page 8"));
  CHECK(refused(s, remote, mla_req(two, ok1, {0, 3}), "2 source pages but 1"));
  CHECK(refused(s, remote, mla_req(ok1, two, {0, 3}), "1 source pages but 2"));
  {
    // The destination registered fewer pages than the source has.
    auto small = make_memory(plan, false, {0, 3}, 4);
    pages_t p5{5};
    CHECK(refused(s, describe(small->mem), mla_req(ok1, p5, {0, 3}), "destination page 5"));
  }
  {
    // Layers outside the destination's registered layers (a decode stage owning 0..1 only).
    auto stage = make_memory(plan, false, {0, 2}, 8);
    CHECK(refused(s, describe(stage->mem), mla_req(ok1, ok1, {0, 3}), "outside the destination"));
    auto later = make_memory(plan, false, {1, 3}, 8);
    CHECK(refused(s, describe(later->mem), mla_req(ok1, ok1, {0, 3}), "outside the destination"));
  }
  {
    // Buffers larger than their pages need (allowed) do not let a page past `pages` in.
    auto roomy = remote;
    for (auto& b : roomy.kv) b.bytes *= 2;
    REQUIRE(check_remote_pool(roomy).ok());
    CHECK(refused(s, roomy, mla_req(ok1, big, {0, 3}), "destination page 8"));
  }
  {
    // Even an unchecked registration cannot make a block leave its buffer: the last page of a
    // buffer one byte short, whichever layer's it is (each buffer is checked, not a region).
    pages_t last{7};
    for (std::size_t l = 0; l < remote.kv.size(); ++l) {
      CAPTURE(l);
      auto shrunk = remote;
      shrunk.kv[l].bytes -= 1;
      CHECK(refused(s, shrunk, mla_req(ok1, last, {0, 3}), "exceeds"));
      CHECK(reason_of([&] { return plan_blocks(s, shrunk, mla_req(ok1, ok1, {0, 3})); }).empty());
    }
    // A run whose last page crosses the buffer's end.
    auto shrunk = remote;
    shrunk.kv[1].bytes = 7 * 160;
    pages_t run_src{1, 2}, run_dst{6, 7};
    CHECK(refused(s, shrunk, mla_req(run_src, run_dst, {0, 3}), "exceeds"));
  }
  // Layers outside the source's own layers.
  CHECK(refused(s, remote, mla_req(ok1, ok1, {0, 4}), "layers"));
  {
    // MLA item size mismatch (page size or dtype differ).
    const auto other = mla_plan(8, 41);
    auto odd = make_memory(other, false, {0, 3}, 8);
    CHECK(refused(s, describe(odd->mem), mla_req(ok1, ok1, {0, 3}), "164"));
  }
  {
    // Buffers per layer differ (MHA source, MLA destination).
    const auto mha = mha_plan(2, 2);
    auto msrc = make_memory(mha, true, {0, 3}, 8);
    CHECK(refused(msrc->mem, remote, mha_req(ok1, ok1, {0, 0, 2}), "buffers per layer"));
  }
}

TEST_CASE("block_plan: head slices outside the registered heads are refused") {
  const auto plan = mha_plan(1, 2);
  auto src = make_memory(plan, true, {0, 3}, 8);
  auto dst = make_memory(plan, false, {0, 3}, 8);
  const auto remote = describe(dst->mem);
  pages_t p{0};
  auto refused = [&](config::head_slice h, const remote_pool& r) {
    auto planned = plan_blocks(src->mem, r, mha_req(p, p, h));
    return !planned.ok() && !planned.error().reason().empty();
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
  {
    // Page size differs (same item bytes: 2 heads x 8 tokens x 3 B would be another model).
    auto r = remote;
    r.page_size = 8;
    CHECK(refused({2, 0, 2}, r));
  }
}

TEST_CASE("block_plan: check_remote_pool accepts real registrations and rejects inconsistent ones") {
  const auto mla = mla_plan();
  const auto mha = mha_plan(2, 2);
  const auto st = mla_plan(2, 40, 12);
  auto mla_mem = make_memory(mla, false, {0, 3}, 8);
  auto mha_mem = make_memory(mha, false, {0, 3}, 8);
  auto st_mem = make_memory(st, false, {0, 2}, 8, 4, {64, 16});  // state, two aux buffers
  CHECK(check_remote_pool(describe(mla_mem->mem)).ok());
  CHECK(check_remote_pool(describe(mha_mem->mem)).ok());
  CHECK(check_remote_pool(describe(st_mem->mem, 4096)).ok());
  const auto base = describe(mha_mem->mem);
  const auto with_state = describe(st_mem->mem);
  REQUIRE(with_state.state.size() == 2);
  REQUIRE(with_state.aux.size() == 2);
  auto rejected = [](const remote_pool& r) {
    auto s = check_remote_pool(r);
    return !s.ok() && !s.reason().empty();
  };
  SUBCASE("buffer counts must match the layers") {
    auto r = base;
    r.kv.pop_back();  // a V buffer missing
    CHECK(rejected(r));
    r = base;
    r.kv.push_back(r.kv.back());
    CHECK(rejected(r));
    r = base;
    r.layer_count += 1;
    CHECK(rejected(r));
    r = base;
    r.layer_count -= 1;
    CHECK(rejected(r));
    r = base;
    r.buffers_per_layer = 1;  // 6 buffers are not 3 layers of 1
    CHECK(rejected(r));
    r = with_state;
    r.state.pop_back();
    CHECK(rejected(r));
    r = with_state;
    r.state.push_back(r.state.back());
    CHECK(rejected(r));
    r = with_state;
    r.state.clear();  // no state at all is a registration without state: consistent
    CHECK(check_remote_pool(r).ok());
  }
  SUBCASE("every buffer must hold its pages, in pages of the item size") {
    auto r = base;
    r.kv[3].bytes -= 1;
    CHECK(rejected(r));
    r = base;
    r.pages += 1;
    CHECK(rejected(r));
    r = base;
    r.kv[0].page_bytes += 1;
    CHECK(rejected(r));
    r = base;
    r.item_bytes += 1;
    CHECK(rejected(r));
    r = with_state;
    r.state_pages += 1;
    CHECK(rejected(r));
    r = with_state;
    r.state[1].bytes -= 1;
    CHECK(rejected(r));
    r = with_state;
    r.state[0].page_bytes = 47;
    CHECK(rejected(r));
  }
  SUBCASE("aux buffers must hold the aux rows, receipts one record per row") {
    auto r = with_state;
    r.aux_rows += 1;
    CHECK(rejected(r));
    r = with_state;
    r.aux[1].bytes -= 1;
    CHECK(rejected(r));
    r = with_state;
    r.aux[0].page_bytes = 0;
    CHECK(rejected(r));
    r = with_state;
    r.receipts.bytes = std::uint64_t(r.aux_rows) * sizeof(aux_record) - 1;
    CHECK(rejected(r));
    r = with_state;
    r.receipts.bytes = std::uint64_t(r.aux_rows) * sizeof(aux_record);  // exactly enough
    CHECK(check_remote_pool(r).ok());
  }
  SUBCASE("offset + bytes must not overflow") {
    auto r = base;
    r.kv[2].offset = u64_max - r.kv[2].bytes + 1;
    CHECK(rejected(r));
    r = base;
    r.kv[2].offset = u64_max - r.kv[2].bytes;  // ends exactly at 2^64 - 1: fits
    CHECK(check_remote_pool(r).ok());
    r = with_state;
    r.state[1].offset = u64_max;
    CHECK(rejected(r));
  }
  SUBCASE("negative or out-of-range fields") {
    for (int field = 0; field < 12; ++field) {
      auto r = with_state;
      switch (field) {
        case 0: r.layer_begin = -1; break;
        case 1: r.layer_count = -1; break;
        case 2: r.pages = -1; break;
        case 3: r.item_bytes = -1; break;
        case 4: r.aux_rows = -1; break;
        case 5: r.local_heads = -1; break;
        case 6: r.head_bytes = -1; break;
        case 7: r.buffers_per_layer = 3; break;
        case 8: r.buffers_per_layer = 0; break;
        case 9: r.page_size = -1; break;
        case 10: r.state_pages = -1; break;
        case 11: r.state_item_bytes = -1; break;
      }
      CAPTURE(field);
      CHECK(rejected(r));
    }
  }
  SUBCASE("heads x page size x head bytes must equal the item size") {
    auto r = base;
    r.local_heads = 3;
    CHECK(rejected(r));
    r = base;
    r.head_bytes = 7;
    CHECK(rejected(r));
  }
  SUBCASE("a product that overflows 64 bits is not small") {
    auto r = describe(mla_mem->mem);
    r.pages = std::numeric_limits<std::int32_t>::max();
    r.item_bytes = std::numeric_limits<std::int64_t>::max();
    for (auto& b : r.kv) {
      b.bytes = u64_max;
      b.offset = 0;
      b.page_bytes = std::uint64_t(r.item_bytes);
    }
    CHECK(rejected(r));
    r = with_state;
    r.aux_rows = std::numeric_limits<std::int32_t>::max();
    for (auto& a : r.aux) {
      a.bytes = u64_max;
      a.page_bytes = u64_max;
    }
    r.receipts.bytes = u64_max;
    CHECK(rejected(r));
  }
}

TEST_CASE("block_plan: planned MLA blocks copied through the transport land where expected") {
  auto fabric = std::make_shared<transport::inproc_fabric>();
  transport::inproc_transport prefill_side(fabric), decode_side(fabric);
  const auto plan = mla_plan();
  auto src = make_memory(plan, true, {0, 3}, 16);
  auto dst = make_memory(plan, false, {0, 3}, 16);
  fill(src->kv);
  const auto remote = register_pool(decode_side, decode_endpoint, *dst);
  REQUIRE(check_remote_pool(remote).ok());
  CHECK(remote.kv[1].offset == 16 * 160);  // layers one after another in one region

  pages_t sp{3, 4, 5, 9, 0}, dp{10, 11, 12, 13, 2};
  auto planned = plan_blocks(src->mem, remote, mla_req(sp, dp, {0, 3}));
  REQUIRE(planned.ok());
  int calls = 0;
  REQUIRE(push_sync(prefill_side, decode_endpoint, planned.value(), &calls).ok());
  CHECK(calls == 1);

  const auto item = std::uint64_t(src->mem.item_bytes());
  for (int l = 0; l < 3; ++l)
    for (int pg = 0; pg < 16; ++pg) {
      CAPTURE(l);
      CAPTURE(pg);
      const std::byte* got = dst->mem.item(l, 0, pg);
      int from = -1;
      for (std::size_t i = 0; i < dp.size(); ++i)
        if (dp[i] == pg) from = sp[i];
      if (from >= 0) {
        CHECK(std::memcmp(got, src->mem.item(l, 0, from), item) == 0);
      } else {
        CHECK(all_zero(got, item));  // pages outside the chunk stay untouched
      }
    }
}

TEST_CASE("block_plan: planned MHA head slices copied through the transport land in place") {
  auto fabric = std::make_shared<transport::inproc_fabric>();
  transport::inproc_transport t(fabric);
  // D < P: two prefill ranks (2 heads each) fill one decode rank's 4 heads.
  const auto plan = mha_plan(2, 1);
  auto p0 = make_memory(plan, true, {0, 3}, 8, 4, {64}, 0);
  auto p1 = make_memory(plan, true, {0, 3}, 8, 4, {64}, 1);
  auto dst = make_memory(plan, false, {0, 3}, 8);
  fill(p0->kv);
  fill(p1->kv, 17);
  const auto remote = register_pool(t, decode_endpoint, *dst);
  REQUIRE(check_remote_pool(remote).ok());
  const auto& slices = plan.decode(0).peers;
  REQUIRE(slices.size() == 2);  // the routing plan's slices are the ones tested here
  CHECK(slices[0].heads.dst_begin == 0);
  CHECK(slices[1].heads.dst_begin == 2);
  pages_t sp{1, 2}, dp{6, 3};
  auto a = plan_blocks(p0->mem, remote, mha_req(sp, dp, slices[0].heads));
  auto b = plan_blocks(p1->mem, remote, mha_req(sp, dp, slices[1].heads));
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  REQUIRE(push_sync(t, decode_endpoint, a.value()).ok());
  REQUIRE(push_sync(t, decode_endpoint, b.value()).ok());

  const std::uint64_t per_head = 4 * 6;
  for (int l = 0; l < 3; ++l)
    for (int buf = 0; buf < 2; ++buf)
      for (std::size_t i = 0; i < sp.size(); ++i) {
        const std::byte* got = dst->mem.item(l, buf, dp[i]);
        CHECK(std::memcmp(got, p0->mem.item(l, buf, sp[i]), 2 * per_head) == 0);
        CHECK(std::memcmp(got + 2 * per_head, p1->mem.item(l, buf, sp[i]), 2 * per_head) == 0);
      }
  // A page no chunk named is still zero.
  CHECK(all_zero(dst->mem.item(1, 1, 0), std::uint64_t(dst->mem.item_bytes())));
}

// ---- Regressions: each failed before its fix (registrations are remote input). -------------

// check_remote_pool checks every size field for sign except page_size: an MLA registration with
// a negative page size is accepted.
TEST_CASE("regression: check_remote_pool refuses a negative page_size") {
  const auto plan = mla_plan();
  auto mem = make_memory(plan, false, {0, 3}, 8);
  auto r = describe(mem->mem);
  r.page_size = -64;
  CHECK_FALSE(check_remote_pool(r).ok());
}

// The heads check multiplies remote-provided int64 values without overflow protection (signed
// overflow, UB): 4 heads x 1 token x 2^62 bytes wraps to 0 and "equals" item_bytes 0, so a
// registration claiming 4 heads of 2^62 bytes in 0-byte items is accepted.
TEST_CASE("regression: check_remote_pool heads x page_size x head_bytes does not overflow") {
  const auto plan = mha_plan(2, 2);
  auto mem = make_memory(plan, false, {0, 3}, 8);
  auto r = describe(mem->mem);
  r.local_heads = 4;
  r.page_size = 1;
  r.head_bytes = std::int64_t{1} << 62;
  r.item_bytes = 0;
  for (auto& b : r.kv) b.page_bytes = 0;  // consistent with the claimed item size
  CHECK_FALSE(check_remote_pool(r).ok());
}

// layer_begin + layer_count is not checked against overflow; plan_blocks then computes
// dst.layer_begin + dst.layer_count in int32 (signed overflow, UB) to range-check layers.
TEST_CASE("regression: check_remote_pool refuses layer_begin + layer_count beyond int32") {
  const auto plan = mla_plan();
  auto mem = make_memory(plan, false, {0, 3}, 8);
  auto r = describe(mem->mem);
  r.layer_begin = std::numeric_limits<std::int32_t>::max();
  r.layer_count = 3;
  CHECK_FALSE(check_remote_pool(r).ok());
}

// Regression: aux buffers and receipts whose offset + bytes overflow 64 bits were accepted, and
// plan_aux_blocks then computed wrapped offsets (receipts at 2^64 - 10, slot 3: offset 61, inside
// the region but not a slot).
TEST_CASE("block_plan: check_remote_pool refuses aux buffers and receipts that overflow their region") {
  const auto plan = mla_plan(2, 40);
  auto mem = make_memory(plan, false, {0, 2}, 4, 4, {64});
  const auto base = describe(mem->mem);
  REQUIRE(check_remote_pool(base).ok());
  auto r = base;
  r.aux[0].offset = u64_max - r.aux[0].bytes + 1;
  CHECK_FALSE(check_remote_pool(r).ok());
  r = base;
  r.receipts.offset = u64_max - 10;
  CHECK_FALSE(check_remote_pool(r).ok());
}

// ---- state pages (e.g. the DSv3.2 indexer cache) -------------------------------------------

TEST_CASE("block_plan: state pages move as runs of their own (plan_state_blocks)") {
  const auto plan = mla_plan(2, 40, 12);  // 12 state bytes per token: 48 B state pages
  auto src = make_memory(plan, true, {0, 2}, 8);
  auto dst = make_memory(plan, false, {0, 2}, 8);
  REQUIRE(src->mem.state_item_bytes() == 48);
  fill(src->state);
  const auto remote = describe(dst->mem, 512);
  CHECK(remote.state_pages == 8);
  REQUIRE(remote.state.size() == 2);
  CHECK(remote.state[0].bytes == 8u * 48);
  CHECK(check_remote_pool(remote).ok());
  const pages_t ss{4, 5, 6}, ds{1, 2, 5};
  // The KV of the same chunk plans KV blocks only: state is not mixed in.
  const pages_t kv_src{0, 1, 2}, kv_dst{3, 4, 5};
  auto kv = plan_blocks(src->mem, remote, mla_req(kv_src, kv_dst, {0, 2}));
  REQUIRE(kv.ok());
  CHECK(kv.value().size() == 2);  // one run of 3 pages per layer
  for (const auto& b : kv.value()) CHECK(b.len == 3u * 160);

  auto planned = plan_state_blocks(src->mem, remote, ss, ds, {0, 2});
  REQUIRE(planned.ok());
  // Runs {4,5}->{1,2} and {6}->{5}, per layer.
  REQUIRE(planned.value().size() == 4);
  const auto& b = planned.value();
  CHECK(b[0].region == remote.state[0].region);
  CHECK(b[0].src == src->mem.state_item(0, 4));
  CHECK(b[0].offset == remote.state[0].offset + 1 * 48);
  CHECK(b[0].len == 2u * 48);
  CHECK(b[1].region == remote.state[1].region);
  CHECK(b[1].src == src->mem.state_item(1, 4));
  CHECK(b[1].offset == remote.state[1].offset + 1 * 48);
  CHECK(b[2].offset == remote.state[0].offset + 5 * 48);
  CHECK(b[2].len == 48u);
  CHECK(b[3].src == src->mem.state_item(1, 6));
  // coalesce=false: one block per state page per layer.
  auto single = plan_state_blocks(src->mem, remote, ss, ds, {0, 2}, false);
  REQUIRE(single.ok());
  CHECK(single.value().size() == 6);
  // Only the layers asked for.
  auto one = plan_state_blocks(src->mem, remote, ss, ds, {1, 2});
  REQUIRE(one.ok());
  REQUIRE(one.value().size() == 2);
  CHECK(one.value()[0].region == remote.state[1].region);
  // No state pages: no blocks.
  auto none = plan_state_blocks(src->mem, remote, {}, {}, {0, 2});
  REQUIRE(none.ok());
  CHECK(none.value().empty());

  // Copied through the transport, every state byte lands where the planner said.
  auto fabric = std::make_shared<transport::inproc_fabric>();
  transport::inproc_transport t(fabric);
  const auto real = register_pool(t, 9, *dst);
  REQUIRE(check_remote_pool(real).ok());
  auto again = plan_state_blocks(src->mem, real, ss, ds, {0, 2});
  REQUIRE(again.ok());
  REQUIRE(push_sync(t, 9, again.value()).ok());
  for (int l = 0; l < 2; ++l)
    for (int pg = 0; pg < 8; ++pg) {
      CAPTURE(l);
      CAPTURE(pg);
      const auto at = std::find(ds.begin(), ds.end(), pg);
      if (at != ds.end())
        CHECK(std::memcmp(dst->mem.state_item(l, pg), src->mem.state_item(l, ss[std::size_t(at - ds.begin())]), 48) ==
              0);
      else
        CHECK(all_zero(dst->mem.state_item(l, pg), 48));
    }
  CHECK(all_zero(dst->kv.data(), dst->kv.size()));  // state blocks never touch KV
}

TEST_CASE("block_plan: remote state indices are checked before any state block is planned") {
  const auto plan = mla_plan(2, 40, 12);
  auto src = make_memory(plan, true, {0, 2}, 8);
  auto dst = make_memory(plan, false, {0, 2}, 8);
  const auto remote = describe(dst->mem);
  const pages_t ok_src{0, 1}, ok_dst{3, 4};
  REQUIRE(plan_state_blocks(src->mem, remote, ok_src, ok_dst, {0, 2}).ok());
  for (const pages_t& bad : {pages_t{0, 8}, pages_t{-1, 0}, pages_t{0}}) {
    CAPTURE(bad.size());
    auto planned = plan_state_blocks(src->mem, remote, ok_src, bad, {0, 2});
    CHECK_FALSE(planned.ok());
    CHECK(planned.error().reason().find("state") != std::string::npos);
    auto reversed = plan_state_blocks(src->mem, remote, bad, ok_src, {0, 2});  // bad source indices
    CHECK_FALSE(reversed.ok());
    CHECK(reversed.error().reason().find("state") != std::string::npos);
  }
  // Layers outside either side.
  CHECK_FALSE(plan_state_blocks(src->mem, remote, ok_src, ok_dst, {0, 3}).ok());
  auto stage = make_memory(plan, false, {1, 2}, 8);
  CHECK(refused_with([&] { return plan_state_blocks(src->mem, describe(stage->mem), ok_src, ok_dst, {0, 2}); },
                     "outside the destination"));
  // A registration whose state pages do not fit its state buffers is refused.
  auto lying = remote;
  lying.state_pages = 9;
  CHECK_FALSE(check_remote_pool(lying).ok());
  lying = remote;
  lying.state_item_bytes = -1;
  CHECK_FALSE(check_remote_pool(lying).ok());
  // A destination whose state pages are another size (another model) is refused.
  auto other = remote;
  other.state_item_bytes = 4 * 13;
  for (auto& b : other.state) {
    b.page_bytes = 4 * 13;
    b.bytes = 8 * 52;
  }
  REQUIRE(check_remote_pool(other).ok());
  CHECK_FALSE(plan_state_blocks(src->mem, other, ok_src, ok_dst, {0, 2}).ok());
  // A destination without state buffers (or a source without) cannot take state pages.
  auto stateless = remote;
  stateless.state.clear();
  stateless.state_pages = 0;
  stateless.state_item_bytes = 0;
  REQUIRE(check_remote_pool(stateless).ok());
  CHECK(refused_with([&] { return plan_state_blocks(src->mem, stateless, ok_src, ok_dst, {0, 2}); }, "state"));
  const auto no_state_plan = mla_plan(2, 40, 0);
  auto no_state = make_memory(no_state_plan, true, {0, 2}, 8);
  CHECK(refused_with([&] { return plan_state_blocks(no_state->mem, remote, ok_src, ok_dst, {0, 2}); }, "state"));
  // An unchecked registration cannot make a state block leave its buffer.
  auto shrunk = remote;
  shrunk.state[1].bytes -= 1;
  const pages_t last{7};
  CHECK(refused_with([&] { return plan_state_blocks(src->mem, shrunk, last, last, {0, 2}); }, "exceeds"));
}

// ---- aux rows and the receipt --------------------------------------------------------------

TEST_CASE("block_plan: aux rows pair buffers by position, the receipt comes last") {
  const auto plan = mla_plan(2, 40);
  auto src = make_memory(plan, true, {0, 2}, 4, 3, {64, 16});
  auto dst = make_memory(plan, false, {0, 2}, 4, 5, {64, 16});
  REQUIRE(src->mem.aux_rows() == 3);
  REQUIRE(dst->mem.aux_rows() == 5);
  const auto remote = describe(dst->mem, 100);
  REQUIRE(check_remote_pool(remote).ok());
  const auto receipt = make_receipt(77, 3);
  auto planned = plan_aux_blocks(src->mem, remote, 2, 4, &receipt);
  REQUIRE(planned.ok());
  const auto& b = planned.value();
  REQUIRE(b.size() == 3);  // aux buffer 0, aux buffer 1, receipt
  const auto& mine = src->mem.aux_buffers();
  CHECK(b[0].src == mine[0].base + 2 * 64);
  CHECK(b[0].region == remote.aux[0].region);
  CHECK(b[0].offset == remote.aux[0].offset + 4 * 64);
  CHECK(b[0].len == 64);
  CHECK(b[1].src == mine[1].base + 2 * 16);
  CHECK(b[1].region == remote.aux[1].region);
  CHECK(b[1].offset == remote.aux[1].offset + 4 * 16);
  CHECK(b[1].len == 16);
  CHECK(b[2].src == reinterpret_cast<const std::byte*>(&receipt));
  CHECK(b[2].region == remote.receipts.region);
  CHECK(b[2].offset == remote.receipts.offset + 4 * sizeof(aux_record));
  CHECK(b[2].len == sizeof(aux_record));
}

TEST_CASE("block_plan: aux rows and slots out of range or mismatched buffers are refused") {
  const auto plan = mla_plan(2, 40);
  auto src = make_memory(plan, true, {0, 2}, 4, 3, {64, 16});
  auto dst = make_memory(plan, false, {0, 2}, 4, 5, {64, 16});
  const auto remote = describe(dst->mem);
  const auto receipt = make_receipt(1, 1);
  auto aux = [&](const rank_memory& m, const remote_pool& r, int src_row, int dst_row, const char* says) {
    return refused_with([&] { return plan_aux_blocks(m, r, src_row, dst_row, &receipt); }, says);
  };
  CHECK(plan_aux_blocks(src->mem, remote, 0, 0, &receipt).ok());
  CHECK(plan_aux_blocks(src->mem, remote, 2, 4, &receipt).ok());  // the last row, the last slot
  CHECK(aux(src->mem, remote, 0, 5, "aux slot 5"));
  CHECK(aux(src->mem, remote, 0, -1, "aux slot -1"));
  CHECK(aux(src->mem, remote, 3, 0, "aux row 3"));
  CHECK(aux(src->mem, remote, -1, 0, "aux row -1"));
  // Rows of another size (another engine's aux layout).
  auto odd = make_memory(plan, false, {0, 2}, 4, 5, {64, 24});
  CHECK(aux(src->mem, describe(odd->mem), 0, 0, "aux buffer 1"));
  // Another number of aux buffers.
  auto fewer = make_memory(plan, false, {0, 2}, 4, 5, {64});
  CHECK(aux(src->mem, describe(fewer->mem), 0, 0, "aux buffers"));
  // A destination without aux rows has no slot to write.
  auto none = make_memory(plan, false, {0, 2}, 4, 0);
  CHECK(aux(src->mem, describe(none->mem), 0, 0, "aux slot 0"));
}

TEST_CASE("block_plan: aux rows and the receipt copied through the transport land in the slot") {
  auto fabric = std::make_shared<transport::inproc_fabric>();
  transport::inproc_transport t(fabric);
  const auto plan = mla_plan(2, 40);
  auto src = make_memory(plan, true, {0, 2}, 4, 3, {64, 16});
  auto dst = make_memory(plan, false, {0, 2}, 4, 5, {64, 16});
  fill(src->aux);
  const auto remote = register_pool(t, decode_endpoint, *dst);
  REQUIRE(check_remote_pool(remote).ok());
  const auto receipt = make_receipt(77, 3);
  auto planned = plan_aux_blocks(src->mem, remote, 1, 3, &receipt);
  REQUIRE(planned.ok());
  REQUIRE(push_sync(t, decode_endpoint, planned.value()).ok());
  const auto& mine = src->mem.aux_buffers();
  const auto& theirs = dst->mem.aux_buffers();
  for (std::size_t j = 0; j < 2; ++j) {
    const auto row = theirs[j].page_bytes;
    for (int slot = 0; slot < 5; ++slot) {
      CAPTURE(j);
      CAPTURE(slot);
      if (slot == 3)
        CHECK(std::memcmp(theirs[j].base + 3 * row, mine[j].base + 1 * row, row) == 0);
      else
        CHECK(all_zero(theirs[j].base + std::uint64_t(slot) * row, row));
    }
  }
  // The receipt names the request and checks out; the other slots still hold nothing.
  const auto& got = dst->receipts[3];
  CHECK(got.room == 77);
  CHECK(got.incarnation == 3);
  CHECK(got.check == aux_checksum(got));
  for (int slot : {0, 1, 2, 4}) CHECK(dst->receipts[std::size_t(slot)].check == 0);
}
