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

// True for the faults after which sessions and object handles of the token
// can no longer be trusted (SPEC §7): the token must be reconnected.
bool IsConnectionFault(CK_RV rv);

}  // namespace hsmstek::p11
