#include "keystore/replication.h"

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include <algorithm>
#include <array>
#include <memory>
#include <optional>
#include <vector>

#include "keystore/derivation.h"
#include "keystore/key_lookup.h"
#include "keystore/link_check.h"
#include "keystore/master.h"
#include "keystore/ossl.h"
#include "keystore/provisioning.h"
#include "keystore/signing.h"
#include "keystore/time_format.h"
#include "pkcs11/error.h"
#include "pkcs11/object.h"

namespace hsmstek::keystore {
namespace {

constexpr size_t kWrapKeyIdSize = 16;

Result<OsslPtr<EVP_PKEY>> ToEvpKey(const RsaPublicKey &key) {
  OsslPtr<BIGNUM> n(BN_bin2bn(key.modulus.data(),
                              static_cast<int>(key.modulus.size()), nullptr));
  OsslPtr<BIGNUM> e(BN_bin2bn(key.exponent.data(),
                              static_cast<int>(key.exponent.size()), nullptr));
  OsslPtr<OSSL_PARAM_BLD> bld(OSSL_PARAM_BLD_new());
  if (!n || !e || !bld ||
      OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, n.get()) != 1 ||
      OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, e.get()) != 1) {
    ERR_clear_error();
    return Internal("cannot build RSA key parameters");
  }
  OsslPtr<OSSL_PARAM> params(OSSL_PARAM_BLD_to_param(bld.get()));
  OsslPtr<EVP_PKEY_CTX> ctx(
      EVP_PKEY_CTX_new_from_name(nullptr, "RSA", nullptr));
  EVP_PKEY *raw = nullptr;
  if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params.get()) !=
          1) {
    ERR_clear_error();
    return InvalidArgument("OpenSSL refuses the RSA public key values");
  }
  return OsslPtr<EVP_PKEY>(raw);
}

Result<Bytes> BigNumParam(const EVP_PKEY *pkey, const char *name) {
  BIGNUM *raw = nullptr;
  if (EVP_PKEY_get_bn_param(pkey, name, &raw) != 1) {
    ERR_clear_error();
    return InvalidArgument(std::string("RSA key lacks ") + name);
  }
  OsslPtr<BIGNUM> bn(raw);
  Bytes out(static_cast<size_t>(BN_num_bytes(bn.get())));
  BN_bn2bin(bn.get(), out.data());
  return out;
}

Result<RsaPublicKey> ReadRsaPublic(p11::Session &session, CK_OBJECT_HANDLE h) {
  // CKA_MODULUS and CKA_PUBLIC_EXPONENT are public attributes of both RSA
  // public and private keys.
  Result<Bytes> n = p11::ReadAttribute(session, h, CKA_MODULUS);
  if (!n.ok()) return n.status();
  Result<Bytes> e = p11::ReadAttribute(session, h, CKA_PUBLIC_EXPONENT);
  if (!e.ok()) return e.status();
  return RsaPublicKey{std::move(*n), std::move(*e)};
}

// The id the bundle records for a wrapping/unwrapping key (header comment).
Result<Bytes> BundleKeyId(p11::Session &session, const KeyRef &key) {
  if (key.type != CKK_RSA) return key.id;
  Result<RsaPublicKey> pub = ReadRsaPublic(session, key.handle);
  if (!pub.ok()) return pub.status();
  return RsaFingerprint(*pub);
}

struct OaepParams {
  CK_RSA_PKCS_OAEP_PARAMS params;
  CK_MECHANISM mechanism;
};

// Fills `out` for `m`; the mechanism points into `out`, so it must not move.
void MechanismFor(WrapMechanism m, OaepParams &out) {
  switch (m) {
    case WrapMechanism::kRsaOaepSha256:
      out.params = {CKM_SHA256, CKG_MGF1_SHA256, CKZ_DATA_SPECIFIED, nullptr,
                    0};
      out.mechanism = {CKM_RSA_PKCS_OAEP, &out.params, sizeof(out.params)};
      return;
    case WrapMechanism::kRsaOaepSha1:
      out.params = {CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, nullptr, 0};
      out.mechanism = {CKM_RSA_PKCS_OAEP, &out.params, sizeof(out.params)};
      return;
    case WrapMechanism::kAesKeyWrapPad:
    default:
      out.mechanism = {CKM_AES_KEY_WRAP_PAD, nullptr, 0};
      return;
  }
}

Result<Bytes> Wrap(p11::Session &session, WrapMechanism m,
                   CK_OBJECT_HANDLE wrapping_key, CK_OBJECT_HANDLE key) {
  OaepParams p;
  MechanismFor(m, p);
  CK_ULONG len = 0;
  Status s = P11_CALL(session, C_WrapKey, session.handle(), &p.mechanism,
                      wrapping_key, key, nullptr, &len);
  if (!s.ok()) return s;
  if (len == 0 || len > kMaxWrappedKeySize) {
    return Internal("C_WrapKey announced " + std::to_string(len) + " bytes");
  }
  Bytes out(len);
  s = P11_CALL(session, C_WrapKey, session.handle(), &p.mechanism, wrapping_key,
               key, out.data(), &len);
  if (!s.ok()) return s;
  out.resize(len);
  return out;
}

// True when a token refused OAEP parameters (SoftHSM 2.6 answers
// CKR_ARGUMENTS_BAD to SHA-256; others say CKR_MECHANISM_PARAM_INVALID).
bool RefusedOaepParams(const Status &s) {
  return s.ckr() == CKR_ARGUMENTS_BAD ||
         s.ckr() == CKR_MECHANISM_PARAM_INVALID ||
         s.ckr() == CKR_MECHANISM_INVALID;
}

// The private half of an unwrap key pair (see GenerateUnwrapKeyPair).
p11::Template PrivateUnwrapKeyTemplate(std::string_view label, ByteSpan id) {
  p11::Template priv;
  priv.Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, true)
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, false)
      .Bool(CKA_MODIFIABLE, false)
      .Bool(CKA_COPYABLE, false)
      .Bool(CKA_UNWRAP, true)
      .Bool(CKA_DECRYPT, false)
      .Bool(CKA_SIGN, false)
      .Bool(CKA_SIGN_RECOVER, false)
      .Bool(CKA_DERIVE, false)
      .String(CKA_LABEL, label)
      .Data(CKA_ID, id);
  return priv;
}

// What an unwrap key forces on the keys it unwraps (CKA_UNWRAP_TEMPLATE):
// see MasterUnwrapConstraints (key_attributes.h).
p11::Template UnwrapTemplate() { return MasterUnwrapConstraints(); }

const Master *FindMasterById(const std::vector<Master> &masters,
                             const StoreId &id) {
  for (const Master &m : masters) {
    if (m.id == id) return &m;
  }
  return nullptr;
}

// Refuses (kPermissionDenied) an unwrap key whose CKA_UNWRAP_TEMPLATE does
// not force CKA_SENSITIVE=TRUE: without it, whoever holds the user PIN
// unwraps any bundle (they are public) with a template of their own into
// a readable key. A token that does not know the attribute passes (it
// cannot do better; docs/SECURITY.md §5 says so).
Status RequireSensitiveUnwrapTemplate(p11::Session &session, CK_OBJECT_HANDLE h,
                                      std::string_view what) {
  CK_ATTRIBUTE outer{CKA_UNWRAP_TEMPLATE, nullptr, 0};
  Status s =
      P11_CALL(session, C_GetAttributeValue, session.handle(), h, &outer, 1);
  if (s.ckr() == CKR_ATTRIBUTE_TYPE_INVALID) return Status::Ok();
  if (!s.ok()) return s.WithContext("reading CKA_UNWRAP_TEMPLATE");
  const std::string weak =
      std::string(what) +
      " is weaker than required: its CKA_UNWRAP_TEMPLATE does not force "
      "CKA_SENSITIVE=TRUE (a user-PIN holder could unwrap any bundle into a "
      "readable key)";
  if (outer.ulValueLen == CK_UNAVAILABLE_INFORMATION ||
      outer.ulValueLen % sizeof(CK_ATTRIBUTE) != 0 || outer.ulValueLen == 0 ||
      outer.ulValueLen > 64 * sizeof(CK_ATTRIBUTE)) {
    return PermissionDenied(weak);
  }
  // Three calls, as PKCS#11 reads nested templates: the outer size, then
  // each entry's type and size, then the values.
  std::vector<CK_ATTRIBUTE> inner(outer.ulValueLen / sizeof(CK_ATTRIBUTE),
                                  CK_ATTRIBUTE{0, nullptr, 0});
  outer.pValue = inner.data();
  s = P11_CALL(session, C_GetAttributeValue, session.handle(), h, &outer, 1);
  if (!s.ok()) return s.WithContext("reading CKA_UNWRAP_TEMPLATE");
  std::vector<Bytes> values;
  values.reserve(inner.size());
  for (CK_ATTRIBUTE &a : inner) {
    if (a.ulValueLen == CK_UNAVAILABLE_INFORMATION || a.ulValueLen > 4096) {
      return PermissionDenied(weak);
    }
    values.emplace_back(a.ulValueLen);
    a.pValue = values.back().data();
  }
  s = P11_CALL(session, C_GetAttributeValue, session.handle(), h, &outer, 1);
  if (!s.ok()) return s.WithContext("reading CKA_UNWRAP_TEMPLATE");
  for (const CK_ATTRIBUTE &a : inner) {
    if (a.type == CKA_SENSITIVE && a.ulValueLen == sizeof(CK_BBOOL) &&
        *static_cast<const CK_BBOOL *>(a.pValue) == CK_TRUE) {
      return Status::Ok();
    }
  }
  return PermissionDenied(weak);
}

// What a transport key must be: wrap/unwrap only and, when secret or
// private, sensitive, never extractable, and neither modifiable nor
// copyable (a user could otherwise add CKA_DECRYPT, in place or on a
// copy). A key that could also decrypt would turn a bundle into a raw
// master (docs/SECURITY.md §4). An unwrap key must force sensitivity on what it
// unwraps; a secret wrap key must not unwrap (it would, with any template).
Status CheckTransportKey(p11::Session &session, const KeyRef &key,
                         bool wrapping) {
  const std::string what = "transport " + DescribeKey(key);
  static constexpr RequiredFlag kPublicWrap[] = {
      {CKA_WRAP, "CKA_WRAP", true, false},
      {CKA_ENCRYPT, "CKA_ENCRYPT", false, true},
      {CKA_VERIFY, "CKA_VERIFY", false, true},
      {CKA_VERIFY_RECOVER, "CKA_VERIFY_RECOVER", false, true},
      {CKA_DERIVE, "CKA_DERIVE", false, true},
  };
  static constexpr RequiredFlag kPrivateUnwrap[] = {
      {CKA_UNWRAP, "CKA_UNWRAP", true, false},
      {CKA_SENSITIVE, "CKA_SENSITIVE", true, false},
      {CKA_EXTRACTABLE, "CKA_EXTRACTABLE", false, false},
      {CKA_DECRYPT, "CKA_DECRYPT", false, true},
      {CKA_SIGN, "CKA_SIGN", false, true},
      {CKA_SIGN_RECOVER, "CKA_SIGN_RECOVER", false, true},
      {CKA_DERIVE, "CKA_DERIVE", false, true},
      {CKA_MODIFIABLE, "CKA_MODIFIABLE", false, false},
      {CKA_COPYABLE, "CKA_COPYABLE", false, true},
  };
  static constexpr RequiredFlag kSecretWrap[] = {
      {CKA_WRAP, "CKA_WRAP", true, false},
      {CKA_SENSITIVE, "CKA_SENSITIVE", true, false},
      {CKA_EXTRACTABLE, "CKA_EXTRACTABLE", false, false},
      {CKA_ENCRYPT, "CKA_ENCRYPT", false, true},
      {CKA_DECRYPT, "CKA_DECRYPT", false, true},
      {CKA_SIGN, "CKA_SIGN", false, true},
      {CKA_VERIFY, "CKA_VERIFY", false, true},
      {CKA_DERIVE, "CKA_DERIVE", false, true},
      {CKA_UNWRAP, "CKA_UNWRAP", false, true},
      {CKA_MODIFIABLE, "CKA_MODIFIABLE", false, false},
      {CKA_COPYABLE, "CKA_COPYABLE", false, true},
  };
  static constexpr RequiredFlag kSecretUnwrap[] = {
      {CKA_UNWRAP, "CKA_UNWRAP", true, false},
      {CKA_SENSITIVE, "CKA_SENSITIVE", true, false},
      {CKA_EXTRACTABLE, "CKA_EXTRACTABLE", false, false},
      {CKA_ENCRYPT, "CKA_ENCRYPT", false, true},
      {CKA_DECRYPT, "CKA_DECRYPT", false, true},
      {CKA_SIGN, "CKA_SIGN", false, true},
      {CKA_VERIFY, "CKA_VERIFY", false, true},
      {CKA_DERIVE, "CKA_DERIVE", false, true},
      {CKA_MODIFIABLE, "CKA_MODIFIABLE", false, false},
      {CKA_COPYABLE, "CKA_COPYABLE", false, true},
  };
  if (key.cls == CKO_PUBLIC_KEY) {
    return RequireFlags(session, key.handle, kPublicWrap, what);
  }
  Status s = key.cls == CKO_PRIVATE_KEY
                 ? RequireFlags(session, key.handle, kPrivateUnwrap, what)
                 : RequireFlags(
                       session, key.handle,
                       wrapping ? std::span<const RequiredFlag>(kSecretWrap)
                                : std::span<const RequiredFlag>(kSecretUnwrap),
                       what);
  if (!s.ok() || wrapping) return s;
  return RequireSensitiveUnwrapTemplate(session, key.handle, what);
}

// The record an import leaves in the receiving token (CKO_DATA, private):
// it outlives `destroy`, so an old bundle of a destroyed master cannot
// bring it back.
constexpr char kImportApplication[] = "hsmstek-import";

p11::Template ImportRecordQuery(std::string_view label, const StoreId &id) {
  p11::Template t;
  t.Ulong(CKA_CLASS, CKO_DATA)
      .String(CKA_APPLICATION, kImportApplication)
      .String(CKA_LABEL, label)
      .Data(kDataIdAttribute, id);
  return t;
}

Result<CK_OBJECT_HANDLE> StoreImportRecord(p11::Session &session,
                                           std::string_view label,
                                           const Bundle &bundle) {
  const std::string text = "signer " + HexEncode(bundle.signer) + "\ncreated " +
                           FormatRfc3339(bundle.created) + "\n";
  // A user-PIN holder who could destroy or relabel the record could replay
  // the bundle of a destroyed master; where the token knows
  // CKA_DESTROYABLE (PKCS#11 3.0; SoftHSM 2.6 does) nobody can.
  auto create = [&](bool lock, CK_OBJECT_HANDLE *h) {
    p11::Template t = ImportRecordQuery(label, bundle.store_id);
    t.Bool(CKA_TOKEN, true)
        .Bool(CKA_PRIVATE, true)
        .Bool(CKA_MODIFIABLE, false)
        .String(CKA_VALUE, text);
    if (lock) t.Bool(CKA_DESTROYABLE, false);
    return P11_CALL(session, C_CreateObject, session.handle(), t.data(),
                    t.size(), h);
  };
  CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
  Status s = create(true, &h);
  if (s.ckr() == CKR_ATTRIBUTE_TYPE_INVALID) s = create(false, &h);
  if (!s.ok()) return s.WithContext("storing the import record");
  return h;
}

}  // namespace

Result<std::string> RsaPublicKeyToPem(const RsaPublicKey &key) {
  Result<OsslPtr<EVP_PKEY>> pkey = ToEvpKey(key);
  if (!pkey.ok()) return pkey.status();
  return PublicKeyPem(pkey->get());
}

Result<RsaPublicKey> RsaPublicKeyFromPem(std::string_view pem) {
  Result<OsslPtr<EVP_PKEY>> pkey = PublicKeyFromPem(pem, kMaxPemSize);
  if (!pkey.ok()) return pkey.status();
  if (EVP_PKEY_is_a(pkey->get(), "RSA") != 1) {
    return InvalidArgument("the public key is not an RSA key");
  }
  int bits = EVP_PKEY_get_bits(pkey->get());
  if (bits < static_cast<int>(kMinWrapKeyBits)) {
    return InvalidArgument("the RSA key has " + std::to_string(bits) +
                           " bits; at least " +
                           std::to_string(kMinWrapKeyBits) + " are required");
  }
  Result<Bytes> n = BigNumParam(pkey->get(), OSSL_PKEY_PARAM_RSA_N);
  if (!n.ok()) return n.status();
  Result<Bytes> e = BigNumParam(pkey->get(), OSSL_PKEY_PARAM_RSA_E);
  if (!e.ok()) return e.status();
  return RsaPublicKey{std::move(*n), std::move(*e)};
}

Result<Bytes> RsaFingerprint(const RsaPublicKey &key) {
  Result<OsslPtr<EVP_PKEY>> pkey = ToEvpKey(key);
  if (!pkey.ok()) return pkey.status();
  return PublicKeyFingerprint(pkey->get());
}

Result<UnwrapKeyPair> GenerateUnwrapKeyPair(p11::Session &session,
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
  Bytes id(kWrapKeyIdSize);
  if (RAND_bytes(id.data(), static_cast<int>(id.size())) != 1) {
    return Internal("RAND_bytes failed");
  }
  const CK_ULONG bits = kUnwrapKeyBits;
  const uint8_t f4[] = {0x01, 0x00, 0x01};
  p11::Template pub;
  // The public half is only needed for its PEM: a session object.
  pub.Bool(CKA_TOKEN, false)
      .Bool(CKA_PRIVATE, false)
      .Ulong(CKA_MODULUS_BITS, bits)
      .Data(CKA_PUBLIC_EXPONENT, f4)
      .Bool(CKA_ENCRYPT, false)
      .Bool(CKA_VERIFY, false)
      .Bool(CKA_VERIFY_RECOVER, false)
      .Bool(CKA_WRAP, false)
      .Bool(CKA_DERIVE, false)
      .String(CKA_LABEL, label)
      .Data(CKA_ID, id);
  p11::Template priv = PrivateUnwrapKeyTemplate(label, id);
  // Whoever holds the user PIN could otherwise unwrap a bundle with a
  // template of their own (CKA_SENSITIVE=FALSE) and read the master: the
  // token forces these attributes on every key this one unwraps.
  p11::Template pinned = UnwrapTemplate();
  p11::Template priv_pinned = PrivateUnwrapKeyTemplate(label, id);
  priv_pinned.Data(CKA_UNWRAP_TEMPLATE,
                   ByteSpan(reinterpret_cast<const uint8_t *>(pinned.data()),
                            pinned.size() * sizeof(CK_ATTRIBUTE)));
  CK_MECHANISM gen{CKM_RSA_PKCS_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE pub_h = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE priv_h = CK_INVALID_HANDLE;
  bool unwrap_template = true;
  Status s = P11_CALL(session, C_GenerateKeyPair, session.handle(), &gen,
                      pub.data(), pub.size(), priv_pinned.data(),
                      priv_pinned.size(), &pub_h, &priv_h);
  if (s.ckr() == CKR_ATTRIBUTE_TYPE_INVALID ||
      s.ckr() == CKR_TEMPLATE_INCONSISTENT) {
    // A token without CKA_UNWRAP_TEMPLATE (PKCS#11 2.40): reported.
    unwrap_template = false;
    s = P11_CALL(session, C_GenerateKeyPair, session.handle(), &gen, pub.data(),
                 pub.size(), priv.data(), priv.size(), &pub_h, &priv_h);
  }
  if (!s.ok()) return s.WithContext("generating the RSA key pair");
  p11::ScopedObject pub_owner(session, pub_h);
  p11::ScopedObject priv_owner(session, priv_h);

  static constexpr CK_ATTRIBUTE_TYPE kTypes[] = {
      CKA_TOKEN,  CKA_PRIVATE,    CKA_SENSITIVE,   CKA_EXTRACTABLE,
      CKA_UNWRAP, CKA_MODIFIABLE, CKA_COPYABLE,    CKA_DECRYPT,
      CKA_SIGN,   CKA_DERIVE,     CKA_SIGN_RECOVER};
  static constexpr const char *kNames[] = {
      "CKA_TOKEN",  "CKA_PRIVATE",    "CKA_SENSITIVE",   "CKA_EXTRACTABLE",
      "CKA_UNWRAP", "CKA_MODIFIABLE", "CKA_COPYABLE",    "CKA_DECRYPT",
      "CKA_SIGN",   "CKA_DERIVE",     "CKA_SIGN_RECOVER"};
  static constexpr bool kWanted[] = {true,  true,  true,  false, true, false,
                                     false, false, false, false, false};
  Result<std::vector<std::optional<bool>>> v =
      p11::ReadBools(session, priv_h, kTypes);
  if (!v.ok()) return v.status();
  for (size_t i = 0; i < std::size(kTypes); ++i) {
    // An absent usage counts as FALSE; every other attribute must be there.
    bool absent_ok = i >= 7;
    bool value = (*v)[i].value_or(false);
    if ((!(*v)[i] && !absent_ok) || value != kWanted[i]) {
      return PermissionDenied(std::string("the new unwrap key is weaker than "
                                          "requested: ") +
                              kNames[i] + " is not " +
                              (kWanted[i] ? "TRUE" : "FALSE"));
    }
  }
  Result<RsaPublicKey> key = ReadRsaPublic(session, priv_h);
  if (!key.ok()) return key.status();
  Result<std::string> pem = RsaPublicKeyToPem(*key);
  if (!pem.ok()) return pem.status();
  Result<Bytes> fingerprint = RsaFingerprint(*key);
  if (!fingerprint.ok()) return fingerprint.status();
  priv_owner.Release();
  return UnwrapKeyPair{std::move(id), std::move(*fingerprint), std::move(*pem),
                       unwrap_template};
}

Result<Bytes> InstallTrustedWrapKey(p11::Session &session,
                                    std::string_view label,
                                    const RsaPublicKey &key) {
  Result<Bytes> fingerprint = RsaFingerprint(key);
  if (!fingerprint.ok()) return fingerprint.status();
  Result<OsslPtr<EVP_PKEY>> pkey = ToEvpKey(key);
  if (!pkey.ok()) return pkey.status();
  if (EVP_PKEY_get_bits(pkey->get()) < static_cast<int>(kMinWrapKeyBits)) {
    return InvalidArgument("the RSA key is shorter than " +
                           std::to_string(kMinWrapKeyBits) + " bits");
  }
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
          by_id ? "this public key (fingerprint " + HexEncode(*fingerprint) +
                      ") is already installed"
                : "a public key labelled \"" + std::string(label) +
                      "\" already exists; choose another object= label");
    }
  }
  p11::Template t;
  t.Ulong(CKA_CLASS, CKO_PUBLIC_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_RSA)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, false)  // the SO can only create public objects
      .Bool(CKA_MODIFIABLE, false)
      .Bool(CKA_WRAP, true)
      .Bool(CKA_TRUSTED, true)
      .Bool(CKA_ENCRYPT, false)
      .Bool(CKA_VERIFY, false)
      .Bool(CKA_VERIFY_RECOVER, false)
      .Bool(CKA_DERIVE, false)
      .String(CKA_LABEL, label)
      .Data(CKA_ID, *fingerprint)
      .Data(CKA_MODULUS, key.modulus)
      .Data(CKA_PUBLIC_EXPONENT, key.exponent);
  CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
  Status s = P11_CALL(session, C_CreateObject, session.handle(), t.data(),
                      t.size(), &h);
  if (!s.ok()) {
    if (s.ckr() == CKR_ATTRIBUTE_READ_ONLY) {
      return s.WithContext(
          "installing the trusted wrapping key (only the SO may set "
          "CKA_TRUSTED)");
    }
    return s.WithContext("installing the trusted wrapping key");
  }
  p11::ScopedObject owner(session, h);
  static constexpr CK_ATTRIBUTE_TYPE kTypes[] = {CKA_TRUSTED, CKA_WRAP,
                                                 CKA_ENCRYPT, CKA_VERIFY};
  Result<std::vector<std::optional<bool>>> v =
      p11::ReadBools(session, h, kTypes);
  if (!v.ok()) return v.status();
  if ((*v)[0] != true || (*v)[1] != true || (*v)[2] == true ||
      (*v)[3] == true) {
    return PermissionDenied(
        "the token did not store the wrapping key as requested (CKA_TRUSTED "
        "and CKA_WRAP TRUE, CKA_ENCRYPT and CKA_VERIFY FALSE)");
  }
  owner.Release();
  return *fingerprint;
}

Result<Bundle> ExportMaster(p11::Session &session, std::string_view label,
                            const StoreId &id, const p11::TokenUri &wrap_key,
                            const ExportOptions &options) {
  if (options.valid_for_s <= 0 || options.valid_for_s > kMaxBundleValidity) {
    return InvalidArgument(
        "a bundle's validity must be more than 0 and at "
        "most 7d");
  }
  Result<std::vector<Master>> masters = LoadMasters(session, label);
  if (!masters.ok()) return masters.status();
  const Master *master = FindMasterById(*masters, id);
  const std::string what =
      "master " + HexEncode(id) + " of \"" + std::string(label) + "\"";
  if (master == nullptr) {
    std::string ids;
    for (const Master &m : *masters)
      ids += (ids.empty() ? "" : ", ") + HexEncode(m.id);
    return NotFound(
        "no master " + HexEncode(id) + " in store \"" + std::string(label) +
        "\" (masters: " + (ids.empty() ? std::string("none") : ids) + ")");
  }
  // The bundle carries the link of the current epoch on this clock, never
  // an older one: an older link would hand the receiver the keys of
  // tickets this token has already forgotten (forward secrecy,
  // docs/SECURITY.md). Only links proven to follow the chain are sent: a
  // PIN holder may have planted a key of known value under a link's id.
  Master verified = *master;
  LinkTrust trust;
  std::atomic<unsigned> refused_lockdown{0};
  Status chain = trust.Verify(session, verified, nullptr, &refused_lockdown);
  if (!chain.ok()) return chain.WithContext("verifying the links of " + what);
  const uint64_t link_index =
      verified.LinkOf(EpochAt(options.now, verified.policy.period_s))
          .value_or(0);
  auto link_it = verified.links.find(link_index);
  if (link_it == verified.links.end()) {
    const std::string present =
        verified.links.empty()
            ? std::string("none")
            : std::to_string(verified.links.begin()->first) + ".." +
                  std::to_string(verified.links.rbegin()->first);
    return FailedPrecondition(
        what + ": the current epoch uses ratchet link " +
        std::to_string(link_index) + ", which is not in the token (links " +
        present +
        "); a server using the store derives it ahead of time, older "
        "links are never sent");
  }
  if (link_index > kMaxBundleLink) {
    return FailedPrecondition(what + " is at link " +
                              std::to_string(link_index) +
                              ", beyond what a bundle can name");
  }
  const CK_OBJECT_HANDLE link = link_it->second;
  // Proven, not merely unrefuted: Verify keeps a link it could not check
  // (token trouble) in use for servers, but an export signs what it sends.
  // The lowest link present has nothing below it to prove it by: the
  // anchor is trusted as a server trusts it (docs/SECURITY.md).
  if (link_index > verified.links.begin()->first && !trust.Trusted(link)) {
    return Unavailable(what + ": ratchet link " + std::to_string(link_index) +
                       " could not be shown to follow from link " +
                       std::to_string(link_index - 1) +
                       " (token trouble?); nothing exported, try again");
  }
  const std::string link_what =
      link_index == 0
          ? what
          : "ratchet link " + std::to_string(link_index) + " of " + what;
  // Read back rather than trust the policy text: the token decides.
  Result<bool> extractable = ReadFlag(session, link, CKA_EXTRACTABLE);
  if (!extractable.ok()) return extractable.status();
  if (!master->policy.replicable || !*extractable) {
    return FailedPrecondition(
        link_what +
        " is not replicable (it was provisioned without --replicable and is "
        "not extractable): it cannot leave this token; provision a "
        "--replicable master and export that one");
  }
  Result<bool> needs_trusted = ReadFlag(session, link, CKA_WRAP_WITH_TRUSTED);
  if (!needs_trusted.ok()) return needs_trusted.status();

  Result<std::vector<KeyRef>> candidates = FindKeys(
      session, wrap_key, {CKO_PUBLIC_KEY, CKO_SECRET_KEY}, "--wrap-key");
  if (!candidates.ok()) return candidates.status();
  std::vector<KeyRef> usable;
  std::string refused;
  for (const KeyRef &k : *candidates) {
    Result<bool> wrap = ReadFlag(session, k.handle, CKA_WRAP);
    if (!wrap.ok()) return wrap.status();
    if (*wrap) {
      usable.push_back(k);
    } else {
      refused = DescribeKey(k);
    }
  }
  if (usable.empty()) {
    return FailedPrecondition(refused + " has CKA_WRAP=FALSE: it cannot wrap");
  }
  if (usable.size() > 1) {
    return InvalidArgument("--wrap-key " + wrap_key.text + " matches " +
                           std::to_string(usable.size()) +
                           " wrapping keys; add id= to choose one");
  }
  const KeyRef &key = usable[0];
  WrapMechanism mechanism;
  if (key.cls == CKO_PUBLIC_KEY && key.type == CKK_RSA) {
    mechanism = WrapMechanism::kRsaOaepSha256;
  } else if (key.cls == CKO_SECRET_KEY && key.type == CKK_AES) {
    mechanism = WrapMechanism::kAesKeyWrapPad;
  } else {
    return Unsupported(DescribeKey(key) +
                       " is neither an RSA public key nor an AES key");
  }
  Result<bool> trusted = ReadFlag(session, key.handle, CKA_TRUSTED);
  if (!trusted.ok()) return trusted.status();
  if (*needs_trusted && !*trusted) {
    // The token refuses too (CKR_KEY_NOT_WRAPPABLE); say why first.
    return FailedPrecondition(
        what + " may only be wrapped by a trusted key, and " +
        DescribeKey(key) +
        " has CKA_TRUSTED=FALSE; the SO installs trusted keys with "
        "`hsmstek wrap-key trust`");
  }
  Status strong = CheckTransportKey(session, key, true);
  if (!strong.ok()) return strong;

  Result<std::array<uint8_t, kCheckValueSize>> check =
      ComputeCheckValue(session, link);
  if (!check.ok()) {
    return check.status().WithContext("check value of " + link_what);
  }
  Result<Bytes> wrapped = Wrap(session, mechanism, key.handle, link);
  if (!wrapped.ok() && mechanism == WrapMechanism::kRsaOaepSha256 &&
      RefusedOaepParams(wrapped.status())) {
    mechanism = WrapMechanism::kRsaOaepSha1;
    wrapped = Wrap(session, mechanism, key.handle, link);
  }
  if (!wrapped.ok()) {
    return wrapped.status().WithContext("wrapping " + link_what + " under " +
                                        DescribeKey(key));
  }
  Result<Bytes> key_id = BundleKeyId(session, key);
  if (!key_id.ok()) return key_id.status();
  if (key_id->empty()) {
    return FailedPrecondition(DescribeKey(key) +
                              " has no CKA_ID: the bundle must name its "
                              "recipient; give the transport key a CKA_ID");
  }
  if (key_id->size() > kMaxWrappingKeyIdSize) {
    return InvalidArgument(DescribeKey(key) + " has a CKA_ID longer than " +
                           std::to_string(kMaxWrappingKeyIdSize) + " bytes");
  }
  Bundle bundle;
  bundle.label = std::string(label);
  bundle.store_id = id;
  bundle.check = *check;
  bundle.link = link_index;
  bundle.mechanism = mechanism;
  bundle.wrapping_key_id = std::move(*key_id);
  bundle.policy = master->policy;
  bundle.wrapped = std::move(*wrapped);
  bundle.created = options.now;
  bundle.not_after = options.now + options.valid_for_s;
  Status signed_ok = SignBundle(session, options.signer, bundle);
  if (!signed_ok.ok()) return signed_ok;
  return bundle;
}

Status ImportMaster(p11::Session &session, std::string_view label,
                    const Bundle &bundle, const p11::TokenUri &unwrap_key,
                    const ImportOptions &options, bool *unchanged) {
  if (unchanged != nullptr) *unchanged = false;
  if (bundle.version != kBundleVersion) {
    return PermissionDenied(
        "unsigned bundle (version " + std::to_string(bundle.version) +
        "): import accepts only bundles signed by a pinned signer; export it "
        "again with `hsmstek export --signer` (nothing was imported)");
  }
  if (bundle.label != label) {
    return InvalidArgument("bundle is for label \"" + bundle.label +
                           "\", not \"" + std::string(label) + "\"");
  }
  const std::string id_hex = HexEncode(bundle.store_id);
  const bool rsa = bundle.mechanism != WrapMechanism::kAesKeyWrapPad;
  const CK_OBJECT_CLASS cls = rsa ? CKO_PRIVATE_KEY : CKO_SECRET_KEY;
  const CK_KEY_TYPE type = rsa ? CKK_RSA : CKK_AES;
  const std::string kind = rsa ? "RSA private key" : "AES key";
  Result<std::vector<KeyRef>> candidates =
      FindKeys(session, unwrap_key, {cls}, "--unwrap-key");
  if (!candidates.ok()) {
    return candidates.status().WithContext(
        "the bundle needs an " + kind + " (" +
        std::string(WrapMechanismName(bundle.mechanism)) + ")");
  }
  std::vector<KeyRef> usable;
  std::string refused;
  for (const KeyRef &k : *candidates) {
    if (k.type != type) {
      refused = DescribeKey(k) + " is not an " + kind + " (the bundle uses " +
                std::string(WrapMechanismName(bundle.mechanism)) + ")";
      continue;
    }
    Result<bool> unwrap = ReadFlag(session, k.handle, CKA_UNWRAP);
    if (!unwrap.ok()) return unwrap.status();
    if (!*unwrap) {
      refused = DescribeKey(k) + " has CKA_UNWRAP=FALSE: it cannot unwrap";
      continue;
    }
    usable.push_back(k);
  }
  if (usable.empty()) return FailedPrecondition(refused);
  if (usable.size() > 1) {
    return InvalidArgument("--unwrap-key " + unwrap_key.text + " matches " +
                           std::to_string(usable.size()) +
                           " unwrapping keys; add id= to choose one");
  }
  const KeyRef &key = usable[0];
  Status strong = CheckTransportKey(session, key, false);
  if (!strong.ok()) return strong;

  // Authenticity first: nothing below runs for a bundle a pinned signer
  // did not make exactly as it is.
  Status verified = VerifyBundleSignature(session, bundle);
  if (!verified.ok()) return verified;
  Result<Bytes> key_id = BundleKeyId(session, key);
  if (!key_id.ok()) return key_id.status();
  if (*key_id != bundle.wrapping_key_id) {
    return PermissionDenied("wrong recipient: the bundle is for key " +
                            HexEncode(bundle.wrapping_key_id) + ", but " +
                            DescribeKey(key) + " is key " + HexEncode(*key_id) +
                            "; nothing was imported");
  }
  if (options.now > bundle.not_after) {
    return PermissionDenied("stale bundle: it expired at " +
                            FormatRfc3339(bundle.not_after) +
                            " (an old bundle replayed, or too slow a "
                            "ceremony); export it again");
  }
  // Export caps the validity; import must too, or whoever held the sending
  // token's user PIN for a while could sign bundles that never expire.
  if (bundle.not_after < bundle.created ||
      bundle.not_after - bundle.created > kMaxBundleValidity) {
    return PermissionDenied(
        "bundle validity is longer than 7d (created " +
        FormatRfc3339(bundle.created) + ", not-after " +
        FormatRfc3339(bundle.not_after) +
        "): not made by `hsmstek export`; nothing was imported");
  }
  if (bundle.created > options.now + kBundleClockSkew) {
    return PermissionDenied("bundle was signed in the future (" +
                            FormatRfc3339(bundle.created) +
                            "): check the clocks of both hosts");
  }
  // Link j serves epochs from e0 + j * r on: that epoch must exist.
  const uint64_t e0 = EpochAt(bundle.policy.not_before, bundle.policy.period_s);
  const uint64_t r = RatchetPeriods(bundle.policy);
  if (bundle.link > kMaxBundleLink ||
      (r != 0 && bundle.link > (UINT64_MAX - e0) / r)) {
    return InvalidArgument("bundle link " + std::to_string(bundle.link) +
                           " is beyond the epochs of its policy");
  }
  // Before anything else about the token: an operator's expectation is
  // checked even when the link is already held ("nothing imported").
  if (options.expect_check &&
      !ConstantTimeEqual(*options.expect_check, bundle.check)) {
    return PermissionDenied("the bundle's check value " +
                            HexEncode(bundle.check) + " is not the expected " +
                            HexEncode(*options.expect_check) +
                            " (--expect-check); nothing was imported");
  }
  Result<std::vector<Master>> masters = LoadMasters(session, label);
  if (!masters.ok()) return masters.status();
  if (const Master *held = FindMasterById(*masters, bundle.store_id)) {
    // No rollback: a token that has ratcheted past the bundle's link
    // forgot those keys on purpose. The same link again changes nothing.
    const uint64_t top = held->links.empty() ? 0 : held->links.rbegin()->first;
    auto same = held->links.find(bundle.link);
    if (same != held->links.end()) {
      Result<std::array<uint8_t, kCheckValueSize>> have =
          ComputeCheckValue(session, same->second);
      if (!have.ok()) return have.status().WithContext("check value");
      if (ConstantTimeEqual(*have, bundle.check)) {
        if (unchanged != nullptr) *unchanged = true;
        return Status::Ok();
      }
      return PermissionDenied(
          "master " + id_hex + " of store \"" + std::string(label) +
          "\" holds a different key at link " + std::to_string(bundle.link) +
          " (check value " + HexEncode(*have) + ", bundle " +
          HexEncode(bundle.check) + "); nothing was imported");
    }
    if (!held->links.empty() && top > bundle.link) {
      return PermissionDenied(
          "rollback refused: master " + id_hex + " of store \"" +
          std::string(label) + "\" is already at ratchet link " +
          std::to_string(top) + ", later than the bundle's link " +
          std::to_string(bundle.link) + "; nothing was imported");
    }
    return AlreadyExists("replayed bundle: master " + id_hex +
                         " is already in store \"" + std::string(label) +
                         "\" (at link " + std::to_string(top) +
                         "; it derives later links itself)");
  }
  p11::Template record = ImportRecordQuery(label, bundle.store_id);
  Result<std::vector<CK_OBJECT_HANDLE>> records =
      p11::FindObjects(session, record);
  if (!records.ok()) return records.status();
  if (!records->empty()) {
    return AlreadyExists("replayed bundle: master " + id_hex +
                         " was imported into store \"" + std::string(label) +
                         "\" before (and since destroyed); a destroyed "
                         "master cannot come back");
  }

  // Unwrap as a session object first: nothing reaches the token's storage
  // before the check value has proved the key. SoftHSM 2.6 refuses
  // CKA_MODIFIABLE in an unwrap template (CKR_ATTRIBUTE_READ_ONLY); the copy
  // below sets it.
  // Link 0 is the master object (CKA_ID = store id); link j > 0 gets the
  // id the ratchet gives it (store id || j), so the store serves from it.
  const LinkId link_id = MakeLinkId(bundle.store_id, bundle.link);
  const ByteSpan object_id =
      bundle.link == 0 ? ByteSpan(bundle.store_id) : ByteSpan(link_id);
  const std::string what = bundle.link == 0
                               ? "master " + id_hex
                               : "ratchet link " + std::to_string(bundle.link) +
                                     " of master " + id_hex;
  KeySpec spec{KeyKind::kMaster, label, object_id, bundle.policy.replicable,
               /*for_unwrap=*/true};
  OaepParams p;
  MechanismFor(bundle.mechanism, p);
  Bytes wrapped = bundle.wrapped;  // C_UnwrapKey takes a non-const pointer
  std::atomic<unsigned> refused_lockdown{0};
  Result<CreatedKey> created = CreateKey(
      spec,
      [&](p11::Template &master, CK_OBJECT_HANDLE *out) {
        p11::Template t;
        for (const CK_ATTRIBUTE &a : master.attributes()) {
          if (a.type == CKA_TOKEN) {
            t.Bool(CKA_TOKEN, false);
            continue;
          }
          t.Data(a.type, ByteSpan(static_cast<const uint8_t *>(a.pValue),
                                  static_cast<size_t>(a.ulValueLen)));
        }
        // Our unwrap keys pin CKA_WRAP_WITH_TRUSTED (UnwrapTemplate); for a
        // non-extractable master it changes nothing.
        if (!bundle.policy.replicable) t.Bool(CKA_WRAP_WITH_TRUSTED, true);
        return P11_CALL(session, C_UnwrapKey, session.handle(), &p.mechanism,
                        key.handle, wrapped.data(),
                        static_cast<CK_ULONG>(wrapped.size()), t.data(),
                        t.size(), out);
      },
      &refused_lockdown);
  if (!created.ok()) {
    return created.status().WithContext(
        "unwrapping " + what + " with " + DescribeKey(key) +
        " (a damaged bundle, or one wrapped for another key)");
  }
  CK_OBJECT_HANDLE unwrapped = created->handle;
  p11::ScopedObject session_copy(session, unwrapped);
  // SoftHSM 2.6 leaves behind the half-made session object of an unwrap
  // whose template it refused (CKA_DERIVE_TEMPLATE): with the link's label
  // and id it would make the store skip the master as weak. Session
  // objects only, so no other process's key is touched.
  {
    p11::Template stray;
    stray.Ulong(CKA_CLASS, CKO_SECRET_KEY)
        .Bool(CKA_TOKEN, false)
        .String(CKA_LABEL, label)
        .Data(CKA_ID, object_id);
    Result<std::vector<CK_OBJECT_HANDLE>> found =
        p11::FindObjects(session, stray);
    if (!found.ok()) return found.status();
    for (CK_OBJECT_HANDLE h : *found) {
      if (h != unwrapped) p11::ScopedObject discard(session, h);
    }
  }

  Result<std::array<uint8_t, kCheckValueSize>> check =
      ComputeCheckValue(session, unwrapped);
  if (!check.ok()) return check.status().WithContext("check value");
  if (!ConstantTimeEqual(*check, bundle.check)) {
    return InvalidArgument("check value mismatch: the bundle says " +
                           HexEncode(bundle.check) +
                           ", the unwrapped key gives " + HexEncode(*check) +
                           "; nothing was imported");
  }

  p11::Template persist;
  persist.Bool(CKA_TOKEN, true).Bool(CKA_MODIFIABLE, false);
  CK_OBJECT_HANDLE stored = CK_INVALID_HANDLE;
  Status s = P11_CALL(session, C_CopyObject, session.handle(), unwrapped,
                      persist.data(), persist.size(), &stored);
  if (!s.ok()) return s.WithContext("storing " + what);
  p11::ScopedObject stored_owner(session, stored);
  Result<Protections> attrs =
      VerifyKey(session, stored, spec, "imported " + what, created->lockdown);
  if (!attrs.ok()) return attrs.status();
  Result<CK_OBJECT_HANDLE> policy =
      StorePolicyObject(session, label, bundle.store_id, bundle.policy);
  if (!policy.ok()) return policy.status();
  p11::ScopedObject policy_owner(session, *policy);
  Result<CK_OBJECT_HANDLE> recorded = StoreImportRecord(session, label, bundle);
  if (!recorded.ok()) return recorded.status();
  policy_owner.Release();
  stored_owner.Release();
  return Status::Ok();
}

}  // namespace hsmstek::keystore
