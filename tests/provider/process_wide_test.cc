// Process-wide routing (EVP_set_default_properties("?provider=hsmstek")):
// every HMAC of the process goes through the provider, and plain SSL_CTX_new
// servers still complete TLS 1.2 (CBC + HMAC records) and TLS 1.3 handshakes
// and resume with token tickets. A separate executable: it changes global
// OpenSSL state.
#include <gtest/gtest.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/kdf.h>

#include <cstring>

#include "provider/provider.h"
#include "provider_test_util.h"

namespace hsmstek::provider::testing {
namespace {

class ProcessWideTest : public ProviderTokenTest {
 protected:
  void SetUp() override {
    ProviderTokenTest::SetUp();
    if (HasFatalFailure()) return;
    Status enabled = EnableProcessWide();
    ASSERT_TRUE(enabled.ok()) << enabled.message();
    state_.aes = aes_ref_;
    state_.mac = mac_ref_;
    std::memcpy(state_.key_name.data(), Vectors().key_name.data(), 16);
    state_.cipher = cipher_;
  }

  // Plain SSL_CTX_new, as a server that creates its own contexts does.
  SslCtxPtr Server(int version) {
    SslCtxPtr ctx(SSL_CTX_new(TLS_server_method()));
    EXPECT_NE(ctx, nullptr);
    SSL_CTX_set_min_proto_version(ctx.get(), version);
    SSL_CTX_set_max_proto_version(ctx.get(), version);
    UseTestCertificate(ctx.get());
    InstallTicketCallback(ctx.get(), &state_);
    return ctx;
  }

  SslCtxPtr Client(int version) {
    SslCtxPtr ctx(SSL_CTX_new(TLS_client_method()));
    EXPECT_NE(ctx, nullptr);
    SSL_CTX_set_min_proto_version(ctx.get(), version);
    SSL_CTX_set_max_proto_version(ctx.get(), version);
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_NONE, nullptr);
    return ctx;
  }

  TicketCallbackState state_;
};

TEST_F(ProcessWideTest, UnqualifiedHmacFetchReturnsTheProvider) {
  MacPtr mac(EVP_MAC_fetch(nullptr, "HMAC", nullptr));
  ASSERT_NE(mac, nullptr);
  MacCtxPtr ctx(EVP_MAC_CTX_new(mac.get()));
  EXPECT_TRUE(IsProviderMac(ctx.get()));
}

TEST_F(ProcessWideTest, QMacAndHkdfStillComputeTheStandardValues) {
  // RFC 4231 test case 2 through EVP_Q_mac with no query.
  uint8_t out[32];
  size_t out_len = 0;
  ASSERT_NE(EVP_Q_mac(nullptr, "HMAC", nullptr, "SHA256", nullptr, "Jefe", 4,
                      reinterpret_cast<const uint8_t *>(
                          "what do ya want for nothing?"),
                      28, out, sizeof(out), &out_len),
            nullptr);
  EXPECT_EQ(HexEncode(ByteSpan(out, out_len)),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");

  // RFC 5869 test case 1: HKDF fetches HMAC internally.
  EVP_KDF *kdf = EVP_KDF_fetch(nullptr, "HKDF", nullptr);
  ASSERT_NE(kdf, nullptr);
  EVP_KDF_CTX *kctx = EVP_KDF_CTX_new(kdf);
  EVP_KDF_free(kdf);
  uint8_t ikm[22];
  std::memset(ikm, 0x0b, sizeof(ikm));
  uint8_t salt[13];
  for (int i = 0; i < 13; ++i) salt[i] = static_cast<uint8_t>(i);
  uint8_t info[10];
  for (int i = 0; i < 10; ++i) info[i] = static_cast<uint8_t>(0xf0 + i);
  char digest[] = "SHA256";
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, ikm, sizeof(ikm)),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, salt,
                                        sizeof(salt)),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, info,
                                        sizeof(info)),
      OSSL_PARAM_construct_end()};
  uint8_t okm[42];
  ASSERT_EQ(EVP_KDF_derive(kctx, okm, sizeof(okm), params), 1);
  EVP_KDF_CTX_free(kctx);
  EXPECT_EQ(
      HexEncode(ByteSpan(okm, sizeof(okm))),
      "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf3400"
      "7208d5b887185865");
}

TEST_F(ProcessWideTest, Tls12CbcHmacSuiteResumesOnAPlainSslCtx) {
  SslCtxPtr server = Server(TLS1_2_VERSION);
  SslCtxPtr client = Client(TLS1_2_VERSION);
  ASSERT_EQ(SSL_CTX_set_cipher_list(server.get(), "ECDHE-RSA-AES128-SHA256"),
            1);
  ASSERT_EQ(SSL_CTX_set_cipher_list(client.get(), "ECDHE-RSA-AES128-SHA256"),
            1);
  HandshakeOutcome full = RunHandshake(server.get(), client.get(), nullptr);
  ASSERT_TRUE(full.ok) << full.error;
  EXPECT_EQ(full.cipher, "ECDHE-RSA-AES128-SHA256");
  EXPECT_EQ(state_.not_our_mac.load(), 0);
  EXPECT_EQ(state_.issued.load(), 1);
  HandshakeOutcome resumed =
      RunHandshake(server.get(), client.get(), full.session.get());
  ASSERT_TRUE(resumed.ok) << resumed.error;
  EXPECT_TRUE(resumed.reused);
  EXPECT_EQ(state_.accepted.load(), 1);
  EXPECT_EQ(observer_->count(TokenOp::kDecrypt, true), 1);
}

TEST_F(ProcessWideTest, Tls13ResumesOnAPlainSslCtx) {
  SslCtxPtr server = Server(TLS1_3_VERSION);
  SslCtxPtr client = Client(TLS1_3_VERSION);
  HandshakeOutcome full = RunHandshake(server.get(), client.get(), nullptr);
  ASSERT_TRUE(full.ok) << full.error;
  EXPECT_EQ(state_.not_our_mac.load(), 0);
  EXPECT_GE(state_.issued.load(), 1);
  HandshakeOutcome resumed =
      RunHandshake(server.get(), client.get(), full.session.get());
  ASSERT_TRUE(resumed.ok) << resumed.error;
  EXPECT_TRUE(resumed.reused);
  EXPECT_EQ(state_.accepted.load(), 1);
}

TEST(ProcessWideFipsTest, RefusesWhenFipsIsADefaultProperty) {
  ASSERT_EQ(EVP_default_properties_enable_fips(nullptr, 1), 1);
  Status status = EnableProcessWide();
  EXPECT_EQ(status.code(), ErrorCode::kFailedPrecondition);
  EXPECT_NE(status.message().find("not FIPS validated"), std::string::npos)
      << status.message();
  // Nothing changed: fips=yes is still the default property.
  EXPECT_EQ(EVP_default_properties_is_fips_enabled(nullptr), 1);
  ASSERT_EQ(EVP_default_properties_enable_fips(nullptr, 0), 1);
  Status enabled = EnableProcessWide();
  EXPECT_TRUE(enabled.ok()) << enabled.message();
}

}  // namespace
}  // namespace hsmstek::provider::testing
