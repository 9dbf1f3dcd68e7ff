#pragma once
// What a node link lets through of the messages a peer sends: the payload of a BASP direct or
// routed message, as CAF 0.17 lays it out (node ids, the forwarding stack, then the message's
// type names), read far enough to know what the message is. Pure: no CAF.
//
// CAF delivers an exit message with reason kill past any exit handler, and a down message to
// the down handler as if the actor it names had gone; kvflow sends neither between processes
// (it monitors across them, and CAF reports a remote actor's end through its own BASP down
// operation). So from a peer they are forged, and the link that carried one is cut.
#include <cstddef>
#include <cstdint>
#include <string>

namespace kvflow::runtime {

// BASP operations: the handshakes, those whose payload carries a message, and the proxy
// bookkeeping (a peer made a proxy of an actor here; an actor of a peer is gone).
constexpr std::uint8_t basp_server_handshake = 0x00;
constexpr std::uint8_t basp_client_handshake = 0x01;
constexpr std::uint8_t basp_direct_message = 0x02;
constexpr std::uint8_t basp_routed_message = 0x03;
constexpr std::uint8_t basp_monitor_message = 0x04;
constexpr std::uint8_t basp_down_message = 0x05;

// How much of a payload is read: a message whose type names do not end within it is refused.
constexpr std::size_t basp_inspect_window = 4096;

// Empty when the message at `p` (the first `n` bytes of a payload of `total` bytes) may pass;
// otherwise why not.
std::string basp_message_refusal(bool routed, const std::uint8_t* p, std::size_t n, std::uint64_t total);

// Whether operation `op` names the node it comes from first in its payload: a handshake its
// sender, a routed, monitor or down message its source.
bool basp_names_origin(std::uint8_t op);
// That node id's bytes, from the start of such a payload (`n` bytes of it); empty when they do
// not hold one kvflow's nodes use (CAF's default kind, or the invalid id).
std::string basp_origin_node(const std::uint8_t* p, std::size_t n);
// Such a node id for a log line: its process id and the start of its host id.
std::string basp_node_text(const std::string& node);

}  // namespace kvflow::runtime
