#include "keystore/legacy_file.h"

#include <openssl/crypto.h>

#include <algorithm>
#include <string>

#include "keystore/bundle.h"

namespace hsmstek::keystore {
namespace {

constexpr size_t kNameSize = 16;
constexpr size_t kSmallSize = 48;  // name || 16 || 16
constexpr size_t kLargeSize = 80;  // name || 32 || 32

// Returns true when every byte of `key` equals the first one.
bool IsRepeatedByte(ByteSpan key) {
  uint8_t diff = 0;
  for (uint8_t b : key) diff |= static_cast<uint8_t>(b ^ key[0]);
  return diff == 0;
}

Status CheckSecret(ByteSpan key, std::string_view what,
                   const std::string &where) {
  if (!IsRepeatedByte(key)) return Status::Ok();
  if (key[0] == 0)
    return InvalidArgument(where + ": " + std::string(what) +
                           " key is all zeros");
  return InvalidArgument(where + ": " + std::string(what) +
                         " key is a single repeated byte");
}

// Splits one decoded key record. `hmac_first` selects nginx's 80-byte
// order. `where` names the record in messages.
Result<LegacyKey> SplitKey(ByteSpan record, bool hmac_first,
                           const std::string &where) {
  const size_t half = (record.size() - kNameSize) / 2;
  LegacyKey key;
  std::copy_n(record.begin(), kNameSize, key.name.begin());
  const uint8_t *first = record.data() + kNameSize;
  const uint8_t *second = first + half;
  key.aes_key = SecretBuffer(hmac_first ? second : first, half);
  key.hmac_key = SecretBuffer(hmac_first ? first : second, half);

  bool zero_name = true;
  for (uint8_t b : key.name) zero_name = zero_name && b == 0;
  if (zero_name) return InvalidArgument(where + ": key name is all zeros");
  Status s = CheckSecret(key.aes_key.span(), "AES", where);
  if (!s.ok()) return s;
  s = CheckSecret(key.hmac_key.span(), "HMAC", where);
  if (!s.ok()) return s;
  if (CRYPTO_memcmp(key.aes_key.data(), key.hmac_key.data(), half) == 0) {
    return InvalidArgument(where + ": AES key and HMAC key are identical");
  }
  return key;
}

Result<std::vector<LegacyKey>> ParseNginx(ByteSpan data) {
  if (data.empty()) return InvalidArgument("nginx key file is empty");
  if (data.size() != kSmallSize && data.size() != kLargeSize) {
    return InvalidArgument(
        "nginx key file is " + std::to_string(data.size()) +
        " bytes; expected 48 (name, AES-128, HMAC) or 80 (name, HMAC, "
        "AES-256)");
  }
  Result<LegacyKey> key = SplitKey(
      data, /*hmac_first=*/data.size() == kLargeSize, "nginx key file");
  if (!key.ok()) return key.status();
  std::vector<LegacyKey> keys;
  keys.push_back(std::move(*key));
  return keys;
}

Result<std::vector<LegacyKey>> ParseHaproxy(ByteSpan data) {
  const std::string_view text(reinterpret_cast<const char *>(data.data()),
                              data.size());
  std::vector<LegacyKey> keys;
  std::vector<size_t> key_lines;  // line number of each key, for messages
  size_t line_no = 0;
  size_t start = 0;
  while (start < text.size()) {
    ++line_no;
    size_t nl = text.find('\n', start);
    if (nl == std::string_view::npos) nl = text.size();
    std::string_view line = text.substr(start, nl - start);
    start = nl + 1;
    while (!line.empty() &&
           (line.back() == ' ' || line.back() == '\t' || line.back() == '\r')) {
      line.remove_suffix(1);
    }
    if (line.empty() || line[0] == '#') continue;

    const std::string where =
        "haproxy key file line " + std::to_string(line_no);
    Result<SecretBuffer> record = Base64Decode(line);
    if (!record.ok()) return record.status().WithContext(where);
    if (record->size() != kSmallSize && record->size() != kLargeSize) {
      return InvalidArgument(where + ": key is " +
                             std::to_string(record->size()) +
                             " bytes; expected 48 (name, AES-128, HMAC) or "
                             "80 (name, AES-256, HMAC)");
    }
    Result<LegacyKey> key =
        SplitKey(record->span(), /*hmac_first=*/false, where);
    if (!key.ok()) return key.status();
    for (size_t i = 0; i < keys.size(); ++i) {
      if (keys[i].name == key->name) {
        return InvalidArgument(where + ": duplicate key name (also on line " +
                               std::to_string(key_lines[i]) + ")");
      }
    }
    keys.push_back(std::move(*key));
    key_lines.push_back(line_no);
  }
  if (keys.empty()) return InvalidArgument("haproxy key file has no keys");
  return keys;
}

}  // namespace

Result<LegacyFormat> ParseLegacyFormat(std::string_view name) {
  if (name == "nginx") return LegacyFormat::kNginx;
  if (name == "haproxy") return LegacyFormat::kHaproxy;
  return InvalidArgument(
      "unknown legacy key file format (expected nginx or haproxy)");
}

std::string_view LegacyFormatName(LegacyFormat format) {
  switch (format) {
    case LegacyFormat::kNginx:
      return "nginx";
    case LegacyFormat::kHaproxy:
      return "haproxy";
    default:
      return "unknown";
  }
}

Result<std::vector<LegacyKey>> ParseLegacyKeyFile(LegacyFormat format,
                                                  ByteSpan file_contents) {
  if (file_contents.size() > kMaxLegacyKeyFileSize) {
    return InvalidArgument(
        "legacy key file is " + std::to_string(file_contents.size()) +
        " bytes, more than " + std::to_string(kMaxLegacyKeyFileSize));
  }
  switch (format) {
    case LegacyFormat::kNginx:
      return ParseNginx(file_contents);
    case LegacyFormat::kHaproxy:
      return ParseHaproxy(file_contents);
    default:
      return InvalidArgument("unknown legacy key file format");
  }
}

}  // namespace hsmstek::keystore
