// Writes to the token for the operator's tool: create, rotate, retire and
// destroy masters, import legacy keys. Every operation is all-or-nothing:
// objects created by a step that later fails are destroyed before the
// error is returned.
#pragma once

#include <string_view>
#include <vector>

#include "keystore/legacy_file.h"
#include "keystore/master.h"
#include "pkcs11/object.h"
#include "pkcs11/token.h"

namespace hsmstek::keystore {

// CreateMaster generates a new master (docs/FORMAT.md template; extractable only
// under a trusted wrapping key when policy.replicable) and its policy
// object, with a fresh random store id; reads back and verifies the
// master's attributes. `session` must be read/write and logged in.
[[nodiscard]] Result<StoreId> CreateMaster(p11::Session &session,
                                           std::string_view label,
                                           const Policy &policy);

// StorePolicyObject creates the policy object of master `id`.
[[nodiscard]] Result<CK_OBJECT_HANDLE> StorePolicyObject(p11::Session &session,
                                                         std::string_view label,
                                                         const StoreId &id,
                                                         const Policy &policy);

// UpdatePolicy replaces the policy object of `master` (e.g. retire-at).
[[nodiscard]] Status UpdatePolicy(p11::Session &session, const Master &master,
                                  std::string_view label, const Policy &policy);

// DestroyMaster destroys the master's ratchet links (link 0 is the master
// key) and its policy objects.
[[nodiscard]] Status DestroyMaster(p11::Session &session, const Master &master);

// ImportLegacyKeys stores each key as a decrypt-only AES object, a
// sign/verify HMAC object (CKA_ID = the 16-byte name) and an info object
// with the expiry. Refuses (kAlreadyExists) a name already in the token.
// The caller wipes `keys` afterwards.
[[nodiscard]] Status ImportLegacyKeys(p11::Session &session,
                                      std::string_view label,
                                      const std::vector<LegacyKey> &keys,
                                      int64_t expires, LegacyFormat format);

// DestroyLegacyKey destroys a legacy key's three objects.
[[nodiscard]] Status DestroyLegacyKey(p11::Session &session,
                                      const LegacyKeyObjects &legacy);

// The docs/FORMAT.md template of a master without the lock-down attributes
// (KeyTemplate with none; tests create known masters with it). Creating
// a master goes through CreateKey (key_attributes.h).
p11::Template MasterTemplate(std::string_view label, const StoreId &id,
                             bool replicable, bool for_unwrap);

}  // namespace hsmstek::keystore
