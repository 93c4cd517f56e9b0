#include "keystore/provisioning.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include <algorithm>

#include "keystore/key_attributes.h"
#include "pkcs11/object.h"

namespace hsmstek::keystore {

p11::Template MasterTemplate(std::string_view label, const StoreId &id,
                             bool replicable, bool for_unwrap) {
  KeySpec spec{KeyKind::kMaster, label, id, replicable, for_unwrap};
  return KeyTemplate(spec, 0);
}

Result<CK_OBJECT_HANDLE> StorePolicyObject(p11::Session &session,
                                           std::string_view label,
                                           const StoreId &id,
                                           const Policy &policy) {
  Status valid = ValidatePolicy(policy);
  if (!valid.ok()) return valid;
  std::string text = SerializePolicy(policy);
  p11::Template t;
  t.Ulong(CKA_CLASS, CKO_DATA)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, true)
      .Bool(CKA_MODIFIABLE, true)
      .String(CKA_APPLICATION, kPolicyApplication)
      .String(CKA_LABEL, label)
      .Data(kDataIdAttribute, id)
      .String(CKA_VALUE, text);
  CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
  Status s = P11_CALL(session, C_CreateObject, session.handle(), t.data(),
                      t.size(), &h);
  if (!s.ok()) return s.WithContext("storing the policy");
  return h;
}

Result<StoreId> CreateMaster(p11::Session &session, std::string_view label,
                             const Policy &policy) {
  Status valid = ValidatePolicy(policy);
  if (!valid.ok()) return valid;
  StoreId id;
  if (RAND_bytes(id.data(), static_cast<int>(id.size())) != 1) {
    return Internal("RAND_bytes failed");
  }
  KeySpec spec{KeyKind::kMaster, label, id, policy.replicable, false};
  CK_MECHANISM mechanism{CKM_AES_KEY_GEN, nullptr, 0};
  std::atomic<unsigned> refused{0};
  Result<CreatedKey> key = CreateKey(
      spec,
      [&](p11::Template &t, CK_OBJECT_HANDLE *out) {
        return P11_CALL(session, C_GenerateKey, session.handle(), &mechanism,
                        t.data(), t.size(), out);
      },
      &refused);
  if (!key.ok()) return key.status().WithContext("generating the master");
  p11::ScopedObject key_owner(session, key->handle);
  Result<Protections> attrs = VerifyKey(
      session, key->handle, spec, "new master " + HexEncode(id), key->lockdown);
  if (!attrs.ok()) return attrs.status();
  Result<CK_OBJECT_HANDLE> policy_object =
      StorePolicyObject(session, label, id, policy);
  if (!policy_object.ok()) return policy_object.status();
  key_owner.Release();
  return id;
}

Status UpdatePolicy(p11::Session &session, const Master &master,
                    std::string_view label, const Policy &policy) {
  // Tokens may keep CKA_VALUE of a data object read-only (SoftHSM does), so
  // the policy is replaced: the new object exists before the old one goes,
  // and is removed again if the old one cannot be destroyed.
  Result<CK_OBJECT_HANDLE> replacement =
      StorePolicyObject(session, label, master.id, policy);
  if (!replacement.ok()) return replacement.status();
  p11::ScopedObject owner(session, *replacement);
  Status s = P11_CALL(session, C_DestroyObject, session.handle(),
                      master.policy_object);
  if (!s.ok()) return s.WithContext("replacing the policy object");
  owner.Release();
  // Leftovers of an earlier update that failed half-way: the new policy
  // is now the only one (a failure here leaves them, and readers still
  // take the most restrictive).
  for (CK_OBJECT_HANDLE h : master.extra_policy_objects) {
    (void)P11_CALL(session, C_DestroyObject, session.handle(), h);
  }
  return Status::Ok();
}

Status DestroyMaster(p11::Session &session, const Master &master) {
  std::vector<CK_OBJECT_HANDLE> keys;
  for (const auto &[index, handle] : master.links) keys.push_back(handle);
  for (const auto &[index, handle] : master.duplicate_links) {
    keys.push_back(handle);
  }
  Status s;
  for (CK_OBJECT_HANDLE h : keys) {
    s = P11_CALL(session, C_DestroyObject, session.handle(), h);
    // Another process's ratchet may have destroyed a link meanwhile.
    if (!s.ok() && s.ckr() != CKR_OBJECT_HANDLE_INVALID) {
      return s.WithContext("destroying the master");
    }
  }
  s = P11_CALL(session, C_DestroyObject, session.handle(),
               master.policy_object);
  if (!s.ok()) return s.WithContext("destroying the policy object");
  for (CK_OBJECT_HANDLE h : master.extra_policy_objects) {
    s = P11_CALL(session, C_DestroyObject, session.handle(), h);
    if (!s.ok()) return s.WithContext("destroying a duplicate policy object");
  }
  return Status::Ok();
}

namespace {

Result<CK_OBJECT_HANDLE> CreateLegacySecret(p11::Session &session,
                                            std::string_view label,
                                            ByteSpan name, bool is_aes,
                                            const SecretBuffer &key) {
  // HMAC (RFC 2104 §2) zero-pads a key shorter than the 64-byte block, so a
  // 16-byte legacy HMAC key and the same key zero-padded to 32 bytes give
  // the same MAC; SoftHSM 2.6 refuses CKM_SHA256_HMAC keys under 32 bytes
  // (CKR_KEY_SIZE_RANGE at C_SignInit/C_VerifyInit).
  SecretBuffer padded(is_aes ? 0 : std::max<size_t>(key.size(), 32));
  if (!is_aes) std::copy(key.data(), key.data() + key.size(), padded.data());
  const SecretBuffer &value = is_aes ? key : padded;
  KeySpec spec{is_aes ? KeyKind::kLegacyAes : KeyKind::kLegacyMac, label, name,
               false, false};
  std::atomic<unsigned> refused{0};
  Result<CreatedKey> created = CreateKey(
      spec,
      [&](p11::Template &t, CK_OBJECT_HANDLE *out) {
        Status s = P11_CALL(session, C_CreateObject, session.handle(), t.data(),
                            t.size(), out);
        // The template held a copy of the key bytes: wipe it now.
        for (const CK_ATTRIBUTE &a : t.attributes()) {
          if (a.type == CKA_VALUE && a.pValue != nullptr) {
            OPENSSL_cleanse(a.pValue, a.ulValueLen);
          }
        }
        return s;
      },
      &refused, [&](p11::Template &t) { t.Data(CKA_VALUE, value.span()); });
  if (!created.ok()) return created.status();
  p11::ScopedObject owner(session, created->handle);
  Result<Protections> attrs =
      VerifyKey(session, created->handle, spec,
                "new legacy key " + HexEncode(name), created->lockdown);
  if (!attrs.ok()) return attrs.status();
  return owner.Release();
}

}  // namespace

Status ImportLegacyKeys(p11::Session &session, std::string_view label,
                        const std::vector<LegacyKey> &keys, int64_t expires,
                        LegacyFormat format) {
  Result<std::vector<LegacyKeyObjects>> existing =
      LoadLegacyKeys(session, label);
  if (!existing.ok()) return existing.status();
  for (const LegacyKey &key : keys) {
    for (const LegacyKeyObjects &e : *existing) {
      if (e.name.bytes == key.name) {
        return AlreadyExists("legacy key " + HexEncode(key.name) +
                             " is already in the token");
      }
    }
  }
  // Created objects are destroyed if any later step fails.
  std::vector<std::unique_ptr<p11::ScopedObject>> created;
  for (const LegacyKey &key : keys) {
    Result<CK_OBJECT_HANDLE> aes =
        CreateLegacySecret(session, label, key.name, true, key.aes_key);
    if (!aes.ok()) return aes.status().WithContext("importing the AES key");
    created.push_back(std::make_unique<p11::ScopedObject>(session, *aes));
    Result<CK_OBJECT_HANDLE> hmac =
        CreateLegacySecret(session, label, key.name, false, key.hmac_key);
    if (!hmac.ok()) return hmac.status().WithContext("importing the HMAC key");
    created.push_back(std::make_unique<p11::ScopedObject>(session, *hmac));
    p11::Template info;
    std::string text = SerializeLegacyInfo(expires, LegacyFormatName(format));
    info.Ulong(CKA_CLASS, CKO_DATA)
        .Bool(CKA_TOKEN, true)
        .Bool(CKA_PRIVATE, true)
        .String(CKA_APPLICATION, kLegacyApplication)
        .String(CKA_LABEL, label)
        .Data(kDataIdAttribute, key.name)
        .String(CKA_VALUE, text);
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    Status s = P11_CALL(session, C_CreateObject, session.handle(), info.data(),
                        info.size(), &h);
    if (!s.ok()) return s.WithContext("storing the legacy key's expiry");
    created.push_back(std::make_unique<p11::ScopedObject>(session, h));
  }
  for (auto &object : created) object->Release();
  return Status::Ok();
}

Status DestroyLegacyKey(p11::Session &session, const LegacyKeyObjects &legacy) {
  for (CK_OBJECT_HANDLE h : {legacy.aes, legacy.hmac, legacy.info}) {
    Status s = P11_CALL(session, C_DestroyObject, session.handle(), h);
    if (!s.ok())
      return s.WithContext("destroying legacy key " +
                           HexEncode(legacy.name.bytes));
  }
  return Status::Ok();
}

}  // namespace hsmstek::keystore
