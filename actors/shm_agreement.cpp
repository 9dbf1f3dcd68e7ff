#include "actors/shm_agreement.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstring>
#include <ctime>
#include <limits>
#include <type_traits>

#include "transport/shared_futex.hpp"

namespace kvflow {
namespace {

constexpr std::uint64_t magic = 0x6b76666c6f775348ULL;  // "kvflowSH"
constexpr std::uint32_t layout_version = 1;

static_assert(std::atomic<std::uint64_t>::is_always_lock_free && std::atomic<std::uint32_t>::is_always_lock_free,
              "the segment's atomics are shared between processes: they must be lock-free");
static_assert(std::is_trivially_copyable<room_state>::value, "room states are copied into shared memory as bytes");

using transport::futex_wait;
using transport::futex_wake;

// Arrivals of a round, packed: the round in the high 40 bits, its count in the low 24.
constexpr std::uint64_t count_bits = 24;
constexpr std::uint64_t count_mask = (1ULL << count_bits) - 1;

// A post slot's count that says: the same states as this child's post of the round before.
constexpr std::uint32_t unchanged_post = 0xffffffffu;

// States another process wrote into the segment, copied out as bytes. Its `released` byte may
// be anything that process wrote, and one other than 0 or 1 is no bool (reading it as one is
// undefined): a non-zero byte counts as released.
void copy_states(const room_state* from, std::size_t n, step_states& out) {
  out.resize(n);
  if (n > 0) std::memcpy(static_cast<void*>(out.data()), from, n * sizeof(room_state));
  for (auto& s : out) {
    auto* flag = reinterpret_cast<unsigned char*>(&s) + offsetof(room_state, released);
    *flag = *flag != 0 ? 1 : 0;
  }
}

}  // namespace

struct shm_segment::header {
  std::atomic<std::uint64_t> magic;  // stored last at creation: an opener sees a whole header
  std::uint32_t version;
  std::uint32_t entry_size;
  std::int32_t group;
  std::int32_t ranks, post_slots, ring_slots, max_rooms;
  std::uint64_t post_bytes, ring_bytes, arrivals_offset, posts_offset, ring_offset, total;
  char name[128];
  // Bumped by a post that may complete a round: the combiner sleeps on it.
  alignas(64) std::atomic<std::uint32_t> combine_word;
  // Bumped by every publish (rounds readers wait for, and post slots posters wait for).
  alignas(64) std::atomic<std::uint32_t> published_word;
  std::atomic<std::uint32_t> waiters;
  alignas(64) std::atomic<std::uint64_t> merged;  // every round up to here is merged
  std::atomic<std::uint64_t> latest;              // the highest round published
  // Children that post here and are alive: the count of a round's posts that completes it.
  // Children that report by message are not counted (they may run any number of rounds ahead,
  // and the thread that takes their report merges what it completes).
  std::atomic<std::uint32_t> live;
  std::atomic<std::uint32_t> broken;              // 1: an agreed round overflowed its slot
};

struct shm_segment::slot {
  std::atomic<std::uint64_t> round;  // 0: empty, or being written
  std::uint32_t count;
  std::uint32_t pad;
  std::uint64_t same_since;  // ring: rounds same_since..round agreed the very same states
  room_state* states() { return reinterpret_cast<room_state*>(this + 1); }
};

shm_segment::shm_segment(std::string name, void* base, const shm_shape& shape, const layout& at, bool owner)
    : name_(std::move(name)), base_(base), size_(at.total), owner_(owner), linked_(true), shape_(shape), at_(at) {}

std::optional<shm_segment::layout> shm_segment::layout_of(const shm_shape& s) {
  if (s.ranks < 1 || s.post_slots < 2 || s.ring_slots < 2 || s.max_rooms < 1) return std::nullopt;
  // In 128 bits: a shape read from another process's header may claim anything.
  using u128 = unsigned __int128;
  auto up = [](u128 n, u128 to) { return (n + to - 1) / to * to; };
  const u128 entry = sizeof(room_state);
  const u128 post_bytes = up(sizeof(slot) + entry * u128(s.max_rooms), 64);
  const u128 ring_bytes = up(sizeof(slot) + entry * 2 * u128(s.max_rooms), 64);
  const u128 arrivals_offset = up(sizeof(header), 64);
  const u128 posts_offset = up(arrivals_offset + 8 * u128(s.post_slots), 4096);
  const u128 ring_offset = up(posts_offset + post_bytes * u128(s.ranks) * u128(s.post_slots), 4096);
  const u128 total = up(ring_offset + ring_bytes * u128(s.ring_slots), 4096);
  if (total > static_cast<u128>(std::numeric_limits<std::ptrdiff_t>::max())) return std::nullopt;
  return layout{static_cast<std::size_t>(post_bytes),      static_cast<std::size_t>(ring_bytes),
                static_cast<std::size_t>(arrivals_offset), static_cast<std::size_t>(posts_offset),
                static_cast<std::size_t>(ring_offset),     static_cast<std::size_t>(total)};
}

shm_segment::~shm_segment() {
  if (owner_) unlink();
  munmap(base_, size_);
}

void shm_segment::unlink() {
  if (!owner_ || !linked_) return;
  linked_ = false;
  shm_unlink(name_.c_str());
}

shm_segment::header& shm_segment::head() const { return *static_cast<header*>(base_); }

shm_segment::slot& shm_segment::post_slot(int child, std::uint64_t round) const {
  const auto slots = static_cast<std::uint64_t>(shape_.post_slots);
  auto index = static_cast<std::uint64_t>(child) * slots + round % slots;
  return *reinterpret_cast<slot*>(static_cast<char*>(base_) + at_.posts_offset + index * at_.post_bytes);
}

shm_segment::slot& shm_segment::ring_slot(std::uint64_t round) const {
  const auto slots = static_cast<std::uint64_t>(shape_.ring_slots);
  return *reinterpret_cast<slot*>(static_cast<char*>(base_) + at_.ring_offset + (round % slots) * at_.ring_bytes);
}

std::atomic<std::uint64_t>& shm_segment::arrivals(std::uint64_t round) const {
  return reinterpret_cast<std::atomic<std::uint64_t>*>(static_cast<char*>(base_) +
                                                       at_.arrivals_offset)[round % static_cast<std::uint64_t>(shape_.post_slots)];
}

result<std::shared_ptr<shm_segment>> shm_segment::create(const std::string& name, int group, const shm_shape& s) {
  const auto at = layout_of(s);
  if (!at || name.size() >= sizeof(header::name))
    return status::error("shared-memory agreement: invalid shape for segment " + name);
  const std::size_t total = at->total;
  int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) return status::error("shared-memory agreement: shm_open " + name + ": " + std::strerror(errno));
  auto fail = [&](const char* what, int err) -> status {
    close(fd);
    shm_unlink(name.c_str());
    return status::error("shared-memory agreement: " + std::string(what) + " (" + std::to_string(total) +
                         " bytes in /dev/shm): " + std::strerror(err));
  };
  if (ftruncate(fd, static_cast<off_t>(total)) != 0) return fail("ftruncate", errno);
  // Reserve every page now: tmpfs hands out pages on first write, and a full one would answer
  // that write with SIGBUS in the middle of a round.
  if (int err = posix_fallocate(fd, 0, static_cast<off_t>(total)); err != 0) return fail("posix_fallocate", err);
  void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) return fail("mmap", errno);
  close(fd);
  auto* h = new (base) header{};
  h->version = layout_version;
  h->entry_size = sizeof(room_state);
  h->group = group;
  h->ranks = s.ranks;
  h->post_slots = s.post_slots;
  h->ring_slots = s.ring_slots;
  h->max_rooms = s.max_rooms;
  h->post_bytes = at->post_bytes;
  h->ring_bytes = at->ring_bytes;
  h->arrivals_offset = at->arrivals_offset;
  h->posts_offset = at->posts_offset;
  h->ring_offset = at->ring_offset;
  h->total = total;
  std::memcpy(h->name, name.c_str(), name.size() + 1);
  h->live.store(static_cast<std::uint32_t>(s.ranks));
  // The fresh file is zero: every slot reads round 0 (empty), every arrival word round 0.
  h->magic.store(magic, std::memory_order_release);
  return std::shared_ptr<shm_segment>(new shm_segment(name, base, s, *at, true));
}

result<std::shared_ptr<shm_segment>> shm_segment::open(const std::string& name, int group) {
  int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) return status::error("shared-memory agreement: shm_open " + name + ": " + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || static_cast<std::size_t>(st.st_size) < sizeof(header)) {
    close(fd);
    return status::error("shared-memory agreement: segment " + name + " is too small");
  }
  const auto size = static_cast<std::size_t>(st.st_size);
  void* base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (base == MAP_FAILED) return status::error("shared-memory agreement: mmap " + name + ": " + std::strerror(errno));
  const auto* h = static_cast<const header*>(base);
  auto reject = [&](const std::string& why) -> status {
    munmap(base, size);
    return status::error("shared-memory agreement: segment " + name + " " + why);
  };
  if (h->magic.load(std::memory_order_acquire) != magic)
    return reject("is not a kvflow agreement segment");
  if (h->version != layout_version || h->entry_size != sizeof(room_state))
    return reject("has layout " + std::to_string(h->version) + " (this build: " + std::to_string(layout_version) + ")");
  if (h->group != group) return reject("belongs to group " + std::to_string(h->group));
  if (h->total != size || std::strncmp(h->name, name.c_str(), sizeof(h->name)) != 0)
    return reject("is not the one its leader registered");
  // Every offset this process will use comes from the shape, checked against the mapping: a
  // header that does not add up (another build, a stray write) would send posts and reads
  // outside it. What was checked is kept; the header is not read for it again.
  const shm_shape shape{h->ranks, h->post_slots, h->ring_slots, h->max_rooms};
  const auto at = layout_of(shape);
  if (!at || at->total != size || at->post_bytes != h->post_bytes || at->ring_bytes != h->ring_bytes ||
      at->arrivals_offset != h->arrivals_offset || at->posts_offset != h->posts_offset ||
      at->ring_offset != h->ring_offset)
    return reject("has a shape or layout that does not add up to its size");
  return std::shared_ptr<shm_segment>(new shm_segment(name, base, shape, *at, false));
}

bool shm_segment::arrive(std::uint64_t round) const {
  auto& a = arrivals(round);
  std::uint64_t cur = a.load();
  std::uint64_t next = 0;
  do {
    // A word of an older round is stale (that round is merged: its slots were free to take).
    const std::uint64_t count = (cur >> count_bits) == round ? (cur & count_mask) + 1 : 1;
    next = (round << count_bits) | count;
  } while (!a.compare_exchange_weak(cur, next));
  return (next & count_mask) >= head().live.load();
}

void shm_segment::wake_combiner() const {
  auto& h = head();
  h.combine_word.fetch_add(1);
  futex_wake(h.combine_word, 1);
}

template <class Done>
bool shm_segment::wait_published(const Done& done, std::chrono::microseconds timeout) const {
  if (done()) return true;
  auto& h = head();
  const auto until = std::chrono::steady_clock::now() + timeout;
  h.waiters.fetch_add(1);
  bool ok = false;
  for (;;) {
    const std::uint32_t seen = h.published_word.load();
    if ((ok = done())) break;
    auto left = std::chrono::duration_cast<std::chrono::microseconds>(until - std::chrono::steady_clock::now());
    if (left.count() <= 0 || h.broken.load() != 0) break;
    futex_wait(h.published_word, seen, left);
  }
  h.waiters.fetch_sub(1);
  return ok;
}

shm_segment::post_result shm_segment::post(int child, std::uint64_t round, const step_states& states,
                                           std::chrono::microseconds wait, bool unchanged) {
  auto& h = head();
  if (child < 0 || child >= shape_.ranks || round == 0) return post_result::duplicate;
  if (states.size() > static_cast<std::size_t>(shape_.max_rooms)) return post_result::too_many_rooms;
  auto& s = post_slot(child, round);
  if (s.round.load(std::memory_order_acquire) >= round) return post_result::duplicate;
  // The slot is free once the round it held (round - post_slots) is merged.
  const auto slots = static_cast<std::uint64_t>(shape_.post_slots);
  const std::uint64_t need = round > slots ? round - slots : 0;
  if (!wait_published([&] { return h.merged.load(std::memory_order_acquire) >= need; }, wait))
    return post_result::full;
  if (unchanged && round > 1) {
    s.count = unchanged_post;
  } else {
    s.count = static_cast<std::uint32_t>(states.size());
    if (!states.empty()) std::memcpy(static_cast<void*>(s.states()), states.data(), states.size() * sizeof(room_state));
  }
  // seq_cst: paired with child_down's store of `live` and the combiner's scan (one of the two
  // sees the other, so the round's last post is never left unmerged).
  s.round.store(round);
  if (arrive(round)) wake_combiner();
  return post_result::posted;
}

bool shm_segment::read(std::uint64_t round, agreed_view& out) const {
  auto& s = ring_slot(round);
  if (round == 0 || s.round.load(std::memory_order_acquire) != round) return false;
  const std::uint32_t count = s.count;
  out.round = round;
  out.group = head().group;
  copy_states(s.states(), std::min<std::uint64_t>(count, 2 * std::uint64_t(shape_.max_rooms)), out.states);
  // The combiner clears the round before it rewrites a slot (round + ring_slots): a reader
  // that was lapped sees it here and drops the copy. (A reader at step k is never lapped while
  // it reads round k - L, see agreed_ring; only a rank the group counts as dead can be.) The
  // release half orders the copy before this check, as a fence would.
  return s.round.fetch_add(0, std::memory_order_acq_rel) == round;
}

bool shm_segment::same_as(std::uint64_t round, std::uint64_t held) const {
  auto& s = ring_slot(round);
  if (round == 0 || held >= round || s.round.load(std::memory_order_acquire) != round) return false;
  const bool same = s.same_since <= held;
  return s.round.fetch_add(0, std::memory_order_acq_rel) == round && same;
}

bool shm_segment::wait(std::uint64_t round, std::chrono::microseconds timeout) const {
  auto& h = head();
  return wait_published(
      [&] {
        return ring_slot(round).round.load(std::memory_order_acquire) == round ||
               h.latest.load(std::memory_order_acquire) >= round + std::uint64_t(shape_.ring_slots);  // lapped: never
      },
      timeout) &&
         ring_slot(round).round.load(std::memory_order_acquire) == round;
}

std::string shm_segment::broken() const {
  if (head().broken.load() == 0) return {};
  return "an agreed round of group " + std::to_string(head().group) + " held more than " +
         std::to_string(2 * std::uint64_t(shape_.max_rooms)) + " rooms (KVFLOW_AGREEMENT_SHM_ROOMS)";
}

// ---- the combiner ----

shm_combiner::shm_combiner(std::shared_ptr<shm_segment> segment, int group, agreed_fn on_agreed,
                           std::chrono::milliseconds idle_check, std::chrono::milliseconds tombstone_age)
    : seg_(std::move(segment)),
      group_(group),
      on_agreed_(std::move(on_agreed)),
      idle_check_(idle_check),
      table_(65536, tombstone_age),
      dead_(seg_->shape().ranks, false),
      by_message_(seg_->shape().ranks, false),
      remote_(seg_->shape().ranks),
      last_post_(seg_->shape().ranks) {
  thread_ = std::thread([this] { run(); });
}

shm_combiner::~shm_combiner() {
  stop_.store(true);
  seg_->wake_combiner();
  thread_.join();
}

void shm_combiner::run() {
  auto& h = seg_->head();
  for (;;) {
    // The word first, then `stop`: the destructor sets `stop` before it bumps the word, so a stop
    // this check misses has changed the word, and the wait below returns at once.
    const std::uint32_t seen = h.combine_word.load();
    if (stop_.load()) break;
    {
      std::lock_guard<std::mutex> g(mutex_);
      advance();
    }
    // The timeout is a safety net only: every post that may complete a round wakes this thread.
    futex_wait(h.combine_word, seen, idle_check_);
  }
}

void shm_combiner::post_remote(int child, std::uint64_t round, step_states states) {
  std::lock_guard<std::mutex> g(mutex_);
  if (child < 0 || child >= static_cast<int>(dead_.size()) || dead_[child] || round < next_) return;
  if (!remote_[child].emplace(round, std::move(states)).second) return;  // a duplicate report
  if (!by_message_[child]) {
    // No longer waited for in the segment; a post that completes a round there without it now
    // wakes the combiner, and one that raced this is seen by the advance below.
    by_message_[child] = true;
    seg_->head().live.fetch_sub(1);
  }
  advance();
}

void shm_combiner::child_down(int child) {
  std::lock_guard<std::mutex> g(mutex_);
  if (child < 0 || child >= static_cast<int>(dead_.size()) || dead_[child]) return;
  dead_[child] = true;
  remote_[child].clear();
  if (!by_message_[child]) seg_->head().live.fetch_sub(1);
  advance();
}

bool shm_combiner::all_down() const {
  std::lock_guard<std::mutex> g(mutex_);
  return std::all_of(dead_.begin(), dead_.end(), [](bool d) { return d; });
}

std::uint64_t shm_combiner::merged() const { return seg_->head().merged.load(); }

bool shm_combiner::ready(std::uint64_t round) const {
  for (int c = 0; c < static_cast<int>(dead_.size()); ++c) {
    if (dead_[c] || remote_[c].count(round) != 0) continue;
    if (seg_->post_slot(c, round).round.load() != round) return false;
  }
  return true;
}

void shm_combiner::advance() {
  if (seg_->head().broken.load() != 0) return;
  while (!std::all_of(dead_.begin(), dead_.end(), [](bool d) { return d; }) && ready(next_)) {
    const std::uint64_t round = next_;
    // Rounds are merged in order and only once every live child's post is there, so each
    // child's post of the round can be merged where it lies: last_post_ holds the child's
    // latest post (an unchanged one is its post of round - 1), read from the segment only
    // when it changed, and a dead child's last post fails its rooms (round_collector's rules,
    // without a copy of every post per round).
    inputs_.clear();
    dead_posts_.clear();
    for (int c = 0; c < static_cast<int>(dead_.size()); ++c) {
      if (dead_[c]) {
        dead_posts_.push_back(&last_post_[c]);
        continue;
      }
      if (auto it = remote_[c].find(round); it != remote_[c].end()) {
        last_post_[c] = std::move(it->second);
        remote_[c].erase(it);
      } else {
        auto& s = seg_->post_slot(c, round);
        if (s.count != unchanged_post)
          copy_states(s.states(), std::min<std::uint32_t>(s.count, seg_->shape().max_rooms), last_post_[c]);
      }
      inputs_.push_back(&last_post_[c]);
    }
    auto merged = merge_min(inputs_);
    if (!dead_posts_.empty()) merged = fail_with_dead(std::move(merged), dead_posts_);
    publish(round, table_.apply(merged, agreed_table::clock::now()));
    ++next_;
  }
}

void shm_combiner::publish(std::uint64_t round, const step_states& agreed) {
  auto& h = seg_->head();
  // The posts of `round` are copied: their slots are free for round + post_slots.
  h.merged.store(round);
  if (agreed.size() > 2 * static_cast<std::size_t>(seg_->shape().max_rooms)) {
    h.broken.store(1);
  } else {
    auto& s = seg_->ring_slot(round);
    s.round.store(0);  // a reader of the lapped round sees it leave
    s.same_since = table_.same_since();  // rounds are merged in order, from 1
    s.count = static_cast<std::uint32_t>(agreed.size());
    if (!agreed.empty()) std::memcpy(static_cast<void*>(s.states()), agreed.data(), agreed.size() * sizeof(room_state));
    s.round.store(round, std::memory_order_release);
    h.latest.store(round);
  }
  h.published_word.fetch_add(1);
  if (h.waiters.load() > 0) futex_wake(h.published_word, INT_MAX);
  // Every member opened the segment before it posted round 1: the name is needed no more, and
  // nothing is left in /dev/shm if this process is killed.
  if (round == 1) seg_->unlink();
  if (on_agreed_ && h.broken.load() == 0)
    on_agreed_(std::make_shared<const agreed_view>(agreed_view{round, group_, agreed, table_.same_since()}));
}

}  // namespace kvflow
