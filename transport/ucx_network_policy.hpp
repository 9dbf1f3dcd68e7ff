#pragma once
// Where UCX's tcp transport may listen. UCX's tcp listener takes anyone who reaches its port, and
// UCX's own protocols then write where the sender says (emulated puts: rma_sw's put handler),
// with no check against a registered region and no authentication. kvflow's node links are
// authenticated; UCX's data plane cannot be. So by default UCX gets tcp on loopback only (peers
// of one host and network namespace); other hosts are reached by the transports whose remote
// writes the hardware checks against a key (RDMA). KVFLOW_UCX_TCP=2 lets tcp onto the other
// interfaces, for a network that only the cluster reaches.
#include <string>
#include <string_view>
#include <vector>

#include "config/status.hpp"

namespace kvflow::transport {

// The interfaces of this network namespace that UCX's tcp transport would use and that are not
// loopback: up and running, with an IPv4 or IPv6 address that is not link-local.
std::vector<std::string> tcp_interfaces_beyond_loopback();

// The UCX_NET_DEVICES value that keeps UCX's tcp off `interfaces`, given the user's own value
// (empty: unset). "all" or unset: every other device; "^a,b" (a negation): theirs and these; an
// allow list: theirs unchanged (what it lets through is checked on the worker's address, see
// ucx_tcp_beyond_loopback). Empty when there is nothing to exclude.
std::string ucx_net_devices_excluding(std::string_view user, const std::vector<std::string>& interfaces);

// The error for a worker whose address shows tcp beyond loopback (`addresses`, as text) while
// that is not allowed: one line naming what to change.
status tcp_beyond_loopback_refused(const std::vector<std::string>& addresses);

// What to add to a failed endpoint's reason when UCX found no lane to a peer while tcp was kept
// on loopback: empty otherwise.
std::string unreachable_hint(bool unreachable, bool tcp_beyond_loopback);

}  // namespace kvflow::transport
