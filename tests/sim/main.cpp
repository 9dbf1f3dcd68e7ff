#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include <spdlog/spdlog.h>

int main(int argc, char** argv) {
  // Faults make ranks log errors by design; keep the test output to the test's own findings.
  spdlog::set_level(spdlog::level::off);
  return doctest::Context(argc, argv).run();
}
