#pragma once
// Who may open a link to a kvflow node, and how the link is protected: the cluster token, the
// TLS files, and whether listening beyond loopback without either is allowed. Each setting is
// declared once with its environment variable and doc; the command's flags and the public API's
// node_options override the environment.
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace kvflow::config {

// X(member, env var, doc)
#define KVFLOW_LINK_SETTINGS(X)                                                                  \
  X(auth_token, "KVFLOW_AUTH_TOKEN",                                                             \
    "cluster token (at least 16 bytes) every node proves before any of its messages is "        \
    "accepted: an HMAC-SHA256 challenge, the token itself never crosses the link")              \
  X(auth_token_file, "KVFLOW_AUTH_TOKEN_FILE",                                                   \
    "file holding the cluster token (trailing newline ignored); instead of KVFLOW_AUTH_TOKEN")  \
  X(tls_certificate, "KVFLOW_TLS_CERT", "PEM certificate chain of this node: mutual TLS on every link") \
  X(tls_key, "KVFLOW_TLS_KEY", "PEM private key of KVFLOW_TLS_CERT")                             \
  X(tls_ca, "KVFLOW_TLS_CA", "PEM CA certificates a peer's certificate must chain to")          \
  X(allow_insecure_listen, "KVFLOW_ALLOW_INSECURE_LISTEN",                                       \
    "1: listen on a non-loopback address with neither TLS nor a token (anyone who reaches the " \
    "port can then drive the cluster)")

struct link_security {
#define KVFLOW_LINK_MEMBER(name, env, doc) std::string name;
  KVFLOW_LINK_SETTINGS(KVFLOW_LINK_MEMBER)
#undef KVFLOW_LINK_MEMBER

  bool tls() const { return !tls_certificate.empty(); }
  bool authenticated() const { return !auth_token.empty(); }
  bool insecure_listen_allowed() const { return allow_insecure_listen == "1"; }
};

// Fills every setting still empty from `getenv` (nullptr: none), reads the token file into
// auth_token, and checks the result: a token of at least 16 bytes, a readable token file (not
// both a token and a file), certificate, key and CA all or none, readable files, 0/1 for the
// flag. Throws config_error naming the setting's variable.
using link_env_lookup = std::function<const char*(const char*)>;
link_security resolve_link_security(link_security given, const link_env_lookup& getenv);

// Refuses (config_error naming `field`) a listening address other than loopback when links are
// neither encrypted nor authenticated, unless allow_insecure_listen is set.
void check_listen_address(const link_security& s, const std::string& host, const std::string& field);

// 127.0.0.0/8, ::1 and "localhost".
bool is_loopback_host(const std::string& host);

// What a process started by this one needs to join the same cluster: the resolved token and
// the TLS files, as environment variables.
std::vector<std::pair<std::string, std::string>> to_env(const link_security& s);

// A random token (32 bytes from the OS, hex): what `kvflow launch` gives the cluster it starts
// when the user gave none.
std::string random_token();

// One line per setting: variable, doc.
std::string link_settings_help();

}  // namespace kvflow::config
