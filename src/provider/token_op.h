// Key references and token operations shared by the cipher and the MAC.
// Internal to src/provider.
#pragma once

#include <openssl/core.h>

#include <chrono>
#include <utility>

#include "common/status.h"
#include "common/test_seam.h"
#include "pkcs11/token.h"
#include "provider/armed_pool.h"
#include "provider/errors.h"
#include "provider/key_ref.h"
#include "provider/provider_context.h"

namespace hsmstek::provider::internal {

// ParseKeyRef validates the kKeyRefParam `param` (an octet string holding a
// `const TokenKeyRef*`: right size, non-null, right magic, a token and a
// handle) and copies the TokenKeyRef into `*out`. On failure raises
// kInvalidKeyRef, leaves `*out` untouched and returns false.
bool ParseKeyRef(const ProviderContext &prov, const OSSL_PARAM &param,
                 TokenKeyRef *out);

// ParseFailSoft reads kFailSoftParam (an integer) into `*fail_soft`; false
// (nothing raised beyond OpenSSL's own) if it is not an integer.
bool ParseFailSoft(const OSSL_PARAM &param, bool *fail_soft);

// CheckGeneration returns OK iff `ref` belongs to `current` generation;
// otherwise kFailedPrecondition "stale key handle ...".
[[nodiscard]] Status CheckGeneration(const TokenKeyRef &ref, uint64_t current);

// How a failed token operation is reported.
enum class FailureMode : uint8_t {
  kRaise,  // on the OpenSSL error stack (the default)
  kSoft,   // logged only (kFailSoftParam): the caller hides the failure
};

// Where a token operation was started, for error locations.
struct CallSite {
  const char *func;
  const char *file;
  int line;
};

// FinishTokenOp tells the ref's observer how `op` went and, on failure,
// raises `reason` with the status message at `site` (kRaise) or logs a
// warning (kSoft). Returns status.ok().
bool FinishTokenOp(const ProviderContext &prov, const TokenKeyRef &ref,
                   TokenOp op, ProviderReason reason, const Status &status,
                   FailureMode mode, const CallSite &site);

// CaughtAsStatus, called inside a catch block, reports the exception
// (common/barrier.h), tells ref's observer and returns the kInternal
// Status a token operation fails with. No allocation beyond the message.
Status CaughtAsStatus(const TokenKeyRef &ref, const char *function) noexcept;

// ReportCalls tells the ref's observer how many token calls `op` made on
// this thread since `start`.
void ReportCalls(const TokenKeyRef &ref, TokenOp op, unsigned calls,
                 std::chrono::steady_clock::time_point start);

// RunTokenOp runs `body(p11::Session&) -> Status` on a session leased from
// ref.token for this call only, after checking that the ref is not stale
// (against the token and against the leased session). A session whose body
// failed is discarded, so no half-finished operation returns to the pool.
// An exception (e.g. std::bad_alloc while leasing or reconnecting) fails
// the operation like a token error. Reports through FinishTokenOp. Returns
// true on success. Thread-safe as
// long as `ref` is not shared.
template <typename Body>
bool RunTokenOp(const ProviderContext &prov, const TokenKeyRef &ref, TokenOp op,
                FailureMode mode, Body &&body,
                const char *func = __builtin_FUNCTION(),
                const char *file = __builtin_FILE(),
                int line = __builtin_LINE()) {
  const CallSite site{func, file, line};
  // Fail fast, without touching the token, when the handle is already stale.
  Status fresh = CheckGeneration(ref, ref.token->generation());
  if (!fresh.ok()) {
    return FinishTokenOp(prov, ref, op, ProviderReason::kStaleKeyHandle, fresh,
                         mode, site);
  }
  ProviderReason reason = ProviderReason::kTokenOperationFailed;
  Status status;
  try {
    seam::Hit(seam::Point::kTokenOperation);
    Result<p11::Session> session = ref.token->Acquire();
    if (!session.ok()) {
      status = session.status();
    } else {
      status = CheckGeneration(ref, session->generation());
      if (!status.ok()) {
        // Acquire reconnected: the handle belongs to an older generation.
        reason = ProviderReason::kStaleKeyHandle;
      } else {
        const auto start = std::chrono::steady_clock::now();
        status = std::forward<Body>(body)(*session);
        ReportCalls(ref, op, 2, start);  // *Init + the operation
        if (!status.ok()) session->Discard();
      }
    }
  } catch (...) {
    // Same outcome as a token error (fail-soft where asked for), and
    // counted by the store's observer.
    status = CaughtAsStatus(ref, site.func);
  }  // the session is back in the pool before the observer runs
  return FinishTokenOp(prov, ref, op, reason, status, mode, site);
}

// RunArmedTokenOp runs `body(p11::Session&) -> Status` (the single call that
// completes the operation) on `armed`, after the same staleness checks as
// RunTokenOp. On failure the operation is left to `armed`'s destructor,
// which cancels it. An exception fails it like a token error. Reports
// through FinishTokenOp.
template <typename Body>
bool RunArmedTokenOp(const ProviderContext &prov, const TokenKeyRef &ref,
                     TokenOp op, FailureMode mode, ArmedOp &armed, Body &&body,
                     const char *func = __builtin_FUNCTION(),
                     const char *file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  const CallSite site{func, file, line};
  Status fresh = CheckGeneration(ref, ref.token->generation());
  if (fresh.ok()) fresh = CheckGeneration(ref, armed.session().generation());
  if (!fresh.ok()) {
    return FinishTokenOp(prov, ref, op, ProviderReason::kStaleKeyHandle, fresh,
                         mode, site);
  }
  Status status;
  try {
    seam::Hit(seam::Point::kTokenOperation);
    const auto start = std::chrono::steady_clock::now();
    status = std::forward<Body>(body)(armed.session());
    ReportCalls(ref, op, 1, start);
  } catch (...) {
    // As in RunTokenOp: a token error (fail-soft where asked for), counted.
    status = CaughtAsStatus(ref, site.func);
  }
  return FinishTokenOp(prov, ref, op, ProviderReason::kTokenOperationFailed,
                       status, mode, site);
}

// FillRandom fills `out` with `len` random bytes from `prov`'s library
// context: the stand-in output of a fail-soft operation (carries no data).
// Raises and returns false if the DRBG fails.
bool FillRandom(const ProviderContext &prov, unsigned char *out, size_t len);

}  // namespace hsmstek::provider::internal
