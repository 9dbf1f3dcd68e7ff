#pragma once
// What the embedded examples share: the engine's memory of one rank (host buffers this program
// owns, filled with a pattern its peer can check), and the scheduler's poll of one step. Public
// headers only.
#include <kvflow/kvflow.hpp>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace example {

using clock_type = std::chrono::steady_clock;

// model mla:2:64, page_size 16: 2 layers of 64 B per token, 1024 B per page.
constexpr int kLayers = 2;
constexpr int kPages = 8;                   // pages per layer buffer
constexpr std::size_t kPageBytes = 64 * 16;
constexpr int kAuxRows = 4;
constexpr std::size_t kAuxRowBytes = 64;
constexpr int kRequestPages = 4;
const std::vector<std::int32_t> kPrefillPages = {0, 1, 2, 3};
const std::vector<std::int32_t> kDecodePages = {4, 5, 6, 7};
constexpr int kPrefillAuxRow = 0;
constexpr int kDecodeAuxSlot = 1;

inline unsigned char kv_byte(int layer, int page, std::size_t i) {
  return static_cast<unsigned char>((layer * 131 + page * 29 + i * 7 + 3) & 0xff);
}
inline unsigned char aux_byte(int row, std::size_t i) { return static_cast<unsigned char>((0xa0 + row * 16 + i * 3) & 0xff); }

// The engine's memory of one rank: one mla_latent buffer per layer and one aux buffer.
struct rank_memory {
  std::vector<std::vector<unsigned char>> kv;
  std::vector<unsigned char> aux;

  explicit rank_memory(bool prefill) : kv(kLayers, std::vector<unsigned char>(kPages * kPageBytes)), aux(kAuxRows * kAuxRowBytes) {
    for (int l = 0; l < kLayers; ++l)
      for (int p = 0; p < kPages; ++p)
        for (std::size_t i = 0; i < kPageBytes; ++i) kv[l][p * kPageBytes + i] = prefill ? kv_byte(l, p, i) : 0xee;
    for (int r = 0; r < kAuxRows; ++r)
      for (std::size_t i = 0; i < kAuxRowBytes; ++i) aux[r * kAuxRowBytes + i] = prefill ? aux_byte(r, i) : 0x5a;
  }
  const unsigned char* page(int layer, int p) const { return kv[layer].data() + p * kPageBytes; }
  const unsigned char* aux_row(int r) const { return aux.data() + r * kAuxRowBytes; }

  kvflow::memory_desc desc() {
    kvflow::memory_desc m;
    for (int l = 0; l < kLayers; ++l) {
      kvflow::buffer_desc b;
      b.base = kv[l].data();
      b.bytes = kv[l].size();
      b.page_bytes = kPageBytes;
      b.role = kvflow::buffer_role::mla_latent;
      b.layer = l;
      b.kind = kvflow::memory_kind::host;
      m.buffers.push_back(b);
    }
    kvflow::buffer_desc a;
    a.base = aux.data();
    a.bytes = aux.size();
    a.page_bytes = kAuxRowBytes;
    a.role = kvflow::buffer_role::aux;
    a.layer = -1;
    a.kind = kvflow::memory_kind::host;
    m.buffers.push_back(a);
    m.layer_begin = 0;
    m.layer_end = kLayers;
    return m;
  }
};

inline int fail(const std::string& what) {
  std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  return 1;
}
inline int fail(const std::string& what, const kvflow::error& e) {
  return fail(what + ": " + kvflow::to_string(e.code()) + ": " + e.message());
}

// The round of step k; a round that is late is waited for again (the same step), up to the deadline.
template <class Rank>
inline kvflow::expected<kvflow::round_view> poll_step(Rank& rank, std::uint64_t k, clock_type::time_point deadline) {
  for (;;) {
    auto v = rank.poll(k, std::chrono::milliseconds(100));
    if (v) return v;
    const kvflow::errc c = v.err().code();
    if ((c != kvflow::errc::timeout && c != kvflow::errc::not_ready) || clock_type::now() > deadline) return v;
  }
}

// What the scheduler of one rank sees of the request.
struct side {
  const char* name;
  bool acted = false;  // prefill: init + send; decode: send_destinations
  bool done = false;   // agreed Success and released
  std::string last = "absent";
};

// Checks that poll(k) answered step k with round k - lag (0 before the first round).
inline bool check_round(const kvflow::round_view& v, std::uint64_t k, std::uint64_t lag, const char* name, std::string& why) {
  const std::uint64_t want = k > lag ? k - lag : 0;
  if (v.step != k || v.round != want) {
    why = std::string(name) + ": poll(" + std::to_string(k) + ") answered step " + std::to_string(v.step) +
          " round " + std::to_string(v.round) + ", want round " + std::to_string(want);
    return false;
  }
  return true;
}

inline void log_line(kvflow::log_level level, const std::string& text) {
  std::fprintf(stderr, "kvflow[%d]: %s\n", static_cast<int>(level), text.c_str());
}

// Where the request's bytes landed on decode: prefill pages 0..3 of every layer in decode pages
// 4..7, decode pages 0..3 untouched, prefill aux row 0 in decode aux row 1 and no other row
// written. Empty when so; else what is wrong.
inline std::string check_landed(const rank_memory& dmem, const rank_memory& sent) {
  for (int l = 0; l < kLayers; ++l)
    for (int j = 0; j < kRequestPages; ++j) {
      if (std::memcmp(dmem.page(l, kDecodePages[j]), sent.page(l, kPrefillPages[j]), kPageBytes) != 0)
        return "layer " + std::to_string(l) + ": decode page " + std::to_string(kDecodePages[j]) +
               " does not hold prefill page " + std::to_string(kPrefillPages[j]);
      const unsigned char* other = dmem.page(l, j);
      for (std::size_t i = 0; i < kPageBytes; ++i)
        if (other[i] != 0xee) return "layer " + std::to_string(l) + ": decode page " + std::to_string(j) + " was written";
    }
  if (std::memcmp(dmem.aux_row(kDecodeAuxSlot), sent.aux_row(kPrefillAuxRow), kAuxRowBytes) != 0)
    return "decode aux row " + std::to_string(kDecodeAuxSlot) + " does not hold prefill aux row " +
           std::to_string(kPrefillAuxRow);
  for (int r = 0; r < kAuxRows; ++r) {
    if (r == kDecodeAuxSlot) continue;
    for (std::size_t i = 0; i < kAuxRowBytes; ++i)
      if (dmem.aux_row(r)[i] != 0x5a) return "decode aux row " + std::to_string(r) + " was written";
  }
  return {};
}

}  // namespace example
