#include "cuda/fence_pool.hpp"

#include <memory>

namespace kvflow::cuda {

result<std::unique_ptr<fence_pool>> fence_pool::create(int device) {
  auto s = stream::create(device);
  if (!s) return s.error();
  return std::unique_ptr<fence_pool>(new fence_pool(std::move(s.value())));
}

result<std::uintptr_t> fence_pool::capture(std::uintptr_t engine_event) {
  std::lock_guard<std::mutex> g(m_);
  device_scope on(stream_.device());
  if (!on.result()) return on.result();
  if (free_.empty()) {
    auto e = event::create(stream_.device());
    if (!e) return e.error();
    free_.push_back(events_.size());
    events_.push_back(std::move(e.value()));
  }
  auto& mine = events_[free_.back()];
  if (auto s = wait_for_external_event(stream_, engine_event); !s) return s;
  if (auto s = mine.record(stream_); !s) return s;
  free_.pop_back();
  return reinterpret_cast<std::uintptr_t>(mine.handle());
}

void fence_pool::give_back(std::uintptr_t fence) {
  std::lock_guard<std::mutex> g(m_);
  for (std::size_t i = 0; i < events_.size(); ++i)
    if (reinterpret_cast<std::uintptr_t>(events_[i].handle()) == fence) {
      free_.push_back(i);
      return;
    }
}

}  // namespace kvflow::cuda
