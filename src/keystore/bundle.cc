#include "keystore/bundle.h"

#include <openssl/evp.h>

#include <algorithm>
#include <array>

namespace hsmstek::keystore {
namespace {

constexpr std::array<std::string_view, 8> kKeys = {
    "label",           "store-id", "check",   "mechanism",
    "wrapping-key-id", "policy",   "wrapped", "sha256"};
constexpr size_t kDigestLine = 7;  // index of "sha256" in kKeys

bool IsBase64Char(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
         (c >= '0' && c <= '9') || c == '+' || c == '/';
}

int Base64Value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  return c == '+' ? 62 : 63;
}

std::string LinePrefix(size_t line) {
  return "bundle line " + std::to_string(line) + ": ";
}

std::string KeyContext(size_t line, std::string_view key) {
  return "bundle line " + std::to_string(line) + " (" + std::string(key) + ")";
}

std::string PercentEncode(std::string_view raw) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (char ch : raw) {
    const auto c = static_cast<unsigned char>(ch);
    if (c > 0x20 && c < 0x7f && c != '%') {
      out.push_back(ch);
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0xf]);
    }
  }
  return out;
}

Result<std::string> PercentDecode(std::string_view text) {
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '%') {
      out.push_back(text[i]);
      continue;
    }
    Result<Bytes> byte = i + 2 < text.size() ? HexDecode(text.substr(i + 1, 2))
                                             : Result<Bytes>(Bytes());
    if (!byte.ok() || byte->size() != 1) {
      return InvalidArgument("bad percent escape at offset " +
                             std::to_string(i));
    }
    out.push_back(static_cast<char>((*byte)[0]));
    i += 2;
  }
  return out;
}

// Decodes exactly `N` bytes of hex.
template <size_t N>
Result<std::array<uint8_t, N>> FixedHex(std::string_view text) {
  if (text.size() != 2 * N) {
    return InvalidArgument("expected " + std::to_string(2 * N) +
                           " hex digits, got " + std::to_string(text.size()));
  }
  Result<Bytes> bytes = HexDecode(text);
  if (!bytes.ok()) return bytes.status();
  std::array<uint8_t, N> out{};
  std::copy(bytes->begin(), bytes->end(), out.begin());
  return out;
}

// SHA-256 of `data` as lower-case hex.
Result<std::string> Sha256Hex(std::string_view data) {
  uint8_t md[EVP_MAX_MD_SIZE];
  unsigned int md_len = 0;
  if (EVP_Digest(data.data(), data.size(), md, &md_len, EVP_sha256(),
                 nullptr) != 1) {
    return Internal("SHA-256 failed");
  }
  return HexEncode(ByteSpan(md, md_len));
}

// Stores the value of line `index` (0-based into kKeys) into `b`.
Status ParseValue(size_t index, std::string_view value, Bundle *b) {
  switch (index) {
    case 0: {
      Result<std::string> label = PercentDecode(value);
      if (!label.ok()) return label.status();
      if (label->size() > kMaxBundleLabelSize) {
        return InvalidArgument("label is " + std::to_string(label->size()) +
                               " bytes, more than " +
                               std::to_string(kMaxBundleLabelSize));
      }
      b->label = std::move(*label);
      return Status::Ok();
    }
    case 1: {
      Result<StoreId> id = FixedHex<sizeof(StoreId)>(value);
      if (!id.ok()) return id.status();
      b->store_id = *id;
      return Status::Ok();
    }
    case 2: {
      Result<std::array<uint8_t, kCheckValueSize>> check =
          FixedHex<kCheckValueSize>(value);
      if (!check.ok()) return check.status();
      b->check = *check;
      return Status::Ok();
    }
    case 3: {
      Result<WrapMechanism> m = ParseWrapMechanism(value);
      if (!m.ok()) return m.status();
      b->mechanism = *m;
      return Status::Ok();
    }
    case 4: {
      if (value == "-") {
        b->wrapping_key_id.clear();
        return Status::Ok();
      }
      if (value.size() > 2 * kMaxWrappingKeyIdSize) {
        return InvalidArgument("wrapping key id longer than " +
                               std::to_string(kMaxWrappingKeyIdSize) +
                               " bytes");
      }
      Result<Bytes> id = HexDecode(value);
      if (!id.ok()) return id.status();
      b->wrapping_key_id = std::move(*id);
      return Status::Ok();
    }
    case 5: {
      Result<SecretBuffer> text = Base64Decode(value);
      if (!text.ok()) return text.status();
      Result<Policy> policy = ParsePolicy(std::string_view(
          reinterpret_cast<const char *>(text->data()), text->size()));
      if (!policy.ok()) return policy.status();
      b->policy = std::move(*policy);
      return Status::Ok();
    }
    case 6: {
      if (value.size() > (kMaxWrappedKeySize + 2) / 3 * 4) {
        return InvalidArgument("wrapped key longer than " +
                               std::to_string(kMaxWrappedKeySize) + " bytes");
      }
      Result<SecretBuffer> wrapped = Base64Decode(value);
      if (!wrapped.ok()) return wrapped.status();
      if (wrapped->empty()) return InvalidArgument("wrapped key is empty");
      if (wrapped->size() > kMaxWrappedKeySize) {
        return InvalidArgument("wrapped key longer than " +
                               std::to_string(kMaxWrappedKeySize) + " bytes");
      }
      b->wrapped.assign(wrapped->data(), wrapped->data() + wrapped->size());
      return Status::Ok();
    }
    default:
      return Internal("bundle key index out of range");
  }
}

}  // namespace

std::string_view WrapMechanismName(WrapMechanism mechanism) {
  switch (mechanism) {
    case WrapMechanism::kRsaOaepSha1:
      return "rsa-oaep-sha1";
    case WrapMechanism::kRsaOaepSha256:
      return "rsa-oaep-sha256";
    case WrapMechanism::kAesKeyWrapPad:
      return "aes-key-wrap-pad";
    default:
      return "unknown";
  }
}

Result<WrapMechanism> ParseWrapMechanism(std::string_view name) {
  for (WrapMechanism m :
       {WrapMechanism::kRsaOaepSha1, WrapMechanism::kRsaOaepSha256,
        WrapMechanism::kAesKeyWrapPad}) {
    if (name == WrapMechanismName(m)) return m;
  }
  return InvalidArgument(
      "unknown wrap mechanism (expected rsa-oaep-sha1, rsa-oaep-sha256 or "
      "aes-key-wrap-pad)");
}

std::string SerializeBundle(const Bundle &b) {
  std::string out;
  out += kBundleHeader;
  out += "\nlabel " + PercentEncode(b.label);
  out += "\nstore-id " + HexEncode(b.store_id);
  out += "\ncheck " + HexEncode(b.check);
  out += "\nmechanism ";
  out += WrapMechanismName(b.mechanism);
  out += "\nwrapping-key-id ";
  out += b.wrapping_key_id.empty() ? "-" : HexEncode(b.wrapping_key_id);
  const std::string policy = SerializePolicy(b.policy);
  out += "\npolicy " +
         Base64Encode(ByteSpan(reinterpret_cast<const uint8_t *>(policy.data()),
                               policy.size()));
  out += "\nwrapped " + Base64Encode(b.wrapped);
  out += "\n";
  Result<std::string> digest = Sha256Hex(out);
  // SHA-256 in the default provider does not fail short of a broken
  // OpenSSL; an empty digest then makes ParseBundle refuse the file.
  out += "sha256 " + (digest.ok() ? *digest : std::string()) + "\n";
  return out;
}

Result<Bundle> ParseBundle(std::string_view text) {
  if (text.empty()) return InvalidArgument("empty bundle");
  if (text.size() > kMaxBundleSize) {
    return InvalidArgument("bundle is " + std::to_string(text.size()) +
                           " bytes, more than " +
                           std::to_string(kMaxBundleSize));
  }
  for (size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c == '\r') {
      return InvalidArgument(
          "bundle contains a carriage return (line endings converted?)");
    }
    if ((c < 0x20 && c != '\n') || c > 0x7e) {
      return InvalidArgument("bundle contains a non-printable byte at offset " +
                             std::to_string(i));
    }
  }
  constexpr std::string_view kMagic = "hsmstek-bundle ";
  const std::string_view first = text.substr(0, text.find('\n'));
  if (first != kBundleHeader) {
    if (first.substr(0, kMagic.size()) == kMagic) {
      return InvalidArgument("unsupported bundle version (this build reads 1)");
    }
    return InvalidArgument("not an hsmstek bundle (first line is not \"" +
                           std::string(kBundleHeader) + "\")");
  }
  if (text.back() != '\n') {
    return InvalidArgument("bundle is truncated (no newline at end)");
  }
  constexpr std::string_view kDigestKey = "\nsha256 ";
  const size_t digest_pos = text.find(kDigestKey);
  if (digest_pos == std::string_view::npos) {
    return InvalidArgument("bundle is truncated (no sha256 line)");
  }
  const size_t covered = digest_pos + 1;  // through the newline before it
  const std::string_view digest_line =
      text.substr(covered + kDigestKey.size() - 1);
  const size_t digest_end = digest_line.find('\n');
  if (digest_end + 1 != digest_line.size()) {
    return InvalidArgument("bundle has content after the sha256 line");
  }
  const std::string_view digest_hex = digest_line.substr(0, digest_end);
  if (digest_hex.size() != 64 || !HexDecode(digest_hex).ok()) {
    return InvalidArgument("bundle sha256 line: expected 64 hex digits");
  }
  Result<std::string> actual = Sha256Hex(text.substr(0, covered));
  if (!actual.ok()) return actual.status();
  std::string expected(digest_hex);
  for (char &c : expected) {
    if (c >= 'A' && c <= 'F') c = static_cast<char>(c - 'A' + 'a');
  }
  if (*actual != expected) {
    return InvalidArgument(
        "bundle digest mismatch (file corrupted, truncated or edited)");
  }

  Bundle b;
  const std::string_view body = text.substr(0, covered);
  size_t start = body.find('\n') + 1;  // after the header line
  size_t line_no = 1;
  size_t next_key = 0;
  while (start < body.size()) {
    ++line_no;
    const size_t nl = body.find('\n', start);
    const std::string_view line = body.substr(start, nl - start);
    start = nl + 1;
    if (next_key == kDigestLine) {
      return InvalidArgument(LinePrefix(line_no) +
                             "unexpected line after \"wrapped\"");
    }
    const std::string_view want = kKeys[next_key];
    const size_t space = line.find(' ');
    const std::string_view key = line.substr(0, space);
    if (key != want || space == std::string_view::npos) {
      return InvalidArgument(LinePrefix(line_no) + "expected \"" +
                             std::string(want) + " <value>\"");
    }
    const std::string_view value = line.substr(space + 1);
    if (value.empty()) {
      return InvalidArgument(KeyContext(line_no, key) + ": empty value");
    }
    if (value.find(' ') != std::string_view::npos) {
      return InvalidArgument(KeyContext(line_no, key) +
                             ": value contains a space");
    }
    Status s = ParseValue(next_key, value, &b);
    if (!s.ok()) return s.WithContext(KeyContext(line_no, key));
    ++next_key;
  }
  if (next_key != kDigestLine) {
    return InvalidArgument("bundle is missing line \"" +
                           std::string(kKeys[next_key]) + "\"");
  }
  return b;
}

std::string Base64Encode(ByteSpan data) {
  if (data.empty()) return std::string();
  std::string out((data.size() + 2) / 3 * 4 + 1, '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char *>(out.data()),
                                data.data(), static_cast<int>(data.size()));
  out.resize(n < 0 ? 0 : static_cast<size_t>(n));
  return out;
}

Result<SecretBuffer> Base64Decode(std::string_view text) {
  constexpr size_t kMaxText = 1 << 20;
  if (text.size() > kMaxText) {
    return InvalidArgument("base64 text longer than 1 MiB");
  }
  if (text.size() % 4 != 0) {
    return InvalidArgument("invalid base64: length " +
                           std::to_string(text.size()) +
                           " is not a multiple of 4");
  }
  if (text.empty()) return SecretBuffer();
  size_t pad = 0;
  if (text.back() == '=') pad = text[text.size() - 2] == '=' ? 2 : 1;
  for (size_t i = 0; i < text.size() - pad; ++i) {
    if (!IsBase64Char(text[i])) {
      return InvalidArgument("invalid base64: bad character at offset " +
                             std::to_string(i));
    }
  }
  // Canonical: the bits after the last whole byte are zero.
  const int last = Base64Value(text[text.size() - pad - 1]);
  if ((pad == 1 && (last & 0x3) != 0) || (pad == 2 && (last & 0xf) != 0)) {
    return InvalidArgument("invalid base64: non-canonical final character");
  }
  SecretBuffer out(text.size() / 4 * 3);
  const int n = EVP_DecodeBlock(
      out.data(), reinterpret_cast<const unsigned char *>(text.data()),
      static_cast<int>(text.size()));
  if (n < 0 || static_cast<size_t>(n) != out.size()) {
    return InvalidArgument("invalid base64");
  }
  // EVP_DecodeBlock decodes the padding as zero bytes; drop them.
  out.truncate(out.size() - pad);
  return out;
}

}  // namespace hsmstek::keystore
