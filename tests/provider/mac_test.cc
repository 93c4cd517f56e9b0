// The provider's HMAC: token mode on a SoftHSM key, and raw-key delegation
// checked against the default provider's HMAC.
#include <gtest/gtest.h>
#include <openssl/core_names.h>
#include <openssl/err.h>

#include <string>
#include <vector>

#include "provider/provider.h"
#include "provider_test_util.h"

namespace hsmstek::provider::testing {
namespace {

using MacTest = ProviderTokenTest;

Bytes TicketMacInput() {
  Bytes in = Vectors().key_name;
  in.insert(in.end(), Vectors().iv.begin(), Vectors().iv.end());
  in.insert(in.end(), Vectors().ciphertext.begin(), Vectors().ciphertext.end());
  return in;
}

MacCtxPtr NewMacCtx(const char *query) {
  MacPtr mac(EVP_MAC_fetch(nullptr, "HMAC", query));
  EXPECT_NE(mac, nullptr) << query;
  if (!mac) return nullptr;
  return MacCtxPtr(EVP_MAC_CTX_new(mac.get()));
}

Bytes Final(EVP_MAC_CTX *ctx) {
  Bytes out(EVP_MAC_CTX_get_mac_size(ctx));
  size_t n = 0;
  if (!EVP_MAC_final(ctx, out.data(), &n, out.size())) return Bytes();
  out.resize(n);
  return out;
}

OSSL_PARAM DigestParam(const char *name) {
  return OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST,
                                          const_cast<char *>(name), 0);
}

// HMAC of `data` under `key` through the HMAC that `query` selects, using
// set_params for the digest and init for the key.
Bytes RawHmac(const char *query, const char *digest, const Bytes &key,
              const Bytes &data) {
  MacCtxPtr ctx = NewMacCtx(query);
  OSSL_PARAM params[] = {DigestParam(digest), OSSL_PARAM_construct_end()};
  // A null key means "keep the current key": pass a real pointer for an
  // empty key.
  static const uint8_t kEmpty = 0;
  const uint8_t *key_data = key.empty() ? &kEmpty : key.data();
  if (!ctx || !EVP_MAC_init(ctx.get(), key_data, key.size(), params) ||
      !EVP_MAC_update(ctx.get(), data.data(), data.size())) {
    return Bytes();
  }
  return Final(ctx.get());
}

TEST_F(MacTest, TokenHmacMatchesKnownAnswerWithSetParamsOnly) {
  MacCtxPtr ctx = NewMacCtx("provider=hsmstek");
  ASSERT_NE(ctx, nullptr);
  EXPECT_TRUE(IsProviderMac(ctx.get()));
  const TokenKeyRef *ref = &mac_ref_;
  OSSL_PARAM params[] = {KeyRefParam(&ref), DigestParam("SHA256"),
                         OSSL_PARAM_construct_end()};
  ASSERT_TRUE(EVP_MAC_CTX_set_params(ctx.get(), params));
  EXPECT_EQ(EVP_MAC_CTX_get_mac_size(ctx.get()), 32u);  // before final
  Bytes in = TicketMacInput();
  ASSERT_TRUE(EVP_MAC_update(ctx.get(), in.data(), 16));  // in pieces
  ASSERT_TRUE(EVP_MAC_update(ctx.get(), in.data() + 16, in.size() - 16));
  EXPECT_EQ(HexEncode(Final(ctx.get())), HexEncode(Vectors().hmac))
      << TakeProviderError().printed;
  EXPECT_EQ(observer_->count(TokenOp::kSign, true), 1);
}

TEST_F(MacTest, TokenHmacThroughInitParams) {
  MacCtxPtr ctx = NewMacCtx("provider=hsmstek");
  const TokenKeyRef *ref = &mac_ref_;
  OSSL_PARAM params[] = {KeyRefParam(&ref), DigestParam("SHA2-256"),
                         OSSL_PARAM_construct_end()};
  ASSERT_TRUE(EVP_MAC_init(ctx.get(), nullptr, 0, params));
  Bytes in = TicketMacInput();
  ASSERT_TRUE(EVP_MAC_update(ctx.get(), in.data(), in.size()));
  EXPECT_EQ(Final(ctx.get()), Vectors().hmac);
  // After final the same key MACs again from scratch.
  ASSERT_TRUE(EVP_MAC_update(ctx.get(), in.data(), in.size()));
  EXPECT_EQ(Final(ctx.get()), Vectors().hmac);
}

TEST_F(MacTest, TokenHmacAcceptsEverySha256Alias) {
  for (const char *name : {"sha256", "SHA-256", "2.16.840.1.101.3.4.2.1"}) {
    MacCtxPtr ctx = NewMacCtx("provider=hsmstek");
    const TokenKeyRef *ref = &mac_ref_;
    OSSL_PARAM params[] = {KeyRefParam(&ref), DigestParam(name),
                           OSSL_PARAM_construct_end()};
    ASSERT_TRUE(EVP_MAC_CTX_set_params(ctx.get(), params)) << name;
    Bytes in = TicketMacInput();
    ASSERT_TRUE(EVP_MAC_update(ctx.get(), in.data(), in.size()));
    EXPECT_EQ(Final(ctx.get()), Vectors().hmac) << name;
  }
  EXPECT_EQ(ERR_peek_error(), 0u);
}

TEST_F(MacTest, TokenHmacDuplicatedMidStream) {
  MacCtxPtr ctx = NewMacCtx("provider=hsmstek");
  const TokenKeyRef *ref = &mac_ref_;
  OSSL_PARAM params[] = {KeyRefParam(&ref), OSSL_PARAM_construct_end()};
  ASSERT_TRUE(EVP_MAC_CTX_set_params(ctx.get(), params));
  Bytes in = TicketMacInput();
  ASSERT_TRUE(EVP_MAC_update(ctx.get(), in.data(), 20));
  MacCtxPtr dup(EVP_MAC_CTX_dup(ctx.get()));
  ASSERT_NE(dup, nullptr);
  ASSERT_TRUE(EVP_MAC_update(ctx.get(), in.data() + 20, in.size() - 20));
  ASSERT_TRUE(EVP_MAC_update(dup.get(), in.data() + 20, in.size() - 20));
  ctx.reset();  // the duplicate owns its own copy of the ref and data
  EXPECT_EQ(Final(dup.get()), Vectors().hmac);
}

TEST_F(MacTest, TokenHmacRefusesOtherDigests) {
  MacCtxPtr ctx = NewMacCtx("provider=hsmstek");
  const TokenKeyRef *ref = &mac_ref_;
  OSSL_PARAM params[] = {KeyRefParam(&ref), DigestParam("SHA384"),
                         OSSL_PARAM_construct_end()};
  ASSERT_TRUE(EVP_MAC_CTX_set_params(ctx.get(), params));
  ASSERT_TRUE(EVP_MAC_update(ctx.get(), Vectors().iv.data(), 16));
  uint8_t out[64];
  size_t n = 0;
  EXPECT_FALSE(EVP_MAC_final(ctx.get(), out, &n, sizeof(out)));
  ProviderError error = TakeProviderError();
  EXPECT_EQ(error.reason, ProviderReason::kUnsupportedDigest) << error.printed;
  EXPECT_NE(error.data.find("only SHA-256, not SHA384"), std::string::npos)
      << error.data;
  EXPECT_EQ(observer_->count(TokenOp::kSign, false), 0);  // never sent
}

TEST_F(MacTest, TokenHmacInputIsBounded) {
  MacCtxPtr ctx = NewMacCtx("provider=hsmstek");
  const TokenKeyRef *ref = &mac_ref_;
  OSSL_PARAM params[] = {KeyRefParam(&ref), OSSL_PARAM_construct_end()};
  ASSERT_TRUE(EVP_MAC_CTX_set_params(ctx.get(), params));
  Bytes big(kMaxTokenMacInput);
  ASSERT_TRUE(EVP_MAC_update(ctx.get(), big.data(), big.size()));
  EXPECT_FALSE(EVP_MAC_update(ctx.get(), big.data(), 1));
  ProviderError error = TakeProviderError();
  EXPECT_EQ(error.reason, ProviderReason::kInvalidLength) << error.printed;
  EXPECT_NE(error.data.find("exceeds 65536 bytes"), std::string::npos);
}

TEST_F(MacTest, StaleTokenHmacFailsWithoutCrash) {
  TokenKeyRef stale = mac_ref_;
  token_->Disconnect();
  Status reconnected = token_->Connect();
  ASSERT_TRUE(reconnected.ok()) << reconnected.message();
  Bytes out;
  EXPECT_FALSE(RunTokenMac(stale, TicketMacInput(), &out));
  ProviderError error = TakeProviderError();
  EXPECT_EQ(error.reason, ProviderReason::kStaleKeyHandle) << error.printed;
  EXPECT_EQ(observer_->count(TokenOp::kSign, false), 1);
}

TEST_F(MacTest, FailSoftStandsInWithARandomMacAndRaisesNothing) {
  TokenKeyRef stale = mac_ref_;
  stale.generation += 1;
  Bytes first;
  Bytes second;
  ASSERT_TRUE(RunTokenMac(stale, TicketMacInput(), &first, /*fail_soft=*/true));
  ASSERT_TRUE(
      RunTokenMac(stale, TicketMacInput(), &second, /*fail_soft=*/true));
  EXPECT_EQ(ERR_peek_error(), 0u);
  EXPECT_EQ(first.size(), 32u);
  EXPECT_NE(first, Vectors().hmac);
  EXPECT_NE(first, second);
  EXPECT_EQ(observer_->count(TokenOp::kSign, false), 2);
}

TEST_F(MacTest, TokenHmacWithAnEncryptionKeyNamesTheCkr) {
  TokenKeyRef wrong = MakeRef(token_, keys_.aes, observer_);
  Bytes out;
  EXPECT_FALSE(RunTokenMac(wrong, TicketMacInput(), &out));
  ProviderError error = TakeProviderError();
  EXPECT_EQ(error.reason, ProviderReason::kTokenOperationFailed)
      << error.printed;
  EXPECT_EQ(error.data.rfind("C_SignInit: CKR_", 0), 0u) << error.data;
  EXPECT_EQ(observer_->count(TokenOp::kSign, false), 1);
}

TEST_F(MacTest, RawKeyAndKeyRefTogetherAreRejected) {
  MacCtxPtr ctx = NewMacCtx("provider=hsmstek");
  const TokenKeyRef *ref = &mac_ref_;
  uint8_t key[32] = {};
  OSSL_PARAM params[] = {
      KeyRefParam(&ref),
      OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, key, sizeof(key)),
      OSSL_PARAM_construct_end()};
  EXPECT_FALSE(EVP_MAC_CTX_set_params(ctx.get(), params));
  ProviderError error = TakeProviderError();
  EXPECT_EQ(error.reason, ProviderReason::kConflictingKeys) << error.printed;
}

TEST_F(MacTest, WrongMagicIsRejected) {
  TokenKeyRef ref = mac_ref_;
  ref.magic = ~TokenKeyRef::kMagic;
  MacCtxPtr ctx = NewMacCtx("provider=hsmstek");
  const TokenKeyRef *ref_ptr = &ref;
  OSSL_PARAM params[] = {KeyRefParam(&ref_ptr), OSSL_PARAM_construct_end()};
  EXPECT_FALSE(EVP_MAC_CTX_set_params(ctx.get(), params));
  ProviderError error = TakeProviderError();
  EXPECT_EQ(error.reason, ProviderReason::kInvalidKeyRef) << error.printed;
  EXPECT_NE(error.data.find("bad magic"), std::string::npos);
}

TEST_F(MacTest, RawKeyHmacEqualsDefaultProvider) {
  for (const char *digest :
       {"SHA1", "SHA256", "SHA2-256", "SHA384", "SHA512", "SHA3-256"}) {
    for (size_t key_len : {0, 16, 32, 64, 200}) {
      for (size_t data_len : {0, 1, 64, 1000}) {
        Bytes key(key_len, 0x0b);
        Bytes data(data_len);
        for (size_t i = 0; i < data_len; ++i) data[i] = static_cast<uint8_t>(i);
        Bytes ours = RawHmac("provider=hsmstek", digest, key, data);
        Bytes reference = RawHmac("provider=default", digest, key, data);
        ASSERT_FALSE(reference.empty());
        EXPECT_EQ(ours, reference)
            << digest << " key " << key_len << " data " << data_len << ": "
            << TakeProviderError().printed;
      }
    }
  }
}

TEST_F(MacTest, RawKeyThroughSetParamsEqualsDefault) {
  Bytes key(48, 0x5a);
  Bytes data(300, 0x11);
  MacCtxPtr ctx = NewMacCtx("provider=hsmstek");
  OSSL_PARAM params[] = {DigestParam("SHA512"),
                         OSSL_PARAM_construct_octet_string(
                             OSSL_MAC_PARAM_KEY, key.data(), key.size()),
                         OSSL_PARAM_construct_end()};
  ASSERT_TRUE(EVP_MAC_CTX_set_params(ctx.get(), params));
  EXPECT_EQ(EVP_MAC_CTX_get_mac_size(ctx.get()), 64u);
  ASSERT_TRUE(EVP_MAC_update(ctx.get(), data.data(), data.size()));
  EXPECT_EQ(Final(ctx.get()), RawHmac("provider=default", "SHA512", key, data));
}

TEST_F(MacTest, RawKeyDuplicatedMidStreamEqualsDefault) {
  Bytes key(32, 0x42);
  Bytes data(500, 0x24);
  MacCtxPtr ctx = NewMacCtx("provider=hsmstek");
  OSSL_PARAM params[] = {DigestParam("SHA384"), OSSL_PARAM_construct_end()};
  ASSERT_TRUE(EVP_MAC_init(ctx.get(), key.data(), key.size(), params));
  ASSERT_TRUE(EVP_MAC_update(ctx.get(), data.data(), 100));
  MacCtxPtr dup(EVP_MAC_CTX_dup(ctx.get()));
  ASSERT_NE(dup, nullptr);
  EXPECT_TRUE(IsProviderMac(dup.get()));
  ASSERT_TRUE(EVP_MAC_update(dup.get(), data.data() + 100, 400));
  ASSERT_TRUE(EVP_MAC_update(ctx.get(), data.data() + 100, 400));
  Bytes expected = RawHmac("provider=default", "SHA384", key, data);
  EXPECT_EQ(Final(dup.get()), expected);
  EXPECT_EQ(Final(ctx.get()), expected);
}

TEST_F(MacTest, RawKeyAfterTokenModeSwitchesToDelegation) {
  MacCtxPtr ctx = NewMacCtx("provider=hsmstek");
  const TokenKeyRef *ref = &mac_ref_;
  OSSL_PARAM params[] = {KeyRefParam(&ref), DigestParam("SHA256"),
                         OSSL_PARAM_construct_end()};
  ASSERT_TRUE(EVP_MAC_CTX_set_params(ctx.get(), params));
  ASSERT_TRUE(EVP_MAC_update(ctx.get(), Vectors().iv.data(), 16));
  Bytes key(32, 7);
  ASSERT_TRUE(EVP_MAC_init(ctx.get(), key.data(), key.size(), nullptr));
  Bytes data(40, 9);
  ASSERT_TRUE(EVP_MAC_update(ctx.get(), data.data(), data.size()));
  EXPECT_EQ(Final(ctx.get()), RawHmac("provider=default", "SHA256", key, data));
  EXPECT_EQ(observer_->count(TokenOp::kSign, true), 0);
}

TEST_F(MacTest, QMacEqualsDefault) {
  const char key[] = "Jefe";
  const char data[] = "what do ya want for nothing?";
  uint8_t ours[64];
  uint8_t reference[64];
  size_t ours_len = 0;
  size_t reference_len = 0;
  ASSERT_NE(EVP_Q_mac(nullptr, "HMAC", "provider=hsmstek", "SHA256", nullptr,
                      key, 4, reinterpret_cast<const uint8_t *>(data), 28, ours,
                      sizeof(ours), &ours_len),
            nullptr)
      << TakeProviderError().printed;
  ASSERT_NE(EVP_Q_mac(nullptr, "HMAC", "provider=default", "SHA256", nullptr,
                      key, 4, reinterpret_cast<const uint8_t *>(data), 28,
                      reference, sizeof(reference), &reference_len),
            nullptr);
  EXPECT_EQ(Bytes(ours, ours + ours_len),
            Bytes(reference, reference + reference_len));
  // RFC 4231 test case 2.
  EXPECT_EQ(HexEncode(ByteSpan(ours, ours_len)),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

TEST_F(MacTest, TlsRecordMacWithDataSizeEqualsDefault) {
  // The TLS 1.2 CBC record MAC path: header first, then data, with the
  // constant-time digest over tls-data-size.
  Bytes key(32, 0x33);
  Bytes header(13, 0x17);
  Bytes data(100, 0x44);
  size_t data_size = 100 + 32 + 12;  // data + MAC + padding
  auto mac = [&](const char *query) {
    MacCtxPtr ctx = NewMacCtx(query);
    OSSL_PARAM params[] = {
        DigestParam("SHA256"),
        OSSL_PARAM_construct_size_t(OSSL_MAC_PARAM_TLS_DATA_SIZE, &data_size),
        OSSL_PARAM_construct_end()};
    if (!EVP_MAC_init(ctx.get(), key.data(), key.size(), params) ||
        !EVP_MAC_update(ctx.get(), header.data(), header.size()) ||
        !EVP_MAC_update(ctx.get(), data.data(), data.size())) {
      return Bytes();
    }
    return Final(ctx.get());
  };
  Bytes reference = mac("provider=default");
  ASSERT_EQ(reference.size(), 32u);
  EXPECT_EQ(mac("provider=hsmstek"), reference);
}

TEST_F(MacTest, SetParamsWithNullReturnsOne) {
  MacCtxPtr ctx = NewMacCtx("provider=hsmstek");
  EXPECT_EQ(EVP_MAC_CTX_set_params(ctx.get(), nullptr), 1);
}

TEST_F(MacTest, SettableParamsWithoutAContextListDigestKeyAndKeyRef) {
  MacPtr mac(EVP_MAC_fetch(nullptr, "HMAC", "provider=hsmstek"));
  const OSSL_PARAM *settable = EVP_MAC_settable_ctx_params(mac.get());
  for (const char *name :
       {OSSL_MAC_PARAM_DIGEST, OSSL_MAC_PARAM_PROPERTIES, OSSL_MAC_PARAM_KEY,
        OSSL_MAC_PARAM_TLS_DATA_SIZE, kKeyRefParam}) {
    EXPECT_NE(OSSL_PARAM_locate_const(settable, name), nullptr) << name;
  }
  const OSSL_PARAM *gettable = EVP_MAC_gettable_ctx_params(mac.get());
  EXPECT_NE(OSSL_PARAM_locate_const(gettable, OSSL_MAC_PARAM_SIZE), nullptr);
}

TEST_F(MacTest, IsProviderMacTellsOursFromDefault) {
  MacCtxPtr ours = NewMacCtx("provider=hsmstek");
  MacCtxPtr theirs = NewMacCtx("provider=default");
  EXPECT_TRUE(IsProviderMac(ours.get()));
  EXPECT_FALSE(IsProviderMac(theirs.get()));
  EXPECT_FALSE(IsProviderMac(nullptr));
  // The scoped query prefers ours; no query keeps the default.
  MacCtxPtr preferred = NewMacCtx("?provider=hsmstek");
  EXPECT_TRUE(IsProviderMac(preferred.get()));
  MacCtxPtr plain = NewMacCtx(nullptr);
  EXPECT_FALSE(IsProviderMac(plain.get()));
}

}  // namespace
}  // namespace hsmstek::provider::testing
