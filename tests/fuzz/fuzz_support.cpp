#include "tests/fuzz/fuzz_support.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "actors/messages.hpp"

namespace kvflow::fuzz {

void fail(const std::string& what) {
  std::fprintf(stderr, "kvflow fuzz: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

caf::actor_system& system() {
  // The testing scheduler runs no threads: nothing runs behind an input's back, and nothing is
  // left running while the process exits.
  static auto* sys = [] {
    auto* cfg = new caf::actor_system_config;
    cfg->set("scheduler.policy", caf::atom("testing"));
    cfg->set("logger.file-verbosity", caf::atom("quiet"));
    cfg->set("logger.console-verbosity", caf::atom("quiet"));
    msg::add_message_types(*cfg);
    return new caf::actor_system(*cfg);
  }();
  return *sys;
}

caf::actor some_actor() {
  static auto* a = new caf::actor(system().spawn([]() -> caf::behavior { return {[](std::int32_t) {}}; }));
  return *a;
}

}  // namespace kvflow::fuzz

namespace {

// `--make-corpus DIR`: writes the target's seeds to DIR/seed-NN (replacing the seeds there) and
// exits instead of fuzzing.
void make_corpus(const char* dir) {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  std::vector<fs::path> old;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().rfind("seed-", 0) == 0) old.push_back(e.path());
  for (const auto& p : old) fs::remove(p);
  const auto seeds = kvflow::fuzz::seeds();
  for (std::size_t i = 0; i < seeds.size(); ++i) {
    char name[32];
    std::snprintf(name, sizeof name, "seed-%02zu", i);
    std::ofstream out(fs::path(dir) / name, std::ios::binary);
    out.write(seeds[i].data(), static_cast<std::streamsize>(seeds[i].size()));
    if (!out) kvflow::fuzz::fail(std::string("cannot write ") + dir + "/" + name);
  }
  std::printf("%zu seeds in %s\n", seeds.size(), dir);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  for (int i = 1; i + 1 < *argc; ++i)
    if (std::strcmp((*argv)[i], "--make-corpus") == 0) {
      make_corpus((*argv)[i + 1]);
      std::fflush(stdout);
      std::_Exit(0);
    }
  return 0;
}
