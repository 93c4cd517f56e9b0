#include "provider/token_op.h"

#include <openssl/params.h>
#include <openssl/rand.h>

#include <cstring>
#include <ctime>
#include <string>

#include "common/barrier.h"
#include "common/log.h"
#include "common/log_limit.h"

namespace hsmstek::provider::internal {

bool ParseKeyRef(const ProviderContext &prov, const OSSL_PARAM &param,
                 TokenKeyRef *out) {
  const TokenKeyRef *ref = nullptr;
  if (param.data_type != OSSL_PARAM_OCTET_STRING || param.data == nullptr ||
      param.data_size != sizeof(ref)) {
    prov.RaiseError(ProviderReason::kInvalidKeyRef,
                    std::string(kKeyRefParam) +
                        " must be an octet string holding a TokenKeyRef*");
    return false;
  }
  std::memcpy(&ref, param.data, sizeof(ref));
  if (ref == nullptr) {
    prov.RaiseError(ProviderReason::kInvalidKeyRef,
                    std::string(kKeyRefParam) + " is a null pointer");
    return false;
  }
  if (ref->magic != TokenKeyRef::kMagic) {
    prov.RaiseError(ProviderReason::kInvalidKeyRef,
                    std::string(kKeyRefParam) +
                        " does not point at a TokenKeyRef (bad magic)");
    return false;
  }
  if (ref->token == nullptr || ref->handle == CK_INVALID_HANDLE) {
    prov.RaiseError(ProviderReason::kInvalidKeyRef,
                    std::string(kKeyRefParam) + " has no token or no handle");
    return false;
  }
  *out = *ref;
  return true;
}

Status CheckGeneration(const TokenKeyRef &ref, uint64_t current) {
  if (ref.generation == current) return Status::Ok();
  return FailedPrecondition("stale key handle: key generation " +
                            std::to_string(ref.generation) +
                            ", token generation " + std::to_string(current));
}

bool FinishTokenOp(const ProviderContext &prov, const TokenKeyRef &ref,
                   TokenOp op, ProviderReason reason, const Status &status,
                   FailureMode mode, const CallSite &site) {
  if (ref.observer != nullptr) ref.observer->OnTokenOp(op, status.ok());
  if (status.ok()) return true;
  if (mode == FailureMode::kSoft) {
    // Nothing on the error stack: the caller reports success with unusable
    // output, and libssl would treat a stray error as fatal.
    // Every handshake in flight when a token fails lands here: one line
    // per cause a minute (the store logs the outage itself).
    log::EmitLimited(log::Level::kWarning, "fail-soft " + log::CauseOf(status),
                     "hsmstek provider: " + status.message() +
                         " (fail-soft: the ticket will be unusable)",
                     static_cast<int64_t>(std::time(nullptr)));
  } else {
    prov.RaiseError(reason, status.message(), site.func, site.file, site.line);
  }
  return false;
}

Status CaughtAsStatus(const TokenKeyRef &ref, const char *function) noexcept {
  const char *what = barrier::ReportCaught(function);
  if (ref.observer != nullptr) ref.observer->OnException();
  try {
    return Internal(std::string("exception in the token operation: ") + what);
  } catch (...) {
    return Status(ErrorCode::kInternal, std::string());
  }
}

void ReportCalls(const TokenKeyRef &ref, TokenOp op, unsigned calls,
                 std::chrono::steady_clock::time_point start) {
  if (ref.observer == nullptr) return;
  auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                std::chrono::steady_clock::now() - start)
                .count();
  ref.observer->OnTokenCalls(op, ref.for_open, calls,
                             static_cast<uint64_t>(ns));
}

bool ParseFailSoft(const OSSL_PARAM &param, bool *fail_soft) {
  int value = 0;
  if (!OSSL_PARAM_get_int(&param, &value)) return false;
  *fail_soft = value != 0;
  return true;
}

bool FillRandom(const ProviderContext &prov, unsigned char *out, size_t len) {
  if (len == 0 || RAND_bytes_ex(prov.libctx(), out, len, 0) == 1) return true;
  prov.RaiseError(ProviderReason::kTokenOperationFailed,
                  "fail-soft: no random bytes for the stand-in output");
  return false;
}

}  // namespace hsmstek::provider::internal
