#pragma once
// A peer's packed UCX worker address (what ucp_worker_get_address gave the peer), checked before
// any of it reaches UCX. ucp_ep_create takes the address without its size: ucp_address_unpack
// walks it trusting every length and flag inside, and each transport then reads its device and
// interface addresses at the size its own format implies. A lying peer could so make this
// process read past the address (docs/fuzzing.md, finding 4). Pure byte code, no UCX call: the
// formats are UCX 1.22's (src/ucp/wireup/address.c and the transports' address layouts).
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "config/status.hpp"

namespace kvflow::transport {

// What a worker address holds, as far as the checks go. UCX 1.22 packs two formats: v1 (its
// default) and v2 (UCX_ADDRESS_VERSION=v2).
struct ucx_address {
  unsigned version = 0;     // 1 or 2
  unsigned release = 0;     // the packing UCX's minor version, modulo 16
  bool debug_info = false;  // the worker's name is in it (UCX_ADDRESS_DEBUG_INFO)
  // Offsets are into the address bytes.
  struct device {
    std::size_t offset = 0;  // of its memory domain byte
    unsigned md_index = 0;   // its memory domain's index at the packer
    unsigned paths = 1;      // number of paths (packed only when more than 1)
    int system_device = -1;  // packed only when known (-1: not packed)
    std::size_t address_offset = 0, address_length = 0;
  };
  struct interface {
    std::uint16_t checksum = 0;  // of its transport's name (ucx_transport_checksum)
    std::size_t device = 0;      // index into `devices`: the device address is that one's
    std::size_t offset = 0;      // of its checksum
    std::size_t address_offset = 0, address_length = 0;
  };
  std::vector<device> devices;        // without v1's closing release marker
  std::vector<interface> interfaces;  // in the address's order
};

// The walk ucp_address_unpack makes, every read bounded by the size: the address must end
// exactly where its last device ends, hold at most 128 interfaces (UCX's limit), and hold only
// what ucp_worker_get_address of UCX 1.22 packs (no endpoint addresses, client id or empty
// devices; UCX's maps take memory-domain indices below 64; a v1 address ends with the packer's
// release). An error says what is wrong and where.
result<ucx_address> parse_ucx_address(std::string_view bytes);

// Whether a peer's worker address may be handed to UCX by this worker, whose own address is
// `own`: `peer` parses, in own's format and UCX release, and every interface's device and
// interface addresses have a length its transport's format admits. For the transports UCX 1.22
// brings (self, tcp, sysv, posix, cma, cuda_copy, cuda_ipc) that is their format, checked against
// the bytes that select a length (a tcp address family, a namespace flag): lengths that differ
// between hosts are taken. Another transport of this worker's must have the lengths this worker
// has for it; one that is neither is refused. Refused as well, naming it, when `own` itself does
// not pass (a UCX whose formats differ): then nothing can be checked.
status check_ucx_address(std::string_view peer, std::string_view own);

// The tcp interfaces of a worker address that are not loopback, as their IPv4 or IPv6 address
// in text: where other hosts can reach that worker's tcp listener. An error when the address
// does not parse.
result<std::vector<std::string>> ucx_tcp_beyond_loopback(std::string_view bytes);

// How an address names a transport: the CRC-16 (X.25: reflected 0x1021, both ends inverted) of
// its name.
std::uint16_t ucx_transport_checksum(std::string_view name);

}  // namespace kvflow::transport
