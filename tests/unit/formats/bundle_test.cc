#include "keystore/bundle.h"

#include <gtest/gtest.h>
#include <openssl/sha.h>

#include <string>
#include <vector>

#include "common/bytes.h"
#include "formats_test_util.h"

namespace hsmstek::keystore {
namespace {

using testing::IsInvalid;

// A version-1 (unsigned, read-only) bundle.
Bundle Sample() {
  Bundle b;
  b.version = 1;
  b.label = "web tickets";
  b.store_id = {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08};
  b.check = {0xc4, 0x3f, 0xde, 0x2e, 0x76, 0x96, 0xd6, 0xcd};
  b.mechanism = WrapMechanism::kRsaOaepSha1;
  b.wrapping_key_id = {0xab, 0xcd};
  b.policy.period_s = 3600;
  b.policy.decrypt_window_s = 86400;
  b.policy.not_before = 1795773600;
  b.policy.created_at = 1795770000;
  b.policy.replicable = true;
  b.wrapped = Bytes(256);
  for (size_t i = 0; i < b.wrapped.size(); ++i) {
    b.wrapped[i] = static_cast<uint8_t>(i * 7);
  }
  return b;
}

std::string Sha256Hex(std::string_view s) {
  uint8_t md[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const uint8_t *>(s.data()), s.size(), md);
  return HexEncode(md);
}

// Appends a correct sha256 line to `body`, so field errors are reachable.
std::string Sign(const std::string &body) {
  return body + "sha256 " + Sha256Hex(body) + "\n";
}

// The lines of SerializeBundle(Sample()) without the sha256 line.
std::vector<std::string> SampleLines() {
  const std::string text = SerializeBundle(Sample());
  std::vector<std::string> lines;
  size_t start = 0;
  while (start < text.size()) {
    size_t nl = text.find('\n', start);
    lines.push_back(text.substr(start, nl - start));
    start = nl + 1;
  }
  lines.pop_back();
  return lines;
}

// Signs SampleLines() with line `index` (0-based) replaced by `with`.
std::string WithLine(size_t index, const std::string &with) {
  std::vector<std::string> lines = SampleLines();
  lines.at(index) = with;
  std::string body;
  for (const std::string &l : lines) body += l + "\n";
  return Sign(body);
}

TEST(Bundle, SerializedText) {
  const std::string text = SerializeBundle(Sample());
  const std::vector<std::string> lines = SampleLines();
  ASSERT_EQ(lines.size(), 8u);
  EXPECT_EQ(lines[0], "hsmstek-bundle 1");
  EXPECT_EQ(lines[1], "label web%20tickets");
  EXPECT_EQ(lines[2], "store-id 0102030405060708");
  EXPECT_EQ(lines[3], "check c43fde2e7696d6cd");
  EXPECT_EQ(lines[4], "mechanism rsa-oaep-sha1");
  EXPECT_EQ(lines[5], "wrapping-key-id abcd");
  EXPECT_EQ(lines[6],
            "policy " + Base64Encode(ByteSpan(
                            reinterpret_cast<const uint8_t *>(
                                SerializePolicy(Sample().policy).data()),
                            SerializePolicy(Sample().policy).size())));
  EXPECT_EQ(lines[7].substr(0, 12), "wrapped AAcO");
  // The digest covers every byte before the sha256 line.
  const size_t digest_at = text.rfind("sha256 ");
  EXPECT_EQ(text.substr(digest_at),
            "sha256 " + Sha256Hex(text.substr(0, digest_at)) + "\n");
}

TEST(Bundle, RoundTrips) {
  Bundle b = Sample();
  Result<Bundle> back = ParseBundle(SerializeBundle(b));
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(*back, b);

  b.label = std::string("50% caf\xc3\xa9\n\x01", 11);
  b.mechanism = WrapMechanism::kAesKeyWrapPad;
  b.wrapping_key_id.clear();
  b.wrapped = {0x42};
  b.policy.retire_at = 1796378400;
  const std::string text = SerializeBundle(b);
  EXPECT_NE(text.find("\nlabel 50%25%20caf%C3%A9%0A%01\n"), std::string::npos)
      << text;
  EXPECT_NE(text.find("\nwrapping-key-id -\n"), std::string::npos);
  back = ParseBundle(text);
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(*back, b);

  b.mechanism = WrapMechanism::kRsaOaepSha256;
  b.label = std::string(kMaxBundleLabelSize, ' ');
  b.wrapped = Bytes(kMaxWrappedKeySize, 0x5a);
  b.wrapping_key_id = Bytes(kMaxWrappingKeyIdSize, 0x11);
  back = ParseBundle(SerializeBundle(b));
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(*back, b);
}

TEST(Bundle, Mechanisms) {
  for (WrapMechanism m :
       {WrapMechanism::kRsaOaepSha1, WrapMechanism::kRsaOaepSha256,
        WrapMechanism::kAesKeyWrapPad}) {
    EXPECT_EQ(*ParseWrapMechanism(WrapMechanismName(m)), m);
  }
  EXPECT_EQ(WrapMechanismName(WrapMechanism::kAesKeyWrapPad),
            "aes-key-wrap-pad");
  EXPECT_TRUE(IsInvalid(ParseWrapMechanism("rsa-pkcs").status(),
                        "unknown wrap mechanism"));
}

TEST(Bundle, WholeFileErrors) {
  const std::string good = SerializeBundle(Sample());
  EXPECT_TRUE(IsInvalid(ParseBundle("").status(), "empty bundle"));
  EXPECT_TRUE(
      IsInvalid(ParseBundle(good + std::string(kMaxBundleSize, '#')).status(),
                "more than 16384"));
  std::string crlf = good;
  crlf.insert(crlf.find('\n'), "\r");
  EXPECT_TRUE(IsInvalid(ParseBundle(crlf).status(),
                        "bundle contains a carriage return"));
  std::string nul = good;
  nul[20] = '\0';
  EXPECT_TRUE(IsInvalid(ParseBundle(nul).status(),
                        "bundle contains a non-printable byte at offset 20"));
  EXPECT_TRUE(IsInvalid(ParseBundle("hsmstek-policy 1\n").status(),
                        "not an hsmstek bundle"));
  EXPECT_TRUE(IsInvalid(ParseBundle("hsmstek-bundle 3\nlabel x\n").status(),
                        "unsupported bundle version (this build reads 1 and "
                        "2)"));
  EXPECT_TRUE(IsInvalid(ParseBundle(good + "extra\n").status(),
                        "bundle has content after the sha256 line"));
  std::string bad_hex = good;
  bad_hex.replace(bad_hex.size() - 3, 1, "g");
  EXPECT_TRUE(IsInvalid(ParseBundle(bad_hex).status(),
                        "bundle sha256 line: expected 64 hex digits"));
  EXPECT_TRUE(
      IsInvalid(ParseBundle(good.substr(0, good.size() - 3) + "\n").status(),
                "expected 64 hex digits"));
}

TEST(Bundle, TruncationIsDetected) {
  const std::string good = SerializeBundle(Sample());
  const size_t header = good.find('\n') + 1;
  for (size_t n = header; n < good.size(); ++n) {
    Status s = ParseBundle(good.substr(0, n)).status();
    ASSERT_FALSE(s.ok()) << n;
    ASSERT_EQ(s.code(), ErrorCode::kInvalidArgument);
    ASSERT_NE(s.message().find("truncated"), std::string::npos)
        << n << ": " << s.message();
  }
}

TEST(Bundle, TamperingIsDetected) {
  const std::string good = SerializeBundle(Sample());
  const size_t digest_at = good.rfind("sha256 ");
  // Flip one character in every covered position after the header.
  for (size_t i = good.find('\n') + 1; i < digest_at; ++i) {
    if (good[i] == '\n') continue;
    std::string t = good;
    t[i] = t[i] == 'A' ? 'B' : 'A';
    EXPECT_TRUE(IsInvalid(ParseBundle(t).status(), "bundle digest mismatch"))
        << i;
  }
  std::string upper = good;  // upper-case digest digits are fine
  for (size_t i = digest_at + 7; i < upper.size(); ++i) {
    if (upper[i] >= 'a' && upper[i] <= 'f') upper[i] -= 'a' - 'A';
  }
  EXPECT_TRUE(ParseBundle(upper).ok());
}

TEST(Bundle, LineOrder) {
  std::vector<std::string> lines = SampleLines();
  std::swap(lines[2], lines[3]);
  std::string body;
  for (const std::string &l : lines) body += l + "\n";
  EXPECT_TRUE(IsInvalid(ParseBundle(Sign(body)).status(),
                        "bundle line 3: expected \"store-id <value>\""));
  lines = SampleLines();
  lines.pop_back();
  body.clear();
  for (const std::string &l : lines) body += l + "\n";
  EXPECT_TRUE(IsInvalid(ParseBundle(Sign(body)).status(),
                        "bundle is missing line \"wrapped\""));
  EXPECT_TRUE(IsInvalid(ParseBundle(Sign("hsmstek-bundle 1\n")).status(),
                        "bundle is missing line \"label\""));
  lines = SampleLines();
  body.clear();
  for (const std::string &l : lines) body += l + "\n";
  EXPECT_TRUE(IsInvalid(ParseBundle(Sign(body + "note hi\n")).status(),
                        "bundle line 9: unexpected line after \"wrapped\""));
  EXPECT_TRUE(IsInvalid(ParseBundle(WithLine(1, "label")).status(),
                        "bundle line 2: expected \"label <value>\""));
  EXPECT_TRUE(IsInvalid(ParseBundle(WithLine(1, "label ")).status(),
                        "bundle line 2 (label): empty value"));
  EXPECT_TRUE(IsInvalid(ParseBundle(WithLine(1, "label a b")).status(),
                        "bundle line 2 (label): value contains a space"));
  EXPECT_TRUE(IsInvalid(ParseBundle(WithLine(1, "")).status(),
                        "bundle line 2: expected \"label <value>\""));
}

TEST(Bundle, FieldErrors) {
  EXPECT_TRUE(IsInvalid(ParseBundle(WithLine(1, "label a%2")).status(),
                        "bundle line 2 (label): bad percent escape at offset "
                        "1"));
  EXPECT_TRUE(IsInvalid(ParseBundle(WithLine(1, "label %zz")).status(),
                        "bad percent escape at offset 0"));
  EXPECT_TRUE(IsInvalid(
      ParseBundle(WithLine(1, "label " + std::string(256, 'x'))).status(),
      "bundle line 2 (label): label is 256 bytes, more than "
      "255"));
  EXPECT_TRUE(
      IsInvalid(ParseBundle(WithLine(2, "store-id 01020304050607")).status(),
                "bundle line 3 (store-id): expected 16 hex digits, "
                "got 14"));
  EXPECT_TRUE(
      IsInvalid(ParseBundle(WithLine(2, "store-id 010203040506070x")).status(),
                "bundle line 3 (store-id): not a hex digit"));
  EXPECT_TRUE(
      IsInvalid(ParseBundle(WithLine(3, "check c43fde2e7696d6cd00")).status(),
                "bundle line 4 (check): expected 16 hex digits, got "
                "18"));
  EXPECT_TRUE(IsInvalid(ParseBundle(WithLine(4, "mechanism rsa-pkcs")).status(),
                        "bundle line 5 (mechanism): unknown wrap mechanism"));
  EXPECT_TRUE(
      IsInvalid(ParseBundle(WithLine(5, "wrapping-key-id abc")).status(),
                "bundle line 6 (wrapping-key-id): hex string has odd "
                "length 3"));
  EXPECT_TRUE(IsInvalid(
      ParseBundle(WithLine(5, "wrapping-key-id " + std::string(512, 'a')))
          .status(),
      "wrapping key id longer than 255 bytes"));
  EXPECT_TRUE(IsInvalid(ParseBundle(WithLine(6, "policy abc")).status(),
                        "bundle line 7 (policy): invalid base64: length 3"));
  const std::string bad_policy = "hsmstek-policy 1\nperiod 1x\n";
  EXPECT_TRUE(IsInvalid(
      ParseBundle(WithLine(6, "policy " + Base64Encode(ByteSpan(
                                              reinterpret_cast<const uint8_t *>(
                                                  bad_policy.data()),
                                              bad_policy.size()))))
          .status(),
      "bundle line 7 (policy): policy line 2 (period): duration \"1x\""));
  EXPECT_TRUE(IsInvalid(ParseBundle(WithLine(7, "wrapped ab=c")).status(),
                        "bundle line 8 (wrapped): invalid base64: bad "
                        "character at offset 2"));
  EXPECT_TRUE(IsInvalid(
      ParseBundle(WithLine(7, "wrapped " + Base64Encode(Bytes(4099)))).status(),
      "bundle line 8 (wrapped): wrapped key longer than "
      "4096 bytes"));
  EXPECT_TRUE(IsInvalid(
      ParseBundle(WithLine(7, "wrapped " + Base64Encode(Bytes(4097)))).status(),
      "bundle line 8 (wrapped): wrapped key longer than "
      "4096 bytes"));
}

// A version-2 bundle (the signature is bytes here; bundle_signing.h and
// the CLI tests check real ones).
Bundle SampleV2() {
  Bundle b = Sample();
  b.version = 2;
  b.wrapping_key_id = Bytes(32, 0x7a);
  b.created = 1795770000;
  b.not_after = 1795856400;
  b.signer = Bytes(kSignerIdSize, 0x5c);
  b.signature = Bytes(kBundleSignatureSize, 0x33);
  return b;
}

// The lines of SerializeBundle(SampleV2()) (without the newlines).
std::vector<std::string> V2Lines() {
  const std::string text = SerializeBundle(SampleV2());
  std::vector<std::string> lines;
  size_t start = 0;
  while (start < text.size()) {
    size_t nl = text.find('\n', start);
    lines.push_back(text.substr(start, nl - start));
    start = nl + 1;
  }
  return lines;
}

std::string V2With(size_t index, const std::string &with) {
  std::vector<std::string> lines = V2Lines();
  lines.at(index) = with;
  std::string out;
  for (const std::string &l : lines) out += l + "\n";
  return out;
}

TEST(BundleV2, SerializedTextAndSignedPart) {
  const std::vector<std::string> lines = V2Lines();
  ASSERT_EQ(lines.size(), 12u);
  EXPECT_EQ(lines[0], "hsmstek-bundle 2");
  EXPECT_EQ(lines[1], "label web%20tickets");
  EXPECT_EQ(lines[4], "mechanism rsa-oaep-sha1");
  EXPECT_EQ(lines[5], "recipient " + HexEncode(Bytes(32, 0x7a)));
  EXPECT_EQ(lines[8], "created 2026-11-27T09:00:00Z");
  EXPECT_EQ(lines[9], "not-after 2026-11-28T09:00:00Z");
  EXPECT_EQ(lines[10], "signer " + HexEncode(Bytes(32, 0x5c)));
  EXPECT_EQ(lines[11], "signature " + std::string(128, '3'));
  // The signature covers every byte before its line, and nothing after.
  const std::string text = SerializeBundle(SampleV2());
  EXPECT_EQ(BundleSignedText(SampleV2()),
            text.substr(0, text.rfind("signature ")));
  EXPECT_EQ(text.find("sha256"), std::string::npos);
}

TEST(BundleV2, RoundTripsEveryField) {
  Bundle b = SampleV2();
  Result<Bundle> back = ParseBundle(SerializeBundle(b));
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(*back, b);
  b.mechanism = WrapMechanism::kAesKeyWrapPad;
  b.wrapping_key_id = {0x01};
  b.label = std::string("50% caf\xc3\xa9", 9);
  b.policy.retire_at = 1796378400;
  back = ParseBundle(SerializeBundle(b));
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(*back, b);
  // Version 1 still parses, as version 1 (import refuses it as unsigned).
  Result<Bundle> v1 = ParseBundle(SerializeBundle(Sample()));
  ASSERT_TRUE(v1.ok());
  EXPECT_EQ(v1->version, 1);
}

TEST(BundleV2, Errors) {
  const std::string good = SerializeBundle(SampleV2());
  EXPECT_TRUE(IsInvalid(ParseBundle(good.substr(0, good.size() - 1)).status(),
                        "bundle is truncated (no newline at end)"));
  EXPECT_TRUE(
      IsInvalid(ParseBundle(good.substr(0, good.rfind("signature "))).status(),
                "bundle is truncated (no signature line)"));
  EXPECT_TRUE(IsInvalid(ParseBundle(good + "x\n").status(),
                        "bundle has content after the signature line"));
  EXPECT_TRUE(IsInvalid(ParseBundle(V2With(11, "signature abcd")).status(),
                        "bundle signature line: expected 128 hex digits"));
  EXPECT_TRUE(IsInvalid(ParseBundle(V2With(5, "recipient -")).status(),
                        "bundle line 6 (recipient): hex string has odd"));
  EXPECT_TRUE(IsInvalid(
      ParseBundle(V2With(5, "recipient " + std::string(512, 'a'))).status(),
      "bundle line 6 (recipient): recipient longer than 255 bytes"));
  EXPECT_TRUE(IsInvalid(ParseBundle(V2With(5, "wrapping-key-id aa")).status(),
                        "bundle line 6: expected \"recipient <value>\""));
  EXPECT_TRUE(IsInvalid(ParseBundle(V2With(8, "created yesterday")).status(),
                        "bundle line 9 (created): "));
  EXPECT_TRUE(IsInvalid(
      ParseBundle(V2With(8, "created 2026-11-27T07:20:00+01:00")).status(),
      "bundle line 9 (created): time must be written as "
      "YYYY-MM-DDTHH:MM:SSZ"));
  EXPECT_TRUE(IsInvalid(ParseBundle(V2With(10, "signer abcd")).status(),
                        "bundle line 11 (signer): expected 64 hex digits, got "
                        "4"));
  EXPECT_TRUE(IsInvalid(ParseBundle(V2With(10, "note x")).status(),
                        "bundle line 11: expected \"signer <value>\""));
  // Another spelling of the same values is not the signed text.
  std::string upper = good;
  const size_t at = upper.find("\nrecipient ") + 11;
  upper[at] = 'A';
  EXPECT_TRUE(IsInvalid(ParseBundle(upper).status(),
                        "bundle is not in canonical form"));
  EXPECT_TRUE(
      IsInvalid(ParseBundle(V2With(1, "label web%20ticket%73")).status(),
                "bundle is not in canonical form"));
}

// A bundle of ratchet link j says so right after its check line; link 0
// (the master object) has no line, so bundles written before it still parse.
TEST(BundleV2, LinkLine) {
  EXPECT_EQ(SerializeBundle(SampleV2()).find("\nlink "), std::string::npos);
  Bundle b = SampleV2();
  b.link = 2;
  const std::string text = SerializeBundle(b);
  EXPECT_NE(text.find("\ncheck " + HexEncode(b.check) + "\nlink 2\nmechanism "),
            std::string::npos)
      << text;
  // Signed: the link line is part of the signed text.
  EXPECT_NE(BundleSignedText(b).find("\nlink 2\n"), std::string::npos);
  Result<Bundle> back = ParseBundle(text);
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(back->link, 2u);
  EXPECT_EQ(*back, b);
  b.link = kMaxBundleLink;
  back = ParseBundle(SerializeBundle(b));
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(back->link, kMaxBundleLink);

  // The link line inserted as line 4 of SampleV2's text.
  auto with_link = [](const std::string &line) {
    std::vector<std::string> lines = V2Lines();
    lines.insert(lines.begin() + 4, line);
    std::string out;
    for (const std::string &l : lines) out += l + "\n";
    return out;
  };
  ASSERT_TRUE(ParseBundle(with_link("link 7")).ok());
  // One spelling per number: link 0 is the absent line.
  EXPECT_TRUE(IsInvalid(ParseBundle(with_link("link 0")).status(),
                        "bundle line 5 (link): expected a decimal link index"));
  for (const char *bad : {"link 07", "link +7", "link -7", "link 7x",
                          "link 0x7", "link 18446744073709551617"}) {
    EXPECT_TRUE(IsInvalid(ParseBundle(with_link(bad)).status(),
                          "bundle line 5 (link): expected a decimal link"))
        << bad;
  }
  EXPECT_TRUE(IsInvalid(ParseBundle(with_link("link 281474976710657")).status(),
                        "bundle line 5 (link): link index above 2^48"));
  EXPECT_TRUE(IsInvalid(ParseBundle(with_link("link ")).status(),
                        "bundle line 5 (link): empty value"));
  // Only right after check, and at most once.
  std::vector<std::string> lines = V2Lines();
  lines.insert(lines.begin() + 5, "link 7");
  std::string late;
  for (const std::string &l : lines) late += l + "\n";
  EXPECT_TRUE(IsInvalid(ParseBundle(late).status(),
                        "bundle line 6: expected \"recipient <value>\""));
  std::vector<std::string> twice = V2Lines();
  twice.insert(twice.begin() + 4, "link 7");
  twice.insert(twice.begin() + 4, "link 7");
  std::string twice_text;
  for (const std::string &l : twice) twice_text += l + "\n";
  EXPECT_TRUE(IsInvalid(ParseBundle(twice_text).status(),
                        "bundle line 6: expected \"mechanism <value>\""));
  // Version 1 has no link line.
  std::vector<std::string> v1 = SampleLines();
  v1.insert(v1.begin() + 4, "link 7");
  std::string v1_body;
  for (const std::string &l : v1) v1_body += l + "\n";
  EXPECT_TRUE(IsInvalid(ParseBundle(Sign(v1_body)).status(),
                        "bundle line 5: expected \"mechanism <value>\""));
}

TEST(Base64, Rfc4648Vectors) {
  const std::pair<const char *, const char *> kVectors[] = {
      {"", ""},
      {"f", "Zg=="},
      {"fo", "Zm8="},
      {"foo", "Zm9v"},
      {"foob", "Zm9vYg=="},
      {"fooba", "Zm9vYmE="},
      {"foobar", "Zm9vYmFy"}};
  for (const auto &[plain, encoded] : kVectors) {
    const std::string p = plain;
    EXPECT_EQ(Base64Encode(ByteSpan(reinterpret_cast<const uint8_t *>(p.data()),
                                    p.size())),
              encoded);
    Result<SecretBuffer> d = Base64Decode(encoded);
    ASSERT_TRUE(d.ok()) << encoded;
    EXPECT_EQ(std::string(reinterpret_cast<const char *>(d->data()), d->size()),
              p);
  }
  EXPECT_EQ(Base64Encode(Bytes{0xfb, 0xff}), "+/8=");
  EXPECT_EQ(Base64Decode("+/8=")->size(), 2u);
}

TEST(Base64, StrictDecoding) {
  EXPECT_TRUE(IsInvalid(Base64Decode("Zg=").status(),
                        "invalid base64: length 3 is not a multiple of 4"));
  EXPECT_TRUE(IsInvalid(Base64Decode("Zm9v\n").status(), "length 5"));
  EXPECT_TRUE(IsInvalid(Base64Decode("Zh==").status(),
                        "invalid base64: non-canonical final character"));
  EXPECT_TRUE(IsInvalid(Base64Decode("Zm9=").status(), "non-canonical"));
  EXPECT_TRUE(IsInvalid(Base64Decode("=Zg=").status(),
                        "invalid base64: bad character at offset 0"));
  EXPECT_TRUE(IsInvalid(Base64Decode("Zg==Zg==").status(),
                        "bad character at offset 2"));
  EXPECT_TRUE(
      IsInvalid(Base64Decode("Z===").status(), "bad character at offset 1"));
  EXPECT_TRUE(
      IsInvalid(Base64Decode("====").status(), "bad character at offset 0"));
  EXPECT_TRUE(
      IsInvalid(Base64Decode("Zm 9").status(), "bad character at offset 2"));
  EXPECT_TRUE(
      IsInvalid(Base64Decode("Zm-_").status(), "bad character at offset 2"));
}

}  // namespace
}  // namespace hsmstek::keystore
