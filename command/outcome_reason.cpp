#include "command/outcome_reason.hpp"

namespace kvflow::command {

bool echoes_group(const std::string& why) { return why.find("another rank of the") != std::string::npos; }

bool replaces_reason(const std::string& kept, const std::string& candidate) {
  if (candidate.empty()) return false;
  return kept.empty() || (echoes_group(kept) && !echoes_group(candidate));
}

}  // namespace kvflow::command
