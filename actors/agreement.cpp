#include "actors/agreement.hpp"

#include <cstring>

#include <algorithm>

namespace kvflow {

namespace {

// The common case: every rank of a group holds the same rooms, so the inputs have identical
// keys in the same order and the merge is an element-wise MIN.
// The common case of a group at rest: every rank reports the very states of the first. Bytes
// equal means every field equal (padding that differs only sends a list down the slower path).
bool identical_to_first(const step_states& first, const step_states& in) {
  return in.size() == first.size() &&
         (in.empty() || std::memcmp(static_cast<const void*>(in.data()), static_cast<const void*>(first.data()),
                                    in.size() * sizeof(room_state)) == 0);
}

bool same_keys(const std::vector<const step_states*>& inputs) {
  const auto& first = *inputs[0];
  for (std::size_t i = 1; i < inputs.size(); ++i) {
    const auto& in = *inputs[i];
    if (identical_to_first(first, in)) continue;
    if (in.size() != first.size()) return false;
    for (std::size_t k = 0; k < in.size(); ++k)
      if (in[k].room != first[k].room || in[k].incarnation != first[k].incarnation) return false;
  }
  return true;
}

}  // namespace

std::string malformed(const step_states& s) {
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i].state > static_cast<std::uint8_t>(kv_poll::success))
      return "room " + std::to_string(s[i].room) + " has state " + std::to_string(s[i].state) + ", no kv_poll";
    if (i > 0 && !key_less(s[i - 1], s[i]))
      return "room " + std::to_string(s[i].room) + " is out of order or listed twice";
  }
  return {};
}

step_states merge_min(const std::vector<const step_states*>& inputs) {
  step_states out;
  if (inputs.empty()) return out;
  if (inputs.size() == 1) return *inputs[0];
  if (same_keys(inputs)) {
    out = *inputs[0];
    for (std::size_t i = 1; i < inputs.size(); ++i) {
      const auto& in = *inputs[i];
      if (identical_to_first(*inputs[0], in)) continue;  // MIN with itself
      for (std::size_t k = 0; k < out.size(); ++k) {
        out[k].state = std::min(out[k].state, in[k].state);
        out[k].released = out[k].released && in[k].released;
      }
    }
    return out;
  }
  // k-way merge by cursor: inputs are short sorted vectors (one entry per live room).
  std::vector<std::size_t> pos(inputs.size(), 0);
  std::size_t total = 0;
  for (auto* in : inputs) total = std::max(total, in->size());
  out.reserve(total);
  for (;;) {
    const room_state* lowest = nullptr;
    for (std::size_t i = 0; i < inputs.size(); ++i)
      if (pos[i] < inputs[i]->size()) {
        const auto& cand = (*inputs[i])[pos[i]];
        if (lowest == nullptr || key_less(cand, *lowest)) lowest = &cand;
      }
    if (lowest == nullptr) break;
    room_state merged = *lowest;
    merged.state = static_cast<std::uint8_t>(kv_poll::success);
    merged.released = true;
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      const auto& in = *inputs[i];
      if (pos[i] < in.size() && !key_less(*lowest, in[pos[i]]) && !key_less(in[pos[i]], *lowest)) {
        merged.state = std::min(merged.state, in[pos[i]].state);
        merged.released = merged.released && in[pos[i]].released;
      } else {
        merged.state = std::min(merged.state, static_cast<std::uint8_t>(kv_poll::bootstrapping));
      }
    }
    // Advance every cursor sitting on this key (after the min loop: `lowest` points into them).
    const room_state key = merged;
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      const auto& in = *inputs[i];
      if (pos[i] < in.size() && !key_less(key, in[pos[i]]) && !key_less(in[pos[i]], key)) ++pos[i];
    }
    out.push_back(merged);
  }
  return out;
}

step_states fail_with_dead(step_states merged, const std::vector<const step_states*>& dead_reports) {
  step_states dead_rooms;
  for (const auto* r : dead_reports) dead_rooms.insert(dead_rooms.end(), r->begin(), r->end());
  // A dead child writes nothing any more: it holds none of the rooms' memory (released); where
  // live children hold the room too, their entry (first in the merge) decides.
  for (auto& s : dead_rooms) s.released = true;
  std::sort(dead_rooms.begin(), dead_rooms.end(), key_less);
  step_states all;
  std::merge(merged.begin(), merged.end(), dead_rooms.begin(), dead_rooms.end(), std::back_inserter(all), key_less);
  all.erase(std::unique(all.begin(), all.end(),
                        [](const room_state& a, const room_state& b) {
                          return a.room == b.room && a.incarnation == b.incarnation;
                        }),
            all.end());
  for (auto& s : all) s.state = static_cast<std::uint8_t>(kv_poll::failed);
  return all;
}

round_collector::round_collector(int children)
    : children_(children), live_(children), dead_(children, false), last_(children) {}

bool round_collector::add(int child, std::uint64_t round, step_states states) {
  // A round is taken once, in order: a report for one taken already (a replay, or a forgery)
  // must not open it again.
  if (child < 0 || child >= children_ || dead_[child] || round <= taken_) return false;
  auto& p = rounds_[round];
  if (p.got.empty()) {
    p.got.assign(children_, false);
    p.parts.resize(children_);
  }
  if (p.got[child]) return false;  // a duplicate report for a round is ignored
  p.got[child] = true;
  ++p.count;
  p.parts[child] = std::move(states);
  return p.count >= live_;
}

std::vector<std::uint64_t> round_collector::child_down(int child) {
  std::vector<std::uint64_t> done;
  if (child < 0 || child >= children_ || dead_[child]) return done;
  dead_[child] = true;
  --live_;
  for (auto& [round, p] : rounds_) {
    if (p.got.empty()) continue;
    if (p.got[child]) {
      p.got[child] = false;
      --p.count;
      last_[child] = std::move(p.parts[child]);  // its rooms fail with it (latest round last)
    }
    if (p.count >= live_) done.push_back(round);
  }
  return done;
}

bool round_collector::complete(std::uint64_t round) const {
  auto it = rounds_.find(round);
  return it != rounds_.end() && it->second.count >= live_;
}

step_states round_collector::take(std::uint64_t round) {
  auto it = rounds_.find(round);
  if (it == rounds_.end()) return {};
  auto& p = it->second;
  std::vector<const step_states*> inputs;
  for (int c = 0; c < children_; ++c)
    if (!dead_[c] && p.got[c]) inputs.push_back(&p.parts[c]);
  step_states merged = merge_min(inputs);
  // A dead child fails every room it or the others still hold.
  if (live_ < children_) {
    std::vector<const step_states*> dead_reports;
    for (int c = 0; c < children_; ++c)
      if (dead_[c]) dead_reports.push_back(&last_[c]);
    merged = fail_with_dead(std::move(merged), dead_reports);
  }
  // Each child's latest report stays, so its rooms can be failed if it dies later.
  for (int c = 0; c < children_; ++c)
    if (!dead_[c] && p.got[c]) last_[c] = std::move(p.parts[c]);
  rounds_.erase(it);
  taken_ = std::max(taken_, round);
  return merged;
}

std::chrono::milliseconds tombstone_age(const config::tunables& t) {
  return std::chrono::milliseconds(std::max(t.failure_memory_ms, t.bootstrap_timeout_ms));
}

void agreed_table::drop_oldest_tombstone() {
  tombstones_.erase(tombstone_order_.front().first);
  tombstone_order_.pop_front();
}

step_states agreed_table::apply(const step_states& merged, clock::time_point now) {
  // Tombstones are laid down in time order: those past their age are the oldest.
  while (!tombstone_order_.empty() && now - tombstone_order_.front().second >= tombstone_age_) drop_oldest_tombstone();
  const auto failed = static_cast<std::uint8_t>(kv_poll::failed);
  // The agreed entry given the previous one (null: none) and this round's merge.
  auto rule = [&](const room_state* prev, const room_state& now) -> room_state {
    if (prev == nullptr) return now;
    room_state out = now;
    if (is_terminal(static_cast<kv_poll>(prev->state)))
      out.state = prev->state;  // final: every rank acted on it
    else if (now.state != failed)
      out.state = std::max(prev->state, now.state);
    out.released = prev->released || now.released;
    return out;
  };
  step_states out;
  out.reserve(merged.size());
  // Both lists are sorted by key: one linear walk, no hashing unless a key comes or goes.
  std::size_t i = 0, j = 0;
  while (i < merged.size() || j < agreed_.size()) {
    if (j == agreed_.size() || (i < merged.size() && key_less(merged[i], agreed_[j]))) {
      const auto& m = merged[i++];
      const room_state* prev = nullptr;
      if (auto t = tombstones_.find({m.room, m.incarnation}); t != tombstones_.end()) prev = &t->second;
      out.push_back(rule(prev, m));
    } else if (i == merged.size() || key_less(agreed_[j], merged[i])) {
      // No child reports it any more: everyone cleared it. Remember terminal ones a while.
      const auto& g = agreed_[j++];
      if (is_terminal(static_cast<kv_poll>(g.state))) {
        key k{g.room, g.incarnation};
        if (tombstones_.emplace(k, g).second) tombstone_order_.emplace_back(k, now);
        while (tombstone_order_.size() > max_tombstones_) drop_oldest_tombstone();
      }
    } else {
      const auto& m = merged[i++];
      out.push_back(rule(&agreed_[j++], m));
    }
  }
  if (++applied_ == 1 || out != agreed_) same_since_ = applied_;
  agreed_ = out;
  return out;
}

}  // namespace kvflow
