// The workload driver (command/driver.hpp) as `kvflow launch` runs it: whatever happens to the
// router, the run ends with a report that says so, never a wait without end.
#include <caf/all.hpp>

#include <memory>
#include <set>
#include <string>

#include "command/driver.hpp"
#include "command/engine_messages.hpp"
#include "command/outcome_reason.hpp"
#include "runtime/node.hpp"
#include "sim_helpers.hpp"

namespace {

using kvflow::command::cluster_control;
using kvflow::command::cluster_handles;

// What the test clusters below share: faults that change nothing, no bytes moved, and a stop
// that ends the engines start() made (kept in engines_).
class test_cluster : public cluster_control {
 public:
  kvflow::status kill(caf::event_based_actor*, bool, int) override { return {}; }
  kvflow::status freeze(bool, int) override { return {}; }
  kvflow::status restart_bootstrap() override { return {}; }
  kvflow::status stop_bootstrap(bool) override { return {}; }
  std::uint64_t transfer_bytes(const std::vector<kvflow::command::msg::pool_usage>&) const override { return 0; }
  void stop(caf::event_based_actor* self) override {
    for (auto* side : {&engines_.prefill, &engines_.decode})
      for (auto& a : *side) self->send_exit(a, caf::exit_reason::user_shutdown);
  }

 protected:
  cluster_handles engines_;
};

// A cluster whose engines take requests and never answer, and that hands the router a message it
// has no handler for: what a launcher gets from rank processes that send a type it did not
// register (seen when the router's types were missing from the launcher: CAF then delivers an
// empty message, and the router stopped with unexpected_message while the launcher waited).
class stray_message_cluster final : public test_cluster {
 public:
  cluster_handles start(caf::event_based_actor* self) override {
    cluster_handles h;
    auto silent = [](caf::event_based_actor*) -> caf::behavior {
      return {[](const kvflow::command::msg::new_request&) {}};
    };
    h.prefill.push_back(self->spawn(silent));
    h.decode.push_back(self->spawn(silent));
    engines_ = h;
    self->send(self, std::string("a message the router has no handler for"));
    return h;
  }
};

// Engines that release every request at once as succeeded and answer the pool-usage query,
// except that a frozen rank's engine stops answering it: a rank frozen after it released its
// last request (freeze:decode:3@16 in fault_matrix.seed).
class frozen_after_release_cluster final : public test_cluster {
 public:
  cluster_handles start(caf::event_based_actor* self) override {
    cluster_handles h;
    caf::actor observer = caf::actor_cast<caf::actor>(self);
    auto engine = [observer, frozen = frozen_](caf::event_based_actor* me, bool prefill, int rank) -> caf::behavior {
      return {
          [=](const kvflow::command::msg::new_request& q) {
            kvflow::command::msg::rank_released ev;
            ev.prefill = prefill;
            ev.rank = rank;
            ev.room = q.room;
            ev.incarnation = q.incarnation;
            ev.round = 1;
            ev.state = static_cast<std::uint8_t>(kvflow::poll_state::success);
            me->send(observer, ev);
          },
          [=](kvflow::command::msg::pool_usage_query) -> caf::result<kvflow::command::msg::pool_usage> {
            if (frozen->count({prefill, rank})) return me->make_response_promise<kvflow::command::msg::pool_usage>();
            kvflow::command::msg::pool_usage u;
            u.prefill = prefill;
            u.rank = rank;
            return u;
          },
      };
    };
    h.prefill.push_back(self->spawn(engine, true, 0));
    h.decode.push_back(self->spawn(engine, false, 0));
    h.decode.push_back(self->spawn(engine, false, 1));
    engines_ = h;
    return h;
  }
  kvflow::status freeze(bool prefill, int rank) override {
    frozen_->insert({prefill, rank});
    return {};
  }
 private:
  std::shared_ptr<std::set<std::pair<bool, int>>> frozen_ = std::make_shared<std::set<std::pair<bool, int>>>();
};

}  // namespace

TEST_CASE("regression: a rank the run froze after its last request is not asked for its pools") {
  // fault_matrix.seed, freeze:decode:3@16: every request succeeded, but the frozen rank's node was
  // not yet found silent when the last one ended, so the leak accounting asked it, waited 10 s
  // and reported "decode rank 3 did not answer the pool-usage query" as a problem.
  auto o = kvflow::test::small_run("tp=1", "dp=2");
  o.requests = 4;
  o.faults.push_back(kvflow::command::parse_fault("freeze:decode:1@4"));
  caf::actor_system_config cfg;
  kvflow::command::msg::add_engine_message_types(cfg);
  caf::actor_system sys{cfg};
  auto report = std::make_shared<kvflow::command::simulation_report>();
  kvflow::command::drive(sys, o, report, std::make_shared<frozen_after_release_cluster>(), nullptr);
  CHECK(report->complete);
  CHECK(report->problems.empty());
  CHECK(report->faults_applied_total == 1);
}

TEST_CASE("driver: a router that stops before its report fails the run instead of waiting for it forever") {
  auto o = kvflow::test::small_run("tp=1", "tp=1");
  o.requests = 2;
  caf::actor_system_config cfg;
  kvflow::command::msg::add_engine_message_types(cfg);
  caf::actor_system sys{cfg};
  auto report = std::make_shared<kvflow::command::simulation_report>();
  kvflow::command::drive(sys, o, report, std::make_shared<stray_message_cluster>(), nullptr);
  REQUIRE_FALSE(report->problems.empty());
  CHECK(report->problems.front().find("the driver stopped before its report") != std::string::npos);
  CHECK_FALSE(report->complete);
}

TEST_CASE("regression: a rank's create refused because its group finished the request does not hide the group's cause") {
  // launch.kill_decode_early: decode rank 3 died; prefill rank 0 failed the request because of it,
  // and prefill rank 6, whose engine created the request only after the group had let go of it,
  // was refused — and reported first. The outcome said "its group already finished this request"
  // instead of why it failed. The refusal below is the library's own wording of it.
  using kvflow::command::replaces_reason;
  const std::string late = "prefill rank 6: room 7 incarnation 12: its group already finished this request "
                           "(another rank of the group ended it before this create)";
  const std::string cause = "prefill rank 0: decode rank 3 down";
  CHECK(kvflow::command::echoes_group(late));
  CHECK(replaces_reason(late, cause));
  CHECK_FALSE(replaces_reason(cause, late));
  // The first rank's own reason stays; an empty one never replaces anything.
  CHECK(replaces_reason("", cause));
  CHECK_FALSE(replaces_reason(cause, "decode rank 2: transfer timed out"));
  CHECK_FALSE(replaces_reason(cause, ""));
}
