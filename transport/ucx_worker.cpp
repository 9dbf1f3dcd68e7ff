#include "transport/ucx_worker.hpp"

#include <cstdlib>

#include <spdlog/spdlog.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <future>

#include "transport/ucx_address.hpp"
#include "transport/ucx_network_policy.hpp"
#include "transport/ucx_version.hpp"

namespace kvflow::transport {

namespace {

status ucx_error(const std::string& what, ucs_status_t st) {
  auto s = status::error("ucx: " + what + ": " + ucs_status_string(st));
  spdlog::error("{}", s.reason());
  return s;
}

status sys_error(const std::string& what) {
  auto s = status::error("ucx: " + what + ": " + std::strerror(errno));
  spdlog::error("{}", s.reason());
  return s;
}

status ucx_refused(status s) {
  spdlog::error("{}", s.reason());
  return s;
}

}  // namespace

bool ucx_shared_memory_allowed() {
  const char* tls = std::getenv("UCX_TLS");
  if (tls == nullptr || *tls == '\0') return true;
  const std::string t(tls);
  if (t[0] == '^') return false;  // "^..." excludes; shared memory may be among them
  return t.find("all") != std::string::npos || t.find("sm") != std::string::npos ||
         t.find("sysv") != std::string::npos || t.find("posix") != std::string::npos;
}

result<std::unique_ptr<ucx_worker>> ucx_worker::create(std::uint64_t features, bool tcp_beyond_loopback) {
  ucx_version loaded;
  ucp_get_version(&loaded.major, &loaded.minor, &loaded.release);
  if (auto why = ucx_version_problem({UCP_API_MAJOR, UCP_API_MINOR, 0}, loaded); !why.empty()) {
    spdlog::error("ucx: {}", why);
    return status::error("ucx: " + why);
  }
  std::unique_ptr<ucx_worker> w(new ucx_worker);

  ucp_config_t* config = nullptr;
  if (auto st = ucp_config_read(nullptr, nullptr, &config); st != UCS_OK)
    return ucx_error("ucp_config_read", st);
  // Memory this context allocates (allocate_memory) must be shared memory or nothing: the
  // transport writes allocated regions of same-host peers without peer error handling, which is
  // safe only for sysv/posix segments. Where they are unavailable the allocation fails and the
  // caller registers its own memory (peer error handling then). Overrides UCX_ALLOC_PRIO. Not
  // when UCX_TLS leaves shared memory out: then no peer is written that way, and UCX's own pools
  // (ucp_reg_bufs, made where CUDA is loaded) could not be allocated at all (UCX then crashed:
  // UCX_TLS=tcp on the GPU machine, 2026-12-07).
  if (ucx_shared_memory_allowed()) {
    if (auto st = ucp_config_modify(config, "ALLOC_PRIO", "md:sysv,md:posix"); st != UCS_OK) {
      ucp_config_release(config);
      return ucx_error("ucp_config_modify ALLOC_PRIO", st);
    }
  }
  // Lanes, chosen deliberately unless UCX_TLS says otherwise: no cma. UCX 1.22 picks cma's
  // zero-copy (process_vm_writev) for puts over ~4 KiB even into sysv-mapped segments, 3x slower
  // here than sysv's copy (docs/benchmarks.md), and AddressSanitizer reports cma's reachability
  // check (process_vm_readv) writing into freed memory for endpoints within one process. Peers
  // without shared memory use tcp (peer error handling) either way.
  if (const char* tls = std::getenv("UCX_TLS"); tls == nullptr || *tls == '\0') {
    if (auto st = ucp_config_modify(config, "TLS", "^cma"); st != UCS_OK) {
      ucp_config_release(config);
      return ucx_error("ucp_config_modify TLS", st);
    }
  }
  if (!tcp_beyond_loopback) {
    const char* user = std::getenv("UCX_NET_DEVICES");
    const auto devices = ucx_net_devices_excluding(user ? user : "", tcp_interfaces_beyond_loopback());
    if (!devices.empty()) {
      if (auto st = ucp_config_modify(config, "NET_DEVICES", devices.c_str()); st != UCS_OK) {
        ucp_config_release(config);
        return ucx_error("ucp_config_modify NET_DEVICES=" + devices, st);
      }
    }
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = features | UCP_FEATURE_WAKEUP;
  auto st = ucp_init(&params, config, &w->context_);
  ucp_config_release(config);
  if (st != UCS_OK) {
    w->context_ = nullptr;
    return ucx_error("ucp_init", st);
  }

  ucp_context_attr_t attr{};
  attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  if (st = ucp_context_query(w->context_, &attr); st != UCS_OK)
    return ucx_error("ucp_context_query", st);
  w->memory_types_ = attr.memory_types;

  // Single-threaded: only the progress thread touches the worker, so UCX needs no locks.
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  if (st = ucp_worker_create(w->context_, &wp, &w->worker_); st != UCS_OK) {
    w->worker_ = nullptr;
    return ucx_error("ucp_worker_create", st);
  }

  ucp_address_t* address = nullptr;
  std::size_t address_len = 0;
  if (st = ucp_worker_get_address(w->worker_, &address, &address_len); st != UCS_OK)
    return ucx_error("ucp_worker_get_address", st);
  w->address_.assign(reinterpret_cast<const char*>(address), address_len);
  ucp_worker_release_address(w->worker_, address);
  if (!tcp_beyond_loopback) {
    // What UCX really opened decides, not what it was asked: an allow list of the user's, or an
    // interface that came up in between, would otherwise slip through.
    auto beyond = ucx_tcp_beyond_loopback(w->address_);
    if (!beyond) return ucx_refused(status::error("ucx: own worker address: " + beyond.error().reason()));
    if (!beyond.value().empty()) return ucx_refused(tcp_beyond_loopback_refused(beyond.value()));
  }

  if (st = ucp_worker_get_efd(w->worker_, &w->worker_fd_); st != UCS_OK)
    return ucx_error("ucp_worker_get_efd", st);
  w->command_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (w->command_fd_ < 0) return sys_error("eventfd");
  w->epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
  if (w->epoll_fd_ < 0) return sys_error("epoll_create1");
  for (int fd : {w->worker_fd_, w->command_fd_}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (::epoll_ctl(w->epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) return sys_error("epoll_ctl");
  }

  // Everything above happens before the thread starts, so it may read the members unlocked.
  w->thread_ = std::thread([p = w.get()] { p->loop(); });
  w->thread_id_ = w->thread_.get_id();
  return w;
}

ucx_worker::~ucx_worker() {
  if (thread_.joinable()) {
    {
      std::lock_guard guard(mutex_);
      stopping_ = true;
    }
    wake();
    thread_.join();  // the thread destroys the worker on its way out
  } else if (worker_ != nullptr) {
    ucp_worker_destroy(worker_);  // create() failed after the worker: no thread ever ran
  }
  if (context_ != nullptr) ucp_cleanup(context_);
  for (int fd : {epoll_fd_, command_fd_})
    if (fd >= 0) ::close(fd);
}

void ucx_worker::post(command c) {
  bool was_empty = false;
  {
    std::lock_guard guard(mutex_);
    was_empty = commands_.empty();
    commands_.push_back(std::move(c));
  }
  // A non-empty queue already has a wake-up pending (the thread drains after it reads the fd).
  if (was_empty) wake();
}

void ucx_worker::call(const command& c) {
  if (on_thread()) {
    c();
    return;
  }
  std::promise<void> finished;
  auto f = finished.get_future();
  post([&] {
    c();
    finished.set_value();
  });
  f.wait();
}

void ucx_worker::set_deadline(clock::time_point t, command fn) {
  deadline_ = t;
  on_deadline_ = std::move(fn);
}

void ucx_worker::wake() {
  std::uint64_t one = 1;
  // Only EAGAIN (counter saturated, a wake-up is pending anyway) can fail here.
  [[maybe_unused]] auto n = ::write(command_fd_, &one, sizeof one);
}

bool ucx_worker::run_commands() {
  std::vector<command> batch;
  bool stop = false;
  {
    std::lock_guard guard(mutex_);
    batch.swap(commands_);
    stop = stopping_;
  }
  for (auto& c : batch) c();
  return stop;
}

bool ucx_worker::progress_round() {
  bool any = false;
  for (;;) {
    while (ucp_worker_progress(worker_) != 0) any = true;
    if (deferred_.empty()) break;
    // Deferred work may issue new operations (or defer more): progress again after it.
    auto batch = std::move(deferred_);
    deferred_.clear();
    for (auto& c : batch) c();
    any = true;
  }
  if (deadline_ != clock::time_point::max() && clock::now() >= deadline_) {
    deadline_ = clock::time_point::max();
    auto fn = std::move(on_deadline_);
    on_deadline_ = nullptr;
    if (fn) fn();
    any = true;
  }
  return any;
}

void ucx_worker::wait(int timeout_ms) {
  epoll_event events[2];
  int n = ::epoll_wait(epoll_fd_, events, 2, timeout_ms);
  for (int i = 0; i < n; ++i) {
    if (events[i].data.fd != command_fd_) continue;
    std::uint64_t count = 0;
    [[maybe_unused]] auto r = ::read(command_fd_, &count, sizeof count);
  }
}

void ucx_worker::loop() {
  for (;;) {
    bool stop = run_commands();
    if (progress_round()) continue;  // something happened: look for commands and events again
    if (stop) break;
    // Arming fails with BUSY when events arrived since the last progress: progress them first.
    auto st = ucp_worker_arm(worker_);
    if (st == UCS_ERR_BUSY) continue;
    int timeout_ms = -1;
    if (st != UCS_OK) {
      // Cannot sleep on the fd safely: degrade to a slow poll rather than hang (never seen).
      if (!arm_failed_logged_) spdlog::error("ucx: ucp_worker_arm: {}", ucs_status_string(st));
      arm_failed_logged_ = true;
      timeout_ms = 10;
    }
    if (deadline_ != clock::time_point::max()) {
      auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline_ - clock::now()).count();
      left = std::max<decltype(left)>(left, 0);
      if (timeout_ms < 0 || left < timeout_ms)
        timeout_ms = static_cast<int>(std::min<decltype(left)>(left, 1 << 30));
    }
    wait(timeout_ms);
  }
  ucp_worker_destroy(worker_);
  worker_ = nullptr;
}

bool ucx_worker::progress_until(const std::function<bool()>& done,
                                std::chrono::milliseconds timeout) {
  auto end = clock::now() + timeout;
  for (;;) {
    progress_round();
    if (done()) return true;
    auto now = clock::now();
    if (now >= end) return false;
    if (ucp_worker_arm(worker_) == UCS_ERR_BUSY) continue;
    auto left = std::chrono::ceil<std::chrono::milliseconds>(end - now).count();
    wait(static_cast<int>(std::min<decltype(left)>(left, 100)));
  }
}

}  // namespace kvflow::transport
