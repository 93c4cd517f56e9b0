// Real in-memory TLS 1.2 and 1.3 handshakes with the scoped query
// (SSL_CTX_new_ex(NULL, "?provider=hsmstek", ...)) and a minimal ticket
// callback on token keys: tickets are issued and resumed.
#include <gtest/gtest.h>
#include <openssl/err.h>
#include <openssl/provider.h>

#include <cstring>

#include "provider/provider.h"
#include "provider_test_util.h"

namespace hsmstek::provider::testing {
namespace {

class ScopedTlsTest : public ProviderTokenTest {
 protected:
  void SetUp() override {
    ProviderTokenTest::SetUp();
    if (HasFatalFailure()) return;
    state_.aes = aes_ref_;
    state_.mac = mac_ref_;
    std::memcpy(state_.key_name.data(), Vectors().key_name.data(), 16);
    state_.cipher = cipher_;
  }

  SslCtxPtr Server(int version, bool scoped = true) {
    SslCtxPtr ctx(SSL_CTX_new_ex(
        nullptr, scoped ? kPreferProviderQuery : nullptr, TLS_server_method()));
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

TEST_F(ScopedTlsTest, Tls12CbcHmacSuiteResumesWithTokenTicket) {
  SslCtxPtr server = Server(TLS1_2_VERSION);
  SslCtxPtr client = Client(TLS1_2_VERSION);
  // CBC + HMAC record protection: the record MAC and the PRF run through the
  // provider's HMAC (delegated) too.
  ASSERT_EQ(SSL_CTX_set_cipher_list(server.get(), "ECDHE-RSA-AES128-SHA256"),
            1);
  ASSERT_EQ(SSL_CTX_set_cipher_list(client.get(), "ECDHE-RSA-AES128-SHA256"),
            1);

  HandshakeOutcome full = RunHandshake(server.get(), client.get(), nullptr);
  ASSERT_TRUE(full.ok) << full.error;
  EXPECT_FALSE(full.reused);
  EXPECT_EQ(full.version, "TLSv1.2");
  EXPECT_EQ(full.cipher, "ECDHE-RSA-AES128-SHA256");
  EXPECT_EQ(state_.issued.load(), 1);
  EXPECT_EQ(state_.not_our_mac.load(), 0);
  ASSERT_TRUE(SSL_SESSION_has_ticket(full.session.get()));

  HandshakeOutcome resumed =
      RunHandshake(server.get(), client.get(), full.session.get());
  ASSERT_TRUE(resumed.ok) << resumed.error;
  EXPECT_TRUE(resumed.reused);
  EXPECT_EQ(state_.accepted.load(), 1);
  EXPECT_EQ(state_.failed.load(), 0);
  EXPECT_EQ(observer_->count(TokenOp::kEncrypt, true), 1);
  EXPECT_EQ(observer_->count(TokenOp::kDecrypt, true), 1);
  EXPECT_EQ(observer_->count(TokenOp::kSign, true), 2);  // seal + open
  EXPECT_EQ(observer_->count(TokenOp::kSign, false), 0);
}

TEST_F(ScopedTlsTest, Tls13ResumesWithTokenTicket) {
  SslCtxPtr server = Server(TLS1_3_VERSION);
  SslCtxPtr client = Client(TLS1_3_VERSION);

  HandshakeOutcome full = RunHandshake(server.get(), client.get(), nullptr);
  ASSERT_TRUE(full.ok) << full.error;
  EXPECT_FALSE(full.reused);
  EXPECT_EQ(full.version, "TLSv1.3");
  EXPECT_GE(state_.issued.load(), 1);  // OpenSSL sends two tickets
  ASSERT_TRUE(SSL_SESSION_is_resumable(full.session.get()));

  HandshakeOutcome resumed =
      RunHandshake(server.get(), client.get(), full.session.get());
  ASSERT_TRUE(resumed.ok) << resumed.error;
  EXPECT_TRUE(resumed.reused);  // the PSK binder was checked (HMAC dup)
  EXPECT_EQ(state_.accepted.load(), 1);
  EXPECT_EQ(state_.failed.load(), 0);
  EXPECT_EQ(state_.not_our_mac.load(), 0);
  EXPECT_EQ(observer_->count(TokenOp::kDecrypt, true), 1);
  EXPECT_EQ(observer_->count(TokenOp::kEncrypt, false), 0);
}

TEST_F(ScopedTlsTest, WithoutTheScopedQueryTheCallbackIssuesNoTicket) {
  SslCtxPtr server = Server(TLS1_3_VERSION, /*scoped=*/false);
  SslCtxPtr client = Client(TLS1_3_VERSION);
  HandshakeOutcome full = RunHandshake(server.get(), client.get(), nullptr);
  ASSERT_TRUE(full.ok) << full.error;  // full handshakes keep working
  EXPECT_GE(state_.not_our_mac.load(), 1);
  EXPECT_EQ(state_.issued.load(), 0);
  EXPECT_EQ(observer_->count(TokenOp::kEncrypt, true), 0);
  HandshakeOutcome again =
      RunHandshake(server.get(), client.get(), full.session.get());
  ASSERT_TRUE(again.ok) << again.error;
  EXPECT_FALSE(again.reused);
}

// Token trouble after the callback returned 1 (here: a reconnect makes the
// refs stale) hits the lazy token operations inside libssl, which treats a
// failing ticket cipher or MAC as fatal for the handshake.
TEST_F(ScopedTlsTest, TokenFailureAfterTheCallbackAbortsTheHandshake) {
  for (int version : {TLS1_2_VERSION, TLS1_3_VERSION}) {
    Result<TokenKeys> keys = CreateKnownAnswerKeys(*token_);
    ASSERT_TRUE(keys.ok()) << keys.status().message();
    state_.aes = MakeRef(token_, keys->aes, observer_);
    state_.mac = MakeRef(token_, keys->hmac, observer_);
    SslCtxPtr server = Server(version);
    SslCtxPtr client = Client(version);
    HandshakeOutcome full = RunHandshake(server.get(), client.get(), nullptr);
    ASSERT_TRUE(full.ok) << full.error;
    token_->Disconnect();
    ASSERT_TRUE(token_->Connect().ok());

    HandshakeOutcome resumed =
        RunHandshake(server.get(), client.get(), full.session.get());
    EXPECT_FALSE(resumed.ok);
    EXPECT_NE(resumed.error.find("stale key handle"), std::string::npos)
        << resumed.error;
    HandshakeOutcome issuing =
        RunHandshake(server.get(), client.get(), nullptr);
    EXPECT_FALSE(issuing.ok);
    EXPECT_NE(issuing.error.find("stale key handle"), std::string::npos)
        << issuing.error;
  }
}

// With kFailSoftParam the same trouble costs only the resumption: full
// handshakes complete, and a ticket sealed while the token failed is
// unusable (a full handshake later), never fatal.
TEST_F(ScopedTlsTest, FailSoftKeepsHandshakesAliveWhenTheTokenFails) {
  state_.fail_soft = true;
  for (int version : {TLS1_2_VERSION, TLS1_3_VERSION}) {
    Result<TokenKeys> keys = CreateKnownAnswerKeys(*token_);
    ASSERT_TRUE(keys.ok()) << keys.status().message();
    state_.aes = MakeRef(token_, keys->aes, observer_);
    state_.mac = MakeRef(token_, keys->hmac, observer_);
    SslCtxPtr server = Server(version);
    SslCtxPtr client = Client(version);
    HandshakeOutcome full = RunHandshake(server.get(), client.get(), nullptr);
    ASSERT_TRUE(full.ok) << full.error;
    token_->Disconnect();
    ASSERT_TRUE(token_->Connect().ok());
    int sign_failures = observer_->count(TokenOp::kSign, false);

    // Opening fails in the token: a full handshake instead.
    HandshakeOutcome resumed =
        RunHandshake(server.get(), client.get(), full.session.get());
    ASSERT_TRUE(resumed.ok) << resumed.error;
    EXPECT_FALSE(resumed.reused);
    EXPECT_GT(observer_->count(TokenOp::kSign, false), sign_failures);

    // Sealing fails in the token: the handshake completes with a junk
    // ticket, which the token refuses later (a full handshake).
    HandshakeOutcome junk = RunHandshake(server.get(), client.get(), nullptr);
    ASSERT_TRUE(junk.ok) << junk.error;
    Result<TokenKeys> fresh = CreateKnownAnswerKeys(*token_);
    ASSERT_TRUE(fresh.ok()) << fresh.status().message();
    state_.aes = MakeRef(token_, fresh->aes, observer_);
    state_.mac = MakeRef(token_, fresh->hmac, observer_);
    HandshakeOutcome after =
        RunHandshake(server.get(), client.get(), junk.session.get());
    ASSERT_TRUE(after.ok) << after.error;
    EXPECT_FALSE(after.reused);
    // The healthy token's tickets resume again.
    HandshakeOutcome again =
        RunHandshake(server.get(), client.get(), after.session.get());
    ASSERT_TRUE(again.ok) << again.error;
    EXPECT_TRUE(again.reused);
  }
}

TEST(ProviderRegistrationTest, IsIdempotentAndKeepsTheDefaultProvider) {
  ASSERT_TRUE(RegisterProvider().ok());
  ASSERT_TRUE(RegisterProvider().ok());
  EXPECT_EQ(OSSL_PROVIDER_available(nullptr, "hsmstek"), 1);
  EXPECT_EQ(OSSL_PROVIDER_available(nullptr, "default"), 1);
  // Unqualified fetches still get the default provider's algorithms.
  EVP_MD *sha = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  ASSERT_NE(sha, nullptr);
  EXPECT_STREQ(OSSL_PROVIDER_get0_name(EVP_MD_get0_provider(sha)), "default");
  EVP_MD_free(sha);
  Result<const EVP_CIPHER *> first = TicketCipher();
  Result<const EVP_CIPHER *> second = TicketCipher();
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_EQ(*first, *second);
}

}  // namespace
}  // namespace hsmstek::provider::testing
