// Prober: one background thread per token that retries the connection
// while the token is out, so recovery never waits for (or runs on) a
// handshake. It runs `probe` when a probe is due; `probe` returns when the
// next one is due, or nothing once the token answers again. At most one
// probe runs at a time (one thread), and none while nothing is scheduled.
//
// Fork: the thread, its mutex (rank kLeaf) and its condition variable
// follow common/fork_registry.h. A forked child forgets the parent's thread
// and schedule (its tokens start disconnected and reconnect on first use);
// the next Schedule starts the child's own thread.
//
// Thread-safety: all methods are thread-safe. `probe` runs on the prober's
// thread with no lock of the prober held, so it may call Schedule.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>

#include "common/fork_registry.h"

namespace hsmstek::p11 {

class Prober final : public atfork::Participant {
 public:
  using Clock = std::chrono::steady_clock;
  using ProbeFn = std::function<std::optional<Clock::time_point>()>;

  explicit Prober(ProbeFn probe);
  // Stops and joins the thread (a probe in flight finishes first).
  ~Prober();
  Prober(const Prober &) = delete;
  Prober &operator=(const Prober &) = delete;

  // Schedule asks for a probe at `at` (or earlier if one is already due
  // earlier); starts the thread on first use in this process. Never
  // throws: if the thread cannot start, returns false and nothing runs
  // (the token's own Acquire then retries, see token.h).
  bool Schedule(Clock::time_point at) noexcept;

  // Probes run so far in this process (tests).
  uint64_t probes() const { return probes_.load(); }

  void ForkPrepare(atfork::Rank rank) override;
  void ForkParent(atfork::Rank rank) override;
  void ForkChild(atfork::Rank rank) override;

 private:
  void Loop();

  const ProbeFn probe_;
  std::mutex mu_;  // guards everything below; rank kLeaf
  std::condition_variable cv_;
  std::optional<Clock::time_point> due_;
  bool stop_ = false;
  // Leaked in a forked child (no thread behind it there; joining hangs).
  std::thread *thread_ = nullptr;
  uint64_t thread_fork_count_ = 0;
  std::atomic<uint64_t> probes_{0};
};

}  // namespace hsmstek::p11
