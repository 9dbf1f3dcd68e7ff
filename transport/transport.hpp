#pragma once
// The transport interface: how KV bytes move from a prefill rank into a decode rank's registered
// memory. In-process, UCX, CUDA IPC and NCCL paths implement it; actors own one instance.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "config/status.hpp"

namespace kvflow::transport {

// A registered region as described to a peer (travels in the registration message).
struct region_desc {
  std::uint64_t id = 0;     // transport-scoped id of the region
  std::uint64_t size = 0;   // bytes
  std::string remote_key;   // packed access key (UCX rkey); empty in-process
};

// One contiguous copy: `len` bytes from local `src` to `offset` in the peer's region `region`.
struct block {
  const std::byte* src = nullptr;
  std::uint64_t region = 0;
  std::uint64_t offset = 0;
  std::uint64_t len = 0;
};

// Called once per push: ok when every byte landed (and is visible to the peer), else the reason.
using completion = std::function<void(status)>;

class transport {
 public:
  virtual ~transport() = default;
  virtual const char* name() const = 0;
  // Registers local memory peers may write into; `owner` is this endpoint's id.
  virtual result<region_desc> register_memory(std::uint64_t owner, void* base, std::uint64_t len) = 0;
  virtual void deregister_memory(std::uint64_t region) = 0;
  // Pushes blocks into the regions `peer` registered. Every block is checked against the
  // registered bounds and owner before any byte is written; a violation fails the whole push.
  virtual void push(std::uint64_t peer, const std::vector<block>& blocks, completion done) = 0;
};

}  // namespace kvflow::transport
