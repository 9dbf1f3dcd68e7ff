#pragma once
// Several transports behind the one interface, the right one chosen per peer region by what each
// can do (NCCL's transport selection per peer by canConnect; UCX's iface query). A receiver
// registers a buffer with every member that can write its memory type and describes all of them
// to its peers; a sender connects each of the peer's regions through the first member, in its
// own order of preference, that the peer described the region to and that can reach the peer.
// A push is split by member (a decode rank's GPU KV through CUDA IPC, its host aux rows through
// UCX) and completes once every part did.
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "transport/transport.hpp"

namespace kvflow::transport {

// Which kind of memory [base, base + len) is: host memory unless a probe says otherwise (the
// runtime asks the CUDA runtime; tests give their own).
using memory_probe = std::function<memory_type(const void* base)>;

class transport_set final : public transport {
 public:
  // `members` in order of preference (the first that can write a region gets it); at least one.
  transport_set(std::vector<std::shared_ptr<transport>> members, memory_probe probe);
  ~transport_set() override;

  // A member joins later (the first rank with GPU memory brings CUDA IPC), first or last in the
  // order of preference; regions registered and peers connected before keep what they had. One
  // member of each name.
  void add(std::shared_ptr<transport> member, bool preferred = false);
  // Asks every member again whether it orders pushes after a CUDA event: a member may learn it
  // after it joined (UCX, once the node drives a GPU).
  void requery();
  // The member called `name`, if any.
  std::shared_ptr<transport> member(const std::string& name) const;

  const char* name() const override { return "set"; }
  // Every member's name and endpoint.
  std::string endpoint() const override;
  std::vector<memory_type> memory_types() const override;
  capabilities query() const override;
  bool can_connect(const std::string& endpoint) const override;
  // With every member that can write the memory's type; an error when none can.
  result<region_desc> register_memory(std::uint64_t owner, void* base, std::uint64_t len) override;
  result<allocation> allocate_memory(std::uint64_t owner, std::uint64_t len) override;
  result<region_desc> region_of(const void* base, std::uint64_t len) const override;
  void deregister_memory(std::uint64_t region) override;
  // Chooses a member for every region of the peer; an error names a region no member here can
  // reach (another host with GPU memory and no CUDA-capable UCX, say).
  status connect(std::uint64_t peer, const std::string& endpoint, const std::vector<region_desc>& regions) override;
  void disconnect(std::uint64_t peer) override;
  void push(std::uint64_t peer, const std::vector<block>& blocks, completion done) override;
  // Parts through a GPU-ordered member wait for the fence on the GPU; a part from host memory
  // (the aux rows) needs no fence; a part that would read GPU memory through a member that cannot
  // order after the fence is refused rather than read early.
  void push_after(std::uintptr_t ready_fence, std::uint64_t peer, const std::vector<block>& blocks,
                  completion done) override;
  std::uint64_t bytes_moved() const override;

  // The member that moves pushes into `region` of `peer` (a name; empty when not connected).
  std::string chosen(std::uint64_t peer, std::uint64_t region) const;

  struct impl;

 private:
  std::unique_ptr<impl> impl_;
};

}  // namespace kvflow::transport
