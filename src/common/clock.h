// Injectable wall clock. Key states and epochs are computed from it, so
// tests move a FakeClock instead of sleeping.
#pragma once

#include <atomic>
#include <cstdint>

namespace hsmstek {

class Clock {
 public:
  virtual ~Clock() = default;
  // Seconds since the Unix epoch. Thread-safe.
  virtual int64_t NowUnix() const = 0;
};

class SystemClock final : public Clock {
 public:
  int64_t NowUnix() const override;
  // A process-wide instance that lives forever.
  static const SystemClock &Instance();
};

class FakeClock final : public Clock {
 public:
  explicit FakeClock(int64_t now) : now_(now) {}
  int64_t NowUnix() const override { return now_.load(); }
  void Set(int64_t now) { now_.store(now); }
  void Advance(int64_t seconds) { now_.fetch_add(seconds); }

 private:
  std::atomic<int64_t> now_;
};

}  // namespace hsmstek
