#include "actors/handshake.hpp"

namespace kvflow {

kv_handshake handshake_of(const config::cluster_config& c) {
  kv_handshake h;
  h.page_size = c.page_size;
  h.dtype = config::to_string(c.dtype);
  h.layout = config::describe(c.model);
  h.cp_send_all = c.cp_send_all;
  h.prefill_tp = c.prefill.tp;
  h.prefill_cp = c.prefill.cp;
  h.prefill_pp = c.prefill.pp;
  h.prefill_dp = c.prefill.dp;
  h.decode_tp = c.decode.tp;
  h.decode_pp = c.decode.pp;
  h.decode_dp = c.decode.dp;
  return h;
}

namespace {

template <class T>
std::string differs(const char* what, const T& there, const T& here) {
  if (there == here) return {};
  auto text = [](const auto& v) {
    if constexpr (std::is_same_v<std::decay_t<decltype(v)>, std::string>)
      return v;
    else
      return std::to_string(v);
  };
  return std::string(what) + " " + text(there) + " there, " + text(here) + " here";
}

}  // namespace

std::string handshake_mismatch(const kv_handshake& mine, const kv_handshake& theirs) {
  const auto send_mode = [](bool all) { return std::string(all ? "all" : "rank0"); };
  for (auto d : {differs("page size", theirs.page_size, mine.page_size),
                 differs("KV dtype", theirs.dtype, mine.dtype),
                 differs("KV layout", theirs.layout, mine.layout),
                 differs("CP send mode", send_mode(theirs.cp_send_all), send_mode(mine.cp_send_all)),
                 differs("prefill tp", theirs.prefill_tp, mine.prefill_tp),
                 differs("prefill cp", theirs.prefill_cp, mine.prefill_cp),
                 differs("prefill pp", theirs.prefill_pp, mine.prefill_pp),
                 differs("prefill dp", theirs.prefill_dp, mine.prefill_dp),
                 differs("decode tp", theirs.decode_tp, mine.decode_tp),
                 differs("decode pp", theirs.decode_pp, mine.decode_pp),
                 differs("decode dp", theirs.decode_dp, mine.decode_dp)})
    if (!d.empty()) return d;
  return {};
}

}  // namespace kvflow
