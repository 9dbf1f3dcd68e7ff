#pragma once
// The one error-propagation idiom: functions that can fail return a status (or a result<T>);
// the function that decides an error fills the reason, callers pass it on unchanged.
#include <optional>
#include <string>
#include <utility>

namespace kvflow {

class status {
 public:
  status() = default;
  static status error(std::string reason) { return status(std::move(reason)); }
  bool ok() const { return !reason_; }
  explicit operator bool() const { return ok(); }
  const std::string& reason() const {
    static const std::string none;
    return reason_ ? *reason_ : none;
  }

 private:
  explicit status(std::string r) : reason_(std::move(r)) {}
  std::optional<std::string> reason_;
};

template <class T>
class result {
 public:
  result(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design
  result(status s) : status_(std::move(s)) {}    // NOLINT
  bool ok() const { return value_.has_value(); }
  explicit operator bool() const { return ok(); }
  T& value() { return *value_; }
  const T& value() const { return *value_; }
  T* operator->() { return &*value_; }
  const status& error() const { return status_; }

 private:
  std::optional<T> value_;
  status status_;
};

}  // namespace kvflow
