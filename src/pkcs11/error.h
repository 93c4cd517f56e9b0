// Mapping of CK_RV values to names and to our Status codes.
#pragma once

#include <string_view>

#include "common/status.h"
#include "pkcs11/ck.h"

namespace hsmstek::p11 {

// Returns "CKR_SESSION_HANDLE_INVALID" etc., or "CKR_0x...": never empty.
std::string_view CkrName(CK_RV rv);

// Returns a Status for a failed PKCS#11 call: message
// "<function>: <CKR name>[ (<context>)]", code chosen from the CKR (wrong PIN
// -> kPermissionDenied, device/session faults -> kUnavailable, missing
// mechanism -> kUnsupported, ...), ckr() = rv. `rv` must not be CKR_OK.
Status CkError(std::string_view function, CK_RV rv,
               std::string_view context = {});

// CheckRv is the one checkpoint for C_* results that belong to no Session
// (module, slot and connect-time calls): OK for CKR_OK, otherwise logs at
// debug and returns CkError(function, rv, context). Session calls go
// through Session::Check (P11_CALL), which uses it too.
[[nodiscard]] Status CheckRv(const char *function, CK_RV rv,
                             std::string_view context = {});

// CheckCleanup checks the result of a clean-up call (C_CloseSession,
// C_Finalize, ...) whose failure changes nothing for the caller: logged at
// debug, never dropped silently.
void CheckCleanup(const char *function, CK_RV rv) noexcept;

// Calls functions->Func(args...) and checks the result, naming the function.
#define P11_CHECK(context, functions, Func, ...) \
  ::hsmstek::p11::CheckRv(#Func, (functions)->Func(__VA_ARGS__), (context))
#define P11_CLEANUP(functions, Func, ...) \
  ::hsmstek::p11::CheckCleanup(#Func, (functions)->Func(__VA_ARGS__))

// While an ObjectsMayVanish lives on this thread, CKR_OBJECT_HANDLE_INVALID
// and CKR_KEY_HANDLE_INVALID mean "that object is gone", not a lost token:
// for calls on token objects other processes destroy at any time (ratchet
// links). Session::Check then neither discards the session nor reconnects.
class ObjectsMayVanish {
 public:
  ObjectsMayVanish();
  ~ObjectsMayVanish();
  ObjectsMayVanish(const ObjectsMayVanish &) = delete;
  ObjectsMayVanish &operator=(const ObjectsMayVanish &) = delete;
};
// True for an object-handle fault inside an ObjectsMayVanish scope.
bool ObjectVanished(CK_RV rv);
// True for CKR_OBJECT_HANDLE_INVALID and CKR_KEY_HANDLE_INVALID.
bool IsHandleInvalid(CK_RV rv);

// True for the faults after which sessions and object handles of the token
// can no longer be trusted (docs/DESIGN.md): the token must be reconnected.
bool IsConnectionFault(CK_RV rv);

}  // namespace hsmstek::p11
