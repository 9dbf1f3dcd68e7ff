#pragma once
// Small helpers shared by the unit tests.
#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "config/topology.hpp"
#include "transport/transport.hpp"

namespace kvflow::unit {

// Runs `fn`, expects a config_error, and returns its message ("" if none was thrown).
inline std::string config_error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const config::config_error& e) {
    return e.what();
  }
  return {};
}

// The error contract of topology.hpp: one line that starts with "<field>: ".
inline void check_one_line_error(const std::string& what, const std::string& field) {
  INFO("message: " << what);
  CHECK(what.find('\n') == std::string::npos);
  CHECK(what.rfind(field + ": ", 0) == 0);
  CHECK(what.size() > field.size() + 2);  // says why, not just the field
}

// Expects `fn` to throw a one-line config_error naming `field`.
#define KVFLOW_CHECK_CONFIG_ERROR(expr, field)                                     \
  do {                                                                             \
    auto kvflow_what_ = ::kvflow::unit::config_error_of([&] { (void)(expr); });    \
    INFO("expression: " #expr);                                                    \
    REQUIRE_FALSE(kvflow_what_.empty());                                           \
    ::kvflow::unit::check_one_line_error(kvflow_what_, field);                     \
  } while (false)

// The byte of the test pattern of `seed` at offset `at` (what the staged tests write and check).
inline std::byte pattern(std::uint64_t seed, std::uint64_t at) {
  return static_cast<std::byte>((seed * 131 + at * 7 + (at >> 9)) & 0xff);
}

// Pushes and waits for the completion: its status, or an error when it did not come within
// `limit` (a completion that comes later still finds its promise alive).
inline status push_and_wait(transport::transport& t, std::uint64_t peer, const std::vector<transport::block>& blocks,
                            std::chrono::seconds limit = std::chrono::seconds(30)) {
  auto p = std::make_shared<std::promise<status>>();
  auto f = p->get_future();
  t.push(peer, blocks, [p](status s) { p->set_value(std::move(s)); });
  if (f.wait_for(limit) != std::future_status::ready) return status::error("push never completed");
  return f.get();
}

}  // namespace kvflow::unit
