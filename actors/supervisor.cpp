#include "actors/supervisor.hpp"

#include <spdlog/spdlog.h>

#include <set>

#include "actors/agreed_ring.hpp"
#include "actors/messages.hpp"
#include "actors/sender_check.hpp"
#include "actors/shm_agreement.hpp"
#include "actors/step_board.hpp"

namespace kvflow {
namespace {

struct supervisor_state {
  supervisor_args args;
  caf::actor parent;
  round_collector collector{1};
  agreed_table table;
  std::vector<caf::actor> ranks;  // root: ranks in other processes, sent every agreed round
  std::vector<caf::actor_addr> children;
  std::set<int> gone;  // children that went down (their index may be attached again)
  int ranks_gone = 0;                      // attached ranks that died
  std::vector<caf::message> held;          // rounds agreed before every rank attached
  // Rounds are finished in order: a report can overtake an earlier round's when the route
  // between two processes changes, and the root's agreed table must see rounds in order.
  std::uint64_t next_round = 1;
  std::set<std::uint64_t> completed;  // complete, waiting for an earlier round
  // Root over a segment: the merge, and how many ranks want its rounds by message.
  std::shared_ptr<std::atomic<int>> message_ranks = std::make_shared<std::atomic<int>>(0);
  std::unique_ptr<shm_combiner> combiner;
  static inline const char* name = "kvflow.supervisor";
};

using supervisor_actor = caf::stateful_actor<supervisor_state>;

void finish_one(supervisor_actor* self, std::uint64_t round);

void finish_round(supervisor_actor* self, std::uint64_t round) {
  auto& st = self->state;
  if (round < st.next_round) return;  // finished already
  if (round > st.next_round) {
    st.completed.insert(round);
    return;
  }
  finish_one(self, st.next_round++);
  while (!st.completed.empty() && *st.completed.begin() == st.next_round) {
    st.completed.erase(st.completed.begin());
    finish_one(self, st.next_round++);
  }
}

void finish_one(supervisor_actor* self, std::uint64_t round) {
  auto& st = self->state;
  step_states merged = st.collector.take(round);
  if (!st.args.root) {
    self->send(st.parent, msg::step_report{round, st.args.index_in_parent, std::move(merged)});
    return;
  }
  auto agreed =
      std::make_shared<agreed_view>(agreed_view{round, st.args.group, st.table.apply(merged, self->clock().now()), 0});
  agreed->same_since = st.table.same_since();  // rounds are finished in order, from 1
  if (st.args.publish) st.args.publish->publish(agreed);
  if (st.args.ranks == 0) return;
  // One message object shared by every attached rank: CAF messages are copy-on-write.
  auto m = caf::make_message(msg::agreed_round{round, st.args.group, agreed->states});
  if (static_cast<int>(st.ranks.size()) + st.ranks_gone < st.args.ranks) {
    st.held.push_back(std::move(m));  // a rank not attached yet must not miss a round
    return;
  }
  for (const auto& r : st.ranks) self->send(r, m);
}

void flush_held(supervisor_actor* self) {
  auto& st = self->state;
  if (static_cast<int>(st.ranks.size()) + st.ranks_gone < st.args.ranks) return;
  for (auto& m : st.held)
    for (const auto& r : st.ranks) self->send(r, m);
  st.held.clear();
}

// Moves a completed round's board posts into the collector.
void drain_board(supervisor_actor* self, std::uint64_t round) {
  auto& st = self->state;
  bool done = false;
  for (auto& [child, states] : st.args.board->take(round))
    done = st.collector.add(child, round, std::move(states)) || done;
  if (done || st.collector.complete(round)) finish_round(self, round);
}

// Child i no longer reports (it went down, or sent what cannot be merged): every room of the
// rounds it has not reported fails, and those rounds complete without it.
void child_gone(supervisor_actor* self, int i) {
  auto& st = self->state;
  st.gone.insert(i);
  if (st.combiner) {
    st.children[i] = caf::actor_addr{};
    st.combiner->child_down(i);
    if (st.combiner->all_down()) self->quit(caf::exit_reason::user_shutdown);
    return;
  }
  std::vector<std::uint64_t> rounds;
  if (st.args.board) rounds = st.args.board->child_down(i);
  for (auto round : st.collector.child_down(i)) finish_round(self, round);
  for (auto round : rounds) drain_board(self, round);
}

// Child `i` is `who` from now on, unless a live child other than `who` holds the index.
bool bind_child(supervisor_actor* self, int i, const caf::actor_addr& who) {
  auto& st = self->state;
  auto& slot = st.children[static_cast<std::size_t>(i)];
  if (slot == who) return true;
  if (slot && !st.gone.count(i)) return false;
  slot = who;
  st.gone.erase(i);
  self->monitor(who);
  return true;
}

caf::behavior supervisor(supervisor_actor* self, supervisor_args args, caf::actor parent) {
  auto& st = self->state;
  st.args = std::move(args);
  st.parent = std::move(parent);
  st.collector = round_collector(st.args.children);
  st.table = agreed_table(65536, st.args.tombstone_age);
  st.children.resize(st.args.children);
  if (st.parent) self->monitor(st.parent);
  if (st.args.shared_memory) {
    // The combiner's rounds reach the ranks attached by message through this actor (which
    // knows them); none go while there are none (the ranks of this host read the segment).
    auto me = caf::actor_cast<caf::weak_actor_ptr>(self);
    auto wanted = st.message_ranks;
    const int group = st.args.group;
    st.combiner = std::make_unique<shm_combiner>(
        st.args.shared_memory, group,
        [me, wanted, group](const std::shared_ptr<const agreed_view>& v) {
          if (wanted->load() == 0) return;
          // As the supervisor itself: the only agreed rounds it forwards are its own.
          if (auto p = caf::actor_cast<caf::actor>(me)) caf::send_as(p, p, msg::agreed_round{v->round, group, v->states});
        },
        shm_combiner::default_idle_check, st.args.tombstone_age);
  }
  const std::string who = "agreement group " + std::to_string(st.args.group) + " supervisor";
  detail::refuse_stray_errors(self, who);
  self->set_down_handler([self](const caf::down_msg& dm) {
    auto& st = self->state;
    if (st.parent && dm.source == st.parent.address()) {
      // The TP supervisor went (with its rank's process): this shard can no longer agree
      // anything; leaving tells its children.
      if (dm.reason == caf::exit_reason::user_shutdown)
        spdlog::debug("agreement group {}: TP supervisor left; shard {} leaves", st.args.group, st.args.index_in_parent);
      else
        spdlog::warn("agreement group {}: TP supervisor down; shard {} leaves", st.args.group, st.args.index_in_parent);
      self->quit(caf::exit_reason::user_shutdown);
      return;
    }
    for (int i = 0; i < static_cast<int>(st.children.size()); ++i)
      if (st.children[i] == dm.source) {
        // A child leaving at shutdown is no news; any other departure is.
        if (dm.reason == caf::exit_reason::user_shutdown)
          spdlog::debug("agreement group {}: child {} left", st.args.group, i);
        else
          spdlog::warn("agreement group {}: child {} down; its group fails every room", st.args.group, i);
        child_gone(self, i);
      }
    auto before = st.ranks.size();
    st.ranks.erase(std::remove_if(st.ranks.begin(), st.ranks.end(),
                                  [&](const caf::actor& a) { return a.address() == dm.source; }),
                   st.ranks.end());
    st.ranks_gone += static_cast<int>(before - st.ranks.size());
    flush_held(self);
    // A node with no live child can no longer report: leaving makes its parent fail its rooms.
    if (!st.combiner && st.collector.live_children() == 0) self->quit(caf::exit_reason::user_shutdown);
  });
  return {
      [self, who](msg::attach_child& a) {
        auto& st = self->state;
        if (a.index < 0 || a.index >= static_cast<int>(st.children.size())) return;
        // A child attaches itself; an index a live child holds is not taken over.
        if (!detail::sent_by(self, a.child.address())) {
          spdlog::warn("{}: an attach of child {} not sent by that child refused", who, a.index);
          return;
        }
        bind_child(self, a.index, a.child.address());
      },
      [self, who](msg::attach_rank& a) {
        if (!detail::sent_by(self, a.rank.address())) {
          spdlog::warn("{}: an attach of a rank not sent by that rank refused", who);
          return;
        }
        ++*self->state.message_ranks;
        self->state.ranks.push_back(a.rank);
        self->monitor(a.rank);
        flush_held(self);
      },
      [self, who](msg::step_report& r) {
        auto& st = self->state;
        if (r.child < 0 || r.child >= static_cast<int>(st.children.size())) {
          spdlog::warn("agreement group {}: a step report names child {} of {}; ignored", st.args.group, r.child,
                       st.children.size());
          return;
        }
        // Only child i reports as child i. A report may overtake its child's attach (they can
        // take different routes between processes): the first sender binds an unbound index.
        const auto& sender = self->current_sender();
        const auto from = caf::actor_cast<caf::actor_addr>(sender);
        if (!sender || !bind_child(self, r.child, from)) {
          spdlog::warn("{}: a step report for child {} from {} refused", who, r.child,
                       sender ? "another actor" : "an anonymous sender");
          return;
        }
        if (auto why = malformed(r.states); !why.empty()) {
          // Merged, it would corrupt every rank's round; dropped, the round would wait for it
          // for good. The child counts as down: its rooms fail, the group goes on.
          spdlog::error("agreement group {}: child {}'s step report {} is malformed ({}); the child counts as down",
                        st.args.group, r.child, r.round, why);
          child_gone(self, r.child);
          if (!st.combiner && st.collector.live_children() == 0) self->quit(caf::exit_reason::user_shutdown);
          return;
        }
        if (st.combiner) {
          st.combiner->post_remote(r.child, r.round, std::move(r.states));
          return;
        }
        if (st.collector.add(r.child, r.round, std::move(r.states))) finish_round(self, r.round);
      },
      [self](msg::agreed_round& a) {  // from the combiner: for the ranks attached by message
        if (!detail::sent_by(self, self->address())) return;
        for (const auto& r : self->state.ranks) self->send(r, a);
      },
      [self](msg::board_round& b) {
        if (self->state.args.board) drain_board(self, b.round);
      },
  };
}

}  // namespace

caf::actor spawn_supervisor(caf::actor_system& sys, const supervisor_args& args,
                            const caf::actor& parent) {
  return sys.spawn(supervisor, args, parent);
}

}  // namespace kvflow
