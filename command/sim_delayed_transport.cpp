#include "command/sim_delayed_transport.hpp"

#include <algorithm>

namespace kvflow::command {

void delayed_transport::push(std::uint64_t peer, const std::vector<kvflow::transport::block>& blocks,
                             kvflow::transport::completion done) {
  std::lock_guard<std::mutex> g(mutex_);
  const auto draw = rng_();
  const std::uint32_t picks = draw % 2 == 0   ? 1
                              : draw % 4 == 1 ? 1 + static_cast<std::uint32_t>((draw >> 8) % 8)
                                              : 1 + static_cast<std::uint32_t>((draw >> 8) % 64);
  held_.push_back({peer, blocks, std::move(done), picks});
  ++held_total_;
}

std::size_t delayed_transport::held() const {
  std::lock_guard<std::mutex> g(mutex_);
  return held_.size();
}

std::uint64_t delayed_transport::held_total() const {
  std::lock_guard<std::mutex> g(mutex_);
  return held_total_;
}

bool delayed_transport::pick(std::size_t i) {
  pending p;
  {
    std::lock_guard<std::mutex> g(mutex_);
    if (i >= held_.size() || --held_[i].picks_left > 0) return false;
    p = std::move(held_[i]);
    held_.erase(held_.begin() + static_cast<long>(i));
  }
  // Outside the lock: the completion may push again.
  real_->push(p.peer, p.blocks, std::move(p.done));
  return true;
}

std::vector<delayed_transport::pending> delayed_transport::take_if(const std::function<bool(const pending&)>& pred) {
  std::lock_guard<std::mutex> g(mutex_);
  auto it = std::stable_partition(held_.begin(), held_.end(), [&](const pending& p) { return !pred(p); });
  std::vector<pending> taken(std::make_move_iterator(it), std::make_move_iterator(held_.end()));
  held_.erase(it, held_.end());
  return taken;
}

void delayed_transport::disconnect(std::uint64_t peer) {
  auto failed = take_if([&](const pending& p) { return p.peer == peer; });
  real_->disconnect(peer);
  for (auto& p : failed) p.done(status::error("peer " + std::to_string(peer) + " disconnected"));
}

std::size_t delayed_transport::drop_from(const std::function<bool(const std::byte*)>& from) {
  // Destroyed outside the lock: a completion's captures may hold the last reference to memory.
  return take_if([&](const pending& p) {
           return std::any_of(p.blocks.begin(), p.blocks.end(), [&](const kvflow::transport::block& b) { return from(b.src); });
         }).size();
}

}  // namespace kvflow::command
