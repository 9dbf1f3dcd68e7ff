// `kvflow bench gpu`'s UCX rows: kvflow's UCX transport putting one request's GPU KV into another
// process's GPU pool, as a prefill process does to a decode process on the same host. The
// receiving process is this binary again (`kvflow bench gpu --serve-ucx`): it registers its pool,
// prints its endpoint and region, and on each line of its input overwrites or checks the request's
// destination on its GPU. The request goes coalesced (one put per layer) and fragmented (one put
// per page); the anchor, in the same run, is ucx_perftest put_bw cuda -> cuda at the coalesced
// put's size.
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>

#include "bench/bench.hpp"
#include "bench/bench_gpu_internal.hpp"
#include "bench/gpu_request.hpp"
#include "command/child_process.hpp"
#include "cuda/gpu.hpp"
#include "cuda/pattern_check.hpp"
#include "transport/byte_codec.hpp"
#include "transport/ucx_transport.hpp"

namespace kvflow::bench {

namespace {
using namespace kvflow::cuda;
using transport::codec::from_hex;
using transport::codec::to_hex;
}  // namespace

int serve_ucx_gpu(int device, int max_tokens) {
  try {
    must(set_device(device));
    auto t = must(transport::ucx_transport::create());
    auto s = must(stream::create(device));
    auto pool = must(device_buffer::create(device, gpu_request_dst_bytes(max_tokens)));
    auto region = must(t->register_memory(2, pool.data(), pool.size()));
    std::printf("%s\n%llu %llu %llu %s\n", to_hex(t->endpoint()).c_str(), static_cast<unsigned long long>(region.id),
                static_cast<unsigned long long>(region.size), static_cast<unsigned long long>(region.address),
                to_hex(region.remote_key).c_str());
    std::fflush(stdout);
    // "fill|check TOKENS SEED coalesced|fragmented": the destination of that request, overwritten
    // with the pattern of SEED, or the bytes there that differ from it.
    std::string line;
    while (std::getline(std::cin, line)) {
      std::istringstream in(line);
      std::string verb, how;
      int tokens = 0;
      std::uint64_t seed = 0;
      if (!(in >> verb >> tokens >> seed >> how) || tokens <= 0 || tokens > max_tokens) break;
      auto r = gpu_request_of(tokens, 0, reinterpret_cast<std::uint64_t>(pool.data()));
      const auto& runs = how == "coalesced" ? r.dst_runs_coalesced : r.dst_runs;
      if (verb == "fill") {
        auto list = must(fill_pattern(runs, seed, 0, s));
        must(s.synchronize());
        std::printf("ok\n");
      } else {
        std::printf("mismatches %llu\n", static_cast<unsigned long long>(must(count_mismatches(runs, seed, s))));
      }
      std::fflush(stdout);
    }
    t->deregister_memory(region.id);
    return 0;
  } catch (const failure& e) {
    std::fprintf(stderr, "bench gpu --serve-ucx: %s\n", e.reason.c_str());
    return 1;
  }
}

ucx_gpu_figures ucx_gpu_rows(const gpu_flags& f, int tokens, const device_buffer& src, const stream& s) {
  auto child = must(command::child_process::start(
      {command::self_executable(), "--log-level", "error", "bench", "gpu", "--serve-ucx", "--device",
       std::to_string(f.device), "--tokens", std::to_string(tokens)},
      {}, true, true));
  auto line = [&] { return must(child.read_line(std::chrono::seconds(60))); };
  const std::string endpoint = from_hex(line());
  transport::region_desc d;
  {
    std::istringstream in(line());
    std::string key;
    unsigned long long id = 0, size = 0, address = 0;
    if (!(in >> id >> size >> address >> key)) throw failure{"the UCX receiver described no region"};
    d = {id, size, address, from_hex(key)};
  }
  auto sender = must(transport::ucx_transport::create());
  must(sender->connect(1, endpoint, {d}));
  auto r = gpu_request_of(tokens, reinterpret_cast<std::uint64_t>(src.data()), d.address);
  must(s.synchronize());  // the source's pattern is written
  ucx_gpu_figures out;
  for (bool coalesced : {true, false}) {
    const char* how = coalesced ? "coalesced" : "fragmented";
    const auto& copies = coalesced ? r.coalesced : r.fragmented;
    std::vector<transport::block> blocks;
    for (const auto& c : copies)
      blocks.push_back({reinterpret_cast<const std::byte*>(c.src), d.id, c.dst - d.address, c.len});
    // Overwritten first, so that only the pushes can make the destination verify again.
    must(child.write_line(std::string("fill ") + std::to_string(tokens) + " 11 " + how));
    if (line() != "ok") throw failure{"the UCX receiver did not overwrite the destination"};
    const double ms = time_push(*sender, 1, blocks, coalesced ? f.reps : std::min(f.reps, 3)).wall_ms;
    must(child.write_line(std::string("check ") + std::to_string(tokens) + " 7 " + how));
    const bool verified = line() == "mismatches 0";
    (coalesced ? out.coalesced_ms : out.fragmented_ms) = ms;
    out.verified = out.verified && verified;
  }
  out.lanes = sender->describe_endpoint(1);
  out.puts_coalesced = r.coalesced.size();
  out.puts_fragmented = r.fragmented.size();
  sender->disconnect(1);
  child.close_input();
  (void)child.wait(std::chrono::seconds(10));
  out.perftest_gbps = perftest_gbps(r.coalesced.front().len, 200, false, 13590, "cuda,cuda");
  return out;
}

}  // namespace kvflow::bench
