#pragma once
// Small helpers shared by the unit tests.
#include <doctest/doctest.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <optional>
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

// Sets an environment variable for one scope (UCX reads its configuration at ucp_init), and
// puts back what was there.
class scoped_env {
 public:
  scoped_env(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    ::setenv(name, value, 1);
  }
  ~scoped_env() {
    if (old_)
      ::setenv(name_, old_->c_str(), 1);
    else
      ::unsetenv(name_);
  }
  scoped_env(const scoped_env&) = delete;
  scoped_env& operator=(const scoped_env&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// The worker address in a UCX transport's endpoint: "kvflow-ucx-1\0", a 4-byte length and the
// shared-memory domain, then the address (transport/ucx_transport.cpp).
inline std::string ucx_worker_address(const std::string& endpoint) {
  constexpr std::size_t tag = sizeof "kvflow-ucx-1";
  REQUIRE(endpoint.size() > tag + 4);
  std::uint32_t n = 0;
  std::memcpy(&n, endpoint.data() + tag, sizeof n);
  REQUIRE(endpoint.size() > tag + 4 + n);
  return endpoint.substr(tag + 4 + n);
}

// A message between a test and the child process it forked: a 4-byte length, then the bytes.
// write_frame is for the child (false: it cannot tell the parent anything, so it exits).
inline bool write_frame(int fd, const std::string& msg) {
  const auto n = static_cast<std::uint32_t>(msg.size());
  return ::write(fd, &n, sizeof n) == sizeof n && ::write(fd, msg.data(), n) == static_cast<ssize_t>(n);
}
inline std::string read_frame(int fd) {
  std::uint32_t n = 0;
  REQUIRE(::read(fd, &n, sizeof n) == sizeof n);
  std::string msg(n, '\0');
  REQUIRE(::read(fd, msg.data(), n) == static_cast<ssize_t>(n));
  return msg;
}

}  // namespace kvflow::unit
