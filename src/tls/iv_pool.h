// Ticket IVs (docs/FORMAT.md, "Ticket": 16 random bytes per ticket), drawn from OpenSSL's
// DRBG in per-thread batches.
#pragma once

#include <cstddef>

namespace hsmstek::tls {

inline constexpr size_t kTicketIvLength = 16;

// NextTicketIv writes a fresh random IV to `iv` and returns true, or returns
// false (nothing usable written) when the DRBG fails. Each IV is handed out
// once; a batch a thread holds when the process forks is dropped in the
// child, so parent and child never hand out the same IV. Thread-safe (one
// pool per thread, no lock).
[[nodiscard]] bool NextTicketIv(unsigned char iv[kTicketIvLength]);

}  // namespace hsmstek::tls
