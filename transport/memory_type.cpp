#include "transport/transport.hpp"

namespace kvflow::transport {

const char* to_string(memory_type m) {
  switch (m) {
    case memory_type::host: return "host";
    case memory_type::cuda: return "cuda";
    case memory_type::cuda_managed: return "cuda-managed";
    case memory_type::rocm: return "rocm";
  }
  return "unknown";
}

}  // namespace kvflow::transport
