// The interleaved simulator's delaying transport: what it holds, lands, fails and drops.
#include <doctest/doctest.h>

#include <array>
#include <cstring>

#include "command/sim_delayed_transport.hpp"
#include "transport/inproc_transport.hpp"

namespace {

using kvflow::transport::block;

struct two_peers {
  std::array<std::byte, 64> src{}, dst{};
  std::shared_ptr<kvflow::transport::inproc_transport> real =
      std::make_shared<kvflow::transport::inproc_transport>(std::make_shared<kvflow::transport::inproc_fabric>());
  kvflow::command::delayed_transport t{real, 7};
  std::uint64_t region = 0;
  two_peers() {
    src.fill(std::byte{0x5a});
    region = t.register_memory(2, dst.data(), dst.size()).value().id;
  }
  std::vector<block> blocks() const { return {block{src.data(), region, 8, 16}}; }
};

}  // namespace

TEST_CASE("delayed transport: a push lands only when picked as often as drawn, and then completes ok") {
  two_peers p;
  int done = 0;
  bool ok = false;
  p.t.push(2, p.blocks(), [&](kvflow::status s) { ++done, ok = s.ok(); });
  REQUIRE(p.t.held() == 1);
  CHECK(p.dst[8] == std::byte{0});
  int picks = 0;
  while (!p.t.pick(0)) {
    CHECK(done == 0);
    CHECK(p.dst[8] == std::byte{0});  // not a byte before it lands
    REQUIRE(++picks < 64);
  }
  CHECK(done == 1);
  CHECK(ok);
  CHECK(p.dst[8] == std::byte{0x5a});
  CHECK(p.dst[23] == std::byte{0x5a});
  CHECK(p.dst[24] == std::byte{0});
  CHECK(p.t.held() == 0);
  CHECK(p.t.held_total() == 1);
}

TEST_CASE("delayed transport: disconnect fails the peer's held pushes unlanded, drop_from drops a dead sender's") {
  two_peers p;
  std::vector<bool> outcome;
  for (int i = 0; i < 3; ++i) p.t.push(2, p.blocks(), [&](kvflow::status s) { outcome.push_back(s.ok()); });
  p.t.push(3, p.blocks(), [&](kvflow::status s) { outcome.push_back(s.ok()); });
  p.t.disconnect(2);
  CHECK(outcome == std::vector<bool>{false, false, false});
  CHECK(p.t.held() == 1);
  CHECK(p.dst[8] == std::byte{0});
  const auto* lo = p.src.data();
  CHECK(p.t.drop_from([&](const std::byte* x) { return x >= lo && x < lo + p.src.size(); }) == 1);
  CHECK(p.t.held() == 0);
  CHECK(outcome.size() == 3);  // dropped, not completed: its sender is gone
}
