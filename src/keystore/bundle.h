// The export/import bundle (docs/CLI.md): one master wrapped for another token,
// with its policy and check value, as a small versioned text file.
//
// Version 2 (written by this build; strict: lines in exactly this order,
// each ending with "\n", printable ASCII only, no CR, at most
// kMaxBundleSize bytes, and byte for byte what SerializeBundle writes, so
// the signed bytes are exactly the bytes of the parsed fields):
//
//   hsmstek-bundle 2
//   label <store label, percent-encoded>
//   store-id <16 hex digits>            the master's CKA_ID
//   check <16 hex digits>               the check value of the link sent
//                                       (docs/FORMAT.md)
//   link <decimal>                      the ratchet link sent, 1 to
//                                       kMaxBundleLink, canonical decimal
//                                       (no sign, no leading zero); absent
//                                       means link 0, the master object
//   mechanism rsa-oaep-sha1|rsa-oaep-sha256|aes-key-wrap-pad
//   recipient <hex>                     the receiving token's unwrap key:
//                                       RSA: SHA-256 of its public key's
//                                       SubjectPublicKeyInfo; AES: its CKA_ID
//   policy <base64 of the policy text, see policy.h>
//   wrapped <base64 of the wrapped key bytes, 1 to 4096 bytes>
//   created <RFC 3339 UTC>              when the sending token signed it
//   not-after <RFC 3339 UTC>            import refuses it after this time
//   signer <64 hex digits>              SHA-256 of the signer's public key
//                                       (SubjectPublicKeyInfo DER)
//   signature <128 hex digits>          ECDSA P-256 r || s (32 bytes each)
//                                       over SHA-256 of every preceding byte
//
// The signature is made in the sending token with a key that never leaves
// it and is checked against a signer the receiving token's SO pinned
// (bundle_signing.h); this file only parses and writes the text.
//
// Version 1 (read only, so that import can say "unsigned"): the same first
// five lines, then "wrapping-key-id <hex or ->", policy, wrapped and
// "sha256 <64 hex digits of every preceding byte>". Its digest detects
// corruption only: anyone can recompute it.
//
// The label is percent-encoded: every byte outside 0x21..0x7e, and '%'
// itself, is written as %XX (upper-case hex); 1 to 255 bytes once decoded.
// Base64 is RFC 4648 §4 with padding, canonical, on one line.
// Pure functions, thread-safe.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include "common/bytes.h"
#include "common/status.h"
#include "keystore/key_name.h"
#include "keystore/policy.h"

namespace hsmstek::keystore {

inline constexpr char kBundleHeaderV1[] = "hsmstek-bundle 1";
inline constexpr char kBundleHeader[] = "hsmstek-bundle 2";
inline constexpr int kBundleVersion = 2;
inline constexpr size_t kSignerIdSize = 32;         // SHA-256
inline constexpr size_t kBundleSignatureSize = 64;  // P-256 r || s
inline constexpr size_t kMaxBundleSize = 16384;
inline constexpr size_t kMaxBundleLabelSize = 255;
inline constexpr size_t kMaxWrappingKeyIdSize = 255;
inline constexpr size_t kMaxWrappedKeySize = 4096;
// The highest link index a bundle may name: far beyond any real chain
// (2^48 ratchet intervals), low enough that e0 + j * r stays in range.
inline constexpr uint64_t kMaxBundleLink = uint64_t{1} << 48;

// How the master is wrapped. SoftHSM 2.6 wraps RSA-OAEP with SHA-1 only.
enum class WrapMechanism {
  kRsaOaepSha1,    // CKM_RSA_PKCS_OAEP, SHA-1, MGF1-SHA1
  kRsaOaepSha256,  // CKM_RSA_PKCS_OAEP, SHA-256, MGF1-SHA256
  kAesKeyWrapPad,  // CKM_AES_KEY_WRAP_PAD (RFC 5649)
};

// WrapMechanismName returns "rsa-oaep-sha1", "rsa-oaep-sha256" or
// "aes-key-wrap-pad".
std::string_view WrapMechanismName(WrapMechanism mechanism);
// ParseWrapMechanism is the inverse of WrapMechanismName; any other text is
// kInvalidArgument.
Result<WrapMechanism> ParseWrapMechanism(std::string_view name);

struct Bundle {
  int version = kBundleVersion;  // 1 (unsigned, read only) or 2
  std::string label;             // raw bytes of CKA_LABEL
  StoreId store_id{};
  std::array<uint8_t, kCheckValueSize> check{};  // of link `link`
  // The ratchet link wrapped (version 2; 0 = the master object, no line).
  uint64_t link = 0;
  WrapMechanism mechanism = WrapMechanism::kRsaOaepSha1;
  // The recipient: the unwrap key the master was wrapped for (RSA: public
  // key fingerprint; AES: CKA_ID). Version 1 may leave it empty.
  Bytes wrapping_key_id;
  Policy policy;
  Bytes wrapped;  // the key wrapped under `mechanism` (not secret)
  // Version 2 only.
  int64_t created = 0;    // Unix seconds
  int64_t not_after = 0;  // Unix seconds
  Bytes signer;           // kSignerIdSize bytes
  Bytes signature;        // kBundleSignatureSize bytes

  bool operator==(const Bundle &) const = default;
};

// BundleSignedText returns the bytes a version-2 signature covers: the text
// of `bundle` through its signer line.
std::string BundleSignedText(const Bundle &bundle);

// SerializeBundle returns the text of `bundle` in its version: version 2
// is BundleSignedText plus the signature line, version 1 ends with its
// sha256 line. For a bundle whose fields are within the limits above and
// whose policy passes ValidatePolicy, ParseBundle(SerializeBundle(b)) == b.
std::string SerializeBundle(const Bundle &bundle);

// ParseBundle checks the header; for version 1 the digest ("bundle digest
// mismatch"; a file cut short is "... truncated ..."), for version 2 the
// signature line's form; then every line in order, and parses the policy
// with ParsePolicy. A version-2 text that is not exactly
// SerializeBundle(result) is refused ("not in canonical form"). It does
// NOT verify the signature (bundle_signing.h does, in the token). All
// errors are kInvalidArgument; field errors name the line:
// "bundle line 4 (check): ...".
Result<Bundle> ParseBundle(std::string_view text);

// Base64Encode returns the RFC 4648 §4 encoding of `data`, with padding.
std::string Base64Encode(ByteSpan data);

// Base64Decode decodes canonical RFC 4648 §4 base64 with padding, nothing
// else (no whitespace, no line breaks, no URL alphabet, zero bits after the
// last byte). The result is a SecretBuffer because callers decode key
// material with it (legacy_file.h); it is wiped when it dies. Errors are
// kInvalidArgument and never quote the input.
Result<SecretBuffer> Base64Decode(std::string_view text);

}  // namespace hsmstek::keystore
