#include "keystore/derivation.h"

#include "keystore/key_attributes.h"
#include "pkcs11/object.h"

namespace hsmstek::keystore {
namespace {

// Derives the key of `purpose` for `epoch`, locked down as far as the
// token allows (key_attributes.h), and reads it back.
Result<CK_OBJECT_HANDLE> Derive(p11::Session &session, CK_OBJECT_HANDLE master,
                                char purpose, uint64_t epoch,
                                std::atomic<unsigned> *refused) {
  std::array<uint8_t, kDerivationDataSize> data =
      DerivationData(purpose, epoch);
  CK_KEY_DERIVATION_STRING_DATA params{data.data(),
                                       static_cast<CK_ULONG>(data.size())};
  CK_MECHANISM mechanism{CKM_AES_ECB_ENCRYPT_DATA, &params, sizeof(params)};
  KeySpec spec;
  spec.kind = purpose == kPurposeEncrypt ? KeyKind::kEpochAes
              : purpose == kPurposeName  ? KeyKind::kNameKey
                                         : KeyKind::kEpochMac;
  Result<CreatedKey> key = CreateKey(
      spec,
      [&](p11::Template &t, CK_OBJECT_HANDLE *out) {
        return P11_CALL(session, C_DeriveKey, session.handle(), &mechanism,
                        master, t.data(), t.size(), out);
      },
      refused);
  if (!key.ok()) return key.status();
  p11::ScopedObject owner(session, key->handle);
  Result<Protections> verified =
      VerifyKey(session, key->handle, spec,
                std::string("derived key '") + purpose + "' of epoch " +
                    std::to_string(epoch),
                key->lockdown);
  if (!verified.ok()) return verified.status();
  return owner.Release();
}

}  // namespace

Result<DerivedKeys> DeriveEpochKeys(p11::Session &session,
                                    CK_OBJECT_HANDLE master, uint64_t epoch,
                                    std::atomic<unsigned> *refused) {
  Result<CK_OBJECT_HANDLE> aes =
      Derive(session, master, kPurposeEncrypt, epoch, refused);
  if (!aes.ok()) return aes.status();
  p11::ScopedObject aes_owner(session, *aes);
  Result<CK_OBJECT_HANDLE> hmac =
      Derive(session, master, kPurposeMac, epoch, refused);
  if (!hmac.ok()) return hmac.status();
  return DerivedKeys{aes_owner.Release(), *hmac};
}

void DestroyDerivedKeys(p11::Session &session, const DerivedKeys &keys) {
  p11::ScopedObject aes(session, keys.aes);
  p11::ScopedObject hmac(session, keys.hmac);
}

Result<CK_OBJECT_HANDLE> DeriveNameKey(p11::Session &session,
                                       CK_OBJECT_HANDLE link,
                                       std::atomic<unsigned> *refused) {
  return Derive(session, link, kPurposeName, kNameKeyEpoch, refused);
}

Result<KeyName> SignKeyName(p11::Session &session, CK_OBJECT_HANDLE name_key,
                            uint64_t epoch) {
  std::array<uint8_t, kNameInputSize> input = NameInput(epoch);
  CK_MECHANISM mechanism{CKM_SHA256_HMAC, nullptr, 0};
  Status s =
      P11_CALL(session, C_SignInit, session.handle(), &mechanism, name_key);
  if (!s.ok()) return s;
  uint8_t mac[32];
  CK_ULONG mac_len = sizeof(mac);
  s = P11_CALL(session, C_Sign, session.handle(), input.data(), input.size(),
               mac, &mac_len);
  if (!s.ok()) return s;
  if (mac_len != sizeof(mac)) return Internal("HMAC-SHA256 of unexpected size");
  KeyName name;
  std::copy(mac, mac + kKeyNameSize, name.bytes.begin());
  return name;
}

Result<CK_OBJECT_HANDLE> DeriveLink(p11::Session &session,
                                    CK_OBJECT_HANDLE previous, uint64_t index,
                                    std::string_view label,
                                    const StoreId &store_id, bool replicable,
                                    std::atomic<unsigned> *refused) {
  std::array<uint8_t, kDerivationDataSize> data =
      DerivationData(kPurposeRatchet, index);
  CK_KEY_DERIVATION_STRING_DATA params{data.data(),
                                       static_cast<CK_ULONG>(data.size())};
  CK_MECHANISM mechanism{CKM_AES_ECB_ENCRYPT_DATA, &params, sizeof(params)};
  const LinkId id = MakeLinkId(store_id, index);
  KeySpec spec;
  spec.kind = KeyKind::kMaster;
  spec.label = label;
  spec.id = id;
  spec.replicable = replicable;
  spec.for_derive = true;
  Result<CreatedKey> key = CreateKey(
      spec,
      [&](p11::Template &t, CK_OBJECT_HANDLE *out) {
        return P11_CALL(session, C_DeriveKey, session.handle(), &mechanism,
                        previous, t.data(), t.size(), out);
      },
      refused);
  if (!key.ok()) return key.status();
  p11::ScopedObject owner(session, key->handle);
  Result<Protections> verified =
      VerifyKey(session, key->handle, spec, "ratchet link " + HexEncode(id),
                key->lockdown);
  if (!verified.ok()) return verified.status();
  return owner.Release();
}

Result<std::array<uint8_t, kCheckValueSize>> ComputeCheckValue(
    p11::Session &session, CK_OBJECT_HANDLE master,
    std::atomic<unsigned> *refused) {
  std::atomic<unsigned> local{0};
  Result<CK_OBJECT_HANDLE> key = Derive(
      session, master, kPurposeCheck, kCheckEpoch, refused ? refused : &local);
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
