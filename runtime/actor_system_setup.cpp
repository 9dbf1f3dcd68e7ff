#include "runtime/actor_system_setup.hpp"

#include "actors/messages.hpp"

namespace kvflow::runtime {

void configure_actor_system(caf::actor_system_config& cfg) {
  msg::add_message_types(cfg);
  cfg.set("logger.verbosity", caf::atom("quiet"));
  cfg.set("work-stealing.moderate-poll-attempts", 0);
}

}  // namespace kvflow::runtime
