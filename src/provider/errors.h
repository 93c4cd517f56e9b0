// Reason codes the hsmstek provider raises on the OpenSSL error stack. The
// library code is assigned by OpenSSL when the provider loads; match on
// ERR_GET_REASON() of an error whose library is the provider's (the error
// string names it "hsmstek"). The error data carries the details, e.g. the
// PKCS#11 function and CKR name for kTokenOperationFailed.
#pragma once

#include <cstdint>

namespace hsmstek::provider {

enum class ProviderReason : uint32_t {
  kTokenOperationFailed = 1,  // a C_* call failed or no session was available
  kStaleKeyHandle = 2,        // key-ref generation != the token's
  kInvalidKeyRef = 3,         // bad kKeyRefParam: type, size, null, magic
  kRawKeyRefused = 4,         // raw key bytes given to the ticket cipher
  kNoKeyRef = 5,              // operation without a key reference
  kOperationFinished = 6,     // update after the one-shot operation ran
  kInvalidLength = 7,         // bad IV/data length or output too small
  kNoDelegate = 8,            // no other provider offers HMAC
  kUnsupportedDigest = 9,     // token-mode HMAC asked for a non-SHA-256 digest
  kNotInitialized = 10,       // update/final before init
  kConflictingKeys = 11,      // both a raw key and a key-ref in one call
};

}  // namespace hsmstek::provider
