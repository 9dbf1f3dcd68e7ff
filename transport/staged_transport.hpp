#pragma once
// Staged transport: GPU memory to GPU memory through pinned host memory, for peers no direct GPU
// path reaches (no CUDA IPC between them, no CUDA-capable UCX). On one host the middle hop is no
// copy: the receiver's staging ring (transport/staging_ring.hpp) is shared memory both processes
// map and pin, so a push is one gather kernel from the sender's pages into a ring slot on the
// sender's stream (after the engine's ready fence) and one from the slot into the receiver's
// pages on the receiver's stream, the slots of a push pipelined: while the receiver empties one,
// the sender fills the next. The receiver checks every run against what it registered before it
// copies, and a push completes once the receiver's copy of its last slot finished, so its bytes
// are visible to the decode engine's streams from then on.
//
// Threads, each asleep when there is nothing to do: per connected peer one that fills slots as
// the peer frees them (it sleeps on the lane's bell), one that hands filled slots over once the
// GPU wrote them (it sleeps on their events); on the receiving side one that takes slots (asleep
// on the ring's doorbell) and one that gives them back once copied.
//
// `host_copies` makes both ends copy with memcpy instead of the GPU (memory is host memory): the
// same protocol and threads, so that machines without a GPU test it.
#include <chrono>
#include <functional>
#include <memory>

#include "transport/staging_ring.hpp"
#include "transport/transport.hpp"

namespace kvflow::transport {

struct staged_options {
  int device = 0;  // the GPU of this endpoint's memory and streams
  ring_shape ring;  // the ring this endpoint receives into (made at the first registration)
  // A slot handed to the receiver and not taken in this time fails its push, and the peer with
  // it until it is connected again (a frozen receiver); a dead receiver fails them within a
  // second (the lane looks whether it lives once a second while it has work out), a push made
  // after it died at once.
  std::chrono::milliseconds slot_timeout{30000};
  bool host_copies = false;
};

class staged_transport final : public transport {
 public:
  static result<std::unique_ptr<staged_transport>> create(const staged_options& options);
  ~staged_transport() override;

  const char* name() const override { return "staged"; }
  // Tag, host identity, process id and the name of this endpoint's ring.
  std::string endpoint() const override;
  std::vector<memory_type> memory_types() const override;
  capabilities query() const override;
  bool can_connect(const std::string& endpoint) const override;
  // Makes and pins the ring now (a receiver's set-up: pinning takes a while, which the first
  // registration would otherwise pay, inside a rank that is already taking part in rounds).
  status prepare_receiving();
  result<region_desc> register_memory(std::uint64_t owner, void* base, std::uint64_t len) override;
  // Returns once no slot taken before can still write into the region.
  void deregister_memory(std::uint64_t region) override;
  status connect(std::uint64_t peer, const std::string& endpoint, const std::vector<region_desc>& regions) override;
  void disconnect(std::uint64_t peer) override;
  void push(std::uint64_t peer, const std::vector<block>& blocks, completion done) override;
  void push_after(std::uintptr_t ready_fence, std::uint64_t peer, const std::vector<block>& blocks,
                  completion done) override;
  std::uint64_t bytes_moved() const override;

  // For a transport that carries slots between hosts (ucx_staged_transport) over this one:
  // The ring this endpoint receives into; null before the first registration or
  // prepare_receiving. It lives as long as this transport.
  staging_ring* receiving_ring() const;
  // Called after the receiver gave a slot of `lane` back (verdict written, slot done), on the
  // receiving threads: it must not block. One hook; an empty function removes it, and returns
  // once no call of the old one is running.
  void set_return_hook(std::function<void(int lane)> hook);
  // Fails `peer`'s lane as if its receiver had died, with `why`: its pushes fail with it, slots
  // still out stay out until they are done or time out, and later pushes fail at once until
  // the peer is connected again.
  void fail_peer(std::uint64_t peer, const status& why);
  // How often, in this process, a lane's or a receiver's taking thread woke though its bell had
  // not rung: a timed-out or spurious sleep. Idle ones sleep until rung (0 but for a signal); a
  // lane with slots out to its receiver wakes at their deadline and every second, to find a
  // receiver that died (a dead process rings nothing). For tests.
  static std::uint64_t unrung_wakeups();
  // The endpoint that reaches a ring this process made (a forwarder's local ring), as a
  // same-host sender connects to it.
  static std::string endpoint_of_ring(const std::string& ring_name);

  struct impl;

 private:
  explicit staged_transport(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace kvflow::transport
