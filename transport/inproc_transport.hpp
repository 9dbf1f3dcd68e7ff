#pragma once
// In-process transport: every simulated rank shares one fabric; a push is a bounds-checked memcpy.
#include <atomic>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <unordered_map>

#include "transport/transport.hpp"

namespace kvflow::transport {

// The registry of regions all in-process endpoints write through (thread-safe).
class inproc_fabric {
 public:
  struct region {
    std::uint64_t owner;
    std::byte* base;
    std::uint64_t len;
  };
  std::uint64_t add(std::uint64_t owner, std::byte* base, std::uint64_t len);
  // Waits for pushes in progress, so the memory may be freed once it returns.
  void remove(std::uint64_t id);
  // Holds regions in place while a push resolves and copies (pushes run side by side).
  std::shared_lock<std::shared_mutex> read_lock() const { return std::shared_lock(mutex_); }
  // Resolves and checks one block under read_lock(): the destination pointer or why refused.
  result<std::byte*> resolve(std::uint64_t peer, const block& b) const;

 private:
  mutable std::shared_mutex mutex_;
  std::uint64_t next_id_ = 1;
  std::unordered_map<std::uint64_t, region> regions_;
};

class inproc_transport final : public transport {
 public:
  explicit inproc_transport(std::shared_ptr<inproc_fabric> fabric) : fabric_(std::move(fabric)) {}
  const char* name() const override { return "inproc"; }
  std::string endpoint() const override { return {}; }
  std::vector<memory_type> memory_types() const override { return {memory_type::host}; }
  // The fabric already knows every region: nothing to connect, only the description to check.
  status connect(std::uint64_t peer, const std::string& endpoint,
                 const std::vector<region_desc>& regions) override;
  void disconnect(std::uint64_t) override {}
  result<region_desc> register_memory(std::uint64_t owner, void* base, std::uint64_t len) override;
  void deregister_memory(std::uint64_t region) override;
  void push(std::uint64_t peer, const std::vector<block>& blocks, completion done) override;
  std::uint64_t bytes_moved() const override { return bytes_.load(std::memory_order_relaxed); }
  // Time spent copying, summed over the threads that pushed.
  double copy_seconds() const { return copy_ns_.load(std::memory_order_relaxed) * 1e-9; }

 private:
  std::shared_ptr<inproc_fabric> fabric_;
  std::atomic<std::uint64_t> bytes_{0};
  std::atomic<std::uint64_t> copy_ns_{0};
};

}  // namespace kvflow::transport
