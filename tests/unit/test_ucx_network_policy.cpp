// transport/ucx_network_policy.hpp: UCX's tcp transport listens on loopback only unless
// KVFLOW_UCX_TCP=2. Checked on what the process really listens on (/proc), on the worker's
// address, and on the value handed to UCX_NET_DEVICES.
#include <doctest/doctest.h>
#include <unistd.h>

#include <climits>
#include <fstream>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "transport/ucx_address.hpp"
#include "transport/ucx_network_policy.hpp"
#include "transport/ucx_transport.hpp"

#include "tests/unit/unit_helpers.hpp"

using namespace kvflow;
using namespace kvflow::transport;

namespace {

// The local addresses of this process's listening tcp sockets that are not loopback, as
// /proc/net/tcp{,6} writes them (hex). A socket is this process's when one of its descriptors
// is that socket's inode.
std::multiset<std::string> listening_beyond_loopback() {
  std::set<std::string> own;
  for (int fd = 0; fd < 4096; ++fd) {
    char link[PATH_MAX] = {};
    const auto path = "/proc/self/fd/" + std::to_string(fd);
    const auto n = ::readlink(path.c_str(), link, sizeof link - 1);
    if (n > 0 && std::string(link, static_cast<std::size_t>(n)).rfind("socket:[", 0) == 0)
      own.insert(std::string(link + 8, static_cast<std::size_t>(n) - 9));
  }
  std::multiset<std::string> out;
  for (const char* table : {"/proc/self/net/tcp", "/proc/self/net/tcp6"}) {
    std::ifstream in(table);
    std::string line;
    std::getline(in, line);  // the header
    while (std::getline(in, line)) {
      std::istringstream f(line);
      std::string slot, local, remote, state, queues, timer, retransmits, uid, timeout, inode;
      f >> slot >> local >> remote >> state >> queues >> timer >> retransmits >> uid >> timeout >> inode;
      if (state != "0A" || own.count(inode) == 0) continue;  // 0A: LISTEN
      const auto host = local.substr(0, local.find(':'));
      // 127.0.0.0/8 is written little-endian (..7F); ::1 as 0000...01000000.
      const bool loopback = (host.size() == 8 && host.substr(6) == "7F") ||
                            host == "00000000000000000000000001000000";
      if (!loopback) out.insert(local);
    }
  }
  return out;
}

using unit::scoped_env;

std::string worker_address_of(const ucx_transport& t) { return unit::ucx_worker_address(t.endpoint()); }

}  // namespace

TEST_CASE("ucx network policy: the UCX_NET_DEVICES value keeps tcp off the given interfaces, with the user's own") {
  const std::vector<std::string> two{"eth0", "ib0"};
  CHECK(ucx_net_devices_excluding("", two) == "^eth0,ib0");
  CHECK(ucx_net_devices_excluding("all", two) == "^eth0,ib0");
  CHECK(ucx_net_devices_excluding("^mlx5_1:1", two) == "^mlx5_1:1,eth0,ib0");
  // an allow list stays the user's: what it opens is checked on the worker's address
  CHECK(ucx_net_devices_excluding("mlx5_0:1,eth0", two) == "mlx5_0:1,eth0");
  CHECK(ucx_net_devices_excluding("", {}).empty());
  CHECK(ucx_net_devices_excluding("^x", {}) == "^x");
  CHECK(unreachable_hint(true, false).find("KVFLOW_UCX_TCP=2") != std::string::npos);
  CHECK(unreachable_hint(true, true).empty());
  CHECK(unreachable_hint(false, false).empty());
}

TEST_CASE("regression: a UCX transport listens on no interface but loopback unless KVFLOW_UCX_TCP=2") {
  const auto interfaces = tcp_interfaces_beyond_loopback();
  const auto before = listening_beyond_loopback();
  {
    auto t = ucx_transport::create({});
    REQUIRE_MESSAGE(t.ok(), t.error().reason());
    CHECK(listening_beyond_loopback() == before);
    auto beyond = ucx_tcp_beyond_loopback(worker_address_of(*t.value()));
    REQUIRE_MESSAGE(beyond.ok(), beyond.error().reason());
    CHECK(beyond.value().empty());
  }
  // Allowed, UCX listens where other hosts reach it: what the check above would have seen.
  ucx_options allowed;
  allowed.tcp_beyond_loopback = true;
  auto t = ucx_transport::create(allowed);
  REQUIRE_MESSAGE(t.ok(), t.error().reason());
  auto beyond = ucx_tcp_beyond_loopback(worker_address_of(*t.value()));
  REQUIRE_MESSAGE(beyond.ok(), beyond.error().reason());
  if (interfaces.empty()) {
    MESSAGE("this machine has no interface but loopback: the other half cannot be shown here");
  } else {
    CHECK(listening_beyond_loopback().size() > before.size());
    CHECK_FALSE(beyond.value().empty());
  }
  // The tunable decides: only 2 lets tcp out.
  config::tunables tn;
  CHECK_FALSE(ucx_options_from(tn).tcp_beyond_loopback);
  tn.ucx_tcp = 2;
  CHECK(ucx_options_from(tn).tcp_beyond_loopback);
  tn.ucx_tcp = 3;
  CHECK_FALSE(ucx_options_from(tn).tcp_beyond_loopback);
}

TEST_CASE("ucx network policy: a user's UCX_NET_DEVICES that names a non-loopback interface is refused, naming it") {
  const auto interfaces = tcp_interfaces_beyond_loopback();
  if (interfaces.empty()) {
    MESSAGE("this machine has no interface but loopback");
    return;
  }
  scoped_env env("UCX_NET_DEVICES", interfaces.front().c_str());
  auto t = ucx_transport::create({});
  REQUIRE_FALSE(t.ok());
  CHECK(t.error().reason().find("KVFLOW_UCX_TCP=2") != std::string::npos);
  CHECK(t.error().reason().find("UCX_NET_DEVICES") != std::string::npos);
  // loopback alone is what the default gives anyway
  scoped_env lo("UCX_NET_DEVICES", "lo");
  auto ok = ucx_transport::create({});
  CHECK_MESSAGE(ok.ok(), (ok.ok() ? std::string() : ok.error().reason()));
}
