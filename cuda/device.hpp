#pragma once
// GPU discovery. Builds without a GPU or without CUDA; "no device" is a normal answer.
#include <string>

namespace kvflow::cuda {

struct device_report {
  int count = 0;          // usable CUDA devices; 0 when none
  bool built_with_cuda = false;
  std::string reason;     // why count is 0 (e.g. the driver's message), empty otherwise
};

device_report probe_devices();

}  // namespace kvflow::cuda
