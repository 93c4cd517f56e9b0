// Per-epoch key derivation and the check value, inside the token (SPEC §4).
#pragma once

#include <array>
#include <atomic>

#include "keystore/key_name.h"
#include "pkcs11/token.h"

namespace hsmstek::keystore {

// Handles of one epoch's derived session keys.
struct DerivedKeys {
  CK_OBJECT_HANDLE aes = CK_INVALID_HANDLE;   // CKK_AES, ENCRYPT/DECRYPT
  CK_OBJECT_HANDLE hmac = CK_INVALID_HANDLE;  // CKK_GENERIC_SECRET, SIGN/VERIFY
};

// DeriveEpochKeys derives the 'E' and 'M' keys of `epoch` from `master` as
// session objects (CKA_TOKEN=FALSE, sensitive, non-extractable) of
// `session`, which must be the token's long-lived object session, with
// CKA_ALLOWED_MECHANISMS unless the token refuses it (recorded in
// `*refused`, see CreateKey), and reads them back (VerifyKey). On failure
// nothing is left behind.
[[nodiscard]] Result<DerivedKeys> DeriveEpochKeys(
    p11::Session &session, CK_OBJECT_HANDLE master, uint64_t epoch,
    std::atomic<unsigned> *refused);

// DestroyDerivedKeys destroys both keys (best effort).
void DestroyDerivedKeys(p11::Session &session, const DerivedKeys &keys);

// ComputeCheckValue returns the first 8 bytes of HMAC-SHA256 under the
// master's 'C' key (epoch 0) over "hsmstek check". The 'C' key is a
// temporary session object, destroyed before returning.
// `refused` as for DeriveEpochKeys (nullptr: not remembered).
[[nodiscard]] Result<std::array<uint8_t, kCheckValueSize>> ComputeCheckValue(
    p11::Session &session, CK_OBJECT_HANDLE master,
    std::atomic<unsigned> *refused = nullptr);

}  // namespace hsmstek::keystore
