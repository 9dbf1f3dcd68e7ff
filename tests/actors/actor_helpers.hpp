#pragma once
// Shared by the actor tests: a real threaded actor system per test case, test actors that record
// what they receive into a thread-safe inbox, and waits with deadlines (no bare sleeps).
#include <caf/all.hpp>
#include <doctest/doctest.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "actors/agreement.hpp"
#include "actors/messages.hpp"

namespace kvflow::actor_test {

using ms = std::chrono::milliseconds;

// Waits for things that must happen (generous: the machine is small and shared).
constexpr ms long_wait{8000};
// Waits for things that must NOT happen.
constexpr ms short_wait{200};

// What a test actor received, in arrival order; readable from the test thread.
class inbox {
 public:
  void push(caf::message m) {
    {
      std::lock_guard<std::mutex> g(mutex_);
      msgs_.push_back(std::move(m));
    }
    cv_.notify_all();
  }

  std::size_t size() const {
    std::lock_guard<std::mutex> g(mutex_);
    return msgs_.size();
  }

  template <class T>
  std::vector<T> all(std::size_t from = 0) const {
    std::lock_guard<std::mutex> g(mutex_);
    std::vector<T> out;
    for (std::size_t i = from; i < msgs_.size(); ++i)
      if (msgs_[i].match_elements<T>()) out.push_back(msgs_[i].get_as<T>(0));
    return out;
  }

  // The first T (at index >= from) satisfying pred, waiting up to `timeout` for it.
  template <class T, class Pred>
  std::optional<T> wait_for(Pred pred, ms timeout = long_wait, std::size_t from = 0) {
    std::unique_lock<std::mutex> g(mutex_);
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    std::size_t i = from;
    for (;;) {
      for (; i < msgs_.size(); ++i)
        if (msgs_[i].match_elements<T>()) {
          const T& x = msgs_[i].get_as<T>(0);
          if (pred(x)) return x;
        }
      if (cv_.wait_until(g, deadline) == std::cv_status::timeout) {
        for (; i < msgs_.size(); ++i)
          if (msgs_[i].match_elements<T>()) {
            const T& x = msgs_[i].get_as<T>(0);
            if (pred(x)) return x;
          }
        return std::nullopt;
      }
    }
  }

  template <class T>
  std::optional<T> wait_any(ms timeout = long_wait, std::size_t from = 0) {
    return wait_for<T>([](const T&) { return true; }, timeout, from);
  }

  // Arrival index of the first T satisfying pred, or -1 (does not wait).
  template <class T, class Pred>
  long index_of(Pred pred) const {
    std::lock_guard<std::mutex> g(mutex_);
    for (std::size_t i = 0; i < msgs_.size(); ++i)
      if (msgs_[i].match_elements<T>() && pred(msgs_[i].get_as<T>(0))) return static_cast<long>(i);
    return -1;
  }

 private:
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<caf::message> msgs_;
};
using inbox_ptr = std::shared_ptr<inbox>;

using poke_atom = caf::atom_constant<caf::atom("poke")>;

// Records every message it receives (down and exit messages excepted) and never answers.
inline caf::behavior recorder(caf::event_based_actor* self, inbox_ptr box) {
  self->set_default_handler(
      [box](caf::scheduled_actor*, caf::message_view& x) -> caf::result<caf::message> {
        box->push(x.copy_content_to_message());
        return caf::message{};
      });
  return {[](poke_atom) {}};
}

// How a loopback_parent answers, changeable from the test thread while it runs.
struct parent_control {
  // true: the agreed round carries the rank's own states (a rank alone in its group sees them
  // agreed, and releases and clears a room once it is terminal and released); false: the round
  // is empty (the rank keeps reporting, but its engine sees no room).
  std::atomic<bool> echo{true};
  // false: reports are recorded but never answered (a round that does not complete).
  std::atomic<bool> answer{true};
};

// Stands in for a rank's parent (shard or TP supervisor): records every step report and answers
// it with an agreed round of the same number, sent to the rank that attached itself
// (msg::attach_child, which every rank sends its parent when it starts). The engine's polls post
// their reports from the engine's thread, so reports that come before the rank attached wait for it.
inline caf::behavior loopback_parent(caf::event_based_actor* self, inbox_ptr box,
                                     std::shared_ptr<parent_control> control, int group) {
  struct state {
    caf::actor rank;
    std::vector<msg::step_report> early;
  };
  auto st = std::make_shared<state>();
  auto answer = [self, control, group](const caf::actor& rank, const msg::step_report& r) {
    if (!control->answer.load()) return;
    self->send(rank, msg::agreed_round{r.round, group, control->echo.load() ? r.states : step_states{}});
  };
  return {
      [box, st, answer](msg::attach_child& a) {
        box->push(caf::make_message(a));
        st->rank = a.child;
        for (const auto& r : st->early) answer(st->rank, r);
        st->early.clear();
      },
      [box, st, answer](msg::step_report& r) {
        box->push(caf::make_message(r));
        if (st->rank)
          answer(st->rank, r);
        else
          st->early.push_back(r);
      },
  };
}

// Forwards step reports it is given to its parent and records the agreed rounds it receives
// (a rank as seen by the supervisors).
inline caf::behavior child_stub(caf::event_based_actor* self, inbox_ptr box, caf::actor parent) {
  return {
      [self, parent](msg::step_report& r) { self->send(parent, std::move(r)); },
      [box](msg::agreed_round& a) { box->push(caf::make_message(a)); },
  };
}

struct system_config : caf::actor_system_config {
  system_config() {
    msg::add_message_types(*this);
    set("logger.verbosity", caf::atom("quiet"));
  }
};

// One actor system per test case. Every actor the test spawns goes through own() and is killed
// when the case ends, so the system's shutdown does not wait for ranks that tick forever.
struct actor_fixture {
  system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  std::vector<caf::actor> owned;

  actor_fixture() { spdlog::set_level(spdlog::level::off); }
  ~actor_fixture() {
    for (auto& a : owned) self->send_exit(a, caf::exit_reason::kill);
  }

  caf::actor own(caf::actor a) {
    owned.push_back(a);
    return a;
  }

  // A recorder actor and its inbox.
  std::pair<caf::actor, inbox_ptr> spawn_recorder() {
    auto box = std::make_shared<inbox>();
    return {own(sys.spawn(recorder, box)), box};
  }

  // Kills `a` and waits until it is gone (false: it did not go within long_wait).
  bool stop(const caf::actor& a) {
    if (!a) return true;
    self->monitor(a);
    self->send_exit(a, caf::exit_reason::kill);
    const auto deadline = std::chrono::steady_clock::now() + long_wait;
    bool down = false;
    while (!down && std::chrono::steady_clock::now() < deadline) {
      bool got = false;
      self->receive([&](const caf::down_msg& dm) { got = true; down = dm.source == a.address(); },
                    caf::after(long_wait) >> [] {});
      if (!got) break;
    }
    return down;
  }

  // Kills `a` and waits until it is gone.
  void kill(const caf::actor& a) { REQUIRE(stop(a)); }
};

// State of `room` in a step state list, or -1 when absent.
inline int state_of(const step_states& s, std::uint64_t room) {
  for (const auto& x : s)
    if (x.room == room) return x.state;
  return -1;
}

inline int as_int(kv_poll s) { return static_cast<int>(s); }

}  // namespace kvflow::actor_test

// Readable step state lists in failed assertions: {room/incarnation:state, ...}.
namespace doctest {
template <>
struct StringMaker<kvflow::step_states> {
  static String convert(const kvflow::step_states& v) {
    std::string out = "{";
    for (const auto& s : v) {
      if (out.size() > 1) out += ", ";
      out += std::to_string(s.room) + "/" + std::to_string(s.incarnation) + ":" +
             kvflow::to_string(static_cast<kvflow::kv_poll>(s.state)) + (s.released ? "+released" : "");
    }
    return (out + "}").c_str();
  }
};
}  // namespace doctest
