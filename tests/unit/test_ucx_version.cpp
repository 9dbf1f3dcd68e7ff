// The loaded UCX library against the one kvflow was built with (transport/ucx_version.hpp).
#include <doctest/doctest.h>

#include "transport/ucx_version.hpp"

// That the library the suite runs with passes is every UCX test's first step (ucx_worker::create).

using kvflow::transport::ucx_version;
using kvflow::transport::ucx_version_problem;

TEST_CASE("ucx version: the same or a later minor of the built major serves") {
  CHECK(ucx_version_problem({1, 22, 0}, {1, 22, 0}).empty());
  CHECK(ucx_version_problem({1, 22, 0}, {1, 22, 3}).empty());
  CHECK(ucx_version_problem({1, 22, 0}, {1, 23, 0}).empty());
}

TEST_CASE("regression: an older UCX ahead of kvflow's on the library path is refused, not run into a fault") {
  // The GPU machine: Debian's 1.13 shadowed kvflow's 1.22; ucp_init only warned and the first put
  // faulted in uct_tcp_ep_am_bcopy.
  const auto why = ucx_version_problem({1, 22, 0}, {1, 13, 1});
  REQUIRE_FALSE(why.empty());
  CHECK(why.find("1.13.1") != std::string::npos);
  CHECK(why.find("built against 1.22") != std::string::npos);
  CHECK(why.find("LD_LIBRARY_PATH") != std::string::npos);
  CHECK_FALSE(ucx_version_problem({1, 22, 0}, {2, 0, 0}).empty());
  CHECK_FALSE(ucx_version_problem({1, 22, 0}, {0, 22, 0}).empty());
}
