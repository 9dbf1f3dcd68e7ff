#pragma once
// The mapping of this process's address space that holds an address, as the kernel lists it
// (/proc/self/maps): what bounds a peer's segment that a same-host transport mapped here, where
// the size the peer claims is only its word.
#include <cstdint>

#include "config/status.hpp"

namespace kvflow::transport {

struct mapping_extent {
  std::uintptr_t begin = 0;
  std::uintptr_t end = 0;  // one past the last byte
};

// The mapping that holds `address`; an error when none does (or the table cannot be read).
result<mapping_extent> mapping_of(const void* address);

}  // namespace kvflow::transport
