// Target step_report: a child's states for one round of its group's agreement
// (msg::step_report), as a supervisor in another process receives it. The supervisor actor's
// handler (supervisor.cpp) is not reachable here; what it runs on the report is: the tree's
// round_collector (add, then the rounds taken in order, a dead child failing every room) and,
// at the root, the agreed_table; or, for a group that agrees through shared memory,
// shm_combiner::post_remote, which merges it with the posts of the ranks of its host.
// Properties: besides no crash and bounded memory, when the report's states are sorted with
// each key once (what agreement.hpp asks of every input), every merged and agreed round is too,
// and each merged state is the MIN of the children's (a missing key counting as Bootstrapping).
#include <unistd.h>

#include <algorithm>
#include <map>

#include "actors/agreed_ring.hpp"
#include "actors/messages.hpp"
#include "actors/shm_agreement.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using namespace kvflow;
using namespace kvflow::fuzz;

namespace {

constexpr int children = 3;
constexpr std::uint64_t rounds = 3;  // every child but the report's own reports these

bool sorted_unique(const step_states& s) {
  for (std::size_t i = 1; i < s.size(); ++i)
    if (!key_less(s[i - 1], s[i])) return false;
  return true;
}

// What the other children report: sorted, a few keys shared with the seeds' reports.
step_states fixed_report(int child, std::uint64_t round) {
  step_states s;
  for (std::uint64_t room : {1, 2, 5, 9})
    if ((room + child) % 4 != 0)
      s.push_back({room, 1, static_cast<std::uint8_t>((room + child + round) % 5), (room + round) % 2 == 0});
  return s;
}

// merge_min's contract, computed the slow way.
void check_min(const std::vector<const step_states*>& inputs, const step_states& merged) {
  std::map<std::pair<std::uint64_t, std::uint64_t>, room_state> want;
  for (const auto* in : inputs)
    for (const auto& s : *in) want.emplace(std::make_pair(s.room, s.incarnation), room_state{s.room, s.incarnation, 255, true});
  for (auto& entry : want)
    for (const auto* in : inputs) {
      const auto key = entry.first;
      auto& w = entry.second;
      auto it = std::find_if(in->begin(), in->end(), [&](const room_state& s) {
        return s.room == key.first && s.incarnation == key.second;
      });
      w.state = std::min<std::uint8_t>(w.state, it == in->end() ? std::uint8_t(kv_poll::bootstrapping) : it->state);
      if (it != in->end()) w.released = w.released && it->released;
    }
  if (merged.size() != want.size()) fail("merge has " + std::to_string(merged.size()) + " keys, not " + std::to_string(want.size()));
  std::size_t i = 0;
  for (const auto& [key, w] : want)
    if (!(merged[i++] == w)) fail("merge of room " + std::to_string(key.first) + " is not the MIN of the children");
}

// The message tree: the report, then the other children's, rounds taken in order; `dies` (or
// -1) goes down after the reports, as a supervisor's down handler does.
void tree(const msg::step_report& r, int dies) {
  const bool sorted = sorted_unique(r.states);
  round_collector col(children);
  agreed_table table(4);  // few tombstones, so that their bound is reached
  col.add(r.child, r.round, r.states);
  for (std::uint64_t round = 1; round <= rounds; ++round)
    for (int c = 0; c < children; ++c) col.add(c, round, fixed_report(c, round));
  if (dies >= 0) col.child_down(dies);
  for (std::uint64_t round = 1; round <= rounds; ++round) {
    if (!col.complete(round)) break;  // later rounds wait for it (finish_round)
    const auto merged = col.take(round);
    if (sorted && !sorted_unique(merged)) fail("a merged round is not sorted, or holds a key twice");
    if (sorted && dies < 0 && r.round == round && r.child >= 0 && r.child < children) {
      std::vector<step_states> parts;
      for (int c = 0; c < children; ++c) parts.push_back(c == r.child ? r.states : fixed_report(c, round));
      std::vector<const step_states*> in;
      for (const auto& p : parts) in.push_back(&p);
      check_min(in, merged);
    }
    if (dies >= 0)
      for (const auto& s : merged)
        if (s.state != std::uint8_t(kv_poll::failed)) fail("a round with a dead child agreed a room that is not Failed");
    const auto agreed = table.apply(merged);
    if (sorted && !sorted_unique(agreed)) fail("an agreed round is not sorted, or holds a key twice");
  }
}

// A root over shared memory: the report comes by message, the other children post into the
// segment (rank processes of the leader's host).
void shared_memory(const msg::step_report& r) {
  static int serial = 0;
  const std::string name = "/kvflow-fuzz-step-" + std::to_string(getpid()) + "-" + std::to_string(serial++);
  shm_shape shape;
  shape.ranks = children;
  shape.post_slots = 4;
  shape.ring_slots = 4;
  shape.max_rooms = 64;
  auto seg = shm_segment::create(name, 1, shape);
  if (!seg) fail("segment: " + seg.error().reason());
  seg.value()->unlink();
  const bool sorted = sorted_unique(r.states);
  std::vector<std::shared_ptr<const agreed_view>> agreed;
  {
    shm_combiner combiner(seg.value(), 1, [&](const std::shared_ptr<const agreed_view>& v) { agreed.push_back(v); },
                          std::chrono::hours(1));
    combiner.post_remote(r.child, r.round, r.states);
    for (std::uint64_t round = 1; round <= rounds; ++round)
      for (int c = 0; c < children; ++c)
        if (c != r.child) seg.value()->post(c, round, fixed_report(c, round), std::chrono::microseconds(0));
    // Joins the merging thread: every round it could merge is merged.
  }
  for (const auto& v : agreed)
    if (sorted && !sorted_unique(v->states)) fail("a round agreed through shared memory is not sorted");
}

msg::step_report report(std::uint64_t round, std::int32_t child, step_states states) {
  return msg::step_report{round, child, std::move(states)};
}

}  // namespace

std::vector<bytes> kvflow::fuzz::seeds() {
  std::vector<msg::step_report> v{
      report(1, 0, fixed_report(0, 1)),
      report(2, 1, {{1, 1, 4, true}, {2, 1, 0, false}, {3, 2, 3, false}, {9, 1, 2, true}}),
      report(1, 2, {}),
      report(3, 0, {{5, 1, 1, false}}),
  };
  std::vector<bytes> out;
  for (auto& r : v) out.push_back(serialize(r));
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return fuzz_message<msg::step_report>(data, size, [](const msg::step_report& r) {
    tree(r, -1);
    tree(r, static_cast<int>((static_cast<std::uint32_t>(r.child) + 1) % children));  // another child dies
    shared_memory(r);
  });
}
