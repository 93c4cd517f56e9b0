#include "keystore/derivation.h"

#include "pkcs11/object.h"

namespace hsmstek::keystore {
namespace {

// The template of a derived key: only the usage its purpose needs.
p11::Template DerivedKeyTemplate(char purpose) {
  const bool is_aes = purpose == kPurposeEncrypt;
  const bool is_mac = !is_aes;
  p11::Template t;
  t.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, is_aes ? CKK_AES : CKK_GENERIC_SECRET)
      .Ulong(CKA_VALUE_LEN, 32)
      .Bool(CKA_TOKEN, false)
      .Bool(CKA_PRIVATE, true)
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, false)
      .Bool(CKA_ENCRYPT, is_aes)
      .Bool(CKA_DECRYPT, is_aes)
      .Bool(CKA_SIGN, is_mac)
      .Bool(CKA_VERIFY, is_mac)
      .Bool(CKA_WRAP, false)
      .Bool(CKA_UNWRAP, false)
      .Bool(CKA_DERIVE, false);
  return t;
}

Result<CK_OBJECT_HANDLE> Derive(p11::Session &session, CK_OBJECT_HANDLE master,
                                char purpose, uint64_t epoch) {
  std::array<uint8_t, kDerivationDataSize> data =
      DerivationData(purpose, epoch);
  CK_KEY_DERIVATION_STRING_DATA params{data.data(),
                                       static_cast<CK_ULONG>(data.size())};
  CK_MECHANISM mechanism{CKM_AES_ECB_ENCRYPT_DATA, &params, sizeof(params)};
  p11::Template t = DerivedKeyTemplate(purpose);
  CK_OBJECT_HANDLE out = CK_INVALID_HANDLE;
  Status s = P11_CALL(session, C_DeriveKey, session.handle(), &mechanism,
                      master, t.data(), t.size(), &out);
  if (!s.ok()) return s;
  return out;
}

}  // namespace

Result<DerivedKeys> DeriveEpochKeys(p11::Session &session,
                                    CK_OBJECT_HANDLE master, uint64_t epoch) {
  Result<CK_OBJECT_HANDLE> aes =
      Derive(session, master, kPurposeEncrypt, epoch);
  if (!aes.ok()) return aes.status();
  p11::ScopedObject aes_owner(session, *aes);
  Result<CK_OBJECT_HANDLE> hmac = Derive(session, master, kPurposeMac, epoch);
  if (!hmac.ok()) return hmac.status();
  return DerivedKeys{aes_owner.Release(), *hmac};
}

void DestroyDerivedKeys(p11::Session &session, const DerivedKeys &keys) {
  p11::ScopedObject aes(session, keys.aes);
  p11::ScopedObject hmac(session, keys.hmac);
}

Result<std::array<uint8_t, kCheckValueSize>> ComputeCheckValue(
    p11::Session &session, CK_OBJECT_HANDLE master) {
  Result<CK_OBJECT_HANDLE> key =
      Derive(session, master, kPurposeCheck, kCheckEpoch);
  if (!key.ok()) return key.status();
  p11::ScopedObject owner(session, *key);
  CK_MECHANISM mechanism{CKM_SHA256_HMAC, nullptr, 0};
  Status s = P11_CALL(session, C_SignInit, session.handle(), &mechanism, *key);
  if (!s.ok()) return s;
  uint8_t mac[32];
  CK_ULONG mac_len = sizeof(mac);
  auto *message =
      reinterpret_cast<CK_BYTE_PTR>(const_cast<char *>(kCheckMessage));
  s = P11_CALL(session, C_Sign, session.handle(), message, kCheckMessageSize,
               mac, &mac_len);
  if (!s.ok()) return s;
  if (mac_len != sizeof(mac)) return Internal("HMAC-SHA256 of unexpected size");
  std::array<uint8_t, kCheckValueSize> out;
  std::copy(mac, mac + kCheckValueSize, out.begin());
  return out;
}

}  // namespace hsmstek::keystore
