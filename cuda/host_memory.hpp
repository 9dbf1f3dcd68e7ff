#pragma once
// Host memory for KV pools: anonymous mappings, so untouched pages cost no resident memory.
#include <cstddef>
#include <cstdint>

namespace kvflow::cuda {

class host_memory {
 public:
  host_memory() = default;
  explicit host_memory(std::uint64_t bytes);  // throws std::bad_alloc when the mapping fails
  ~host_memory();
  host_memory(host_memory&& o) noexcept;
  host_memory& operator=(host_memory&& o) noexcept;
  host_memory(const host_memory&) = delete;
  host_memory& operator=(const host_memory&) = delete;

  std::byte* data() const { return data_; }
  std::uint64_t size() const { return size_; }

 private:
  std::byte* data_ = nullptr;
  std::uint64_t size_ = 0;
};

}  // namespace kvflow::cuda
