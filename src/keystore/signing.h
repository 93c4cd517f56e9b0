// Bundles authenticated by the token that sent them (docs/SECURITY.md §5).
//
// A check value or a digest authenticates nothing: the receiver's wrapping
// public key is public, so anyone can wrap a key of their choice for it and
// compute its check value. The sending token therefore signs every bundle
// with an ECDSA P-256 key that never leaves it, and the receiving token's
// SO pins that signer's public key once per token pair (CKA_TRUSTED=TRUE,
// which only the SO can set: SoftHSM 2.6 answers CKR_ATTRIBUTE_READ_ONLY
// to a user who sets it on create, copy or C_SetAttributeValue). Import
// verifies the signature with C_Verify on that pinned object before it
// unwraps anything.
//
// Mechanism: CKM_ECDSA over a SHA-256 digest computed here (the signed
// text is public). SoftHSM 2.6.1 offers CKM_ECDSA but not
// CKM_ECDSA_SHA256, and plain CKM_ECDSA on P-256 is what nearly every HSM
// implements; the signature is r || s, 32 bytes each (PKCS#11 form).
//
// A signer is named by its fingerprint: SHA-256 of its public key's
// SubjectPublicKeyInfo DER (the bundle's signer line; the CKA_ID of the
// pinned public key in the receiving token). In the sending token both
// halves share a random CKA_ID; the public half stays there (a private EC
// key carries no public point) so export can compute the fingerprint.
//
// Thread-safety: reentrant; a Session is used by one thread at a time.
#pragma once

#include <string>
#include <string_view>

#include "common/bytes.h"
#include "common/status.h"
#include "keystore/bundle.h"
#include "pkcs11/token.h"
#include "pkcs11/uri.h"

namespace hsmstek::keystore {

// An EC P-256 public key: the uncompressed point (0x04 || x || y).
struct EcPublicKey {
  Bytes point;
};

// EcPublicKeyToPem returns `key` as a PEM "PUBLIC KEY".
[[nodiscard]] Result<std::string> EcPublicKeyToPem(const EcPublicKey &key);

// EcPublicKeyFromPem parses a PEM "PUBLIC KEY"; anything but an EC key on
// P-256 (prime256v1) is kInvalidArgument.
[[nodiscard]] Result<EcPublicKey> EcPublicKeyFromPem(std::string_view pem);

// EcFingerprint returns SHA-256 of the key's SubjectPublicKeyInfo DER.
[[nodiscard]] Result<Bytes> EcFingerprint(const EcPublicKey &key);

inline constexpr size_t kSigningKeyIdSize = 16;

struct SigningKeyPair {
  Bytes id;           // CKA_ID of both halves (random)
  Bytes fingerprint;  // EcFingerprint of the public key
  std::string pem;    // the public key, for the receiving token's SO
};

// GenerateSigningKeyPair creates, in the sending token, a P-256 private key
// labelled `label` that can only sign: CKA_SIGN=TRUE, every other usage
// FALSE, sensitive, never extractable, not modifiable, not copyable. The
// public half is a public token object (verify only, not modifiable) with
// the same random CKA_ID; its PEM leaves for the receiver's SO. Refuses
// (kAlreadyExists) a label that already names a private key; reads the
// new key back and refuses (kPermissionDenied, key destroyed) a weaker
// one. `session`: read/write, logged in as the user.
[[nodiscard]] Result<SigningKeyPair> GenerateSigningKeyPair(
    p11::Session &session, std::string_view label);

// InstallTrustedSigner pins `key` in the receiving token as a public key
// object labelled `label`: CKA_ID = its fingerprint, CKA_VERIFY=TRUE,
// CKA_TRUSTED=TRUE, every other usage FALSE, public, neither modifiable
// nor copyable. `session` must be read/write and logged in as the SO.
// Refuses (kAlreadyExists) a fingerprint or label already present. Reads
// the object back. Returns the fingerprint.
[[nodiscard]] Result<Bytes> InstallTrustedSigner(p11::Session &session,
                                                 std::string_view label,
                                                 const EcPublicKey &key);

// SignBundle sets `bundle.signer` and `bundle.signature` (version 2) with
// the private key `signer` names in the session's token (object=, id=).
// The key is read back first and refused (kPermissionDenied) if weaker
// than GenerateSigningKeyPair makes it (including CKA_LOCAL,
// CKA_ALWAYS_SENSITIVE and CKA_NEVER_EXTRACTABLE: generated in the token,
// never readable); the signer line is the fingerprint
// of the public key with the same CKA_ID, and the new signature is checked
// with it (C_Verify) before returning.
[[nodiscard]] Status SignBundle(p11::Session &session,
                                const p11::TokenUri &signer, Bundle &bundle);

// VerifyBundleSignature checks a version-2 `bundle` against the signers
// pinned in the session's token. kPermissionDenied, naming which: "unknown
// signer" (no trusted public key with that fingerprint; a public key the
// user installed is not trusted), "bundle signature is invalid" (any byte
// changed after signing). Reads nothing secret and changes nothing.
[[nodiscard]] Status VerifyBundleSignature(p11::Session &session,
                                           const Bundle &bundle);

}  // namespace hsmstek::keystore
