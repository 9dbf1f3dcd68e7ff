#pragma once
// `kvflow bench ...`: benchmarks that print their figure beside an anchor measured in the same run.
#include <cstdint>
#include <vector>

namespace kvflow::runtime {

struct bench_flags {
  int tp = 8;
  int cp = 8;
  std::vector<int> rooms;  // empty: 1, 64, 1024
  int rounds = 2000;
  int workers = 1;  // actor worker threads (0: one per core); the calling thread plays the schedulers
};

int run_bench_control(const bench_flags& f);

}  // namespace kvflow::runtime
