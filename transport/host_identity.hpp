#pragma once
// Which machine this process runs on, as same-host transports compare it: the kernel's boot id
// (differs across hosts and reboots). Empty when it cannot be read.
#include <string>

namespace kvflow::transport {

std::string boot_id();

}  // namespace kvflow::transport
