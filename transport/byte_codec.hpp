#pragma once
// Little-endian-as-the-host packing of plain values and strings into the byte strings that
// endpoints and region keys travel as. Every get checks the length left and says false rather
// than read past the end: these bytes come from another process.
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace kvflow::transport::codec {

template <class T>
void put(std::string& out, T v) {
  static_assert(std::is_trivially_copyable_v<T>);
  out.append(reinterpret_cast<const char*>(&v), sizeof v);
}

template <class T>
bool get(const std::string& in, std::size_t& at, T& v) {
  static_assert(std::is_trivially_copyable_v<T>);
  if (in.size() < at || in.size() - at < sizeof v) return false;
  std::memcpy(&v, in.data() + at, sizeof v);
  at += sizeof v;
  return true;
}

// A string with its length in front.
inline void put_string(std::string& out, const std::string& s) {
  put(out, static_cast<std::uint32_t>(s.size()));
  out += s;
}

// At most `max` bytes (a length beyond it is a malformed or hostile description).
inline bool get_string(const std::string& in, std::size_t& at, std::string& s, std::uint32_t max) {
  std::uint32_t n = 0;
  if (!get(in, at, n) || n > max || in.size() - at < n) return false;
  s.assign(in.data() + at, n);
  at += n;
  return true;
}

}  // namespace kvflow::transport::codec
