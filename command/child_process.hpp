#pragma once
// A process the launcher started: signals, its first stdout line, waiting for it. The child dies
// with the launcher (PR_SET_PDEATHSIG), so a crashed launcher leaves no rank running.
#include <sys/types.h>

#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include "config/status.hpp"

namespace kvflow::command {

class child_process {
 public:
  child_process() = default;
  child_process(child_process&& o) noexcept { *this = std::move(o); }
  child_process& operator=(child_process&& o) noexcept;
  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;
  ~child_process();  // SIGKILLs and reaps a child still running

  // Starts argv[0] (a path, or a name looked up in PATH) with argv and these extra environment variables. With
  // `capture_stdout`, the child's stdout is a pipe read_line() reads; else it is inherited. With
  // `pipe_stdin`, its stdin is a pipe write_line() writes (closed by close_input()); else inherited.
  static result<child_process> start(const std::vector<std::string>& argv,
                                     const std::vector<std::pair<std::string, std::string>>& env,
                                     bool capture_stdout, bool pipe_stdin = false);

  pid_t pid() const { return pid_; }
  bool running() const { return pid_ > 0; }
  bool signal(int sig) const;
  // One line of the child's stdout (without the newline), within `timeout`.
  result<std::string> read_line(std::chrono::milliseconds timeout);
  // Writes `line` and a newline to the child's stdin.
  status write_line(const std::string& line);
  // Closes the child's stdin (it reads end of file).
  void close_input();
  // Waits up to `timeout` for the child to exit: its exit code (128 + signal when killed), or
  // an error when it is still running.
  result<int> wait(std::chrono::milliseconds timeout);
  // SIGTERM, then SIGKILL after `grace`; the exit code.
  int stop(std::chrono::milliseconds grace);

 private:
  pid_t pid_ = -1;
  int out_fd_ = -1;
  int in_fd_ = -1;
  std::string buffered_;
};

// The running kvflow binary (to start bootstrap and rank processes of the same build).
std::string self_executable();

}  // namespace kvflow::command
