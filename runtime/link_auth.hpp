#pragma once
// The first bytes of every node link, before CAF's BASP sees any: both ends show a greeting
// with a fresh nonce, prove the cluster token by an HMAC over both nonces (the token itself is
// never sent), and tell each other their verdict, so a refused peer learns why. Then the frame
// guard checks each BASP header that passes, before CAF allocates what it claims. No sockets and
// no CAF here: runtime/link_guard.cpp feeds these from the connection.
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace kvflow::runtime {

class link_auth {
 public:
  enum class role : std::uint8_t { connector = 'C', acceptor = 'A' };
  enum class outcome { pending, accepted, refused };

  static constexpr std::size_t nonce_size = 32;
  static constexpr std::size_t hello_size = 12 + nonce_size;  // magic, mode, reserved, nonce
  static constexpr std::size_t proof_size = 32;               // HMAC-SHA256
  static constexpr std::size_t verdict_size = 1;

  // `token` empty: this end has none (and refuses a peer that has one, and vice versa).
  link_auth(role r, std::string token);
  // A fixed nonce: for tests that need reproducible bytes.
  link_auth(role r, std::string token, const std::array<std::uint8_t, nonce_size>& nonce);

  // Bytes this end has to send now. Stable storage: what is not taken stays at the same
  // address (TLS retries a write with the same buffer).
  const std::uint8_t* output() const { return out_.data() + out_sent_; }
  std::size_t output_size() const { return out_len_ - out_sent_; }
  void output_sent(std::size_t n) { out_sent_ += n; }

  // How many bytes this end reads next (0: none; it is done or only has output left).
  std::size_t wants() const;
  // Takes at most wants() bytes from the peer.
  void feed(const std::uint8_t* p, std::size_t n);

  outcome state() const { return state_; }
  // Accepted: the peer proved the token and accepted this end's proof (or neither end has one).
  bool accepted() const { return state_ == outcome::accepted; }
  // Why this end refuses or was refused, for a log line and an error ("" while accepted). Set
  // as soon as this end refuses; state() turns refused once the peer's verdict was read too.
  const std::string& reason() const { return reason_; }

 private:
  enum class step { hello, proof, verdict, done };
  enum verdict_code : std::uint8_t { ok = 0, bad_greeting = 1, wrong_token = 2, peer_has_none = 3, peer_needs_one = 4 };

  void emit(const std::uint8_t* p, std::size_t n);
  void on_hello();
  void on_proof();
  void on_verdict();
  void refuse(verdict_code told, std::string why);
  std::array<std::uint8_t, proof_size> proof_of(role who, const std::uint8_t* their_nonce,
                                                const std::uint8_t* other_nonce) const;

  role role_;
  std::string token_;
  std::array<std::uint8_t, nonce_size> nonce_{};
  std::array<std::uint8_t, nonce_size> peer_nonce_{};
  step step_ = step::hello;
  std::array<std::uint8_t, hello_size> in_{};
  std::size_t in_len_ = 0;
  bool peer_verified_ = false;
  bool refusing_ = false;  // this end refused; it still reads the peer's verdict
  std::array<std::uint8_t, hello_size + proof_size + verdict_size> out_{};
  std::size_t out_len_ = 0, out_sent_ = 0;
  outcome state_ = outcome::pending;
  std::string reason_;
};

// Follows the BASP framing of CAF 0.17 (a 32-byte header: byte 0 the operation, bytes 4..7 the
// payload length, big-endian; then that many payload bytes) over the bytes that reach CAF. It
// refuses the first header that claims more than `max_payload`, and the first message that
// basp_message_refusal refuses (read from the start of its payload).
class frame_guard {
 public:
  static constexpr std::size_t header_size = 32;
  // `relay`: the peer may send frames on behalf of other nodes (see pass()): the bootstrap, which
  // forwards between nodes that have no direct link yet (CAF 0.17 routes through the node that
  // introduced an actor until then).
  explicit frame_guard(std::uint64_t max_payload, bool relay = false) : max_(max_payload), relay_(relay) {}
  // False (and reason() says why) once a header claims too much; every byte after that too.
  // The node a link's peer names in its first handshake is the link's: a later handshake naming
  // another is refused, and so is a routed, monitor or down frame that names another as its
  // source unless the peer relays.
  bool pass(const std::uint8_t* p, std::size_t n);
  const std::string& reason() const { return reason_; }
  // The node id (CAF's bytes) of the peer's first handshake; empty before it.
  const std::string& peer_node() const { return peer_node_; }

 private:
  std::string origin_refusal(std::uint8_t op);
  std::uint64_t max_;
  bool relay_;
  std::string peer_node_;
  std::uint8_t op_ = 0;  // of the message whose payload is being inspected
  std::array<std::uint8_t, header_size> header_{};
  std::size_t header_len_ = 0;
  std::uint64_t payload_left_ = 0;
  // The start of the current message's payload, until it can be checked.
  bool inspecting_ = false;
  std::uint64_t payload_len_ = 0;
  std::vector<std::uint8_t> inspect_;
  std::string reason_;
};

}  // namespace kvflow::runtime
