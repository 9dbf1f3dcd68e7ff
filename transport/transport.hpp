#pragma once
// The transport interface: how KV bytes move from a prefill rank into a decode rank's registered
// memory. In-process, UCX, CUDA IPC and NCCL paths implement it; actors own one instance.
//
// Lifecycle, the same for every transport: the receiver registers memory and hands its
// endpoint() and region_descs to the sender (in the registration message); the sender
// connect()s the peer with them, then push()es blocks into those regions. Nothing here blocks
// on the network: connect and push report failures through push completions.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "config/status.hpp"

namespace kvflow::transport {

// A registered region as described to a peer (travels in the registration message).
struct region_desc {
  std::uint64_t id = 0;       // transport-scoped id of the region
  std::uint64_t size = 0;     // bytes
  std::uint64_t address = 0;  // base address in the owner's address space (one-sided puts)
  std::string remote_key;     // packed access key (UCX rkey); empty in-process
};

// One contiguous copy: `len` bytes from local `src` to `offset` in the peer's region `region`.
struct block {
  const std::byte* src = nullptr;
  std::uint64_t region = 0;
  std::uint64_t offset = 0;
  std::uint64_t len = 0;
};

// Kinds of memory a transport can read from and write to directly (the GPU path asks before it
// chooses direct device pointers over staging through host memory).
enum class memory_type : std::uint8_t { host, cuda, cuda_managed, rocm };
const char* to_string(memory_type m);

// What a transport can do, asked before it is chosen for a peer (as UCX's iface query and
// NCCL's canConnect are).
struct capabilities {
  std::vector<memory_type> memory_types;  // what push() reads from and writes into directly
  bool cross_host = false;                // reaches peers on other hosts
  bool gpu_ordered = false;               // push_after() orders a push after a CUDA event on the GPU
};

// Memory a transport allocated and registered (see transport::allocate_memory).
struct allocation {
  region_desc desc;
  std::byte* base = nullptr;
};

// Called once per push: ok when every byte landed (and is visible to the peer), else the reason.
using completion = std::function<void(status)>;

class transport {
 public:
  virtual ~transport() = default;
  virtual const char* name() const = 0;
  // How a peer reaches this endpoint (UCX: the packed worker address); empty in-process.
  virtual std::string endpoint() const = 0;
  virtual std::vector<memory_type> memory_types() const = 0;
  virtual capabilities query() const { return {memory_types(), false, false}; }
  // Whether a peer with this endpoint can be connected at all (same host, same device kind...).
  virtual bool can_connect(const std::string& /*endpoint*/) const { return true; }
  // Registers local memory peers may write into; `owner` is this endpoint's id.
  virtual result<region_desc> register_memory(std::uint64_t owner, void* base, std::uint64_t len) = 0;
  // Allocates and registers `len` bytes where this transport's peers write fastest (UCX: shared
  // memory its same-host transports map directly); deregister_memory frees it. A transport
  // without such memory answers an error: the caller maps memory itself and registers it.
  virtual result<allocation> allocate_memory(std::uint64_t /*owner*/, std::uint64_t /*len*/) {
    return status::error(std::string(name()) + " allocates no memory");
  }
  // The region of an allocate_memory allocation that holds [base, base + len), so that a buffer
  // an engine placed inside it is described as part of it (offset = base - address). An error
  // when no allocation of this transport holds the range.
  virtual result<region_desc> region_of(const void* /*base*/, std::uint64_t /*len*/) const {
    return status::error(std::string(name()) + " allocated no memory holding that range");
  }
  // Returns once no peer can write into the region any more, so the memory may be freed (and
  // frees it when allocate_memory made it).
  virtual void deregister_memory(std::uint64_t region) = 0;
  // Makes `peer` (the owner id it registered with) reachable with what it described. Calling it
  // again with a different endpoint or regions replaces the old connection (a restarted peer).
  // An error here is a malformed description; a peer that cannot be reached fails its pushes.
  virtual status connect(std::uint64_t peer, const std::string& endpoint,
                         const std::vector<region_desc>& regions) = 0;
  // Forgets `peer` (the control plane saw it die): pushes in flight to it complete (with an
  // error unless they landed) without waiting on the peer; later ones fail at once.
  virtual void disconnect(std::uint64_t peer) = 0;
  // Pushes blocks into the regions `peer` registered. Every block is checked against the
  // registered bounds and owner before any byte is written; a violation fails the whole push.
  virtual void push(std::uint64_t peer, const std::vector<block>& blocks, completion done) = 0;
  // The same push, its bytes read only once the CUDA event `ready_fence` (a cudaEvent_t, recorded
  // by the engine after the KV was written) completed. Transports without gpu_ordered refuse a
  // fence rather than read early; no fence (0) is a plain push.
  virtual void push_after(std::uintptr_t ready_fence, std::uint64_t peer, const std::vector<block>& blocks,
                          completion done) {
    if (ready_fence != 0) return done(status::error(std::string(name()) + " cannot order a push after a CUDA event"));
    push(peer, blocks, std::move(done));
  }
  // Payload bytes that landed through this endpoint's pushes.
  virtual std::uint64_t bytes_moved() const = 0;
};

}  // namespace kvflow::transport
