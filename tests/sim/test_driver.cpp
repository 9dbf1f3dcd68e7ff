// The workload driver (command/driver.hpp) as `kvflow launch` runs it: whatever happens to the
// router, the run ends with a report that says so, never a wait without end.
#include <caf/all.hpp>

#include <memory>
#include <string>

#include "command/driver.hpp"
#include "command/engine_messages.hpp"
#include "command/outcome_reason.hpp"
#include "runtime/node.hpp"
#include "sim_helpers.hpp"

namespace {

using kvflow::command::cluster_control;
using kvflow::command::cluster_handles;

// A cluster whose engines take requests and never answer, and that hands the router a message it
// has no handler for: what a launcher gets from rank processes that send a type it did not
// register (seen when the router's types were missing from the launcher: CAF then delivers an
// empty message, and the router stopped with unexpected_message while the launcher waited).
class stray_message_cluster final : public cluster_control {
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
  kvflow::status kill(caf::event_based_actor*, bool, int) override { return {}; }
  kvflow::status freeze(bool, int) override { return {}; }
  kvflow::status restart_bootstrap() override { return {}; }
  kvflow::status stop_bootstrap(bool) override { return {}; }
  std::uint64_t transfer_bytes(const std::vector<kvflow::command::msg::pool_usage>&) const override { return 0; }
  void stop(caf::event_based_actor* self) override {
    for (auto* side : {&engines_.prefill, &engines_.decode})
      for (auto& a : *side) self->send_exit(a, caf::exit_reason::user_shutdown);
  }

 private:
  cluster_handles engines_;
};

}  // namespace

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
