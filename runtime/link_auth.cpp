#include "runtime/link_auth.hpp"

#include "runtime/basp_message_check.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace kvflow::runtime {

namespace {

constexpr char magic[8] = {'k', 'v', 'f', 'l', 'o', 'w', 'L', '1'};
constexpr char proof_label[] = "kvflow node link v1";

std::array<std::uint8_t, link_auth::nonce_size> fresh_nonce() {
  std::array<std::uint8_t, link_auth::nonce_size> n{};
  if (RAND_bytes(n.data(), static_cast<int>(n.size())) != 1)
    throw std::runtime_error("link authentication: the OpenSSL random generator failed");
  return n;
}

}  // namespace

link_auth::link_auth(role r, std::string token) : link_auth(r, std::move(token), fresh_nonce()) {}

link_auth::link_auth(role r, std::string token, const std::array<std::uint8_t, nonce_size>& nonce)
    : role_(r), token_(std::move(token)), nonce_(nonce) {
  std::array<std::uint8_t, hello_size> hello{};
  std::memcpy(hello.data(), magic, sizeof magic);
  hello[8] = token_.empty() ? 0 : 1;
  hello[9] = static_cast<std::uint8_t>(role_);
  std::memcpy(hello.data() + 12, nonce_.data(), nonce_size);
  emit(hello.data(), hello.size());
}

void link_auth::emit(const std::uint8_t* p, std::size_t n) {
  // out_ holds the most one end ever says (greeting, proof, verdict); reaching past it is a bug.
  if (out_len_ + n > out_.size()) throw std::logic_error("link_auth: output past its buffer");
  std::memcpy(out_.data() + out_len_, p, n);
  out_len_ += n;
}

std::size_t link_auth::wants() const {
  if (state_ != outcome::pending) return 0;
  switch (step_) {
    case step::hello: return hello_size - in_len_;
    case step::proof: return proof_size - in_len_;
    case step::verdict: return verdict_size - in_len_;
    case step::done: return 0;
  }
  return 0;
}

void link_auth::feed(const std::uint8_t* p, std::size_t n) {
  while (n > 0 && wants() > 0) {
    const std::size_t take = std::min(n, wants());
    std::memcpy(in_.data() + in_len_, p, take);
    in_len_ += take;
    p += take;
    n -= take;
    if (wants() > 0) break;
    const step was = step_;
    in_len_ = 0;
    if (was == step::hello) on_hello();
    else if (was == step::proof) on_proof();
    else if (was == step::verdict) on_verdict();
  }
}

std::array<std::uint8_t, link_auth::proof_size> link_auth::proof_of(role who, const std::uint8_t* their_nonce,
                                                                    const std::uint8_t* other_nonce) const {
  std::uint8_t msg[sizeof proof_label + 1 + 2 * nonce_size];
  std::memcpy(msg, proof_label, sizeof proof_label);
  msg[sizeof proof_label] = static_cast<std::uint8_t>(who);
  std::memcpy(msg + sizeof proof_label + 1, their_nonce, nonce_size);
  std::memcpy(msg + sizeof proof_label + 1 + nonce_size, other_nonce, nonce_size);
  std::array<std::uint8_t, proof_size> mac{};
  unsigned int len = 0;
  if (HMAC(EVP_sha256(), token_.data(), static_cast<int>(token_.size()), msg, sizeof msg, mac.data(), &len) ==
          nullptr ||
      len != proof_size)
    throw std::runtime_error("link authentication: HMAC-SHA256 failed");
  return mac;
}

void link_auth::refuse(verdict_code told, std::string why) {
  const std::uint8_t v = told;
  emit(&v, 1);
  reason_ = std::move(why);
  if (told == bad_greeting) {  // not a kvflow peer: nothing more to hear from it
    state_ = outcome::refused;
    step_ = step::done;
    return;
  }
  // A kvflow peer sends its verdict too: read it before the link closes, or closing with it
  // unread resets the connection, and the peer loses this end's verdict and proof unread.
  refusing_ = true;
  step_ = step::verdict;
}

void link_auth::on_hello() {
  if (std::memcmp(in_.data(), magic, sizeof magic) != 0)
    return refuse(bad_greeting, "the peer is not a kvflow node link (wrong greeting)");
  const std::uint8_t mode = in_[8], peer_role = in_[9];
  const auto other = role_ == role::connector ? role::acceptor : role::connector;
  if (mode > 1 || peer_role != static_cast<std::uint8_t>(other))
    return refuse(bad_greeting, "the peer's greeting is malformed (mode or role)");
  std::memcpy(peer_nonce_.data(), in_.data() + 12, nonce_size);
  if (CRYPTO_memcmp(peer_nonce_.data(), nonce_.data(), nonce_size) == 0)
    return refuse(bad_greeting, "the peer repeated this node's nonce");
  const bool mine = !token_.empty(), theirs = mode == 1;
  if (mine && !theirs)
    return refuse(peer_has_none, "the peer has no cluster token and this node requires one (KVFLOW_AUTH_TOKEN)");
  if (!mine && theirs)
    return refuse(peer_needs_one, "the peer requires a cluster token and none is configured here (KVFLOW_AUTH_TOKEN)");
  if (!mine) {
    peer_verified_ = true;
    const std::uint8_t v = ok;
    emit(&v, 1);
    step_ = step::verdict;
    return;
  }
  auto proof = proof_of(role_, nonce_.data(), peer_nonce_.data());
  emit(proof.data(), proof.size());
  step_ = step::proof;
}

void link_auth::on_proof() {
  const auto other = role_ == role::connector ? role::acceptor : role::connector;
  auto expected = proof_of(other, peer_nonce_.data(), nonce_.data());
  if (CRYPTO_memcmp(expected.data(), in_.data(), proof_size) != 0)
    return refuse(wrong_token, "the peer's proof does not match this node's cluster token (the tokens differ)");
  peer_verified_ = true;
  const std::uint8_t v = ok;
  emit(&v, 1);
  step_ = step::verdict;
}

void link_auth::on_verdict() {
  step_ = step::done;
  if (refusing_) {  // this end's own reason stands, whatever the peer says
    state_ = outcome::refused;
    return;
  }
  switch (in_[0]) {
    case ok:
      state_ = peer_verified_ ? outcome::accepted : outcome::refused;
      return;
    case wrong_token: reason_ = "the peer refused this node's cluster token (the tokens differ)"; break;
    case peer_has_none: reason_ = "the peer requires a cluster token and none is configured here"; break;
    case peer_needs_one: reason_ = "the peer has no cluster token and this node requires one"; break;
    case bad_greeting: reason_ = "the peer refused this node's greeting"; break;
    default: reason_ = "the peer answered with an unknown verdict"; break;
  }
  state_ = outcome::refused;
}

std::string frame_guard::origin_refusal(std::uint8_t op) {
  const auto origin = basp_origin_node(inspect_.data(), inspect_.size());
  const bool handshake = op == basp_server_handshake || op == basp_client_handshake;
  if (origin.empty()) return handshake ? "a handshake that names no node" : "a frame whose source node is unreadable";
  if (handshake) {
    // A node repeats its handshake on a link (CAF's select-connection flag), always as itself.
    if (peer_node_.empty()) peer_node_ = origin;
    if (origin == peer_node_) return {};
    return "a handshake as " + basp_node_text(origin) + " on a link it opened as " + basp_node_text(peer_node_);
  }
  if (peer_node_.empty()) return "a frame of another node before its handshake";
  if (origin == peer_node_ || relay_) return {};
  return "a frame on behalf of " + basp_node_text(origin) + " (it is " + basp_node_text(peer_node_) +
         ", and only the bootstrap this node dialled forwards for others)";
}

bool frame_guard::pass(const std::uint8_t* p, std::size_t n) {
  if (!reason_.empty()) return false;
  while (n > 0) {
    if (inspecting_) {
      const auto want = static_cast<std::size_t>(std::min<std::uint64_t>(payload_len_, basp_inspect_window));
      const auto take = std::min(n, want - inspect_.size());
      inspect_.insert(inspect_.end(), p, p + take);
      payload_left_ -= take;
      p += take;
      n -= take;
      if (inspect_.size() < want) break;
      inspecting_ = false;
      std::string why;
      if (op_ == basp_direct_message || op_ == basp_routed_message)
        why = basp_message_refusal(op_ == basp_routed_message, inspect_.data(), inspect_.size(), payload_len_);
      if (why.empty() && basp_names_origin(op_)) why = origin_refusal(op_);
      inspect_.clear();  // keeps its capacity (at most the window): no allocation per message
      if (!why.empty()) {
        reason_ = "the peer sent " + why;
        return false;
      }
      continue;
    }
    if (payload_left_ > 0) {
      const auto skip = static_cast<std::size_t>(std::min<std::uint64_t>(n, payload_left_));
      payload_left_ -= skip;
      p += skip;
      n -= skip;
      continue;
    }
    const std::size_t take = std::min(n, header_size - header_len_);
    std::memcpy(header_.data() + header_len_, p, take);
    header_len_ += take;
    p += take;
    n -= take;
    if (header_len_ < header_size) break;
    header_len_ = 0;
    const std::uint64_t len = (std::uint64_t{header_[4]} << 24) | (std::uint64_t{header_[5]} << 16) |
                              (std::uint64_t{header_[6]} << 8) | std::uint64_t{header_[7]};
    if (len > max_) {
      reason_ = "a frame claims " + std::to_string(len) + " payload bytes, over the cap of " + std::to_string(max_) +
                " (KVFLOW_LINK_MAX_FRAME_BYTES)";
      return false;
    }
    payload_left_ = len;
    const auto op = header_[0];
    if (len > 0 && (op == basp_direct_message || basp_names_origin(op))) {
      inspecting_ = true;
      op_ = op;
      payload_len_ = len;
    }
  }
  return true;
}

}  // namespace kvflow::runtime
