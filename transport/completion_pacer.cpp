#include "transport/completion_pacer.hpp"

#include <algorithm>

namespace kvflow::transport {

std::optional<completion_pacer::plan> completion_pacer::plan_for(std::uint64_t bytes) const {
  if (ns_per_byte_ <= 0 || bytes < s_.min_bytes) return std::nullopt;
  const double predicted = ns_per_byte_ * static_cast<double>(bytes);
  const duration window = std::clamp(duration(static_cast<std::int64_t>(predicted * s_.window_share)), s_.min_window,
                                     s_.max_window);
  // The first look comes early by a share of the prediction, but by no more than a window: a long
  // push is not looked at for milliseconds before its end.
  const duration lead = std::min(duration(static_cast<std::int64_t>(predicted * (1 - s_.early))), s_.max_window);
  plan p;
  p.first_look = duration(static_cast<std::int64_t>(predicted)) - lead;
  p.interval = s_.interval;
  // From the first look to past the predicted end by the window's length.
  const auto span = lead + window;
  p.looks = static_cast<int>(span / s_.interval) + 1;
  return p;
}

void completion_pacer::observed(std::uint64_t bytes, double gpu_ms) {
  if (bytes < s_.min_bytes || !(gpu_ms > 0)) return;
  const double rate = gpu_ms * 1e6 / static_cast<double>(bytes);
  ns_per_byte_ = ns_per_byte_ <= 0 ? rate : ns_per_byte_ + s_.weight * (rate - ns_per_byte_);
}

}  // namespace kvflow::transport
