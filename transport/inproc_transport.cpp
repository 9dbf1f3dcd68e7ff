#include "transport/inproc_transport.hpp"

#include <chrono>
#include <cstring>

namespace kvflow::transport {

std::uint64_t inproc_fabric::add(std::uint64_t owner, std::byte* base, std::uint64_t len) {
  std::unique_lock guard(mutex_);
  auto id = next_id_++;
  regions_.emplace(id, region{owner, base, len});
  return id;
}

void inproc_fabric::remove(std::uint64_t id) {
  std::unique_lock guard(mutex_);
  regions_.erase(id);
}

result<std::byte*> inproc_fabric::resolve(std::uint64_t peer, const block& b) const {
  auto it = regions_.find(b.region);
  if (it == regions_.end())
    return status::error("region " + std::to_string(b.region) + " is not registered");
  const auto& r = it->second;
  if (r.owner != peer)
    return status::error("region " + std::to_string(b.region) + " belongs to endpoint " +
                         std::to_string(r.owner) + ", not " + std::to_string(peer));
  if (b.offset > r.len || b.len > r.len - b.offset)
    return status::error("block [" + std::to_string(b.offset) + ", +" + std::to_string(b.len) +
                         ") exceeds region " + std::to_string(b.region) + " of " +
                         std::to_string(r.len) + " bytes");
  return r.base + b.offset;
}

result<region_desc> inproc_transport::register_memory(std::uint64_t owner, void* base,
                                                      std::uint64_t len) {
  if (base == nullptr && len > 0) return status::error("register_memory: null base");
  region_desc d;
  d.id = fabric_->add(owner, static_cast<std::byte*>(base), len);
  d.size = len;
  return d;
}

status inproc_transport::connect(std::uint64_t peer, const std::string&,
                                 const std::vector<region_desc>& regions) {
  // The regions must be the peer's own, as registered: a mismatch is a confused or hostile peer.
  auto lock = fabric_->read_lock();
  for (const auto& r : regions)
    if (auto ok = fabric_->resolve(peer, block{nullptr, r.id, 0, r.size}); !ok) return ok.error();
  return {};
}

void inproc_transport::deregister_memory(std::uint64_t region) { fabric_->remove(region); }

void inproc_transport::push(std::uint64_t peer, const std::vector<block>& blocks, completion done) {
  // Check every block before writing any byte: a bad block must not leave a partial write.
  // The read lock keeps the peer's regions registered (and so mapped) until the copy is done.
  auto lock = fabric_->read_lock();
  std::vector<std::byte*> dst;
  dst.reserve(blocks.size());
  for (const auto& b : blocks) {
    auto r = fabric_->resolve(peer, b);
    if (!r) {
      lock.unlock();
      done(r.error());
      return;
    }
    dst.push_back(r.value());
  }
  std::uint64_t moved = 0;
  auto t0 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < blocks.size(); ++i) {
    std::memcpy(dst[i], blocks[i].src, blocks[i].len);
    moved += blocks[i].len;
  }
  auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0);
  bytes_.fetch_add(moved, std::memory_order_relaxed);
  copy_ns_.fetch_add(static_cast<std::uint64_t>(ns.count()), std::memory_order_relaxed);
  lock.unlock();
  done(status{});
}

}  // namespace kvflow::transport
