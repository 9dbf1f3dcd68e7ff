#include "cuda/pattern_check.hpp"

#include <algorithm>

namespace kvflow::cuda {

namespace {
std::vector<pattern_run> split_runs(const std::vector<pattern_run>& runs) {
  std::vector<pattern_run> out;
  for (const auto& r : runs) append_split(out, r);
  return out;
}
}  // namespace

result<device_buffer> upload(const void* data, std::uint64_t bytes, const stream& s) {
  auto b = device_buffer::create(s.device(), std::max<std::uint64_t>(1, bytes));
  if (!b) return b.error();
  if (bytes > 0) {
    if (auto st = copy_async(b.value().data(), data, bytes, s); !st) return st;
  }
  if (auto st = s.synchronize(); !st) return st;
  return std::move(b.value());
}

result<device_buffer> fill_pattern(const std::vector<pattern_run>& runs, std::uint64_t seed, std::uint64_t delay_ns,
                                   const stream& s) {
  auto split = split_runs(runs);
  auto list = upload(split.data(), split.size() * sizeof(pattern_run), s);
  if (!list) return list.error();
  if (auto st = launch_fill(reinterpret_cast<const pattern_run*>(list.value().data()),
                            static_cast<std::uint32_t>(split.size()), seed, delay_ns, s.handle());
      !st)
    return st;
  return std::move(list.value());
}

result<std::uint64_t> count_mismatches(const std::vector<pattern_run>& runs, std::uint64_t seed, const stream& s) {
  auto split = split_runs(runs);
  auto list = upload(split.data(), split.size() * sizeof(pattern_run), s);
  if (!list) return list.error();
  unsigned long long zero = 0, out = 0;
  auto count = upload(&zero, sizeof zero, s);
  if (!count) return count.error();
  status st = launch_verify(reinterpret_cast<const pattern_run*>(list.value().data()),
                            static_cast<std::uint32_t>(split.size()), seed,
                            reinterpret_cast<unsigned long long*>(count.value().data()), s.handle());
  if (st) st = copy_async(&out, count.value().data(), sizeof out, s);
  if (st) st = s.synchronize();
  if (!st) return st;
  return static_cast<std::uint64_t>(out);
}

}  // namespace kvflow::cuda
