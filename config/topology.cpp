#include "config/topology.hpp"

#include <charconv>
#include <functional>
#include <map>
#include <sstream>
#include <vector>

namespace kvflow::config {

std::string config_error::one_line(const std::string& s) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  out.reserve(s.size());
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

namespace {

[[noreturn]] void fail(const std::string& field, const std::string& why) {
  throw config_error(field + ": " + why);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, sep)) out.push_back(cur);
  if (!s.empty() && s.back() == sep) out.emplace_back();
  return out;
}

std::int64_t parse_int(const std::string& field, const std::string& text, std::int64_t max) {
  std::int64_t v = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || p != text.data() + text.size() || text.empty())
    fail(field, "'" + text + "' is not an integer");
  if (v < 1) fail(field, "must be >= 1, got " + text);
  if (v > max) fail(field, "must be <= " + std::to_string(max) + ", got " + text);
  return v;
}

// Parses "k=v,k=v" into the int fields named in `fields`.
void parse_kv(const std::string& side, const std::string& spec,
              const std::map<std::string, int*>& fields) {
  if (spec.empty()) fail(side, "empty topology spec");
  for (const auto& item : split(spec, ',')) {
    auto eq = item.find('=');
    if (eq == std::string::npos) fail(side, "'" + item + "' is not key=value");
    auto key = item.substr(0, eq);
    auto it = fields.find(key);
    if (it == fields.end()) {
      std::string known;
      for (const auto& kv : fields) known += (known.empty() ? "" : ", ") + kv.first;
      fail(side + "." + key, "unknown key (expected one of " + known + ")");
    }
    *it->second = static_cast<int>(parse_int(side + "." + key, item.substr(eq + 1), 4096));
  }
}

}  // namespace

prefill_topology parse_prefill(const std::string& spec) {
  prefill_topology t;
  parse_kv("prefill", spec, {{"tp", &t.tp}, {"cp", &t.cp}, {"pp", &t.pp}, {"dp", &t.dp}});
  return t;
}

decode_topology parse_decode(const std::string& spec) {
  decode_topology t;
  int cp = 1;
  parse_kv("decode", spec, {{"tp", &t.tp}, {"dp", &t.dp}, {"pp", &t.pp}, {"cp", &cp}});
  if (cp != 1) fail("decode.cp", "must be 1 (decode has no context parallelism), got " + std::to_string(cp));
  return t;
}

kv_dtype parse_dtype(const std::string& text) {
  if (text == "bf16") return kv_dtype::bf16;
  if (text == "fp8") return kv_dtype::fp8;
  fail("dtype", "'" + text + "' is not bf16 or fp8");
}

const char* to_string(kv_dtype d) { return d == kv_dtype::bf16 ? "bf16" : "fp8"; }

model_layout parse_model(const std::string& text, kv_dtype dtype) {
  model_layout m;
  auto parts = split(text, ':');
  if (text == "dsv32") {
    // DeepSeek-V3.2: 61 layers, 576 values per token per layer; fp8 cache with scales = 656 B.
    m.kind = model_kind::mla;
    m.name = "dsv32";
    m.layers = 61;
    m.mla_bytes_per_token = dtype == kv_dtype::bf16 ? 1152 : 656;
    m.state_bytes_per_token = 132;  // the indexer cache is fp8 with scales in either KV dtype
    return m;
  }
  if (!parts.empty() && parts[0] == "mla") {
    if (parts.size() != 3 && parts.size() != 4)
      fail("model", "expected mla:LAYERS:BYTES[:STATE_BYTES], got '" + text + "'");
    m.kind = model_kind::mla;
    m.name = text;
    m.layers = static_cast<int>(parse_int("model.layers", parts[1], 1024));
    m.mla_bytes_per_token = parse_int("model.bytes", parts[2], 1 << 20);
    m.state_bytes_per_token = parts.size() == 4 ? parse_int("model.state_bytes", parts[3], 1 << 20) : 0;
    return m;
  }
  if (!parts.empty() && parts[0] == "mha") {
    if (parts.size() != 4) fail("model", "expected mha:LAYERS:KV_HEADS:HEAD_DIM, got '" + text + "'");
    m.kind = model_kind::mha;
    m.name = text;
    m.state_bytes_per_token = 0;
    m.layers = static_cast<int>(parse_int("model.layers", parts[1], 1024));
    m.kv_heads = static_cast<int>(parse_int("model.kv_heads", parts[2], 4096));
    m.head_dim = static_cast<int>(parse_int("model.head_dim", parts[3], 65536));
    m.elem_size = dtype == kv_dtype::bf16 ? 2 : 1;
    return m;
  }
  fail("model", "'" + text + "' is not dsv32, mla:L:BYTES[:STATE_BYTES] or mha:L:KV_HEADS:HEAD_DIM");
}

std::string describe(const model_layout& m) { return m.name; }

void validate(const cluster_config& c) {
  auto positive = [](const std::string& field, std::int64_t v) {
    if (v < 1) fail(field, "must be >= 1, got " + std::to_string(v));
  };
  const auto& p = c.prefill;
  const auto& d = c.decode;
  positive("prefill.tp", p.tp);
  positive("prefill.cp", p.cp);
  positive("prefill.pp", p.pp);
  positive("prefill.dp", p.dp);
  positive("decode.tp", d.tp);
  positive("decode.dp", d.dp);
  positive("decode.pp", d.pp);
  positive("page_size", c.page_size);
  positive("model.layers", c.model.layers);
  auto ranks = [](std::initializer_list<int> sizes) {
    std::int64_t n = 1;
    for (int v : sizes) n *= v;
    return n;
  };
  if (ranks({p.tp, p.cp, p.pp, p.dp}) > max_ranks)
    fail("prefill", "tp*cp*pp*dp exceeds " + std::to_string(max_ranks) + " ranks");
  if (ranks({d.tp, d.pp, d.dp}) > max_ranks)
    fail("decode", "tp*pp*dp exceeds " + std::to_string(max_ranks) + " ranks");
  if (d.tp % p.tp != 0 && p.tp % d.tp != 0)
    fail("decode.tp", std::to_string(d.tp) + " neither divides nor is divisible by prefill.tp " +
                          std::to_string(p.tp));
  if (d.pp != p.pp && d.pp != 1)
    fail("decode.pp", "must equal prefill.pp (" + std::to_string(p.pp) + ") or be 1, got " +
                          std::to_string(d.pp));
  if (p.pp > c.model.layers)
    fail("prefill.pp", std::to_string(p.pp) + " stages for " + std::to_string(c.model.layers) +
                           " layers");
  if (c.model.kind == model_kind::mla) {
    positive("model.bytes", c.model.mla_bytes_per_token);
  } else {
    positive("model.kv_heads", c.model.kv_heads);
    positive("model.head_dim", c.model.head_dim);
    if (c.model.kv_heads % p.tp != 0)
      fail("model.kv_heads", std::to_string(c.model.kv_heads) + " not divisible by prefill.tp " +
                                 std::to_string(p.tp));
    if (c.model.kv_heads % d.tp != 0)
      fail("model.kv_heads", std::to_string(c.model.kv_heads) + " not divisible by decode.tp " +
                                 std::to_string(d.tp));
  }
}

}  // namespace kvflow::config
