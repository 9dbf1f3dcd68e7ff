#pragma once
// The staged path's shared ring: a segment in /dev/shm that a receiver creates and its same-host
// senders map, so that the only copies of a staged push are the sender's device-to-host (into a
// slot) and the receiver's host-to-device (out of it); the middle hop is no copy at all.
//
// The segment has lanes, one per connected sender, each with a few slots. A sender claims a lane,
// fills a slot's data and its descriptors (where in the receiver's regions each run of the data
// goes), then marks it filled and rings the receiver's doorbell. The receiver takes the slot,
// checks every descriptor against what it registered, copies, writes its verdict and rings the
// lane's bell. A slot is a credit: a sender never has more data in flight than its lane holds.
//
// Everything in the segment may have been written by another process, which may lie: openers
// check the header against the file, and the receiver copies descriptors out of the slot before
// it checks and uses them.
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "config/status.hpp"

namespace kvflow::transport {

struct ring_shape {
  std::uint32_t lanes = 8;               // senders at once
  std::uint32_t slots = 4;               // per lane: a sender's data in flight, in slot_bytes
  std::uint64_t slot_bytes = 16u << 20;  // a multiple of 64 KiB
  std::uint32_t max_descs = 4096;        // runs one slot may scatter into
};

// A run of a slot's data, as its sender describes it: the next `len` bytes of the slot (runs are
// packed in order from its start) go to `offset` in the receiver's region `region`.
struct staged_desc {
  std::uint64_t region = 0;
  std::uint64_t offset = 0;
  std::uint64_t len = 0;
};

// A slot's life: free (the lane's owner may fill it), filled (handed to the receiver), taken (the
// receiver is copying it), done (the receiver's verdict is in; the owner may reuse it).
enum class slot_state : std::uint32_t { free = 0, filled = 1, taken = 2, done = 3 };

class staging_ring {
 public:
  // The receiver's side: makes the segment `name` (shm_open, exclusive); unlinked on destruction.
  static result<std::unique_ptr<staging_ring>> create(const std::string& name, const ring_shape& shape);
  // A sender's side: maps an existing segment, its header checked against the file it is in.
  static result<std::unique_ptr<staging_ring>> open(const std::string& name);
  ~staging_ring();
  staging_ring(const staging_ring&) = delete;
  staging_ring& operator=(const staging_ring&) = delete;

  const ring_shape& shape() const { return shape_; }
  const std::string& name() const { return name_; }
  std::uint64_t creator_pid() const;  // as the header says
  std::byte* base() const { return base_; }
  std::uint64_t bytes() const { return bytes_; }

  // A lane for `claimant` (non-zero: its process id in the high 32 bits): a free one, or one
  // whose claimant's process is gone. -1 when every lane is held.
  int claim_lane(std::uint64_t claimant);
  void release_lane(int lane, std::uint64_t claimant);
  std::atomic<std::uint32_t>& doorbell();         // the receiver sleeps on it
  std::atomic<std::uint32_t>& bell(int lane);     // the lane's owner sleeps on it

  // A slot's state as the hand-overs use it: a release store, an acquire load, and an acquire
  // compare-exchange (true when the state went `from` -> `to`). Under ThreadSanitizer they also
  // release and acquire a key per (file, lane, slot), the same at every mapping (staging_ring.cpp).
  void store_state(int lane, int slot, slot_state to);
  slot_state load_state(int lane, int slot) const;
  bool exchange_state(int lane, int slot, slot_state from, slot_state to);
  // The raw word, as another process (or a test playing one) writes it by hand.
  std::atomic<std::uint32_t>& state(int lane, int slot);
  std::uint64_t data_offset(int lane, int slot) const;  // of the slot's data, from base()
  std::byte* data(int lane, int slot) const { return base_ + data_offset(lane, slot); }

  // Sender: the slot's runs (before it is marked filled); at most shape().max_descs.
  void write_descs(int lane, int slot, const std::vector<staged_desc>& runs, std::uint64_t seq);
  // Receiver: the runs of a taken slot, copied out and checked against the slot (count and total
  // length); whether each fits a region is the caller's check.
  result<std::vector<staged_desc>> read_descs(int lane, int slot) const;
  std::uint64_t seq(int lane, int slot) const;
  // Receiver: its verdict on a slot (written before the slot is marked done).
  void write_verdict(int lane, int slot, const status& s);
  // Sender: the verdict of a done slot.
  status read_verdict(int lane, int slot) const;

  struct header;
  struct lane_header;
  struct slot_header;
  struct sync_keys;

 private:
  staging_ring(std::string name, std::byte* base, std::uint64_t bytes, const ring_shape& shape, bool owner,
               std::shared_ptr<sync_keys> keys);
  header& head() const;
  lane_header& lane(int l) const;
  slot_header& meta(int l, int s) const;
  staged_desc* descs(int l, int s) const;

  std::string name_;
  std::byte* base_ = nullptr;
  std::uint64_t bytes_ = 0;
  ring_shape shape_;
  bool owner_ = false;
  std::uint64_t lanes_off_ = 0, metas_off_ = 0, meta_bytes_ = 0, data_off_ = 0;  // the shape's layout
  std::shared_ptr<sync_keys> keys_;  // null unless built with ThreadSanitizer
};

// Whether the process `pid` still exists (a lane's claimant, a ring's creator).
bool process_alive(std::uint64_t pid);

}  // namespace kvflow::transport
