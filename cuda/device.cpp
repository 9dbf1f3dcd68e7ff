#include "cuda/device.hpp"

#ifdef KVFLOW_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvflow::cuda {

device_report probe_devices() {
  device_report r;
#ifdef KVFLOW_HAVE_CUDA
  r.built_with_cuda = true;
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    // Machines without a GPU answer "CUDA driver version is insufficient" or "no device".
    r.reason = std::string("no device: ") + cudaGetErrorString(e);
    return r;
  }
  r.count = n;
  if (n == 0) r.reason = "no device";
#else
  r.reason = "no device: built without CUDA";
#endif
  return r;
}

}  // namespace kvflow::cuda
