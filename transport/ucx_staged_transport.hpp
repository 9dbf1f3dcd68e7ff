#pragma once
// The staged path across hosts: GPU memory to GPU memory through pinned host memory, with a UCX
// host put as the middle hop, for peers no direct GPU path reaches and whose staging ring this
// process cannot map (another host: transport/staged_transport.hpp is the same-host path).
//
// Receiving, it is the staged transport's receiver unchanged: its ring (made by an inner
// staged_transport) is also registered with this transport's UCX worker, and the endpoint
// carries the worker address and the ring's remote key. A remote sender asks for a lane (an
// active message); the receiver claims one of its ring's lanes for it and answers with the
// lane's slot addresses and a token. One lane per sender worker address: a sender that asks
// again is given the lane it holds (the rule and what it does not bound: accept() in the .cpp).
//
// Sending, it keeps a local ring of one lane per remote receiver (a pinned bounce copy of that
// lane's slots) that its own inner staged_transport fills exactly as it fills a same-host
// receiver's mapped ring: gather kernel and device-to-host on the sender's stream after the
// ready fence, credits, slot timeout. A forwarder thread (asleep on the local ring's doorbell)
// takes each filled slot; the UCX thread puts its data into the receiver's slot, flushes, and
// then sends the slot's runs in a `filled` message. The receiver's UCX thread checks that the
// sender owns the lane and the slot is free, writes the runs into the slot, marks it filled and
// rings the ring's doorbell: from there the receiver checks every run against what it
// registered, copies host-to-device on its stream and gives the slot back; a hook on that
// give-back sends the verdict back, which completes the slot in the local ring, so the inner
// transport frees the credit and completes the push once every slot of it landed.
//
// Failures: a receiver whose endpoint fails (UCX peer error handling: tcp) or that answers no
// slot within slot_timeout fails its pushes in flight with the reason, and later ones at once,
// until connect() is called again; a sender whose endpoint fails, or that says goodbye, has
// its lane released on the receiver. Nothing polls: the forwarder sleeps on a futex, the UCX
// thread on the worker's event fd.
//
// Caution: UCX's emulated puts (tcp) write where the sender says without a check at the
// receiver; a peer that is allowed to connect is trusted to put only into its lane's slots. The
// runs it describes are checked as a same-host sender's are.
#include <chrono>
#include <memory>
#include <string>

#include "transport/staged_transport.hpp"
#include "transport/transport.hpp"

namespace kvflow::transport {

struct ucx_staged_options {
  staged_options staged;  // the device, the ring this endpoint receives into, slot timeout, host copies
  // Which host this endpoint is on, as peers compare it: a peer with the same identity is
  // reached by the staged transport's shared ring, not by this one. Empty: the kernel's boot
  // id. Tests give two instances of one process different identities.
  std::string host_identity;
  // UCX's tcp on every interface, not only loopback (KVFLOW_UCX_TCP=2; ucx_network_policy.hpp).
  bool tcp_beyond_loopback = false;
};

class ucx_staged_transport final : public transport {
 public:
  // `receiving`: the staged transport whose ring this endpoint receives into (a node shares
  // its same-host one, so that one ring serves both); null makes one from options.staged.
  static result<std::unique_ptr<ucx_staged_transport>> create(const ucx_staged_options& options,
                                                              std::shared_ptr<staged_transport> receiving = nullptr);
  // Fails the pushes in flight, says goodbye to every receiver, releases the lanes remote
  // senders hold here, and stops the UCX thread.
  ~ucx_staged_transport() override;

  const char* name() const override { return "staged_ucx"; }
  // Tag, host identity, the UCX worker address, the ring's remote key and shape (once the ring
  // exists: after the first registration or prepare_receiving).
  std::string endpoint() const override;
  std::vector<memory_type> memory_types() const override;
  // Reaches other hosts; orders pushes after a CUDA event on the GPU (not with host copies).
  capabilities query() const override;
  // A staged_ucx endpoint with a ring, of another host identity.
  bool can_connect(const std::string& endpoint) const override;
  // Makes the receiving ring (pinned) and registers it with UCX.
  status prepare_receiving();
  result<region_desc> register_memory(std::uint64_t owner, void* base, std::uint64_t len) override;
  void deregister_memory(std::uint64_t region) override;
  status connect(std::uint64_t peer, const std::string& endpoint, const std::vector<region_desc>& regions) override;
  void disconnect(std::uint64_t peer) override;
  void push(std::uint64_t peer, const std::vector<block>& blocks, completion done) override;
  void push_after(std::uintptr_t ready_fence, std::uint64_t peer, const std::vector<block>& blocks,
                  completion done) override;
  std::uint64_t bytes_moved() const override;
  // How often a forwarder thread woke though its doorbell had not rung (a timed-out or spurious
  // sleep): what an idle link would cost if it polled. It does not: 0 but for a signal. For tests.
  std::uint64_t forwarder_unrung_wakeups() const;

  struct impl;

 private:
  explicit ucx_staged_transport(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace kvflow::transport
