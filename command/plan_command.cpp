// `kvflow plan`: the routing plan of every rank, as text or JSON.
#include "command/plan_command.hpp"

#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

namespace kvflow::command {

namespace {

using nlohmann::json;

bool mha(const config::cluster_config& c) { return c.model.kind == config::model_kind::mha; }
bool cp_shares(const config::cluster_config& c) { return c.cp_send_all && c.prefill.cp > 1; }

// The global rank of a peer (coordinates inside a request's dp group) in each dp group.
std::vector<int> prefill_ranks_of(const config::cluster_config& c, const config::peer_read& p) {
  std::vector<int> out;
  for (int g = 0; g < c.prefill.dp; ++g) out.push_back(config::prefill_rank_of(c.prefill, {g, p.pp, p.cp, p.tp}));
  return out;
}
std::vector<int> decode_ranks_of(const config::cluster_config& c, const config::reader& r) {
  std::vector<int> out;
  for (int g = 0; g < c.decode.dp; ++g) out.push_back(config::decode_rank_of(c.decode, {g, r.pp, r.tp}));
  return out;
}

std::string range_text(const config::range& r) {
  return "[" + std::to_string(r.begin) + "," + std::to_string(r.end) + ")";
}

// "prefill rank 0 (dp 0)" or "prefill ranks 0 (dp 0), 32 (dp 1)".
std::string ranks_text(const char* side, const std::vector<int>& ranks) {
  std::string s = std::string(side) + (ranks.size() == 1 ? " rank " : " ranks ");
  for (std::size_t g = 0; g < ranks.size(); ++g) {
    if (g != 0) s += ", ";
    s += std::to_string(ranks[g]) + " (dp " + std::to_string(g) + ")";
  }
  return s;
}

std::string model_text(const config::cluster_config& c) {
  const auto& m = c.model;
  std::string s = config::describe(m) + " (" + (mha(c) ? "MHA" : "MLA") + ", " + std::to_string(m.layers) + " layers";
  if (mha(c)) s += ", " + std::to_string(m.kv_heads) + " kv heads x " + std::to_string(m.head_dim);
  return s + ")";
}

json range_json(const config::range& r) { return {{"begin", r.begin}, {"end", r.end}}; }

json cp_share_json(const config::cluster_config& c, int cp_rank) {
  if (!cp_shares(c)) return nullptr;
  return {{"cp_rank", cp_rank}, {"cp", c.prefill.cp},
          {"pages", "[n*" + std::to_string(cp_rank) + "/" + std::to_string(c.prefill.cp) + ", n*" +
                        std::to_string(cp_rank + 1) + "/" + std::to_string(c.prefill.cp) + ") of a request's n pages"}};
}

}  // namespace

std::string plan_text(const config::routing_plan& plan) {
  const auto& c = plan.config();
  const auto& P = c.prefill;
  const auto& D = c.decode;
  std::ostringstream out;
  out << "topology: prefill tp=" << P.tp << " cp=" << P.cp << " pp=" << P.pp << " dp=" << P.dp << " ("
      << plan.prefill_ranks() << " ranks), decode tp=" << D.tp << " dp=" << D.dp << " pp=" << D.pp << " ("
      << plan.decode_ranks() << " ranks); " << model_text(c) << " " << config::to_string(c.dtype) << ", page "
      << c.page_size << ", cp-send " << (c.cp_send_all ? "all" : "rank0") << "\n"
      << "Peers and readers are coordinates inside the request's dp group; '->' gives their global rank in each dp "
         "group.\n";

  for (int r = 0; r < plan.prefill_ranks(); ++r) {
    const auto& p = plan.prefill(r);
    out << "\nprefill rank " << r << ": dp=" << p.coord.dp << " pp=" << p.coord.pp << " cp=" << p.coord.cp
        << " tp=" << p.coord.tp << "\n  "
        << (p.authoritative ? "authoritative" : "non-authoritative (no decode rank reads it)")
        << ", required_dst_info_num " << p.required_dst_info_num << ", layers " << range_text(p.layers);
    if (mha(c)) out << ", local_heads " << p.local_heads;
    out << "\n";
    for (const auto& rd : p.readers)
      out << "  reader: decode pp=" << rd.pp << " tp=" << rd.tp << " -> " << ranks_text("decode", decode_ranks_of(c, rd))
          << "\n";
    if (cp_shares(c) && p.authoritative)
      out << "  cp share: pages [n*" << p.coord.cp << "/" << P.cp << ", n*" << p.coord.cp + 1 << "/" << P.cp
          << ") of a request's n pages\n";
  }

  for (int r = 0; r < plan.decode_ranks(); ++r) {
    const auto& d = plan.decode(r);
    out << "\ndecode rank " << r << ": dp=" << d.coord.dp << " pp=" << d.coord.pp << " tp=" << d.coord.tp << "\n"
        << "  required_prefill_response_num " << d.required_prefill_response_num << ", "
        << (d.expects_aux ? "expects aux" : "no aux") << ", layers " << range_text(d.layers);
    if (mha(c)) out << ", local_heads " << d.local_heads;
    out << "\n";
    for (const auto& pe : d.peers) {
      out << "  reads prefill pp=" << pe.pp << " cp=" << pe.cp << " tp=" << pe.tp << " layers " << range_text(pe.layers);
      if (mha(c))
        out << " heads " << range_text({pe.heads.src_begin, pe.heads.src_begin + pe.heads.count}) << " -> local heads "
            << range_text({pe.heads.dst_begin, pe.heads.dst_begin + pe.heads.count});
      if (pe.cp_share) out << " cp-share";
      if (pe.writes_aux) out << " writes-aux";
      out << " -> " << ranks_text("prefill", prefill_ranks_of(c, pe)) << "\n";
    }
  }
  return out.str();
}

std::string plan_json(const config::routing_plan& plan) {
  const auto& c = plan.config();
  json j;
  j["topology"] = {
      {"prefill", {{"tp", c.prefill.tp}, {"cp", c.prefill.cp}, {"pp", c.prefill.pp}, {"dp", c.prefill.dp},
                   {"ranks", plan.prefill_ranks()}}},
      {"decode", {{"tp", c.decode.tp}, {"dp", c.decode.dp}, {"pp", c.decode.pp}, {"ranks", plan.decode_ranks()}}},
      {"model", config::describe(c.model)},
      {"model_kind", mha(c) ? "mha" : "mla"},
      {"layers", c.model.layers},
      {"dtype", config::to_string(c.dtype)},
      {"page_size", c.page_size},
      {"cp_send", c.cp_send_all ? "all" : "rank0"},
      {"buffers_per_layer", plan.buffers_per_layer()},
      {"prefill_item_bytes", plan.prefill_item_bytes()},
      {"decode_item_bytes", plan.decode_item_bytes()}};
  if (mha(c)) {
    j["topology"]["kv_heads"] = c.model.kv_heads;
    j["topology"]["head_dim"] = c.model.head_dim;
  }

  json prefill = json::array();
  for (int r = 0; r < plan.prefill_ranks(); ++r) {
    const auto& p = plan.prefill(r);
    json readers = json::array();
    for (const auto& rd : p.readers)
      readers.push_back({{"pp", rd.pp}, {"tp", rd.tp}, {"decode_ranks", decode_ranks_of(c, rd)}});
    json e = {{"rank", r},
              {"dp", p.coord.dp},
              {"pp", p.coord.pp},
              {"cp", p.coord.cp},
              {"tp", p.coord.tp},
              {"authoritative", p.authoritative},
              {"required_dst_info_num", p.required_dst_info_num},
              {"readers", std::move(readers)},
              {"layers", range_json(p.layers)},
              {"local_heads", p.local_heads},
              {"cp_share", p.authoritative ? cp_share_json(c, p.coord.cp) : json(nullptr)}};
    prefill.push_back(std::move(e));
  }
  j["prefill_ranks"] = std::move(prefill);

  json decode = json::array();
  for (int r = 0; r < plan.decode_ranks(); ++r) {
    const auto& d = plan.decode(r);
    json peers = json::array();
    for (const auto& pe : d.peers) {
      json e = {{"pp", pe.pp},
                {"cp", pe.cp},
                {"tp", pe.tp},
                {"prefill_ranks", prefill_ranks_of(c, pe)},
                {"layers", range_json(pe.layers)},
                {"cp_share", pe.cp_share},
                {"writes_aux", pe.writes_aux}};
      e["heads"] = mha(c) ? json{{"src_begin", pe.heads.src_begin}, {"dst_begin", pe.heads.dst_begin},
                                 {"count", pe.heads.count}}
                          : json(nullptr);
      peers.push_back(std::move(e));
    }
    json e = {{"rank", r},
              {"dp", d.coord.dp},
              {"pp", d.coord.pp},
              {"tp", d.coord.tp},
              {"peers", std::move(peers)},
              {"required_prefill_response_num", d.required_prefill_response_num},
              {"expects_aux", d.expects_aux},
              {"layers", range_json(d.layers)},
              {"local_heads", d.local_heads}};
    decode.push_back(std::move(e));
  }
  j["decode_ranks"] = std::move(decode);
  return j.dump(2) + "\n";
}

int run_plan(const config::cluster_config& c, bool json) {
  config::routing_plan plan(c);  // validates: config_error for an invalid topology
  const std::string s = json ? plan_json(plan) : plan_text(plan);
  std::fwrite(s.data(), 1, s.size(), stdout);
  std::fflush(stdout);
  return std::ferror(stdout) ? 1 : 0;
}

}  // namespace kvflow::command
