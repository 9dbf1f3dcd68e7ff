#include "actors/messages.hpp"

namespace kvflow::msg {

// Only what crosses processes is registered. A type CAF does not know cannot be deserialized,
// so what a rank takes only from its own process (the engine's calls, its timers, transport
// completions, the local step board) cannot come from a peer.
void add_message_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<step_report>("kvflow.step_report");
  cfg.add_message_type<agreed_round>("kvflow.agreed_round");
  cfg.add_message_type<attach_child>("kvflow.attach_child");
  cfg.add_message_type<attach_rank>("kvflow.attach_rank");
  cfg.add_message_type<register_rank>("kvflow.register_rank");
  cfg.add_message_type<registration_reply>("kvflow.registration_reply");
  cfg.add_message_type<register_decode>("kvflow.register_decode");
  cfg.add_message_type<lookup_decode>("kvflow.lookup_decode");
  cfg.add_message_type<decode_entry>("kvflow.decode_entry");
  cfg.add_message_type<register_node>("kvflow.register_node");
  cfg.add_message_type<node_entry>("kvflow.node_entry");
  cfg.add_message_type<node_query>("kvflow.node_query");
  cfg.add_message_type<node_table>("kvflow.node_table");
  cfg.add_message_type<register_supervisor>("kvflow.register_supervisor");
  cfg.add_message_type<lookup_supervisor>("kvflow.lookup_supervisor");
  cfg.add_message_type<supervisor_entry>("kvflow.supervisor_entry");
  cfg.add_message_type<set_registry>("kvflow.set_registry");
  cfg.add_message_type<transport::region_desc>("kvflow.region_desc");
  cfg.add_message_type<remote_buffer>("kvflow.remote_buffer");
  cfg.add_message_type<topology_query>("kvflow.topology_query");
  cfg.add_message_type<topology_reply>("kvflow.topology_reply");
  cfg.add_message_type<kv_registration>("kvflow.kv_registration");
  cfg.add_message_type<dst_info>("kvflow.dst_info");
  cfg.add_message_type<abort_room>("kvflow.abort_room");
  cfg.add_message_type<kv_status>("kvflow.kv_status");
  cfg.add_message_type<abort_ack>("kvflow.abort_ack");
}

}  // namespace kvflow::msg
