#include "transport/ucx_version.hpp"

namespace kvflow::transport {

std::string ucx_version_problem(const ucx_version& built, const ucx_version& loaded) {
  if (loaded.major == built.major && loaded.minor >= built.minor) return {};
  return "the UCX library loaded is " + std::to_string(loaded.major) + "." + std::to_string(loaded.minor) + "." +
         std::to_string(loaded.release) + ", kvflow was built against " + std::to_string(built.major) + "." +
         std::to_string(built.minor) + " (needs " + std::to_string(built.major) + "." + std::to_string(built.minor) +
         " or a later " + std::to_string(built.major) +
         ".x: is another UCX's libucp ahead of kvflow's on LD_LIBRARY_PATH?)";
}

}  // namespace kvflow::transport
