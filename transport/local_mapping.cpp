#include "transport/local_mapping.hpp"

#include <cinttypes>
#include <cstdio>
#include <memory>
#include <string>

namespace kvflow::transport {

result<mapping_extent> mapping_of(const void* address) {
  const auto at = reinterpret_cast<std::uintptr_t>(address);
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> maps(std::fopen("/proc/self/maps", "r"), &std::fclose);
  if (!maps) return status::error("cannot read /proc/self/maps");
  // Each line starts "begin-end " in hexadecimal; the rest of it (up to a path) is skipped.
  std::uintmax_t begin = 0, end = 0;
  while (std::fscanf(maps.get(), "%jx-%jx", &begin, &end) == 2) {
    if (at >= begin && at < end) return mapping_extent{static_cast<std::uintptr_t>(begin), static_cast<std::uintptr_t>(end)};
    int c = 0;
    while ((c = std::fgetc(maps.get())) != EOF && c != '\n') {
    }
  }
  char hex[2 + 2 * sizeof at + 1];
  std::snprintf(hex, sizeof hex, "0x%" PRIxPTR, at);
  return status::error(std::string("no mapping of this process holds address ") + hex);
}

}  // namespace kvflow::transport
