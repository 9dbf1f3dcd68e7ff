// actors/kv_pool.hpp: page/buffer/layer offsets, LIFO page and aux allocators, aux checksum.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <vector>

#include "actors/kv_pool.hpp"

using namespace kvflow;

namespace {

pool_shape mha_shape() {
  pool_shape s;
  s.layers = {10, 14};  // a pipeline stage: global layers 10..13
  s.buffers_per_layer = 2;
  s.page_size = 4;
  s.local_heads = 3;
  s.head_bytes = 8;
  s.item_bytes = std::int64_t{s.local_heads} * s.page_size * s.head_bytes;
  s.pages = 7;
  s.aux_slots = 5;
  return s;
}

pool_shape mla_shape(int pages = 16, int aux = 4) {
  pool_shape s;
  s.layers = {0, 3};
  s.buffers_per_layer = 1;
  s.item_bytes = 96;
  s.page_size = 2;
  s.pages = pages;
  s.aux_slots = aux;
  return s;
}

}  // namespace

TEST_CASE("kv_pool: region sizes follow the shape") {
  kv_pool p(mha_shape());
  const auto& s = p.shape();
  CHECK(p.kv_bytes() == std::uint64_t(4 * 2 * 7) * std::uint64_t(s.item_bytes));
  CHECK(p.aux_bytes() == 5 * sizeof(aux_record));
  REQUIRE(p.kv_base() != nullptr);
  REQUIRE(p.aux_base() != nullptr);
  CHECK(p.aux_offset(3) == 3 * sizeof(aux_record));
  // Fresh memory reads zero (an empty aux slot is room 0).
  CHECK(std::all_of(p.kv_base(), p.kv_base() + p.kv_bytes(), [](std::byte b) { return b == std::byte{0}; }));
}

TEST_CASE("kv_pool: items of every (layer, buffer, page) are disjoint and inside the region") {
  for (const auto& shape : {mha_shape(), mla_shape()}) {
    kv_pool p(shape);
    std::vector<std::pair<std::uint64_t, std::uint64_t>> spans;
    for (int l = shape.layers.begin; l < shape.layers.end; ++l)
      for (int b = 0; b < shape.buffers_per_layer; ++b)
        for (int pg = 0; pg < shape.pages; ++pg) {
          auto off = p.offset(l, b, pg);
          CHECK(off + std::uint64_t(shape.item_bytes) <= p.kv_bytes());
          CHECK(p.item(l, b, pg) == p.kv_base() + off);
          spans.emplace_back(off, off + shape.item_bytes);
        }
    std::sort(spans.begin(), spans.end());
    bool disjoint = true;
    for (std::size_t i = 1; i < spans.size(); ++i) disjoint = disjoint && spans[i - 1].second <= spans[i].first;
    CHECK(disjoint);
    // They tile the region exactly.
    CHECK(spans.front().first == 0);
    CHECK(spans.back().second == p.kv_bytes());
    // Pages of one layer buffer are consecutive (what run coalescing relies on).
    CHECK(p.offset(shape.layers.begin, 0, 1) - p.offset(shape.layers.begin, 0, 0) ==
          std::uint64_t(shape.item_bytes));
  }
}

TEST_CASE("kv_pool: alloc/free accounting returns to zero") {
  kv_pool p(mla_shape(16, 4));
  CHECK(p.used_pages() == 0);
  CHECK(p.used_aux() == 0);
  auto a = p.alloc_pages(5);
  auto b = p.alloc_pages(3);
  REQUIRE(a);
  REQUIRE(b);
  CHECK(a->size() == 5);
  CHECK(b->size() == 3);
  CHECK(p.used_pages() == 8);
  // No page is handed out twice.
  std::set<std::int32_t> all(a->begin(), a->end());
  all.insert(b->begin(), b->end());
  CHECK(all.size() == 8);
  CHECK(*all.begin() >= 0);
  CHECK(*all.rbegin() < 16);
  auto s1 = p.alloc_aux();
  auto s2 = p.alloc_aux();
  REQUIRE(s1);
  REQUIRE(s2);
  CHECK(*s1 != *s2);
  CHECK(p.used_aux() == 2);
  p.free_pages(*a);
  p.free_pages(*b);
  p.free_aux(*s1);
  p.free_aux(*s2);
  CHECK(p.used_pages() == 0);
  CHECK(p.used_aux() == 0);
  // Zero pages is a valid, empty allocation.
  auto none = p.alloc_pages(0);
  REQUIRE(none);
  CHECK(none->empty());
  CHECK(p.used_pages() == 0);
}

TEST_CASE("kv_pool: a fresh pool hands out consecutive pages") {
  kv_pool p(mla_shape(16, 4));
  auto a = p.alloc_pages(4);
  REQUIRE(a);
  CHECK(*a == std::vector<std::int32_t>{0, 1, 2, 3});
  auto b = p.alloc_pages(2);
  CHECK(*b == std::vector<std::int32_t>{4, 5});
}

TEST_CASE("kv_pool: LIFO reuse: the pages freed last come back first") {
  kv_pool p(mla_shape(16, 4));
  auto a = p.alloc_pages(4);
  auto b = p.alloc_pages(4);
  p.free_pages(*a);
  auto c = p.alloc_pages(4);
  CHECK(*c == *a);  // same pages, same order
  p.free_pages(*b);
  p.free_pages(*c);
  auto d = p.alloc_pages(2);
  CHECK(*d == std::vector<std::int32_t>{(*c)[0], (*c)[1]});

  auto s1 = p.alloc_aux();
  auto s2 = p.alloc_aux();
  p.free_aux(*s1);
  CHECK(*p.alloc_aux() == *s1);
  p.free_aux(*s2);
  CHECK(*p.alloc_aux() == *s2);
}

TEST_CASE("kv_pool: allocation beyond capacity returns nullopt and changes nothing") {
  kv_pool p(mla_shape(6, 2));
  auto a = p.alloc_pages(4);
  REQUIRE(a);
  CHECK_FALSE(p.alloc_pages(3));
  CHECK(p.used_pages() == 4);
  CHECK_FALSE(p.alloc_pages(-1));
  CHECK(p.used_pages() == 4);
  auto b = p.alloc_pages(2);  // exactly what is left
  REQUIRE(b);
  CHECK(p.used_pages() == 6);
  CHECK_FALSE(p.alloc_pages(1));

  REQUIRE(p.alloc_aux());
  REQUIRE(p.alloc_aux());
  CHECK_FALSE(p.alloc_aux());
  CHECK(p.used_aux() == 2);
}

TEST_CASE("kv_pool: alloc_aux zeroes a recycled slot so it never looks landed") {
  kv_pool p(mla_shape(4, 2));
  auto s = p.alloc_aux();
  REQUIRE(s);
  auto* rec = reinterpret_cast<aux_record*>(p.aux_base() + p.aux_offset(*s));
  *rec = aux_record{77, 3, 123, -0.25f, 0};
  rec->check = aux_checksum(*rec);
  // The neighbour slot is untouched by the write.
  const int other = *s == 0 ? 1 : 0;
  auto* nb = reinterpret_cast<aux_record*>(p.aux_base() + p.aux_offset(other));
  CHECK(nb->room == 0);
  p.free_aux(*s);
  auto again = p.alloc_aux();
  REQUIRE(again);
  REQUIRE(*again == *s);
  CHECK(rec->room == 0);
  CHECK(rec->incarnation == 0);
  CHECK(rec->first_token == 0);
  CHECK(rec->first_logprob == 0.f);
  CHECK(rec->check == 0);
}

TEST_CASE("kv_pool: aux_checksum is never 0 and changes with every field") {
  aux_record base{42, 7, 1000, -0.5f, 0};
  const auto h = aux_checksum(base);
  CHECK(h != 0);
  CHECK(aux_checksum(aux_record{}) != 0);  // an all-zero slot never checks out
  CHECK(aux_checksum(base) == h);          // deterministic
  auto changed = [&](auto mutate) {
    aux_record r = base;
    mutate(r);
    return aux_checksum(r) != h;
  };
  CHECK(changed([](aux_record& r) { r.room = 43; }));
  CHECK(changed([](aux_record& r) { r.room = 0; }));
  CHECK(changed([](aux_record& r) { r.incarnation = 8; }));
  CHECK(changed([](aux_record& r) { r.first_token = 1001; }));
  CHECK(changed([](aux_record& r) { r.first_token = -1000; }));
  CHECK(changed([](aux_record& r) { r.first_logprob = -0.25f; }));
  CHECK(changed([](aux_record& r) { r.first_logprob = 0.5f; }));
  // Swapped fields are not the same record.
  CHECK(changed([](aux_record& r) { std::swap(r.room, r.incarnation); }));
  // The check field itself is not hashed (it stores the hash).
  CHECK_FALSE(changed([](aux_record& r) { r.check = 12345; }));
  // Many distinct records: never 0, and (practically) no collisions.
  std::set<std::uint64_t> seen;
  for (std::uint64_t room = 0; room < 50; ++room)
    for (std::uint64_t inc = 0; inc < 20; ++inc) {
      auto v = aux_checksum(aux_record{room, inc, static_cast<std::int32_t>(room * 3), 0.f, 0});
      CHECK(v != 0);
      seen.insert(v);
    }
  CHECK(seen.size() == 1000);
}

TEST_CASE("kv_pool: state pages are allocated, laid out and accounted apart from KV pages") {
  pool_shape s;
  s.layers = {2, 5};
  s.buffers_per_layer = 1;
  s.page_size = 4;
  s.item_bytes = 64;
  s.pages = 6;
  s.state_item_bytes = 16;
  s.state_pages = 6;
  kv_pool p(s);
  CHECK(p.state_bytes() == 3u * 6 * 16);
  // Offsets of every (layer, page) are disjoint and inside the state region.
  std::vector<std::uint64_t> seen;
  for (int l = 2; l < 5; ++l)
    for (int pg = 0; pg < 6; ++pg) {
      auto off = p.state_offset(l, pg);
      CHECK(off + 16 <= p.state_bytes());
      CHECK(std::find(seen.begin(), seen.end(), off) == seen.end());
      seen.push_back(off);
    }
  auto st = p.alloc_state(4);
  REQUIRE(st);
  CHECK(p.used_state_pages() == 4);
  CHECK(p.used_pages() == 0);  // KV pages are a separate pool
  CHECK_FALSE(p.alloc_state(3));
  p.free_state(*st);
  CHECK(p.used_state_pages() == 0);
  // A model without state has no state region and no state pages to give.
  pool_shape none = s;
  none.state_item_bytes = 0;
  none.state_pages = 0;
  kv_pool q(none);
  CHECK(q.state_bytes() == 0);
  CHECK_FALSE(q.alloc_state(1));
  CHECK(q.alloc_state(0));
}
