// Exception barriers: where C calls into us (OpenSSL's provider dispatch,
// libssl's ticket callback, the log sink path, the C API), no exception may
// pass. Our own code does not throw, but the standard library may
// (std::bad_alloc, std::system_error from a thread start, ...). A barrier
// catches it, turns it into that entry's failure result (the same fail-soft
// outcome as a token error wherever one exists) and reports it here.
//
// Thread-safety: all functions are thread-safe and noexcept.
#pragma once

#include <cstdint>

namespace hsmstek::barrier {

// ReportCaught, called from inside a catch block, counts the exception
// being handled and logs it at error level as "<where>: <what>" (no
// allocation; `where` names the entry point). Returns the exception's
// what() or "unknown exception" (valid until the catch block ends).
const char *ReportCaught(const char *where) noexcept;

// CaughtCount returns the number of exceptions stopped at a barrier in
// this process.
uint64_t CaughtCount() noexcept;

}  // namespace hsmstek::barrier
