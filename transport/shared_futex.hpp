#pragma once
// Sleeping on a 32-bit word in memory several processes map, and waking its sleepers: shared
// futexes (not FUTEX_PRIVATE). What a waiter needs is always re-read after it wakes: a wake may
// be spurious, and a wait whose word already moved returns at once.
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <ctime>

namespace kvflow::transport {

// Sleeps while `word` still holds `seen`, for at most `timeout`.
inline void futex_wait(std::atomic<std::uint32_t>& word, std::uint32_t seen, std::chrono::microseconds timeout) {
  if (timeout.count() <= 0) return;
  timespec ts{};
  ts.tv_sec = static_cast<time_t>(timeout.count() / 1000000);
  ts.tv_nsec = static_cast<long>(timeout.count() % 1000000) * 1000;
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAIT, seen, &ts, nullptr, 0);
}

// Sleeps while `word` still holds `seen`, until a wake (no timeout: a sleeper that must stop is
// woken by a bump of the same word).
inline void futex_wait(std::atomic<std::uint32_t>& word, std::uint32_t seen) {
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAIT, seen, nullptr, nullptr, 0);
}

inline void futex_wake(std::atomic<std::uint32_t>& word, int count) {
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE, count, nullptr, nullptr, 0);
}

// Moves `word` on and wakes every sleeper on it.
inline void futex_bump(std::atomic<std::uint32_t>& word) {
  word.fetch_add(1, std::memory_order_release);
  futex_wake(word, INT_MAX);
}

}  // namespace kvflow::transport
