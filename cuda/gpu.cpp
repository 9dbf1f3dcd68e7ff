#include "cuda/gpu.hpp"

#include <cstring>
#include <utility>

#ifdef KVFLOW_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvflow::cuda {

#ifdef KVFLOW_HAVE_CUDA

namespace {

// The error goes to the caller as a value; it is also taken out of the runtime's last-error slot,
// where the next kernel launch's check (cudaGetLastError) would report it as its own (seen: a
// refused cudaMalloc made a later fill kernel fail with "out of memory").
status cuda_error(const char* what, cudaError_t e) {
  (void)cudaGetLastError();
  return status::error(std::string(what) + ": " + cudaGetErrorString(e));
}

cudaStream_t as_stream(void* h) { return static_cast<cudaStream_t>(h); }
cudaEvent_t as_event(void* h) { return static_cast<cudaEvent_t>(h); }

}  // namespace

bool built_with_cuda() { return true; }

status set_device(int device) {
  if (auto e = cudaSetDevice(device); e != cudaSuccess) return cuda_error("cudaSetDevice", e);
  return {};
}

int current_device() {
  int d = -1;
  if (cudaGetDevice(&d) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return d;
}

result<device_buffer> device_buffer::create(int device, std::uint64_t bytes) {
  if (auto st = set_device(device); !st) return st;
  void* p = nullptr;
  if (auto e = cudaMalloc(&p, bytes); e != cudaSuccess) return cuda_error("cudaMalloc", e);
  device_buffer b;
  b.data_ = static_cast<std::byte*>(p);
  b.size_ = bytes;
  b.device_ = device;
  return b;
}

void device_buffer::reset() {
  if (data_ != nullptr) {
    cudaSetDevice(device_);
    cudaFree(data_);
  }
  data_ = nullptr;
  size_ = 0;
  device_ = -1;
}

result<pinned_buffer> pinned_buffer::create(std::uint64_t bytes) {
  void* p = nullptr;
  if (auto e = cudaHostAlloc(&p, bytes, cudaHostAllocPortable | cudaHostAllocMapped); e != cudaSuccess)
    return cuda_error("cudaHostAlloc", e);
  pinned_buffer b;
  b.data_ = static_cast<std::byte*>(p);
  b.size_ = bytes;
  void* dev = nullptr;
  if (auto e = cudaHostGetDevicePointer(&dev, p, 0); e != cudaSuccess) return cuda_error("cudaHostGetDevicePointer", e);
  b.device_ = static_cast<std::byte*>(dev);
  return b;
}

void pinned_buffer::reset() {
  if (data_ != nullptr) cudaFreeHost(data_);
  data_ = nullptr;
  device_ = nullptr;
  size_ = 0;
}

result<host_registration> host_registration::create(void* base, std::uint64_t bytes) {
  if (auto e = cudaHostRegister(base, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped); e != cudaSuccess)
    return cuda_error("cudaHostRegister", e);
  host_registration r;
  r.host_ = static_cast<std::byte*>(base);
  void* dev = nullptr;
  if (auto e = cudaHostGetDevicePointer(&dev, base, 0); e != cudaSuccess) return cuda_error("cudaHostGetDevicePointer", e);
  r.device_ = static_cast<std::byte*>(dev);
  return r;
}

void host_registration::reset() {
  if (host_ != nullptr) cudaHostUnregister(host_);
  host_ = nullptr;
  device_ = nullptr;
}

result<stream> stream::create(int device) {
  if (auto st = set_device(device); !st) return st;
  cudaStream_t h = nullptr;
  if (auto e = cudaStreamCreateWithFlags(&h, cudaStreamNonBlocking); e != cudaSuccess)
    return cuda_error("cudaStreamCreateWithFlags", e);
  stream s;
  s.handle_ = h;
  s.device_ = device;
  return s;
}

void stream::reset() {
  if (handle_ != nullptr) cudaStreamDestroy(as_stream(handle_));
  handle_ = nullptr;
  device_ = -1;
}

status stream::synchronize() const {
  if (auto e = cudaStreamSynchronize(as_stream(handle_)); e != cudaSuccess)
    return cuda_error("cudaStreamSynchronize", e);
  return {};
}

result<event> event::with_flags(int device, unsigned flags) {
  if (auto st = set_device(device); !st) return st;
  cudaEvent_t h = nullptr;
  if (auto e = cudaEventCreateWithFlags(&h, flags); e != cudaSuccess) return cuda_error("cudaEventCreateWithFlags", e);
  event ev;
  ev.handle_ = h;
  return ev;
}

result<event> event::create(int device, bool timing) {
  return with_flags(device, timing ? cudaEventDefault : cudaEventDisableTiming);
}

result<event> event::create_blocking(int device, bool timing) {
  return with_flags(device, (timing ? 0u : unsigned{cudaEventDisableTiming}) | cudaEventBlockingSync);
}

void event::reset() {
  if (handle_ != nullptr) cudaEventDestroy(as_event(handle_));
  handle_ = nullptr;
}

status event::record(const stream& s) const {
  if (auto e = cudaEventRecord(as_event(handle_), as_stream(s.handle())); e != cudaSuccess)
    return cuda_error("cudaEventRecord", e);
  return {};
}

status event::wait_on(const stream& s) const {
  if (auto e = cudaStreamWaitEvent(as_stream(s.handle()), as_event(handle_), 0); e != cudaSuccess)
    return cuda_error("cudaStreamWaitEvent", e);
  return {};
}

result<bool> event::done() const {
  auto e = cudaEventQuery(as_event(handle_));
  if (e == cudaSuccess) return true;
  if (e == cudaErrorNotReady) return false;
  return cuda_error("cudaEventQuery", e);
}

status event::synchronize() const {
  if (auto e = cudaEventSynchronize(as_event(handle_)); e != cudaSuccess)
    return cuda_error("cudaEventSynchronize", e);
  return {};
}

result<float> event::elapsed_ms(const event& from, const event& to) {
  float ms = 0;
  if (auto e = cudaEventElapsedTime(&ms, as_event(from.handle_), as_event(to.handle_)); e != cudaSuccess)
    return cuda_error("cudaEventElapsedTime", e);
  return ms;
}

status wait_for_external_event(const stream& s, std::uintptr_t cuda_event) {
  auto ev = reinterpret_cast<cudaEvent_t>(cuda_event);
  if (auto e = cudaStreamWaitEvent(as_stream(s.handle()), ev, 0); e != cudaSuccess)
    return cuda_error("cudaStreamWaitEvent (ready fence)", e);
  return {};
}

status launch_host_callback(const stream& s, void (*fn)(void*), void* arg) {
  if (auto e = cudaLaunchHostFunc(as_stream(s.handle()), fn, arg); e != cudaSuccess)
    return cuda_error("cudaLaunchHostFunc", e);
  return {};
}

status copy_async(void* dst, const void* src, std::uint64_t bytes, const stream& s) {
  if (auto e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, as_stream(s.handle())); e != cudaSuccess)
    return cuda_error("cudaMemcpyAsync", e);
  return {};
}

result<std::string> export_ipc_handle(const void* device_ptr) {
  cudaIpcMemHandle_t h{};
  if (auto e = cudaIpcGetMemHandle(&h, const_cast<void*>(device_ptr)); e != cudaSuccess)
    return cuda_error("cudaIpcGetMemHandle", e);
  static_assert(sizeof h == ipc_handle_bytes, "cudaIpcMemHandle_t size");
  return std::string(reinterpret_cast<const char*>(&h), sizeof h);
}

result<allocation_range> allocation_of(const void* device_ptr) {
  // cuMemGetAddressRange is the driver's; reached through the runtime's entry-point query so
  // that nothing links libcuda (absent on machines without a driver, where this build still runs).
  using range_fn = int (*)(unsigned long long*, std::size_t*, unsigned long long);
  static range_fn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<range_fn>(f);
  }();
  if (fn == nullptr) return status::error("cuMemGetAddressRange: not available from this driver");
  // A driver call needs a current context, which a thread that never used the runtime (an actor's
  // worker thread) lacks: the pointer's device's primary context, as the runtime would make it.
  if (const auto at = query_pointer(device_ptr); at.kind == pointer_kind::device)
    if (auto st = set_device(at.device); !st) return st;
  unsigned long long base = 0;
  std::size_t size = 0;
  if (int e = fn(&base, &size, reinterpret_cast<unsigned long long>(device_ptr)); e != 0)
    return status::error("cuMemGetAddressRange: CUresult " + std::to_string(e) + " (not device memory?)");
  return allocation_range{static_cast<std::uintptr_t>(base), static_cast<std::uint64_t>(size)};
}

result<ipc_mapping> ipc_mapping::open(int device, const std::string& handle) {
  if (handle.size() != ipc_handle_bytes)
    return status::error("IPC handle of " + std::to_string(handle.size()) + " bytes, not " +
                         std::to_string(ipc_handle_bytes));
  if (auto st = set_device(device); !st) return st;
  cudaIpcMemHandle_t h{};
  std::memcpy(&h, handle.data(), sizeof h);
  void* p = nullptr;
  if (auto e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess); e != cudaSuccess)
    return cuda_error("cudaIpcOpenMemHandle", e);
  ipc_mapping m;
  m.data_ = static_cast<std::byte*>(p);
  m.device_ = device;
  return m;
}

void ipc_mapping::reset() {
  if (data_ != nullptr) {
    cudaSetDevice(device_);
    cudaIpcCloseMemHandle(data_);
  }
  data_ = nullptr;
  device_ = -1;
}

pointer_info query_pointer(const void* ptr) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, ptr) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error this leaves
    return {};
  }
  switch (a.type) {
    case cudaMemoryTypeDevice: return {pointer_kind::device, a.device};
    case cudaMemoryTypeHost:
    case cudaMemoryTypeUnregistered: return {pointer_kind::host, -1};
    default: return {};
  }
}

#else  // built without CUDA: every GPU resource is "no device".

namespace {
status no_cuda() { return status::error("no device: built without CUDA"); }
}  // namespace

bool built_with_cuda() { return false; }
status set_device(int) { return no_cuda(); }
int current_device() { return -1; }
result<device_buffer> device_buffer::create(int, std::uint64_t) { return no_cuda(); }
void device_buffer::reset() {}
result<pinned_buffer> pinned_buffer::create(std::uint64_t) { return no_cuda(); }
void pinned_buffer::reset() {}
result<host_registration> host_registration::create(void*, std::uint64_t) { return no_cuda(); }
void host_registration::reset() {}
result<stream> stream::create(int) { return no_cuda(); }
void stream::reset() {}
status stream::synchronize() const { return no_cuda(); }
result<event> event::create(int, bool) { return no_cuda(); }
result<event> event::create_blocking(int, bool) { return no_cuda(); }
void event::reset() {}
status event::record(const stream&) const { return no_cuda(); }
status event::wait_on(const stream&) const { return no_cuda(); }
result<bool> event::done() const { return no_cuda(); }
status event::synchronize() const { return no_cuda(); }
result<float> event::elapsed_ms(const event&, const event&) { return no_cuda(); }
status wait_for_external_event(const stream&, std::uintptr_t) { return no_cuda(); }
status launch_host_callback(const stream&, void (*)(void*), void*) { return no_cuda(); }
status copy_async(void*, const void*, std::uint64_t, const stream&) { return no_cuda(); }
result<std::string> export_ipc_handle(const void*) { return no_cuda(); }
result<allocation_range> allocation_of(const void*) { return no_cuda(); }
result<ipc_mapping> ipc_mapping::open(int, const std::string&) { return no_cuda(); }
void ipc_mapping::reset() {}
pointer_info query_pointer(const void*) { return {}; }

#endif

// Moves and destructors, the same with or without CUDA.
device_buffer::~device_buffer() { reset(); }
device_buffer::device_buffer(device_buffer&& o) noexcept { *this = std::move(o); }
device_buffer& device_buffer::operator=(device_buffer&& o) noexcept {
  if (this != &o) {
    reset();
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    device_ = std::exchange(o.device_, -1);
  }
  return *this;
}

pinned_buffer::~pinned_buffer() { reset(); }
pinned_buffer::pinned_buffer(pinned_buffer&& o) noexcept { *this = std::move(o); }
pinned_buffer& pinned_buffer::operator=(pinned_buffer&& o) noexcept {
  if (this != &o) {
    reset();
    data_ = std::exchange(o.data_, nullptr);
    device_ = std::exchange(o.device_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

host_registration::~host_registration() { reset(); }
host_registration::host_registration(host_registration&& o) noexcept { *this = std::move(o); }
host_registration& host_registration::operator=(host_registration&& o) noexcept {
  if (this != &o) {
    reset();
    host_ = std::exchange(o.host_, nullptr);
    device_ = std::exchange(o.device_, nullptr);
  }
  return *this;
}

stream::~stream() { reset(); }
stream::stream(stream&& o) noexcept { *this = std::move(o); }
stream& stream::operator=(stream&& o) noexcept {
  if (this != &o) {
    reset();
    handle_ = std::exchange(o.handle_, nullptr);
    device_ = std::exchange(o.device_, -1);
  }
  return *this;
}

event::~event() { reset(); }
event::event(event&& o) noexcept { *this = std::move(o); }
event& event::operator=(event&& o) noexcept {
  if (this != &o) {
    reset();
    handle_ = std::exchange(o.handle_, nullptr);
  }
  return *this;
}

ipc_mapping::~ipc_mapping() { reset(); }
ipc_mapping::ipc_mapping(ipc_mapping&& o) noexcept { *this = std::move(o); }
ipc_mapping& ipc_mapping::operator=(ipc_mapping&& o) noexcept {
  if (this != &o) {
    reset();
    data_ = std::exchange(o.data_, nullptr);
    device_ = std::exchange(o.device_, -1);
  }
  return *this;
}

}  // namespace kvflow::cuda
