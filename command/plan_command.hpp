#pragma once
// `kvflow plan`: every rank's routing plan (config/routing.hpp), as a user checks it before a
// deployment: which prefill ranks each decode rank reads, required destinations and responses,
// authoritative ranks, CP page shares, PP layer ranges and MHA head slices. No CAF types.
#include <string>

#include "config/routing.hpp"

namespace kvflow::command {

// Human-readable: a topology line, then one compact block per prefill rank and per decode rank.
std::string plan_text(const config::routing_plan& plan);
// The same as a JSON document: {"topology": {...}, "prefill_ranks": [...], "decode_ranks": [...]}.
std::string plan_json(const config::routing_plan& plan);

// Builds the plan of `c` (throws config_error for an invalid topology), prints it on stdout as
// text or JSON, and returns the exit code (0).
int run_plan(const config::cluster_config& c, bool json);

}  // namespace kvflow::command
