// Target shm_segment: a group's shared-memory agreement segment (actors/shm_agreement.hpp) as
// another process left it. The input is the whole segment: header, arrival words, every
// rank's post slots and the ring of agreed rounds. It is written to /dev/shm under a fixed
// name, then used as the processes of a group use it: a member opens it (shm_segment::open
// checks what it can of the header), reads agreed rounds from the ring and posts its own; then
// a combiner over it merges what the post slots hold (the leader's merge: the posts the other
// ranks wrote), with a child reporting by message and one going down. Property: no crash, no
// sanitizer report, bounded memory. The seeds are real segments: made by create(), posted
// into, merged. One instance at a time (the segment's name is in its header, so it is fixed).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>

#include "actors/shm_agreement.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

namespace {

const char* const name = "/kvflow-fuzz-segment";
constexpr int group = 5;
constexpr auto no_wait = std::chrono::microseconds(0);

bool write_segment(const std::uint8_t* data, std::size_t size) {
  shm_unlink(name);
  int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) return false;
  bool ok = ftruncate(fd, static_cast<off_t>(size)) == 0;
  std::size_t done = 0;
  while (ok && done < size) {
    auto n = write(fd, data + done, size - done);
    ok = n > 0;
    if (ok) done += static_cast<std::size_t>(n);
  }
  close(fd);
  return ok;
}

// The whole file behind `fd` (the combiner unlinks the name once it merged round 1).
bytes read_segment(int fd) {
  struct stat st {};
  if (fstat(fd, &st) != 0) fail("cannot stat the seed segment");
  bytes out(static_cast<std::size_t>(st.st_size));
  std::size_t done = 0;
  while (done < out.size()) {
    auto n = pread(fd, out.data() + done, out.size() - done, static_cast<off_t>(done));
    if (n <= 0) fail("cannot read the seed segment");
    done += static_cast<std::size_t>(n);
  }
  close(fd);
  return out;
}

step_states states_of(int child, std::uint64_t round) {
  return {{1, 1, static_cast<std::uint8_t>((child + round) % 5), round % 2 == 0}, {3, 2, 2, false}};
}

// A segment of `shape` after `rounds` rounds posted by every rank (merged by a combiner when
// `merge`), as the file under `name` holds it.
bytes seed(shm_shape shape, std::uint64_t rounds, bool merge) {
  shm_unlink(name);
  auto seg = shm_segment::create(name, group, shape);
  if (!seg) fail("seed segment: " + seg.error().reason());
  const int fd = shm_open(name, O_RDONLY, 0);
  if (fd < 0) fail("cannot open the seed segment");
  {
    std::unique_ptr<shm_combiner> combiner;
    if (merge) combiner = std::make_unique<shm_combiner>(seg.value(), group, nullptr, std::chrono::hours(1));
    for (std::uint64_t r = 1; r <= rounds; ++r)
      for (int c = 0; c < shape.ranks; ++c)
        seg.value()->post(c, r, states_of(c, r), std::chrono::seconds(5), r == 3 && c == 0);
    if (merge)
      for (int i = 0; i < 1000 && combiner->merged() < rounds; ++i) usleep(1000);
  }
  auto out = read_segment(fd);
  seg.value()->unlink();
  return out;
}

}  // namespace

std::vector<bytes> kvflow::fuzz::seeds() {
  return {
      seed({2, 2, 2, 4}, 0, false),
      seed({2, 2, 2, 4}, 1, true),
      seed({3, 4, 4, 2}, 3, true),
      seed({1, 2, 2, 1}, 2, false),  // posted, not merged yet
  };
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (!write_segment(data, size)) return 0;
  auto opened = shm_segment::open(name, group);
  shm_unlink(name);  // the mapping stays
  if (!opened) return 0;
  auto seg = opened.value();
  // A member: the agreed rounds the ring holds, then posts of its own.
  agreed_view v;
  for (std::uint64_t r = 0; r <= 4; ++r) {
    (void)seg->read(r, v);
    (void)seg->same_as(r, r > 0 ? r - 1 : 0);
    (void)seg->wait(r, no_wait);
  }
  (void)seg->broken();
  for (std::uint64_t r = 1; r <= 2; ++r) (void)seg->post(0, r, states_of(0, r), no_wait, r == 2);
  // The leader's merge over whatever the post slots hold.
  {
    shm_combiner combiner(seg, group, [](const std::shared_ptr<const agreed_view>&) {}, std::chrono::hours(1));
    combiner.post_remote(1, 1, states_of(1, 1));
    combiner.child_down(seg->shape().ranks - 1);
    (void)combiner.merged();
  }
  for (std::uint64_t r = 1; r <= 3; ++r) (void)seg->read(r, v);
  return 0;
}
