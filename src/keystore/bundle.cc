#include "keystore/bundle.h"

#include <openssl/evp.h>

#include <algorithm>
#include <array>
#include <span>

#include "keystore/time_format.h"

namespace hsmstek::keystore {
namespace {

// The field lines of each version, in order; then the trailer line.
constexpr std::array<std::string_view, 7> kKeysV1 = {
    "label",           "store-id", "check",  "mechanism",
    "wrapping-key-id", "policy",   "wrapped"};
constexpr std::array<std::string_view, 11> kKeysV2 = {
    "label",  "store-id", "check",   "link",      "mechanism", "recipient",
    "policy", "wrapped",  "created", "not-after", "signer"};
// Lines that may be left out (their field then keeps its default).
constexpr std::string_view kOptionalKey = "link";
constexpr std::string_view kDigestKey = "sha256";
constexpr std::string_view kSignatureKey = "signature";

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

Result<int64_t> ParseTime(std::string_view value) {
  Result<int64_t> t = ParseRfc3339(value);
  if (!t.ok()) return t.status();
  if (FormatRfc3339(*t) != value) {
    return InvalidArgument("time must be written as YYYY-MM-DDTHH:MM:SSZ");
  }
  return t;
}

Result<Bytes> ParseHexId(std::string_view value, size_t max,
                         std::string_view what) {
  if (value.size() > 2 * max) {
    return InvalidArgument(std::string(what) + " longer than " +
                           std::to_string(max) + " bytes");
  }
  return HexDecode(value);
}

// Stores the value of the line `key` into `b`.
Status ParseValue(std::string_view key, std::string_view value, Bundle *b) {
  if (key == "label") {
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
  if (key == "store-id") {
    Result<StoreId> id = FixedHex<sizeof(StoreId)>(value);
    if (!id.ok()) return id.status();
    b->store_id = *id;
    return Status::Ok();
  }
  if (key == "check") {
    Result<std::array<uint8_t, kCheckValueSize>> check =
        FixedHex<kCheckValueSize>(value);
    if (!check.ok()) return check.status();
    b->check = *check;
    return Status::Ok();
  }
  if (key == "link") {
    // Canonical decimal only: the signature covers the text, the importer
    // reads the number; one number, one spelling. 0 is written by leaving
    // the line out.
    if (value.size() > 15 || value[0] == '0' ||
        !std::all_of(value.begin(), value.end(),
                     [](char c) { return c >= '0' && c <= '9'; })) {
      return InvalidArgument(
          "expected a decimal link index from 1 to 2^48, without leading "
          "zeros");
    }
    uint64_t j = 0;
    for (char c : value) j = j * 10 + static_cast<uint64_t>(c - '0');
    if (j > kMaxBundleLink) {
      return InvalidArgument("link index above 2^48");
    }
    b->link = j;
    return Status::Ok();
  }
  if (key == "mechanism") {
    Result<WrapMechanism> m = ParseWrapMechanism(value);
    if (!m.ok()) return m.status();
    b->mechanism = *m;
    return Status::Ok();
  }
  if (key == "wrapping-key-id" || key == "recipient") {
    if (value == "-" && key == "wrapping-key-id") {
      b->wrapping_key_id.clear();
      return Status::Ok();
    }
    Result<Bytes> id =
        ParseHexId(value, kMaxWrappingKeyIdSize,
                   key == "recipient" ? "recipient" : "wrapping key id");
    if (!id.ok()) return id.status();
    b->wrapping_key_id = std::move(*id);
    return Status::Ok();
  }
  if (key == "policy") {
    Result<SecretBuffer> text = Base64Decode(value);
    if (!text.ok()) return text.status();
    Result<Policy> policy = ParsePolicy(std::string_view(
        reinterpret_cast<const char *>(text->data()), text->size()));
    if (!policy.ok()) return policy.status();
    b->policy = std::move(*policy);
    return Status::Ok();
  }
  if (key == "wrapped") {
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
  if (key == "created" || key == "not-after") {
    Result<int64_t> t = ParseTime(value);
    if (!t.ok()) return t.status();
    (key == "created" ? b->created : b->not_after) = *t;
    return Status::Ok();
  }
  if (key == "signer") {
    if (value.size() != 2 * kSignerIdSize) {
      return InvalidArgument("expected " + std::to_string(2 * kSignerIdSize) +
                             " hex digits, got " +
                             std::to_string(value.size()));
    }
    Result<Bytes> id = HexDecode(value);
    if (!id.ok()) return id.status();
    b->signer = std::move(*id);
    return Status::Ok();
  }
  return Internal("unknown bundle key");
}

// Checks the trailer line "<key> <hex>\n" that ends `text` and returns
// the offset where it starts. The hex must be 2 * `size` digits.
Result<size_t> FindTrailer(std::string_view text, std::string_view key,
                           size_t size) {
  const std::string needle = "\n" + std::string(key) + " ";
  const size_t pos = text.find(needle);
  if (pos == std::string_view::npos) {
    return InvalidArgument("bundle is truncated (no " + std::string(key) +
                           " line)");
  }
  const std::string_view line = text.substr(pos + needle.size());
  const size_t end = line.find('\n');
  if (end + 1 != line.size()) {
    return InvalidArgument("bundle has content after the " + std::string(key) +
                           " line");
  }
  const std::string_view hex = line.substr(0, end);
  if (hex.size() != 2 * size || !HexDecode(hex).ok()) {
    return InvalidArgument("bundle " + std::string(key) + " line: expected " +
                           std::to_string(2 * size) + " hex digits");
  }
  return pos + 1;
}

// Parses the field lines of `body` (header line first, trailer excluded).
Status ParseLines(std::string_view body, std::span<const std::string_view> keys,
                  Bundle *b) {
  size_t start = body.find('\n') + 1;  // after the header line
  size_t line_no = 1;
  size_t next_key = 0;
  while (start < body.size()) {
    ++line_no;
    const size_t nl = body.find('\n', start);
    const std::string_view line = body.substr(start, nl - start);
    start = nl + 1;
    if (next_key == keys.size()) {
      return InvalidArgument(LinePrefix(line_no) + "unexpected line after \"" +
                             std::string(keys.back()) + "\"");
    }
    const size_t space = line.find(' ');
    const std::string_view key = line.substr(0, space);
    if (keys[next_key] == kOptionalKey && key != kOptionalKey) ++next_key;
    const std::string_view want = keys[next_key];
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
    Status s = ParseValue(key, value, b);
    if (!s.ok()) return s.WithContext(KeyContext(line_no, key));
    ++next_key;
  }
  if (next_key != keys.size()) {
    return InvalidArgument("bundle is missing line \"" +
                           std::string(keys[next_key]) + "\"");
  }
  return Status::Ok();
}

// The lines common to both versions, from "label" through "mechanism".
std::string FirstLines(const Bundle &b, std::string_view header) {
  std::string out(header);
  out += "\nlabel " + PercentEncode(b.label);
  out += "\nstore-id " + HexEncode(b.store_id);
  out += "\ncheck " + HexEncode(b.check);
  if (b.version != 1 && b.link != 0) out += "\nlink " + std::to_string(b.link);
  out += "\nmechanism ";
  out += WrapMechanismName(b.mechanism);
  return out;
}

std::string PolicyLine(const Bundle &b) {
  const std::string policy = SerializePolicy(b.policy);
  return "\npolicy " +
         Base64Encode(ByteSpan(reinterpret_cast<const uint8_t *>(policy.data()),
                               policy.size()));
}

Result<Bundle> ParseV1(std::string_view text) {
  Result<size_t> trailer = FindTrailer(text, kDigestKey, 32);
  if (!trailer.ok()) return trailer.status();
  const size_t covered = *trailer;
  Result<std::string> actual = Sha256Hex(text.substr(0, covered));
  if (!actual.ok()) return actual.status();
  std::string expected(text.substr(covered + kDigestKey.size() + 1, 64));
  for (char &c : expected) {
    if (c >= 'A' && c <= 'F') c = static_cast<char>(c - 'A' + 'a');
  }
  if (*actual != expected) {
    return InvalidArgument(
        "bundle digest mismatch (file corrupted, truncated or edited)");
  }
  Bundle b;
  b.version = 1;
  Status s = ParseLines(text.substr(0, covered), kKeysV1, &b);
  if (!s.ok()) return s;
  return b;
}

Result<Bundle> ParseV2(std::string_view text) {
  Result<size_t> trailer =
      FindTrailer(text, kSignatureKey, kBundleSignatureSize);
  if (!trailer.ok()) return trailer.status();
  Bundle b;
  b.version = 2;
  Status s = ParseLines(text.substr(0, *trailer), kKeysV2, &b);
  if (!s.ok()) return s;
  Result<Bytes> sig = HexDecode(text.substr(*trailer + kSignatureKey.size() + 1,
                                            2 * kBundleSignatureSize));
  if (!sig.ok()) return sig.status();
  b.signature = std::move(*sig);
  // The signature covers bytes, the importer reads fields: they must be
  // the same thing (no alternative spellings of a signed value).
  if (SerializeBundle(b) != text) {
    return InvalidArgument(
        "bundle is not in canonical form (edited by hand?); export it again");
  }
  return b;
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

std::string BundleSignedText(const Bundle &b) {
  std::string out = FirstLines(b, kBundleHeader);
  out += "\nrecipient " + HexEncode(b.wrapping_key_id);
  out += PolicyLine(b);
  out += "\nwrapped " + Base64Encode(b.wrapped);
  out += "\ncreated " + FormatRfc3339(b.created);
  out += "\nnot-after " + FormatRfc3339(b.not_after);
  out += "\nsigner " + HexEncode(b.signer);
  out += "\n";
  return out;
}

std::string SerializeBundle(const Bundle &b) {
  if (b.version != 1) {
    return BundleSignedText(b) + "signature " + HexEncode(b.signature) + "\n";
  }
  std::string out = FirstLines(b, kBundleHeaderV1);
  out += "\nwrapping-key-id ";
  out += b.wrapping_key_id.empty() ? "-" : HexEncode(b.wrapping_key_id);
  out += PolicyLine(b);
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
  const bool v1 = first == kBundleHeaderV1;
  if (!v1 && first != kBundleHeader) {
    if (first.substr(0, kMagic.size()) == kMagic) {
      return InvalidArgument(
          "unsupported bundle version (this build reads 1 and 2)");
    }
    return InvalidArgument("not an hsmstek bundle (first line is not \"" +
                           std::string(kBundleHeader) + "\")");
  }
  if (text.back() != '\n') {
    return InvalidArgument("bundle is truncated (no newline at end)");
  }
  return v1 ? ParseV1(text) : ParseV2(text);
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
