#include "config/link_security.hpp"

#include <sys/random.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "config/topology.hpp"

namespace kvflow::config {

namespace {

constexpr std::size_t min_token_bytes = 16;

std::string read_token_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw config_error("KVFLOW_AUTH_TOKEN_FILE: cannot read '" + path + "'");
  std::ostringstream all;
  all << in.rdbuf();
  std::string t = all.str();
  while (!t.empty() && (t.back() == '\n' || t.back() == '\r')) t.pop_back();
  return t;
}

void check_readable(const std::string& path, const char* var) {
  if (path.empty()) return;
  if (::access(path.c_str(), R_OK) != 0) throw config_error(std::string(var) + ": cannot read '" + path + "'");
}

}  // namespace

link_security resolve_link_security(link_security s, const link_env_lookup& getenv) {
  auto fill = [&](std::string& member, const char* var) {
    if (!member.empty() || !getenv) return;
    if (const char* v = getenv(var)) member = v;
  };
#define KVFLOW_LINK_FILL(name, env, doc) fill(s.name, env);
  KVFLOW_LINK_SETTINGS(KVFLOW_LINK_FILL)
#undef KVFLOW_LINK_FILL
  if (!s.auth_token_file.empty()) {
    if (!s.auth_token.empty())
      throw config_error("KVFLOW_AUTH_TOKEN_FILE: give the token or a token file, not both");
    s.auth_token = read_token_file(s.auth_token_file);
    if (s.auth_token.empty()) throw config_error("KVFLOW_AUTH_TOKEN_FILE: '" + s.auth_token_file + "' is empty");
  }
  if (!s.auth_token.empty() && s.auth_token.size() < min_token_bytes)
    throw config_error("KVFLOW_AUTH_TOKEN: the cluster token needs at least 16 bytes, got " +
                       std::to_string(s.auth_token.size()));
  const bool any_tls = !s.tls_certificate.empty() || !s.tls_key.empty() || !s.tls_ca.empty();
  if (any_tls) {
    if (s.tls_certificate.empty()) throw config_error("KVFLOW_TLS_CERT: TLS needs this node's certificate");
    if (s.tls_key.empty()) throw config_error("KVFLOW_TLS_KEY: TLS needs the certificate's private key");
    if (s.tls_ca.empty()) throw config_error("KVFLOW_TLS_CA: TLS needs the CA that peers' certificates chain to");
  }
  check_readable(s.tls_certificate, "KVFLOW_TLS_CERT");
  check_readable(s.tls_key, "KVFLOW_TLS_KEY");
  check_readable(s.tls_ca, "KVFLOW_TLS_CA");
  if (!s.allow_insecure_listen.empty() && s.allow_insecure_listen != "0" && s.allow_insecure_listen != "1")
    throw config_error("KVFLOW_ALLOW_INSECURE_LISTEN: '" + s.allow_insecure_listen + "' is not 0 or 1");
  return s;
}

bool is_loopback_host(const std::string& host) {
  return host == "localhost" || host == "::1" || host == "[::1]" || host.rfind("127.", 0) == 0;
}

void check_listen_address(const link_security& s, const std::string& host, const std::string& field) {
  if (is_loopback_host(host) || s.tls() || s.authenticated() || s.insecure_listen_allowed()) return;
  throw config_error(field + ": " + (host.empty() ? std::string("every address") : "'" + host + "'") +
                     " is not loopback and node links would be neither encrypted nor authenticated; "
                     "give a cluster token (KVFLOW_AUTH_TOKEN, --auth-token-file) or TLS files "
                     "(--tls-cert, --tls-key, --tls-ca), or set KVFLOW_ALLOW_INSECURE_LISTEN=1");
}

std::vector<std::pair<std::string, std::string>> to_env(const link_security& s) {
  std::vector<std::pair<std::string, std::string>> out;
  // The token travels resolved: a child need not reach the file its parent read.
  if (!s.auth_token.empty()) {
    out.emplace_back("KVFLOW_AUTH_TOKEN", s.auth_token);
    out.emplace_back("KVFLOW_AUTH_TOKEN_FILE", "");  // not both, should this process have one
  }
  if (s.tls()) {
    out.emplace_back("KVFLOW_TLS_CERT", s.tls_certificate);
    out.emplace_back("KVFLOW_TLS_KEY", s.tls_key);
    out.emplace_back("KVFLOW_TLS_CA", s.tls_ca);
  }
  if (!s.allow_insecure_listen.empty()) out.emplace_back("KVFLOW_ALLOW_INSECURE_LISTEN", s.allow_insecure_listen);
  return out;
}

std::string random_token() {
  unsigned char bytes[32];
  std::size_t got = 0;
  while (got < sizeof bytes) {
    auto n = ::getrandom(bytes + got, sizeof bytes - got, 0);
    if (n < 0) throw config_error("KVFLOW_AUTH_TOKEN: cannot draw a random token from the OS");
    got += static_cast<std::size_t>(n);
  }
  std::string hex;
  char two[3];
  for (unsigned char b : bytes) {
    std::snprintf(two, sizeof two, "%02x", b);
    hex += two;
  }
  return hex;
}

std::string link_settings_help() {
  std::ostringstream out;
#define KVFLOW_LINK_HELP(name, env, doc) out << "  " << env << ": " << doc << "\n";
  KVFLOW_LINK_SETTINGS(KVFLOW_LINK_HELP)
#undef KVFLOW_LINK_HELP
  return out.str();
}

}  // namespace kvflow::config
