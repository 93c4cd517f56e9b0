#include "keystore/legacy_file.h"

#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <string>
#include <vector>

#include "common/bytes.h"
#include "formats_test_util.h"

namespace hsmstek::keystore {
namespace {

using testing::IsInvalid;

// Bytes start, start+1, ... (distinct, never a repeated byte).
Bytes Seq(uint8_t start, size_t n) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(start + i);
  return b;
}

Bytes Cat(std::initializer_list<Bytes> parts) {
  Bytes out;
  for (const Bytes &p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

// Base64 by OpenSSL directly, independent of the code under test.
std::string B64(const Bytes &b) {
  std::string out(b.size() / 3 * 4 + 8, '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char *>(out.data()),
                          b.data(), static_cast<int>(b.size()));
  out.resize(n);
  return out;
}

ByteSpan Span(const std::string &s) {
  return ByteSpan(reinterpret_cast<const uint8_t *>(s.data()), s.size());
}

Result<std::vector<LegacyKey>> Nginx(const Bytes &b) {
  return ParseLegacyKeyFile(LegacyFormat::kNginx, b);
}

Result<std::vector<LegacyKey>> Haproxy(const std::string &s) {
  return ParseLegacyKeyFile(LegacyFormat::kHaproxy, Span(s));
}

Bytes ToBytes(const SecretBuffer &b) {
  return Bytes(b.data(), b.data() + b.size());
}

const Bytes kName = Seq(0x10, 16);
const Bytes kName2 = Seq(0x90, 16);
const Bytes kA16 = Seq(0x20, 16);
const Bytes kH16 = Seq(0x40, 16);
const Bytes kA32 = Seq(0x60, 32);
const Bytes kH32 = Seq(0xa0, 32);

TEST(LegacyFormat, Names) {
  EXPECT_EQ(*ParseLegacyFormat("nginx"), LegacyFormat::kNginx);
  EXPECT_EQ(*ParseLegacyFormat("haproxy"), LegacyFormat::kHaproxy);
  EXPECT_TRUE(IsInvalid(ParseLegacyFormat("NGINX").status(),
                        "unknown legacy key file format (expected nginx or "
                        "haproxy)"));
  EXPECT_TRUE(IsInvalid(ParseLegacyFormat("").status(), "unknown legacy"));
  EXPECT_EQ(LegacyFormatName(LegacyFormat::kNginx), "nginx");
  EXPECT_EQ(LegacyFormatName(LegacyFormat::kHaproxy), "haproxy");
}

TEST(NginxKeyFile, Aes128Layout) {
  auto keys = Nginx(Cat({kName, kA16, kH16}));
  ASSERT_TRUE(keys.ok()) << keys.status().message();
  ASSERT_EQ(keys->size(), 1u);
  const LegacyKey &k = (*keys)[0];
  EXPECT_EQ(Bytes(k.name.begin(), k.name.end()), kName);
  EXPECT_EQ(ToBytes(k.aes_key), kA16);
  EXPECT_EQ(ToBytes(k.hmac_key), kH16);
}

TEST(NginxKeyFile, Aes256LayoutHasHmacFirst) {
  auto keys = Nginx(Cat({kName, kH32, kA32}));
  ASSERT_TRUE(keys.ok()) << keys.status().message();
  ASSERT_EQ(keys->size(), 1u);
  const LegacyKey &k = (*keys)[0];
  EXPECT_EQ(Bytes(k.name.begin(), k.name.end()), kName);
  EXPECT_EQ(ToBytes(k.hmac_key), kH32);
  EXPECT_EQ(ToBytes(k.aes_key), kA32);
}

TEST(NginxKeyFile, Sizes) {
  EXPECT_TRUE(IsInvalid(Nginx(Bytes()).status(), "nginx key file is empty"));
  EXPECT_TRUE(IsInvalid(
      Nginx(Seq(1, 47)).status(),
      "nginx key file is 47 bytes; expected 48 (name, AES-128, HMAC) or 80 "
      "(name, HMAC, AES-256)"));
  EXPECT_TRUE(IsInvalid(Nginx(Seq(1, 49)).status(), "is 49 bytes; expected"));
  EXPECT_TRUE(IsInvalid(Nginx(Seq(1, 81)).status(), "is 81 bytes; expected"));
  // A trailing newline is not tolerated in the binary format.
  Bytes with_newline = Cat({kName, kA16, kH16, Bytes{'\n'}});
  EXPECT_TRUE(IsInvalid(Nginx(with_newline).status(), "is 49 bytes"));
  EXPECT_TRUE(IsInvalid(Nginx(Seq(1, 65537)).status(),
                        "legacy key file is 65537 bytes, more than 65536"));
}

TEST(NginxKeyFile, WeakKeys) {
  EXPECT_TRUE(IsInvalid(Nginx(Cat({Bytes(16, 0), kA16, kH16})).status(),
                        "nginx key file: key name is all zeros"));
  EXPECT_TRUE(IsInvalid(Nginx(Cat({kName, Bytes(16, 0), kH16})).status(),
                        "nginx key file: AES key is all zeros"));
  EXPECT_TRUE(IsInvalid(Nginx(Cat({kName, kA16, Bytes(16, 0)})).status(),
                        "nginx key file: HMAC key is all zeros"));
  EXPECT_TRUE(IsInvalid(Nginx(Cat({kName, kH32, Bytes(32, 0xaa)})).status(),
                        "nginx key file: AES key is a single repeated byte"));
  EXPECT_TRUE(IsInvalid(Nginx(Cat({kName, Bytes(32, 0xff), kA32})).status(),
                        "nginx key file: HMAC key is a single repeated byte"));
  EXPECT_TRUE(IsInvalid(Nginx(Cat({kName, kA32, kA32})).status(),
                        "nginx key file: AES key and HMAC key are identical"));
  EXPECT_TRUE(IsInvalid(Nginx(Cat({kName, kA16, kA16})).status(),
                        "AES key and HMAC key are identical"));
  // A repeated-byte name is unusual but public and harmless: accepted.
  EXPECT_TRUE(Nginx(Cat({Bytes(16, 0x41), kA16, kH16})).ok());
  // Keys that differ in one byte only are not "repeated".
  Bytes almost = Bytes(32, 0x55);
  almost[31] = 0x56;
  EXPECT_TRUE(Nginx(Cat({kName, kH32, almost})).ok());
}

TEST(HaproxyKeyFile, LayoutsOrderAndTolerance) {
  const std::string text =
      "# tls-ticket-keys\n"
      "\n" +
      B64(Cat({kName, kA16, kH16})) + "\r\n" +  // CRLF
      "   \n" +                                 // whitespace only
      B64(Cat({kName2, kA32, kH32})) + " \t\n" + "#" +
      B64(Cat({Seq(0x33, 16), kA16, kH16})) + "\n" +  // commented out
      B64(Cat({Seq(0x01, 16), kH32, kA32}));          // no final newline
  auto keys = Haproxy(text);
  ASSERT_TRUE(keys.ok()) << keys.status().message();
  ASSERT_EQ(keys->size(), 3u);
  EXPECT_EQ(Bytes((*keys)[0].name.begin(), (*keys)[0].name.end()), kName);
  EXPECT_EQ(ToBytes((*keys)[0].aes_key), kA16);
  EXPECT_EQ(ToBytes((*keys)[0].hmac_key), kH16);
  // HAProxy's 80-byte records put the AES key first (unlike nginx).
  EXPECT_EQ(Bytes((*keys)[1].name.begin(), (*keys)[1].name.end()), kName2);
  EXPECT_EQ(ToBytes((*keys)[1].aes_key), kA32);
  EXPECT_EQ(ToBytes((*keys)[1].hmac_key), kH32);
  EXPECT_EQ(ToBytes((*keys)[2].aes_key), kH32);
  EXPECT_EQ(ToBytes((*keys)[2].hmac_key), kA32);
}

TEST(HaproxyKeyFile, NoKeys) {
  EXPECT_TRUE(IsInvalid(Haproxy("").status(), "haproxy key file has no keys"));
  EXPECT_TRUE(IsInvalid(Haproxy("# only a comment\n\n \r\n").status(),
                        "haproxy key file has no keys"));
}

TEST(HaproxyKeyFile, Sizes) {
  const std::string good = B64(Cat({kName, kA16, kH16})) + "\n";
  EXPECT_TRUE(IsInvalid(
      Haproxy(good + B64(Seq(1, 64)) + "\n").status(),
      "haproxy key file line 2: key is 64 bytes; expected 48 (name, AES-128, "
      "HMAC) or 80 (name, AES-256, HMAC)"));
  EXPECT_TRUE(
      IsInvalid(Haproxy(B64(Seq(1, 47))).status(), "line 1: key is 47 bytes"));
  EXPECT_TRUE(
      IsInvalid(Haproxy(B64(Seq(1, 81))).status(), "line 1: key is 81 bytes"));
  std::string big;
  while (big.size() <= kMaxLegacyKeyFileSize) big += "#\n";
  EXPECT_TRUE(IsInvalid(Haproxy(big).status(), "more than 65536"));
}

TEST(HaproxyKeyFile, BadBase64) {
  const std::string good = B64(Cat({kName, kA16, kH16}));
  std::string bad = good;
  bad[10] = '*';
  EXPECT_TRUE(IsInvalid(Haproxy("#\n\n" + bad + "\n").status(),
                        "haproxy key file line 3: invalid base64: bad "
                        "character at offset 10"));
  EXPECT_TRUE(IsInvalid(Haproxy(good.substr(1)).status(),
                        "line 1: invalid base64: length 63 is not a multiple "
                        "of 4"));
  // Not " " + good.substr(1): GCC 12 -O3 reports a false -Wrestrict there.
  std::string leading_space = good;
  leading_space[0] = ' ';
  EXPECT_TRUE(IsInvalid(Haproxy(leading_space).status(),
                        "line 1: invalid base64: bad character at offset 0"));
  EXPECT_TRUE(
      IsInvalid(Haproxy(good.substr(0, 32) + " " + good.substr(33)).status(),
                "line 1: invalid base64"));
  // 80 bytes encode with one '=' of padding; a non-zero final bit is
  // refused as non-canonical.
  std::string b80 = B64(Cat({kName, kA32, kH32}));
  ASSERT_EQ(b80.back(), '=');
  ASSERT_NE(b80[b80.size() - 2], '=');
  b80[b80.size() - 2] = 'B';  // value 1: low bit set
  EXPECT_TRUE(IsInvalid(Haproxy(b80).status(),
                        "line 1: invalid base64: non-canonical final "
                        "character"));
}

TEST(HaproxyKeyFile, WeakAndDuplicateKeys) {
  const std::string k1 = B64(Cat({kName, kA16, kH16}));
  EXPECT_TRUE(
      IsInvalid(Haproxy(k1 + "\n" + B64(Cat({kName2, kA32, kA32}))).status(),
                "haproxy key file line 2: AES key and HMAC key are "
                "identical"));
  EXPECT_TRUE(IsInvalid(Haproxy(B64(Cat({Bytes(16, 0), kA32, kH32}))).status(),
                        "line 1: key name is all zeros"));
  EXPECT_TRUE(IsInvalid(Haproxy(B64(Cat({kName, Bytes(32, 0), kH32}))).status(),
                        "line 1: AES key is all zeros"));
  EXPECT_TRUE(IsInvalid(Haproxy(B64(Cat({kName, kA32, Bytes(32, 7)}))).status(),
                        "line 1: HMAC key is a single repeated byte"));
  // Same name, different keys and sizes: still a duplicate.
  EXPECT_TRUE(IsInvalid(
      Haproxy(k1 + "\n# c\n" + B64(Cat({kName2, kA32, kH32})) + "\n" +
              B64(Cat({kName, kA32, kH32})) + "\n")
          .status(),
      "haproxy key file line 4: duplicate key name (also on line 1)"));
}

TEST(LegacyKeyFile, MessagesNeverContainKeyMaterial) {
  const Bytes secret = Cat({kName, kA32, kA32});
  const std::string line = B64(secret);
  for (const Status &s :
       {Nginx(secret).status(), Haproxy(line).status(),
        Haproxy(line.substr(0, 100) + "*" + line.substr(101)).status()}) {
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.message().find(HexEncode(kA32).substr(0, 8)),
              std::string::npos);
    EXPECT_EQ(s.message().find(line.substr(24, 8)), std::string::npos);
    EXPECT_LT(s.message().size(), 120u) << s.message();
  }
}

}  // namespace
}  // namespace hsmstek::keystore
