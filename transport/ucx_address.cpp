#include "transport/ucx_address.hpp"

#include <arpa/inet.h>
#include <sys/socket.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>
#include <string>

namespace kvflow::transport {

namespace {

// ---- The packed worker address of UCX 1.22 ------------------------------------------------
//
//   header     v1: 1 byte, format 0 in the low 4 bits, flags in the high 4.
//              v2: 2 bytes, format 1 and the release (minor % 16) in the first, flags in the next.
//   worker id  8 bytes (ucp_worker_get_address always packs it; v1 reads it whatever the flag).
//   name       if the debug-info flag: a length byte and that many bytes.
//   devices    each: an md byte (index, and the "no interfaces" flag), a length byte (length and
//              the last-device, number-of-paths and system-device flags), the number of paths
//              and system device bytes when flagged, the device address, then its interfaces.
//              v1 ends with an empty device whose index is the release and whose length byte
//              says last (the last real device is not marked); v2 marks its last device.
//   interface  the transport name's checksum (2 bytes), its attributes (v1: 16 bytes, v2: 8),
//              a length byte (length, and the last-interface and has-endpoint-addresses flags),
//              the interface address.
// In v2 a length or index whose bits are all ones continues in the next byte (v1 has no such
// extension). Little-endian as on the hosts that run kvflow.

constexpr unsigned flag_debug_info = 0x1, flag_worker_id = 0x2;  // header flags packed here
constexpr unsigned md_empty = 0x80, md_index_bits = 0x7f;
constexpr unsigned device_last = 0x80, device_paths = 0x40, device_sys = 0x20, device_length_bits = 0x1f;
constexpr unsigned iface_last = 0x80, iface_has_ep = 0x40, iface_length_bits = 0x3f;
constexpr std::uint8_t no_devices = 0xff;  // UCP_NULL_RESOURCE in place of the first md byte
constexpr std::uint8_t sys_device_unknown = 0xff;
constexpr unsigned max_md_index = 64;        // UCP_MAX_MDS: the width of UCX's md maps
constexpr std::size_t max_interfaces = 128;  // UCP_MAX_RESOURCES
constexpr std::size_t v1_attr_size = 16, v2_attr_size = 8;
// v1 attributes: the low 8 bits of the last word are the priority, then 13 capability and 1
// event flag, then (bits 30, 31) the atomics: bits 22-29 are never set.
constexpr std::uint32_t v1_unused_flags = 0x3fc00000u;
// v2 attributes: flags beyond UCP_ADDR_IFACE_FLAG_ATOMIC64 (bit 9) are never set.
constexpr std::uint16_t v2_unused_flags = 0xfc00u, v2_flag_am = 0x2;

std::string hex(unsigned v, int digits) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%0*x", digits, v);
  return buf;
}

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

template <class T>
T load(std::string_view b, std::size_t at) {
  T v;
  std::memcpy(&v, b.data() + at, sizeof v);
  return v;
}

status bad(const std::string& why) { return status::error("worker address: " + why); }

// Reads the address front to back; every read is preceded by need().
class walker {
 public:
  explicit walker(std::string_view b) : b_(b) {}
  std::size_t at() const { return at_; }
  std::size_t left() const { return b_.size() - at_; }
  // Refused unless n more bytes are there; `what` names them.
  status need(std::size_t n, const std::string& what) const {
    if (n <= left()) return {};
    return bad(what + " runs past the end (needs " + std::to_string(n) + " byte" + (n == 1 ? "" : "s") + ", " +
               std::to_string(left()) + " left)");
  }
  std::uint8_t byte() { return static_cast<std::uint8_t>(b_[at_++]); }
  std::uint8_t peek() const { return static_cast<std::uint8_t>(b_[at_]); }
  void skip(std::size_t n) { at_ += n; }

 private:
  std::string_view b_;
  std::size_t at_ = 0;
};

// A length or index in the low `bits` of `first`; in v2 all ones there means the value is the
// next byte, which UCX writes only for values that need it (so at least `bits`).
result<unsigned> extended(walker& w, std::uint8_t first, unsigned bits, unsigned version, const std::string& what) {
  unsigned v = first & bits;
  if (version == 1 || v != bits) return v;
  if (auto st = w.need(1, what + "'s extension byte"); !st) return st;
  v = w.byte();
  if (v < bits)
    return bad(what + " of " + std::to_string(v) + " in an extension byte (written only from " + std::to_string(bits) +
               ")");
  return v;
}

// The interface attributes: UCX keeps the numbers it reads and ignores unknown flags, but they
// drive lane selection; refused here is what UCX 1.22 never packs.
status check_attributes(std::string_view b, std::size_t at, unsigned version, const std::string& what) {
  if (version == 1) {
    const auto overhead = load<float>(b, at), bandwidth = load<float>(b, at + 4), latency = load<float>(b, at + 8);
    const auto flags = load<std::uint32_t>(b, at + 12);
    if (!std::isfinite(overhead) || !std::isfinite(bandwidth) || !std::isfinite(latency) || overhead < 0 ||
        bandwidth <= 0 || latency < 0)
      return bad(what + " have overhead " + number(overhead) + ", bandwidth " + number(bandwidth) + ", latency " +
                 number(latency) + " (finite and not negative, the bandwidth above 0, in what UCX packs)");
    if ((flags & v1_unused_flags) != 0) return bad(what + " have flags UCX does not define (" + hex(flags, 8) + ")");
    return {};
  }
  const auto segment = load<std::uint16_t>(b, at + 4);
  const auto flags = load<std::uint16_t>(b, at + 6);
  if ((flags & v2_unused_flags) != 0) return bad(what + " have flags UCX does not define (" + hex(flags, 4) + ")");
  // UCX packs a receive segment of 0 only for interfaces without active messages (a sender caps
  // its fragments at the peer's segment).
  if ((flags & v2_flag_am) != 0 && segment == 0) return bad(what + " take active messages into 0-byte segments");
  return {};
}

// ---- The transports' own address formats (UCX 1.22) -----------------------------------------
// Each returns why the bytes are not an address of its format, or nothing.

// A host identity (sm transports' device address, inside tcp's loopback one): 8 bytes, and a
// 4-byte namespace id after them when the top bit says the process is not in the root namespace.
std::string host_identity(std::string_view a) {
  if (a.size() < 8) return "of " + std::to_string(a.size()) + " bytes (a host identity has 8 or 12)";
  const bool ns = (load<std::uint64_t>(a, 0) >> 63) != 0;
  if (a.size() != (ns ? 12u : 8u))
    return "of " + std::to_string(a.size()) + " bytes where its namespace flag says " + (ns ? "12" : "8");
  return {};
}

// tcp's device address: a flags byte, the address family, then an IPv4 or IPv6 address, or for
// a loopback interface a host identity padded to 12 bytes. Hosts differ in which they pack.
std::string tcp_device(std::string_view a) {
  if (a.size() < 2) return "of " + std::to_string(a.size()) + " bytes (tcp's has at least 2)";
  const auto flags = static_cast<std::uint8_t>(a[0]), family = static_cast<std::uint8_t>(a[1]);
  if ((flags & ~1u) != 0) return "with tcp flags UCX does not define (" + hex(flags, 2) + ")";
  std::size_t want = 0;
  if ((flags & 1u) != 0)
    want = 2 + 12;
  else if (family == AF_INET)
    want = 2 + 4;
  else if (family == AF_INET6)
    want = 2 + 16;
  else
    return "of address family " + std::to_string(family) + " (tcp packs IPv4 or IPv6)";
  if (a.size() != want)
    return "of " + std::to_string(a.size()) + " bytes where its flags and address family say " + std::to_string(want);
  return {};
}

// posix's interface address: an 8-byte segment id whose top bits say how the segment is opened;
// through /proc (with a 4-byte PID namespace after it when flagged), through shm_open, or as a
// file in a directory whose zero-terminated name follows.
std::string posix_iface(std::string_view a) {
  if (a.size() < 8) return "of " + std::to_string(a.size()) + " bytes (posix's has at least 8)";
  const auto id = load<std::uint64_t>(a, 0);
  const bool procfs = (id >> 63) & 1, shm_open = (id >> 62) & 1, pid_ns = (id >> 60) & 1;
  if (procfs) {
    const std::size_t want = pid_ns ? 12 : 8;
    if (a.size() != want)
      return "of " + std::to_string(a.size()) + " bytes where its segment flags say " + std::to_string(want);
    return {};
  }
  if (pid_ns) return "with a PID namespace outside the /proc mode";
  if (shm_open)
    return a.size() == 8 ? std::string() : "of " + std::to_string(a.size()) + " bytes where its segment flags say 8";
  if (a.size() < 10 || a.back() != '\0') return "naming a directory that is not a zero-terminated string";
  return {};
}

// cma's interface address: a 4-byte process id, and a 4-byte PID namespace when its top bit says.
std::string cma_iface(std::string_view a) {
  if (a.size() < 4) return "of " + std::to_string(a.size()) + " bytes (cma's has 4 or 8)";
  const bool ns = (load<std::uint32_t>(a, 0) >> 31) != 0;
  if (a.size() != (ns ? 8u : 4u))
    return "of " + std::to_string(a.size()) + " bytes where its namespace flag says " + (ns ? "8" : "4");
  return {};
}

// cuda_ipc's device address: the 8-byte host id, and a flags byte (multi-node NVLink) when the
// packer's GPU driver supports it.
std::string cuda_ipc_device(std::string_view a) {
  if (a.size() == 8) return {};
  if (a.size() == 9 && (static_cast<std::uint8_t>(a[8]) & ~1u) == 0) return {};
  return a.size() == 9 ? "with cuda_ipc flags UCX does not define"
                       : "of " + std::to_string(a.size()) + " bytes (cuda_ipc's has 8 or 9)";
}

// cuda_ipc's interface address: the process id, and its PID namespace when not the root one.
std::string cuda_ipc_iface(std::string_view a) {
  if (a.size() == 4 || a.size() == 8) return {};
  return "of " + std::to_string(a.size()) + " bytes (cuda_ipc's has 4 or 8)";
}

template <std::size_t N>
std::string exactly(std::string_view a) {
  if (a.size() == N) return {};
  return "of " + std::to_string(a.size()) + " bytes (this transport's has " + std::to_string(N) + ")";
}

struct known_transport {
  const char* name;
  std::string (*device)(std::string_view);
  std::string (*iface)(std::string_view);
};

// UCX 1.22's transports as the project's UCX has them (libucx-cu13: no InfiniBand).
constexpr known_transport known_transports[] = {
    {"self", exactly<0>, exactly<8>},
    {"tcp", tcp_device, exactly<2>},
    {"sysv", host_identity, exactly<8>},
    {"posix", host_identity, posix_iface},
    {"cma", host_identity, cma_iface},
    {"cuda_copy", exactly<0>, exactly<8>},
    {"cuda_ipc", cuda_ipc_device, cuda_ipc_iface},
};

const known_transport* known(std::uint16_t checksum) {
  for (const auto& t : known_transports)
    if (ucx_transport_checksum(t.name) == checksum) return &t;
  return nullptr;
}

// The lengths this worker's own address has for a transport kvflow does not know the format of.
struct own_lengths {
  std::set<std::size_t> device, iface;
};

std::string interface_name(std::size_t i, const ucx_address::interface& e) {
  const auto* k = known(e.checksum);
  return "interface " + std::to_string(i) + " (" + (k ? std::string(k->name) : "transport " + hex(e.checksum, 4)) + ")";
}

// The addresses of every interface of `a` (bytes `b`) against their transports' formats, and
// those of a transport kvflow does not know the format of against the lengths `own` has for it
// (none taken when `own` lacks it). Without `own` (this worker's own address), those are skipped:
// its lengths are what a peer's are held to.
status check_interfaces(std::string_view b, const ucx_address& a, const std::map<std::uint16_t, own_lengths>* own) {
  for (std::size_t i = 0; i < a.interfaces.size(); ++i) {
    const auto& e = a.interfaces[i];
    const auto& d = a.devices[e.device];
    std::string why;
    if (const auto* k = known(e.checksum)) {
      if (auto w = k->device(b.substr(d.address_offset, d.address_length)); !w.empty())
        why = "has a device address " + w;
      else if (auto v = k->iface(b.substr(e.address_offset, e.address_length)); !v.empty())
        why = "has an interface address " + v;
    } else if (own != nullptr) {
      const auto it = own->find(e.checksum);
      if (it == own->end())
        why = "names a transport this UCX does not have";
      else if (it->second.device.count(d.address_length) == 0)
        why = "has a device address of " + std::to_string(d.address_length) + " bytes, not a length this worker's has";
      else if (it->second.iface.count(e.address_length) == 0)
        why = "has an interface address of " + std::to_string(e.address_length) +
              " bytes, not a length this worker's has";
    }
    if (!why.empty()) return bad(interface_name(i, e) + " " + why);
  }
  return {};
}

}  // namespace

std::uint16_t ucx_transport_checksum(std::string_view name) {
  std::uint16_t crc = 0xffff;
  for (unsigned char c : name) {
    crc ^= c;
    for (int bit = 0; bit < 8; ++bit)
      crc = (crc & 1) ? static_cast<std::uint16_t>((crc >> 1) ^ 0x8408) : static_cast<std::uint16_t>(crc >> 1);
  }
  return static_cast<std::uint16_t>(~crc);
}

result<ucx_address> parse_ucx_address(std::string_view b) {
  walker w(b);
  ucx_address a;
  if (auto st = w.need(1, "the header"); !st) return st;
  const auto head = w.byte();
  unsigned flags = 0;
  switch (head & 0x0f) {
    case 0:
      a.version = 1;
      flags = head >> 4;
      break;
    case 1:
      a.version = 2;
      a.release = head >> 4;
      if (auto st = w.need(1, "the header's flags"); !st) return st;
      flags = w.byte();
      break;
    default:
      return bad("format " + std::to_string(head & 0x0f) + " (UCX packs 0 for v1, 1 for v2)");
  }
  if ((flags & flag_worker_id) == 0) return bad("no worker id (UCX packs one in every worker address)");
  if ((flags & ~(flag_worker_id | flag_debug_info)) != 0)
    return bad("header flags " + hex(flags, 2) + " (a worker address has only the worker id and debug-info flags)");
  a.debug_info = (flags & flag_debug_info) != 0;
  if (auto st = w.need(8, "the worker id"); !st) return st;
  w.skip(8);
  if (a.debug_info) {
    if (auto st = w.need(1, "the worker name's length"); !st) return st;
    const auto n = w.byte();
    if (auto st = w.need(n, "the worker name"); !st) return st;
    w.skip(n);
  }
  if (auto st = w.need(1, "device 0"); !st) return st;
  if (w.peek() == no_devices) return bad("lists no devices");

  for (std::size_t d = 0;; ++d) {
    const std::string dev = "device " + std::to_string(d);
    const std::size_t start = w.at();
    if (auto st = w.need(1, dev); !st) return st;
    const auto md_byte = w.byte();
    const bool empty = (md_byte & md_empty) != 0;
    auto md = extended(w, md_byte, md_index_bits, a.version, dev + "'s memory domain index");
    if (!md) return md.error();
    if (auto st = w.need(1, dev + "'s address length"); !st) return st;
    const auto len_byte = w.byte();
    const bool last = (len_byte & device_last) != 0;
    auto len = extended(w, len_byte, device_length_bits, a.version, dev + "'s address length");
    if (!len) return len.error();
    ucx_address::device device;
    device.offset = start;
    device.md_index = md.value();
    if ((len_byte & device_paths) != 0) {
      if (auto st = w.need(1, dev + "'s number of paths"); !st) return st;
      device.paths = w.byte();
      if (device.paths < 2)
        return bad(dev + " has " + std::to_string(device.paths) + " paths in a field packed only for more than 1");
    }
    if ((len_byte & device_sys) != 0) {
      if (auto st = w.need(1, dev + "'s system device"); !st) return st;
      device.system_device = w.byte();
      if (device.system_device == sys_device_unknown) return bad(dev + "'s system device is flagged but unknown");
    }
    device.address_offset = w.at();
    device.address_length = len.value();
    if (auto st = w.need(device.address_length, dev + "'s address"); !st) return st;
    w.skip(device.address_length);

    if (empty) {
      // Only v1's release marker: the last device, no address, no paths or system device.
      if (a.version != 1 || !last || len_byte != device_last || md.value() > 0x0f)
        return bad(dev + " has no interfaces (UCX packs that only as a v1 address's last device, its release)");
      a.release = md.value();
      break;
    }
    if (a.version == 1 && last) return bad(dev + " is marked last: a v1 address ends with its release");
    if (md.value() >= max_md_index)
      return bad(dev + "'s memory domain index " + std::to_string(md.value()) + " (UCX's maps hold " +
                 std::to_string(max_md_index) + ")");
    a.devices.push_back(device);

    for (;;) {
      const std::size_t i = a.interfaces.size();
      const std::string what = "interface " + std::to_string(i);
      if (i == max_interfaces) return bad("more than " + std::to_string(max_interfaces) + " interfaces");
      if (auto st = w.need(2, what + "'s transport"); !st) return st;
      ucx_address::interface e;
      e.device = a.devices.size() - 1;
      e.offset = w.at();
      e.checksum = load<std::uint16_t>(b, w.at());
      w.skip(2);
      const std::size_t attr_size = a.version == 1 ? v1_attr_size : v2_attr_size;
      if (auto st = w.need(attr_size, what + "'s attributes"); !st) return st;
      if (auto st = check_attributes(b, w.at(), a.version, what + "'s attributes"); !st) return st;
      w.skip(attr_size);
      if (auto st = w.need(1, what + "'s address length"); !st) return st;
      const auto iface_byte = w.byte();
      if ((iface_byte & iface_has_ep) != 0)
        return bad(what + " carries endpoint addresses (a worker address has none)");
      auto iface_len = extended(w, iface_byte, iface_length_bits, a.version, what + "'s address length");
      if (!iface_len) return iface_len.error();
      e.address_offset = w.at();
      e.address_length = iface_len.value();
      if (auto st = w.need(e.address_length, what + "'s address"); !st) return st;
      w.skip(e.address_length);
      a.interfaces.push_back(e);
      if ((iface_byte & iface_last) != 0) break;
    }
    if (a.version == 2 && last) break;
  }
  if (w.left() != 0) return bad(std::to_string(w.left()) + " bytes after its end");
  return a;
}

status check_ucx_address(std::string_view peer, std::string_view own) {
  auto mine = parse_ucx_address(own);
  if (mine.ok()) {
    if (auto st = check_interfaces(own, mine.value(), nullptr); !st) mine = st;
  }
  if (!mine.ok())
    return status::error("cannot check a peer's worker address: this worker's own does not pass (" +
                         mine.error().reason() +
                         "); UCX_UNIFIED_MODE and UCX address formats other than "
                         "1.22's are not supported");
  auto theirs = parse_ucx_address(peer);
  if (!theirs) return theirs.error();
  const auto& m = mine.value();
  const auto& t = theirs.value();
  if (t.version != m.version)
    return bad("UCX's v" + std::to_string(t.version) + " format, this worker's is v" + std::to_string(m.version) +
               " (UCX_ADDRESS_VERSION differs?)");
  if (t.release != m.release)
    return bad("packed by UCX 1.x with x % 16 = " + std::to_string(t.release) + ", this worker's UCX has " +
               std::to_string(m.release));
  // What this worker has per transport: the rule for those whose format kvflow does not know.
  std::map<std::uint16_t, own_lengths> lengths;
  for (const auto& e : m.interfaces) {
    lengths[e.checksum].device.insert(m.devices[e.device].address_length);
    lengths[e.checksum].iface.insert(e.address_length);
  }
  return check_interfaces(peer, t, &lengths);
}

result<std::vector<std::string>> ucx_tcp_beyond_loopback(std::string_view bytes) {
  auto parsed = parse_ucx_address(bytes);
  if (!parsed) return parsed.error();
  const auto& a = parsed.value();
  std::vector<std::string> out;
  for (const auto& e : a.interfaces) {
    if (e.checksum != ucx_transport_checksum("tcp")) continue;
    const auto& d = a.devices[e.device];
    const auto dev = bytes.substr(d.address_offset, d.address_length);
    if (const auto why = tcp_device(dev); !why.empty()) return bad("a tcp device address " + why);
    if ((static_cast<std::uint8_t>(dev[0]) & 1u) != 0) continue;  // loopback: a host identity
    char text[INET6_ADDRSTRLEN] = {};
    const int family = static_cast<std::uint8_t>(dev[1]) == AF_INET ? AF_INET : AF_INET6;
    ::inet_ntop(family, dev.data() + 2, text, sizeof text);
    out.emplace_back(text);
  }
  return out;
}

}  // namespace kvflow::transport
