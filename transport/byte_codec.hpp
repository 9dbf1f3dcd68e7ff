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

// Bytes as lowercase hex digits, and back: endpoints and keys carried in lines of text between
// processes (a child's stdin and stdout). Empty when `text` is not an even run of hex digits.
inline std::string to_hex(const std::string& bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  out.reserve(2 * bytes.size());
  for (unsigned char c : bytes) {
    out.push_back(digits[c >> 4]);
    out.push_back(digits[c & 15]);
  }
  return out;
}

inline std::string from_hex(const std::string& text) {
  auto value = [](char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  if (text.size() % 2 != 0) return {};
  std::string out;
  out.reserve(text.size() / 2);
  for (std::size_t i = 0; i < text.size(); i += 2) {
    const int hi = value(text[i]), lo = value(text[i + 1]);
    if (hi < 0 || lo < 0) return {};
    out.push_back(static_cast<char>(hi * 16 + lo));
  }
  return out;
}

}  // namespace kvflow::transport::codec
