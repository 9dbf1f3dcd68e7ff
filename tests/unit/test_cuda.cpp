// cuda/: builds everywhere; without a GPU (or without CUDA) "no device" is an answer, not a crash.
#include <doctest/doctest.h>

#include "cuda/device.hpp"
#include "cuda/gpu.hpp"
#include "cuda/host_memory.hpp"
#include "transport/cuda_ipc_transport.hpp"

TEST_CASE("cuda: device probe answers with a count or the reason there is none") {
  auto r = kvflow::cuda::probe_devices();
  CHECK(r.count >= 0);
  if (r.count == 0) {
    CHECK(r.reason.rfind("no device", 0) == 0);
  } else {
    CHECK(r.built_with_cuda);
    CHECK(r.reason.empty());
  }
}

TEST_CASE("cuda: host memory is zeroed, sized, and moves its ownership") {
  kvflow::cuda::host_memory m(1 << 20);
  REQUIRE(m.data() != nullptr);
  CHECK(m.size() == (1u << 20));
  CHECK(m.data()[12345] == std::byte{0});
  auto* p = m.data();
  kvflow::cuda::host_memory n(std::move(m));
  CHECK(n.data() == p);
  CHECK(m.data() == nullptr);  // NOLINT(bugprone-use-after-move): moved-from is empty by contract
  kvflow::cuda::host_memory empty(0);
  CHECK(empty.data() == nullptr);
}

TEST_CASE("cuda: without a device every GPU resource is an error naming why, never a crash") {
  if (kvflow::cuda::probe_devices().count > 0) return;  // the GPU suite covers the device (tests/gpu)
  auto d = kvflow::cuda::device_buffer::create(0, 4096);
  REQUIRE_FALSE(d.ok());
  const auto& why = d.error().reason();
  const bool named = why.find("no device") != std::string::npos || why.find("cuda") != std::string::npos;
  CHECK_MESSAGE(named, why);
  CHECK_FALSE(kvflow::cuda::stream::create(0).ok());
  CHECK_FALSE(kvflow::cuda::pinned_buffer::create(4096).ok());
  CHECK_FALSE(kvflow::cuda::ipc_mapping::open(0, std::string(64, '\0')).ok());
  int host = 0;
  CHECK(kvflow::cuda::query_pointer(&host).kind != kvflow::cuda::pointer_kind::device);
  auto t = kvflow::transport::cuda_ipc_transport::create({0});
  REQUIRE_FALSE(t.ok());
  CHECK(t.error().reason().rfind("cuda_ipc: ", 0) == 0);
}
