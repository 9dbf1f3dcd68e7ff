// transport/ucx_staged_transport.hpp with host copies: the staged path across hosts (slots put
// over UCX into the receiver's ring), two instances of one process told they are on different
// hosts, and a receiver in another process that is killed or frozen. The put goes over UCX's
// tcp (peer error handling), as it would between hosts.
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <future>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "transport/byte_codec.hpp"
#include "transport/staging_ring.hpp"
#include "transport/ucx_staged_transport.hpp"
#include "transport/ucx_staged_wire.hpp"
#include "transport/ucx_worker.hpp"

#include "unit_helpers.hpp"

using namespace kvflow;
using namespace kvflow::transport;

namespace {

// A small ring, so that a request needs many slots and every slot is used again.
ucx_staged_options host_named(const std::string& host,
                              std::chrono::milliseconds timeout = std::chrono::milliseconds(30000)) {
  ucx_staged_options o;
  o.host_identity = host;
  o.staged.host_copies = true;
  o.staged.ring = {2, 2, 64u << 10, 16};
  o.staged.slot_timeout = timeout;
  return o;
}

std::unique_ptr<ucx_staged_transport> make(const ucx_staged_options& o) {
  auto t = ucx_staged_transport::create(o);
  REQUIRE_MESSAGE(t.ok(), t.error().reason());
  return std::move(t.value());
}

using unit::push_and_wait;
using unit::pattern;

// `pages` pages of `page` bytes holding the pattern of `seed`, to the pool pages `dst` of `region`.
std::vector<block> request_of(std::vector<std::byte>& src, std::uint64_t region, const std::vector<std::uint64_t>& dst,
                              std::uint64_t page, std::uint64_t seed) {
  src.assign(dst.size() * page, std::byte{0});
  std::vector<block> blocks;
  for (std::uint64_t i = 0; i < dst.size(); ++i) {
    for (std::uint64_t b = 0; b < page; ++b) src[i * page + b] = pattern(seed, i * page + b);
    blocks.push_back({src.data() + i * page, region, dst[i] * page, page});
  }
  return blocks;
}

std::uint64_t mismatches(const std::byte* pool, const std::vector<std::uint64_t>& dst, std::uint64_t page,
                         std::uint64_t seed) {
  std::uint64_t bad = 0;
  for (std::uint64_t i = 0; i < dst.size(); ++i)
    for (std::uint64_t b = 0; b < page; ++b) bad += pool[dst[i] * page + b] != pattern(seed, i * page + b);
  return bad;
}

std::vector<std::uint64_t> shuffled(std::uint64_t n, std::uint64_t of, std::uint64_t seed) {
  std::vector<std::uint64_t> all(of);
  for (std::uint64_t i = 0; i < of; ++i) all[i] = i;
  std::mt19937_64 rng(seed);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(n);
  return all;
}

bool all_zero(const std::vector<std::byte>& v) {
  return std::all_of(v.begin(), v.end(), [](std::byte b) { return b == std::byte{0}; });
}

}  // namespace

TEST_CASE("staged_ucx: a fragmented request larger than the ring moves to another host's instance over UCX") {
  auto receiver = make(host_named("host-r"));
  auto sender = make(host_named("host-s"));
  CHECK(sender->query().cross_host);
  CHECK_FALSE(sender->query().gpu_ordered);  // host copies: no CUDA event to wait for
  const std::uint64_t page = 41984, pool_pages = 64;
  std::vector<std::byte> pool(pool_pages * page, std::byte{0});
  auto region = receiver->register_memory(3, pool.data(), pool.size());
  REQUIRE_MESSAGE(region.ok(), region.error().reason());
  REQUIRE(sender->can_connect(receiver->endpoint()));
  // An instance that says it is on the receiver's host is not this transport's to reach.
  auto same_host = make(host_named("host-r"));
  CHECK_FALSE(same_host->can_connect(receiver->endpoint()));
  CHECK_FALSE(same_host->connect(3, receiver->endpoint(), {region.value()}).ok());
  same_host.reset();

  auto c = sender->connect(3, receiver->endpoint(), {region.value()});
  REQUIRE_MESSAGE(c.ok(), c.reason());
  std::vector<std::byte> src;
  for (std::uint64_t seed : {1u, 2u, 3u}) {
    std::fill(pool.begin(), pool.end(), std::byte{0});
    auto dst = shuffled(40, pool_pages, seed);  // 1.6 MiB through 2 slots of 64 KiB
    auto st = push_and_wait(*sender, 3, request_of(src, region.value().id, dst, page, seed));
    REQUIRE_MESSAGE(st.ok(), st.reason());
    CHECK(mismatches(pool.data(), dst, page, seed) == 0);
  }
  CHECK(sender->bytes_moved() == 3 * 40 * page);
  // Connected again with the same description (a re-registration): the same link serves it.
  REQUIRE(sender->connect(3, receiver->endpoint(), {region.value()}).ok());
  {
    auto dst = shuffled(8, pool_pages, 4);
    auto st = push_and_wait(*sender, 3, request_of(src, region.value().id, dst, page, 4));
    REQUIRE_MESSAGE(st.ok(), st.reason());
    CHECK(mismatches(pool.data(), dst, page, 4) == 0);
  }
  // A block outside what the receiver described fails before any slot.
  auto outside = push_and_wait(*sender, 3, {{src.data(), region.value().id, pool.size() - 8, 16}});
  CHECK_FALSE(outside.ok());
  sender->disconnect(3);
  CHECK_FALSE(push_and_wait(*sender, 3, {{src.data(), region.value().id, 0, 16}}).ok());
}

// The forwarder woke every 20 ms while idle just to look for a stop (a poll per link, on machines
// of 2 cores). It sleeps until a filled slot or the stop rings its doorbell now. Counted, not
// timed: without the fix the idle link below woke about 10 times a 200 ms; with it none wakes
// unless a signal interrupts it, whatever the machine's load.
TEST_CASE("staged_ucx: an idle link's forwarder sleeps until rung, and its stop wakes it") {
  auto receiver = make(host_named("host-r"));
  auto sender = make(host_named("host-s"));
  const std::uint64_t page = 16384, pool_pages = 16;
  std::vector<std::byte> pool(pool_pages * page, std::byte{0});
  auto region = receiver->register_memory(3, pool.data(), pool.size());
  REQUIRE_MESSAGE(region.ok(), region.error().reason());
  REQUIRE(sender->connect(3, receiver->endpoint(), {region.value()}).ok());
  std::vector<std::byte> src;
  auto dst = shuffled(8, pool_pages, 5);  // two slots of 64 KiB: the forwarder works, then idles
  auto st = push_and_wait(*sender, 3, request_of(src, region.value().id, dst, page, 5));
  REQUIRE_MESSAGE(st.ok(), st.reason());
  CHECK(mismatches(pool.data(), dst, page, 5) == 0);
  // Idle: nothing rings the forwarder's doorbell. Ten of the former poll intervals pass; the
  // sleep only lets time pass, the count is what is checked.
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  CHECK(sender->forwarder_unrung_wakeups() == 0);
  // Stopping the idle link rings the doorbell: disconnect joins the forwarder (a stop it missed
  // would hang here), and it woke rung.
  sender->disconnect(3);
  CHECK(sender->forwarder_unrung_wakeups() == 0);
  // Links stopped at once after they start: the stop can come before, during or after the
  // forwarder's first look at the bell, and each must end it.
  for (std::uint64_t peer = 10; peer < 30; ++peer) {
    REQUIRE(sender->connect(peer, receiver->endpoint(), {region.value()}).ok());
    sender->disconnect(peer);
  }
  CHECK(sender->forwarder_unrung_wakeups() == 0);
  CHECK(receiver->forwarder_unrung_wakeups() == 0);
}

TEST_CASE("staged_ucx: two remote senders share the receiver, each its own lane, a third finds none") {
  auto receiver = make(host_named("host-r"));
  const std::uint64_t page = 16384, pool_pages = 64;
  std::vector<std::byte> pool(pool_pages * page, std::byte{0});
  auto region = receiver->register_memory(3, pool.data(), pool.size());
  REQUIRE(region.ok());
  auto a = make(host_named("host-a"));
  auto b = make(host_named("host-b"));
  REQUIRE(a->connect(3, receiver->endpoint(), {region.value()}).ok());
  REQUIRE(b->connect(3, receiver->endpoint(), {region.value()}).ok());
  auto pages = shuffled(pool_pages, pool_pages, 5);
  std::vector<std::uint64_t> pa(pages.begin(), pages.begin() + 32), pb(pages.begin() + 32, pages.end());
  std::vector<std::byte> sa, sb;
  auto ba = request_of(sa, region.value().id, pa, page, 21);
  auto bb = request_of(sb, region.value().id, pb, page, 22);
  std::mutex m;
  std::condition_variable cv;
  int left = 4;
  std::vector<std::string> failures;
  auto done = [&](status s) {
    std::lock_guard<std::mutex> g(m);
    if (!s) failures.push_back(s.reason());
    --left;
    cv.notify_all();
  };
  // Two pushes from each at once: each sender's pushes share its lane's slots.
  for (int i = 0; i < 2; ++i) {
    std::vector<block> half_a(ba.begin() + i * 16, ba.begin() + (i + 1) * 16);
    std::vector<block> half_b(bb.begin() + i * 16, bb.begin() + (i + 1) * 16);
    a->push(3, half_a, done);
    b->push(3, half_b, done);
  }
  {
    std::unique_lock<std::mutex> g(m);
    REQUIRE(cv.wait_for(g, std::chrono::seconds(30), [&] { return left == 0; }));
  }
  CHECK(failures.empty());
  for (const auto& f : failures) MESSAGE(f);
  CHECK(mismatches(pool.data(), pa, page, 21) == 0);
  CHECK(mismatches(pool.data(), pb, page, 22) == 0);

  // The ring has two lanes: a third sender is told so, and its push fails with that.
  auto c = make(host_named("host-c"));
  REQUIRE(c->connect(3, receiver->endpoint(), {region.value()}).ok());
  auto st = push_and_wait(*c, 3, {{sa.data(), region.value().id, 0, page}});
  REQUIRE_FALSE(st.ok());
  CHECK(st.reason().find("every lane") != std::string::npos);
  // A sender that leaves frees its lane for the next one.
  a.reset();
  std::vector<std::byte> sc;
  auto pc = std::vector<std::uint64_t>(pa.begin(), pa.begin() + 4);
  auto bc = request_of(sc, region.value().id, pc, page, 23);
  status later = status::error("never tried");
  for (int i = 0; i < 100 && !later; ++i) {
    auto again = make(host_named("host-c"));
    REQUIRE(again->connect(3, receiver->endpoint(), {region.value()}).ok());
    later = push_and_wait(*again, 3, bc);
    if (!later) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  CHECK_MESSAGE(later.ok(), later.reason());
  CHECK(mismatches(pool.data(), pc, page, 23) == 0);
}

TEST_CASE("staged_ucx: the receiver refuses a remote sender's runs outside its region or beyond a slot's count") {
  auto receiver = make(host_named("host-r"));
  std::vector<std::byte> pool(8 * 4096, std::byte{0});
  auto region = receiver->register_memory(3, pool.data(), pool.size());
  REQUIRE(region.ok());
  auto sender = make(host_named("host-s"));
  // A description that claims 16 pages for an 8-page region: the sender's own check passes.
  region_desc lie = region.value();
  lie.size = 16 * 4096;
  REQUIRE(sender->connect(3, receiver->endpoint(), {lie}).ok());
  std::vector<std::byte> src(4096, std::byte{0x5a});
  auto st = push_and_wait(*sender, 3, {{src.data(), lie.id, 12 * 4096, 4096}});
  REQUIRE_FALSE(st.ok());
  CHECK(st.reason().find("refused by the receiver") != std::string::npos);
  CHECK(st.reason().find("outside region") != std::string::npos);
  CHECK(all_zero(pool));

  // An endpoint doctored to say a slot holds 64 runs (the receiver's hold 16): the sender packs
  // 40 runs into one slot, and the receiver refuses it before writing anything.
  std::string doctored = receiver->endpoint();
  const std::uint32_t more = 64;
  // (max_descs is the last field before the 16-byte secret)
  std::memcpy(doctored.data() + doctored.size() - 16 - sizeof more, &more, sizeof more);
  auto liar = make(host_named("host-l"));
  REQUIRE(liar->connect(3, doctored, {region.value()}).ok());
  std::vector<block> small;
  for (std::uint64_t i = 0; i < 40; ++i) small.push_back({src.data(), region.value().id, i * 512, 100});
  auto many = push_and_wait(*liar, 3, small);
  REQUIRE_FALSE(many.ok());
  CHECK(many.reason().find("40 runs announced; a slot holds at most 16") != std::string::npos);
  CHECK(all_zero(pool));

  // ...and the receiver goes on serving what is right.
  auto ok = push_and_wait(*sender, 3, {{src.data(), lie.id, 4096, 4096}});
  CHECK_MESSAGE(ok.ok(), ok.reason());
  CHECK(pool[4096] == std::byte{0x5a});
  CHECK(pool[8191] == std::byte{0x5a});
  CHECK(pool[0] == std::byte{0});
}

namespace {

// A remote sender that speaks the wire by hand, to lie in it.
struct raw_sender {
  std::unique_ptr<ucx_worker> w;
  ucp_ep_h ep = nullptr;
  std::mutex m;
  std::condition_variable cv;
  bool welcomed = false;
  staged_wire::welcome_header welcome;                 // the first
  std::vector<staged_wire::welcome_header> welcomes;   // every one, in order
  std::vector<std::pair<staged_wire::verdict_header, std::string>> verdicts;
  std::uint64_t secret[2] = {0, 0};  // of the receiver's endpoint

  static ucs_status_t on_am(void* arg, const void* header, std::size_t header_length, void* data, std::size_t length,
                            const ucp_am_recv_param_t*) {
    auto* self = static_cast<raw_sender*>(arg);
    std::lock_guard<std::mutex> g(self->m);
    if (header_length == sizeof(staged_wire::welcome_header)) {
      staged_wire::welcome_header w;
      std::memcpy(&w, header, sizeof w);
      if (!self->welcomed) self->welcome = w;
      self->welcomes.push_back(w);
      self->welcomed = true;
    } else if (header_length == sizeof(staged_wire::verdict_header)) {
      staged_wire::verdict_header v;
      std::memcpy(&v, header, sizeof v);
      self->verdicts.emplace_back(v, std::string(static_cast<const char*>(data), length));
    }
    self->cv.notify_all();
    return UCS_OK;
  }

  // `right_secret`: the hello carries the secret of the receiver's endpoint (else a made-up one,
  // and no welcome is awaited).
  explicit raw_sender(const std::string& endpoint, bool right_secret = true) {
    auto made = ucx_worker::create(UCP_FEATURE_AM | UCP_FEATURE_RMA);
    REQUIRE(made.ok());
    w = std::move(made.value());
    // The receiver's worker address: after the tag and the host identity.
    std::size_t at = sizeof "kvflow-staged-ucx-1";
    std::string host, address;
    REQUIRE(codec::get_string(endpoint, at, host, 256));
    REQUIRE(codec::get_string(endpoint, at, address, 1u << 16));
    std::string rkey;
    std::uint32_t slots = 0, max_descs = 0;
    std::uint64_t slot_bytes = 0;
    REQUIRE(codec::get_string(endpoint, at, rkey, 1u << 16));
    REQUIRE((codec::get(endpoint, at, slots) && codec::get(endpoint, at, slot_bytes) && codec::get(endpoint, at, max_descs)));
    REQUIRE((codec::get(endpoint, at, secret[0]) && codec::get(endpoint, at, secret[1])));
    bool set_up = true;  // (doctest's checks belong on the test's thread)
    w->call([&] {
      for (unsigned id : {unsigned{staged_wire::welcome}, unsigned{staged_wire::verdict}}) {
        ucp_am_handler_param_t p{};
        p.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
        p.id = id;
        p.cb = on_am;
        p.arg = this;
        set_up = set_up && ucp_worker_set_am_recv_handler(w->worker(), &p) == UCS_OK;
      }
      ucp_ep_params_t ep_params{};
      ep_params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
      ep_params.address = reinterpret_cast<const ucp_address_t*>(address.data());
      ep_params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
      set_up = set_up && ucp_ep_create(w->worker(), &ep_params, &ep) == UCS_OK;
    });
    REQUIRE(set_up);
    hello(77, right_secret);
    if (right_secret) REQUIRE(wait_welcome(std::chrono::seconds(20)));
  }
  // Says hello with `nonce`, naming `address` as the sender's (this worker's own when empty),
  // and claiming to hold `held_lane` under `held_token`.
  void hello(std::uint64_t nonce, bool right_secret = true, std::string address = {}, std::int32_t held_lane = -1,
             std::uint64_t held_token = 0) {
    staged_wire::hello_header h;
    h.nonce = nonce;
    h.secret[0] = right_secret ? secret[0] : secret[0] ^ 1;
    h.secret[1] = secret[1];
    h.held_lane = held_lane;
    h.held_token = held_token;
    send(staged_wire::hello, &h, sizeof h, address.empty() ? w->address() : std::move(address));
  }
  bool wait_welcome(std::chrono::milliseconds within) {
    std::unique_lock<std::mutex> g(m);
    return cv.wait_for(g, within, [&] { return welcomed; });
  }
  // The welcome that answers `nonce`, if it came within `within`.
  std::optional<staged_wire::welcome_header> welcome_for(std::uint64_t nonce, std::chrono::milliseconds within) {
    std::unique_lock<std::mutex> g(m);
    auto find = [&]() -> std::optional<staged_wire::welcome_header> {
      for (const auto& w : welcomes)
        if (w.nonce == nonce) return w;
      return std::nullopt;
    };
    cv.wait_for(g, within, [&] { return find().has_value(); });
    return find();
  }
  ~raw_sender() {
    w->call([&] {
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_EP_CLOSE_FLAG_FORCE;
      void* req = ucp_ep_close_nbx(ep, &p);
      if (UCS_PTR_IS_PTR(req)) {
        w->progress_until([&] { return ucp_request_check_status(req) != UCS_INPROGRESS; }, std::chrono::seconds(5));
        ucp_request_free(req);
      }
    });
  }
  // Sends and waits until UCX is done with the message.
  void send(unsigned id, const void* header, std::size_t len, std::string payload) {
    bool sent = true;
    w->call([&] {
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_AM_SEND_FLAG_EAGER;
      void* req = ucp_am_send_nbx(ep, id, header, len, payload.data(), payload.size(), &p);
      sent = !UCS_PTR_IS_ERR(req);
      if (UCS_PTR_IS_PTR(req)) {
        w->progress_until([&] { return ucp_request_check_status(req) != UCS_INPROGRESS; }, std::chrono::seconds(10));
        ucp_request_free(req);
      }
    });
    REQUIRE(sent);
  }
  // Announces a slot as filled with `runs` and returns the verdict's reason ("" when it landed).
  std::string announce(std::uint32_t lane, std::uint32_t slot, std::uint32_t count, const std::vector<staged_desc>& runs,
                       std::uint64_t seq) {
    staged_wire::filled_header h;
    h.lane = lane;
    h.slot = slot;
    h.token = welcome.token;
    h.seq = seq;
    h.count = count;
    send(staged_wire::filled, &h, sizeof h,
         std::string(reinterpret_cast<const char*>(runs.data()), runs.size() * sizeof(staged_desc)));
    std::unique_lock<std::mutex> g(m);
    if (!cv.wait_for(g, std::chrono::seconds(20), [&] {
          return std::any_of(verdicts.begin(), verdicts.end(), [&](const auto& v) { return v.first.seq == seq; });
        }))
      return "no verdict";
    for (const auto& [v, reason] : verdicts)
      if (v.seq == seq) return v.ok == 1 ? std::string() : reason;
    return "no verdict";
  }
};

}  // namespace

TEST_CASE("staged_ucx: a hello without the receiver's secret gets no lane, and takes none from the others") {
  ucx_staged_options o = host_named("host-r");
  o.staged.ring.lanes = 1;  // one lane: a stranger who took it would leave the honest sender none
  auto receiver = make(o);
  std::vector<std::byte> pool(16 * 4096, std::byte{0});
  auto region = receiver->register_memory(3, pool.data(), pool.size());
  REQUIRE(region.ok());
  {
    raw_sender stranger(receiver->endpoint(), false);
    CHECK_FALSE(stranger.wait_welcome(std::chrono::milliseconds(1500)));
  }
  auto honest = make(host_named("host-h"));
  REQUIRE(honest->connect(3, receiver->endpoint(), {region.value()}).ok());
  std::vector<std::byte> src(4096, std::byte{9});
  auto st = push_and_wait(*honest, 3, {{src.data(), region.value().id, 0, 4096}});
  CHECK_MESSAGE(st.ok(), st.reason());
  CHECK(pool[0] == std::byte{9});
}

namespace {

// The worker address in a staged_ucx endpoint (after the tag and the host identity).
std::string worker_address_of(const std::string& endpoint) {
  std::size_t at = sizeof "kvflow-staged-ucx-1";
  std::string host, address;
  REQUIRE(codec::get_string(endpoint, at, host, 256));
  REQUIRE(codec::get_string(endpoint, at, address, 1u << 16));
  return address;
}

}  // namespace

TEST_CASE("staged_ucx: a sender that holds the secret and says hello again and again holds one lane, the others are served") {
  using namespace std::chrono_literals;
  ucx_staged_options o = host_named("host-r");
  o.staged.ring.lanes = 3;
  auto receiver = make(o);
  std::vector<std::byte> pool(16 * 4096, std::byte{0});
  auto region = receiver->register_memory(3, pool.data(), pool.size());
  REQUIRE(region.ok());
  const auto id = region.value().id;
  std::vector<std::byte> src(4096, std::byte{9});

  // An honest sender whose four peers (of the one receiver) connect from four threads at once:
  // one link, one lane.
  auto honest = make(host_named("host-h"));
  {
    std::vector<int> connected(4, 0);
    std::vector<std::thread> threads;
    for (int p = 0; p < 4; ++p)
      threads.emplace_back([&, p] { connected[p] = honest->connect(10 + p, receiver->endpoint(), {region.value()}).ok(); });
    for (auto& t : threads) t.join();
    CHECK(std::count(connected.begin(), connected.end(), 1) == 4);
  }
  for (std::uint64_t p = 0; p < 4; ++p) {
    auto st = push_and_wait(*honest, 10 + p, {{src.data(), id, p * 4096, 4096}});
    CHECK_MESSAGE(st.ok(), st.reason());
  }

  raw_sender liar(receiver->endpoint());
  REQUIRE(liar.welcome.lane >= 0);
  // Hello after hello from its worker: each is answered with the lane it holds, under the same
  // token. Before, each claimed another lane until none was left.
  for (std::uint64_t n = 100; n < 132; ++n) liar.hello(n);
  for (std::uint64_t n = 100; n < 132; ++n) {
    auto w = liar.welcome_for(n, 20s);
    REQUIRE(w.has_value());
    CHECK(w->lane == liar.welcome.lane);
    CHECK(w->token == liar.welcome.token);
  }
  // Hellos that name the honest sender's worker as theirs (one claims a lane and a token it
  // guessed): their welcomes go to that worker, which drops them; the liar hears nothing, and
  // the honest sender's lane is untouched.
  const std::string honest_address = worker_address_of(honest->endpoint());
  for (std::uint64_t n = 200; n < 216; ++n) liar.hello(n, true, honest_address);
  liar.hello(216, true, honest_address, 0, 12345);
  CHECK_FALSE(liar.welcome_for(216, 1500ms).has_value());
  CHECK_FALSE(liar.welcome_for(200, 0ms).has_value());
  for (std::uint64_t p = 0; p < 4; ++p) {
    auto st = push_and_wait(*honest, 10 + p, {{src.data(), id, p * 4096, 4096}});
    CHECK_MESSAGE(st.ok(), st.reason());
  }
  // With the token it holds, its holder renews the lane: the same lane, a new token, which works.
  liar.hello(300, true, {}, liar.welcome.lane, liar.welcome.token);
  auto renewed = liar.welcome_for(300, 20s);
  REQUIRE(renewed.has_value());
  CHECK(renewed->lane == liar.welcome.lane);
  CHECK(renewed->token != liar.welcome.token);
  liar.welcome = *renewed;
  CHECK(liar.announce(static_cast<std::uint32_t>(renewed->lane), 0, 1, {{id, 8 * 4096, 16}}, 1) == "");

  // The ring's third lane is still free: another honest sender is served.
  auto second = make(host_named("host-s"));
  REQUIRE(second->connect(3, receiver->endpoint(), {region.value()}).ok());
  std::vector<std::byte> other(4096, std::byte{7});
  auto st = push_and_wait(*second, 3, {{other.data(), id, 12 * 4096, 4096}});
  CHECK_MESSAGE(st.ok(), st.reason());
  CHECK(pool[12 * 4096] == std::byte{7});
  // ...and a fourth finds none: three lanes, one each.
  auto fourth = make(host_named("host-f"));
  REQUIRE(fourth->connect(3, receiver->endpoint(), {region.value()}).ok());
  auto none = push_and_wait(*fourth, 3, {{other.data(), id, 13 * 4096, 4096}});
  REQUIRE_FALSE(none.ok());
  CHECK(none.reason().find("every lane") != std::string::npos);
}

TEST_CASE("staged_ucx: a remote sender lying in its messages is refused, nothing written, the others served") {
  auto receiver = make(host_named("host-r"));
  std::vector<std::byte> pool(16 * 4096, std::byte{0});
  auto region = receiver->register_memory(3, pool.data(), pool.size());
  REQUIRE(region.ok());
  auto honest = make(host_named("host-h"));
  REQUIRE(honest->connect(3, receiver->endpoint(), {region.value()}).ok());
  std::vector<std::byte> src(4096, std::byte{9});
  REQUIRE(push_and_wait(*honest, 3, {{src.data(), region.value().id, 0, 4096}}).ok());  // holds a lane now
  std::fill(pool.begin(), pool.end(), std::byte{0});

  raw_sender liar(receiver->endpoint());
  REQUIRE(liar.welcome.lane >= 0);
  const auto own = static_cast<std::uint32_t>(liar.welcome.lane);
  const auto other = own ^ 1u;  // the honest sender's lane (the ring has two)
  const auto id = region.value().id;
  CHECK(liar.announce(other, 0, 1, {{id, 0, 4096}}, 1).find("is not this sender's") != std::string::npos);
  CHECK(liar.announce(own, 7, 1, {{id, 0, 4096}}, 2).find("slot 7") != std::string::npos);
  CHECK(liar.announce(own, 0, 17, std::vector<staged_desc>(17, {id, 0, 16}), 3).find("17 runs announced") != std::string::npos);
  CHECK(liar.announce(own, 0, 2, {{id, 0, 16}}, 4).find("bytes of runs") != std::string::npos);
  CHECK(liar.announce(own, 0, 1, {{id, 15 * 4096, 8192}}, 5).find("outside region") != std::string::npos);
  CHECK(liar.announce(own, 1, 1, {{id + 50, 0, 16}}, 6).find("not registered here") != std::string::npos);
  CHECK(all_zero(pool));
  // Its own lane and a run that fits: that one lands (the bytes are whatever its slot held).
  CHECK(liar.announce(own, 1, 1, {{id, 8 * 4096, 16}}, 8) == "");

  auto ok = push_and_wait(*honest, 3, {{src.data(), id, 4096, 4096}});
  CHECK_MESSAGE(ok.ok(), ok.reason());
  CHECK(pool[4096] == std::byte{9});
  CHECK(pool[8191] == std::byte{9});
}

namespace {

// A receiving process, forked before the case makes any thread: registers a pool of `pages`
// pages, tells its endpoint and region down the pipe, then answers each seed with the
// mismatches of the request of that seed (page i at pool page pages-1-i).
struct receiver_child {
  static constexpr std::uint64_t page = 8192, pages = 48;
  pid_t pid = -1;
  int to = -1, from = -1;
  std::string endpoint;
  region_desc desc;

  receiver_child() {
    int down[2], up[2];
    REQUIRE(::pipe(down) == 0);
    REQUIRE(::pipe(up) == 0);
    pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::close(down[1]);
      ::close(up[0]);
      serve(down[0], up[1]);
    }
    ::close(down[0]);
    ::close(up[1]);
    to = down[1];
    from = up[0];
    const std::string msg = unit::read_frame(from);
    std::size_t at = 0;
    REQUIRE(codec::get_string(msg, at, endpoint, 1u << 20));
    REQUIRE(codec::get(msg, at, desc.id));
    REQUIRE(codec::get(msg, at, desc.size));
    REQUIRE(codec::get_string(msg, at, desc.remote_key, 64));
  }
  ~receiver_child() {
    ::close(to);
    ::close(from);
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
  }

  [[noreturn]] static void serve(int in, int out) {
    auto t = ucx_staged_transport::create(host_named("child"));
    if (!t) ::_exit(3);
    std::vector<std::byte> pool(pages * page, std::byte{0});
    auto region = t.value()->register_memory(5, pool.data(), pool.size());
    if (!region) ::_exit(4);
    std::string msg;
    codec::put_string(msg, t.value()->endpoint());
    codec::put(msg, region.value().id);
    codec::put(msg, region.value().size);
    codec::put_string(msg, region.value().remote_key);
    if (!unit::write_frame(out, msg)) ::_exit(5);
    std::uint64_t seed = 0;
    while (::read(in, &seed, sizeof seed) == sizeof seed) {
      std::uint64_t bad = 0;
      for (std::uint64_t i = 0; i < pages; ++i)
        for (std::uint64_t b = 0; b < page; ++b) bad += pool[(pages - 1 - i) * page + b] != pattern(seed, i * page + b);
      if (::write(out, &bad, sizeof bad) != sizeof bad) ::_exit(6);
    }
    t.value().reset();
    ::_exit(0);
  }

  std::vector<block> request(std::vector<std::byte>& src, std::uint64_t seed) const {
    std::vector<std::uint64_t> dst;
    for (std::uint64_t i = 0; i < pages; ++i) dst.push_back(pages - 1 - i);
    return request_of(src, desc.id, dst, page, seed);
  }
  std::uint64_t check(std::uint64_t seed) {
    std::uint64_t bad = ~0ull;
    REQUIRE(::write(to, &seed, sizeof seed) == sizeof seed);
    REQUIRE(::read(from, &bad, sizeof bad) == sizeof bad);
    return bad;
  }
  void freeze() {
    REQUIRE(::kill(pid, SIGSTOP) == 0);
    int wstatus = 0;
    REQUIRE(::waitpid(pid, &wstatus, WUNTRACED) == pid);
    REQUIRE(WIFSTOPPED(wstatus));
  }
  void thaw() { REQUIRE(::kill(pid, SIGCONT) == 0); }
};

}  // namespace

TEST_CASE("staged_ucx: a request lands in another process, a killed receiver fails the pushes with a reason") {
  receiver_child child;
  auto sender = make(host_named("parent"));
  REQUIRE(sender->can_connect(child.endpoint));
  REQUIRE(sender->connect(5, child.endpoint, {child.desc}).ok());
  std::vector<std::byte> src;
  for (std::uint64_t seed : {11u, 12u}) {
    auto st = push_and_wait(*sender, 5, child.request(src, seed));
    REQUIRE_MESSAGE(st.ok(), st.reason());
    CHECK(child.check(seed) == 0);
  }
  // Killed with a push on its way: that push and every later one fail, none hangs.
  auto p = std::make_shared<std::promise<status>>();
  auto f = p->get_future();
  const auto t0 = std::chrono::steady_clock::now();
  sender->push(5, child.request(src, 13), [p](status s) { p->set_value(std::move(s)); });
  REQUIRE(::kill(child.pid, SIGKILL) == 0);
  REQUIRE(f.wait_for(std::chrono::seconds(20)) == std::future_status::ready);
  auto in_flight = f.get();
  // It may have landed before the kill; if not, it says why.
  if (!in_flight) MESSAGE(in_flight.reason());
  status later;
  for (int i = 0; i < 100 && later; ++i) {
    later = push_and_wait(*sender, 5, child.request(src, 14), std::chrono::seconds(20));
    if (later) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  REQUIRE_FALSE(later.ok());
  CHECK(later.reason().find("unreachable") != std::string::npos);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(20));
}

TEST_CASE("staged_ucx: a frozen receiver fails the pushes within the slot timeout") {
  receiver_child child;
  auto sender = make(host_named("parent", std::chrono::milliseconds(1000)));
  REQUIRE(sender->connect(5, child.endpoint, {child.desc}).ok());
  std::vector<std::byte> src;
  auto st = push_and_wait(*sender, 5, child.request(src, 21));
  REQUIRE_MESSAGE(st.ok(), st.reason());
  child.freeze();
  const auto t0 = std::chrono::steady_clock::now();
  st = push_and_wait(*sender, 5, child.request(src, 22));
  const auto waited = std::chrono::steady_clock::now() - t0;
  REQUIRE_FALSE(st.ok());
  MESSAGE(st.reason());
  CHECK((st.reason().find("no slot") != std::string::npos || st.reason().find("unreachable") != std::string::npos));
  CHECK(waited >= std::chrono::milliseconds(900));
  CHECK(waited < std::chrono::seconds(10));
  // Later pushes fail at once with it.
  const auto t1 = std::chrono::steady_clock::now();
  CHECK_FALSE(push_and_wait(*sender, 5, child.request(src, 23)).ok());
  CHECK(std::chrono::steady_clock::now() - t1 < std::chrono::seconds(2));
}

TEST_CASE("staged_ucx: a sender whose link failed is given its own lane again when it connects again, not a second one") {
  receiver_child child;  // a ring of two lanes
  auto sender = make(host_named("parent", std::chrono::milliseconds(1000)));
  REQUIRE(sender->connect(5, child.endpoint, {child.desc}).ok());
  std::vector<std::byte> src;
  auto st = push_and_wait(*sender, 5, child.request(src, 31));
  REQUIRE_MESSAGE(st.ok(), st.reason());
  // Frozen past the slot timeout: the link fails, while the receiver still holds its lane.
  child.freeze();
  CHECK_FALSE(push_and_wait(*sender, 5, child.request(src, 32)).ok());
  child.thaw();
  // Connected again: a new link, which asks with the lane and token it held.
  REQUIRE(sender->connect(5, child.endpoint, {child.desc}).ok());
  st = status::error("never tried");
  for (int i = 0; i < 50 && !st; ++i) {
    st = push_and_wait(*sender, 5, child.request(src, 33));
    if (!st) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  REQUIRE_MESSAGE(st.ok(), st.reason());
  CHECK(child.check(33) == 0);
  // The ring's other lane is free: another sender is served.
  auto other = make(host_named("other"));
  REQUIRE(other->connect(5, child.endpoint, {child.desc}).ok());
  auto theirs = push_and_wait(*other, 5, child.request(src, 34));
  CHECK_MESSAGE(theirs.ok(), theirs.reason());
  CHECK(child.check(34) == 0);
}
