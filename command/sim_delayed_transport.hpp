#pragma once
// The interleaved simulator's transport: it holds every push in flight and lands the held pushes
// one at a time, in an order the run picks at random among the actors' messages. A push must be
// picked a number of times drawn when it is made (most once, some up to 64 times: a congested
// lane), so the delays have a long tail and a stale push can outlive the next request. Completions so
// come late and out of order (a request's last chunk may land before its first, as across
// several UCX lanes), and a push may still be moving when its request fails: what the release
// contract (semantics.md §5) has to survive. It copies through the transport it wraps and starts
// no thread; the run that lands its pushes is the only clock it has.
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <vector>

#include "transport/transport.hpp"

namespace kvflow::command {

class delayed_transport final : public kvflow::transport::transport {
 public:
  delayed_transport(std::shared_ptr<kvflow::transport::transport> real, std::uint64_t seed)
      : real_(std::move(real)), rng_(seed) {}
  const char* name() const override { return "delayed"; }
  std::string endpoint() const override { return real_->endpoint(); }
  std::vector<kvflow::transport::memory_type> memory_types() const override { return real_->memory_types(); }
  result<kvflow::transport::region_desc> register_memory(std::uint64_t owner, void* base, std::uint64_t len) override {
    return real_->register_memory(owner, base, len);
  }
  result<kvflow::transport::allocation> allocate_memory(std::uint64_t owner, std::uint64_t len) override {
    return real_->allocate_memory(owner, len);
  }
  result<kvflow::transport::region_desc> region_of(const void* base, std::uint64_t len) const override {
    return real_->region_of(base, len);
  }
  void deregister_memory(std::uint64_t region) override { real_->deregister_memory(region); }
  status connect(std::uint64_t peer, const std::string& endpoint,
                 const std::vector<kvflow::transport::region_desc>& regions) override {
    return real_->connect(peer, endpoint, regions);
  }
  // Pushes held for `peer` complete with an error, unlanded (the interface's promise).
  void disconnect(std::uint64_t peer) override;
  void push(std::uint64_t peer, const std::vector<kvflow::transport::block>& blocks, kvflow::transport::completion done) override;
  std::uint64_t bytes_moved() const override { return real_->bytes_moved(); }

  std::size_t held() const;
  // Picks held push `i` (of held()): once it was picked as often as drawn, it lands through the
  // wrapped transport (its completion runs here) and the call answers true.
  bool pick(std::size_t i);
  // Drops, uncompleted, every held push whose source memory `from` claims: its sender died (a
  // process that died writes nothing more), and nobody is left to take the completion.
  std::size_t drop_from(const std::function<bool(const std::byte*)>& from);
  // Pushes held since the start (a run that held none did not exercise what it claims).
  std::uint64_t held_total() const;

 private:
  struct pending {
    std::uint64_t peer = 0;
    std::vector<kvflow::transport::block> blocks;
    kvflow::transport::completion done;
    std::uint32_t picks_left = 1;
  };
  std::vector<pending> take_if(const std::function<bool(const pending&)>& pred);

  std::shared_ptr<kvflow::transport::transport> real_;
  mutable std::mutex mutex_;  // pushes come from the actors; land() from the run's loop
  std::vector<pending> held_;
  std::mt19937_64 rng_;
  std::uint64_t held_total_ = 0;
};

}  // namespace kvflow::command
