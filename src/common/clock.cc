#include "common/clock.h"

#include <ctime>

namespace hsmstek {

int64_t SystemClock::NowUnix() const {
  return static_cast<int64_t>(std::time(nullptr));
}

const SystemClock &SystemClock::Instance() {
  static const SystemClock clock;
  return clock;
}

}  // namespace hsmstek
