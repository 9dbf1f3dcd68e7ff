#include "command/simulation.hpp"

#include "command/memory_check.hpp"

#include <algorithm>
#include <stdexcept>

namespace kvflow::command {

fault_spec parse_fault(const std::string& text) {
  auto bad = [&](const std::string& why) -> config::config_error { return config::config_error("fault: '" + text + "' " + why); };
  fault_spec f;
  f.text = text;
  auto at = text.rfind('@');
  if (at == std::string::npos) throw bad("has no @N");
  std::string head = text.substr(0, at), n = text.substr(at + 1);
  try {
    std::size_t used = 0;
    f.at = std::stoi(n, &used);
    if (used != n.size() || f.at < 1) throw bad("needs @N with N >= 1");
  } catch (const std::logic_error&) {
    throw bad("needs @N with N >= 1");
  }
  auto rank_after = [&](const std::string& prefix) {
    std::string r = head.substr(prefix.size());
    try {
      std::size_t used = 0;
      f.rank = std::stoi(r, &used);
      if (used != r.size() || f.rank < 0) throw bad("needs a rank >= 0");
    } catch (const std::logic_error&) {
      throw bad("needs a rank >= 0");
    }
  };
  if (head.rfind("kill:prefill:", 0) == 0) {
    f.what = fault_spec::kind::kill_prefill;
    rank_after("kill:prefill:");
  } else if (head.rfind("kill:decode:", 0) == 0) {
    f.what = fault_spec::kind::kill_decode;
    rank_after("kill:decode:");
  } else if (head.rfind("freeze:prefill:", 0) == 0) {
    f.what = fault_spec::kind::freeze_prefill;
    rank_after("freeze:prefill:");
  } else if (head.rfind("freeze:decode:", 0) == 0) {
    f.what = fault_spec::kind::freeze_decode;
    rank_after("freeze:decode:");
  } else if (head == "restart:bootstrap") {
    f.what = fault_spec::kind::restart_bootstrap;
  } else if (head == "kill:bootstrap") {
    f.what = fault_spec::kind::kill_bootstrap;
  } else if (head == "freeze:bootstrap") {
    f.what = fault_spec::kind::freeze_bootstrap;
  } else if (head == "abort:decode") {
    f.what = fault_spec::kind::abort_decode;
  } else if (head == "abort-in-transfer:decode") {
    f.what = fault_spec::kind::abort_decode_in_transfer;
  } else if (head == "drop-dst-info") {
    f.what = fault_spec::kind::drop_dst_info;
  } else if (head == "corrupt") {
    f.what = fault_spec::kind::corrupt;
  } else if (head == "dup-room") {
    f.what = fault_spec::kind::duplicate_room;
  } else {
    throw bad("is not kill:prefill:R@N, kill:decode:R@N, freeze:prefill:R@N, freeze:decode:R@N, "
              "restart:bootstrap@N, kill:bootstrap@N, freeze:bootstrap@N, abort:decode@N, abort-in-transfer:decode@N, drop-dst-info@N, corrupt@N or dup-room@N");
  }
  return f;
}

void validate(const simulation_options& o) {
  config::validate(o.cluster);
  auto need = [](bool ok, const std::string& field, const std::string& why) {
    if (!ok) throw config::config_error(field + ": " + why);
  };
  need(o.requests >= 1, "requests", "must be >= 1");
  need(o.prompt_min >= 1 && o.prompt_max >= o.prompt_min, "prompt-tokens",
       "needs 1 <= N <= M");
  need(o.chunk_tokens >= 1, "chunk-tokens", "must be >= 1");
  need(o.concurrency >= 1, "concurrency", "must be >= 1");
  need(o.deadline_s > 0, "deadline", "must be > 0");
  need(o.soak_s >= 0, "soak", "must be >= 0");
  need(o.soak_fault_every >= 1, "soak-fault-every", "must be >= 1");
  need(o.soak_s == 0 || o.interleave_seed == 0, "soak", "needs real threads, not --interleave");
  need(!o.delay_transfers || o.interleave_seed != 0, "delay-transfers", "needs --interleave (the run lands the held pushes)");
  need(!o.delay_transfers || o.transport == "inproc", "delay-transfers", "needs --transport inproc");
  need(o.transport == "inproc" || o.transport == "ucx", "transport",
       "'" + o.transport + "' is not inproc or ucx");
  need(!o.processes || o.transport == "ucx", "transport",
       "'" + o.transport + "' cannot cross processes (use ucx)");
  need(!o.processes || o.interleave_seed == 0, "interleave", "needs one process (kvflow simulate)");
  // Each rank's pool holds the pages of the requests in flight; refuse what cannot be mapped.
  {
    const auto& c = o.cluster;
    const auto& m = c.model;
    const double item = m.kind == config::model_kind::mla
                            ? double(c.page_size) * double(m.mla_bytes_per_token)
                            : double(c.page_size) * double(m.kv_heads) * double(m.head_bytes()) * 2;
    const double pages = double(std::min(o.concurrency, o.requests)) *
                         ((double(o.prompt_max) + c.page_size - 1) / c.page_size);
    const double bytes = pages * item * double(m.layers);
    need(bytes <= double(std::uint64_t{1} << 40), "concurrency",
         "pools for " + std::to_string(std::min(o.concurrency, o.requests)) + " requests of " +
             std::to_string(o.prompt_max) + " tokens need " + std::to_string(bytes / double(1ULL << 30)) +
             " GiB per rank (limit 1 TiB)");
  }
  for (const auto& f : o.faults) {
    using k = fault_spec::kind;
    const bool process_fault = f.what == k::freeze_prefill || f.what == k::freeze_decode ||
                               f.what == k::restart_bootstrap || f.what == k::kill_bootstrap ||
                               f.what == k::freeze_bootstrap;
    need(!process_fault || o.processes, "fault", "'" + f.text + "' needs rank processes (kvflow launch)");
    if (f.what == fault_spec::kind::kill_prefill || f.what == fault_spec::kind::freeze_prefill)
      need(f.rank < o.cluster.prefill.ranks(), "fault", "'" + f.text + "' names prefill rank " +
                                                           std::to_string(f.rank) + " of " +
                                                           std::to_string(o.cluster.prefill.ranks()));
    if (f.what == fault_spec::kind::kill_decode || f.what == fault_spec::kind::freeze_decode)
      need(f.rank < o.cluster.decode.ranks(), "fault", "'" + f.text + "' names decode rank " +
                                                          std::to_string(f.rank) + " of " +
                                                          std::to_string(o.cluster.decode.ranks()));
  }
  // The pages a run touches must fit in this machine's memory (checked last: it depends on the
  // machine, not on the options alone).
  check_pool_memory(o, available_memory_bytes());
}

}  // namespace kvflow::command
