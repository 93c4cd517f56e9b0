#include "common/test_seam.h"

#include <atomic>
#include <cerrno>
#include <new>
#include <system_error>

namespace hsmstek::seam {
namespace {

std::atomic<uint32_t> g_armed[static_cast<size_t>(Point::kCount)];

}  // namespace

void Arm(Point point, uint32_t times) noexcept {
  g_armed[static_cast<size_t>(point)].store(times);
}

void Hit(Point point) {
  std::atomic<uint32_t> &armed = g_armed[static_cast<size_t>(point)];
  uint32_t left = armed.load(std::memory_order_relaxed);
  while (left > 0) {
    if (armed.compare_exchange_weak(left, left - 1)) {
      if (point == Point::kStoreThreadStart) {
        throw std::system_error(EAGAIN, std::generic_category(),
                                "test seam: thread start");
      }
      throw std::bad_alloc();
    }
  }
}

}  // namespace hsmstek::seam
