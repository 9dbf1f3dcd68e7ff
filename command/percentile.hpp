#pragma once
// The q-quantile (0..1) of a sample, nearest rank; 0 for an empty sample. And latency_summary,
// which answers the same without one sample per request kept for the whole run.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvflow::command {

inline double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  auto idx = static_cast<std::size_t>(q * double(v.size() - 1) + 0.5);
  return v[std::min(idx, v.size() - 1)];
}

// Latencies (ms) for a report's percentiles, in bounded memory: a soak finishes tens of thousands
// of requests an hour. The first `exact_limit` samples are kept and give exact nearest-rank
// percentiles (every run of --requests up to that many). Past that the samples are folded into a
// histogram of log-spaced buckets, each 1% wide, and dropped: a quantile is then its bucket's
// geometric middle (within 0.5% of a sample of that bucket), clamped to the smallest and largest
// sample seen. Memory: exact_limit doubles, then a fixed 2315 counters.
class latency_summary {
 public:
  explicit latency_summary(std::size_t exact_limit = 4096) : exact_limit_(exact_limit) {}

  void add(double ms) {
    ++count_;
    min_ = count_ == 1 ? ms : std::min(min_, ms);
    max_ = count_ == 1 ? ms : std::max(max_, ms);
    if (buckets_.empty()) {
      samples_.push_back(ms);
      if (samples_.size() <= exact_limit_) return;
      buckets_.assign(bucket_count, 0);
      for (double s : samples_) ++buckets_[bucket_of(s)];
      std::vector<double>().swap(samples_);
      return;
    }
    ++buckets_[bucket_of(ms)];
  }

  double quantile(double q) const {
    if (count_ == 0) return 0;
    if (buckets_.empty()) return percentile(samples_, q);
    const auto rank = std::min(static_cast<std::uint64_t>(q * double(count_ - 1) + 0.5), count_ - 1);
    std::uint64_t below = 0;
    for (std::size_t b = 0; b < buckets_.size(); ++b) {
      below += buckets_[b];
      if (below > rank) return std::clamp(lowest_ms * std::pow(growth, double(b) + 0.5), min_, max_);
    }
    return max_;
  }
  double max() const { return count_ == 0 ? 0 : max_; }
  std::uint64_t count() const { return count_; }
  // Doubles and counters held: bounded whatever count() is.
  std::size_t held() const { return samples_.capacity() + buckets_.capacity(); }

 private:
  static constexpr double lowest_ms = 1e-3, growth = 1.01;
  // 1 us .. 1e7 ms (about 2.8 h) in 1% steps; anything outside lands in the first or last bucket.
  static constexpr std::size_t bucket_count = 2315;
  static std::size_t bucket_of(double ms) {
    if (!(ms > lowest_ms)) return 0;
    const auto b = static_cast<std::size_t>(std::log(ms / lowest_ms) / std::log(growth));
    return std::min(b, bucket_count - 1);
  }
  std::size_t exact_limit_;
  std::uint64_t count_ = 0;
  double min_ = 0, max_ = 0;
  std::vector<double> samples_;
  std::vector<std::uint64_t> buckets_;
};

}  // namespace kvflow::command
