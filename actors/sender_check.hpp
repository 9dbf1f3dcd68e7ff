#pragma once
// Who really sent the message an actor is handling. A node link proves only that its peer holds
// the cluster token; what a message claims (a child index, a rank handle, a round's source) is
// checked here against its sender. CAF sets the sender of a message from another process from
// the link it came on, so a peer cannot pass for an actor of this process; it can only name
// itself or nobody. Exit and down messages are not checked here: CAF's own may come from nobody
// (an actor already gone), and a peer's are refused by the link guard before CAF sees them
// (runtime/basp_message_check.hpp). Internal to actors/.
#include <caf/actor_addr.hpp>
#include <caf/actor_cast.hpp>
#include <spdlog/spdlog.h>

#include <string>

namespace kvflow::detail {

// The current message comes from `who` itself (an anonymous message comes from nobody).
template <class Self>
bool sent_by(Self* self, const caf::actor_addr& who) {
  const auto& s = self->current_sender();
  return s != nullptr && who && caf::actor_cast<caf::actor_addr>(s) == who;
}

// The current message comes from an actor of this process.
template <class Self>
bool from_this_process(Self* self) {
  const auto& s = self->current_sender();
  return s != nullptr && s->node() == self->node();
}

// The current message comes from the process that hosts `handle` (a registration names only
// actors of its own process).
template <class Self, class Handle>
bool from_node_of(Self* self, const Handle& handle) {
  const auto& s = self->current_sender();
  return s != nullptr && handle && s->node() == handle.node();
}

// CAF stops an actor on an error message nobody asked for (its default error handler). One from
// another process is a peer's to send; one from this process answers a message the actor sent
// without a request. Neither is a reason to stop serving: it is logged and dropped.
template <class Self>
void refuse_stray_errors(Self* self, std::string who) {
  self->set_error_handler([self, who = std::move(who)](caf::error& e) {
    spdlog::warn("{}: an error message ({}) from {} dropped", who, self->system().render(e),
                 from_this_process(self) ? "this process" : "another process or nobody");
  });
}

}  // namespace kvflow::detail
