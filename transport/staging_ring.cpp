#include "transport/staging_ring.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#if defined(__SANITIZE_THREAD__)
#define KVFLOW_TSAN_KEYS 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KVFLOW_TSAN_KEYS 1
#endif
#endif
#ifdef KVFLOW_TSAN_KEYS
#include <sanitizer/tsan_interface.h>
#endif

namespace kvflow::transport {

namespace {

constexpr std::uint64_t magic = 0x6b7666737467524eULL;  // "kvfstgRN"
constexpr std::uint32_t layout_version = 1;
constexpr std::uint64_t page = 4096;
constexpr std::uint64_t data_align = 64u << 10;
constexpr std::size_t reason_bytes = 160;
constexpr std::uint32_t max_lanes = 256, max_slots = 64;

static_assert(std::atomic<std::uint64_t>::is_always_lock_free && std::atomic<std::uint32_t>::is_always_lock_free,
              "the ring's atomics are shared between processes: they must be lock-free");
static_assert(std::is_trivially_copyable<staged_desc>::value && sizeof(staged_desc) == 24,
              "runs are copied through shared memory as bytes");

std::uint64_t round_up(std::uint64_t v, std::uint64_t to) { return (v + to - 1) / to * to; }

}  // namespace

struct staging_ring::header {
  std::atomic<std::uint64_t> magic;  // stored last at creation: an opener sees a whole header
  std::uint32_t version;
  std::uint32_t lanes, slots, max_descs;
  std::uint64_t slot_bytes, total;
  std::uint64_t creator_pid;
  alignas(64) std::atomic<std::uint32_t> doorbell;
};

struct staging_ring::lane_header {
  alignas(64) std::atomic<std::uint64_t> owner;  // 0: free; else the claimant
  std::atomic<std::uint32_t> bell;
};

struct staging_ring::slot_header {
  alignas(64) std::atomic<std::uint32_t> state;
  std::uint32_t count;  // runs in the slot
  std::uint64_t seq;    // the sender's number for it (the receiver does not interpret it)
  std::int32_t verdict;  // 0: landed
  char reason[reason_bytes];
};

// ThreadSanitizer orders threads by the address an atomic is released and acquired at, and one
// process may map a ring's file at two addresses (a sender and a receiver in one process), where
// it would see no order between them. So every hand-over also releases or acquires a key object
// of its (file, lane, slot), one for all mappings of the file in this process. Only their
// addresses are used: per lane, the lane's key, then one per slot.
struct staging_ring::sync_keys {
  std::unique_ptr<std::uint64_t[]> keys{new std::uint64_t[max_lanes * (max_slots + 1)]};
};

namespace {

struct layout {
  std::uint64_t lanes_off = 0, metas_off = 0, meta_bytes = 0, data_off = 0, total = 0;
};

// An error when the shape is out of bounds (so a hostile header cannot make an opener compute
// past its mapping or overflow).
result<layout> layout_of(const ring_shape& s) {
  if (s.lanes < 1 || s.lanes > max_lanes) return status::error("staging ring: lanes must be 1 to 256");
  if (s.slots < 1 || s.slots > max_slots) return status::error("staging ring: slots must be 1 to 64 per lane");
  if (s.slot_bytes < data_align || s.slot_bytes > (1ull << 30) || s.slot_bytes % data_align != 0)
    return status::error("staging ring: slot bytes must be a multiple of 64 KiB up to 1 GiB");
  if (s.max_descs < 1 || s.max_descs > (1u << 16)) return status::error("staging ring: runs per slot must be 1 to 65536");
  layout l;
  const std::uint64_t slots = std::uint64_t{s.lanes} * s.slots;
  l.lanes_off = page;
  l.metas_off = round_up(l.lanes_off + s.lanes * sizeof(staging_ring::lane_header), page);
  l.meta_bytes = round_up(sizeof(staging_ring::slot_header) + std::uint64_t{s.max_descs} * sizeof(staged_desc), page);
  l.data_off = round_up(l.metas_off + slots * l.meta_bytes, data_align);
  l.total = l.data_off + slots * s.slot_bytes;
  if (l.total > (64ull << 30)) return status::error("staging ring: larger than 64 GiB");
  return l;
}

status sys_error(const std::string& what, const std::string& name, int err) {
  return status::error("staging ring " + name + ": " + what + ": " + std::strerror(err));
}

// The keys of the file `st` describes: null without ThreadSanitizer.
std::shared_ptr<staging_ring::sync_keys> keys_of([[maybe_unused]] const struct stat& st) {
#ifdef KVFLOW_TSAN_KEYS
  static std::mutex m;
  static std::map<std::pair<dev_t, ino_t>, std::weak_ptr<staging_ring::sync_keys>> by_file;
  std::lock_guard<std::mutex> g(m);
  for (auto it = by_file.begin(); it != by_file.end();) it = it->second.expired() ? by_file.erase(it) : std::next(it);
  auto& known = by_file[{st.st_dev, st.st_ino}];
  auto k = known.lock();
  if (!k) known = k = std::make_shared<staging_ring::sync_keys>();
  return k;
#else
  return nullptr;
#endif
}

// Releases or acquires the key of lane `l`'s slot `s`, or of the lane itself when `s` < 0.
void key_release([[maybe_unused]] staging_ring::sync_keys* k, [[maybe_unused]] int l, [[maybe_unused]] int s) {
#ifdef KVFLOW_TSAN_KEYS
  __tsan_release(&k->keys[l * (max_slots + 1) + 1 + s]);
#endif
}

void key_acquire([[maybe_unused]] staging_ring::sync_keys* k, [[maybe_unused]] int l, [[maybe_unused]] int s) {
#ifdef KVFLOW_TSAN_KEYS
  __tsan_acquire(&k->keys[l * (max_slots + 1) + 1 + s]);
#endif
}

}  // namespace

bool process_alive(std::uint64_t pid) {
  if (pid == 0 || pid > static_cast<std::uint64_t>(INT32_MAX)) return false;
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM;
}

staging_ring::staging_ring(std::string name, std::byte* base, std::uint64_t bytes, const ring_shape& shape, bool owner,
                           std::shared_ptr<sync_keys> keys)
    : name_(std::move(name)), base_(base), bytes_(bytes), shape_(shape), owner_(owner), keys_(std::move(keys)) {
  const auto l = layout_of(shape).value();  // both factories checked the shape
  lanes_off_ = l.lanes_off;
  metas_off_ = l.metas_off;
  meta_bytes_ = l.meta_bytes;
  data_off_ = l.data_off;
}

staging_ring::~staging_ring() {
  if (base_ != nullptr) ::munmap(base_, bytes_);
  if (owner_) ::shm_unlink(name_.c_str());
}

result<std::unique_ptr<staging_ring>> staging_ring::create(const std::string& name, const ring_shape& shape) {
  auto l = layout_of(shape);
  if (!l) return l.error();
  int fd = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) return sys_error("shm_open", name, errno);
  auto fail = [&](const char* what, int err) {
    ::close(fd);
    ::shm_unlink(name.c_str());
    return sys_error(what, name, err);
  };
  if (::ftruncate(fd, static_cast<off_t>(l.value().total)) != 0) return fail("ftruncate", errno);
  struct stat st {};
  if (::fstat(fd, &st) != 0) return fail("fstat", errno);
  void* base = ::mmap(nullptr, l.value().total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) return fail("mmap", errno);
  ::close(fd);
  auto* h = new (base) header;  // the file is zeroed: every lane free, every slot free
  h->version = layout_version;
  h->lanes = shape.lanes;
  h->slots = shape.slots;
  h->max_descs = shape.max_descs;
  h->slot_bytes = shape.slot_bytes;
  h->total = l.value().total;
  h->creator_pid = static_cast<std::uint64_t>(::getpid());
  h->magic.store(magic, std::memory_order_release);
  return std::unique_ptr<staging_ring>(
      new staging_ring(name, static_cast<std::byte*>(base), l.value().total, shape, true, keys_of(st)));
}

result<std::unique_ptr<staging_ring>> staging_ring::open(const std::string& name) {
  int fd = ::shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) return sys_error("shm_open", name, errno);
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_size < static_cast<off_t>(page)) {
    ::close(fd);
    return status::error("staging ring " + name + ": too short for a header");
  }
  const auto file_bytes = static_cast<std::uint64_t>(st.st_size);
  void* base = ::mmap(nullptr, file_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (base == MAP_FAILED) return sys_error("mmap", name, errno);
  auto refuse = [&](const std::string& why) {
    ::munmap(base, file_bytes);
    return status::error("staging ring " + name + ": " + why);
  };
  const auto* h = static_cast<const header*>(base);
  if (h->magic.load(std::memory_order_acquire) != magic) return refuse("not a staging ring (or not ready)");
  if (h->version != layout_version) return refuse("layout version " + std::to_string(h->version));
  ring_shape shape{h->lanes, h->slots, h->slot_bytes, h->max_descs};
  auto l = layout_of(shape);
  if (!l) return refuse(l.error().reason());
  if (l.value().total != h->total || l.value().total != file_bytes)
    return refuse("its header describes " + std::to_string(l.value().total) + " bytes, the file has " +
                  std::to_string(file_bytes));
  return std::unique_ptr<staging_ring>(
      new staging_ring(name, static_cast<std::byte*>(base), file_bytes, shape, false, keys_of(st)));
}

staging_ring::header& staging_ring::head() const { return *reinterpret_cast<header*>(base_); }

staging_ring::lane_header& staging_ring::lane(int l) const {
  return reinterpret_cast<lane_header*>(base_ + lanes_off_)[l];
}

staging_ring::slot_header& staging_ring::meta(int l, int s) const {
  const std::uint64_t i = std::uint64_t(l) * shape_.slots + std::uint64_t(s);
  return *reinterpret_cast<slot_header*>(base_ + metas_off_ + i * meta_bytes_);
}

staged_desc* staging_ring::descs(int l, int s) const {
  return reinterpret_cast<staged_desc*>(reinterpret_cast<std::byte*>(&meta(l, s)) + sizeof(slot_header));
}

std::uint64_t staging_ring::creator_pid() const { return head().creator_pid; }

std::uint64_t staging_ring::data_offset(int l, int s) const {
  const std::uint64_t i = std::uint64_t(l) * shape_.slots + std::uint64_t(s);
  return data_off_ + i * shape_.slot_bytes;
}

int staging_ring::claim_lane(std::uint64_t claimant) {
  for (std::uint32_t l = 0; l < shape_.lanes; ++l) {
    auto& owner = lane(static_cast<int>(l)).owner;
    std::uint64_t seen = owner.load(std::memory_order_acquire);
    // A claimant that died without releasing its lane leaves it to the next one.
    if (seen != 0 && process_alive(seen >> 32)) continue;
    if (owner.compare_exchange_strong(seen, claimant, std::memory_order_acq_rel)) {
      key_acquire(keys_.get(), static_cast<int>(l), -1);
      return static_cast<int>(l);
    }
  }
  return -1;
}

void staging_ring::release_lane(int l, std::uint64_t claimant) {
  std::uint64_t expected = claimant;
  key_release(keys_.get(), l, -1);
  lane(l).owner.compare_exchange_strong(expected, 0, std::memory_order_acq_rel);
}

std::atomic<std::uint32_t>& staging_ring::doorbell() { return head().doorbell; }
std::atomic<std::uint32_t>& staging_ring::bell(int l) { return lane(l).bell; }
std::atomic<std::uint32_t>& staging_ring::state(int l, int s) { return meta(l, s).state; }

void staging_ring::store_state(int l, int s, slot_state to) {
  key_release(keys_.get(), l, s);  // before the store: whoever sees it finds the release done
  meta(l, s).state.store(static_cast<std::uint32_t>(to), std::memory_order_release);
}

slot_state staging_ring::load_state(int l, int s) const {
  const auto v = meta(l, s).state.load(std::memory_order_acquire);
  key_acquire(keys_.get(), l, s);
  return static_cast<slot_state>(v);
}

// Only its acquire is told to TSan: no thread takes a slot over on seeing it taken or free (were
// one to, TSan would report it rather than miss a race).
bool staging_ring::exchange_state(int l, int s, slot_state from, slot_state to) {
  auto expected = static_cast<std::uint32_t>(from);
  const bool moved = meta(l, s).state.compare_exchange_strong(expected, static_cast<std::uint32_t>(to),
                                                              std::memory_order_acq_rel);
  key_acquire(keys_.get(), l, s);
  return moved;
}

void staging_ring::write_descs(int l, int s, const std::vector<staged_desc>& runs, std::uint64_t seq) {
  auto& m = meta(l, s);
  if (!runs.empty()) std::memcpy(static_cast<void*>(descs(l, s)), runs.data(), runs.size() * sizeof(staged_desc));
  m.count = static_cast<std::uint32_t>(runs.size());
  m.seq = seq;
}

result<std::vector<staged_desc>> staging_ring::read_descs(int l, int s) const {
  const auto& m = meta(l, s);
  const std::uint32_t count = m.count;  // read once: the sender may write it again
  if (count > shape_.max_descs)
    return status::error("staged slot names " + std::to_string(count) + " runs; a slot holds at most " +
                         std::to_string(shape_.max_descs));
  std::vector<staged_desc> runs(count);
  if (count > 0) std::memcpy(static_cast<void*>(runs.data()), descs(l, s), count * sizeof(staged_desc));
  std::uint64_t total = 0;
  for (const auto& r : runs) {
    if (r.len == 0 || r.len > shape_.slot_bytes - total)
      return status::error("staged slot's runs add up to more than its " + std::to_string(shape_.slot_bytes) + " bytes");
    total += r.len;
  }
  return runs;
}

std::uint64_t staging_ring::seq(int l, int s) const { return meta(l, s).seq; }

void staging_ring::write_verdict(int l, int s, const status& st) {
  auto& m = meta(l, s);
  m.verdict = st ? 0 : 1;
  std::memset(m.reason, 0, reason_bytes);
  if (!st) std::memcpy(m.reason, st.reason().data(), std::min(st.reason().size(), reason_bytes - 1));
}

status staging_ring::read_verdict(int l, int s) const {
  const auto& m = meta(l, s);
  if (m.verdict == 0) return {};
  char reason[reason_bytes];
  std::memcpy(reason, m.reason, reason_bytes);
  reason[reason_bytes - 1] = '\0';
  return status::error(std::string("refused by the receiver: ") + reason);
}

}  // namespace kvflow::transport
