#pragma once
// What every fuzz target shares: decoding bytes with CAF 0.17's binary_deserializer as a
// receiving node does, the round-trip check, the failure libFuzzer reports as a crash, and the
// seeds each target defines (`fuzz_X --make-corpus DIR` writes them, see fuzz_support.cpp).
#include <caf/all.hpp>
#include <caf/binary_deserializer.hpp>
#include <caf/binary_serializer.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace kvflow::fuzz {

using bytes = std::vector<char>;

// The target's seed inputs: real values, serialized (each target defines it).
std::vector<bytes> seeds();

// Reports a broken property: prints `what` and aborts (libFuzzer saves the input).
[[noreturn]] void fail(const std::string& what);

// One actor system per process, every kvflow message type registered (never destroyed: the
// targets run until libFuzzer exits).
caf::actor_system& system();
// A live actor of this process, for the handle fields of seeds (to the target that reads them
// they are another node's handles).
caf::actor some_actor();

template <class... Ts>
bytes serialize(Ts&... xs) {
  bytes out;
  caf::binary_serializer sink{system(), out};
  if (auto err = sink(xs...)) fail("serialize: " + system().render(err));
  return out;
}

namespace detail {
// Another node's actor handle becomes a proxy on a receiving node; here it becomes an invalid
// handle (what a receiver must cope with anyway), so no proxy outlives its input.
class no_proxies final : public caf::proxy_registry::backend {
 public:
  caf::strong_actor_ptr make_proxy(caf::node_id, caf::actor_id) override { return nullptr; }
  void set_last_hop(caf::node_id*) override {}
};
}  // namespace detail

// Decodes `xs` from [data, data + size) as a node receiving them would; false when CAF refuses
// the bytes. `left` (may be null) gets how many bytes were not consumed.
template <class... Ts>
bool decode(const void* data, std::size_t size, std::size_t* left, Ts&... xs) {
  detail::no_proxies backend;
  caf::proxy_registry proxies{system(), backend};
  caf::scoped_execution_unit context{&system()};
  context.proxy_registry_ptr(&proxies);
  caf::binary_deserializer source{&context, static_cast<const char*>(data), size};
  auto err = source(xs...);
  if (left != nullptr) *left = source.remaining();
  return !err;
}

// A value that decoded serializes, decodes again from exactly those bytes, and serializes to
// the same bytes: the inspector reads what it writes, for every value a peer can make.
template <class T>
void check_round_trip(T& x) {
  const bytes once = serialize(x);
  T again;
  std::size_t left = 0;
  if (!decode(once.data(), once.size(), &left, again)) fail("round trip: the re-serialized value does not decode");
  if (left != 0) fail("round trip: " + std::to_string(left) + " bytes of the re-serialized value left unread");
  if (serialize(again) != once) fail("round trip: the value changed through serialization");
}

// The body of a message target: bytes that decode as a T (CAF refusing them is fine) must
// round-trip, then `receive` runs what a receiver of it runs.
template <class T, class Receive>
int fuzz_message(const std::uint8_t* data, std::size_t size, Receive receive) {
  T x;
  if (!decode(data, size, nullptr, x)) return 0;
  check_round_trip(x);
  receive(x);
  return 0;
}

}  // namespace kvflow::fuzz
