// actors/messages.hpp and the command's command/engine_messages.hpp: every message type survives CAF 0.17 binary serialization, both directly
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
#include "command/engine_messages.hpp"

using namespace kvflow;
using namespace kvflow::msg;

namespace {

constexpr auto u64_max = std::numeric_limits<std::uint64_t>::max();

// One small actor system per test; two scheduler threads are plenty.
struct sys_fixture {
  static caf::actor_system_config& config(caf::actor_system_config& cfg) {
    add_message_types(cfg);
    kvflow::command::msg::add_engine_message_types(cfg);
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

  // A type that never leaves its process: through its inspector only (it is not registered).
  template <class T, class Check>
  void local_trip(const T& x, Check same) {
    same(x, direct(x));
  }

  // Both paths, each result checked by `same`.
  template <class T, class Check>
  void round_trip(const T& x, Check same) {
    same(x, direct(x));
    same(x, wrapped(x));
  }
};

// Terminal and live states, released or not (`released` travels with the state).
step_states sample_states() {
  return {{1, 1, 4, true}, {2, 7, 0, false}, {3, 1, 0, true}, {u64_max, u64_max, 3, false}};
}

void same_buffer(const remote_buffer& a, const remote_buffer& b) {
  CHECK(b.region == a.region);
  CHECK(b.offset == a.offset);
  CHECK(b.bytes == a.bytes);
  CHECK(b.page_bytes == a.page_bytes);
}

void same_buffers(const std::vector<remote_buffer>& a, const std::vector<remote_buffer>& b) {
  REQUIRE(b.size() == a.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    CAPTURE(i);
    same_buffer(a[i], b[i]);
  }
}

void same_pool(const remote_pool& a, const remote_pool& b) {
  CHECK(b.layer_begin == a.layer_begin);
  CHECK(b.layer_count == a.layer_count);
  CHECK(b.buffers_per_layer == a.buffers_per_layer);
  CHECK(b.pages == a.pages);
  CHECK(b.item_bytes == a.item_bytes);
  CHECK(b.page_size == a.page_size);
  CHECK(b.local_heads == a.local_heads);
  CHECK(b.head_bytes == a.head_bytes);
  same_buffers(a.kv, b.kv);
  same_buffers(a.aux, b.aux);
  CHECK(b.aux_rows == a.aux_rows);
  same_buffers(a.state, b.state);
  CHECK(b.state_pages == a.state_pages);
  CHECK(b.state_item_bytes == a.state_item_bytes);
  same_buffer(a.receipts, b.receipts);
}

// A registration as an MHA decode rank of 2 PP layers would describe it: K and V per layer,
// two aux buffers, state per layer, receipts; extreme values where the wire must not clip them.
remote_pool sample_pool() {
  remote_pool p;
  p.layer_begin = 30;
  p.layer_count = 2;
  p.buffers_per_layer = 2;
  p.pages = 4096;
  p.item_bytes = std::int64_t{1} << 40;
  p.page_size = 64;
  p.local_heads = 4;
  p.head_bytes = 256;
  for (std::uint64_t i = 0; i < 4; ++i) p.kv.push_back({11 + i, i * 1000, u64_max - i, std::uint64_t(1) << 40});
  p.aux = {{20, 0, 64 * 17, 64}, {21, 8, 16 * 17, 16}};
  p.aux_rows = 17;
  p.state = {{30, 0, 4096 * 528, 528}, {30, 4096 * 528, 4096 * 528, 528}};
  p.state_pages = 4096;
  p.state_item_bytes = 528;
  p.receipts = {40, 0, 17 * sizeof(aux_record), sizeof(aux_record)};
  return p;
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
  f.local_trip(room_timeout{u64_max, 9}, [](const auto& a, const auto& b) {
    CHECK(b.room == a.room);
    CHECK(b.incarnation == a.incarnation);
  });
  f.local_trip(early_expiry{u64_max, 7}, [](const auto& a, const auto& b) {
    CHECK(b.room == a.room);
    CHECK(b.incarnation == a.incarnation);
  });
  f.local_trip(board_round{77}, [](const auto& a, const auto& b) { CHECK(b.round == a.round); });
  f.local_trip(push_done{3, 4, 5, false, "transport: région refusée", 0, 0.0},
               [](const auto& a, const auto& b) {
                 CHECK(b.room == a.room);
                 CHECK(b.incarnation == a.incarnation);
                 CHECK(b.decode_rank == a.decode_rank);
                 CHECK(b.ok == a.ok);
                 CHECK(b.reason == a.reason);
                 CHECK(b.bytes == 0);
               });
  f.local_trip(push_done{3, 4, 5, true, "", u64_max, 1.0 / 3}, [](const auto& a, const auto& b) {
    CHECK(b.ok);
    CHECK(b.reason.empty());
    CHECK(b.bytes == a.bytes);      // the push's payload and duration travel too
    CHECK(b.seconds == a.seconds);  // exactly: a double is not rounded on the wire
  });
}

TEST_CASE("messages: room_state.released survives the wire, inside rounds and on its own") {
  sys_fixture f;
  CHECK(wire_version >= 3);  // states carry `released` since version 3 (4: supervisor entries name a segment)
  for (bool released : {false, true}) {
    CAPTURE(released);
    const room_state s{9, 2, 4, released};
    const auto back = f.direct(s);
    CHECK(back.released == released);
    CHECK(back == s);
  }
  // Two states that differ only in `released` are not the same state.
  CHECK_FALSE(room_state{9, 2, 4, true} == room_state{9, 2, 4, false});
  f.round_trip(agreed_round{7, 3, sample_states()}, [](const auto& a, const auto& b) {
    REQUIRE(b.states.size() == a.states.size());
    for (std::size_t i = 0; i < a.states.size(); ++i) CHECK(b.states[i].released == a.states[i].released);
  });
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
  kvflow::kv_handshake shape;
  shape.page_size = 64;
  shape.dtype = "fp8";
  shape.layout = "mha:32:8:128";
  shape.cp_send_all = true;
  shape.prefill_tp = 8;
  shape.prefill_cp = 4;
  shape.prefill_pp = 2;
  shape.prefill_dp = 3;
  shape.decode_tp = 2;
  shape.decode_pp = 5;
  shape.decode_dp = 7;
  f.round_trip(register_rank{7, {1, 7, 3, 1}, "prefill rank 59", f.dummy, shape},
               [](const auto& a, const auto& b) {
                 CHECK(b.version == a.version);  // a foreign version survives, not defaulted
                 CHECK(b.key == a.key);
                 CHECK(b.name == a.name);
                 CHECK(b.rank == a.rank);
                 CHECK(kvflow::handshake_mismatch(a.shape, b.shape).empty());
                 CHECK(b.shape.decode_dp == 7);
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
  t.entries = {{{0, 0, 0, 0}, "prefill rank 0", f.dummy, 1, shape},
               {{0, 7, 3, 1}, "prefill rank 123", caf::actor{}, u64_max, {}}};
  f.round_trip(t, [](const auto& a, const auto& b) {
    CHECK(b.version == a.version);
    CHECK(b.tp == a.tp);
    CHECK(b.cp == a.cp);
    CHECK(b.pp == a.pp);
    CHECK(b.dp == a.dp);
    REQUIRE(b.entries.size() == a.entries.size());
    for (std::size_t i = 0; i < a.entries.size(); ++i) {
      CHECK(b.entries[i].key == a.entries[i].key);
      CHECK(b.entries[i].name == a.entries[i].name);
      CHECK(b.entries[i].rank == a.entries[i].rank);
      CHECK(b.entries[i].generation == a.entries[i].generation);
      CHECK(kvflow::handshake_mismatch(a.entries[i].shape, b.entries[i].shape).empty());
    }
  });
  f.round_trip(topology_reply{}, [](const auto&, const auto& b) { CHECK(b.entries.empty()); });
  f.round_trip(decode_entry{7, f.dummy, true}, [](const auto& a, const auto& b) {
    CHECK(b.handle == a.handle);
    CHECK(b.down);
  });
}

TEST_CASE("messages: node and supervisor registry messages round-trip (with the engine handle)") {
  sys_fixture f;
  CHECK(register_node{}.version == wire_version);
  f.round_trip(register_node{1, "decode 0", "10.0.0.7", 65535, true, f.dummy}, [](const auto& a, const auto& b) {
    CHECK(b.version == a.version);  // a foreign version survives, not defaulted
    CHECK(b.name == a.name);
    CHECK(b.host == a.host);
    CHECK(b.port == a.port);
    CHECK(b.meshed == a.meshed);
    CHECK(b.engine == a.engine);
  });
  f.round_trip(register_node{wire_version, "launcher", "127.0.0.1", 0, false, caf::actor{}},
               [](const auto&, const auto& b) {
                 CHECK_FALSE(b.engine);  // a node without an engine stays without one
                 CHECK_FALSE(b.meshed);
               });
  node_table t;
  t.nodes = {{"prefill 3", "h1", 4000, true, f.dummy}, {"launcher", "h2", 1, false, caf::actor{}}};
  f.round_trip(t, [](const auto& a, const auto& b) {
    REQUIRE(b.nodes.size() == a.nodes.size());
    for (std::size_t i = 0; i < a.nodes.size(); ++i) {
      CHECK(b.nodes[i].name == a.nodes[i].name);
      CHECK(b.nodes[i].host == a.nodes[i].host);
      CHECK(b.nodes[i].port == a.nodes[i].port);
      CHECK(b.nodes[i].meshed == a.nodes[i].meshed);
      CHECK(b.nodes[i].engine == a.nodes[i].engine);
    }
  });
  f.round_trip(node_entry{"decode 1", "h3", 7, true, f.dummy}, [](const auto& a, const auto& b) {
    CHECK(b.name == a.name);
    CHECK(b.engine == a.engine);
  });
  f.round_trip(node_query{}, [](const auto&, const auto&) {});
  f.round_trip(register_supervisor{100003, -1, f.dummy, "/kvflow-1-00ff-g3"}, [](const auto& a, const auto& b) {
    CHECK(b.group == a.group);
    CHECK(b.index == a.index);
    CHECK(b.handle == a.handle);
    CHECK(b.shared_memory == a.shared_memory);
  });
  f.round_trip(lookup_supervisor{5, 7}, [](const auto& a, const auto& b) {
    CHECK(b.group == a.group);
    CHECK(b.index == a.index);
  });
  f.round_trip(supervisor_entry{5, 7, caf::actor{}, "/kvflow-2-g5"}, [](const auto& a, const auto& b) {
    CHECK_FALSE(b.handle);
    CHECK(b.shared_memory == a.shared_memory);
  });
  f.round_trip(set_registry{f.dummy}, [](const auto& a, const auto& b) { CHECK(b.registry == a.registry); });
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
  reg.pool = sample_pool();
  reg.decode = f.dummy;
  reg.endpoint = std::string("\x00\x01ucx-worker\xff", 14);  // binary: carried byte for byte
  reg.regions = {{11, u64_max, 0x7f0000001000, "rkey\x00packed"}, {40, 408, 1, ""}};
  reg.shape.layout = "dsv32";
  reg.shape.page_size = 64;
  reg.shape.decode_tp = 8;
  f.round_trip(reg, [](const auto& a, const auto& b) {
    CHECK(kvflow::handshake_mismatch(a.shape, b.shape).empty());
    CHECK(b.shape.layout == "dsv32");
    CHECK(b.version == a.version);
    CHECK(b.decode_rank == a.decode_rank);
    CHECK(b.dp == a.dp);
    CHECK(b.pp == a.pp);
    CHECK(b.tp == a.tp);
    CHECK(b.tp_size == a.tp_size);
    same_pool(a.pool, b.pool);
    CHECK(b.decode == a.decode);
    CHECK(b.endpoint == a.endpoint);
    REQUIRE(b.regions.size() == a.regions.size());
    for (std::size_t i = 0; i < a.regions.size(); ++i) {
      CHECK(b.regions[i].id == a.regions[i].id);
      CHECK(b.regions[i].size == a.regions[i].size);
      CHECK(b.regions[i].address == a.regions[i].address);
      CHECK(b.regions[i].remote_key == a.regions[i].remote_key);
    }
  });
  // A registration of an MLA rank without state or aux: the empty lists stay empty.
  f.round_trip(kv_registration{}, [](const auto&, const auto& b) {
    CHECK(b.version == wire_version);
    CHECK(b.pool.kv.empty());
    CHECK(b.pool.aux.empty());
    CHECK(b.pool.state.empty());
    CHECK(b.regions.empty());
  });
  // The pieces travel alone too (they are registered message types of their own).
  f.round_trip(remote_buffer{u64_max, u64_max - 1, 3, 1}, [](const auto& a, const auto& b) { same_buffer(a, b); });
  f.round_trip(transport::region_desc{9, 1 << 20, u64_max, "k"}, [](const auto& a, const auto& b) {
    CHECK(b.id == a.id);
    CHECK(b.size == a.size);
    CHECK(b.address == a.address);
    CHECK(b.remote_key == a.remote_key);
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

TEST_CASE("messages: prefill -> decode and the command's router messages round-trip") {
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
  f.round_trip(command::msg::new_request{77, 2, 32768, 1, 3, 5, 0x81}, [](const auto& a, const auto& b) {
    CHECK(b.room == a.room);
    CHECK(b.incarnation == a.incarnation);
    CHECK(b.prompt_tokens == a.prompt_tokens);
    CHECK(b.prefill_dp == a.prefill_dp);
    CHECK(b.decode_dp == a.decode_dp);
    CHECK(b.prefix_pages == a.prefix_pages);
    CHECK(b.fault == a.fault);
  });
  f.round_trip(command::msg::abort_request{5, 6, "client went away"}, [](const auto& a, const auto& b) {
    CHECK(b.room == a.room);
    CHECK(b.incarnation == a.incarnation);
    CHECK(b.reason == a.reason);
  });
  command::msg::rank_released r;
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
  f.round_trip(command::msg::pool_usage_query{}, [](const auto&, const auto&) {});
  f.round_trip(command::msg::pool_usage{false, 7, 1 << 20, 3, 12, u64_max, 1ULL << 33, 5}, [](const auto& a, const auto& b) {
    CHECK(b.prefill == a.prefill);
    CHECK(b.rank == a.rank);
    CHECK(b.used_pages == a.used_pages);
    CHECK(b.used_aux == a.used_aux);
    CHECK(b.live_rooms == a.live_rooms);
    CHECK(b.bytes_moved == a.bytes_moved);
    CHECK(b.peak_rss_bytes == a.peak_rss_bytes);
    CHECK(b.draining_pages == a.draining_pages);
  });
}

// The engine's calls, a rank's timers and transport completions reach a rank only from its own
// process: their types are not registered, so a peer that sends one (here: bytes from a system
// that registered them under the same names) arrives as nothing.
TEST_CASE("messages: what a rank takes only from its own process cannot come from another") {
  sys_fixture f;
  caf::actor_system_config forger_cfg;
  kvflow::msg::add_message_types(forger_cfg);
  forger_cfg.add_message_type<api_create>("kvflow.api_create");
  forger_cfg.add_message_type<api_abort>("kvflow.api_abort");
  forger_cfg.add_message_type<api_apply>("kvflow.api_apply");
  forger_cfg.add_message_type<room_timeout>("kvflow.room_timeout");
  forger_cfg.add_message_type<push_done>("kvflow.push_done");
  caf::actor_system forger{forger_cfg};
  // CAF 0.17 reads an element of a type it does not know as nothing (an empty message), which
  // no handler of a rank takes.
  auto refused = [&](auto x) {
    std::vector<char> buf;
    caf::binary_serializer sink{forger, buf};
    REQUIRE_FALSE(sink(caf::make_message(x)));
    caf::message back;
    caf::binary_deserializer source{f.sys, buf};
    auto err = source(back);
    return static_cast<bool>(err) || back.size() != 1 || !back.match_element<decltype(x)>(0);
  };
  CHECK(refused(api_create{5, 1, 0}));
  CHECK(refused(api_abort{5, 1, "forged"}));
  CHECK(refused(api_apply{sample_states(), {}}));
  CHECK(refused(room_timeout{5, 1}));
  CHECK(refused(push_done{5, 1, 0, true, "", 1, 0.0}));
  // A type peers do send still comes through from the same forger.
  CHECK_FALSE(refused(abort_room{5, 1, 0, "a decode rank's abort"}));
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
