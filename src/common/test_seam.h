// Test seams: named points where a test can make the next hits throw what
// the standard library would throw there under resource exhaustion, to
// prove the exception barriers (common/barrier.h) hold. Unarmed, a hit
// costs one relaxed atomic load.
//
// Thread-safety: all functions are thread-safe.
#pragma once

#include <cstdint>

namespace hsmstek::seam {

enum class Point : uint8_t {
  kStoreLookup,       // the store's key lookup on the ticket path (allocates
                      // views and cache entries): std::bad_alloc
  kStoreThreadStart,  // the store's maintenance thread start:
                      // std::system_error (EAGAIN), as std::thread throws
  kProviderDispatch,  // entry of a provider dispatch function: std::bad_alloc
  kTokenOperation,    // a provider token operation (session lease and
                      // PKCS#11 calls): std::bad_alloc
  kTokenMacInput,     // the token HMAC buffering a ticket's bytes:
                      // std::bad_alloc
  kCount,
};

// Arm makes the next `times` hits of `point` throw (0 disarms).
void Arm(Point point, uint32_t times) noexcept;

// Hit throws if `point` is armed (see Point), else does nothing.
void Hit(Point point);

}  // namespace hsmstek::seam
