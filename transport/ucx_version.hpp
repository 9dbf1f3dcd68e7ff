#pragma once
// Whether the UCX library loaded at run time can serve a build against another version. UCP's
// API is compatible upward within a major version, so the library must be the same major and at
// least the minor kvflow was built against. An older one (Debian's 1.13 ahead of kvflow's 1.22 on
// LD_LIBRARY_PATH, say) only warns in ucp_init and then faults in its lanes: seen on the GPU
// machine, in uct_tcp_ep_am_bcopy.
#include <string>

namespace kvflow::transport {

struct ucx_version {
  unsigned major = 0, minor = 0, release = 0;
};

// Empty when `loaded` can serve a build against `built`; else why not, in one line.
std::string ucx_version_problem(const ucx_version& built, const ucx_version& loaded);

}  // namespace kvflow::transport
