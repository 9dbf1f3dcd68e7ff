// `kvflow launch`: bootstrap and rank processes on this host, driven like `kvflow simulate`.
#include "command/launch.hpp"

#include <signal.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <sstream>
#include <thread>

#include "command/child_process.hpp"
#include "command/cluster_control.hpp"
#include "command/driver.hpp"
#include "command/engine_messages.hpp"
#include "command/stop_signals.hpp"
#include "config/routing.hpp"
#include "runtime/engine_host.hpp"
#include "runtime/link_guard.hpp"
#include "runtime/node.hpp"

namespace kvflow::command {
namespace {

using namespace std::chrono_literals;

std::vector<std::string> split(const std::string& s) {
  std::istringstream in(s);
  std::vector<std::string> out;
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

int pages_of(const config::cluster_config& c, int tokens) { return (tokens + c.page_size - 1) / c.page_size; }

// The cluster as processes: start() runs on the driver (it is the ranks' observer), starts the
// bootstrap and every rank, and waits until every rank registered. Blocking the driver for that
// start-up is fine: nothing else runs in the launcher yet.
class process_cluster final : public cluster_control {
 public:
  process_cluster(simulation_options o, launch_options l) : o_(std::move(o)), l_(std::move(l)) {}

  cluster_handles start(caf::event_based_actor* self) override {
    cluster_handles h;
    if (auto s = start_all(self, h); !s) {
      problem_ = s.reason();
      spdlog::error("launch: {}", problem_);
      return {};
    }
    return h;
  }

  status kill(caf::event_based_actor*, bool prefill, int rank) override {
    auto& c = (prefill ? prefill_ : decode_).at(static_cast<std::size_t>(rank));
    return c.signal(SIGKILL) ? status{} : status::error("the process is not running");
  }
  status freeze(bool prefill, int rank) override {
    auto& c = (prefill ? prefill_ : decode_).at(static_cast<std::size_t>(rank));
    return c.signal(SIGSTOP) ? status{} : status::error("the process is not running");
  }
  status restart_bootstrap() override {
    bootstrap_.signal(SIGKILL);
    (void)bootstrap_.wait(5s);
    return start_bootstrap(bootstrap_at_.port);
  }
  status stop_bootstrap(bool freeze) override {
    return bootstrap_.signal(freeze ? SIGSTOP : SIGKILL) ? status{} : status::error("the bootstrap is not running");
  }
  std::uint64_t transfer_bytes(const std::vector<msg::pool_usage>& usage) const override {
    std::uint64_t sum = 0;
    for (const auto& u : usage)
      if (u.prefill) sum += u.bytes_moved;  // each prefill process has its own transport
    return sum;
  }
  void stop(caf::event_based_actor*) override {
    // Prefill before decode (a writer leaves before the memory it writes into goes away), each
    // side's processes in parallel; the bootstrap last.
    for (auto* group : {&prefill_, &decode_}) {
      for (auto& c : *group) {
        c.signal(SIGCONT);
        c.signal(SIGTERM);
      }
      for (auto& c : *group) c.stop(5s);
    }
    bootstrap_.signal(SIGCONT);
    bootstrap_.stop(5s);
  }
  const std::string& problem() const { return problem_; }

 private:
  std::vector<std::pair<std::string, std::string>> child_env() const {
    auto env = config::to_env(o_.tunables);
    for (auto& kv : config::to_env(l_.links)) env.push_back(std::move(kv));
    return env;
  }

  status start_bootstrap(std::uint16_t port) {
    std::vector<std::string> argv{self_executable(), "--log-level", l_.log_level, "bootstrap", "--listen",
                                  l_.host + ":" + std::to_string(port)};
    argv.insert(argv.end(), l_.cluster_flags.begin(), l_.cluster_flags.end());
    auto c = child_process::start(argv, child_env(), true);
    if (!c) return c.error();
    bootstrap_ = std::move(c.value());
    auto line = bootstrap_.read_line(std::chrono::milliseconds(o_.tunables.connect_timeout_ms));
    if (!line) return status::error("bootstrap did not start: " + line.error().reason());
    auto at = line.value().rfind(' ');
    bootstrap_at_ = runtime::parse_host_port(line.value().substr(at + 1), "bootstrap");
    return {};
  }

  status start_all(caf::event_based_actor* self, cluster_handles& h) {
    auto& sys = self->system();
    const auto& c = o_.cluster;
    auto observer = runtime::publish_on(sys, caf::actor_cast<caf::actor>(self), {l_.host, 0});
    if (!observer) return observer.error();
    if (auto s = start_bootstrap(0); !s) return s;
    const int in_flight = std::min(o_.concurrency, o_.requests);
    // Each rank's pool holds the pages of the requests in flight at once (a request's pages come
    // back only once its whole group released them).
    const int pages = in_flight * pages_of(c, o_.prompt_max);
    auto start_rank = [&](bool prefill, int r) -> status {
      const auto& wrap = prefill ? l_.prefill_exec : l_.decode_exec;
      const auto& host = (prefill ? l_.prefill_host : l_.decode_host).empty()
                             ? l_.host
                             : (prefill ? l_.prefill_host : l_.decode_host);
      std::vector<std::string> argv = split(wrap);
      for (auto a : {self_executable(), std::string("--log-level"), l_.log_level, std::string("rank"),
                     std::string("--role"), std::string(prefill ? "prefill" : "decode"), std::string("--rank"),
                     std::to_string(r), std::string("--bootstrap"), bootstrap_at_.text(), std::string("--listen"),
                     host + ":0", std::string("--report-to"), l_.host + ":" + std::to_string(observer.value()),
                     std::string("--pool-pages"), std::to_string(pages), std::string("--aux-slots"),
                     std::to_string(in_flight + 1), std::string("--chunk-tokens"), std::to_string(o_.chunk_tokens)})
        argv.push_back(a);
      argv.insert(argv.end(), l_.cluster_flags.begin(), l_.cluster_flags.end());
      auto p = child_process::start(argv, child_env(), false);
      if (!p) return p.error();
      (prefill ? prefill_ : decode_).push_back(std::move(p.value()));
      return {};
    };
    for (int r = 0; r < c.prefill.ranks(); ++r)
      if (auto s = start_rank(true, r); !s) return s;
    for (int r = 0; r < c.decode.ranks(); ++r)
      if (auto s = start_rank(false, r); !s) return s;
    return collect(sys, h);
  }

  // Waits until the registry knows every rank's engine and every rank meshed. The launcher dials
  // no rank: each rank dialled the observer before it registered its engine, and that is the
  // direct link the launcher reaches it by. A dial of its own would cross the rank's: CAF 0.17
  // then takes each end's first client handshake as the link and closes the other connection
  // as redundant, at both ends, so the two nodes are left with no link at all; their messages
  // go round through the bootstrap and are lost when it restarts (docs/reliability.md).
  status collect(caf::actor_system& sys, cluster_handles& h) {
    const auto& c = o_.cluster;
    auto timeout = std::chrono::milliseconds(o_.tunables.connect_timeout_ms);
    auto until = std::chrono::steady_clock::now() + timeout;
    if (auto t = runtime::trust_as_relay(sys, bootstrap_at_); !t) return t;
    auto reg = runtime::connect_with_retry(sys, bootstrap_at_, timeout);
    if (!reg) return reg.error();
    h.registry = reg.value();
    h.prefill.assign(c.prefill.ranks(), caf::actor{});
    h.decode.assign(c.decode.ranks(), caf::actor{});
    for (;;) {
      for (auto* group : {&prefill_, &decode_})
        for (auto& p : *group)
          if (auto code = p.wait(0ms))
            return status::error("a rank process exited with code " + std::to_string(code.value()) +
                                 " during start-up");
      auto listed = runtime::list_nodes(sys, h.registry, 5s);
      bool complete = listed.has_value();
      std::vector<runtime::node_listing> nodes;
      if (listed) nodes = std::move(listed.value());
      // Requests go to each rank process's engine (it drives its rank through the public API).
      int meshed = 0;
      for (const auto& n : nodes) {
        meshed += n.meshed;
        const bool pre = n.name.rfind("prefill ", 0) == 0;
        if (!n.engine || (!pre && n.name.rfind("decode ", 0) != 0)) continue;
        const int r = std::atoi(n.name.c_str() + (pre ? 8 : 7));
        auto& slot = pre ? h.prefill : h.decode;
        if (r >= 0 && r < static_cast<int>(slot.size())) slot[static_cast<std::size_t>(r)] = n.engine;
      }
      for (const auto& a : h.prefill) complete = complete && a;
      for (const auto& a : h.decode) complete = complete && a;
      // Every rank connected to every other directly: from here on the bootstrap relays nothing.
      const int nodes_expected = c.prefill.ranks() + c.decode.ranks();
      complete = complete && static_cast<int>(nodes.size()) == nodes_expected && meshed == nodes_expected;
      if (complete) return {};
      if (std::chrono::steady_clock::now() >= until) {
        // Which part of start-up is missing, for the one who reads this line.
        std::string missing;
        auto add = [&](const std::string& what) { missing += (missing.empty() ? "" : ", ") + what; };
        for (std::size_t r = 0; r < h.prefill.size(); ++r)
          if (!h.prefill[r]) add("prefill " + std::to_string(r) + " has no engine");
        for (std::size_t r = 0; r < h.decode.size(); ++r)
          if (!h.decode[r]) add("decode " + std::to_string(r) + " has no engine");
        for (const auto& n : nodes) {
          if (!n.meshed) add(n.name + " not meshed");
        }
        if (static_cast<int>(nodes.size()) != nodes_expected)
          add(std::to_string(nodes.size()) + " of " + std::to_string(nodes_expected) + " nodes in the table");
        return status::error("ranks did not all register within " + std::to_string(timeout.count()) +
                             " ms: " + missing);
      }
      std::this_thread::sleep_for(50ms);
    }
  }

  simulation_options o_;
  launch_options l_;
  child_process bootstrap_;
  runtime::host_port bootstrap_at_;
  std::vector<child_process> prefill_, decode_;
  std::string problem_;
};

}  // namespace

simulation_report run_launch(const simulation_options& o, const launch_options& given) {
  validate(o);
  auto l = given;
  // The cluster this launcher starts is its own: unless told otherwise, its nodes prove a
  // token only they got (from this process's environment, never on a command line).
  if (!l.links.authenticated()) l.links.auth_token = config::random_token();
  auto report = std::make_shared<simulation_report>();
  install_stop_signals();
  auto control = std::make_shared<process_cluster>(o, l);
  {
    caf::actor_system_config cfg;
    const auto links = runtime::link_settings_of(l.links, o.tunables);
    runtime::configure_node(cfg, o.tunables, links);
    msg::add_engine_message_types(cfg);  // the router speaks to the rank processes' engines
    caf::actor_system sys{cfg};
    auto guard = runtime::link_guard::start(sys, links);
    // Every rank's engine reports the digests of the rounds it received: every rank of a group
    // must have received the same record for each round, across processes.
    // Counting each group's ranks lets the checker forget a round all of them reported.
    auto checker = std::make_shared<agreement_checker>();
    for (int r = 0; r < o.cluster.prefill.ranks(); ++r)
      checker->add_rank(config::prefill_group_of(o.cluster.prefill, config::prefill_coord_of(o.cluster.prefill, r)));
    for (int r = 0; r < o.cluster.decode.ranks(); ++r)
      checker->add_rank(config::decode_group_of(o.cluster.decode, config::decode_coord_of(o.cluster.decode, r)));
    drive(sys, o, report, control, checker);
    guard->stop();
  }
  if (!control->problem().empty()) report->problems.insert(report->problems.begin(), "launch: " + control->problem());
  return *report;
}

}  // namespace kvflow::command
