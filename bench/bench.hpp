#pragma once
// `kvflow bench ...`: benchmarks that print their figure beside an anchor measured in the same run.
#include <cstdint>
#include <string>
#include <vector>

namespace kvflow::bench {

struct bench_flags {
  int tp = 8;
  int cp = 8;
  std::vector<int> rooms;  // empty: 1, 64, 1024
  int rounds = 2000;
  int workers = 1;  // actor worker threads (0: one per core); the calling thread plays the schedulers
};

int run_bench_control(const bench_flags& f);
// The same agreement across real processes, beside the gloo all_reduce anchor.
int run_bench_control_processes(const bench_flags& f);

// One rank process of run_bench_control_processes (started by it; not for users).
struct control_worker_flags {
  std::string bootstrap;  // worker 0: empty (it hosts the registry)
  int index = 0, tp = 8, cp = 1, rooms = 1, rounds = 2000;
};
int run_bench_control_worker(const control_worker_flags& w);

struct transfer_flags {
  std::vector<std::uint64_t> sizes{16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20};
  std::uint64_t bytes_per_size = 512ull << 20;  // moved per block size and mode
  std::vector<int> request_tokens{4096, 32768};
  bool perftest = true;  // run the ucx_perftest anchor
};

int run_bench_transfer(const transfer_flags& f);

// ucx_perftest -t ucp_put_bw at `size` between two processes on this host (the UCX kvflow is
// built against): its average bandwidth in GB/s, 0 when it failed. `memory`: ucx_perftest's -m
// (e.g. "cuda,cuda"), or null for host memory.
double perftest_gbps(std::uint64_t size, std::uint64_t iters, bool error_handling, int port, const char* memory);

struct gpu_flags {
  int device = 0;
  std::vector<int> request_tokens{32768};
  int reps = 10;  // timed repetitions per path (best of)
  // The API rows: requests through the public API, a prefill engine here and a decode engine in
  // another process on the same GPU.
  bool api = true;        // run them
  bool api_only = false;  // only them and the gather kernel they are compared with
  int api_requests = 8;   // in flight at once
  int api_chunk_tokens = 1024;
  int api_step_us = 200;  // scheduler step cadence of both engines
  std::string api_model = "dsv32";
  int api_timeout_s = 120;
};

// The GPU copy paths beside cudaMemcpyAsync, per-page copies and pinned device-to-host; exits 77
// without a device.
int run_bench_gpu(const gpu_flags& f);
// The receiving process of bench gpu's UCX rows (started by it; not for users): a GPU pool of
// `max_tokens`' request registered with UCX, commands on stdin.
int serve_ucx_gpu(int device, int max_tokens);
// The decode engine of bench gpu's API rows (started by it; not for users): joins the prefill
// node at `bootstrap`, receives the requests of `tokens`, checks them on the GPU and reports on
// stdout; stops once its stdin closes.
int serve_api_gpu(const gpu_flags& f, const std::string& bootstrap, int tokens);

}  // namespace kvflow::bench
