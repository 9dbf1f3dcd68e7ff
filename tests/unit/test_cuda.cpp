// cuda/: builds everywhere; without a GPU (or without CUDA) "no device" is an answer, not a crash.
#include <doctest/doctest.h>

#include "cuda/device.hpp"
#include "cuda/host_memory.hpp"

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
