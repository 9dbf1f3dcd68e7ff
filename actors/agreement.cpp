#include "actors/agreement.hpp"

#include <algorithm>

namespace kvflow {

step_states merge_min(const std::vector<const step_states*>& inputs) {
  step_states out;
  if (inputs.empty()) return out;
  if (inputs.size() == 1) return *inputs[0];
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
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      const auto& in = *inputs[i];
      if (pos[i] < in.size() && !key_less(*lowest, in[pos[i]]) && !key_less(in[pos[i]], *lowest)) {
        merged.state = std::min(merged.state, in[pos[i]].state);
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

round_collector::round_collector(int children)
    : children_(children), live_(children), dead_(children, false), last_(children) {}

bool round_collector::add(int child, std::uint64_t round, step_states states) {
  if (child < 0 || child >= children_ || dead_[child]) return false;
  auto& p = rounds_[round];
  if (p.got.empty()) {
    p.got.assign(children_, false);
    p.parts.resize(children_);
  }
  if (p.got[child]) return false;  // a duplicate report for a round is ignored
  p.got[child] = true;
  ++p.count;
  last_[child] = states;
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
  bool any_dead = live_ < children_;
  if (any_dead) {
    step_states dead_rooms;
    for (int c = 0; c < children_; ++c)
      if (dead_[c]) dead_rooms.insert(dead_rooms.end(), last_[c].begin(), last_[c].end());
    std::sort(dead_rooms.begin(), dead_rooms.end(), key_less);
    step_states all;
    std::merge(merged.begin(), merged.end(), dead_rooms.begin(), dead_rooms.end(),
               std::back_inserter(all), key_less);
    all.erase(std::unique(all.begin(), all.end(),
                          [](const room_state& a, const room_state& b) {
                            return a.room == b.room && a.incarnation == b.incarnation;
                          }),
              all.end());
    for (auto& s : all) s.state = static_cast<std::uint8_t>(kv_poll::failed);
    merged = std::move(all);
  }
  rounds_.erase(it);
  return merged;
}

step_states agreed_table::apply(const step_states& merged) {
  step_states out;
  out.reserve(merged.size());
  std::unordered_map<key, std::uint8_t, key_hash> next;
  next.reserve(merged.size());
  const auto failed = static_cast<std::uint8_t>(kv_poll::failed);
  for (const auto& m : merged) {
    key k{m.room, m.incarnation};
    std::uint8_t s = m.state;
    auto old = agreed_.find(k);
    std::uint8_t prev = 0xff;
    if (old != agreed_.end()) {
      prev = old->second;
    } else if (auto t = tombstones_.find(k); t != tombstones_.end()) {
      prev = t->second;
    }
    if (prev != 0xff) {
      // A terminal agreement is final: every rank acted on it (released, reported).
      if (is_terminal(static_cast<kv_poll>(prev)))
        s = prev;
      else if (s == failed)
        s = failed;
      else
        s = std::max(prev, s);
    }
    next.emplace(k, s);
    out.push_back({m.room, m.incarnation, s});
  }
  // Keys no child reports any more: everyone cleared them. Remember terminal ones a while.
  for (const auto& [k, s] : agreed_)
    if (next.find(k) == next.end() && is_terminal(static_cast<kv_poll>(s))) {
      if (tombstones_.emplace(k, s).second) tombstone_order_.push_back(k);
      while (tombstone_order_.size() > max_tombstones_) {
        tombstones_.erase(tombstone_order_.front());
        tombstone_order_.pop_front();
      }
    }
  agreed_ = std::move(next);
  return out;
}

}  // namespace kvflow
