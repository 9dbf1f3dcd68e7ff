// actors/messages.hpp: every message type survives CAF 0.17 binary serialization, both directly
// through its inspector and wrapped in a caf::message (which needs add_message_types).
#include <doctest/doctest.h>

#include <caf/all.hpp>
#include <caf/binary_deserializer.hpp>
#include <caf/binary_serializer.hpp>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "actors/messages.hpp"

using namespace kvflow;
using namespace kvflow::msg;

namespace {

constexpr auto u64_max = std::numeric_limits<std::uint64_t>::max();

// One small actor system per test; two scheduler threads are plenty.
struct sys_fixture {
  static caf::actor_system_config& config(caf::actor_system_config& cfg) {
    add_message_types(cfg);
    cfg.set("scheduler.max-threads", std::size_t{2});
    return cfg;
  }
  caf::actor_system_config cfg;
  caf::actor_system sys{config(cfg)};
  caf::actor dummy;  // a real actor to put into handle fields

  sys_fixture() {
    dummy = sys.spawn([]() -> caf::behavior {
      return {[](std::int32_t) {}};
    });
  }
  ~sys_fixture() { caf::anon_send_exit(dummy, caf::exit_reason::kill); }

  // Serializes through the type's inspector and reads it back.
  template <class T>
  T direct(T x) {
    std::vector<char> buf;
    caf::binary_serializer sink{sys, buf};
    auto err = sink(x);
    REQUIRE_MESSAGE(!err, sys.render(err));
    if (!std::is_empty<T>::value) CHECK_FALSE(buf.empty());
    T y;
    caf::binary_deserializer source{sys, buf};
    err = source(y);
    REQUIRE_MESSAGE(!err, sys.render(err));
    CHECK(source.remaining() == 0);  // every byte was consumed: the layouts agree
    return y;
  }

  // Serializes a caf::message holding x (as a remote send would) and reads it back.
  template <class T>
  T wrapped(const T& x) {
    auto m = caf::make_message(x);
    std::vector<char> buf;
    caf::binary_serializer sink{sys, buf};
    auto err = sink(m);
    REQUIRE_MESSAGE(!err, sys.render(err));
    caf::message back;
    caf::binary_deserializer source{sys, buf};
    err = source(back);
    REQUIRE_MESSAGE(!err, sys.render(err));
    REQUIRE(back.size() == 1);
    REQUIRE(back.match_element<T>(0));
    return back.get_as<T>(0);
  }

  // Both paths, each result checked by `same`.
  template <class T, class Check>
  void round_trip(const T& x, Check same) {
    same(x, direct(x));
    same(x, wrapped(x));
  }
};

step_states sample_states() {
  return {{1, 1, 4}, {2, 7, 0}, {u64_max, u64_max, 3}};
}

void same_pool(const remote_pool& a, const remote_pool& b) {
  CHECK(b.kv_region == a.kv_region);
  CHECK(b.kv_bytes == a.kv_bytes);
  CHECK(b.layer_begin == a.layer_begin);
  CHECK(b.layer_count == a.layer_count);
  CHECK(b.buffers_per_layer == a.buffers_per_layer);
  CHECK(b.pages == a.pages);
  CHECK(b.item_bytes == a.item_bytes);
  CHECK(b.aux_region == a.aux_region);
  CHECK(b.aux_slots == a.aux_slots);
  CHECK(b.page_size == a.page_size);
  CHECK(b.local_heads == a.local_heads);
  CHECK(b.head_bytes == a.head_bytes);
}

}  // namespace

TEST_CASE("messages: agreement messages round-trip") {
  sys_fixture f;
  f.round_trip(step_report{u64_max - 3, 5, sample_states()}, [](const auto& a, const auto& b) {
    CHECK(b.round == a.round);
    CHECK(b.child == a.child);
    CHECK(b.states == a.states);
  });
  f.round_trip(step_report{1, 0, {}}, [](const auto&, const auto& b) { CHECK(b.states.empty()); });
  f.round_trip(agreed_round{42, -1, sample_states()}, [](const auto& a, const auto& b) {
    CHECK(b.round == a.round);
    CHECK(b.group == a.group);
    CHECK(b.states == a.states);
  });
  f.round_trip(room_timeout{u64_max, 9}, [](const auto& a, const auto& b) {
    CHECK(b.room == a.room);
    CHECK(b.incarnation == a.incarnation);
  });
  f.round_trip(early_expiry{u64_max}, [](const auto& a, const auto& b) { CHECK(b.room == a.room); });
  f.round_trip(board_round{77}, [](const auto& a, const auto& b) { CHECK(b.round == a.round); });
  f.round_trip(push_done{3, 4, 5, false, "transport: région refusée"},
               [](const auto& a, const auto& b) {
                 CHECK(b.room == a.room);
                 CHECK(b.incarnation == a.incarnation);
                 CHECK(b.decode_rank == a.decode_rank);
                 CHECK(b.ok == a.ok);
                 CHECK(b.reason == a.reason);
               });
  f.round_trip(push_done{3, 4, 5, true, ""}, [](const auto&, const auto& b) {
    CHECK(b.ok);
    CHECK(b.reason.empty());
  });
  f.round_trip(step_tick{}, [](const auto&, const auto&) {});
}

TEST_CASE("messages: actor handles round-trip (null and live)") {
  sys_fixture f;
  f.round_trip(attach_child{3, f.dummy}, [](const auto& a, const auto& b) {
    CHECK(b.index == a.index);
    CHECK(b.child == a.child);
  });
  f.round_trip(attach_child{0, caf::actor{}}, [](const auto&, const auto& b) {
    CHECK_FALSE(b.child);
  });
  f.round_trip(attach_rank{f.dummy}, [](const auto& a, const auto& b) { CHECK(b.rank == a.rank); });
}

TEST_CASE("messages: bootstrap registry messages round-trip") {
  sys_fixture f;
  // rank_key only travels inside other messages: its inspector, not the types list.
  CHECK(f.direct(rank_key{1, 2, 3, 4}) == rank_key{1, 2, 3, 4});
  f.round_trip(register_rank{7, {1, 7, 3, 1}, "prefill rank 59", f.dummy},
               [](const auto& a, const auto& b) {
                 CHECK(b.version == a.version);  // a foreign version survives, not defaulted
                 CHECK(b.key == a.key);
                 CHECK(b.name == a.name);
                 CHECK(b.rank == a.rank);
               });
  f.round_trip(registration_reply{true, u64_max, ""}, [](const auto& a, const auto& b) {
    CHECK(b.ok == a.ok);
    CHECK(b.generation == a.generation);
    CHECK(b.reason.empty());
  });
  f.round_trip(registration_reply{false, 0, "key (0,1,2,0) owned by prefill rank 9 and 12"},
               [](const auto& a, const auto& b) {
                 CHECK_FALSE(b.ok);
                 CHECK(b.reason == a.reason);
               });
  f.round_trip(register_decode{12, f.dummy}, [](const auto& a, const auto& b) {
    CHECK(b.rank == a.rank);
    CHECK(b.handle == a.handle);
  });
  f.round_trip(lookup_decode{-4}, [](const auto& a, const auto& b) { CHECK(b.rank == a.rank); });
  f.round_trip(decode_entry{5, f.dummy}, [](const auto& a, const auto& b) {
    CHECK(b.rank == a.rank);
    CHECK(b.handle == a.handle);
  });
  f.round_trip(decode_entry{6, caf::actor{}}, [](const auto&, const auto& b) {
    CHECK(b.rank == 6);
    CHECK_FALSE(b.handle);  // "never registered" survives the trip
  });
  f.round_trip(topology_query{3}, [](const auto& a, const auto& b) { CHECK(b.version == a.version); });

  topology_reply t;
  t.version = 2;
  t.tp = 8;
  t.cp = 8;
  t.pp = 2;
  t.dp = 1;
  t.page_size = 64;
  t.dtype = "fp8";
  t.layout = "mha:32:8:128";
  t.entries = {{{0, 0, 0, 0}, "prefill rank 0", f.dummy, 1},
               {{0, 7, 3, 1}, "prefill rank 123", caf::actor{}, u64_max}};
  f.round_trip(t, [](const auto& a, const auto& b) {
    CHECK(b.version == a.version);
    CHECK(b.tp == a.tp);
    CHECK(b.cp == a.cp);
    CHECK(b.pp == a.pp);
    CHECK(b.dp == a.dp);
    CHECK(b.page_size == a.page_size);
    CHECK(b.dtype == a.dtype);
    CHECK(b.layout == a.layout);
    REQUIRE(b.entries.size() == a.entries.size());
    for (std::size_t i = 0; i < a.entries.size(); ++i) {
      CHECK(b.entries[i].key == a.entries[i].key);
      CHECK(b.entries[i].name == a.entries[i].name);
      CHECK(b.entries[i].rank == a.entries[i].rank);
      CHECK(b.entries[i].generation == a.entries[i].generation);
    }
  });
  f.round_trip(topology_reply{}, [](const auto&, const auto& b) { CHECK(b.entries.empty()); });
}

TEST_CASE("messages: decode -> prefill messages round-trip") {
  sys_fixture f;
  kv_registration reg;
  reg.version = 1;
  reg.decode_rank = 13;
  reg.dp = 1;
  reg.pp = 0;
  reg.tp = 5;
  reg.tp_size = 8;
  reg.pool = {11, u64_max - 1, 31, 30, 2, 4096, std::int64_t{1} << 40, 12, 512, 64, 4, 256};
  reg.decode = f.dummy;
  f.round_trip(reg, [](const auto& a, const auto& b) {
    CHECK(b.version == a.version);
    CHECK(b.decode_rank == a.decode_rank);
    CHECK(b.dp == a.dp);
    CHECK(b.pp == a.pp);
    CHECK(b.tp == a.tp);
    CHECK(b.tp_size == a.tp_size);
    same_pool(a.pool, b.pool);
    CHECK(b.decode == a.decode);
  });

  dst_info d;
  d.version = 1;
  d.room = u64_max;
  d.incarnation = 3;
  d.decode_rank = 2;
  for (std::int32_t i = 0; i < 1000; ++i) d.dst_pages.push_back(i * 7 % 4093);
  d.dst_pages.push_back(std::numeric_limits<std::int32_t>::max());
  d.dst_pages.push_back(-1);  // garbage a peer might send: carried as is, checked later
  d.aux_slot = 17;
  d.state_indices = {5, 4, 3};
  d.prefix_pages = 12;
  f.round_trip(d, [](const auto& a, const auto& b) {
    CHECK(b.version == a.version);
    CHECK(b.room == a.room);
    CHECK(b.incarnation == a.incarnation);
    CHECK(b.decode_rank == a.decode_rank);
    CHECK(b.dst_pages == a.dst_pages);
    CHECK(b.aux_slot == a.aux_slot);
    CHECK(b.state_indices == a.state_indices);
    CHECK(b.prefix_pages == a.prefix_pages);
  });
  f.round_trip(dst_info{}, [](const auto&, const auto& b) {
    CHECK(b.dst_pages.empty());
    CHECK(b.state_indices.empty());
  });
  f.round_trip(abort_room{8, 2, 1, "waiting timeout"}, [](const auto& a, const auto& b) {
    CHECK(b.room == a.room);
    CHECK(b.incarnation == a.incarnation);
    CHECK(b.decode_rank == a.decode_rank);
    CHECK(b.reason == a.reason);
  });
}

TEST_CASE("messages: prefill -> decode and scheduler messages round-trip") {
  sys_fixture f;
  f.round_trip(kv_status{9, 2, 31, 4, "ok"}, [](const auto& a, const auto& b) {
    CHECK(b.room == a.room);
    CHECK(b.incarnation == a.incarnation);
    CHECK(b.prefill_rank == a.prefill_rank);
    CHECK(b.state == a.state);
    CHECK(b.reason == a.reason);
  });
  f.round_trip(abort_ack{u64_max, 1, 0}, [](const auto& a, const auto& b) {
    CHECK(b.room == a.room);
    CHECK(b.incarnation == a.incarnation);
    CHECK(b.prefill_rank == a.prefill_rank);
  });
  f.round_trip(new_request{77, 2, 32768, 1, 3, 5, 0x81}, [](const auto& a, const auto& b) {
    CHECK(b.room == a.room);
    CHECK(b.incarnation == a.incarnation);
    CHECK(b.prompt_tokens == a.prompt_tokens);
    CHECK(b.prefill_dp == a.prefill_dp);
    CHECK(b.decode_dp == a.decode_dp);
    CHECK(b.prefix_pages == a.prefix_pages);
    CHECK(b.fault == a.fault);
  });
  f.round_trip(kv_chunk{77, 2, 16, 512, true}, [](const auto& a, const auto& b) {
    CHECK(b.room == a.room);
    CHECK(b.incarnation == a.incarnation);
    CHECK(b.page_begin == a.page_begin);
    CHECK(b.page_end == a.page_end);
    CHECK(b.is_last == a.is_last);
  });
  f.round_trip(kv_chunk{1, 1, 0, 0, false}, [](const auto&, const auto& b) { CHECK_FALSE(b.is_last); });
  f.round_trip(abort_request{5, 6, "client went away"}, [](const auto& a, const auto& b) {
    CHECK(b.room == a.room);
    CHECK(b.incarnation == a.incarnation);
    CHECK(b.reason == a.reason);
  });
  rank_released r;
  r.prefill = false;
  r.rank = 63;
  r.room = 1ULL << 50;
  r.incarnation = 4;
  r.round = 123456789;
  r.state = 0;
  r.reason = "peer down";
  r.bytes_expected = 1310000000ULL;
  r.bytes_verified = 1309999999ULL;
  r.mismatched_pages = 1;
  f.round_trip(r, [](const auto& a, const auto& b) {
    CHECK(b.prefill == a.prefill);
    CHECK(b.rank == a.rank);
    CHECK(b.room == a.room);
    CHECK(b.incarnation == a.incarnation);
    CHECK(b.round == a.round);
    CHECK(b.state == a.state);
    CHECK(b.reason == a.reason);
    CHECK(b.bytes_expected == a.bytes_expected);
    CHECK(b.bytes_verified == a.bytes_verified);
    CHECK(b.mismatched_pages == a.mismatched_pages);
  });
  f.round_trip(pool_usage_query{}, [](const auto&, const auto&) {});
  f.round_trip(pool_usage{false, 7, 1 << 20, 3, 12}, [](const auto& a, const auto& b) {
    CHECK(b.prefill == a.prefill);
    CHECK(b.rank == a.rank);
    CHECK(b.used_pages == a.used_pages);
    CHECK(b.used_aux == a.used_aux);
    CHECK(b.live_rooms == a.live_rooms);
  });
}

TEST_CASE("messages: a truncated buffer is an error, not garbage") {
  sys_fixture f;
  dst_info d;
  d.room = 5;
  d.dst_pages = {1, 2, 3, 4};
  std::vector<char> buf;
  caf::binary_serializer sink{f.sys, buf};
  REQUIRE(!sink(d));
  buf.resize(buf.size() - 3);
  dst_info back;
  caf::binary_deserializer source{f.sys, buf};
  CHECK(static_cast<bool>(source(back)));
}
