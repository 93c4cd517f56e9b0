// Legacy session-ticket key files from nginx and HAProxy (docs/FORMAT.md "Legacy
// keys"), parsed so their keys can be imported into the token as
// decrypt-only objects. The parsed bytes live in SecretBuffers (wiped when
// they die); error messages never contain key bytes or file contents.
//
// nginx (ssl_session_ticket_key): raw bytes, one key per file, exactly
//   48 bytes: name (16) || AES-128 key (16) || HMAC key (16), or
//   80 bytes: name (16) || HMAC key (32) || AES-256 key (32)  <- note order.
// HAProxy (tls-ticket-keys): text, one base64 line per key; blank lines and
// lines starting with '#' are skipped, trailing spaces, tabs and CR are
// tolerated. Each line decodes to
//   48 bytes: name (16) || AES-128 key (16) || HMAC key (16), or
//   80 bytes: name (16) || AES-256 key (32) || HMAC key (32).
//
// Refused (kInvalidArgument): an empty file or one without keys, another
// size, bad base64 (the line number is given), a name that is all zeros, an
// AES or HMAC key that is one byte value repeated (all zeros included), an
// AES key equal to its HMAC key, two keys with the same name, and files
// larger than kMaxLegacyKeyFileSize. Pure functions, thread-safe.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>
#include <vector>

#include "common/bytes.h"
#include "common/status.h"

namespace hsmstek::keystore {

inline constexpr size_t kMaxLegacyKeyFileSize = 65536;

enum class LegacyFormat { kNginx, kHaproxy };

// ParseLegacyFormat maps "nginx" and "haproxy" to a LegacyFormat; anything
// else is kInvalidArgument.
Result<LegacyFormat> ParseLegacyFormat(std::string_view name);
// LegacyFormatName returns "nginx" or "haproxy".
std::string_view LegacyFormatName(LegacyFormat format);

struct LegacyKey {
  std::array<uint8_t, 16> name{};  // public: the ticket key_name
  SecretBuffer aes_key;            // 16 (AES-128) or 32 (AES-256) bytes
  SecretBuffer hmac_key;           // 16 or 32 bytes, HMAC-SHA256 key
};

// ParseLegacyKeyFile returns the keys of `file_contents` in file order, or
// the first problem found. The caller keeps ownership of `file_contents`
// and should wipe it after the call; nothing else is left behind.
Result<std::vector<LegacyKey>> ParseLegacyKeyFile(LegacyFormat format,
                                                  ByteSpan file_contents);

}  // namespace hsmstek::keystore
