#include "command/memory_check.hpp"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>
#include <vector>

#include "config/routing.hpp"

namespace kvflow::command {

namespace {

constexpr std::uint64_t u64_max = std::numeric_limits<std::uint64_t>::max();

std::uint64_t sat_mul(std::uint64_t a, std::uint64_t b) {
  if (a != 0 && b > u64_max / a) return u64_max;
  return a * b;
}
std::uint64_t sat_add(std::uint64_t a, std::uint64_t b) { return b > u64_max - a ? u64_max : a + b; }

// Bytes of one page (every buffer of every layer, plus its state page) on a rank with `layers`.
std::uint64_t page_bytes(const config::routing_plan& plan, int layers, std::int64_t item_bytes) {
  const auto& c = plan.config();
  const bool mla = c.model.kind == config::model_kind::mla;
  const std::uint64_t state = mla ? sat_mul(std::uint64_t(c.page_size), std::uint64_t(c.model.state_bytes_per_token)) : 0;
  const std::uint64_t per_layer =
      sat_add(sat_mul(std::uint64_t(plan.buffers_per_layer()), std::uint64_t(item_bytes)), state);
  return sat_mul(std::uint64_t(layers), per_layer);
}

// Sum over ranks of pages * page bytes (+ aux slots on decode ranks), counting prefill ranks
// only where `count_prefill` says so.
template <class CountPrefill>
std::uint64_t pool_bytes(const simulation_options& o, std::uint64_t pages, CountPrefill count_prefill) {
  const config::routing_plan plan(o.cluster);
  const std::uint64_t in_flight = std::uint64_t(std::max(0, std::min(o.concurrency, o.requests)));
  std::uint64_t total = 0;
  for (int r = 0; r < plan.prefill_ranks(); ++r) {
    const auto& p = plan.prefill(r);
    if (!count_prefill(p)) continue;
    total = sat_add(total, sat_mul(pages, page_bytes(plan, p.layers.size(), plan.prefill_item_bytes())));
  }
  for (int r = 0; r < plan.decode_ranks(); ++r) {
    const auto& d = plan.decode(r);
    total = sat_add(total, sat_mul(pages, page_bytes(plan, d.layers.size(), plan.decode_item_bytes())));
    total = sat_add(total, sat_mul(in_flight + 1, aux_slot_bytes));
  }
  return total;
}

// Pages of the requests in flight: min(concurrency, requests) requests of prompt_max tokens.
std::uint64_t pages_in_flight(const simulation_options& o) {
  const std::uint64_t in_flight = std::uint64_t(std::max(0, std::min(o.concurrency, o.requests)));
  const std::uint64_t page = std::uint64_t(std::max(1, o.cluster.page_size));
  const std::uint64_t max_pages = (std::uint64_t(std::max(0, o.prompt_max)) + page - 1) / page;
  return sat_mul(in_flight, max_pages);
}

// The first whitespace-separated number of `path`, or nothing ("max", unreadable).
bool read_number(const std::string& path, std::uint64_t& out) {
  std::ifstream in(path);
  std::string word;
  if (!(in >> word) || word.empty() || word.find_first_not_of("0123456789") != std::string::npos) return false;
  try {
    out = std::stoull(word);
  } catch (const std::logic_error&) {
    return false;
  }
  return true;
}

// The value of `key` in a "key value" file (memory.stat), 0 when absent.
std::uint64_t stat_value(const std::string& path, const std::string& key) {
  std::ifstream in(path);
  std::string k;
  std::uint64_t v = 0;
  while (in >> k >> v)
    if (k == key) return v;
  return 0;
}

// "/a/b" -> {"/a/b", "/a", ""}: a cgroup and its ancestors, relative to the controller's mount.
std::vector<std::string> self_and_ancestors(std::string path) {
  std::vector<std::string> out;
  while (!path.empty() && path.back() == '/') path.pop_back();
  for (;;) {
    out.push_back(path);
    if (path.empty()) break;
    auto slash = path.rfind('/');
    path = slash == std::string::npos ? std::string() : path.substr(0, slash);
  }
  return out;
}

// What a cgroup's limit leaves: limit - (usage - inactive file cache), or UINT64_MAX if unlimited.
std::uint64_t cgroup_left(std::uint64_t limit, std::uint64_t usage, std::uint64_t inactive_file) {
  const std::uint64_t used = usage > inactive_file ? usage - inactive_file : 0;
  return limit > used ? limit - used : 0;
}

}  // namespace

std::uint64_t simulation_touched_bytes(const simulation_options& o) {
  return pool_bytes(o, pages_in_flight(o), [](const config::prefill_rank_plan& p) { return p.authoritative; });
}

std::uint64_t available_memory_bytes(const std::string& root) {
  std::uint64_t avail = u64_max;
  {
    std::ifstream in(root + "/proc/meminfo");
    std::string line;
    while (std::getline(in, line)) {
      std::istringstream words(line);
      std::string key, unit;
      std::uint64_t kb = 0;
      if (words >> key >> kb && key == "MemAvailable:") {
        words >> unit;
        avail = sat_mul(kb, unit == "kB" || unit.empty() ? 1024 : 1);
        break;
      }
    }
  }
  // The cgroups of this process: "0::/path" (v2), "N:memory[,...]:/path" (v1).
  std::ifstream groups(root + "/proc/self/cgroup");
  std::string line;
  while (std::getline(groups, line)) {
    auto a = line.find(':');
    auto b = a == std::string::npos ? std::string::npos : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string controllers = "," + line.substr(a + 1, b - a - 1) + ",";
    const std::string path = line.substr(b + 1);
    const bool v2 = line.compare(0, a, "0") == 0 && controllers == ",,";
    const bool v1 = controllers.find(",memory,") != std::string::npos;
    if (!v2 && !v1) continue;
    const std::string mount = root + (v2 ? "/sys/fs/cgroup" : "/sys/fs/cgroup/memory");
    for (const auto& g : self_and_ancestors(path)) {
      const std::string dir = mount + g;
      std::uint64_t limit = 0, usage = 0;
      if (v2) {
        if (!read_number(dir + "/memory.max", limit) || !read_number(dir + "/memory.current", usage)) continue;
        avail = std::min(avail, cgroup_left(limit, usage, stat_value(dir + "/memory.stat", "inactive_file")));
      } else {
        if (!read_number(dir + "/memory.limit_in_bytes", limit) || !read_number(dir + "/memory.usage_in_bytes", usage))
          continue;
        if (limit >= (std::uint64_t{1} << 62)) continue;  // v1's "unlimited" (PAGE_COUNTER_MAX pages)
        avail = std::min(avail, cgroup_left(limit, usage, stat_value(dir + "/memory.stat", "total_inactive_file")));
      }
    }
  }
  return avail;
}

void check_pool_memory(const simulation_options& o, std::uint64_t available) {
  const std::uint64_t needed = simulation_touched_bytes(o);
  if (needed <= available) return;
  constexpr double gib = double(std::uint64_t{1} << 30);
  char line[160];
  std::snprintf(line, sizeof line, "needs %.1f GiB of KV pools, %.1f GiB available; lower --concurrency or --prompt-tokens",
                double(needed) / gib, double(available) / gib);
  throw config::config_error(line);
}

}  // namespace kvflow::command
