#include "config/tunables.hpp"

#include <charconv>
#include <cstdlib>
#include <sstream>

#include "config/topology.hpp"

namespace kvflow::config {

tunables load_tunables(const env_lookup& getenv) {
  auto get = [&](const char* var) -> const char* {
    return getenv ? getenv(var) : std::getenv(var);
  };
  tunables t;
  auto read = [&](const char* var, std::int64_t& out) {
    const char* v = get(var);
    if (v == nullptr || *v == '\0') return;
    std::string s(v);
    std::int64_t x = 0;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), x);
    if (ec != std::errc() || p != s.data() + s.size())
      throw config_error(std::string(var) + ": '" + s + "' is not an integer");
    if (x < 1) throw config_error(std::string(var) + ": must be >= 1, got " + s);
    out = x;
  };
#define KVFLOW_TUNABLE_READ(name, env, def, doc) read(env, t.name);
  KVFLOW_TUNABLES(KVFLOW_TUNABLE_READ)
#undef KVFLOW_TUNABLE_READ
  return t;
}

std::vector<std::pair<std::string, std::string>> to_env(const tunables& t) {
  std::vector<std::pair<std::string, std::string>> out;
#define KVFLOW_TUNABLE_ENV(name, env, def, doc) out.emplace_back(env, std::to_string(t.name));
  KVFLOW_TUNABLES(KVFLOW_TUNABLE_ENV)
#undef KVFLOW_TUNABLE_ENV
  return out;
}

std::string tunables_help() {
  std::ostringstream out;
#define KVFLOW_TUNABLE_HELP(name, env, def, doc) \
  out << "  " << env << " (default " << (def) << "): " << doc << "\n";
  KVFLOW_TUNABLES(KVFLOW_TUNABLE_HELP)
#undef KVFLOW_TUNABLE_HELP
  return out.str();
}

}  // namespace kvflow::config
