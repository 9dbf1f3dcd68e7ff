#include "cuda/host_memory.hpp"

#include <sys/mman.h>

#include <new>
#include <utility>

namespace kvflow::cuda {

host_memory::host_memory(std::uint64_t bytes) : size_(bytes) {
  if (bytes == 0) return;
  // KV pools are sized for the worst case and touched sparsely: reserve no swap for them, so a
  // large pool costs address space, and memory only where it is written.
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  data_ = static_cast<std::byte*>(p);
}

host_memory::~host_memory() {
  if (data_ != nullptr) ::munmap(data_, size_);
}

host_memory::host_memory(host_memory&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}

host_memory& host_memory::operator=(host_memory&& o) noexcept {
  if (this != &o) {
    if (data_ != nullptr) ::munmap(data_, size_);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

}  // namespace kvflow::cuda
