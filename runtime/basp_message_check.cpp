#include "runtime/basp_message_check.hpp"

#include <algorithm>

namespace kvflow::runtime {

namespace {

// CAF 0.17's binary format: integers big-endian, sequence sizes as LEB128 varints.
struct reader {
  const std::uint8_t* p;
  std::size_t n;
  std::size_t pos = 0;
  bool ok = true;

  std::uint64_t be(int bytes) {
    if (!ok || n - pos < static_cast<std::size_t>(bytes)) {
      ok = false;
      return 0;
    }
    std::uint64_t v = 0;
    for (int i = 0; i < bytes; ++i) v = (v << 8) | p[pos++];
    return v;
  }
  void skip(std::size_t k) {
    if (!ok || n - pos < k) {
      ok = false;
      return;
    }
    pos += k;
  }
  std::uint64_t varint() {
    std::uint64_t v = 0;
    for (int shift = 0; ok && shift < 64; shift += 7) {
      const auto b = static_cast<std::uint8_t>(be(1));
      v |= std::uint64_t{b & 0x7fu} << shift;
      if ((b & 0x80u) == 0) return v;
    }
    ok = false;
    return 0;
  }
};

constexpr std::uint64_t no_node = 0xf;                     // atom("") : an invalid node id
constexpr std::uint64_t default_node = 0x3e9aab9bac79ULL;  // atom("default"): process id + host id
constexpr std::size_t default_node_bytes = 4 + 20;
constexpr std::uint64_t max_stack = 64;

// A node id; false for a kind kvflow's nodes never use (CAF's URI ids).
bool node_id(reader& r) {
  const auto kind = r.be(8);
  if (!r.ok || kind == no_node) return r.ok;
  if (kind != default_node) return false;
  r.skip(default_node_bytes);
  return r.ok;
}

}  // namespace

std::string basp_message_refusal(bool routed, const std::uint8_t* p, std::size_t n, std::uint64_t total) {
  reader r{p, std::min<std::uint64_t>(n, total)};
  const bool whole = n >= total;
  auto unreadable = [&](const char* what) {
    return std::string(whole ? "a malformed message (" : "a message whose type is not within its first ") +
           (whole ? std::string(what) + ")" : std::to_string(basp_inspect_window) + " bytes");
  };
  if (routed && (!node_id(r) || !node_id(r))) return unreadable("its node ids");
  const auto stack = r.varint();
  if (!r.ok) return unreadable("its forwarding stack");
  if (stack > max_stack) return "a message with a forwarding stack of " + std::to_string(stack) + " actors";
  for (std::uint64_t i = 0; i < stack; ++i) {
    r.skip(8);
    if (!node_id(r)) return unreadable("its forwarding stack");
  }
  r.be(2);  // CAF's type number, 0 for a message
  const auto len = r.varint();
  if (!r.ok || len > r.n - r.pos) return unreadable("its type names");
  const std::string type(reinterpret_cast<const char*>(r.p + r.pos), static_cast<std::size_t>(len));
  if (type == "@<>+@exit") return "an exit message (no peer may stop an actor of this process)";
  if (type == "@<>+@down") return "a down message (only CAF reports a remote actor's end)";
  return {};
}

bool basp_names_origin(std::uint8_t op) {
  return op == basp_server_handshake || op == basp_client_handshake || op == basp_routed_message ||
         op == basp_monitor_message || op == basp_down_message;
}

std::string basp_origin_node(const std::uint8_t* p, std::size_t n) {
  reader r{p, n};
  if (!node_id(r)) return {};
  return std::string(reinterpret_cast<const char*>(p), r.pos);
}

std::string basp_node_text(const std::string& node) {
  if (node.size() < 8 + default_node_bytes) return "the invalid node";
  reader r{reinterpret_cast<const std::uint8_t*>(node.data()), node.size(), 8};
  const auto pid = r.be(4);
  static const char* hex = "0123456789abcdef";
  std::string host;
  for (int i = 0; i < 4; ++i) {
    const auto b = static_cast<std::uint8_t>(r.be(1));
    host += hex[b >> 4];
    host += hex[b & 0xf];
  }
  return "node " + std::to_string(pid) + "@" + host;
}

}  // namespace kvflow::runtime
