#pragma once
// The q-quantile (0..1) of a sample, nearest rank; 0 for an empty sample.
#include <algorithm>
#include <cstddef>
#include <vector>

namespace kvflow::command {

inline double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  auto idx = static_cast<std::size_t>(q * double(v.size() - 1) + 0.5);
  return v[std::min(idx, v.size() - 1)];
}

}  // namespace kvflow::command
