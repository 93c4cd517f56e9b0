#include "keystore/signing.h"

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <array>
#include <cstring>
#include <optional>
#include <vector>

#include "keystore/key_lookup.h"
#include "keystore/ossl.h"
#include "pkcs11/error.h"
#include "pkcs11/object.h"

namespace hsmstek::keystore {
namespace {

// DER of the prime256v1 OID (CKA_EC_PARAMS) and the point sizes.
constexpr uint8_t kP256Params[] = {0x06, 0x08, 0x2a, 0x86, 0x48,
                                   0xce, 0x3d, 0x03, 0x01, 0x07};
constexpr size_t kPointSize = 65;  // 0x04 || x || y

// What a signing private key must be (GenerateSigningKeyPair).
constexpr RequiredFlag kSignerFlags[] = {
    {CKA_TOKEN, "CKA_TOKEN", true, false},
    {CKA_PRIVATE, "CKA_PRIVATE", true, false},
    {CKA_SENSITIVE, "CKA_SENSITIVE", true, false},
    {CKA_EXTRACTABLE, "CKA_EXTRACTABLE", false, false},
    {CKA_SIGN, "CKA_SIGN", true, false},
    {CKA_MODIFIABLE, "CKA_MODIFIABLE", false, true},
    {CKA_COPYABLE, "CKA_COPYABLE", false, true},
    {CKA_DECRYPT, "CKA_DECRYPT", false, true},
    {CKA_UNWRAP, "CKA_UNWRAP", false, true},
    {CKA_DERIVE, "CKA_DERIVE", false, true},
    {CKA_SIGN_RECOVER, "CKA_SIGN_RECOVER", false, true},
    // Set by the token alone: the key was generated inside it and was
    // never readable. A user can create a key of known value with every
    // flag above, and its holder could then sign bundles anywhere, forever.
    {CKA_LOCAL, "CKA_LOCAL", true, false},
    {CKA_ALWAYS_SENSITIVE, "CKA_ALWAYS_SENSITIVE", true, false},
    {CKA_NEVER_EXTRACTABLE, "CKA_NEVER_EXTRACTABLE", true, false},
};

// What a pinned signer must be (InstallTrustedSigner).
constexpr RequiredFlag kPinnedFlags[] = {
    {CKA_TRUSTED, "CKA_TRUSTED", true, false},
    {CKA_VERIFY, "CKA_VERIFY", true, false},
    {CKA_ENCRYPT, "CKA_ENCRYPT", false, true},
    {CKA_WRAP, "CKA_WRAP", false, true},
    {CKA_DERIVE, "CKA_DERIVE", false, true},
};

Result<OsslPtr<EVP_PKEY>> ToEvpKey(const EcPublicKey &key) {
  OsslPtr<OSSL_PARAM_BLD> bld(OSSL_PARAM_BLD_new());
  if (!bld ||
      OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME,
                                      "prime256v1", 0) != 1 ||
      OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY,
                                       key.point.data(),
                                       key.point.size()) != 1) {
    ERR_clear_error();
    return Internal("cannot build EC key parameters");
  }
  OsslPtr<OSSL_PARAM> params(OSSL_PARAM_BLD_to_param(bld.get()));
  OsslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
  EVP_PKEY *raw = nullptr;
  if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params.get()) !=
          1) {
    ERR_clear_error();
    return InvalidArgument("OpenSSL refuses the P-256 public key");
  }
  return OsslPtr<EVP_PKEY>(raw);
}

// CKA_EC_POINT is a DER OCTET STRING around the point.
Bytes EcPointAttribute(const EcPublicKey &key) {
  Bytes out = {0x04, static_cast<uint8_t>(key.point.size())};
  out.insert(out.end(), key.point.begin(), key.point.end());
  return out;
}

Result<EcPublicKey> FromEcPointAttribute(ByteSpan der) {
  if (der.size() == kPointSize + 2 && der[0] == 0x04 && der[1] == kPointSize) {
    return EcPublicKey{Bytes(der.begin() + 2, der.end())};
  }
  if (der.size() == kPointSize && der[0] == 0x04) {  // raw, as some tokens do
    return EcPublicKey{Bytes(der.begin(), der.end())};
  }
  return InvalidArgument("CKA_EC_POINT is not an uncompressed P-256 point");
}

Result<Bytes> Sha256(std::string_view text) {
  Bytes digest(EVP_MAX_MD_SIZE);
  unsigned int len = 0;
  if (EVP_Digest(text.data(), text.size(), digest.data(), &len, EVP_sha256(),
                 nullptr) != 1) {
    ERR_clear_error();
    return Internal("SHA-256 failed");
  }
  digest.resize(len);
  return digest;
}

// The fingerprint of a public key object, recomputed from its
// CKA_EC_PARAMS and CKA_EC_POINT (not taken from its CKA_ID).
Result<Bytes> ObjectFingerprint(p11::Session &session, CK_OBJECT_HANDLE h) {
  Result<Bytes> params = p11::ReadAttribute(session, h, CKA_EC_PARAMS);
  if (!params.ok()) return params.status();
  if (*params != Bytes(std::begin(kP256Params), std::end(kP256Params))) {
    return InvalidArgument("the key is not on P-256");
  }
  Result<Bytes> point = p11::ReadAttribute(session, h, CKA_EC_POINT);
  if (!point.ok()) return point.status();
  Result<EcPublicKey> key = FromEcPointAttribute(*point);
  if (!key.ok()) return key.status();
  return EcFingerprint(*key);
}

}  // namespace

Result<std::string> EcPublicKeyToPem(const EcPublicKey &key) {
  Result<OsslPtr<EVP_PKEY>> pkey = ToEvpKey(key);
  if (!pkey.ok()) return pkey.status();
  return PublicKeyPem(pkey->get());
}

Result<EcPublicKey> EcPublicKeyFromPem(std::string_view pem) {
  Result<OsslPtr<EVP_PKEY>> pkey = PublicKeyFromPem(pem, 16384);
  if (!pkey.ok()) return pkey.status();
  char group[64] = {0};
  size_t group_len = 0;
  if (EVP_PKEY_is_a(pkey->get(), "EC") != 1 ||
      EVP_PKEY_get_utf8_string_param(pkey->get(), OSSL_PKEY_PARAM_GROUP_NAME,
                                     group, sizeof(group), &group_len) != 1 ||
      std::strcmp(group, "prime256v1") != 0) {
    ERR_clear_error();
    return InvalidArgument("the public key is not an EC key on P-256");
  }
  Bytes point(kPointSize);
  size_t len = 0;
  if (EVP_PKEY_get_octet_string_param(pkey->get(),
                                      OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY,
                                      point.data(), point.size(), &len) != 1 ||
      len != kPointSize || point[0] != 0x04) {
    ERR_clear_error();
    return InvalidArgument("cannot read the P-256 public point");
  }
  return EcPublicKey{std::move(point)};
}

Result<Bytes> EcFingerprint(const EcPublicKey &key) {
  Result<OsslPtr<EVP_PKEY>> pkey = ToEvpKey(key);
  if (!pkey.ok()) return pkey.status();
  return PublicKeyFingerprint(pkey->get());
}

Result<SigningKeyPair> GenerateSigningKeyPair(p11::Session &session,
                                              std::string_view label) {
  p11::Template existing;
  existing.Ulong(CKA_CLASS, CKO_PRIVATE_KEY).String(CKA_LABEL, label);
  Result<std::vector<CK_OBJECT_HANDLE>> found =
      p11::FindObjects(session, existing);
  if (!found.ok()) return found.status();
  if (!found->empty()) {
    return AlreadyExists("a private key labelled \"" + std::string(label) +
                         "\" already exists; choose another object= label");
  }
  Bytes id(kSigningKeyIdSize);
  if (RAND_bytes(id.data(), static_cast<int>(id.size())) != 1) {
    return Internal("RAND_bytes failed");
  }
  p11::Template pub;
  // The public half stays as a token object: a private EC key carries no
  // CKA_EC_POINT, and export needs the fingerprint of what it signs with.
  pub.Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, false)
      .Bool(CKA_MODIFIABLE, false)
      .Data(CKA_EC_PARAMS, kP256Params)
      .Bool(CKA_VERIFY, true)
      .Bool(CKA_ENCRYPT, false)
      .Bool(CKA_WRAP, false)
      .Bool(CKA_DERIVE, false)
      .String(CKA_LABEL, label)
      .Data(CKA_ID, id);
  p11::Template priv;
  priv.Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, true)
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, false)
      .Bool(CKA_MODIFIABLE, false)
      .Bool(CKA_COPYABLE, false)
      .Bool(CKA_SIGN, true)
      .Bool(CKA_SIGN_RECOVER, false)
      .Bool(CKA_DECRYPT, false)
      .Bool(CKA_UNWRAP, false)
      .Bool(CKA_DERIVE, false)
      .String(CKA_LABEL, label)
      .Data(CKA_ID, id);
  CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE pub_h = CK_INVALID_HANDLE, priv_h = CK_INVALID_HANDLE;
  Status s =
      P11_CALL(session, C_GenerateKeyPair, session.handle(), &gen, pub.data(),
               pub.size(), priv.data(), priv.size(), &pub_h, &priv_h);
  if (!s.ok()) return s.WithContext("generating the P-256 signing key pair");
  p11::ScopedObject pub_owner(session, pub_h);
  p11::ScopedObject priv_owner(session, priv_h);
  Status strong =
      RequireFlags(session, priv_h, kSignerFlags, "the new signing key");
  if (!strong.ok()) return strong;
  Result<Bytes> point = p11::ReadAttribute(session, pub_h, CKA_EC_POINT);
  if (!point.ok()) return point.status();
  Result<EcPublicKey> key = FromEcPointAttribute(*point);
  if (!key.ok()) return key.status();
  Result<Bytes> fingerprint = EcFingerprint(*key);
  if (!fingerprint.ok()) return fingerprint.status();
  Result<std::string> pem = EcPublicKeyToPem(*key);
  if (!pem.ok()) return pem.status();
  pub_owner.Release();
  priv_owner.Release();
  return SigningKeyPair{std::move(id), std::move(*fingerprint),
                        std::move(*pem)};
}

Result<Bytes> InstallTrustedSigner(p11::Session &session,
                                   std::string_view label,
                                   const EcPublicKey &key) {
  Result<Bytes> fingerprint = EcFingerprint(key);
  if (!fingerprint.ok()) return fingerprint.status();
  for (bool by_id : {true, false}) {
    p11::Template t;
    t.Ulong(CKA_CLASS, CKO_PUBLIC_KEY);
    if (by_id) {
      t.Data(CKA_ID, *fingerprint);
    } else {
      t.String(CKA_LABEL, label);
    }
    Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(session, t);
    if (!found.ok()) return found.status();
    if (!found->empty()) {
      return AlreadyExists(
          by_id ? "this signer (fingerprint " + HexEncode(*fingerprint) +
                      ") is already pinned"
                : "a public key labelled \"" + std::string(label) +
                      "\" already exists; choose another object= label");
    }
  }
  p11::Template t;
  t.Ulong(CKA_CLASS, CKO_PUBLIC_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_EC)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, false)  // the SO can only create public objects
      .Bool(CKA_MODIFIABLE, false)
      .Bool(CKA_COPYABLE, false)
      .Bool(CKA_VERIFY, true)
      .Bool(CKA_TRUSTED, true)
      .Bool(CKA_ENCRYPT, false)
      .Bool(CKA_WRAP, false)
      .Bool(CKA_VERIFY_RECOVER, false)
      .Bool(CKA_DERIVE, false)
      .String(CKA_LABEL, label)
      .Data(CKA_ID, *fingerprint)
      .Data(CKA_EC_PARAMS, kP256Params)
      .Data(CKA_EC_POINT, EcPointAttribute(key));
  CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
  Status s = P11_CALL(session, C_CreateObject, session.handle(), t.data(),
                      t.size(), &h);
  if (!s.ok()) {
    return s.WithContext(s.ckr() == CKR_ATTRIBUTE_READ_ONLY
                             ? "pinning the signer (only the SO may set "
                               "CKA_TRUSTED)"
                             : "pinning the signer");
  }
  p11::ScopedObject owner(session, h);
  Status strong = RequireFlags(session, h, kPinnedFlags, "the pinned signer");
  if (!strong.ok()) return strong;
  owner.Release();
  return *fingerprint;
}

Status SignBundle(p11::Session &session, const p11::TokenUri &signer,
                  Bundle &bundle) {
  Result<std::vector<KeyRef>> found =
      FindKeys(session, signer, {CKO_PRIVATE_KEY}, "--signer");
  if (!found.ok()) return found.status();
  std::vector<KeyRef> ec;
  for (const KeyRef &k : *found) {
    if (k.type == CKK_EC) ec.push_back(k);
  }
  if (ec.size() != 1) {
    return FailedPrecondition(
        "--signer " + signer.text + " must name exactly one EC private key (" +
        std::to_string(ec.size()) +
        " found); make one with `hsmstek signer generate`");
  }
  const KeyRef &key = ec[0];
  Status strong = RequireFlags(session, key.handle, kSignerFlags,
                               "signing " + DescribeKey(key));
  if (!strong.ok()) return strong;
  // The fingerprint comes from the public half (same CKA_ID); the
  // signature is checked with it below, so a mismatched pair is caught.
  p11::Template pub_t;
  pub_t.Ulong(CKA_CLASS, CKO_PUBLIC_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_EC)
      .Data(CKA_ID, key.id);
  Result<std::vector<CK_OBJECT_HANDLE>> pubs = p11::FindObjects(session, pub_t);
  if (!pubs.ok()) return pubs.status();
  if (key.id.empty() || pubs->size() != 1) {
    return FailedPrecondition(
        DescribeKey(key) +
        " has no public half with its CKA_ID in this token; make signers "
        "with `hsmstek signer generate`");
  }
  const CK_OBJECT_HANDLE pub = (*pubs)[0];
  Result<Bytes> fingerprint = ObjectFingerprint(session, pub);
  if (!fingerprint.ok()) {
    return fingerprint.status().WithContext("public half of " +
                                            DescribeKey(key));
  }
  bundle.version = kBundleVersion;
  bundle.signer = std::move(*fingerprint);
  Result<Bytes> digest = Sha256(BundleSignedText(bundle));
  if (!digest.ok()) return digest.status();
  CK_MECHANISM mech{CKM_ECDSA, nullptr, 0};
  Status s = P11_CALL(session, C_SignInit, session.handle(), &mech, key.handle);
  if (!s.ok()) return s.WithContext("signing the bundle");
  Bytes sig(kBundleSignatureSize);
  CK_ULONG len = sig.size();
  s = P11_CALL(session, C_Sign, session.handle(), digest->data(),
               digest->size(), sig.data(), &len);
  if (!s.ok()) return s.WithContext("signing the bundle");
  if (len != kBundleSignatureSize) {
    return Internal("C_Sign returned a " + std::to_string(len) +
                    "-byte ECDSA signature");
  }
  CK_MECHANISM verify{CKM_ECDSA, nullptr, 0};
  s = P11_CALL(session, C_VerifyInit, session.handle(), &verify, pub);
  if (s.ok()) {
    s = P11_CALL(session, C_Verify, session.handle(), digest->data(),
                 digest->size(), sig.data(), len);
  }
  if (!s.ok()) {
    return s.WithContext("checking the new signature with the public half of " +
                         DescribeKey(key));
  }
  bundle.signature = std::move(sig);
  return Status::Ok();
}

Status VerifyBundleSignature(p11::Session &session, const Bundle &bundle) {
  const std::string signer_hex = HexEncode(bundle.signer);
  p11::Template t;
  t.Ulong(CKA_CLASS, CKO_PUBLIC_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_EC)
      .Data(CKA_ID, bundle.signer);
  Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(session, t);
  if (!found.ok()) return found.status();
  std::optional<CK_OBJECT_HANDLE> pinned;
  std::string why = "no public key with that fingerprint is in this token";
  for (CK_OBJECT_HANDLE h : *found) {
    Status strong = RequireFlags(session, h, kPinnedFlags, "its public key");
    if (!strong.ok()) {
      why = strong.message();
      continue;
    }
    Result<Bytes> fingerprint = ObjectFingerprint(session, h);
    if (!fingerprint.ok() || *fingerprint != bundle.signer) {
      why = "its CKA_ID does not match its public key";
      continue;
    }
    pinned = h;
    break;
  }
  if (!pinned) {
    return PermissionDenied(
        "unknown signer " + signer_hex + ": " + why +
        "; the SO of this token pins signers with `hsmstek signer trust`; "
        "nothing was imported");
  }
  Result<Bytes> digest = Sha256(BundleSignedText(bundle));
  if (!digest.ok()) return digest.status();
  CK_MECHANISM mech{CKM_ECDSA, nullptr, 0};
  Status s = P11_CALL(session, C_VerifyInit, session.handle(), &mech, *pinned);
  if (!s.ok()) return s.WithContext("verifying the bundle signature");
  Bytes sig = bundle.signature;  // C_Verify takes a non-const pointer
  s = P11_CALL(session, C_Verify, session.handle(), digest->data(),
               digest->size(), sig.data(), static_cast<CK_ULONG>(sig.size()));
  if (s.ckr() == CKR_SIGNATURE_INVALID || s.ckr() == CKR_SIGNATURE_LEN_RANGE) {
    return PermissionDenied(
        "bundle signature is invalid: the bundle was altered after signer " +
        signer_hex +
        " signed it (or was never signed by it); nothing was "
        "imported");
  }
  if (!s.ok()) return s.WithContext("verifying the bundle signature");
  return Status::Ok();
}

}  // namespace hsmstek::keystore
