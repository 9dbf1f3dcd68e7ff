// Which rank's failure reason a request's outcome in the report keeps.
#pragma once

#include <string>

namespace kvflow::command {

// A reason that only says another rank of the group ended the request (the library words every
// such echo "another rank of the ..."): it names no cause of its own.
bool echoes_group(const std::string& why);

// Whether `candidate`, reported after `kept`, replaces it: the first reason a rank gave is kept,
// unless it only echoes the group and the candidate does not.
bool replaces_reason(const std::string& kept, const std::string& candidate);

}  // namespace kvflow::command
