// Target link_frames: the bytes a node link gets from its peer before and after the token
// handshake: the handshake itself (runtime/link_auth.hpp, the accepting end) and then BASP
// frames through the frame guard, which reads each message's start (runtime/basp_message_check).
// The first input byte picks which; the rest is the peer's bytes.
// Properties: besides no crash and bounded memory, the handshake never accepts a peer that did
// not prove the token (these bytes cannot: the acceptor's nonce is fresh), the frame guard's
// verdict does not depend on how the bytes are split into reads, and once it refuses, it stays
// refusing.
#include <array>
#include <cstring>

#include "runtime/basp_message_check.hpp"
#include "runtime/link_auth.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;
using runtime::frame_guard;
using runtime::link_auth;

namespace {

const std::string token = "0123456789abcdef-fuzz-token";

// A BASP frame: the 32-byte header (operation, payload length) and the payload.
bytes frame(std::uint8_t op, const bytes& payload) {
  bytes out(frame_guard::header_size, 0);
  out[0] = static_cast<char>(op);
  const auto len = static_cast<std::uint32_t>(payload.size());
  for (int i = 0; i < 4; ++i) out[4 + i] = static_cast<char>(len >> (24 - 8 * i));
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

bytes with_mode(char mode, const bytes& b) {
  bytes out{mode};
  out.insert(out.end(), b.begin(), b.end());
  return out;
}

// The guard's verdict on `p`, fed `chunk` bytes at a time (0: all at once).
bool guard_passes(const std::uint8_t* p, std::size_t n, std::size_t chunk) {
  frame_guard g(1 << 16);
  bool ok = true;
  const std::size_t step = chunk == 0 ? n : chunk;
  for (std::size_t i = 0; i < n; i += step) {
    const bool now = g.pass(p + i, std::min(step, n - i));
    if (!ok && now) fail("the frame guard passed bytes after it refused");
    ok = ok && now;
  }
  return ok;
}

}  // namespace

std::vector<bytes> kvflow::fuzz::seeds() {
  // A connector's greeting (its first bytes), as an acceptor reads it.
  std::array<std::uint8_t, link_auth::nonce_size> nonce{};
  nonce.fill(7);
  link_auth connector(link_auth::role::connector, token, nonce);
  bytes hello(reinterpret_cast<const char*>(connector.output()),
              reinterpret_cast<const char*>(connector.output()) + connector.output_size());
  // Real message payloads: a forwarding stack and a message, as the BASP instance writes them.
  std::vector<caf::strong_actor_ptr> none, one{caf::actor_cast<caf::strong_actor_ptr>(some_actor())};
  auto exit = caf::make_message(caf::exit_msg{some_actor().address(), caf::exit_reason::kill});
  auto number = caf::make_message(41);
  const auto node = system().node();
  return {
      with_mode(0, hello),
      with_mode(1, frame(runtime::basp_direct_message, serialize(none, number))),
      with_mode(1, frame(runtime::basp_direct_message, serialize(one, exit))),
      with_mode(1, frame(runtime::basp_routed_message, serialize(node, node, none, number))),
      with_mode(2, serialize(none, exit)),
  };
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  const std::uint8_t mode = data[0] % 3;
  const std::uint8_t* p = data + 1;
  const std::size_t n = size - 1;
  if (mode == 0) {
    link_auth acceptor(link_auth::role::acceptor, token);
    std::size_t at = 0;
    while (at < n && acceptor.wants() > 0 && acceptor.state() == link_auth::outcome::pending) {
      const std::size_t take = std::min(acceptor.wants(), n - at);
      acceptor.feed(p + at, take);
      at += take;
      acceptor.output_sent(acceptor.output_size());
    }
    if (acceptor.accepted()) fail("the acceptor accepted a peer that never saw its nonce");
    return 0;
  }
  if (mode == 1) {
    const bool whole = guard_passes(p, n, 0);
    for (std::size_t chunk : {std::size_t{1}, std::size_t{5}, std::size_t{33}})
      if (guard_passes(p, n, chunk) != whole) fail("the frame guard's verdict depends on how the bytes are split");
    return 0;
  }
  // A payload on its own, as a direct and as a routed message, whole and cut short.
  for (bool routed : {false, true}) {
    const auto once = runtime::basp_message_refusal(routed, p, n, n);
    if (once != runtime::basp_message_refusal(routed, p, n, n)) fail("the message check is not deterministic");
    (void)runtime::basp_message_refusal(routed, p, n / 2, n);
  }
  return 0;
}
