#pragma once
// Small helpers shared by the unit tests.
#include <doctest/doctest.h>

#include <functional>
#include <string>

#include "config/topology.hpp"

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

}  // namespace kvflow::unit
