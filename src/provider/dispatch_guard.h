// The exception barrier of the provider's dispatch tables: every function
// OpenSSL can call through an OSSL_DISPATCH entry runs inside Guarded<>,
// applied once where the tables are built (DispatchEntry), so no body needs
// its own try/catch. Internal to src/provider.
#pragma once

#include <openssl/err.h>

#include <type_traits>

#include "common/barrier.h"
#include "common/test_seam.h"

namespace hsmstek::provider::internal {

// RaiseCaughtException, called inside a catch block, reports the exception
// (counted and logged, common/barrier.h) and raises ERR_R_INTERNAL_ERROR on
// the caller's OpenSSL error stack: the contract of every dispatch function
// that returns a failure value.
inline void RaiseCaughtException(const char *function) noexcept {
  const char *what = barrier::ReportCaught(function);
  ERR_raise_data(ERR_LIB_PROV, ERR_R_INTERNAL_ERROR,
                 "hsmstek provider: exception in %s: %s", function, what);
}

template <typename Fn, Fn *F>
struct Guarded;

// Calls F; an exception becomes F's failure value (0 for int results, null
// for pointers, nothing for void) with an error raised. Token operations
// already turn their own exceptions into fail-soft results (token_op.h), so
// what reaches this barrier is a failure of the caller's request.
template <typename R, typename... Args, R (*F)(Args...)>
struct Guarded<R(Args...), F> {
  static R Call(Args... args) noexcept {
    try {
      seam::Hit(seam::Point::kProviderDispatch);
      return F(args...);
    } catch (...) {
      RaiseCaughtException("provider dispatch");
      if constexpr (!std::is_void_v<R>) return R{};
    }
  }
};

}  // namespace hsmstek::provider::internal
