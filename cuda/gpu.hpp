#pragma once
// RAII over the CUDA runtime for the GPU data plane: device and pinned memory, streams, events
// and IPC handles. No CUDA type appears here (streams and events are opaque pointers), so the
// layers above build the same with or without the CUDA toolkit; without it, or without a device,
// every constructor answers an error ("no device: ...") instead of throwing.
#include <cstddef>
#include <cstdint>
#include <string>

#include "config/status.hpp"

namespace kvflow::cuda {

// Whether this build can reach a GPU at all (the toolkit was found at build time).
bool built_with_cuda();

// Makes `device` current on the calling thread.
status set_device(int device);
// The device current on the calling thread (-1 when none can be).
int current_device();

// Makes `device` current for a scope and gives the thread its device back after (for calls made
// on an engine's thread, whose current device is the engine's business).
class device_scope {
 public:
  explicit device_scope(int device) : previous_(current_device()) { status_ = set_device(device); }
  ~device_scope() {
    if (previous_ >= 0) (void)set_device(previous_);
  }
  device_scope(const device_scope&) = delete;
  device_scope& operator=(const device_scope&) = delete;
  const status& result() const { return status_; }

 private:
  int previous_;
  status status_;
};

// Device memory: cudaMalloc'ed, freed on destruction.
class device_buffer {
 public:
  device_buffer() = default;
  static result<device_buffer> create(int device, std::uint64_t bytes);
  ~device_buffer();
  device_buffer(device_buffer&& o) noexcept;
  device_buffer& operator=(device_buffer&& o) noexcept;
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;

  std::byte* data() const { return data_; }
  std::uint64_t size() const { return size_; }
  int device() const { return device_; }

 private:
  void reset();
  std::byte* data_ = nullptr;
  std::uint64_t size_ = 0;
  int device_ = -1;
};

// Page-locked host memory (cudaHostAlloc, portable and mapped): the GPU copies to and from it at
// PCIe/C2C speed, and kernels read it in place at device_data() (a small list, read once, costs
// no copy-engine slot behind other streams' bulk copies).
class pinned_buffer {
 public:
  pinned_buffer() = default;
  static result<pinned_buffer> create(std::uint64_t bytes);
  ~pinned_buffer();
  pinned_buffer(pinned_buffer&& o) noexcept;
  pinned_buffer& operator=(pinned_buffer&& o) noexcept;
  pinned_buffer(const pinned_buffer&) = delete;
  pinned_buffer& operator=(const pinned_buffer&) = delete;

  std::byte* data() const { return data_; }
  std::byte* device_data() const { return device_; }
  std::uint64_t size() const { return size_; }

 private:
  void reset();
  std::byte* data_ = nullptr;
  std::byte* device_ = nullptr;
  std::uint64_t size_ = 0;
};

// Host memory this process mapped itself (a shared segment another process maps too), pinned
// and mapped into the GPU's address space (cudaHostRegister), unpinned on destruction: the GPU
// copies to and from it as from a pinned_buffer, and device_data() is where kernels address it.
class host_registration {
 public:
  host_registration() = default;
  static result<host_registration> create(void* base, std::uint64_t bytes);
  ~host_registration();
  host_registration(host_registration&& o) noexcept;
  host_registration& operator=(host_registration&& o) noexcept;
  host_registration(const host_registration&) = delete;
  host_registration& operator=(const host_registration&) = delete;

  std::byte* device_data() const { return device_; }

 private:
  void reset();
  std::byte* host_ = nullptr;
  std::byte* device_ = nullptr;
};

// A non-blocking stream on one device (does not synchronise with the legacy default stream).
class stream {
 public:
  stream() = default;
  static result<stream> create(int device);
  ~stream();
  stream(stream&& o) noexcept;
  stream& operator=(stream&& o) noexcept;
  stream(const stream&) = delete;
  stream& operator=(const stream&) = delete;

  void* handle() const { return handle_; }  // cudaStream_t
  int device() const { return device_; }
  status synchronize() const;

 private:
  void reset();
  void* handle_ = nullptr;
  int device_ = -1;
};

// An event without timing (the cheap kind), or with timing for the benchmarks.
class event {
 public:
  event() = default;
  static result<event> create(int device, bool timing = false);
  // One whose synchronize() puts the calling thread to sleep until the work is done, instead of
  // spinning on a core (cudaEventBlockingSync): for a thread that waits for completions. With
  // timing, elapsed_ms() can also time the work before it.
  static result<event> create_blocking(int device, bool timing = false);
  ~event();
  event(event&& o) noexcept;
  event& operator=(event&& o) noexcept;
  event(const event&) = delete;
  event& operator=(const event&) = delete;

  void* handle() const { return handle_; }  // cudaEvent_t
  status record(const stream& s) const;
  // Makes `s` wait on the GPU for this event's last record: no host thread blocks.
  status wait_on(const stream& s) const;
  // True once the work recorded before it completed; an error when that work failed.
  result<bool> done() const;
  status synchronize() const;
  // Milliseconds between two recorded timing events.
  static result<float> elapsed_ms(const event& from, const event& to);

 private:
  static result<event> with_flags(int device, unsigned flags);
  void reset();
  void* handle_ = nullptr;
};

// Makes stream `s` wait for an engine's event (a cudaEvent_t given as an integer, as the public
// API's ready fence is) without blocking the calling thread.
status wait_for_external_event(const stream& s, std::uintptr_t cuda_event);

// Queues `fn(arg)` on `s`: called on a CUDA runtime thread once the work queued before it is done
// (cudaLaunchHostFunc). `fn` must not call CUDA; it may hand work to another thread.
status launch_host_callback(const stream& s, void (*fn)(void*), void* arg);

// Copies (any direction cudaMemcpyDefault resolves) queued on `s`.
status copy_async(void* dst, const void* src, std::uint64_t bytes, const stream& s);

// A device allocation's IPC handle, as bytes that travel to a peer process.
constexpr std::size_t ipc_handle_bytes = 64;
result<std::string> export_ipc_handle(const void* device_ptr);
// The allocation that holds `device_ptr`: IPC handles name whole allocations, so a buffer inside
// one (a caching allocator's block) travels as the allocation's handle plus its offset.
struct allocation_range {
  std::uintptr_t base = 0;
  std::uint64_t size = 0;
};
result<allocation_range> allocation_of(const void* device_ptr);

// A peer's allocation opened in this process (cudaIpcOpenMemHandle), closed on destruction.
class ipc_mapping {
 public:
  ipc_mapping() = default;
  static result<ipc_mapping> open(int device, const std::string& handle);
  ~ipc_mapping();
  ipc_mapping(ipc_mapping&& o) noexcept;
  ipc_mapping& operator=(ipc_mapping&& o) noexcept;
  ipc_mapping(const ipc_mapping&) = delete;
  ipc_mapping& operator=(const ipc_mapping&) = delete;

  std::byte* data() const { return data_; }

 private:
  void reset();
  std::byte* data_ = nullptr;
  int device_ = -1;
};

// What memory `ptr` is, as the CUDA driver sees it.
enum class pointer_kind { host, device, unknown };
struct pointer_info {
  pointer_kind kind = pointer_kind::unknown;
  int device = -1;
};
pointer_info query_pointer(const void* ptr);

}  // namespace kvflow::cuda
