// transport/ucx_address.hpp: a peer's UCX worker address is checked before UCX reads it. Real
// addresses come from UCX (an instance's endpoint); changed ones are made from their parts by
// pack() below, the test's own reading of UCX 1.22's format, which first must give the real
// address back unchanged.
#include <doctest/doctest.h>
#include <sys/socket.h>

#include <caf/binary_deserializer.hpp>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "actors/messages.hpp"
#include "transport/ucx_address.hpp"
#include "transport/ucx_transport.hpp"

#include "tests/unit/unit_helpers.hpp"

using namespace kvflow;
using namespace kvflow::transport;

namespace {

std::unique_ptr<ucx_transport> make_transport() {
  auto t = ucx_transport::create({});
  REQUIRE_MESSAGE(t.ok(), t.error().reason());
  return std::move(t.value());
}

std::string worker_address(const ucx_transport& t) { return unit::ucx_worker_address(t.endpoint()); }
// `t`'s endpoint with another worker address in it.
std::string endpoint_with(const ucx_transport& t, const std::string& address) {
  const auto e = t.endpoint();
  return e.substr(0, e.size() - worker_address(t).size()) + address;
}

ucx_address parsed(const std::string& a) {
  auto p = parse_ucx_address(a);
  REQUIRE_MESSAGE(p.ok(), p.error().reason());
  return p.value();
}

// Refused, with `words` in the reason.
void refused(const std::string& peer, const std::string& own, const std::string& words) {
  const auto st = check_ucx_address(peer, own);
  REQUIRE_FALSE(st.ok());
  CHECK_MESSAGE(st.reason().find(words) != std::string::npos, st.reason());
}
void taken(const std::string& peer, const std::string& own) {
  const auto st = check_ucx_address(peer, own);
  CHECK_MESSAGE(st.ok(), st.reason());
}

// ---- An address from its parts --------------------------------------------------------------

struct iface_part {
  std::uint16_t checksum = 0;
  std::string attributes;  // 16 bytes (v1) or 8 (v2), as UCX packs them
  std::string address;
  std::uint8_t flags = 0;  // added to its length byte
};
struct device_part {
  unsigned md = 0;
  unsigned paths = 1;
  int system_device = -1;
  std::string address;
  std::vector<iface_part> ifaces;
};
struct address_parts {
  unsigned version = 1, release = 0;
  std::string head;  // header, worker id and name, as they were
  std::vector<device_part> devices;
};

address_parts split(const std::string& a) {
  const auto p = parsed(a);
  address_parts out;
  out.version = p.version;
  out.release = p.release;
  out.head = a.substr(0, p.devices.at(0).offset);
  for (const auto& d : p.devices)
    out.devices.push_back({d.md_index, d.paths, d.system_device, a.substr(d.address_offset, d.address_length), {}});
  const std::size_t attr_size = p.version == 1 ? 16 : 8;
  for (const auto& i : p.interfaces)
    out.devices[i.device].ifaces.push_back(
        {i.checksum, a.substr(i.offset + 2, attr_size), a.substr(i.address_offset, i.address_length), 0});
  return out;
}

// A length in the low `bits` of a byte whose other bits are `flags`; v2 continues a value of all
// ones or more in the next byte.
void put_length(std::string& out, std::size_t n, unsigned bits, std::uint8_t flags, unsigned version) {
  if (version == 2 && n >= bits) {
    out.push_back(static_cast<char>(flags | bits));
    out.push_back(static_cast<char>(n));
  } else {
    out.push_back(static_cast<char>(flags | n));
  }
}

std::string pack(const address_parts& p) {
  std::string out = p.head;
  for (std::size_t d = 0; d < p.devices.size(); ++d) {
    const auto& dev = p.devices[d];
    out.push_back(static_cast<char>(dev.md));
    std::uint8_t flags = 0;
    if (p.version == 2 && d + 1 == p.devices.size()) flags |= 0x80;
    if (dev.paths > 1) flags |= 0x40;
    if (dev.system_device >= 0) flags |= 0x20;
    put_length(out, dev.address.size(), 0x1f, flags, p.version);
    if (dev.paths > 1) out.push_back(static_cast<char>(dev.paths));
    if (dev.system_device >= 0) out.push_back(static_cast<char>(dev.system_device));
    out += dev.address;
    for (std::size_t i = 0; i < dev.ifaces.size(); ++i) {
      const auto& f = dev.ifaces[i];
      out.append(reinterpret_cast<const char*>(&f.checksum), 2);
      out += f.attributes;
      const std::uint8_t last = i + 1 == dev.ifaces.size() ? 0x80 : 0;
      put_length(out, f.address.size(), 0x3f, static_cast<std::uint8_t>(last | f.flags), p.version);
      out += f.address;
    }
  }
  if (p.version == 1) {  // the release marker
    out.push_back(static_cast<char>(0x80 | p.release));
    out.push_back(static_cast<char>(0x80));
  }
  return out;
}

// `p` with one more device holding one interface of `transport`.
std::string with_device(address_parts p, const char* transport, std::string device, std::string iface) {
  const auto attributes = p.devices.at(0).ifaces.at(0).attributes;
  p.devices.push_back({p.devices.back().md,
                       1,
                       -1,
                       std::move(device),
                       {{ucx_transport_checksum(transport), attributes, std::move(iface), 0}}});
  return pack(p);
}

template <class T>
std::string bytes_of(T v) {
  return std::string(reinterpret_cast<const char*>(&v), sizeof v);
}
std::string tcp_device(std::uint8_t flags, std::uint8_t family, std::size_t payload) {
  return std::string{static_cast<char>(flags), static_cast<char>(family)} + std::string(payload, '\x7f');
}
// A host identity: 8 bytes, the top bit saying a 4-byte namespace follows.
std::string identity(bool ns_flag, std::size_t ns_bytes) {
  const std::uint64_t id = 0x1234567890abcdefull | (ns_flag ? 1ull << 63 : 0);
  return bytes_of(id) + std::string(ns_bytes, '\x01');
}

// An address of this UCX in the format `version` is not (UCX_ADDRESS_VERSION, read by ucp_init).
std::string other_format_address(unsigned version) {
  unit::scoped_env format("UCX_ADDRESS_VERSION", version == 1 ? "v2" : "v1");
  return worker_address(*make_transport());
}

std::string own_address() {
  static const std::string a = [] {
    auto t = make_transport();
    return worker_address(*t);
  }();
  return a;
}

}  // namespace

TEST_CASE("ucx address: UCX's own addresses pass (this worker's, another instance's), and pack() rebuilds them") {
  auto a = make_transport();
  auto b = make_transport();
  const auto own = worker_address(*a), other = worker_address(*b);
  REQUIRE(own != other);  // another worker id, other ports
  taken(own, own);
  taken(other, own);
  taken(own, other);
  const auto p = parsed(own);
  CHECK((p.version == 1 || p.version == 2));
  CHECK_FALSE(p.interfaces.empty());
  CHECK(pack(split(own)) == own);
  CHECK(pack(split(other)) == other);
  // in the other format as well (v1 is UCX's default, v2 with UCX_ADDRESS_VERSION=v2)
  const auto format = other_format_address(p.version);
  CHECK(parsed(format).version != p.version);
  taken(format, format);
  CHECK(pack(split(format)) == format);
  // and connect() takes it (the endpoint made, then closed while the peer is still there)
  const auto st = a->connect(1, b->endpoint(), {});
  CHECK_MESSAGE(st.ok(), st.reason());
  CHECK_FALSE(a->describe_endpoint(1).empty());
  a->disconnect(1);
  a.reset();
}

TEST_CASE("ucx address: a transport is named by the CRC-16/X.25 of its name, as UCX names them") {
  CHECK(ucx_transport_checksum("123456789") == 0x906e);  // the CRC's published check value
  // This worker's address names at least one of UCX's host transports by it.
  int host = 0;
  for (const auto& i : parsed(own_address()).interfaces)
    for (const char* name : {"self", "tcp", "sysv", "posix", "cma"}) host += i.checksum == ucx_transport_checksum(name);
  CHECK(host > 0);
}

TEST_CASE("ucx address: every truncation of a real address is refused, and connect() refuses it") {
  auto t = make_transport();
  const auto own = worker_address(*t);
  for (std::size_t n = 0; n < own.size(); ++n) {
    CAPTURE(n);
    refused(own.substr(0, n), own, "runs past the end");
    if (n == 0) continue;  // the endpoint's framing refuses an empty one itself
    const auto st = t->connect(3, endpoint_with(*t, own.substr(0, n)), {});
    REQUIRE_FALSE(st.ok());
    CHECK(st.reason().find("worker address") != std::string::npos);
  }
}

TEST_CASE("ucx address: a changed byte is taken only where the walk over the address stays the same") {
  // Every value at every position: a length or flag changed so that UCX's walk would go
  // elsewhere (or past the end) is refused. A longer worker name (debug info) may swallow whole
  // devices and leave a valid address behind, so its length byte is not held to this.
  for (const auto& own : {own_address(), worker_address(*make_transport())}) {
    const auto base = parsed(own);
    const auto walk = [](const ucx_address& a) {
      std::vector<std::tuple<std::size_t, std::size_t, std::size_t, std::size_t, std::size_t>> out;
      for (const auto& i : a.interfaces)
        out.emplace_back(i.offset, a.devices[i.device].address_offset, a.devices[i.device].address_length,
                         i.address_offset, i.address_length);
      return out;
    };
    const std::size_t name_length_at = base.debug_info ? (base.version == 1 ? 9 : 10) : own.size();
    std::size_t changed = 0, taken_count = 0;
    for (std::size_t at = 0; at < own.size(); ++at) {
      for (int v = 0; v < 256; ++v) {
        if (static_cast<unsigned char>(own[at]) == v) continue;
        std::string m = own;
        m[at] = static_cast<char>(v);
        ++changed;
        if (!check_ucx_address(m, own).ok()) continue;
        ++taken_count;
        if (at == name_length_at) continue;
        const auto again = parsed(m);
        if (walk(again) != walk(base)) FAIL("byte " << at << " changed to " << v << " is taken with another layout");
      }
    }
    // Payload bytes (worker id, addresses, attributes' numbers) may change; structure may not.
    CHECK(taken_count > 0);
    CHECK(taken_count < changed);
  }
}

TEST_CASE("ucx address: bytes after its end are refused") {
  const auto own = own_address();
  refused(own + '\0', own, "1 bytes after its end");
  refused(own + own, own, "after its end");
}

TEST_CASE("ucx address: a transport neither this worker nor UCX 1.22 has is refused") {
  const auto own = own_address();
  auto p = split(own);
  p.devices[0].ifaces[0].checksum = ucx_transport_checksum("rc_mlx5");
  refused(pack(p), own, "names a transport this UCX does not have");
  p.devices[0].ifaces[0].checksum = 0x1234;
  refused(pack(p), own, "names a transport this UCX does not have");
}

TEST_CASE("ucx address: an interface or device address of another length than its transport's is refused") {
  const auto own = own_address();
  {  // every interface of this worker's, one byte longer and one shorter
    const auto p = split(own);
    for (std::size_t d = 0; d < p.devices.size(); ++d)
      for (std::size_t i = 0; i < p.devices[d].ifaces.size(); ++i) {
        CAPTURE(d);
        CAPTURE(i);
        auto longer = p;
        longer.devices[d].ifaces[i].address += '\x01';
        refused(pack(longer), own, "interface address");
        if (p.devices[d].ifaces[i].address.empty()) continue;
        auto shorter = p;
        shorter.devices[d].ifaces[i].address.pop_back();
        refused(pack(shorter), own, "interface address");
      }
  }
  const auto p = split(own);
  refused(with_device(p, "self", "", std::string(9, '\0')), own, "interface address of 9 bytes");
  refused(with_device(p, "tcp", tcp_device(0, AF_INET, 4), "\1\2\3"), own, "interface address of 3 bytes");
  refused(with_device(p, "self", "\1", std::string(8, '\0')), own, "device address of 1 bytes");
  refused(with_device(p, "sysv", identity(false, 0).substr(0, 7), std::string(8, '\0')), own,
          "device address of 7 bytes");
  refused(with_device(p, "cuda_copy", "", std::string(4, '\0')), own, "interface address of 4 bytes");
  refused(with_device(p, "cuda_ipc", std::string(10, '\0'), std::string(4, '\0')), own, "device address of 10 bytes");
}

TEST_CASE("ucx address: lengths that differ between hosts are taken where the address's own bytes select them") {
  const auto own = own_address();
  const auto p = split(own);
  const std::string port = "\x12\x34", pid = bytes_of(std::uint32_t{4242});
  // tcp: IPv4, IPv6 and loopback (a host identity padded to 12) device addresses
  taken(with_device(p, "tcp", tcp_device(0, AF_INET, 4), port), own);
  taken(with_device(p, "tcp", tcp_device(0, AF_INET6, 16), port), own);
  taken(with_device(p, "tcp", tcp_device(1, AF_INET, 12), port), own);
  refused(with_device(p, "tcp", tcp_device(0, AF_INET, 16), port), own, "flags and address family say 6");
  refused(with_device(p, "tcp", tcp_device(0, AF_INET6, 4), port), own, "flags and address family say 18");
  refused(with_device(p, "tcp", tcp_device(1, AF_INET, 4), port), own, "flags and address family say 14");
  refused(with_device(p, "tcp", tcp_device(0, AF_UNIX, 4), port), own, "address family");
  refused(with_device(p, "tcp", tcp_device(2, AF_INET, 4), port), own, "tcp flags");
  // shared memory: the host identity, with the IPC namespace when not the root one
  taken(with_device(p, "sysv", identity(false, 0), bytes_of(std::uint64_t{7})), own);
  taken(with_device(p, "sysv", identity(true, 4), bytes_of(std::uint64_t{7})), own);
  refused(with_device(p, "sysv", identity(true, 0), bytes_of(std::uint64_t{7})), own, "namespace flag says 12");
  refused(with_device(p, "sysv", identity(false, 4), bytes_of(std::uint64_t{7})), own, "namespace flag says 8");
  // cma: the process id, with its PID namespace when flagged
  taken(with_device(p, "cma", identity(false, 0), pid), own);
  taken(with_device(p, "cma", identity(false, 0), bytes_of(std::uint32_t{4242u | 1u << 31}) + pid), own);
  refused(with_device(p, "cma", identity(false, 0), bytes_of(std::uint32_t{4242u | 1u << 31})), own,
          "namespace flag says 8");
  // posix: the segment id, by /proc (with a PID namespace when flagged), shm_open or a directory
  const std::uint64_t procfs = 1ull << 63, shm_open = 1ull << 62, pid_ns = 1ull << 60;
  taken(with_device(p, "posix", identity(false, 0), bytes_of(procfs | 5)), own);
  taken(with_device(p, "posix", identity(false, 0), bytes_of(procfs | pid_ns | 5) + pid), own);
  taken(with_device(p, "posix", identity(false, 0), bytes_of(shm_open | 5)), own);
  taken(with_device(p, "posix", identity(false, 0), bytes_of(std::uint64_t{5}) + std::string("/tmp\0", 5)), own);
  refused(with_device(p, "posix", identity(false, 0), bytes_of(procfs | pid_ns | 5)), own, "segment flags say 12");
  refused(with_device(p, "posix", identity(false, 0), bytes_of(std::uint64_t{5}) + "/tmp"), own, "zero-terminated");
  // cuda_ipc, from a GPU host: the host id (and a multi-node NVLink flag), the process id
  // (and its PID namespace)
  taken(with_device(p, "cuda_ipc", std::string(8, '\x09'), pid), own);
  taken(with_device(p, "cuda_ipc", std::string(8, '\x09') + '\x01', pid + pid), own);
  refused(with_device(p, "cuda_ipc", std::string(8, '\x09') + '\x02', pid), own, "cuda_ipc flags");
  refused(with_device(p, "cuda_ipc", std::string(8, '\x09'), pid + '\0'), own, "interface address of 5 bytes");
}

TEST_CASE("ucx address: a transport kvflow knows no format of is held to this worker's lengths for it") {
  // Both addresses made here: an own one whose first interface is of such a transport.
  auto mine = split(own_address());
  mine.devices[0].ifaces.resize(1);
  mine.devices[0].address = std::string(5, '\x03');
  mine.devices[0].ifaces[0].checksum = ucx_transport_checksum("rc_mlx5");
  mine.devices[0].ifaces[0].address = std::string(7, '\x04');
  const auto own = pack(mine);
  taken(own, own);
  auto peer = mine;
  peer.devices[0].ifaces[0].address += '\0';
  refused(pack(peer), own, "interface address of 8 bytes, not a length this worker's has");
  peer = mine;
  peer.devices[0].address.pop_back();
  refused(pack(peer), own, "device address of 4 bytes, not a length this worker's has");
}

TEST_CASE("ucx address: header, device and interface fields UCX's worker addresses never hold are refused") {
  const auto own = own_address();
  const auto p = split(own);
  const bool v1 = p.version == 1;
  {  // format, flags
    auto h = own;
    h[0] = static_cast<char>((h[0] & 0xf0) | 0x0f);
    refused(h, own, "format 15");
    const auto other = other_format_address(p.version);
    taken(other, other);
    refused(other, own, "UCX_ADDRESS_VERSION differs");
    auto release = p;
    release.release = (p.release + 1) % 16;
    if (!v1) release.head[0] = static_cast<char>(0x01 | release.release << 4);
    refused(pack(release), own, "packed by UCX 1.x");
    auto flags = p;  // a client id (packed for client-server connections, not in a worker address)
    if (v1)
      flags.head[0] = static_cast<char>(flags.head[0] | 0x40);
    else
      flags.head[1] = static_cast<char>(flags.head[1] | 0x04);
    refused(pack(flags), own, "header flags");
    auto no_id = p;
    if (v1)
      no_id.head[0] = static_cast<char>(no_id.head[0] & ~0x20);
    else
      no_id.head[1] = static_cast<char>(no_id.head[1] & ~0x02);
    refused(pack(no_id), own, "no worker id");
  }
  {  // devices
    auto md = p;
    md.devices[0].md = 64;
    refused(pack(md), own, "memory domain index 64");
    auto paths = p;
    paths.devices[0].paths = 2;
    taken(pack(paths), own);
    auto sys = p;
    sys.devices[0].system_device = 3;
    taken(pack(sys), own);
    auto one_path = pack(paths);  // the paths byte follows the length byte: make it 1
    const auto at = parsed(one_path).devices[0].address_offset - 1;
    one_path[at] = 1;
    refused(one_path, own, "1 paths");
    auto unknown = pack(sys);
    unknown[parsed(unknown).devices[0].address_offset - 1] = '\xff';
    refused(unknown, own, "system device is flagged but unknown");
    auto none = p.head + '\xff';
    refused(none, own, "lists no devices");
    auto empty = p;  // an md byte saying "no interfaces" on a device that has them
    empty.devices[0].md |= 0x80;
    refused(pack(empty), own, "has no interfaces");
  }
  {  // interfaces
    auto ep = p;
    ep.devices[0].ifaces[0].flags = 0x40;
    refused(pack(ep), own, "carries endpoint addresses");
    auto many = p;
    many.devices.resize(1);
    auto f = many.devices[0].ifaces.at(0);
    f.checksum = ucx_transport_checksum("self");
    f.address = std::string(8, '\0');
    many.devices[0].address.clear();
    many.devices[0].ifaces.assign(128, f);
    taken(pack(many), own);
    many.devices[0].ifaces.push_back(f);
    refused(pack(many), own, "more than 128 interfaces");
  }
}

TEST_CASE("regression: the ucx_connect fuzz inputs that made UCX abort or fault are refused by connect()") {
  // tests/fuzz/regressions/ucx_connect: a registration's endpoint and regions as CAF serialized
  // them (fuzz_ucx_connect.cpp). Two made UCX 1.13 abort on an unknown address version; one made
  // libuct fault (uct_iface_local_is_reachable, 1.13), one ucp_address_unpack read past the end
  // (1.22). Before the check only the version was looked at, and the last two were taken.
  auto t = make_transport();
  for (const std::string file : {"found-worker-address-version-15", "seed-00-worker-address-version-15",
                                 "libuct-segv-iface-local-is-reachable", "segv-ucp-address-unpack-ucx-1.22"}) {
    CAPTURE(file);
    std::ifstream in(std::string(KVFLOW_FUZZ_DIR) + "/regressions/ucx_connect/" + file, std::ios::binary);
    REQUIRE(in);
    const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::string endpoint;
    std::vector<region_desc> regions;
    caf::binary_deserializer source{nullptr, bytes.data(), bytes.size()};
    REQUIRE_FALSE(source(endpoint, regions));
    const auto st = t->connect(1, endpoint, regions);
    REQUIRE_FALSE(st.ok());
    CHECK_MESSAGE(st.reason().find("worker address") != std::string::npos, st.reason());
  }
}
