#pragma once
// One rank's per-room states, with the rules of semantics.md section 2. Pure, no actors.
#include <cstdint>
#include <string>
#include <unordered_map>

#include "actors/kv_poll.hpp"
#include "config/status.hpp"

namespace kvflow {

struct room_entry {
  std::uint64_t incarnation = 0;  // which request of this room (rooms are reused after clearing)
  kv_poll state = kv_poll::bootstrapping;
  std::string reason;             // why it failed
  bool released = false;          // terminal, and nothing this rank started still writes/reads
};

class state_store {
 public:
  explicit state_store(std::size_t max_rooms = 65536) : max_rooms_(max_rooms) {}

  // Creates a live room; a second live request with the same room is refused (SGLang #40125).
  // A room created again after clear() starts fresh: it never inherits Success (SGLang #6857).
  status create(std::uint64_t room, std::uint64_t incarnation, kv_poll initial);

  // Raises the state (new = max(old, new)); Failed overrides anything and is sticky.
  // Updates for rooms not in the store are ignored (a cleared room is never revived).
  // Returns true when the stored state changed.
  bool update(std::uint64_t room, kv_poll next, const std::string& reason = {});
  bool fail(std::uint64_t room, const std::string& reason) {
    return update(room, kv_poll::failed, reason);
  }

  // Marks a terminal room released (see room_state::released). False if not terminal.
  bool set_released(std::uint64_t room);

  void clear(std::uint64_t room) {  // idempotent
    if (rooms_.erase(room) != 0) ++version_;
  }

  const room_entry* find(std::uint64_t room) const;
  std::size_t size() const { return rooms_.size(); }
  const std::unordered_map<std::uint64_t, room_entry>& rooms() const { return rooms_; }
  // Rises with every change: a snapshot taken at one version holds until the next.
  std::uint64_t version() const { return version_; }

 private:
  std::size_t max_rooms_;
  std::unordered_map<std::uint64_t, room_entry> rooms_;
  std::uint64_t version_ = 0;
};

}  // namespace kvflow
