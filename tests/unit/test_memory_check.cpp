// runtime/memory_check.hpp: the KV pool bytes of a simulation, and the memory available to it.
#include <doctest/doctest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <unistd.h>

#include "command/memory_check.hpp"
#include "unit_helpers.hpp"

using namespace kvflow;
using command::simulation_options;

namespace {

// prefill tp=2,cp=2 (4 ranks), decode dp=2 (2 ranks), an MLA model of 4 layers x 100 B per token
// plus 10 B of state per token, page 16; 3 requests of at most 40 tokens, 2 in flight.
simulation_options small_mla() {
  simulation_options o;
  o.cluster.prefill.tp = 2;
  o.cluster.prefill.cp = 2;
  o.cluster.decode.dp = 2;
  o.cluster.model = config::parse_model("mla:4:100:10", config::kv_dtype::fp8);
  o.cluster.page_size = 16;
  o.requests = 3;
  o.concurrency = 2;
  o.prompt_min = 10;
  o.prompt_max = 40;
  return o;
}

// prefill tp=2, decode tp=4, MHA of 2 layers x 4 kv heads x head dim 8 in bf16, page 8; one
// request of 8 tokens in flight (of 5).
simulation_options small_mha() {
  simulation_options o;
  o.cluster.prefill.tp = 2;
  o.cluster.decode.tp = 4;
  o.cluster.dtype = config::kv_dtype::bf16;
  o.cluster.model = config::parse_model("mha:2:4:8", config::kv_dtype::bf16);
  o.cluster.page_size = 8;
  o.requests = 5;
  o.concurrency = 1;
  o.prompt_min = 8;
  o.prompt_max = 8;
  return o;
}

void write(const std::filesystem::path& p, const std::string& text) {
  std::filesystem::create_directories(p.parent_path());
  std::ofstream(p) << text;
}

}  // namespace

TEST_CASE("memory_check: the touched estimate of an MLA model with state") {
  auto o = small_mla();
  // One page of one rank: 4 layers x (16 x 100 B of latent KV + 16 x 10 B of state) = 7040 B.
  // in_flight = min(2, 3) = 2 requests of ceil(40 / 16) = 3 pages.
  // Mapped, 2 x 2 x 3 = 12 pages per rank: 4 prefill ranks x 12 x 7040 = 337920; 2 decode ranks
  // x (12 x 7040 + 3 aux slots x 64) = 169344.
  // Touched, 2 x 3 = 6 pages: decode tp 1 < prefill tp 2 (MLA) reads prefill tp 0 of CP rank 0
  // only, so 1 of the 4 prefill ranks is authoritative: 6 x 7040 = 42240; decode 2 x (6 x 7040
  // + 192) = 84864.
  CHECK(command::simulation_touched_bytes(o) == 42240 + 84864);

  // CP-parallel sending makes every CP rank of shard tp 0 authoritative: one more prefill rank.
  o.cluster.cp_send_all = true;
  CHECK(command::simulation_touched_bytes(o) == 2 * 42240 + 84864);
}

TEST_CASE("memory_check: MHA pools hold K and V of the rank's heads, and no state") {
  auto o = small_mha();
  // Prefill: 8 tokens x 2 heads x 8 x 2 B = 256 B per buffer page, K and V, 2 layers: 1024 B per
  // page. Decode: 8 x 1 head x 16 B = 128, x 2 x 2 = 512 B per page. in_flight 1, 1 page.
  // Mapped (2 pages): prefill 2 ranks x 2 x 1024 = 4096; decode 4 x (2 x 512 + 2 x 64) = 4608.
  // Touched (1 page; decode tp > prefill tp: both prefill ranks are read): 2048 + 4 x (512 + 128).
  CHECK(command::simulation_touched_bytes(o) == 2048 + 2560);
}

TEST_CASE("memory_check: PP stages hold their layer range, and concurrency above requests does not count") {
  simulation_options o;
  o.cluster.prefill.pp = 2;  // 5 layers: stage 0 holds 3, stage 1 holds 2; decode pp 1 holds 5
  o.cluster.model = config::parse_model("mla:5:10", config::kv_dtype::fp8);
  o.cluster.page_size = 4;
  o.requests = 1;
  o.concurrency = 8;  // 1 in flight
  o.prompt_max = 4;   // 1 page
  // Mapped (2 pages): prefill 2 x (3 + 2) x 40 = 400; decode 2 x 5 x 40 + 2 aux slots x 64 = 528.
  CHECK(command::simulation_touched_bytes(o) == 200 + 200 + 128);
}

TEST_CASE("memory_check: check_pool_memory refuses what does not fit, in one line") {
  auto o = small_mla();
  const auto needed = command::simulation_touched_bytes(o);
  CHECK_NOTHROW(command::check_pool_memory(o, needed));
  auto what = unit::config_error_of([&] { command::check_pool_memory(o, needed - 1); });
  CHECK(what == "needs 0.0 GiB of KV pools, 0.0 GiB available; lower --concurrency or --prompt-tokens");

  o.requests = o.concurrency = 64;
  o.prompt_max = 16 * 1024 * 1024;  // 1 Mi pages per request: 64 x 1 Mi x 7040 B x 3 ranks
  what = unit::config_error_of([&] { command::check_pool_memory(o, std::uint64_t{3} << 29); });
  CHECK(what == "needs 1320.0 GiB of KV pools, 1.5 GiB available; lower --concurrency or --prompt-tokens");
}

TEST_CASE("memory_check: available_memory_bytes reads MemAvailable and the cgroup limits") {
  namespace fs = std::filesystem;
  const fs::path root = fs::temp_directory_path() / ("kvflow_memcheck_" + std::to_string(::getpid()));
  fs::remove_all(root);
  const auto unknown = std::numeric_limits<std::uint64_t>::max();
  CHECK(command::available_memory_bytes(root.string()) == unknown);  // nothing to read

  write(root / "proc/meminfo", "MemTotal:       2000 kB\nMemFree:  500 kB\nMemAvailable:   1000 kB\n");
  CHECK(command::available_memory_bytes(root.string()) == 1024000);

  SUBCASE("cgroup v2: the tightest of the cgroup and its ancestors, inactive file cache is free") {
    write(root / "proc/self/cgroup", "0::/a/b\n");
    write(root / "sys/fs/cgroup/a/b/memory.max", "max\n");
    write(root / "sys/fs/cgroup/a/b/memory.current", "100000\n");
    CHECK(command::available_memory_bytes(root.string()) == 1024000);
    write(root / "sys/fs/cgroup/a/memory.max", "600000\n");
    write(root / "sys/fs/cgroup/a/memory.current", "200000\n");
    write(root / "sys/fs/cgroup/a/memory.stat", "anon 150000\ninactive_file 50000\nactive_file 1\n");
    CHECK(command::available_memory_bytes(root.string()) == 600000 - 150000);
    write(root / "sys/fs/cgroup/a/memory.current", "700000\n");  // over the limit
    CHECK(command::available_memory_bytes(root.string()) == 0);
  }
  SUBCASE("cgroup v1: the memory controller's hierarchy; its 'unlimited' is no limit") {
    write(root / "proc/self/cgroup", "5:devices:/x\n4:cpu,memory:/x\n0::/\n");
    write(root / "sys/fs/cgroup/memory/x/memory.limit_in_bytes", "9223372036854771712\n");
    write(root / "sys/fs/cgroup/memory/x/memory.usage_in_bytes", "100\n");
    CHECK(command::available_memory_bytes(root.string()) == 1024000);
    write(root / "sys/fs/cgroup/memory/memory.limit_in_bytes", "300000\n");
    write(root / "sys/fs/cgroup/memory/memory.usage_in_bytes", "100000\n");
    write(root / "sys/fs/cgroup/memory/memory.stat", "cache 1\ntotal_inactive_file 20000\n");
    CHECK(command::available_memory_bytes(root.string()) == 300000 - 80000);
  }
  fs::remove_all(root);
}

TEST_CASE("memory_check: this machine has some memory available") {
  const auto avail = command::available_memory_bytes();
  CHECK(avail > 0);
}
