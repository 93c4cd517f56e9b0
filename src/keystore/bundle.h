// The export/import bundle (SPEC §8): one master wrapped for another token,
// with its policy and check value, as a small versioned text file.
//
// Format, version 1 (strict: lines in exactly this order, each ending with
// "\n", printable ASCII only, no CR, at most kMaxBundleSize bytes):
//
//   hsmstek-bundle 1
//   label <store label, percent-encoded>
//   store-id <16 hex digits>            the master's CKA_ID
//   check <16 hex digits>               the master's check value (SPEC §4)
//   mechanism rsa-oaep-sha1|rsa-oaep-sha256|aes-key-wrap-pad
//   wrapping-key-id <hex CKA_ID of the wrapping key, or "-" for none>
//   policy <base64 of the policy text, see policy.h>
//   wrapped <base64 of the wrapped key bytes, 1 to 4096 bytes>
//   sha256 <64 hex digits: SHA-256 of every preceding byte>
//
// The label is percent-encoded: every byte outside 0x21..0x7e, and '%'
// itself, is written as %XX (upper-case hex); 1 to 255 bytes once decoded.
// Base64 is RFC 4648 §4 with padding, canonical, on one line.
//
// WARNING: the sha256 line detects corruption and truncation only; anyone
// who edits the file can recompute it. Authenticity comes from the check
// value, which the importer recomputes in the token after unwrapping and
// compares with the `check` line before it keeps the key (src/keystore).
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

inline constexpr char kBundleHeader[] = "hsmstek-bundle 1";
inline constexpr size_t kMaxBundleSize = 16384;
inline constexpr size_t kMaxBundleLabelSize = 255;
inline constexpr size_t kMaxWrappingKeyIdSize = 255;
inline constexpr size_t kMaxWrappedKeySize = 4096;

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
  std::string label;  // raw bytes of CKA_LABEL
  StoreId store_id{};
  std::array<uint8_t, kCheckValueSize> check{};
  WrapMechanism mechanism = WrapMechanism::kRsaOaepSha1;
  Bytes wrapping_key_id;  // CKA_ID of the wrapping key; may be empty
  Policy policy;
  Bytes wrapped;  // the key wrapped under `mechanism` (not secret)

  bool operator==(const Bundle &) const = default;
};

// SerializeBundle returns the version-1 text of `bundle`, sha256 line
// included. For a bundle whose fields are within the limits above and
// whose policy passes ValidatePolicy, ParseBundle(SerializeBundle(b)) == b.
std::string SerializeBundle(const Bundle &bundle);

// ParseBundle checks the header, then the digest ("bundle digest mismatch";
// a file cut short is "... truncated ..."), then every line in order, and
// parses the policy with ParsePolicy. All errors are kInvalidArgument;
// field errors name the line: "bundle line 4 (check): ...".
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
