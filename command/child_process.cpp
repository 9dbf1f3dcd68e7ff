#include "command/child_process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <thread>

namespace kvflow::command {

child_process& child_process::operator=(child_process&& o) noexcept {
  if (this != &o) {
    std::swap(pid_, o.pid_);
    std::swap(out_fd_, o.out_fd_);
    std::swap(in_fd_, o.in_fd_);
    std::swap(buffered_, o.buffered_);
  }
  return *this;
}

child_process::~child_process() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  if (out_fd_ >= 0) ::close(out_fd_);
  close_input();
}

result<child_process> child_process::start(const std::vector<std::string>& argv,
                                           const std::vector<std::pair<std::string, std::string>>& env,
                                           bool capture_stdout, bool pipe_stdin) {
  if (argv.empty()) return status::error("start: empty command");
  int fds[2] = {-1, -1}, in[2] = {-1, -1};
  if (capture_stdout && ::pipe2(fds, O_CLOEXEC) != 0)
    return status::error(std::string("pipe: ") + std::strerror(errno));
  if (pipe_stdin && ::pipe2(in, O_CLOEXEC) != 0) {
    const std::string why = std::string("pipe: ") + std::strerror(errno);
    for (int fd : fds)
      if (fd >= 0) ::close(fd);
    return status::error(why);
  }
  // Everything the child needs is prepared before fork: after it, only async-signal-safe calls.
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) return status::error(std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);  // the launcher died before prctl took effect
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    if (capture_stdout) ::dup2(fds[1], STDOUT_FILENO);
    if (pipe_stdin) ::dup2(in[0], STDIN_FILENO);
    for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  child_process c;
  c.pid_ = pid;
  if (capture_stdout) {
    ::close(fds[1]);
    c.out_fd_ = fds[0];
  }
  if (pipe_stdin) {
    ::close(in[0]);
    c.in_fd_ = in[1];
  }
  return c;
}

bool child_process::signal(int sig) const { return pid_ > 0 && ::kill(pid_, sig) == 0; }

result<std::string> child_process::read_line(std::chrono::milliseconds timeout) {
  if (out_fd_ < 0) return status::error("stdout not captured");
  auto until = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (auto nl = buffered_.find('\n'); nl != std::string::npos) {
      std::string line = buffered_.substr(0, nl);
      buffered_.erase(0, nl + 1);
      return line;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
    if (left.count() <= 0) return status::error("no line within " + std::to_string(timeout.count()) + " ms");
    pollfd p{out_fd_, POLLIN, 0};
    int n = ::poll(&p, 1, static_cast<int>(left.count()));
    if (n < 0 && errno != EINTR) return status::error(std::string("poll: ") + std::strerror(errno));
    if (n <= 0) continue;
    char buf[512];
    auto got = ::read(out_fd_, buf, sizeof buf);
    if (got == 0) return status::error("the process closed its output");
    if (got > 0) buffered_.append(buf, static_cast<std::size_t>(got));
  }
}

status child_process::write_line(const std::string& line) {
  if (in_fd_ < 0) return status::error("stdin not piped");
  const std::string all = line + "\n";
  for (std::size_t at = 0; at < all.size();) {
    auto n = ::write(in_fd_, all.data() + at, all.size() - at);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return status::error(std::string("write to the process: ") + std::strerror(errno));
    at += static_cast<std::size_t>(n);
  }
  return {};
}

void child_process::close_input() {
  if (in_fd_ >= 0) ::close(in_fd_);
  in_fd_ = -1;
}

result<int> child_process::wait(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return status::error("not running");
  auto until = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    int st = 0;
    pid_t r = ::waitpid(pid_, &st, WNOHANG);
    if (r == pid_) {
      pid_ = -1;
      return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    }
    if (r < 0 && errno != EINTR) return status::error(std::string("waitpid: ") + std::strerror(errno));
    if (std::chrono::steady_clock::now() >= until) return status::error("still running");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

int child_process::stop(std::chrono::milliseconds grace) {
  if (pid_ <= 0) return 0;
  signal(SIGCONT);  // a frozen child cannot act on SIGTERM
  signal(SIGTERM);
  if (auto code = wait(grace)) return code.value();
  signal(SIGKILL);
  auto code = wait(std::chrono::seconds(10));
  return code ? code.value() : -1;
}

std::string self_executable() {
  char buf[PATH_MAX];
  auto n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return "kvflow";
  return std::string(buf, static_cast<std::size_t>(n));
}

}  // namespace kvflow::command
