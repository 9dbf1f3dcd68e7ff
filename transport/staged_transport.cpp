#include "transport/staged_transport.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <utility>

#include "cuda/gpu.hpp"
#include "cuda/kernels.hpp"
#include "transport/byte_codec.hpp"
#include "transport/host_identity.hpp"
#include "transport/shared_futex.hpp"

namespace kvflow::transport {

namespace {

constexpr char endpoint_tag[] = "kvflow-staged-1";
constexpr char region_key[] = "staged";
// How often a lane's thread that waits on its receiver (a slot handed over, a push queued)
// looks whether that process still exists: a dead receiver rings no bell. Only while the lane
// has work out, never while it is idle; a push to a receiver that died while the lane was idle
// rings the bell and finds it gone at once. A pidfd would tell the death itself, but a futex
// sleep cannot also wait on a file descriptor (it would take one more thread, to poll pidfds and
// ring for the dead); the interval is what that saves: pushes out to a receiver that died fail
// within it, not at once.
constexpr std::chrono::milliseconds receiver_check{1000};

// Wake-ups of the lanes' and the takers' threads that found their bell unrung (unrung_wakeups()).
std::atomic<std::uint64_t> unrung{0};

using clock_type = std::chrono::steady_clock;
using finished_list = std::vector<std::pair<completion, status>>;

void run(finished_list& f) {
  for (auto& [done, s] : f) done(std::move(s));
  f.clear();
}

struct peer_endpoint {
  std::string boot;
  std::uint64_t pid = 0;
  std::string ring;
};

result<peer_endpoint> unpack_endpoint(const std::string& e) {
  const std::size_t tag = sizeof endpoint_tag;
  if (e.size() < tag || std::memcmp(e.data(), endpoint_tag, tag) != 0) return status::error("not a staged endpoint");
  std::size_t at = tag;
  peer_endpoint p;
  if (!codec::get_string(e, at, p.boot, 64) || !codec::get(e, at, p.pid) || !codec::get_string(e, at, p.ring, 200) ||
      at != e.size())
    return status::error("staged endpoint: malformed");
  if (p.ring.empty() || p.ring[0] != '/' || p.ring.find('/', 1) != std::string::npos)
    return status::error("staged endpoint: bad ring name");
  return p;
}

// Copies between a contiguous range of the ring (a slot's data) and scattered device pages. On
// the GPU through a bounce buffer in device memory: the pages are gathered into it (or out of
// it) by a kernel at device speed, and the slot moves by one cudaMemcpyAsync on a copy engine.
// A kernel that reads or writes host memory itself is bound by its own PCIe requests and, with
// the other side's kernel running at once, reached half the link here; copy engines each way
// run side by side. The kernel reads its block list in place from pinned memory: uploading it
// would be a host-to-device copy on this stream, queued behind the other direction's slot
// copies on the same engine, which stalls this stream's own slot copy behind them. With host
// copies it is memcpy.
class copier {
 public:
  struct ticket {
    cuda::event ev;  // blocking: finish() sleeps on it
    cuda::pinned_buffer host;  // the block list, read by the kernel in place
    cuda::device_buffer bounce;  // a slot's bytes in device memory
  };
  enum class direction { into_ring, out_of_ring };

  static result<std::unique_ptr<copier>> create(int device, bool host) {
    auto c = std::unique_ptr<copier>(new copier);
    c->device_ = device;
    c->host_ = host;
    if (host) return c;
    auto s = cuda::stream::create(device);
    if (!s) return s.error();
    c->stream_ = std::move(s.value());
    if (auto k = cuda::launch_gather(nullptr, 0, c->stream_.handle()); !k) return k;
    return c;
  }

  // The stream waits on the GPU for the engine's event before any batch submitted later.
  status wait_fence(std::uintptr_t fence) {
    if (fence == 0) return {};
    if (host_) return status::error("staged: host copies cannot wait for a CUDA event");
    std::lock_guard<std::mutex> g(m_);
    if (auto s = cuda::set_device(device_); !s) return s;
    return cuda::wait_for_external_event(stream_, fence);
  }

  // `copies` write into (or read out of) [range, range + used) of the ring, `range` being where
  // the ring's host memory is; `slot_bytes` bounds `used`.
  result<std::unique_ptr<ticket>> submit(direction dir, std::vector<cuda::copy_desc>& copies, std::byte* range,
                                         std::uint64_t used, std::uint64_t slot_bytes) {
    if (host_) {
      for (const auto& c : copies)
        std::memcpy(reinterpret_cast<void*>(c.dst), reinterpret_cast<const void*>(c.src), c.len);
      return std::make_unique<ticket>();
    }
    std::lock_guard<std::mutex> g(m_);
    if (auto s = cuda::set_device(device_); !s) return s;
    auto t = take(std::max<std::size_t>(copies.size(), 1) * sizeof(cuda::copy_desc), slot_bytes);
    if (!t) return t.error();
    auto& k = *t.value();
    const auto ring = reinterpret_cast<std::uint64_t>(range);
    const auto bounce = reinterpret_cast<std::uint64_t>(k.bounce.data());
    for (auto& c : copies) (dir == direction::into_ring ? c.dst : c.src) += bounce - ring;
    std::memcpy(k.host.data(), copies.data(), copies.size() * sizeof(cuda::copy_desc));
    status s;
    if (dir == direction::out_of_ring) s = cuda::copy_async(k.bounce.data(), range, used, stream_);
    if (s)
      s = cuda::launch_gather(reinterpret_cast<const cuda::copy_desc*>(k.host.device_data()),
                              static_cast<std::uint32_t>(copies.size()), stream_.handle());
    if (s && dir == direction::into_ring) s = cuda::copy_async(range, k.bounce.data(), used, stream_);
    if (s) s = k.ev.record(stream_);
    if (!s) {
      (void)stream_.synchronize();  // the list may be in use by work queued before the failure
      free_.push_back(std::move(t.value()));
      return s;
    }
    return std::move(t.value());
  }

  // Sleeps until the batch's copies finished; an error is the GPU's.
  status finish(std::unique_ptr<ticket> t) {
    if (host_) return {};
    status s = t->ev.synchronize();
    std::lock_guard<std::mutex> g(m_);
    free_.push_back(std::move(t));
    if (!s) return status::error("staged copy failed on the GPU: " + s.reason());
    return s;
  }

 private:
  copier() = default;

  // A ticket from the pool, or a new one (under m_).
  result<std::unique_ptr<ticket>> take(std::uint64_t list_bytes, std::uint64_t slot_bytes) {
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if ((*it)->host.size() >= list_bytes && (*it)->bounce.size() >= slot_bytes) {
        auto t = std::move(*it);
        free_.erase(it);
        return t;
      }
    auto t = std::make_unique<ticket>();
    std::uint64_t cap = 64u << 10;
    while (cap < list_bytes) cap *= 2;
    auto ev = cuda::event::create_blocking(device_);
    if (!ev) return ev.error();
    auto h = cuda::pinned_buffer::create(cap);
    if (!h) return h.error();
    auto b = cuda::device_buffer::create(device_, slot_bytes);
    if (!b) return b.error();
    t->ev = std::move(ev.value());
    t->host = std::move(h.value());
    t->bounce = std::move(b.value());
    return t;
  }

  int device_ = 0;
  bool host_ = false;
  std::mutex m_;  // the stream's order, and the pool
  cuda::stream stream_;
  std::vector<std::unique_ptr<ticket>> free_;
};

}  // namespace

struct staged_transport::impl {
  // ---- sending ----
  struct job {
    std::uint64_t peer = 0;
    std::vector<block> blocks;
    completion done;
    std::size_t next = 0;   // the first block not yet in a slot...
    std::uint64_t at = 0;   // ...and how much of it is
    std::uint32_t out = 0;  // slots of it in flight
    bool built = false, completed = false;
    status first;
  };
  enum class phase { idle, gpu, handed };
  struct slot_use {
    phase ph = phase::idle;
    std::shared_ptr<job> j;
    std::uint64_t bytes = 0;
    clock_type::time_point since;
  };
  // A lane of one receiver's ring, shared by every peer (decode rank) behind that ring.
  struct lane_link {
    std::unique_ptr<staging_ring> ring;
    cuda::host_registration pinned;  // the ring, pinned here for the copy engines
    int lane = -1;
    std::uint64_t claimant = 0, receiver_pid = 0;
    std::mutex m;  // everything below
    std::deque<std::shared_ptr<job>> queue;
    std::vector<slot_use> slots;
    std::uint32_t peers = 0;  // connected peers that push through it
    bool closing = false;
    status dead;  // an error once the receiver is gone or frozen: pushes fail at once
    std::uint64_t seq = 0;
  };
  struct handed_over {
    std::shared_ptr<lane_link> l;
    int slot;
    std::unique_ptr<copier::ticket> t;
  };
  struct peer_link {
    std::shared_ptr<lane_link> l;
    std::unordered_map<std::uint64_t, std::uint64_t> sizes;  // region -> bytes, as described
  };

  // ---- receiving ----
  struct local_region {
    std::uint64_t owner;
    std::byte* base;
    std::uint64_t len;
  };
  struct taken {
    int lane, slot;
    std::unique_ptr<copier::ticket> t;
  };

  staged_options options;
  std::string boot = boot_id();
  std::string ring_name;
  std::unique_ptr<copier> send_copier, recv_copier;
  std::atomic<std::uint64_t> bytes{0};

  std::mutex m;  // peers, lanes, regions, the receiving ring
  std::unordered_map<std::uint64_t, peer_link> peers;
  std::map<std::string, std::weak_ptr<lane_link>> lanes;  // by ring name
  std::uint64_t next_region = 1;
  std::unordered_map<std::uint64_t, local_region> regions;
  std::unique_ptr<staging_ring> ring;  // made at the first registration
  cuda::host_registration ring_pinned;
  std::uint64_t launched = 0;  // slots whose copies were queued...

  std::mutex q_m;  // the two hand-over queues below, and `completed`
  std::condition_variable q_cv;
  std::deque<handed_over> to_hand;  // filled on the GPU, to be handed to the receiver
  std::deque<taken> to_return;      // copied out of the ring, to be given back
  std::uint64_t completed = 0;      // ...and of those, the ones that finished
  std::condition_variable completed_cv;
  std::uint32_t live_threads = 0;
  std::condition_variable threads_cv;
  bool stopping = false;

  std::thread publisher, returner, taker;
  std::mutex hook_m;  // held while the hook runs, so that replacing it waits for a running call
  std::function<void(int)> return_hook;

  // The next entry of a hand-over queue, waiting for one; none once stopping left it empty.
  template <class T>
  std::optional<T> next_of(std::deque<T>& q) {
    std::unique_lock<std::mutex> g(q_m);
    q_cv.wait(g, [&] { return stopping || !q.empty(); });
    if (q.empty()) return std::nullopt;
    std::optional<T> v(std::move(q.front()));
    q.pop_front();
    return v;
  }

  // ---- sending ----

  static void complete(job& j, status s, finished_list& f) {
    if (j.completed) return;
    j.completed = true;
    f.emplace_back(std::move(j.done), std::move(s));
  }

  void account(slot_use& u, const status& s, finished_list& f) {
    auto j = std::move(u.j);
    u.ph = phase::idle;
    if (!j) return;
    --j->out;
    if (s)
      bytes.fetch_add(u.bytes, std::memory_order_relaxed);
    else if (j->first)
      j->first = s;
    if (j->built && j->out == 0) complete(*j, j->first, f);
  }

  // Fills slot `s` from the queue's first push (under l.m) and queues its copy into the ring.
  void fill(const std::shared_ptr<lane_link>& lp, int s, finished_list& f) {
    auto& l = *lp;
    auto j = l.queue.front();
    const auto& shape = l.ring->shape();
    std::vector<staged_desc> runs;
    std::vector<cuda::copy_desc> copies;
    std::byte* slot = l.ring->data(l.lane, s);
    const std::uint64_t dst = reinterpret_cast<std::uint64_t>(slot);
    std::uint64_t used = 0;
    while (j->next < j->blocks.size() && runs.size() < shape.max_descs && used < shape.slot_bytes) {
      const auto& b = j->blocks[j->next];
      const std::uint64_t take = std::min(b.len - j->at, shape.slot_bytes - used);
      runs.push_back({b.region, b.offset + j->at, take});
      cuda::append_split(copies, {reinterpret_cast<std::uint64_t>(b.src) + j->at, dst + used, take});
      used += take;
      j->at += take;
      if (j->at == b.len) {
        ++j->next;
        j->at = 0;
      }
    }
    if (j->next == j->blocks.size()) {
      j->built = true;
      l.queue.pop_front();
    }
    l.ring->write_descs(l.lane, s, runs, ++l.seq);
    auto t = send_copier->submit(copier::direction::into_ring, copies, slot, used, shape.slot_bytes);
    if (!t) {
      if (j->first) j->first = t.error();
      if (!j->built) {  // the rest of it is not worth moving
        j->built = true;
        l.queue.pop_front();
      }
      if (j->out == 0) complete(*j, j->first, f);
      return;
    }
    auto& u = l.slots[s];
    u.ph = phase::gpu;
    u.j = j;
    u.bytes = used;
    ++j->out;
    std::lock_guard<std::mutex> g(q_m);
    to_hand.push_back({lp, s, std::move(t.value())});
  }

  // Fails what the lane still holds (under l.m): the queue, and slots handed over that the
  // receiver has not taken (withdrawn, so that it never copies them). A slot it took is being
  // copied on its GPU already; its push fails now, its bytes may still land. One taken and not
  // given back in the slot timeout belongs to a receiver frozen after it queued the copy: let go.
  void fail_all(lane_link& l, const status& why, finished_list& f) {
    for (auto& j : l.queue) {
      j->built = true;
      complete(*j, why, f);
    }
    l.queue.clear();
    for (std::size_t s = 0; s < l.slots.size(); ++s) {
      auto& u = l.slots[s];
      if (u.j) complete(*u.j, why, f);
      if (u.ph != phase::handed) continue;
      if (l.ring->exchange_state(l.lane, static_cast<int>(s), slot_state::filled, slot_state::free) ||
          !process_alive(l.receiver_pid) || clock_type::now() - u.since > options.slot_timeout) {
        u.ph = phase::idle;
        u.j.reset();
      }
    }
  }

  // The lane's thread: reaps the slots the receiver gave back, fills free ones from the queue,
  // and notices a dead or frozen receiver; asleep on the lane's bell otherwise. What rings it: a
  // push (submit), a slot the GPU filled (the publisher), a slot the receiver gave back, a peer
  // leaving or failed (leave, fail_peer). What does not: a slot's deadline and the receiver's
  // death, so while the lane has work out it sleeps at most to the next deadline or
  // receiver_check; idle, it sleeps until rung.
  void stage_loop(std::shared_ptr<lane_link> lp) {
    auto& l = *lp;
    auto& bell = l.ring->bell(l.lane);
    finished_list f;
    for (;;) {
      // The bell before the lane's state: a change made after this load bumps the bell after
      // it, so the sleep below returns at once.
      const std::uint32_t seen = bell.load(std::memory_order_acquire);
      bool progress = false, leave = false, waiting = false;
      clock_type::time_point wake_by{};
      {
        std::lock_guard<std::mutex> g(l.m);
        for (std::size_t s = 0; s < l.slots.size(); ++s) {
          auto& u = l.slots[s];
          if (u.ph != phase::handed) continue;
          if (l.ring->load_state(l.lane, static_cast<int>(s)) != slot_state::done) continue;
          account(u, l.ring->read_verdict(l.lane, static_cast<int>(s)), f);
          progress = true;
        }
        if (l.dead) {
          if (!process_alive(l.receiver_pid))
            l.dead = status::error("staged: receiver process " + std::to_string(l.receiver_pid) + " is gone");
          else
            for (const auto& u : l.slots)
              if (u.ph == phase::handed && clock_type::now() - u.since > options.slot_timeout)
                l.dead = status::error("staged: the receiver took no slot in " +
                                       std::to_string(options.slot_timeout.count()) + " ms");
        }
        if (!l.dead)
          fail_all(l, l.dead, f);
        else if (l.closing)
          fail_all(l, status::error("staged: peer disconnected"), f);
        else
          for (int s = 0; s < static_cast<int>(l.slots.size()) && !l.queue.empty(); ++s) {
            const auto st = l.ring->load_state(l.lane, s);
            // A slot a former owner of the lane handed over is the receiver's until it is done.
            if (l.slots[s].ph != phase::idle || st == slot_state::filled || st == slot_state::taken) continue;
            fill(lp, s, f);
            progress = true;
          }
        bool busy = false;
        for (const auto& u : l.slots) busy = busy || u.ph != phase::idle;
        if (!l.dead || l.closing) leave = !busy;
        // Work out: a slot handed over has its deadline (fail_all and the check above act once
        // it passed: the first microsecond after), and the receiver may die meanwhile.
        waiting = busy || !l.queue.empty();
        if (waiting) {
          const auto now = clock_type::now();
          wake_by = now + receiver_check;
          for (const auto& u : l.slots)
            if (u.ph == phase::handed)
              wake_by = std::min(wake_by, u.since + options.slot_timeout + std::chrono::microseconds(1));
        }
      }
      if (progress) q_cv.notify_all();
      run(f);
      if (leave) break;
      if (progress) continue;
      if (waiting) {
        const auto left = std::chrono::ceil<std::chrono::microseconds>(wake_by - clock_type::now());
        if (left.count() <= 0) continue;
        futex_wait(bell, seen, left);
      } else {
        futex_wait(bell, seen);
      }
      // Woken with the bell where it was: a deadline, a look at the receiver, or a spurious wake.
      if (bell.load(std::memory_order_acquire) == seen) unrung.fetch_add(1, std::memory_order_relaxed);
    }
    l.ring->release_lane(l.lane, l.claimant);
    lp.reset();  // the last reference unpins and unmaps the ring here, outside every lock
    std::lock_guard<std::mutex> g(q_m);
    --live_threads;
    threads_cv.notify_all();
  }

  // Hands each filled slot to its receiver once the GPU wrote it, in the order queued (one
  // stream: the order they complete in).
  void publish_loop() {
    finished_list f;
    for (;;) {
      auto next = next_of(to_hand);
      if (!next) return;
      handed_over h = std::move(*next);
      status s = send_copier->finish(std::move(h.t));
      auto& l = *h.l;
      bool handed = false;
      {
        std::lock_guard<std::mutex> g(l.m);
        auto& u = l.slots[h.slot];
        if (!s || !l.dead || l.closing || !u.j || u.j->completed) {
          account(u, s ? status::error("staged: push abandoned") : s, f);
        } else {
          u.ph = phase::handed;
          u.since = clock_type::now();
          // Marked handed before the receiver can see it: its verdict finds the slot waiting.
          l.ring->store_state(l.lane, h.slot, slot_state::filled);
          handed = true;
        }
      }
      if (handed) futex_bump(l.ring->doorbell());
      futex_bump(l.ring->bell(l.lane));  // the lane's thread may be waiting for this slot
      run(f);
    }
  }

  // ---- receiving ----

  // Takes every slot senders handed over: checks its runs against the registered regions and
  // queues its copy; asleep on the ring's doorbell otherwise, with no timeout. A sender marks a
  // slot filled, then rings; the destructor sets `stopping`, then rings. Nothing here has a
  // deadline (the slots' are the senders'), and a dead sender needs nothing of this thread: its
  // filled slots are taken as any, its lane goes to the next claimant (claim_lane).
  void take_loop() {
    auto& r = *ring;
    auto& doorbell = r.doorbell();
    const auto& shape = r.shape();
    for (;;) {
      // The bell before `stopping`: a stop that the check below missed bumps the bell after
      // this load, so the sleep returns at once; one whose bump this load saw is seen below.
      const std::uint32_t seen = doorbell.load(std::memory_order_acquire);
      {
        std::lock_guard<std::mutex> g(q_m);
        if (stopping) return;
      }
      bool found = false;
      for (int l = 0; l < static_cast<int>(shape.lanes); ++l)
        for (int s = 0; s < static_cast<int>(shape.slots); ++s) {
          if (!r.exchange_state(l, s, slot_state::filled, slot_state::taken)) continue;
          found = true;
          take(l, s);
        }
      if (found) continue;
      futex_wait(doorbell, seen);
      // Woken with the bell where it was: a spurious wake, what a poll would cost.
      if (doorbell.load(std::memory_order_acquire) == seen) unrung.fetch_add(1, std::memory_order_relaxed);
    }
  }

  void give_back(int l, int s, const status& verdict) {
    ring->write_verdict(l, s, verdict);
    ring->store_state(l, s, slot_state::done);
    futex_bump(ring->bell(l));
    std::lock_guard<std::mutex> g(hook_m);
    if (return_hook) return_hook(l);
  }

  void take(int l, int s) {
    auto runs = ring->read_descs(l, s);
    if (!runs) return give_back(l, s, runs.error());
    std::vector<cuda::copy_desc> copies;
    std::byte* slot = ring->data(l, s);
    const std::uint64_t src = reinterpret_cast<std::uint64_t>(slot);
    std::uint64_t at = 0;
    std::unique_lock<std::mutex> g(m);  // a region deregistered from here on is not written
    for (const auto& run : runs.value()) {
      auto it = regions.find(run.region);
      if (it == regions.end()) {
        g.unlock();
        return give_back(l, s, status::error("region " + std::to_string(run.region) + " is not registered here"));
      }
      const auto& reg = it->second;
      if (run.offset > reg.len || run.len > reg.len - run.offset) {
        g.unlock();
        return give_back(l, s, status::error("run [" + std::to_string(run.offset) + ", +" + std::to_string(run.len) +
                                                 ") outside region " + std::to_string(run.region) + " of " +
                                                 std::to_string(reg.len) + " bytes"));
      }
      cuda::append_split(copies, {src + at, reinterpret_cast<std::uint64_t>(reg.base + run.offset), run.len});
      at += run.len;
    }
    auto t = recv_copier->submit(copier::direction::out_of_ring, copies, slot, at, ring->shape().slot_bytes);
    if (!t) {
      g.unlock();
      return give_back(l, s, t.error());
    }
    ++launched;
    g.unlock();
    std::lock_guard<std::mutex> q(q_m);
    to_return.push_back({l, s, std::move(t.value())});
    q_cv.notify_all();
  }

  // Gives each taken slot back once its copy finished (the bytes are in the receiver's memory).
  void return_loop() {
    for (;;) {
      auto next = next_of(to_return);
      if (!next) return;
      taken t = std::move(*next);
      give_back(t.lane, t.slot, recv_copier->finish(std::move(t.t)));
      std::lock_guard<std::mutex> g(q_m);
      ++completed;
      completed_cv.notify_all();
    }
  }

  status make_ring() {
    auto r = staging_ring::create(ring_name, options.ring);
    if (!r) return r.error();
    ring = std::move(r.value());
    if (!options.host_copies) {
      auto p = cuda::host_registration::create(ring->base(), ring->bytes());
      if (!p) {
        ring.reset();
        return status::error("staged: pinning the ring: " + p.error().reason());
      }
      ring_pinned = std::move(p.value());
    }
    taker = std::thread([this] { take_loop(); });
    returner = std::thread([this] { return_loop(); });
    return {};
  }

  result<std::shared_ptr<lane_link>> open_lane(const peer_endpoint& p) {
    auto opened = staging_ring::open(p.ring);
    if (!opened) return opened.error();
    auto l = std::make_shared<lane_link>();
    l->ring = std::move(opened.value());
    if (l->ring->creator_pid() != p.pid) return status::error("staged: ring " + p.ring + " is not the peer's");
    l->receiver_pid = p.pid;
    if (!options.host_copies) {
      auto pin = cuda::host_registration::create(l->ring->base(), l->ring->bytes());
      if (!pin) return status::error("staged: pinning ring " + p.ring + ": " + pin.error().reason());
      l->pinned = std::move(pin.value());
    }
    static std::atomic<std::uint32_t> serial{1};
    l->claimant = (static_cast<std::uint64_t>(::getpid()) << 32) | serial.fetch_add(1);
    l->lane = l->ring->claim_lane(l->claimant);
    if (l->lane < 0)
      return status::error("staged: every lane of ring " + p.ring + " is held (" +
                           std::to_string(l->ring->shape().lanes) + " senders)");
    l->slots.resize(l->ring->shape().slots);
    {
      std::lock_guard<std::mutex> g(q_m);
      ++live_threads;
    }
    std::thread([this, l] { stage_loop(l); }).detach();
    return l;
  }

  // A peer stops pushing through its lane: its pushes fail; the lane closes with its last peer.
  void leave(std::uint64_t peer, const std::shared_ptr<lane_link>& l) {
    finished_list f;
    {
      std::lock_guard<std::mutex> g(l->m);
      const status why = status::error("staged: peer " + std::to_string(peer) + " disconnected");
      for (auto it = l->queue.begin(); it != l->queue.end();)
        if ((*it)->peer == peer) {
          (*it)->built = true;
          complete(**it, why, f);
          it = l->queue.erase(it);
        } else {
          ++it;
        }
      for (auto& u : l->slots)
        if (u.j && u.j->peer == peer) complete(*u.j, why, f);
      if (--l->peers == 0) l->closing = true;
    }
    futex_bump(l->ring->bell(l->lane));
    run(f);
  }

  void submit(std::uintptr_t fence, std::uint64_t peer, const std::vector<block>& blocks, completion done) {
    std::shared_ptr<lane_link> l;
    auto j = std::make_shared<job>();
    {
      std::lock_guard<std::mutex> g(m);
      auto it = peers.find(peer);
      if (it == peers.end()) {
        j.reset();
      } else {
        l = it->second.l;
        const auto& sizes = it->second.sizes;
        for (const auto& b : blocks) {
          auto r = sizes.find(b.region);
          std::string bad;
          if (r == sizes.end())
            bad = "staged: region " + std::to_string(b.region) + " is not registered by peer " + std::to_string(peer);
          else if (b.offset > r->second || b.len > r->second - b.offset)
            bad = "staged: block [" + std::to_string(b.offset) + ", +" + std::to_string(b.len) + ") outside region " +
                  std::to_string(b.region) + " of " + std::to_string(r->second) + " bytes";
          if (!bad.empty()) return done(status::error(std::move(bad)));
          if (b.len > 0) j->blocks.push_back(b);
        }
      }
    }
    if (!j) return done(status::error("staged: peer " + std::to_string(peer) + " is not connected"));
    if (j->blocks.empty()) return done(status{});
    if (auto s = send_copier->wait_fence(fence); !s) return done(status::error("staged: " + s.reason()));
    j->peer = peer;
    j->done = std::move(done);
    {
      std::lock_guard<std::mutex> g(l->m);
      if (!l->dead || l->closing) {
        completion d = std::move(j->done);
        status why = l->dead ? status::error("staged: peer disconnected") : l->dead;
        return d(std::move(why));
      }
      l->queue.push_back(std::move(j));
    }
    futex_bump(l->ring->bell(l->lane));
  }
};

result<std::unique_ptr<staged_transport>> staged_transport::create(const staged_options& options) {
  auto p = std::make_unique<impl>();
  p->options = options;
  static std::atomic<std::uint32_t> instances{0};
  p->ring_name = "/kvflow-staged-" + std::to_string(::getpid()) + "-" + std::to_string(instances.fetch_add(1));
  auto send = copier::create(options.device, options.host_copies);
  if (!send) return status::error("staged: " + send.error().reason());
  auto recv = copier::create(options.device, options.host_copies);
  if (!recv) return status::error("staged: " + recv.error().reason());
  p->send_copier = std::move(send.value());
  p->recv_copier = std::move(recv.value());
  auto* raw = p.get();
  p->publisher = std::thread([raw] { raw->publish_loop(); });
  return std::unique_ptr<staged_transport>(new staged_transport(std::move(p)));
}

staged_transport::staged_transport(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

staged_transport::~staged_transport() {
  auto& p = *impl_;
  std::vector<std::pair<std::uint64_t, std::shared_ptr<impl::lane_link>>> left;
  {
    std::lock_guard<std::mutex> g(p.m);
    for (auto& [peer, link] : p.peers) left.emplace_back(peer, link.l);
    p.peers.clear();
  }
  for (auto& [peer, l] : left) p.leave(peer, l);
  left.clear();
  {
    // Every lane's thread ends once the GPU finished its slots (the publisher hands them back).
    std::unique_lock<std::mutex> g(p.q_m);
    p.threads_cv.wait(g, [&] { return p.live_threads == 0; });
    p.stopping = true;
  }
  p.q_cv.notify_all();
  if (p.ring) futex_bump(p.ring->doorbell());
  p.publisher.join();
  if (p.taker.joinable()) p.taker.join();
  if (p.returner.joinable()) p.returner.join();
}

std::string staged_transport::endpoint() const { return endpoint_of_ring(impl_->ring_name); }

std::vector<memory_type> staged_transport::memory_types() const {
  return {impl_->options.host_copies ? memory_type::host : memory_type::cuda};
}

capabilities staged_transport::query() const { return {memory_types(), false, !impl_->options.host_copies}; }

bool staged_transport::can_connect(const std::string& endpoint) const {
  auto p = unpack_endpoint(endpoint);
  return p && !impl_->boot.empty() && p.value().boot == impl_->boot;
}

status staged_transport::prepare_receiving() {
  std::lock_guard<std::mutex> g(impl_->m);
  return impl_->ring ? status{} : impl_->make_ring();
}

result<region_desc> staged_transport::register_memory(std::uint64_t owner, void* base, std::uint64_t len) {
  if (!impl_->options.host_copies && cuda::query_pointer(base).kind != cuda::pointer_kind::device)
    return status::error("staged: registered memory is not device memory");
  std::lock_guard<std::mutex> g(impl_->m);
  if (!impl_->ring)
    if (auto s = impl_->make_ring(); !s) return s;
  const std::uint64_t id = impl_->next_region++;
  impl_->regions.emplace(id, impl::local_region{owner, static_cast<std::byte*>(base), len});
  return region_desc{id, len, reinterpret_cast<std::uintptr_t>(base), region_key};
}

void staged_transport::deregister_memory(std::uint64_t region) {
  std::uint64_t queued = 0;
  {
    std::lock_guard<std::mutex> g(impl_->m);
    impl_->regions.erase(region);
    queued = impl_->launched;
  }
  // Slots taken before the erase may still copy into it: wait for those.
  std::unique_lock<std::mutex> g(impl_->q_m);
  impl_->completed_cv.wait(g, [&] { return impl_->completed >= queued; });
}

status staged_transport::connect(std::uint64_t peer, const std::string& endpoint,
                                 const std::vector<region_desc>& regions) {
  auto p = unpack_endpoint(endpoint);
  if (!p) return p.error();
  if (p.value().boot != impl_->boot) return status::error("staged: peer " + std::to_string(peer) + " is on another host");
  impl::peer_link link;
  for (const auto& d : regions) {
    if (d.remote_key != region_key) return status::error("staged: region " + std::to_string(d.id) + " is not staged");
    link.sizes[d.id] = d.size;
  }
  std::shared_ptr<impl::lane_link> old;
  {
    std::lock_guard<std::mutex> g(impl_->m);
    auto l = impl_->lanes[p.value().ring].lock();
    bool usable = false;
    if (l) {
      std::lock_guard<std::mutex> lg(l->m);
      usable = l->dead && !l->closing;
      if (usable) ++l->peers;
    }
    if (!usable) {
      auto opened = impl_->open_lane(p.value());
      if (!opened) return opened.error();
      l = std::move(opened.value());
      std::lock_guard<std::mutex> lg(l->m);
      ++l->peers;
      impl_->lanes[p.value().ring] = l;
    }
    link.l = l;
    if (auto it = impl_->peers.find(peer); it != impl_->peers.end()) old = it->second.l;
    impl_->peers[peer] = std::move(link);
  }
  if (old) impl_->leave(peer, old);
  return {};
}

void staged_transport::disconnect(std::uint64_t peer) {
  std::shared_ptr<impl::lane_link> l;
  {
    std::lock_guard<std::mutex> g(impl_->m);
    auto it = impl_->peers.find(peer);
    if (it == impl_->peers.end()) return;
    l = it->second.l;
    impl_->peers.erase(it);
  }
  impl_->leave(peer, l);
}

void staged_transport::push(std::uint64_t peer, const std::vector<block>& blocks, completion done) {
  impl_->submit(0, peer, blocks, std::move(done));
}

void staged_transport::push_after(std::uintptr_t ready_fence, std::uint64_t peer, const std::vector<block>& blocks,
                                  completion done) {
  impl_->submit(ready_fence, peer, blocks, std::move(done));
}

staging_ring* staged_transport::receiving_ring() const {
  std::lock_guard<std::mutex> g(impl_->m);
  return impl_->ring.get();
}

void staged_transport::set_return_hook(std::function<void(int lane)> hook) {
  std::lock_guard<std::mutex> g(impl_->hook_m);
  impl_->return_hook = std::move(hook);
}

void staged_transport::fail_peer(std::uint64_t peer, const status& why) {
  std::shared_ptr<impl::lane_link> l;
  {
    std::lock_guard<std::mutex> g(impl_->m);
    auto it = impl_->peers.find(peer);
    if (it == impl_->peers.end()) return;
    l = it->second.l;
  }
  finished_list f;
  {
    std::lock_guard<std::mutex> g(l->m);
    if (l->dead) l->dead = why;
    impl_->fail_all(*l, l->dead, f);
  }
  futex_bump(l->ring->bell(l->lane));
  run(f);
}

std::string staged_transport::endpoint_of_ring(const std::string& ring_name) {
  std::string out(endpoint_tag, sizeof endpoint_tag);
  codec::put_string(out, boot_id());
  codec::put(out, static_cast<std::uint64_t>(::getpid()));
  codec::put_string(out, ring_name);
  return out;
}

std::uint64_t staged_transport::bytes_moved() const { return impl_->bytes.load(std::memory_order_relaxed); }

std::uint64_t staged_transport::unrung_wakeups() { return unrung.load(std::memory_order_relaxed); }

}  // namespace kvflow::transport
