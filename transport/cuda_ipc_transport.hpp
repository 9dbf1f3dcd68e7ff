#pragma once
// CUDA IPC transport: GPU memory to GPU memory on one host. A receiver's device buffers are
// exported as IPC handles when registered; a sender opens each peer allocation once (cached per
// peer, closed when the peer is disconnected and its last push completed) and moves a push's
// whole block list with gather kernels on its own stream (one per chunk of the list), never one
// copy call per page. push_after() makes that stream wait for the engine's ready event on the
// GPU; a completion thread learns of each push by sleeping on its event, without a polling loop.
#include <memory>

#include "transport/transport.hpp"

namespace kvflow::transport {

struct cuda_ipc_options {
  int device = 0;  // the GPU this endpoint's stream runs on (its registered memory's device)
  // Block-list entries per gather launch: the GPU starts on the first chunk while the host still
  // writes the rest (0: the whole list in one launch).
  std::uint64_t chunk_descs = 4096;
};

class cuda_ipc_transport final : public transport {
 public:
  // An error (never a throw) where there is no device or the kernels were not built.
  static result<std::unique_ptr<cuda_ipc_transport>> create(const cuda_ipc_options& options);
  ~cuda_ipc_transport() override;

  const char* name() const override { return "cuda_ipc"; }
  // Tag, host identity (boot id), process id and device: only a peer on this host connects.
  std::string endpoint() const override;
  std::vector<memory_type> memory_types() const override { return {memory_type::cuda}; }
  capabilities query() const override { return {{memory_type::cuda}, false, true}; }
  bool can_connect(const std::string& endpoint) const override;
  // `base` must be device memory; the region's key carries its allocation's IPC handle and offset.
  result<region_desc> register_memory(std::uint64_t owner, void* base, std::uint64_t len) override;
  void deregister_memory(std::uint64_t region) override;
  status connect(std::uint64_t peer, const std::string& endpoint, const std::vector<region_desc>& regions) override;
  void disconnect(std::uint64_t peer) override;
  void push(std::uint64_t peer, const std::vector<block>& blocks, completion done) override;
  void push_after(std::uintptr_t ready_fence, std::uint64_t peer, const std::vector<block>& blocks,
                  completion done) override;
  std::uint64_t bytes_moved() const override;

  struct impl;

 private:
  explicit cuda_ipc_transport(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace kvflow::transport
