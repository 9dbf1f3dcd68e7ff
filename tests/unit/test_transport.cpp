// transport/inproc_transport.hpp: ownership and bounds checks before any byte is written; and
// transport/local_mapping.hpp, which bounds a same-host peer's segment.
#include <doctest/doctest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "transport/byte_codec.hpp"
#include "transport/inproc_transport.hpp"
#include "transport/local_mapping.hpp"

using namespace kvflow;
using namespace kvflow::transport;

namespace {

constexpr std::uint64_t alice = 1;  // owns the destination region
constexpr std::uint64_t bob = 2;    // owns another region

struct fixture {
  std::shared_ptr<inproc_fabric> fabric = std::make_shared<inproc_fabric>();
  inproc_transport t{fabric};
  std::vector<std::byte> dst = std::vector<std::byte>(256, std::byte{0});
  std::vector<std::byte> other = std::vector<std::byte>(64, std::byte{0});
  std::vector<std::byte> src = std::vector<std::byte>(256, std::byte{0xAB});
  std::uint64_t region = 0;
  std::uint64_t other_region = 0;

  fixture() {
    auto r = t.register_memory(alice, dst.data(), dst.size());
    auto o = t.register_memory(bob, other.data(), other.size());
    REQUIRE(r.ok());
    REQUIRE(o.ok());
    region = r.value().id;
    other_region = o.value().id;
  }

  // Returns the status and the number of completion calls.
  std::pair<status, int> push(std::uint64_t peer, const std::vector<block>& blocks) {
    status out = status::error("completion not called");
    int calls = 0;
    t.push(peer, blocks, [&](status s) {
      ++calls;
      out = std::move(s);
    });
    return {out, calls};
  }

  bool dst_zero() const {
    return std::all_of(dst.begin(), dst.end(), [](std::byte b) { return b == std::byte{0}; });
  }
};

}  // namespace

TEST_CASE("byte codec: bytes to hex and back, and text that is not hex refused") {
  using kvflow::transport::codec::from_hex;
  using kvflow::transport::codec::to_hex;
  std::string all;
  for (int i = 0; i < 256; ++i) all.push_back(static_cast<char>(i));
  CHECK(to_hex(std::string("\x00\x7f\xff", 3)) == "007fff");
  CHECK(from_hex(to_hex(all)) == all);
  CHECK(from_hex("7F") == "\x7f");
  CHECK(from_hex("abc").empty());  // odd length
  CHECK(from_hex("zz").empty());
  CHECK(from_hex("0g").empty());
}

TEST_CASE("transport: register_memory describes the region") {
  fixture f;
  CHECK(f.region != f.other_region);
  std::vector<std::byte> more(8);
  auto d = f.t.register_memory(alice, more.data(), more.size());
  REQUIRE(d.ok());
  CHECK(d.value().size == 8);
  CHECK(d.value().remote_key.empty());
  CHECK(d.value().id != f.region);
  CHECK(std::string(f.t.name()) == "inproc");
  // A null base with a non-zero length is refused.
  CHECK_FALSE(f.t.register_memory(alice, nullptr, 16).ok());
}

TEST_CASE("transport: a valid push copies the bytes and calls the completion once with ok") {
  fixture f;
  std::vector<std::byte> a(16, std::byte{1}), b(8, std::byte{2});
  auto [st, calls] = f.push(alice, {{a.data(), f.region, 0, 16}, {b.data(), f.region, 248, 8}});
  CHECK(st.ok());
  CHECK(calls == 1);
  CHECK(f.dst[0] == std::byte{1});
  CHECK(f.dst[15] == std::byte{1});
  CHECK(f.dst[16] == std::byte{0});
  CHECK(f.dst[247] == std::byte{0});
  CHECK(f.dst[248] == std::byte{2});
  CHECK(f.dst[255] == std::byte{2});
  // The whole region at once is in bounds too; an empty push succeeds.
  CHECK(f.push(alice, {{f.src.data(), f.region, 0, 256}}).first.ok());
  CHECK(f.dst[100] == std::byte{0xAB});
  auto [empty_st, empty_calls] = f.push(alice, {});
  CHECK(empty_st.ok());
  CHECK(empty_calls == 1);
}

TEST_CASE("transport: a push into a region owned by another endpoint is refused") {
  fixture f;
  // bob's region, pushed as if to alice: refused, and bob's memory untouched.
  auto [st, calls] = f.push(alice, {{f.src.data(), f.other_region, 0, 8}});
  CHECK_FALSE(st.ok());
  CHECK_FALSE(st.reason().empty());
  CHECK(calls == 1);
  CHECK(std::all_of(f.other.begin(), f.other.end(), [](std::byte b) { return b == std::byte{0}; }));
  // alice's region pushed to bob: refused as well.
  CHECK_FALSE(f.push(bob, {{f.src.data(), f.region, 0, 8}}).first.ok());
  CHECK(f.dst_zero());
}

TEST_CASE("transport: out-of-bounds blocks are refused and nothing is written") {
  fixture f;
  const auto max = std::numeric_limits<std::uint64_t>::max();
  struct bad {
    std::uint64_t offset, len;
  };
  for (auto b : {bad{250, 7}, bad{256, 1}, bad{257, 0}, bad{0, 257}, bad{max - 1, 8},
                 bad{8, max - 1}, bad{max, max}}) {
    CAPTURE(b.offset);
    CAPTURE(b.len);
    // An earlier valid block in the same push must not be written either.
    auto [st, calls] =
        f.push(alice, {{f.src.data(), f.region, 0, 16}, {f.src.data(), f.region, b.offset, b.len}});
    CHECK_FALSE(st.ok());
    CHECK(st.reason().find("exceeds") != std::string::npos);
    CHECK(calls == 1);
    CHECK(f.dst_zero());
  }
  // Exactly at the end with length 0 is fine.
  CHECK(f.push(alice, {{f.src.data(), f.region, 256, 0}}).first.ok());
}

TEST_CASE("transport: an unknown or deregistered region is refused") {
  fixture f;
  auto [st, calls] = f.push(alice, {{f.src.data(), f.region, 0, 8}, {f.src.data(), 9999, 0, 8}});
  CHECK_FALSE(st.ok());
  CHECK(st.reason().find("9999") != std::string::npos);
  CHECK(calls == 1);
  CHECK(f.dst_zero());

  f.t.deregister_memory(f.region);
  CHECK_FALSE(f.push(alice, {{f.src.data(), f.region, 0, 8}}).first.ok());
  CHECK(f.dst_zero());
  // Deregistering one region leaves the others usable.
  CHECK(f.push(bob, {{f.src.data(), f.other_region, 0, 8}}).first.ok());
  CHECK(f.other[0] == std::byte{0xAB});
}

TEST_CASE("transport: endpoints sharing one fabric see each other's regions") {
  auto fabric = std::make_shared<inproc_fabric>();
  inproc_transport a(fabric), b(fabric);
  std::vector<std::byte> mem(32, std::byte{0}), data(32, std::byte{7});
  auto r = b.register_memory(bob, mem.data(), mem.size());
  REQUIRE(r.ok());
  status st = status::error("not called");
  a.push(bob, {{data.data(), r.value().id, 4, 4}}, [&](status s) { st = std::move(s); });
  CHECK(st.ok());
  CHECK(mem[3] == std::byte{0});
  CHECK(mem[4] == std::byte{7});
  CHECK(mem[7] == std::byte{7});
  CHECK(mem[8] == std::byte{0});
  // A different fabric does not know the region.
  inproc_transport c(std::make_shared<inproc_fabric>());
  c.push(bob, {{data.data(), r.value().id, 4, 4}}, [&](status s) { st = std::move(s); });
  CHECK_FALSE(st.ok());
}

TEST_CASE("transport: bytes_moved counts only the bytes of successful pushes") {
  fixture f;
  CHECK(f.t.bytes_moved() == 0);
  REQUIRE(f.push(alice, {{f.src.data(), f.region, 0, 16}, {f.src.data(), f.region, 100, 4}}).first.ok());
  CHECK(f.t.bytes_moved() == 20);
  // A refused push moves nothing, not even its valid blocks.
  REQUIRE_FALSE(f.push(alice, {{f.src.data(), f.region, 0, 16}, {f.src.data(), f.region, 255, 2}}).first.ok());
  CHECK(f.t.bytes_moved() == 20);
}

// Completions run actor sends and may touch the transport again: they must not be called with
// a fabric lock held (that would deadlock on register/deregister).
TEST_CASE("transport: the completion may re-enter the transport") {
  fixture f;
  std::vector<std::byte> extra(8);
  int ok_calls = 0, err_calls = 0;
  f.t.push(alice, {{f.src.data(), f.region, 0, 8}}, [&](status s) {
    CHECK(s.ok());
    ++ok_calls;
    auto d = f.t.register_memory(alice, extra.data(), extra.size());
    REQUIRE(d.ok());
    f.t.deregister_memory(d.value().id);
  });
  f.t.push(alice, {{f.src.data(), 424242, 0, 8}}, [&](status s) {
    CHECK_FALSE(s.ok());
    ++err_calls;
    auto d = f.t.register_memory(alice, extra.data(), extra.size());
    REQUIRE(d.ok());
    f.t.deregister_memory(d.value().id);
  });
  CHECK(ok_calls == 1);
  CHECK(err_calls == 1);
}

TEST_CASE("transport: a transport that cannot order on the GPU refuses a ready fence and writes nothing") {
  fixture f;
  auto caps = f.t.query();
  CHECK_FALSE(caps.gpu_ordered);
  CHECK_FALSE(caps.cross_host);
  REQUIRE(caps.memory_types.size() == 1);
  CHECK(caps.memory_types[0] == memory_type::host);
  status got = status::error("completion not called");
  int calls = 0;
  f.t.push_after(0x1234, alice, {{f.src.data(), f.region, 0, 16}}, [&](status s) {
    ++calls;
    got = std::move(s);
  });
  CHECK(calls == 1);
  CHECK_FALSE(got.ok());
  CHECK(got.reason().find("CUDA event") != std::string::npos);
  CHECK(f.dst_zero());
  // Without a fence it is a plain push.
  f.t.push_after(0, alice, {{f.src.data(), f.region, 0, 16}}, [&](status s) {
    ++calls;
    got = std::move(s);
  });
  CHECK(calls == 2);
  CHECK(got.ok());
  CHECK(f.dst[0] == std::byte{0xAB});
}

TEST_CASE("local mapping: the kernel's map bounds an address's mapping, and an unmapped address has none") {
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  // Three pages with the middle one unmapped: two mappings, a hole between them.
  auto* p = static_cast<char*>(::mmap(nullptr, 3 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  REQUIRE(p != MAP_FAILED);
  REQUIRE(::munmap(p + page, page) == 0);
  auto first = kvflow::transport::mapping_of(p + 10);
  REQUIRE(first);
  CHECK(first.value().begin <= reinterpret_cast<std::uintptr_t>(p));
  CHECK(first.value().end == reinterpret_cast<std::uintptr_t>(p + page));
  auto hole = kvflow::transport::mapping_of(p + page + 10);
  REQUIRE_FALSE(hole);
  CHECK(hole.error().reason().find("no mapping") != std::string::npos);
  auto last = kvflow::transport::mapping_of(p + 2 * page);
  REQUIRE(last);
  CHECK(last.value().begin == reinterpret_cast<std::uintptr_t>(p + 2 * page));
  ::munmap(p, page);
  ::munmap(p + 2 * page, page);
}
