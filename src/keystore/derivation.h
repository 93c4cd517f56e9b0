// Per-epoch key derivation and the check value, inside the token (docs/FORMAT.md).
#pragma once

#include <array>
#include <atomic>
#include <string_view>

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

// DeriveNameKey derives the 'N' key (epoch 0, CKK_GENERIC_SECRET, SIGN
// only) of `link` as a session object of `session`; the caller owns it.
[[nodiscard]] Result<CK_OBJECT_HANDLE> DeriveNameKey(
    p11::Session &session, CK_OBJECT_HANDLE link,
    std::atomic<unsigned> *refused);

// SignKeyName returns the version-2 key name of `epoch`: the first 16
// bytes of HMAC-SHA256(name_key, NameInput(epoch)), one C_Sign.
[[nodiscard]] Result<KeyName> SignKeyName(p11::Session &session,
                                          CK_OBJECT_HANDLE name_key,
                                          uint64_t epoch);

// DeriveLink derives ratchet link `index` (>= 1) from link `index - 1`
// (`previous`): a token object with the master's template (derive only,
// sensitive, extractable only under a trusted key when `replicable`),
// CKA_LABEL `label`, CKA_ID MakeLinkId(store_id, index); read back and
// verified. On failure nothing is left behind.
[[nodiscard]] Result<CK_OBJECT_HANDLE> DeriveLink(
    p11::Session &session, CK_OBJECT_HANDLE previous, uint64_t index,
    std::string_view label, const StoreId &store_id, bool replicable,
    std::atomic<unsigned> *refused);

// ComputeCheckValue returns the first 8 bytes of HMAC-SHA256 under the
// master's 'C' key (epoch 0) over "hsmstek check". The 'C' key is a
// temporary session object, destroyed before returning.
// `refused` as for DeriveEpochKeys (nullptr: not remembered).
[[nodiscard]] Result<std::array<uint8_t, kCheckValueSize>> ComputeCheckValue(
    p11::Session &session, CK_OBJECT_HANDLE master,
    std::atomic<unsigned> *refused = nullptr);

}  // namespace hsmstek::keystore
