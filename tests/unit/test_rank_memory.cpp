// actors/rank_memory.hpp: a rank's view of the engine-owned KV memory (validation of the engine's
// buffer description against the routing plan, item / state addressing), receipts
// (aux_checksum, make_receipt); runtime/sim_memory.hpp: the simulated engine's LIFO page
// allocator and the memory description it hands to kvflow.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "cuda/gpu.hpp"
#include "actors/rank_memory.hpp"
#include "config/routing.hpp"
#include "runtime/api_internal.hpp"
#include "command/sim_memory.hpp"

using namespace kvflow;

namespace {

// MHA: 8 layers in 2 PP stages, 6 KV heads of 8 B per token (head_dim 4 x bf16), 4 tokens per
// page, prefill TP 2 (3 heads a rank: items of 3 x 4 x 8 = 96 B), decode TP 1 (6 heads, 192 B).
config::routing_plan mha_plan() {
  config::cluster_config c;
  c.model.kind = config::model_kind::mha;
  c.model.name = "mha";
  c.model.layers = 8;
  c.model.kv_heads = 6;
  c.model.head_dim = 4;
  c.model.elem_size = 2;
  c.model.state_bytes_per_token = 0;
  c.page_size = 4;
  c.prefill.tp = 2;
  c.prefill.pp = 2;
  c.decode.tp = 1;
  c.decode.pp = 2;
  return config::routing_plan(c);
}

// MLA: 3 layers, 24 B of latent per token, 2 tokens per page (48 B items), `state` B of state
// per token (state pages of 2 x state B).
config::routing_plan mla_plan(std::int64_t state = 5) {
  config::cluster_config c;
  c.model.kind = config::model_kind::mla;
  c.model.name = "mla";
  c.model.layers = 3;
  c.model.mla_bytes_per_token = 24;
  c.model.state_bytes_per_token = state;
  c.page_size = 2;
  return config::routing_plan(c);
}

// Engine buffers: zero-filled storage for each buffer described (moving a vector keeps its
// data where it is, so the descriptions stay valid), and the descriptions themselves.
struct buffers {
  std::vector<std::vector<std::byte>> storage;
  std::vector<buffer_spec> specs;

  buffer_spec& add(buffer_kind kind, int layer, std::uint64_t page_bytes, std::uint64_t pages) {
    storage.emplace_back(page_bytes * pages);
    specs.push_back({{storage.back().data(), page_bytes * pages, page_bytes}, kind, layer});
    return specs.back();
  }
};

// Every buffer an MHA rank holding `layers` needs, `pages` pages each, plus `aux` rows.
buffers mha_buffers(config::range layers, std::uint64_t item, std::uint64_t pages, std::uint64_t aux_rows = 5) {
  buffers b;
  for (int l = layers.begin; l < layers.end; ++l) {
    b.add(buffer_kind::k, l, item, pages);
    b.add(buffer_kind::v, l, item, pages);
  }
  if (aux_rows > 0) b.add(buffer_kind::aux, -1, 32, aux_rows);
  return b;
}

buffers mla_buffers(std::uint64_t pages, std::uint64_t state_item = 10, std::uint64_t aux_rows = 4) {
  buffers b;
  for (int l = 0; l < 3; ++l) b.add(buffer_kind::latent, l, 48, pages);
  if (state_item > 0)
    for (int l = 0; l < 3; ++l) b.add(buffer_kind::state, l, state_item, pages);
  if (aux_rows > 0) b.add(buffer_kind::aux, -1, 64, aux_rows);
  return b;
}

// The reason create() refused `specs` ("" when it accepted them, "threw" when it threw).
std::string refusal(const config::routing_plan& plan, bool prefill, int rank, config::range layers,
                    const std::vector<buffer_spec>& specs) {
  try {
    auto m = rank_memory::create(plan, prefill, rank, layers, specs);
    return m.ok() ? std::string{} : m.error().reason();
  } catch (...) {
    return "threw";
  }
}

void check_refused(const std::string& why, const char* says) {
  INFO("reason: " << why);
  CHECK_FALSE(why.empty());
  CHECK(why != "threw");
  CHECK(why.find(says) != std::string::npos);
}

}  // namespace

TEST_CASE("rank_memory: an MHA stage's buffers are accepted and addressed by layer, K/V and page") {
  const auto plan = mha_plan();
  const int r = config::prefill_rank_of(plan.config().prefill, {0, 1, 0, 1});  // stage 1, TP rank 1
  const auto layers = plan.prefill(r).layers;
  REQUIRE(layers == config::range{4, 8});
  const auto item = std::uint64_t(plan.prefill_item_bytes());
  REQUIRE(item == 96);
  auto b = mha_buffers(layers, item, 7);
  // The engine may list its buffers in any order: kvflow sorts them by layer and K/V.
  std::reverse(b.specs.begin(), b.specs.end());
  auto made = rank_memory::create(plan, true, r, layers, b.specs);
  REQUIRE_MESSAGE(made.ok(), made.error().reason());
  const auto& m = made.value();
  CHECK(m.layers() == layers);
  CHECK(m.buffers_per_layer() == 2);
  CHECK(m.item_bytes() == 96);
  CHECK(m.pages() == 7);
  CHECK(m.aux_rows() == 5);
  CHECK(m.local_heads() == 3);
  CHECK(m.head_bytes() == 8);
  CHECK(m.page_size() == 4);
  CHECK(m.state_pages() == 0);
  CHECK(m.state_item_bytes() == 0);
  CHECK(m.state_buffers().empty());
  REQUIRE(m.kv_buffers().size() == 8);
  REQUIRE(m.aux_buffers().size() == 1);
  for (int l = 4; l < 8; ++l)
    for (int buf = 0; buf < 2; ++buf) {
      CAPTURE(l);
      CAPTURE(buf);
      // The buffer the engine described for (layer, K/V), in layer-major order.
      const auto want = buf == 0 ? buffer_kind::k : buffer_kind::v;
      auto it = std::find_if(b.specs.begin(), b.specs.end(),
                             [&](const buffer_spec& s) { return s.layer == l && s.kind == want; });
      REQUIRE(it != b.specs.end());
      CHECK(m.kv(l, buf).base == it->view.base);
      CHECK(m.kv_buffers()[std::size_t((l - 4) * 2 + buf)].base == it->view.base);
      for (int pg = 0; pg < 7; ++pg) CHECK(m.item(l, buf, pg) == it->view.base + std::uint64_t(pg) * item);
    }
  // Decode side of the same plan: other heads, other item size.
  auto d = mha_buffers({0, 4}, 192, 3, 0);
  auto dm = rank_memory::create(plan, false, 0, {0, 4}, d.specs);
  REQUIRE_MESSAGE(dm.ok(), dm.error().reason());
  CHECK(dm.value().local_heads() == 6);
  CHECK(dm.value().item_bytes() == 192);
  CHECK(dm.value().aux_rows() == 0);  // no aux buffer: no rows
  CHECK(dm.value().aux_buffers().empty());
  // The item size is the rank's own side's: prefill items on a decode rank are refused.
  auto wrong_side = mha_buffers({0, 4}, 96, 3, 0);
  check_refused(refusal(plan, false, 0, {0, 4}, wrong_side.specs), "pages of 96 B");
}

TEST_CASE("rank_memory: MLA latent and state buffers, addressed per layer") {
  const auto plan = mla_plan(5);
  auto b = mla_buffers(6);
  auto made = rank_memory::create(plan, false, 0, {0, 3}, b.specs);
  REQUIRE_MESSAGE(made.ok(), made.error().reason());
  const auto& m = made.value();
  CHECK(m.buffers_per_layer() == 1);
  CHECK(m.item_bytes() == 48);
  CHECK(m.pages() == 6);
  CHECK(m.local_heads() == 0);
  CHECK(m.head_bytes() == 0);
  CHECK(m.state_item_bytes() == 10);
  CHECK(m.state_pages() == 6);
  CHECK(m.aux_rows() == 4);
  REQUIRE(m.state_buffers().size() == 3);
  for (int l = 0; l < 3; ++l) {
    CAPTURE(l);
    CHECK(m.kv(l, 0).base == b.specs[std::size_t(l)].view.base);
    CHECK(m.state_buffers()[std::size_t(l)].base == b.specs[std::size_t(3 + l)].view.base);
    for (int pg = 0; pg < 6; ++pg) {
      CHECK(m.item(l, 0, pg) == b.specs[std::size_t(l)].view.base + pg * 48);
      CHECK(m.state_item(l, pg) == b.specs[std::size_t(3 + l)].view.base + pg * 10);
    }
  }
  // A model without state: no state buffers needed, none addressed.
  const auto plain = mla_plan(0);
  auto nb = mla_buffers(6, 0);
  auto nm = rank_memory::create(plain, true, 0, {0, 3}, nb.specs);
  REQUIRE_MESSAGE(nm.ok(), nm.error().reason());
  CHECK(nm.value().state_pages() == 0);
  CHECK(nm.value().state_item_bytes() == 0);
  CHECK(nm.value().state_buffers().empty());
}

TEST_CASE("rank_memory: pages, state pages and aux rows are the minimum over their buffers") {
  const auto plan = mla_plan(5);
  auto b = mla_buffers(6);
  b.specs[1].view.bytes = 4 * 48 + 47;      // layer 1 holds 4 whole pages (a partial one does not count)
  b.specs[4].view.bytes = 5 * 10;           // state of layer 1: 5 pages
  b.add(buffer_kind::aux, -1, 16, 3);       // a second aux buffer with 3 rows
  auto made = rank_memory::create(plan, true, 0, {0, 3}, b.specs);
  REQUIRE_MESSAGE(made.ok(), made.error().reason());
  CHECK(made.value().pages() == 4);
  CHECK(made.value().state_pages() == 5);
  CHECK(made.value().aux_rows() == 3);
  // Aux buffers stay in the engine's order (paired by position with the peer's).
  REQUIRE(made.value().aux_buffers().size() == 2);
  CHECK(made.value().aux_buffers()[0].page_bytes == 64);
  CHECK(made.value().aux_buffers()[1].page_bytes == 16);
  CHECK(made.value().aux_buffers()[1].pages() == 3);
  CHECK(buffer_view{nullptr, 100, 0}.pages() == 0);  // no page size: no pages (not a division by 0)
}

TEST_CASE("rank_memory: create refuses descriptions that do not match the plan, with a reason") {
  const auto mla = mla_plan(5);
  const auto mha = mha_plan();
  const auto mha_item = std::uint64_t(mha.prefill_item_bytes());
  SUBCASE("a layer's KV buffer missing") {
    auto b = mla_buffers(4);
    b.specs.erase(b.specs.begin() + 1);
    check_refused(refusal(mla, true, 0, {0, 3}, b.specs), "no MLA latent buffer for layer 1");
    auto h = mha_buffers({4, 8}, mha_item, 4);
    h.specs.erase(h.specs.begin() + 3);  // V of layer 5
    check_refused(refusal(mha, true, 2, {4, 8}, h.specs), "no V buffer for layer 5");
    h = mha_buffers({4, 8}, mha_item, 4);
    h.specs.erase(h.specs.begin() + 6);  // K of layer 7
    check_refused(refusal(mha, true, 2, {4, 8}, h.specs), "no K buffer for layer 7");
  }
  SUBCASE("a state buffer missing when the model has state") {
    auto b = mla_buffers(4);
    b.specs.erase(b.specs.begin() + 5);
    check_refused(refusal(mla, true, 0, {0, 3}, b.specs), "no state buffer for layer 2");
  }
  SUBCASE("a buffer described twice") {
    auto b = mla_buffers(4);
    b.specs.push_back(b.specs[2]);
    check_refused(refusal(mla, true, 0, {0, 3}, b.specs), "two");
    b = mla_buffers(4);
    b.specs.push_back(b.specs[3]);  // state of layer 0
    check_refused(refusal(mla, true, 0, {0, 3}, b.specs), "two");
    auto h = mha_buffers({4, 8}, mha_item, 4);
    h.specs.push_back(h.specs[1]);  // V of layer 4
    check_refused(refusal(mha, true, 2, {4, 8}, h.specs), "two");
  }
  SUBCASE("pages of the wrong size") {
    auto b = mla_buffers(4);
    b.specs[0].view.page_bytes = 47;
    check_refused(refusal(mla, true, 0, {0, 3}, b.specs), "pages of 47 B");
    b = mla_buffers(4);
    b.specs[4].view.page_bytes = 12;  // state
    check_refused(refusal(mla, true, 0, {0, 3}, b.specs), "pages of 12 B");
  }
  SUBCASE("a buffer of a layer outside the rank's layers") {
    auto h = mha_buffers({4, 8}, mha_item, 4);
    h.specs[0].layer = 3;
    check_refused(refusal(mha, true, 2, {4, 8}, h.specs), "outside the rank's layers");
    h = mha_buffers({4, 8}, mha_item, 4);
    h.specs[0].layer = 8;
    check_refused(refusal(mha, true, 2, {4, 8}, h.specs), "outside the rank's layers");
    h = mha_buffers({4, 8}, mha_item, 4);
    h.specs[0].layer = -1;
    check_refused(refusal(mha, true, 2, {4, 8}, h.specs), "outside the rank's layers");
  }
  SUBCASE("layers outside the model") {
    auto b = mla_buffers(4);
    check_refused(refusal(mla, true, 0, {0, 4}, b.specs), "outside the model");
    check_refused(refusal(mla, true, 0, {-1, 3}, b.specs), "outside the model");
    check_refused(refusal(mla, true, 0, {1, 1}, b.specs), "outside the model");  // empty
  }
  SUBCASE("a state buffer for a model without state") {
    const auto plain = mla_plan(0);
    auto b = mla_buffers(4, 0);
    b.add(buffer_kind::state, 1, 10, 4);
    check_refused(refusal(plain, true, 0, {0, 3}, b.specs), "has no state");
    auto h = mha_buffers({4, 8}, mha_item, 4);
    h.add(buffer_kind::state, 4, 10, 4);
    check_refused(refusal(mha, true, 2, {4, 8}, h.specs), "has no state");
  }
  SUBCASE("K/V buffers for MLA, a latent buffer for MHA") {
    auto b = mla_buffers(4);
    b.specs[0].kind = buffer_kind::k;
    check_refused(refusal(mla, true, 0, {0, 3}, b.specs), "for an MLA model");
    b = mla_buffers(4);
    b.specs[1].kind = buffer_kind::v;
    check_refused(refusal(mla, true, 0, {0, 3}, b.specs), "for an MLA model");
    auto h = mha_buffers({4, 8}, mha_item, 4);
    h.specs[0].kind = buffer_kind::latent;
    check_refused(refusal(mha, true, 2, {4, 8}, h.specs), "for an MHA model");
  }
  SUBCASE("a buffer without base, length or page size") {
    for (int what = 0; what < 3; ++what) {
      CAPTURE(what);
      auto b = mla_buffers(4);
      auto& v = b.specs[what == 2 ? 6 : 1].view;  // aux too
      if (what == 0) v.base = nullptr;
      if (what == 1) v.bytes = 0;
      if (what == 2) v.page_bytes = 0;
      check_refused(refusal(mla, true, 0, {0, 3}, b.specs), "no base, length or page size");
    }
  }
  SUBCASE("the valid descriptions, for contrast") {
    CHECK(refusal(mla, true, 0, {0, 3}, mla_buffers(4).specs).empty());
    CHECK(refusal(mla, false, 0, {0, 3}, mla_buffers(4).specs).empty());
    CHECK(refusal(mha, true, 2, {4, 8}, mha_buffers({4, 8}, mha_item, 4).specs).empty());
    // A description of fewer layers than the plan's stage is the engine's choice (its layers).
    CHECK(refusal(mha, true, 2, {5, 7}, mha_buffers({5, 7}, mha_item, 4).specs).empty());
  }
}

// ---- receipts ------------------------------------------------------------------------------

TEST_CASE("rank_memory: aux_checksum is never 0 and changes with room and incarnation") {
  aux_record base{42, 7, 0};
  const auto h = aux_checksum(base);
  CHECK(h != 0);
  CHECK(aux_checksum(aux_record{}) != 0);  // an all-zero (empty) slot never checks out
  CHECK(aux_checksum(base) == h);          // deterministic
  auto changed = [&](auto mutate) {
    aux_record r = base;
    mutate(r);
    return aux_checksum(r) != h;
  };
  CHECK(changed([](aux_record& r) { r.room = 43; }));
  CHECK(changed([](aux_record& r) { r.room = 0; }));
  CHECK(changed([](aux_record& r) { r.incarnation = 8; }));
  CHECK(changed([](aux_record& r) { r.incarnation = 0; }));
  // Swapped fields are not the same record.
  CHECK(changed([](aux_record& r) { std::swap(r.room, r.incarnation); }));
  // The check field itself is not hashed (it stores the hash).
  CHECK_FALSE(changed([](aux_record& r) { r.check = 12345; }));
  // Many distinct records: never 0, and (practically) no collisions.
  std::set<std::uint64_t> seen;
  for (std::uint64_t room = 0; room < 50; ++room)
    for (std::uint64_t inc = 0; inc < 20; ++inc) {
      auto v = aux_checksum(aux_record{room, inc, 0});
      CHECK(v != 0);
      seen.insert(v);
    }
  CHECK(seen.size() == 1000);
}

TEST_CASE("rank_memory: make_receipt names the request and checks out, others do not") {
  const auto r = make_receipt(77, 3);
  CHECK(r.room == 77);
  CHECK(r.incarnation == 3);
  CHECK(r.check == aux_checksum(r));
  CHECK(r.check != 0);
  // The receipt of another room or another use of the room has another checksum.
  CHECK(make_receipt(78, 3).check != r.check);
  CHECK(make_receipt(77, 4).check != r.check);
  CHECK(make_receipt(77, 3).check == r.check);
  // What the decode side tests to call a slot landed: the request's room and incarnation and a
  // checksum that matches. An empty slot, a stale receipt and a torn one all fail it.
  auto landed = [](const aux_record& slot, std::uint64_t room, std::uint64_t inc) {
    return slot.room == room && slot.incarnation == inc && slot.check == aux_checksum(slot);
  };
  CHECK(landed(r, 77, 3));
  CHECK_FALSE(landed(aux_record{}, 0, 0));                 // empty slot: check 0 never matches
  CHECK_FALSE(landed(make_receipt(77, 2), 77, 3));         // the room's previous use
  aux_record torn = make_receipt(77, 3);
  torn.check = make_receipt(77, 2).check;                  // fields of one, check of another
  CHECK_FALSE(landed(torn, 77, 3));
  // A receipt is plain bytes: it survives a copy into a slot (what a push does).
  std::vector<std::byte> slot(sizeof(aux_record));
  std::memcpy(slot.data(), &r, sizeof r);
  aux_record back;
  std::memcpy(&back, slot.data(), sizeof back);
  CHECK(landed(back, 77, 3));
}

// ---- runtime/sim_memory.hpp: the simulated engine's memory -----------------------------------

TEST_CASE("page_allocator: a fresh allocator hands out consecutive pages") {
  command::page_allocator a(16);
  CHECK(a.used() == 0);
  auto x = a.take(4);
  REQUIRE(x);
  CHECK(*x == std::vector<std::int32_t>{0, 1, 2, 3});
  auto y = a.take(2);
  REQUIRE(y);
  CHECK(*y == std::vector<std::int32_t>{4, 5});
  CHECK(a.used() == 6);
}

TEST_CASE("page_allocator: LIFO reuse: the pages freed last come back first") {
  command::page_allocator p(16);
  auto a = p.take(4);
  auto b = p.take(4);
  REQUIRE(a);
  REQUIRE(b);
  p.give_back(*a);
  auto c = p.take(4);
  REQUIRE(c);
  CHECK(*c == *a);  // same pages, same order
  p.give_back(*b);
  p.give_back(*c);
  auto d = p.take(2);
  REQUIRE(d);
  CHECK(*d == std::vector<std::int32_t>{(*c)[0], (*c)[1]});
  // After churn, page lists stop being consecutive (what run coalescing must cope with).
  auto e = p.take(4);
  REQUIRE(e);
  CHECK(*e == std::vector<std::int32_t>{(*c)[2], (*c)[3], (*b)[0], (*b)[1]});
}

TEST_CASE("page_allocator: accounting returns to zero and no page is handed out twice") {
  command::page_allocator p(16);
  auto a = p.take(5);
  auto b = p.take(3);
  REQUIRE(a);
  REQUIRE(b);
  CHECK(p.used() == 8);
  std::set<std::int32_t> all(a->begin(), a->end());
  all.insert(b->begin(), b->end());
  CHECK(all.size() == 8);
  CHECK(*all.begin() >= 0);
  CHECK(*all.rbegin() < 16);
  p.give_back(*a);
  p.give_back(*b);
  CHECK(p.used() == 0);
  // Zero pages is a valid, empty allocation.
  auto none = p.take(0);
  REQUIRE(none);
  CHECK(none->empty());
  CHECK(p.used() == 0);
}

TEST_CASE("page_allocator: taking more than is free fails and changes nothing") {
  command::page_allocator p(6);
  auto a = p.take(4);
  REQUIRE(a);
  CHECK_FALSE(p.take(3));
  CHECK(p.used() == 4);
  CHECK_FALSE(p.take(-1));
  CHECK(p.used() == 4);
  auto b = p.take(2);  // exactly what is left
  REQUIRE(b);
  CHECK(p.used() == 6);
  CHECK_FALSE(p.take(1));
  command::page_allocator empty;  // a model without state has no state pages to give
  CHECK(empty.used() == 0);
  CHECK_FALSE(empty.take(1));
  CHECK(empty.take(0));
}

TEST_CASE("sim_memory: its description makes a rank_memory addressing the same bytes") {
  SUBCASE("MLA with state, decode side") {
    const auto plan = mla_plan(5);
    command::sim_memory sm(plan, false, 0, 6, 3);
    auto specs = runtime::to_buffer_specs(sm.desc());
    REQUIRE(specs);
    auto made = rank_memory::create(plan, false, 0, sm.layers(), specs.value());
    REQUIRE_MESSAGE(made.ok(), made.error().reason());
    const auto& m = made.value();
    CHECK(m.pages() == 6);
    CHECK(m.state_pages() == 6);
    CHECK(m.aux_rows() == 3);
    CHECK(m.aux_buffers().front().page_bytes == command::sim_aux_row_bytes);
    for (int l = 0; l < 3; ++l)
      for (int pg = 0; pg < 6; ++pg) {
        CHECK(m.item(l, 0, pg) == sm.item(l, 0, pg));
        CHECK(m.state_item(l, pg) == sm.state_item(l, pg));
      }
    CHECK(m.aux_buffers().front().base == sm.aux_row(0));
    // Fresh memory reads zero; the allocators start empty and sized to the memory.
    CHECK(std::all_of(sm.item(2, 0, 5), sm.item(2, 0, 5) + 48, [](std::byte b) { return b == std::byte{0}; }));
    CHECK(sm.pages.used() == 0);
    CHECK(sm.state_pages.take(6));
    CHECK_FALSE(sm.state_pages.take(1));
    CHECK(sm.aux_rows.take(3));
    CHECK_FALSE(sm.aux_rows.take(1));
  }
  SUBCASE("MHA stage, prefill side; no aux rows, no aux buffer") {
    const auto plan = mha_plan();
    const int r = config::prefill_rank_of(plan.config().prefill, {0, 1, 0, 0});
    command::sim_memory sm(plan, true, r, 4, 0);
    CHECK(sm.layers() == config::range{4, 8});
    CHECK_FALSE(sm.has_state());
    auto specs = runtime::to_buffer_specs(sm.desc());
    REQUIRE(specs);
    auto made = rank_memory::create(plan, true, r, {sm.desc().layer_begin, sm.desc().layer_end}, specs.value());
    REQUIRE_MESSAGE(made.ok(), made.error().reason());
    const auto& m = made.value();
    CHECK(m.aux_buffers().empty());
    CHECK(m.pages() == 4);
    for (int l = 4; l < 8; ++l)
      for (int b = 0; b < 2; ++b)
        for (int pg = 0; pg < 4; ++pg) CHECK(m.item(l, b, pg) == sm.item(l, b, pg));
    CHECK_FALSE(sm.state_pages.take(1));
  }
  SUBCASE("a host buffer declared CUDA memory is refused by name") {
    // Unsupported in a build without CUDA; with CUDA, the base is checked and is not device memory.
    const auto plan = mla_plan(0);
    command::sim_memory sm(plan, false, 0, 2, 1);
    auto desc = sm.desc();
    desc.buffers[0].kind = memory_kind::cuda;
    desc.buffers[0].device = 0;
    auto specs = runtime::to_buffer_specs(desc);
    REQUIRE_FALSE(specs);
    CHECK(specs.err().code() == (cuda::built_with_cuda() ? errc::invalid_argument : errc::unsupported));
    CHECK(specs.err().message().find("buffer 0") != std::string::npos);
  }
}
