// Target staged_slot: a slot of the staged transport's ring (transport/staging_ring.hpp) as a
// lying sender on the same host fills it. The input is the slot's runs (staged_desc, 24 bytes
// each; a slot holds at most 64), written into a live receiver's ring through a mapping of its
// own, handed over as a sender hands a slot over, and taken by the receiver's real thread
// (staged_transport with host copies, one registered region between two guard zones).
// Properties: the receiver gives every slot back; it lands a slot exactly when every run fits its
// region, and otherwise writes nothing; the guards are never written. The seeds are a sender's
// real runs and the lies of the unit tests.
#include <sys/mman.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <vector>

#include "tests/fuzz/fuzz_support.hpp"
#include "transport/byte_codec.hpp"
#include "transport/shared_futex.hpp"
#include "transport/staged_transport.hpp"

using namespace kvflow;
using namespace kvflow::transport;
using namespace kvflow::fuzz;

namespace {

constexpr std::uint64_t zone = 64u << 10;  // the region, and each guard around it
constexpr std::uint32_t max_runs = 64;

struct receiver {
  std::unique_ptr<staged_transport> t;
  std::vector<std::byte> mem = std::vector<std::byte>(3 * zone, std::byte{0});
  std::uint64_t region = 0;
  std::unique_ptr<staging_ring> ring;  // the lying sender's mapping of it
  int lane = -1;

  receiver() {
    staged_options o;
    o.host_copies = true;
    o.ring = {1, 1, zone, max_runs};
    auto made = staged_transport::create(o);
    if (!made) fail("receiver: " + made.error().reason());
    t = std::move(made.value());
    auto r = t->register_memory(1, mem.data() + zone, zone);
    if (!r) fail("register: " + r.error().reason());
    region = r.value().id;
    const auto e = t->endpoint();
    std::size_t at = sizeof "kvflow-staged-1";
    std::string boot, name;
    std::uint64_t pid = 0;
    if (!codec::get_string(e, at, boot, 64) || !codec::get(e, at, pid) || !codec::get_string(e, at, name, 200))
      fail("cannot read the receiver's endpoint");
    auto opened = staging_ring::open(name);
    if (!opened) fail("open: " + opened.error().reason());
    ring = std::move(opened.value());
    shm_unlink(name.c_str());  // both mappings stay; no name is left behind when the target ends
    lane = ring->claim_lane(pid << 32 | 1);
    if (lane < 0) fail("no lane");
  }
};

receiver& the_receiver() {
  static receiver* r = new receiver;  // never destroyed: the target runs until libFuzzer exits
  return *r;
}

bytes runs_of(const std::vector<staged_desc>& runs) {
  bytes out(runs.size() * sizeof(staged_desc));
  std::memcpy(out.data(), runs.data(), out.size());
  return out;
}

}  // namespace

std::vector<bytes> kvflow::fuzz::seeds() {
  return {
      runs_of({{1, 0, 4096}, {1, 8192, 41984}}),                       // a sender's pages
      runs_of({{1, 0, zone}}),                                          // the whole region
      runs_of({{1, zone - 8, 16}}),                                     // past its end
      runs_of({{1, ~0ull - 10, 20}}),                                   // an offset that wraps
      runs_of({{2, 0, 16}}),                                            // a region not registered
      runs_of({{1, 0, 40u << 10}, {1, 0, 40u << 10}}),                  // more than the slot
      runs_of({{1, 0, 0}}),                                             // an empty run
  };
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto& r = the_receiver();
  std::vector<staged_desc> runs(std::min<std::size_t>(size / sizeof(staged_desc), max_runs));
  if (!runs.empty()) std::memcpy(static_cast<void*>(runs.data()), data, runs.size() * sizeof(staged_desc));
  // Would the runs fit? Computed here, apart from the receiver's own check.
  bool fits = true;
  std::uint64_t total = 0;
  for (const auto& run : runs) {
    fits = fits && run.region == r.region && run.len > 0 && run.offset <= zone && run.len <= zone - run.offset &&
           run.len <= zone - total;
    if (fits) total += run.len;
  }
  const std::vector<std::byte> before = r.mem;
  std::memset(r.ring->data(r.lane, 0), 0xA5, zone);
  r.ring->write_descs(r.lane, 0, runs, 1);
  const auto seen = r.ring->bell(r.lane).load();
  r.ring->state(r.lane, 0).store(static_cast<std::uint32_t>(slot_state::filled));
  futex_bump(r.ring->doorbell());
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (r.ring->state(r.lane, 0).load() != static_cast<std::uint32_t>(slot_state::done)) {
    if (std::chrono::steady_clock::now() > deadline) fail("the receiver never gave the slot back");
    futex_wait(r.ring->bell(r.lane), seen, std::chrono::microseconds(10000));
  }
  const bool landed = r.ring->read_verdict(r.lane, 0).ok();
  r.ring->state(r.lane, 0).store(static_cast<std::uint32_t>(slot_state::free));
  if (landed && !fits) fail("the receiver landed a slot whose runs do not fit its region");
  if (!landed && fits) fail("the receiver refused a slot whose runs fit its region");
  if (!landed && r.mem != before) fail("the receiver refused a slot and still wrote");
  for (std::uint64_t i = 0; i < zone; ++i)
    if (r.mem[i] != std::byte{0} || r.mem[2 * zone + i] != std::byte{0}) fail("a guard zone was written");
  return 0;
}
