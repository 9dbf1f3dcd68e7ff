// actors/state_store.hpp: one rank's per-room states (semantics.md §2).
#include <doctest/doctest.h>

#include <string>

#include "actors/state_store.hpp"

using kvflow::kv_poll;
using kvflow::state_store;

TEST_CASE("state_store: kv_poll order is the MIN rule") {
  CHECK(kv_poll::failed < kv_poll::bootstrapping);
  CHECK(kv_poll::bootstrapping < kv_poll::waiting_for_input);
  CHECK(kv_poll::waiting_for_input < kv_poll::transferring);
  CHECK(kv_poll::transferring < kv_poll::success);
  CHECK(kvflow::is_terminal(kv_poll::failed));
  CHECK(kvflow::is_terminal(kv_poll::success));
  CHECK_FALSE(kvflow::is_terminal(kv_poll::transferring));
  CHECK(std::string(kvflow::to_string(kv_poll::waiting_for_input)) == "WaitingForInput");
}

TEST_CASE("state_store: create then find") {
  state_store s;
  CHECK(s.find(7) == nullptr);
  REQUIRE(s.create(7, 3, kv_poll::bootstrapping).ok());
  REQUIRE(s.find(7) != nullptr);
  CHECK(s.find(7)->state == kv_poll::bootstrapping);
  CHECK(s.find(7)->incarnation == 3);
  CHECK(s.find(7)->reason.empty());
  CHECK(s.size() == 1);
  // Non-authoritative ranks start directly in WaitingForInput.
  REQUIRE(s.create(8, 1, kv_poll::waiting_for_input).ok());
  CHECK(s.find(8)->state == kv_poll::waiting_for_input);
  CHECK(s.rooms().size() == 2);
}

TEST_CASE("state_store: states only rise") {
  state_store s;
  REQUIRE(s.create(1, 1, kv_poll::bootstrapping).ok());
  CHECK(s.update(1, kv_poll::transferring));
  CHECK(s.find(1)->state == kv_poll::transferring);
  CHECK_FALSE(s.update(1, kv_poll::waiting_for_input));  // lower: ignored
  CHECK(s.find(1)->state == kv_poll::transferring);
  CHECK_FALSE(s.update(1, kv_poll::bootstrapping));
  CHECK_FALSE(s.update(1, kv_poll::transferring));  // same: no change
  CHECK(s.update(1, kv_poll::success));
  CHECK(s.find(1)->state == kv_poll::success);
  CHECK_FALSE(s.update(1, kv_poll::transferring));
  CHECK(s.find(1)->state == kv_poll::success);
}

TEST_CASE("state_store: Failed overrides anything and is sticky, even over Success") {
  for (auto from : {kv_poll::bootstrapping, kv_poll::waiting_for_input, kv_poll::transferring,
                    kv_poll::success}) {
    CAPTURE(static_cast<int>(from));
    state_store s;
    REQUIRE(s.create(5, 1, kv_poll::bootstrapping).ok());
    s.update(5, from);
    REQUIRE(s.find(5)->state == from);
    CHECK(s.fail(5, "peer down"));
    CHECK(s.find(5)->state == kv_poll::failed);
    CHECK(s.find(5)->reason == "peer down");
    // Nothing brings it back, and a second failure keeps the first reason.
    for (auto next : {kv_poll::bootstrapping, kv_poll::waiting_for_input, kv_poll::transferring,
                      kv_poll::success})
      CHECK_FALSE(s.update(5, next));
    CHECK_FALSE(s.fail(5, "timeout"));
    CHECK(s.find(5)->state == kv_poll::failed);
    CHECK(s.find(5)->reason == "peer down");
  }
}

TEST_CASE("state_store: Failed for an unknown room is ignored and does not create it") {
  state_store s;
  CHECK_FALSE(s.fail(99, "late abort"));
  CHECK_FALSE(s.update(99, kv_poll::success));
  CHECK(s.find(99) == nullptr);
  CHECK(s.size() == 0);
}

TEST_CASE("state_store: clear is idempotent and a cleared room is never revived") {
  state_store s;
  REQUIRE(s.create(4, 1, kv_poll::bootstrapping).ok());
  s.clear(4);
  CHECK(s.find(4) == nullptr);
  s.clear(4);
  s.clear(12345);  // never existed
  CHECK(s.size() == 0);
  CHECK_FALSE(s.fail(4, "late"));
  CHECK_FALSE(s.update(4, kv_poll::transferring));
  CHECK(s.find(4) == nullptr);
}

TEST_CASE("state_store: a reused room starts fresh and never inherits Success (SGLang #6857)") {
  state_store s;
  REQUIRE(s.create(6, 1, kv_poll::bootstrapping).ok());
  s.update(6, kv_poll::success);
  s.clear(6);
  REQUIRE(s.create(6, 2, kv_poll::bootstrapping).ok());
  CHECK(s.find(6)->state == kv_poll::bootstrapping);
  CHECK(s.find(6)->incarnation == 2);
  // And it can rise again normally.
  CHECK(s.update(6, kv_poll::waiting_for_input));

  // Same for a failed one: no stale reason either.
  REQUIRE(s.create(9, 1, kv_poll::bootstrapping).ok());
  s.fail(9, "old failure");
  s.clear(9);
  REQUIRE(s.create(9, 2, kv_poll::waiting_for_input).ok());
  CHECK(s.find(9)->state == kv_poll::waiting_for_input);
  CHECK(s.find(9)->reason.empty());
}

TEST_CASE("state_store: a duplicate live room is refused with an error naming it (SGLang #40125)") {
  state_store s;
  REQUIRE(s.create(424242, 1, kv_poll::transferring).ok());
  auto st = s.create(424242, 2, kv_poll::bootstrapping);
  CHECK_FALSE(st.ok());
  CHECK(st.reason().find("424242") != std::string::npos);
  // The live request is untouched.
  CHECK(s.find(424242)->incarnation == 1);
  CHECK(s.find(424242)->state == kv_poll::transferring);
  CHECK(s.size() == 1);
  // Even the same incarnation is a duplicate while live, also when it has failed.
  s.fail(424242, "x");
  CHECK_FALSE(s.create(424242, 1, kv_poll::bootstrapping).ok());
  CHECK(s.find(424242)->state == kv_poll::failed);
}

TEST_CASE("state_store: the max_rooms limit refuses more live rooms") {
  state_store s(3);
  for (std::uint64_t r = 0; r < 3; ++r) REQUIRE(s.create(r, 1, kv_poll::bootstrapping).ok());
  auto st = s.create(3, 1, kv_poll::bootstrapping);
  CHECK_FALSE(st.ok());
  CHECK_FALSE(st.reason().empty());
  CHECK(s.find(3) == nullptr);
  CHECK(s.size() == 3);
  // Clearing one makes room again.
  s.clear(1);
  CHECK(s.create(3, 1, kv_poll::bootstrapping).ok());
  CHECK(s.size() == 3);

  state_store none(0);
  CHECK_FALSE(none.create(1, 1, kv_poll::bootstrapping).ok());
}
