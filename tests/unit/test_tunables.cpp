// config/tunables.hpp: defaults, environment overrides through env_lookup, errors and help text.
#include <doctest/doctest.h>

#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "config/topology.hpp"
#include "config/tunables.hpp"
#include "unit_helpers.hpp"

using namespace kvflow::config;

namespace {

// An env_lookup over a fixed map, so the tests never depend on the real environment.
env_lookup fake_env(std::map<std::string, std::string> vars) {
  auto shared = std::make_shared<std::map<std::string, std::string>>(std::move(vars));
  return [shared](const char* name) -> const char* {
    auto it = shared->find(name);
    return it == shared->end() ? nullptr : it->second.c_str();
  };
}

struct tunable_info {
  std::string env;
  std::int64_t def;
};

std::vector<tunable_info> all_tunables() {
  std::vector<tunable_info> out;
#define KVFLOW_TEST_TUNABLE(name, env, def, doc) out.push_back({env, def});
  KVFLOW_TUNABLES(KVFLOW_TEST_TUNABLE)
#undef KVFLOW_TEST_TUNABLE
  return out;
}

}  // namespace

TEST_CASE("tunables: defaults") {
  auto t = load_tunables(fake_env({}));
  CHECK(t.bootstrap_timeout_ms == 300000);  // SGLang: 300 s
  CHECK(t.waiting_timeout_ms == 300000);
  CHECK(t.heartbeat_interval_ms == 1000);
  CHECK(t.heartbeat_misses == 3);
  CHECK(t.connect_timeout_ms == 30000);
  CHECK(t.step_interval_us == 2000);
  CHECK(t.max_rooms_per_rank == 65536);
  CHECK(t.max_pages_per_request == (1 << 20));
  // A default-constructed struct carries the same defaults.
  tunables d;
  CHECK(d.bootstrap_timeout_ms == 300000);
  CHECK(d.waiting_timeout_ms == 300000);
}

TEST_CASE("tunables: every variable overrides its member through env_lookup") {
  auto t = load_tunables(fake_env({{"KVFLOW_BOOTSTRAP_TIMEOUT_MS", "1500"},
                                   {"KVFLOW_WAITING_TIMEOUT_MS", "2500"},
                                   {"KVFLOW_HEARTBEAT_INTERVAL_MS", "100"},
                                   {"KVFLOW_HEARTBEAT_MISSES", "7"},
                                   {"KVFLOW_CONNECT_TIMEOUT_MS", "333"},
                                   {"KVFLOW_STEP_INTERVAL_US", "50"},
                                   {"KVFLOW_MAX_ROOMS_PER_RANK", "12"},
                                   {"KVFLOW_MAX_PAGES_PER_REQUEST", "9999999999"}}));
  CHECK(t.bootstrap_timeout_ms == 1500);
  CHECK(t.waiting_timeout_ms == 2500);
  CHECK(t.heartbeat_interval_ms == 100);
  CHECK(t.heartbeat_misses == 7);
  CHECK(t.connect_timeout_ms == 333);
  CHECK(t.step_interval_us == 50);
  CHECK(t.max_rooms_per_rank == 12);
  CHECK(t.max_pages_per_request == 9999999999LL);  // int64, not int
}

TEST_CASE("tunables: an override touches only its own member, empty means default") {
  auto t = load_tunables(fake_env({{"KVFLOW_WAITING_TIMEOUT_MS", "42"},
                                   {"KVFLOW_BOOTSTRAP_TIMEOUT_MS", ""}}));
  CHECK(t.waiting_timeout_ms == 42);
  CHECK(t.bootstrap_timeout_ms == 300000);
  CHECK(t.heartbeat_interval_ms == 1000);
}

TEST_CASE("tunables: the lookup is asked for every variable") {
  std::vector<std::string> asked;
  env_lookup spy = [&](const char* name) -> const char* {
    asked.emplace_back(name);
    return nullptr;
  };
  load_tunables(spy);
  auto all = all_tunables();
  REQUIRE(asked.size() == all.size());
  for (std::size_t i = 0; i < all.size(); ++i) CHECK(asked[i] == all[i].env);
}

TEST_CASE("tunables: a bad value throws config_error naming the variable") {
  for (const auto& info : all_tunables())
    for (const char* bad : {"abc", "12ms", "-5", "0", "1.5", " 7", "99999999999999999999999"}) {
      CAPTURE(info.env);
      CAPTURE(bad);
      auto what = kvflow::unit::config_error_of(
          [&] { load_tunables(fake_env({{info.env, bad}})); });
      REQUIRE_FALSE(what.empty());
      CHECK(what.rfind(info.env + ": ", 0) == 0);
      CHECK(what.find(bad) != std::string::npos);  // echoes the offending value
    }
}

TEST_CASE("tunables: tunables_help has one line per tunable, each naming its variable") {
  auto help = tunables_help();
  auto all = all_tunables();
  std::vector<std::string> lines;
  std::istringstream in(help);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  REQUIRE(lines.size() == all.size());
  for (std::size_t i = 0; i < all.size(); ++i) {
    CAPTURE(lines[i]);
    CHECK(lines[i].find(all[i].env) != std::string::npos);
    CHECK(lines[i].find(std::to_string(all[i].def)) != std::string::npos);
  }
  CHECK(help.back() == '\n');
}

TEST_CASE("tunables: to_env round-trips through load_tunables") {
  tunables t;
  t.waiting_timeout_ms = 1234;
  t.heartbeat_misses = 9;
  auto env = to_env(t);
  auto back = load_tunables([&](const char* name) -> const char* {
    for (const auto& [k, v] : env)
      if (k == name) return v.c_str();
    return nullptr;
  });
  CHECK(back.waiting_timeout_ms == 1234);
  CHECK(back.heartbeat_misses == 9);
  CHECK(back.bootstrap_timeout_ms == t.bootstrap_timeout_ms);
}
