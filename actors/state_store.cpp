#include "actors/state_store.hpp"

namespace kvflow {

status state_store::create(std::uint64_t room, std::uint64_t incarnation, kv_poll initial) {
  auto it = rooms_.find(room);
  if (it != rooms_.end())
    return status::error("duplicate room " + std::to_string(room) + ": request " +
                         std::to_string(incarnation) + " collides with live request " +
                         std::to_string(it->second.incarnation));
  if (rooms_.size() >= max_rooms_)
    return status::error("room " + std::to_string(room) + " refused: " +
                         std::to_string(max_rooms_) + " rooms already live on this rank");
  rooms_.emplace(room, room_entry{incarnation, initial, {}, false});
  ++version_;
  return {};
}

bool state_store::update(std::uint64_t room, kv_poll next, const std::string& reason) {
  auto it = rooms_.find(room);
  if (it == rooms_.end()) return false;
  auto& e = it->second;
  if (e.state == kv_poll::failed) return false;  // sticky
  if (next == kv_poll::failed) {
    e.state = kv_poll::failed;
    e.reason = reason;
    ++version_;
    return true;
  }
  if (next <= e.state) return false;  // only rises
  e.state = next;
  ++version_;
  return true;
}

bool state_store::set_released(std::uint64_t room) {
  auto it = rooms_.find(room);
  if (it == rooms_.end() || !is_terminal(it->second.state) || it->second.released) return false;
  it->second.released = true;
  ++version_;
  return true;
}

const room_entry* state_store::find(std::uint64_t room) const {
  auto it = rooms_.find(room);
  return it == rooms_.end() ? nullptr : &it->second;
}

}  // namespace kvflow
