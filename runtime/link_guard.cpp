#include "runtime/link_guard.hpp"

#include <caf/all.hpp>
#include <caf/detail/socket_guard.hpp>
#include <caf/io/all.hpp>
#include <caf/io/basp_broker.hpp>
#include <caf/io/middleman_actor_impl.hpp>
#include <caf/io/network/default_multiplexer.hpp>
#include <caf/io/network/doorman_impl.hpp>
#include <caf/io/network/stream.hpp>
#include <caf/openssl/all.hpp>
#include <caf/openssl/session.hpp>
#include <caf/policy/tcp.hpp>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <spdlog/spdlog.h>

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <set>

#include "config/topology.hpp"
#include "runtime/link_auth.hpp"
#include "runtime/node.hpp"

namespace kvflow::runtime {

namespace io = caf::io;
namespace net = caf::io::network;
using net::rw_state;

link_settings link_settings_of(const config::link_security& s, const config::tunables& t) {
  link_settings l;
  l.security = s;
  l.max_frame_bytes = static_cast<std::uint64_t>(t.link_max_frame_bytes);
  l.auth_timeout = std::chrono::milliseconds(t.link_auth_timeout_ms);
  l.max_pending = static_cast<std::size_t>(t.link_max_pending);
  return l;
}

namespace {

// caf::openssl throws from inside its event loop when a file does not load; load each here first,
// so a bad file is a configuration error that names it.
void check_tls_files(const config::link_security& s) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_method());
  if (ctx == nullptr) throw config::config_error("KVFLOW_TLS_CERT: OpenSSL cannot make a TLS context");
  // An encrypted key would make OpenSSL prompt on the terminal: refuse it instead.
  SSL_CTX_set_default_passwd_cb(ctx, [](char*, int, int, void*) { return 0; });
  std::string problem;
  if (SSL_CTX_use_certificate_chain_file(ctx, s.tls_certificate.c_str()) != 1)
    problem = "KVFLOW_TLS_CERT: '" + s.tls_certificate + "' is not a PEM certificate chain";
  else if (SSL_CTX_use_PrivateKey_file(ctx, s.tls_key.c_str(), SSL_FILETYPE_PEM) != 1)
    problem = "KVFLOW_TLS_KEY: '" + s.tls_key + "' is not an unencrypted PEM private key";
  else if (SSL_CTX_check_private_key(ctx) != 1)
    problem = "KVFLOW_TLS_KEY: '" + s.tls_key + "' does not belong to " + s.tls_certificate;
  else if (SSL_CTX_load_verify_locations(ctx, s.tls_ca.c_str(), nullptr) != 1)
    problem = "KVFLOW_TLS_CA: '" + s.tls_ca + "' holds no PEM CA certificate";
  SSL_CTX_free(ctx);
  ERR_clear_error();
  if (!problem.empty()) throw config::config_error(problem);
}

class guarded_stream;

// What every link of one guard shares: the settings, the links still authenticating (to expire
// them and bound how many there are) and why the last attempt at each address was refused.
struct guard_state {
  explicit guard_state(link_settings s) : settings(std::move(s)) {}
  link_settings settings;
  std::mutex mutex;
  std::set<guarded_stream*> pending;
  std::size_t pending_accepted = 0;
  // Why the last attempt at each address ended, and whether it was a refusal (the peer's verdict
  // or this end's decision) rather than a connection that dropped mid-handshake.
  struct ending {
    std::string why;
    bool refused = true;
  };
  std::map<std::string, ending> refusals;
  // Where this node dials the nodes that may forward frames of others to it (its bootstrap).
  std::set<std::pair<std::string, std::uint16_t>> relays;

  void sweep();  // in the multiplexer's thread
};

using clock = std::chrono::steady_clock;

// A CAF stream whose bytes pass the token handshake first and the frame guard after. It is its
// own read/write policy for stream::handle_event_impl.
class guarded_stream final : public net::stream {
 public:
  guarded_stream(net::default_multiplexer& mpx, net::native_socket fd, std::shared_ptr<guard_state> g,
                 link_auth::role role, caf::openssl::session_ptr tls, std::string peer, bool relay)
      : net::stream(mpx, fd),
        guard_(std::move(g)),
        auth_(role, guard_->settings.security.auth_token),
        frames_(guard_->settings.max_frame_bytes, relay),
        tls_(std::move(tls)),
        peer_(std::move(peer)),
        accepted_side_(role == link_auth::role::acceptor),
        deadline_(clock::now() + guard_->settings.auth_timeout) {
    std::lock_guard<std::mutex> l(guard_->mutex);
    guard_->pending.insert(this);
    if (accepted_side_) ++guard_->pending_accepted;
  }

  ~guarded_stream() override { leave_pending(); }

  void set_owner(net::stream_manager* m) { owner_ = m; }

  void handle_event(net::operation op) override {
    progressed_ = false;
    this->handle_event_impl(op, *this);
    // Handshake bytes or held BASP bytes that could not go out yet: ask for a write event. Not
    // after a write that moved nothing: TLS may wait for the peer's handshake, and a writable
    // socket would wake this loop again at once; the next read event asks again.
    const bool output = auth_.output_size() > 0 || (auth_.accepted() && held_sent_ < held_.size());
    if (!failed_ && owner_ != nullptr && output && (op == net::operation::read || progressed_))
      force_empty_write(manager_ptr{owner_});
  }

  // Expires a link still authenticating past its deadline (the sweep, in the event loop).
  void expire() {
    if (failed_ || auth_.accepted()) return;
    fail("did not complete the link handshake within " + std::to_string(guard_->settings.auth_timeout.count()) +
         " ms (KVFLOW_LINK_AUTH_TIMEOUT_MS)");
    handle_event(net::operation::propagate_error);
  }
  bool overdue(clock::time_point now) const { return !failed_ && !auth_.accepted() && now >= deadline_; }

  // ---- the policy handle_event_impl calls ----
  rw_state read_some(size_t& result, net::native_socket fd, void* buf, size_t len) {
    result = 0;
    if (failed_) return rw_state::failure;
    if (!auth_.accepted()) {
      if (clock::now() >= deadline_) return fail_state("did not complete the link handshake in time");
      while (auth_.wants() > 0) {
        std::uint8_t tmp[link_auth::hello_size];
        size_t got = 0;
        auto st = raw_read(got, fd, tmp, std::min(sizeof tmp, auth_.wants()));
        if (st == rw_state::failure)
          return auth_.state() == link_auth::outcome::refused
                     ? fail_state(auth_.reason())
                     : dropped_state("the connection closed during the link handshake");
        if (got == 0) break;
        auth_.feed(tmp, got);
      }
      if (!flush_auth(fd)) return dropped_state("the connection failed during the link handshake");
      if (auth_.state() == link_auth::outcome::refused) return fail_state(auth_.reason());
      if (!auth_.accepted()) return rw_state::success;
      leave_pending();
      spdlog::debug("node link {} {} authenticated", accepted_side_ ? "from" : "to", peer_);
    }
    auto st = raw_read(result, fd, buf, len);
    if (st == rw_state::success && result > 0 && !frames_.pass(static_cast<const std::uint8_t*>(buf), result))
      return fail_state(frames_.reason());
    return st;
  }

  rw_state write_some(size_t& result, net::native_socket fd, const void* buf, size_t len) {
    result = 0;
    if (failed_) return rw_state::failure;
    if (!flush_auth(fd)) return dropped_state("the connection failed during the link handshake");
    if (!auth_.accepted()) {
      if (auth_.state() == link_auth::outcome::refused) return fail_state(auth_.reason());
      if (len == 0) return rw_state::indeterminate;
      // BASP speaks first; nothing of it reaches a peer that has not proved itself.
      if (held_.size() + len > max_held) return fail_state("wrote too much before the link handshake completed");
      auto p = static_cast<const char*>(buf);
      held_.insert(held_.end(), p, p + len);
      result = len;
      return rw_state::success;
    }
    if (held_sent_ < held_.size()) {
      size_t wb = 0;
      auto st = raw_write(wb, fd, held_.data() + held_sent_, held_.size() - held_sent_);
      if (st == rw_state::failure) return fail_state("the connection failed");
      held_sent_ += wb;
      progressed_ = progressed_ || wb > 0;
      if (held_sent_ < held_.size()) return rw_state::success;  // the rest when writable again
      std::vector<char>().swap(held_);
      held_sent_ = 0;
    }
    if (len == 0) return rw_state::indeterminate;
    auto st = raw_write(result, fd, buf, len);
    progressed_ = progressed_ || result > 0;
    return st;
  }

  bool must_read_more(net::native_socket fd, size_t threshold) {
    return tls_ ? tls_->must_read_more(fd, threshold) : false;
  }

 private:
  static constexpr std::size_t max_held = 1 << 20;

  // OpenSSL's error queue is per thread and caf::openssl never empties it: an error another
  // link's failed handshake left on this event loop's thread would make SSL_get_error report a
  // mere "want read" on this link as fatal, and close it.
  rw_state raw_read(size_t& result, net::native_socket fd, void* buf, size_t len) {
    if (!tls_) return caf::policy::tcp::read_some(result, fd, buf, len);
    ERR_clear_error();
    return tls_->read_some(result, fd, buf, len);
  }
  rw_state raw_write(size_t& result, net::native_socket fd, const void* buf, size_t len) {
    if (!tls_) return caf::policy::tcp::write_some(result, fd, buf, len);
    ERR_clear_error();
    return tls_->write_some(result, fd, buf, len);
  }

  // Sends what the handshake has to say, as far as the socket takes it now.
  bool flush_auth(net::native_socket fd) {
    while (auth_.output_size() > 0) {
      size_t wb = 0;
      auto st = raw_write(wb, fd, auth_.output(), auth_.output_size());
      if (st == rw_state::failure) return false;
      if (wb == 0) return true;
      auth_.output_sent(wb);
      progressed_ = true;
    }
    return true;
  }

  void fail(const std::string& why, bool refused = true) {
    if (failed_) return;
    failed_ = true;
    leave_pending();
    if (accepted_side_) {
      spdlog::warn("node link from {} refused: {}", peer_, why);
    } else {
      // The connecting side's caller gets the reason from guarded_connect and decides.
      spdlog::debug("node link to {} refused: {}", peer_, why);
      std::lock_guard<std::mutex> l(guard_->mutex);
      guard_->refusals[peer_] = {why, refused};
    }
  }
  rw_state fail_state(const std::string& why) {
    fail(why);
    return rw_state::failure;
  }
  // The connection dropped before either end gave a verdict: a listener that closed or reset
  // it (its cap on pending handshakes, a restart), which a later attempt may pass. Under TLS a
  // drop is also how a refused certificate shows, so there it stays a refusal.
  rw_state dropped_state(const std::string& why) {
    fail(why, tls_ != nullptr);
    return rw_state::failure;
  }

  void leave_pending() {
    std::lock_guard<std::mutex> l(guard_->mutex);
    if (guard_->pending.erase(this) > 0 && accepted_side_) --guard_->pending_accepted;
  }

  std::shared_ptr<guard_state> guard_;
  link_auth auth_;
  frame_guard frames_;
  caf::openssl::session_ptr tls_;
  std::string peer_;
  bool accepted_side_;
  clock::time_point deadline_;
  net::stream_manager* owner_ = nullptr;
  std::vector<char> held_;
  std::size_t held_sent_ = 0;
  bool failed_ = false;
  bool progressed_ = false;
};

void guard_state::sweep() {
  std::vector<guarded_stream*> overdue;
  {
    std::lock_guard<std::mutex> l(mutex);
    const auto now = clock::now();
    for (auto* s : pending)
      if (s->overdue(now)) overdue.push_back(s);
  }
  // Streams are destroyed in this same thread, so none of these goes away meanwhile.
  for (auto* s : overdue) s->expire();
}

class guarded_scribe final : public io::scribe {
 public:
  guarded_scribe(net::default_multiplexer& mpx, net::native_socket fd, std::shared_ptr<guard_state> g,
                 link_auth::role role, caf::openssl::session_ptr tls, std::string peer, bool relay)
      : io::scribe(net::conn_hdl_from_socket(fd)),
        stream_(mpx, fd, std::move(g), role, std::move(tls), std::move(peer), relay) {}

  void configure_read(io::receive_policy::config config) override {
    stream_.configure_read(config);
    if (!launched_) launch();
  }
  void ack_writes(bool enable) override { stream_.ack_writes(enable); }
  std::vector<char>& wr_buf() override { return stream_.wr_buf(); }
  std::vector<char>& rd_buf() override { return stream_.rd_buf(); }
  void graceful_shutdown() override {
    stream_.graceful_shutdown();
    detach(&stream_.backend(), false);
  }
  void flush() override { stream_.flush(this); }
  std::string addr() const override {
    auto x = net::remote_addr_of_fd(stream_.fd());
    return x ? *x : std::string();
  }
  uint16_t port() const override {
    auto x = net::remote_port_of_fd(stream_.fd());
    return x ? *x : 0;
  }
  void add_to_loop() override { stream_.activate(this); }
  void remove_from_loop() override { stream_.passivate(); }

 private:
  void launch() {
    launched_ = true;
    stream_.set_owner(this);
    stream_.start(this);
    // The first write event sends the greeting (or, with TLS, moves its handshake on).
    stream_.force_empty_write(this);
  }

  bool launched_ = false;
  guarded_stream stream_;
};

class guarded_doorman final : public net::doorman_impl {
 public:
  guarded_doorman(net::default_multiplexer& mpx, net::native_socket fd, std::shared_ptr<guard_state> g)
      : net::doorman_impl(mpx, fd), guard_(std::move(g)) {}

  bool new_connection() override {
    if (detached()) return false;
    auto& mpx = acceptor_.backend();
    auto fd = acceptor_.accepted_socket();
    caf::detail::socket_guard sguard{fd};
    std::string peer = "?";
    if (auto a = net::remote_addr_of_fd(fd)) {
      auto p = net::remote_port_of_fd(fd);
      peer = *a + ":" + std::to_string(p ? *p : 0);
    }
    guard_->sweep();
    {
      std::lock_guard<std::mutex> l(guard_->mutex);
      if (guard_->pending_accepted >= guard_->settings.max_pending) {
        spdlog::warn("node link from {} refused: {} links are still in their handshake (KVFLOW_LINK_MAX_PENDING)",
                     peer, guard_->pending_accepted);
        return true;  // the socket guard closes it; keep accepting
      }
    }
    net::nonblocking(fd, true);
    caf::openssl::session_ptr tls;
    if (guard_->settings.security.tls()) {
      ERR_clear_error();
      tls = caf::openssl::make_session(parent()->system(), fd, true);
      if (!tls) {
        spdlog::warn("node link from {} refused: its TLS handshake failed", peer);
        return true;
      }
    }
    auto scribe = caf::make_counted<guarded_scribe>(mpx, fd, guard_, link_auth::role::acceptor, std::move(tls), peer, false);
    sguard.release();  // the scribe owns the socket now
    auto hdl = scribe->hdl();
    parent()->add_scribe(std::move(scribe));
    return doorman::new_connection(&mpx, hdl);
  }

 private:
  std::shared_ptr<guard_state> guard_;
};

// A non-blocking TCP connect that gives up after `timeout`. CAF's blocks until the kernel does:
// a listener whose queue is full (a frozen process) drops SYNs, and the kernel retries for two
// minutes, while this process's every other dial waits behind it.
caf::expected<net::native_socket> dial(const std::string& host, uint16_t port, std::chrono::milliseconds timeout) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0 || found == nullptr)
    return caf::make_error(caf::sec::cannot_connect_to_node, "cannot resolve " + host);
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> list(found, &::freeaddrinfo);
  std::string why = "no address";
  for (auto* a = found; a != nullptr; a = a->ai_next) {
    int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    caf::detail::socket_guard g{fd};
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (::connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      if (errno != EINPROGRESS) {
        why = std::strerror(errno);
        continue;
      }
      pollfd p{fd, POLLOUT, 0};
      const int ready = ::poll(&p, 1, static_cast<int>(timeout.count()));
      int err = 0;
      socklen_t len = sizeof err;
      if (ready <= 0) {
        why = "no TCP answer within " + std::to_string(timeout.count()) + " ms";
        continue;
      }
      if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
        why = std::strerror(err != 0 ? err : errno);
        continue;
      }
    }
    return g.release();
  }
  return caf::make_error(caf::sec::cannot_connect_to_node, "cannot connect to " + host + ":" + std::to_string(port) + ": " + why);
}

class guarded_middleman final : public io::middleman_actor_impl {
 public:
  guarded_middleman(caf::actor_config& cfg, caf::actor broker, std::shared_ptr<guard_state> g)
      : io::middleman_actor_impl(cfg, std::move(broker)), guard_(std::move(g)) {}
  const char* name() const override { return "kvflow::guarded_middleman"; }

 protected:
  caf::expected<io::scribe_ptr> connect(const std::string& host, uint16_t port) override {
    auto fd = dial(host, port, guard_->settings.auth_timeout);
    if (!fd) return std::move(fd.error());
    caf::detail::socket_guard sguard{*fd};
    caf::openssl::session_ptr tls;
    if (guard_->settings.security.tls()) {
      ERR_clear_error();
      tls = caf::openssl::make_session(system(), *fd, false);
      if (!tls) return caf::sec::cannot_connect_to_node;
    }
    bool relay = false;
    {
      std::lock_guard<std::mutex> l(guard_->mutex);
      relay = guard_->relays.count({host, port}) != 0;
    }
    auto scribe = caf::make_counted<guarded_scribe>(mpx(), *fd, guard_, link_auth::role::connector, std::move(tls),
                                                    host + ":" + std::to_string(port), relay);
    sguard.release();
    return scribe;
  }
  caf::expected<io::doorman_ptr> open(uint16_t port, const char* addr, bool reuse) override {
    auto fd = net::new_tcp_acceptor_impl(port, addr, reuse);
    if (!fd) return std::move(fd.error());
    return caf::make_counted<guarded_doorman>(mpx(), *fd, guard_);
  }

 private:
  net::default_multiplexer& mpx() { return static_cast<net::default_multiplexer&>(system().middleman().backend()); }
  std::shared_ptr<guard_state> guard_;
};

using tick_atom = caf::atom_constant<caf::atom("linksweep")>;

// The guards of this process by actor system (several systems live in one test process).
std::mutex guards_mutex;
std::map<const caf::actor_system*, std::pair<io::middleman_actor, std::shared_ptr<guard_state>>> guards;

std::pair<io::middleman_actor, std::shared_ptr<guard_state>> guard_of(caf::actor_system& sys) {
  std::lock_guard<std::mutex> l(guards_mutex);
  auto it = guards.find(&sys);
  if (it == guards.end()) return {};
  return it->second;
}

}  // namespace

void configure_links(caf::actor_system_config& cfg, const link_settings& s) {
  // Routes to nodes this one never dialled would go through CAF's own, unguarded middleman.
  cfg.set("middleman.enable-automatic-connections", false);
  if (!s.security.tls()) return;
  check_tls_files(s.security);
  cfg.load<caf::openssl::manager>();
  cfg.openssl_certificate = s.security.tls_certificate;
  cfg.openssl_key = s.security.tls_key;
  cfg.openssl_cafile = s.security.tls_ca;
}

struct link_guard::impl {
  caf::actor_system* sys = nullptr;
  io::middleman_actor middleman;
  caf::actor sweeper;
};

std::unique_ptr<link_guard> link_guard::start(caf::actor_system& sys, const link_settings& s) {
  auto state = std::make_shared<guard_state>(s);
  auto p = std::make_unique<impl>();
  p->sys = &sys;
  auto broker = sys.middleman().named_broker<io::basp_broker>(caf::atom("BASP"));
  // Detached, as CAF's own: connect() dials with a blocking TCP connect, which must not hold one
  // of the scheduler's few threads (and the ranks on it) while a SYN goes unanswered.
  p->middleman = sys.spawn<guarded_middleman, caf::detached + caf::hidden>(std::move(broker), state);
  // Links that never finish their handshake send nothing, so no event of theirs expires them:
  // a sweep does, in the event loop, a few times per timeout.
  const auto period = std::max(std::chrono::milliseconds(50), s.auth_timeout / 4);
  auto* mpx = &sys.middleman().backend();
  p->sweeper = sys.spawn<caf::hidden>([state, period, mpx](caf::event_based_actor* self) -> caf::behavior {
    self->delayed_send(self, period, tick_atom::value);
    return {[=](tick_atom) {
      mpx->post([state] { state->sweep(); });
      self->delayed_send(self, period, tick_atom::value);
    }};
  });
  {
    std::lock_guard<std::mutex> l(guards_mutex);
    guards[&sys] = {p->middleman, state};
  }
  return std::unique_ptr<link_guard>(new link_guard(std::move(p)));
}

link_guard::link_guard(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
link_guard::~link_guard() { stop(); }

void link_guard::stop() {
  if (!impl_ || !impl_->sys) return;
  {
    std::lock_guard<std::mutex> l(guards_mutex);
    guards.erase(impl_->sys);
  }
  caf::scoped_actor self{*impl_->sys, true};
  self->send_exit(impl_->sweeper, caf::exit_reason::kill);
  self->send_exit(impl_->middleman, caf::exit_reason::kill);
  self->wait_for(impl_->sweeper, impl_->middleman);
  // A detached actor's thread ends only once nothing refers to it; the system waits for it.
  impl_->sweeper = nullptr;
  impl_->middleman = nullptr;
  impl_->sys = nullptr;
}

result<std::uint16_t> guarded_publish(caf::actor_system& sys, const caf::actor& a, const host_port& where) {
  auto [mm, state] = guard_of(sys);
  if (!mm) return status::error("cannot listen on " + where.text() + ": this node's link guard is not running");
  caf::scoped_actor self{sys};
  result<std::uint16_t> out = status::error("cannot listen on " + where.text());
  self->request(mm, caf::infinite, caf::publish_atom::value, where.port, caf::actor_cast<caf::strong_actor_ptr>(a),
                std::set<std::string>{}, where.host, true)
      .receive([&](std::uint16_t port) { out = port; },
               [&](caf::error& e) { out = status::error("cannot listen on " + where.text() + ": " + sys.render(e)); });
  return out;
}

status trust_as_relay(caf::actor_system& sys, const host_port& where) {
  auto [mm, state] = guard_of(sys);
  if (!mm) return status::error("cannot trust " + where.text() + ": this node's link guard is not running");
  std::lock_guard<std::mutex> l(state->mutex);
  state->relays.insert({where.host, where.port});
  return {};
}

result<caf::actor> guarded_connect(caf::actor_system& sys, const host_port& where, std::chrono::milliseconds timeout) {
  auto [mm, state] = guard_of(sys);
  if (!mm) return status::error("cannot reach " + where.text() + ": this node's link guard is not running");
  {
    std::lock_guard<std::mutex> l(state->mutex);
    state->refusals.erase(where.text());
  }
  caf::scoped_actor self{sys};
  result<caf::actor> out = status::error("cannot reach " + where.text());
  self->request(mm, timeout, caf::connect_atom::value, where.host, where.port)
      .receive(
          [&](const caf::node_id&, caf::strong_actor_ptr& p, const std::set<std::string>&) {
            if (p)
              out = caf::actor_cast<caf::actor>(std::move(p));
            else
              out = status::error("cannot reach " + where.text() + ": nothing is published there");
          },
          [&](caf::error& e) {
            std::string why = sys.render(e);
            std::lock_guard<std::mutex> l(state->mutex);
            if (auto it = state->refusals.find(where.text()); it != state->refusals.end())
              why = (it->second.refused ? link_refused : link_dropped) + it->second.why;
            out = status::error("cannot reach " + where.text() + ": " + why);
          });
  return out;
}

}  // namespace kvflow::runtime
