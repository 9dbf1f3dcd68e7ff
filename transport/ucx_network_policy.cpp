#include "transport/ucx_network_policy.hpp"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>

#include <algorithm>

namespace kvflow::transport {

std::vector<std::string> tcp_interfaces_beyond_loopback() {
  std::vector<std::string> out;
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return out;
  for (const ifaddrs* i = list; i != nullptr; i = i->ifa_next) {
    if (i->ifa_addr == nullptr || (i->ifa_flags & IFF_LOOPBACK) != 0) continue;
    // As UCX decides an interface is active (ucs_netif_get_addr): up, running, and an address
    // that is not link-local. Naming one UCX does not use only makes UCX warn.
    if ((i->ifa_flags & IFF_UP) == 0 || (i->ifa_flags & IFF_RUNNING) == 0) continue;
    if (i->ifa_addr->sa_family == AF_INET) {
      const auto a = ntohl(reinterpret_cast<const sockaddr_in*>(i->ifa_addr)->sin_addr.s_addr);
      if ((a & 0xFFFF0000u) == 0xA9FE0000u) continue;
    } else if (i->ifa_addr->sa_family == AF_INET6) {
      if (IN6_IS_ADDR_LINKLOCAL(&reinterpret_cast<const sockaddr_in6*>(i->ifa_addr)->sin6_addr)) continue;
    } else {
      continue;
    }
    if (std::find(out.begin(), out.end(), i->ifa_name) == out.end()) out.emplace_back(i->ifa_name);
  }
  ::freeifaddrs(list);
  return out;
}

std::string ucx_net_devices_excluding(std::string_view user, const std::vector<std::string>& interfaces) {
  std::string ours;
  for (const auto& i : interfaces) ours += (ours.empty() ? "" : ",") + i;
  if (user.empty() || user == "all") return ours.empty() ? std::string() : "^" + ours;
  if (user.front() == '^') return ours.empty() ? std::string(user) : std::string(user) + "," + ours;
  return std::string(user);
}

status tcp_beyond_loopback_refused(const std::vector<std::string>& addresses) {
  std::string list;
  for (const auto& a : addresses) list += (list.empty() ? "" : ", ") + a;
  return status::error("ucx: UCX's tcp transport would listen on " + list +
                       ", where anyone who reaches the port can write into this process (UCX "
                       "checks no sender); leave those interfaces out of UCX_NET_DEVICES, or set "
                       "KVFLOW_UCX_TCP=2 only where nobody but the cluster reaches that network");
}

std::string unreachable_hint(bool unreachable, bool tcp_beyond_loopback) {
  if (!unreachable || tcp_beyond_loopback) return {};
  return " (UCX's tcp is kept on loopback: another host needs RDMA, or KVFLOW_UCX_TCP=2 on a "
         "network only the cluster reaches)";
}

}  // namespace kvflow::transport
