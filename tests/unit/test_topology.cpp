// config/topology.hpp: parsing of topology specs, dtype and model layouts, and validate().
#include <doctest/doctest.h>

#include "config/topology.hpp"
#include "unit_helpers.hpp"

using namespace kvflow::config;

namespace {

// A config that passes validate(): each case then breaks exactly one rule.
cluster_config valid_mla() {
  cluster_config c;
  c.prefill.tp = 4;
  c.prefill.cp = 2;
  c.prefill.pp = 2;
  c.decode.tp = 2;
  c.decode.pp = 2;
  return c;
}

cluster_config valid_mha() {
  cluster_config c;
  c.model = parse_model("mha:32:8:128", kv_dtype::bf16);
  c.dtype = kv_dtype::bf16;
  c.prefill.tp = 2;
  c.decode.tp = 4;
  return c;
}

}  // namespace

TEST_CASE("topology: parse_prefill sets the named fields and leaves the others") {
  auto t = parse_prefill("tp=2,cp=4");
  CHECK(t.tp == 2);
  CHECK(t.cp == 4);
  CHECK(t.pp == 1);
  CHECK(t.dp == 1);
  CHECK(t.ranks() == 8);

  auto all = parse_prefill("dp=3,pp=2,cp=8,tp=8");
  CHECK(all.tp == 8);
  CHECK(all.cp == 8);
  CHECK(all.pp == 2);
  CHECK(all.dp == 3);
  CHECK(all.ranks() == 384);

  // A repeated key: the last one wins (plain left-to-right assignment).
  CHECK(parse_prefill("tp=2,tp=4").tp == 4);
}

TEST_CASE("topology: parse_prefill rejects bad specs with a one-line error naming the field") {
  KVFLOW_CHECK_CONFIG_ERROR(parse_prefill("tp=2,xp=4"), "prefill.xp");
  KVFLOW_CHECK_CONFIG_ERROR(parse_prefill("tp=two"), "prefill.tp");
  KVFLOW_CHECK_CONFIG_ERROR(parse_prefill("tp=2.5"), "prefill.tp");
  KVFLOW_CHECK_CONFIG_ERROR(parse_prefill("tp=2x"), "prefill.tp");
  KVFLOW_CHECK_CONFIG_ERROR(parse_prefill("tp="), "prefill.tp");
  KVFLOW_CHECK_CONFIG_ERROR(parse_prefill("cp=0"), "prefill.cp");
  KVFLOW_CHECK_CONFIG_ERROR(parse_prefill("pp=-1"), "prefill.pp");
  KVFLOW_CHECK_CONFIG_ERROR(parse_prefill("dp=-3"), "prefill.dp");
  KVFLOW_CHECK_CONFIG_ERROR(parse_prefill("tp=99999999999999999999"), "prefill.tp");
  KVFLOW_CHECK_CONFIG_ERROR(parse_prefill("tp=5000"), "prefill.tp");  // above the 4096 cap
  KVFLOW_CHECK_CONFIG_ERROR(parse_prefill("tp"), "prefill");
  KVFLOW_CHECK_CONFIG_ERROR(parse_prefill(""), "prefill");
  KVFLOW_CHECK_CONFIG_ERROR(parse_prefill("tp=2,"), "prefill");

  // The unknown-key message lists the keys that are known.
  auto what = kvflow::unit::config_error_of([] { parse_prefill("xp=4"); });
  CHECK(what.find("tp") != std::string::npos);
  CHECK(what.find("cp") != std::string::npos);
  // The zero message says what the bound is.
  CHECK(kvflow::unit::config_error_of([] { parse_prefill("cp=0"); }).find(">= 1") !=
        std::string::npos);
}

TEST_CASE("topology: parse_decode accepts tp/dp/pp and cp=1 only") {
  auto t = parse_decode("tp=4,dp=2,pp=2");
  CHECK(t.tp == 4);
  CHECK(t.dp == 2);
  CHECK(t.pp == 2);
  CHECK(t.ranks() == 16);
  CHECK(parse_decode("tp=8,cp=1").tp == 8);

  KVFLOW_CHECK_CONFIG_ERROR(parse_decode("tp=2,cp=2"), "decode.cp");
  KVFLOW_CHECK_CONFIG_ERROR(parse_decode("cp=0"), "decode.cp");
  KVFLOW_CHECK_CONFIG_ERROR(parse_decode("tp=0"), "decode.tp");
  KVFLOW_CHECK_CONFIG_ERROR(parse_decode("tp=-2"), "decode.tp");
  KVFLOW_CHECK_CONFIG_ERROR(parse_decode("tp=abc"), "decode.tp");
  KVFLOW_CHECK_CONFIG_ERROR(parse_decode("ep=2"), "decode.ep");
  KVFLOW_CHECK_CONFIG_ERROR(parse_decode(""), "decode");
}

TEST_CASE("topology: parse_dtype") {
  CHECK(parse_dtype("bf16") == kv_dtype::bf16);
  CHECK(parse_dtype("fp8") == kv_dtype::fp8);
  CHECK(std::string(to_string(kv_dtype::bf16)) == "bf16");
  CHECK(std::string(to_string(kv_dtype::fp8)) == "fp8");
  KVFLOW_CHECK_CONFIG_ERROR(parse_dtype("fp16"), "dtype");
  KVFLOW_CHECK_CONFIG_ERROR(parse_dtype(""), "dtype");
}

TEST_CASE("topology: parse_model dsv32 has 61 layers and 656 B (fp8) / 1152 B (bf16)") {
  auto fp8 = parse_model("dsv32", kv_dtype::fp8);
  CHECK(fp8.kind == model_kind::mla);
  CHECK(fp8.layers == 61);
  CHECK(fp8.mla_bytes_per_token == 656);
  CHECK(describe(fp8) == "dsv32");

  auto bf16 = parse_model("dsv32", kv_dtype::bf16);
  CHECK(bf16.kind == model_kind::mla);
  CHECK(bf16.layers == 61);
  CHECK(bf16.mla_bytes_per_token == 1152);  // 576 values x 2 B
}

TEST_CASE("topology: parse_model mla:L:BYTES and mha:L:H:D") {
  auto mla = parse_model("mla:27:1024", kv_dtype::fp8);
  CHECK(mla.kind == model_kind::mla);
  CHECK(mla.layers == 27);
  CHECK(mla.mla_bytes_per_token == 1024);

  auto mha16 = parse_model("mha:32:8:128", kv_dtype::bf16);
  CHECK(mha16.kind == model_kind::mha);
  CHECK(mha16.layers == 32);
  CHECK(mha16.kv_heads == 8);
  CHECK(mha16.head_dim == 128);
  CHECK(mha16.elem_size == 2);
  CHECK(mha16.head_bytes() == 256);

  auto mha8 = parse_model("mha:32:8:128", kv_dtype::fp8);
  CHECK(mha8.elem_size == 1);
  CHECK(mha8.head_bytes() == 128);
}

TEST_CASE("topology: parse_model rejects malformed layouts") {
  KVFLOW_CHECK_CONFIG_ERROR(parse_model("llama", kv_dtype::fp8), "model");
  KVFLOW_CHECK_CONFIG_ERROR(parse_model("", kv_dtype::fp8), "model");
  KVFLOW_CHECK_CONFIG_ERROR(parse_model("mla:61", kv_dtype::fp8), "model");
  KVFLOW_CHECK_CONFIG_ERROR(parse_model("mla:61:656:1:2", kv_dtype::fp8), "model");
  KVFLOW_CHECK_CONFIG_ERROR(parse_model("mla:61:656:0", kv_dtype::fp8), "model.state_bytes");
  KVFLOW_CHECK_CONFIG_ERROR(parse_model("mla:x:656", kv_dtype::fp8), "model.layers");
  KVFLOW_CHECK_CONFIG_ERROR(parse_model("mla:0:656", kv_dtype::fp8), "model.layers");
  KVFLOW_CHECK_CONFIG_ERROR(parse_model("mla:61:-656", kv_dtype::fp8), "model.bytes");
  KVFLOW_CHECK_CONFIG_ERROR(parse_model("mha:32:8", kv_dtype::fp8), "model");
  KVFLOW_CHECK_CONFIG_ERROR(parse_model("mha:32:8:128:1", kv_dtype::fp8), "model");
  KVFLOW_CHECK_CONFIG_ERROR(parse_model("mha:32:0:128", kv_dtype::fp8), "model.kv_heads");
  KVFLOW_CHECK_CONFIG_ERROR(parse_model("mha:32:8:", kv_dtype::fp8), "model.head_dim");
  KVFLOW_CHECK_CONFIG_ERROR(parse_model("mha:-1:8:128", kv_dtype::fp8), "model.layers");
}

TEST_CASE("topology: MLA state bytes: dsv32 carries its indexer cache, mla:L:B:S sets it, MHA has none") {
  CHECK(parse_model("dsv32", kv_dtype::fp8).state_bytes_per_token == 132);
  CHECK(parse_model("dsv32", kv_dtype::bf16).state_bytes_per_token == 132);
  CHECK(parse_model("mla:61:656", kv_dtype::fp8).state_bytes_per_token == 0);
  CHECK(parse_model("mla:61:656:132", kv_dtype::fp8).state_bytes_per_token == 132);
  CHECK(parse_model("mha:32:8:128", kv_dtype::fp8).state_bytes_per_token == 0);
}

TEST_CASE("topology: validate accepts valid configurations") {
  CHECK_NOTHROW(validate(cluster_config{}));
  CHECK_NOTHROW(validate(valid_mla()));
  CHECK_NOTHROW(validate(valid_mha()));
  auto c = valid_mla();
  c.decode.pp = 1;  // decode pp 1 reads every prefill stage
  CHECK_NOTHROW(validate(c));
  c.decode.tp = 8;  // a multiple of prefill tp
  CHECK_NOTHROW(validate(c));
  c.model.layers = 2;
  c.prefill.pp = 2;  // pp == layers is allowed
  CHECK_NOTHROW(validate(c));
}

TEST_CASE("topology: validate rejects every broken rule with a one-line error naming the field") {
  SUBCASE("decode tp neither divides nor is divisible by prefill tp") {
    auto c = valid_mla();
    c.prefill.tp = 4;
    c.decode.tp = 6;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "decode.tp");
    c.prefill.tp = 3;
    c.decode.tp = 2;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "decode.tp");
  }
  SUBCASE("decode pp not equal to prefill pp and not 1") {
    auto c = valid_mla();
    c.prefill.pp = 4;
    c.decode.pp = 2;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "decode.pp");
    c.prefill.pp = 1;
    c.decode.pp = 2;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "decode.pp");
  }
  SUBCASE("prefill pp above the number of layers") {
    auto c = valid_mla();
    c.model.layers = 3;
    c.prefill.pp = 4;
    c.decode.pp = 1;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "prefill.pp");
  }
  SUBCASE("MHA kv heads not divisible by prefill tp") {
    auto c = valid_mha();
    c.model.kv_heads = 6;
    c.prefill.tp = 4;
    c.decode.tp = 2;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "model.kv_heads");
  }
  SUBCASE("MHA kv heads not divisible by decode tp") {
    auto c = valid_mha();
    c.model.kv_heads = 6;
    c.prefill.tp = 2;
    c.decode.tp = 4;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "model.kv_heads");
  }
  SUBCASE("MHA zero heads or head dim") {
    auto c = valid_mha();
    c.model.kv_heads = 0;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "model.kv_heads");
    c = valid_mha();
    c.model.head_dim = 0;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "model.head_dim");
  }
  SUBCASE("MLA zero bytes per token") {
    auto c = valid_mla();
    c.model.mla_bytes_per_token = 0;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "model.bytes");
  }
  SUBCASE("page size 0 or negative") {
    auto c = valid_mla();
    c.page_size = 0;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "page_size");
    c.page_size = -64;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "page_size");
  }
  SUBCASE("zero or negative sizes") {
    auto c = valid_mla();
    c.prefill.tp = 0;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "prefill.tp");
    c = valid_mla();
    c.prefill.cp = -1;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "prefill.cp");
    c = valid_mla();
    c.prefill.pp = 0;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "prefill.pp");
    c = valid_mla();
    c.prefill.dp = 0;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "prefill.dp");
    c = valid_mla();
    c.decode.tp = 0;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "decode.tp");
    c = valid_mla();
    c.decode.dp = 0;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "decode.dp");
    c = valid_mla();
    c.decode.pp = 0;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "decode.pp");
    c = valid_mla();
    c.model.layers = 0;
    KVFLOW_CHECK_CONFIG_ERROR(validate(c), "model.layers");
  }
}

// ---- Regressions: each failed before its fix. -----------------------------------------------

// topology.hpp promises a ONE-line what(); input echoed with a newline (e.g. pasted from a
// file) must not break it: control characters come out escaped.
TEST_CASE("config_error escapes echoed control characters to stay one line") {
  KVFLOW_CHECK_CONFIG_ERROR(parse_prefill("tp=2\n"), "prefill.tp");
  KVFLOW_CHECK_CONFIG_ERROR(parse_decode("tp=2,\ncp=1"), "decode.\\x0acp");
  KVFLOW_CHECK_CONFIG_ERROR(parse_model("mla:61:656\n", kv_dtype::fp8), "model.bytes");
}

// validate() must refuse sizes whose product overflows int: ranks() (an int product) is then
// undefined behaviour, and routing_plan sizes its vectors with it.
TEST_CASE("validate refuses a topology whose rank count overflows int") {
  cluster_config c;
  c.prefill = parse_prefill("tp=4096,cp=4096,dp=4096");  // 2^36 ranks
  c.decode = parse_decode("tp=4096");
  CHECK_THROWS_AS(validate(c), config_error);
}
