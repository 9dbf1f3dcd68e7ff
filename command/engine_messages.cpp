#include "command/engine_messages.hpp"

namespace kvflow::command::msg {

void add_engine_message_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<new_request>("kvflow.new_request");
  cfg.add_message_type<abort_request>("kvflow.abort_request");
  cfg.add_message_type<rank_released>("kvflow.rank_released");
  cfg.add_message_type<round_digests>("kvflow.round_digests");
  cfg.add_message_type<pool_usage_query>("kvflow.pool_usage_query");
  cfg.add_message_type<pool_usage>("kvflow.pool_usage");
}

}  // namespace kvflow::command::msg
