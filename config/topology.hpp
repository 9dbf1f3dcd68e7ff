#pragma once
// Topology and model KV layout of a prefill/decode cluster: parsing and validation.
// Pure code: no actors, no I/O. Errors name the offending field in one line.
#include <cstdint>
#include <stdexcept>
#include <string>

namespace kvflow::config {

// Thrown for any invalid user input; what() is one line naming the field and why. Control
// characters echoed from the input are escaped, so the message stays one line.
class config_error : public std::runtime_error {
 public:
  explicit config_error(const std::string& what) : std::runtime_error(one_line(what)) {}

 private:
  static std::string one_line(const std::string& s);
};

// Most ranks one side may have (bounds every per-rank table).
constexpr std::int64_t max_ranks = 1 << 16;

enum class model_kind { mla, mha };
enum class kv_dtype { bf16, fp8 };

struct prefill_topology {
  int tp = 1;
  int cp = 1;
  int pp = 1;
  int dp = 1;
  int ranks() const { return tp * cp * pp * dp; }
};

struct decode_topology {
  int tp = 1;
  int dp = 1;
  int pp = 1;
  int ranks() const { return tp * dp * pp; }
};

struct model_layout {
  model_kind kind = model_kind::mla;
  std::string name = "dsv32";
  int layers = 61;
  // MLA: bytes of the latent KV per token per layer (one buffer per layer).
  std::int64_t mla_bytes_per_token = 656;
  // Per-token state that moves with the KV in pages of its own, addressed by the destination's
  // state indices (DeepSeek-V3.2: the lightning indexer's keys, 128 fp8 values + an fp32 scale
  // per token per layer = 132 B). 0: none.
  std::int64_t state_bytes_per_token = 132;
  // MHA/GQA: kv heads and head dim; element size from the dtype; K and V buffers per layer.
  int kv_heads = 0;
  int head_dim = 0;
  int elem_size = 2;

  // Bytes of one head of one token in one of the K/V buffers (MHA only).
  std::int64_t head_bytes() const { return std::int64_t{head_dim} * elem_size; }
};

struct cluster_config {
  prefill_topology prefill;
  decode_topology decode;
  model_layout model;
  kv_dtype dtype = kv_dtype::fp8;
  int page_size = 64;
  bool cp_send_all = false;  // CP-parallel sending: every CP rank sends a share of the pages
};

// "tp=2,cp=4" -> fields set, others unchanged. Unknown keys or bad numbers throw config_error.
prefill_topology parse_prefill(const std::string& spec);
decode_topology parse_decode(const std::string& spec);
kv_dtype parse_dtype(const std::string& text);
// "dsv32" | "mla:L:BYTES" | "mha:L:KV_HEADS:HEAD_DIM" (MHA element size from dtype).
model_layout parse_model(const std::string& text, kv_dtype dtype);

const char* to_string(kv_dtype d);
std::string describe(const model_layout& m);

// Checks every rule of semantics.md section 4 the routing plan relies on; throws config_error.
void validate(const cluster_config& c);

}  // namespace kvflow::config
