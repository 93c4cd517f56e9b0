// Replication of masters between tokens (docs/SECURITY.md §5): wrapping keys,
// export to a bundle (bundle.h) and import from one. Nothing here ever sees a
// key value: the master leaves the sending token only wrapped (C_WrapKey) and
// enters the receiving token only through C_UnwrapKey.
//
// Two transports:
//  - RSA-OAEP: the receiving token generates an RSA key pair whose private
//    key can only unwrap (GenerateUnwrapKeyPair); its public key travels as
//    PEM to the sending token, where the SO installs it with CKA_TRUSTED
//    (InstallTrustedWrapKey). A --replicable master carries
//    CKA_WRAP_WITH_TRUSTED, so the token itself refuses to wrap it under any
//    other key (SoftHSM 2.6: CKR_KEY_NOT_WRAPPABLE). OAEP uses SHA-256 with
//    MGF1-SHA256 where the token accepts it for wrapping, else SHA-1 with
//    MGF1-SHA1 (SoftHSM 2.6 accepts only SHA-1 and answers
//    CKR_ARGUMENTS_BAD to SHA-256); the bundle records which.
//  - AES key wrap with padding (CKM_AES_KEY_WRAP_PAD, RFC 5649) under an AES
//    transport key that both tokens hold (trusted on the sending side).
//
// The bundle's recipient (Bundle::wrapping_key_id) is, for RSA, the key's
// fingerprint (SHA-256 of its SubjectPublicKeyInfo DER, computed from the
// public CKA_MODULUS / CKA_PUBLIC_EXPONENT), which InstallTrustedWrapKey
// also uses as the CKA_ID; for AES it is the transport key's CKA_ID. Every
// bundle is signed in the sending token and verified before import
// (signing.h).
//
// Thread-safety: the functions are reentrant; a Session is used by one
// thread at a time (see token.h).
#pragma once

#include <array>
#include <optional>
#include <string>
#include <string_view>

#include "common/bytes.h"
#include "common/status.h"
#include "keystore/bundle.h"
#include "keystore/key_name.h"
#include "pkcs11/token.h"
#include "pkcs11/uri.h"

namespace hsmstek::keystore {

// Size of the RSA key pairs GenerateUnwrapKeyPair creates, and the smallest
// public key InstallTrustedWrapKey accepts.
inline constexpr unsigned long kUnwrapKeyBits = 3072;
inline constexpr unsigned long kMinWrapKeyBits = 2048;
// Size limit of a PEM public key file.
inline constexpr size_t kMaxPemSize = 16384;

// The public half of an RSA wrapping key (public values, not secret).
struct RsaPublicKey {
  Bytes modulus;   // big-endian, no leading zero bytes
  Bytes exponent;  // big-endian, no leading zero bytes
};

// RsaPublicKeyToPem returns `key` as a PEM "PUBLIC KEY" (SubjectPublicKeyInfo)
// built with OpenSSL. kInvalidArgument if OpenSSL refuses the values.
[[nodiscard]] Result<std::string> RsaPublicKeyToPem(const RsaPublicKey &key);

// RsaPublicKeyFromPem parses a PEM "PUBLIC KEY". Refused (kInvalidArgument):
// no PEM public key, a key that is not RSA, or one shorter than
// kMinWrapKeyBits.
[[nodiscard]] Result<RsaPublicKey> RsaPublicKeyFromPem(std::string_view pem);

// RsaFingerprint returns SHA-256 of the key's SubjectPublicKeyInfo DER
// (32 bytes): what `openssl pkey -pubin -outform DER | sha256sum` prints.
[[nodiscard]] Result<Bytes> RsaFingerprint(const RsaPublicKey &key);

struct UnwrapKeyPair {
  Bytes id;           // CKA_ID of the private key (random, 16 bytes)
  Bytes fingerprint;  // RsaFingerprint of the public key
  std::string pem;    // the public key, to be carried to the sending token
  // Whether the token took CKA_UNWRAP_TEMPLATE (see GenerateUnwrapKeyPair).
  bool unwrap_template = false;
};

// GenerateUnwrapKeyPair creates, in the receiving token, an RSA-3072 private
// key labelled `label` that can only unwrap: CKA_UNWRAP=TRUE, every other
// usage FALSE, sensitive, never extractable, not modifiable and not
// copyable (a modifiable or copyable unwrap key could be given CKA_DECRYPT
// and reveal the masters it receives). Its CKA_UNWRAP_TEMPLATE makes the
// token force docs/FORMAT.md master attributes (sensitive, derive-only,
// CKA_WRAP_WITH_TRUSTED) on whatever it unwraps, so the user PIN alone
// cannot unwrap a bundle into a readable key; a token without that
// attribute gets the key pair without it and `unwrap_template` false. The
// public key is a session object, destroyed before returning: only its PEM
// leaves. Refuses
// (kAlreadyExists) a label that already names a private key. Reads the
// private key's boolean attributes back and refuses (kPermissionDenied, the
// new key destroyed) one weaker than requested. `session` must be
// read/write and logged in as the user.
[[nodiscard]] Result<UnwrapKeyPair> GenerateUnwrapKeyPair(
    p11::Session &session, std::string_view label);

// InstallTrustedWrapKey stores `key` in the sending token as a public key
// object labelled `label`, CKA_ID = its fingerprint, CKA_WRAP=TRUE and
// CKA_TRUSTED=TRUE (only the SO may set it: `session` must be read/write
// and logged in as the SO), every other usage FALSE, public, not
// modifiable. Refuses (kAlreadyExists) a key with that fingerprint already
// present, and (kInvalidArgument) a key shorter than kMinWrapKeyBits.
// Returns the fingerprint.
[[nodiscard]] Result<Bytes> InstallTrustedWrapKey(p11::Session &session,
                                                  std::string_view label,
                                                  const RsaPublicKey &key);

// ExportMaster wraps the link of master `id` of store `label` that serves
// the epoch of `options.now` (link j; the master object itself while j is
// 0), after proving the links present follow the chain, under the key that
// `wrap_key` names in the session's token (its object attributes: object=,
// id=, type=; token attributes, if any, must match that token) and returns
// the version-2 bundle: label, store id, check value of link j, link j,
// mechanism, recipient
// (the wrapping key's id), policy, wrapped bytes, created / not-after, all
// signed in the token by `options.signer` (SignBundle). The wrapping key is
// read back and refused (kPermissionDenied) unless wrap-only and, if
// secret, sensitive, never extractable, unable to unwrap, and neither
// modifiable nor copyable. Errors: kNotFound (no such master,
// no such wrapping key), kFailedPrecondition (master not replicable or not
// extractable; link j not in the token; a wrapping key without CKA_WRAP, or
// untrusted while the master requires a trusted one), kUnsupported (a wrapping
// key that is neither RSA nor AES), token errors naming the CKR. How long a
// bundle may wait before import (its not-after line), and the clock difference
// tolerated between the two hosts.
inline constexpr int64_t kDefaultBundleValidity = 24 * 3600;
inline constexpr int64_t kMaxBundleValidity = 7 * 24 * 3600;
inline constexpr int64_t kBundleClockSkew = 300;

struct ExportOptions {
  p11::TokenUri signer;  // the signing key in the sending token (signing.h)
  int64_t now = 0;       // Unix seconds: the bundle's created line
  int64_t valid_for_s = kDefaultBundleValidity;  // 1 s .. kMaxBundleValidity
};

[[nodiscard]] Result<Bundle> ExportMaster(p11::Session &session,
                                          std::string_view label,
                                          const StoreId &id,
                                          const p11::TokenUri &wrap_key,
                                          const ExportOptions &options);

// ImportMaster unwraps `bundle` into store `label` of the session's token
// with the key `unwrap_key` names (an RSA private key or AES secret key
// with CKA_UNWRAP, in the session's token) and stores its policy.
// Before anything is unwrapped, in this order, each refusal saying which
// (kPermissionDenied unless noted): a version-1 bundle ("unsigned"); a
// label mismatch (kInvalidArgument); an unwrap key weaker than unwrap
// only, sensitive, neither modifiable nor copyable, with a
// CKA_UNWRAP_TEMPLATE forcing CKA_SENSITIVE=TRUE (where the token knows
// the attribute); a signer not pinned in this token ("unknown
// signer"); a signature that does not verify ("altered"); a recipient that
// is not this unwrap key ("wrong recipient"); an expired bundle ("stale");
// one valid for longer than kMaxBundleValidity ("validity is longer");
// a store id present now (see "Across ratchet steps" below) or imported
// before ("replayed", kAlreadyExists:
// an import record, kept even after `destroy`, remembers every import);
// a check value other than `options.expect_check`.
// All-or-nothing: the key is unwrapped as a session object first, its check
// value is recomputed in the token and compared (constant time) with the
// bundle's; only then is it copied to a token object (CKA_MODIFIABLE=FALSE,
// which SoftHSM 2.6 refuses in an unwrap template), its attributes are
// verified (VerifyMasterAttributes) and the policy object is created; any
// failure destroys what was created. Errors: kInvalidArgument (label
// mismatch "bundle is for label ...", check value mismatch), kAlreadyExists
// (store id present), kNotFound / kFailedPrecondition (unwrap key missing,
// ambiguous, without CKA_UNWRAP, of the wrong type, or not the key the
// bundle was wrapped for), token errors naming the CKR.
struct ImportOptions {
  int64_t now = 0;  // Unix seconds, against the bundle's validity
  // --expect-check: the check value confirmed out of band.
  std::optional<std::array<uint8_t, kCheckValueSize>> expect_check;
};

// Across ratchet steps (bundle.link = j): the key is stored as link j
// (CKA_ID = store id || j). For a master already in the store: link j
// held with the same check value is success without change (`*unchanged`
// set when given); a newer link held refuses the bundle (kPermissionDenied,
// "rollback refused"); link j held with another check value is refused
// (kPermissionDenied); only older links held is a replay (kAlreadyExists).
[[nodiscard]] Status ImportMaster(p11::Session &session, std::string_view label,
                                  const Bundle &bundle,
                                  const p11::TokenUri &unwrap_key,
                                  const ImportOptions &options,
                                  bool *unchanged = nullptr);

}  // namespace hsmstek::keystore
