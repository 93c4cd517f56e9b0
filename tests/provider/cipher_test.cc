// The provider's HSMSTEK-AES-CBC-PAD cipher against a real SoftHSM token.
#include <gtest/gtest.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/provider.h>

#include <thread>
#include <vector>

#include "pkcs11/object.h"
#include "provider/provider.h"
#include "provider_test_util.h"

namespace hsmstek::provider::testing {
namespace {

using CipherTest = ProviderTokenTest;

Bytes Concat(ByteSpan a, ByteSpan b) {
  Bytes out(a.begin(), a.end());
  out.insert(out.end(), b.begin(), b.end());
  return out;
}

TEST_F(CipherTest, FetchReportsCbcParametersAndProperty) {
  EXPECT_TRUE(IsProviderCipher(cipher_));
  EXPECT_STREQ(OSSL_PROVIDER_get0_name(EVP_CIPHER_get0_provider(cipher_)),
               "hsmstek");
  EXPECT_EQ(EVP_CIPHER_get_block_size(cipher_), 16);
  EXPECT_EQ(EVP_CIPHER_get_iv_length(cipher_), 16);
  EXPECT_EQ(EVP_CIPHER_get_key_length(cipher_), 32);
  EXPECT_EQ(EVP_CIPHER_get_mode(cipher_), EVP_CIPH_CBC_MODE);
  EXPECT_EQ(EVP_CIPHER_get_flags(cipher_) & EVP_CIPH_FLAG_AEAD_CIPHER, 0u);
  // Only reachable under its own name: TLS record ciphers never route here.
  EVP_CIPHER *aes =
      EVP_CIPHER_fetch(nullptr, "AES-256-CBC", "provider=hsmstek");
  EXPECT_EQ(aes, nullptr);
  EVP_CIPHER_free(aes);
  ERR_clear_error();
}

TEST_F(CipherTest, EncryptMatchesKnownAnswer) {
  Bytes out;
  ASSERT_TRUE(RunCipher(cipher_, aes_ref_, true, Vectors().iv,
                        Vectors().plaintext, &out))
      << TakeProviderError().printed;
  EXPECT_EQ(HexEncode(out), HexEncode(Vectors().ciphertext));
  EXPECT_EQ(observer_->count(TokenOp::kEncrypt, true), 1);
  EXPECT_EQ(observer_->count(TokenOp::kEncrypt, false), 0);
}

TEST_F(CipherTest, DecryptKnownAnswerIntoCiphertextSizedBuffer) {
  Bytes out;  // RunCipher sizes it to the ciphertext exactly, like libssl
  ASSERT_TRUE(RunCipher(cipher_, aes_ref_, false, Vectors().iv,
                        Vectors().ciphertext, &out))
      << TakeProviderError().printed;
  EXPECT_EQ(out, Vectors().plaintext);
  EXPECT_EQ(observer_->count(TokenOp::kDecrypt, true), 1);
}

TEST_F(CipherTest, RoundTripsEveryLengthClass) {
  for (size_t len : {0, 1, 15, 16, 17, 31, 32, 255, 1000}) {
    Bytes plaintext(len);
    for (size_t i = 0; i < len; ++i) plaintext[i] = static_cast<uint8_t>(i * 7);
    Bytes ciphertext;
    ASSERT_TRUE(RunCipher(cipher_, aes_ref_, true, Vectors().iv, plaintext,
                          &ciphertext))
        << len << ": " << TakeProviderError().printed;
    EXPECT_EQ(ciphertext.size(), (len / 16 + 1) * 16) << len;
    Bytes decrypted;
    ASSERT_TRUE(RunCipher(cipher_, aes_ref_, false, Vectors().iv, ciphertext,
                          &decrypted))
        << len << ": " << TakeProviderError().printed;
    EXPECT_EQ(decrypted, plaintext) << len;
  }
}

TEST_F(CipherTest, OriginalAndUpdatedIvAreReported) {
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  const TokenKeyRef *ref = &aes_ref_;
  OSSL_PARAM params[] = {KeyRefParam(&ref), OSSL_PARAM_construct_end()};
  ASSERT_TRUE(EVP_EncryptInit_ex2(ctx.get(), cipher_, nullptr,
                                  Vectors().iv.data(), params));
  EXPECT_EQ(EVP_CIPHER_CTX_get_iv_length(ctx.get()), 16);
  Bytes out(Vectors().plaintext.size() + 16);
  int n = 0;
  ASSERT_TRUE(EVP_EncryptUpdate(ctx.get(), out.data(), &n,
                                Vectors().plaintext.data(),
                                static_cast<int>(Vectors().plaintext.size())));
  // libssl's ticket writer needs a non-empty final: update reports all but
  // the last block, final the last block.
  EXPECT_EQ(n, 16);
  uint8_t iv[16];
  ASSERT_TRUE(EVP_CIPHER_CTX_get_original_iv(ctx.get(), iv, sizeof(iv)));
  EXPECT_EQ(Bytes(iv, iv + 16), Vectors().iv);
  ASSERT_TRUE(EVP_CIPHER_CTX_get_updated_iv(ctx.get(), iv, sizeof(iv)));
  EXPECT_EQ(Bytes(iv, iv + 16),
            Bytes(Vectors().ciphertext.end() - 16, Vectors().ciphertext.end()));
  int final_n = -1;
  ASSERT_TRUE(EVP_EncryptFinal_ex(ctx.get(), out.data() + n, &final_n));
  EXPECT_EQ(final_n, 16);
  out.resize(static_cast<size_t>(n + final_n));
  EXPECT_EQ(out, Vectors().ciphertext);
  // Nothing is left for a second final.
  ASSERT_TRUE(EVP_EncryptFinal_ex(ctx.get(), out.data(), &final_n));
  EXPECT_EQ(final_n, 0);
}

TEST_F(CipherTest, PaddingOffUsesPlainCbc) {
  // The vector plaintext is 30 bytes: PKCS#7 adds 02 02.
  Bytes padded = Concat(Vectors().plaintext, Bytes{2, 2});
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  const TokenKeyRef *ref = &aes_ref_;
  OSSL_PARAM params[] = {KeyRefParam(&ref), OSSL_PARAM_construct_end()};
  ASSERT_TRUE(EVP_EncryptInit_ex2(ctx.get(), cipher_, nullptr,
                                  Vectors().iv.data(), params));
  ASSERT_TRUE(EVP_CIPHER_CTX_set_padding(ctx.get(), 0));
  Bytes out(padded.size() + 16);
  int n = 0;
  int final_n = 0;
  ASSERT_TRUE(EVP_EncryptUpdate(ctx.get(), out.data(), &n, padded.data(),
                                static_cast<int>(padded.size())))
      << TakeProviderError().printed;
  ASSERT_TRUE(EVP_EncryptFinal_ex(ctx.get(), out.data() + n, &final_n));
  out.resize(static_cast<size_t>(n + final_n));
  EXPECT_EQ(out, Vectors().ciphertext);
}

TEST_F(CipherTest, SecondUpdateFailsUntilReinit) {
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  const TokenKeyRef *ref = &aes_ref_;
  OSSL_PARAM params[] = {KeyRefParam(&ref), OSSL_PARAM_construct_end()};
  ASSERT_TRUE(EVP_EncryptInit_ex2(ctx.get(), cipher_, nullptr,
                                  Vectors().iv.data(), params));
  Bytes in(16, 0x41);
  Bytes out(1024);
  int n = 0;
  ASSERT_TRUE(EVP_EncryptUpdate(ctx.get(), out.data(), &n, in.data(), 16));
  EXPECT_FALSE(EVP_EncryptUpdate(ctx.get(), out.data(), &n, in.data(), 16));
  ProviderError error = TakeProviderError();
  ASSERT_TRUE(error.found) << error.printed;
  EXPECT_EQ(error.reason, ProviderReason::kOperationFinished);
  EXPECT_NE(error.data.find("one-shot cipher"), std::string::npos);
  EXPECT_FALSE(EVP_EncryptFinal_ex(ctx.get(), out.data(), &n));
  EXPECT_EQ(TakeProviderError().reason, ProviderReason::kOperationFinished);

  // A new init (same key, same IV) makes the context usable again.
  ASSERT_TRUE(EVP_EncryptInit_ex2(ctx.get(), nullptr, nullptr,
                                  Vectors().iv.data(), nullptr));
  ASSERT_TRUE(EVP_EncryptUpdate(ctx.get(), out.data(), &n,
                                Vectors().plaintext.data(),
                                static_cast<int>(Vectors().plaintext.size())));
  int final_n = 0;
  ASSERT_TRUE(EVP_EncryptFinal_ex(ctx.get(), out.data() + n, &final_n));
  out.resize(static_cast<size_t>(n + final_n));
  EXPECT_EQ(out, Vectors().ciphertext);
}

TEST_F(CipherTest, StaleGenerationAfterReconnectFailsWithoutCrash) {
  TokenKeyRef stale = aes_ref_;
  token_->Disconnect();  // drops every session: the handles die with them
  Status reconnected = token_->Connect();
  ASSERT_TRUE(reconnected.ok()) << reconnected.message();
  ASSERT_NE(stale.generation, token_->generation());

  Bytes out;
  EXPECT_FALSE(
      RunCipher(cipher_, stale, true, Vectors().iv, Vectors().plaintext, &out));
  ProviderError error = TakeProviderError();
  ASSERT_TRUE(error.found) << error.printed;
  EXPECT_EQ(error.reason, ProviderReason::kStaleKeyHandle);
  EXPECT_NE(error.data.find("stale key handle: key generation " +
                            std::to_string(stale.generation)),
            std::string::npos)
      << error.data;
  EXPECT_EQ(observer_->count(TokenOp::kEncrypt, false), 1);
  EXPECT_EQ(observer_->count(TokenOp::kEncrypt, true), 0);
}

TEST_F(CipherTest, FutureGenerationIsAlsoStale) {
  TokenKeyRef ref = aes_ref_;
  ref.generation += 1;
  Bytes out;
  EXPECT_FALSE(
      RunCipher(cipher_, ref, false, Vectors().iv, Vectors().ciphertext, &out));
  ProviderError error = TakeProviderError();
  EXPECT_EQ(error.reason, ProviderReason::kStaleKeyHandle) << error.printed;
  EXPECT_EQ(observer_->count(TokenOp::kDecrypt, false), 1);
}

TEST_F(CipherTest, WrongMagicIsRejectedAtInit) {
  TokenKeyRef ref = aes_ref_;
  ref.magic = 0x1234;
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  const TokenKeyRef *ref_ptr = &ref;
  OSSL_PARAM params[] = {KeyRefParam(&ref_ptr), OSSL_PARAM_construct_end()};
  EXPECT_FALSE(EVP_EncryptInit_ex2(ctx.get(), cipher_, nullptr,
                                   Vectors().iv.data(), params));
  ProviderError error = TakeProviderError();
  ASSERT_TRUE(error.found) << error.printed;
  EXPECT_EQ(error.reason, ProviderReason::kInvalidKeyRef);
  EXPECT_NE(error.data.find("bad magic"), std::string::npos) << error.data;
  // Nothing reached the token.
  EXPECT_EQ(observer_->count(TokenOp::kEncrypt, false), 0);
}

TEST_F(CipherTest, KeyRefOfWrongSizeOrNullIsRejected) {
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  uint32_t small = 0;
  OSSL_PARAM wrong_size[] = {
      OSSL_PARAM_construct_octet_string(kKeyRefParam, &small, sizeof(small)),
      OSSL_PARAM_construct_end()};
  EXPECT_FALSE(EVP_EncryptInit_ex2(ctx.get(), cipher_, nullptr,
                                   Vectors().iv.data(), wrong_size));
  ProviderError error = TakeProviderError();
  EXPECT_EQ(error.reason, ProviderReason::kInvalidKeyRef) << error.printed;
  EXPECT_NE(error.data.find("octet string holding a TokenKeyRef*"),
            std::string::npos);

  const TokenKeyRef *null_ref = nullptr;
  OSSL_PARAM null_param[] = {KeyRefParam(&null_ref),
                             OSSL_PARAM_construct_end()};
  EXPECT_FALSE(EVP_EncryptInit_ex2(ctx.get(), cipher_, nullptr,
                                   Vectors().iv.data(), null_param));
  error = TakeProviderError();
  EXPECT_EQ(error.reason, ProviderReason::kInvalidKeyRef) << error.printed;
  EXPECT_NE(error.data.find("null pointer"), std::string::npos);
}

TEST_F(CipherTest, RawKeyIsRefused) {
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  uint8_t key[32] = {1};
  EXPECT_FALSE(EVP_EncryptInit_ex2(ctx.get(), cipher_, key, Vectors().iv.data(),
                                   nullptr));
  ProviderError error = TakeProviderError();
  ASSERT_TRUE(error.found) << error.printed;
  EXPECT_EQ(error.reason, ProviderReason::kRawKeyRefused);
  EXPECT_NE(error.data.find("raw keys are not accepted"), std::string::npos);
}

TEST_F(CipherTest, UpdateWithoutKeyRefFails) {
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  ASSERT_TRUE(EVP_EncryptInit_ex2(ctx.get(), cipher_, nullptr,
                                  Vectors().iv.data(), nullptr));
  Bytes in(16, 0x41);
  Bytes out(64);
  int n = 0;
  EXPECT_FALSE(EVP_EncryptUpdate(ctx.get(), out.data(), &n, in.data(), 16));
  ProviderError error = TakeProviderError();
  EXPECT_EQ(error.reason, ProviderReason::kNoKeyRef) << error.printed;
  EXPECT_NE(error.data.find("no hsmstek-key-ref set"), std::string::npos);
}

TEST_F(CipherTest, TokenErrorNamesFunctionAndCkrOnTheErrorStack) {
  // The master may only derive: the token refuses to encrypt with it.
  TokenKeyRef master = MakeRef(token_, keys_.master, observer_);
  Bytes out;
  EXPECT_FALSE(RunCipher(cipher_, master, true, Vectors().iv,
                         Vectors().plaintext, &out));
  BIO *bio = BIO_new(BIO_s_mem());
  ERR_print_errors(bio);
  char *text = nullptr;
  long n = BIO_get_mem_data(bio, &text);
  std::string printed(text, static_cast<size_t>(n));
  BIO_free(bio);
  EXPECT_NE(printed.find("token operation failed"), std::string::npos)
      << printed;
  EXPECT_NE(printed.find("C_EncryptInit: CKR_KEY_FUNCTION_NOT_PERMITTED"),
            std::string::npos)
      << printed;
  EXPECT_EQ(observer_->count(TokenOp::kEncrypt, false), 1);

  // The pool stays healthy: the next operation with a good key works.
  ASSERT_TRUE(RunCipher(cipher_, aes_ref_, true, Vectors().iv,
                        Vectors().plaintext, &out));
  EXPECT_EQ(out, Vectors().ciphertext);
}

TEST_F(CipherTest, BadPaddingFailsInTheTokenAndNeverUsesAStaleHandle) {
  // One block whose plaintext ends in 00: never valid PKCS#7.
  Bytes block(16, 0);
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  const TokenKeyRef *ref = &aes_ref_;
  OSSL_PARAM params[] = {KeyRefParam(&ref), OSSL_PARAM_construct_end()};
  ASSERT_TRUE(EVP_EncryptInit_ex2(ctx.get(), cipher_, nullptr,
                                  Vectors().iv.data(), params));
  ASSERT_TRUE(EVP_CIPHER_CTX_set_padding(ctx.get(), 0));
  Bytes ciphertext(32);
  int n = 0;
  int final_n = 0;
  ASSERT_TRUE(
      EVP_EncryptUpdate(ctx.get(), ciphertext.data(), &n, block.data(), 16));
  ASSERT_TRUE(EVP_EncryptFinal_ex(ctx.get(), ciphertext.data() + n, &final_n));
  ciphertext.resize(static_cast<size_t>(n + final_n));
  ASSERT_EQ(ciphertext.size(), 16u);

  Bytes out;
  EXPECT_FALSE(
      RunCipher(cipher_, aes_ref_, false, Vectors().iv, ciphertext, &out));
  ProviderError error = TakeProviderError();
  EXPECT_EQ(error.reason, ProviderReason::kTokenOperationFailed)
      << error.printed;
  // SoftHSM's answer to bad padding.
  EXPECT_EQ(error.data, "C_Decrypt: CKR_GENERAL_ERROR");
  EXPECT_EQ(observer_->count(TokenOp::kDecrypt, false), 1);

  // src/pkcs11 treats CKR_GENERAL_ERROR as a connection fault: the token
  // reconnects, so the old handle is refused as stale, never used.
  EXPECT_FALSE(RunCipher(cipher_, aes_ref_, false, Vectors().iv,
                         Vectors().ciphertext, &out));
  EXPECT_EQ(TakeProviderError().reason, ProviderReason::kStaleKeyHandle);
  // Keys derived again in the new generation work.
  Result<TokenKeys> keys = CreateKnownAnswerKeys(*token_);
  ASSERT_TRUE(keys.ok()) << keys.status().message();
  ASSERT_TRUE(RunCipher(cipher_, MakeRef(token_, keys->aes), false,
                        Vectors().iv, Vectors().ciphertext, &out))
      << TakeProviderError().printed;
  EXPECT_EQ(out, Vectors().plaintext);
}

TEST_F(CipherTest, DecryptRejectsCiphertextNotInWholeBlocks) {
  Bytes out;
  Bytes ciphertext(Vectors().ciphertext.begin(),
                   Vectors().ciphertext.end() - 1);
  EXPECT_FALSE(
      RunCipher(cipher_, aes_ref_, false, Vectors().iv, ciphertext, &out));
  ProviderError error = TakeProviderError();
  EXPECT_EQ(error.reason, ProviderReason::kInvalidLength) << error.printed;
  EXPECT_NE(error.data.find("got 31"), std::string::npos) << error.data;
  EXPECT_EQ(observer_->count(TokenOp::kDecrypt, false), 0);  // never sent
}

TEST_F(CipherTest, ContextsFreedMidOperationLeaveTheTokenUsable) {
  const TokenKeyRef *aes = &aes_ref_;
  const TokenKeyRef *mac = &mac_ref_;
  for (int i = 0; i < 20; ++i) {
    // Encrypt: init + update, no final.
    CipherCtxPtr enc(EVP_CIPHER_CTX_new());
    OSSL_PARAM params[] = {KeyRefParam(&aes), OSSL_PARAM_construct_end()};
    ASSERT_TRUE(EVP_EncryptInit_ex2(enc.get(), cipher_, nullptr,
                                    Vectors().iv.data(), params));
    Bytes out(64);
    int n = 0;
    ASSERT_TRUE(EVP_EncryptUpdate(enc.get(), out.data(), &n,
                                  Vectors().plaintext.data(), 30));
    enc.reset();
    // Decrypt: init only.
    CipherCtxPtr dec(EVP_CIPHER_CTX_new());
    ASSERT_TRUE(EVP_DecryptInit_ex2(dec.get(), cipher_, nullptr,
                                    Vectors().iv.data(), params));
    dec.reset();
    // MAC: key set + update, no final.
    MacPtr hmac(EVP_MAC_fetch(nullptr, "HMAC", "provider=hsmstek"));
    MacCtxPtr mctx(EVP_MAC_CTX_new(hmac.get()));
    OSSL_PARAM mparams[] = {KeyRefParam(&mac), OSSL_PARAM_construct_end()};
    ASSERT_TRUE(EVP_MAC_CTX_set_params(mctx.get(), mparams));
    ASSERT_TRUE(EVP_MAC_update(mctx.get(), out.data(), 32));
  }
  Bytes out;
  ASSERT_TRUE(RunCipher(cipher_, aes_ref_, true, Vectors().iv,
                        Vectors().plaintext, &out))
      << TakeProviderError().printed;
  EXPECT_EQ(out, Vectors().ciphertext);
  Bytes mac_input = Concat(Concat(Vectors().key_name, Vectors().iv), out);
  ASSERT_TRUE(RunTokenMac(mac_ref_, mac_input, &out));
  EXPECT_EQ(out, Vectors().hmac);
}

TEST_F(CipherTest, CopiedContextRunsItsOwnOperation) {
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  const TokenKeyRef *ref = &aes_ref_;
  OSSL_PARAM params[] = {KeyRefParam(&ref), OSSL_PARAM_construct_end()};
  ASSERT_TRUE(EVP_EncryptInit_ex2(ctx.get(), cipher_, nullptr,
                                  Vectors().iv.data(), params));
  CipherCtxPtr copy(EVP_CIPHER_CTX_new());
  ASSERT_TRUE(EVP_CIPHER_CTX_copy(copy.get(), ctx.get()));
  ctx.reset();  // the copy holds its own TokenKeyRef
  Bytes out(64);
  int n = 0;
  int final_n = 0;
  ASSERT_TRUE(EVP_EncryptUpdate(copy.get(), out.data(), &n,
                                Vectors().plaintext.data(), 30));
  ASSERT_TRUE(EVP_EncryptFinal_ex(copy.get(), out.data() + n, &final_n));
  out.resize(static_cast<size_t>(n + final_n));
  EXPECT_EQ(out, Vectors().ciphertext);
}

TEST_F(CipherTest, RefWithoutObserverWorks) {
  TokenKeyRef ref = MakeRef(token_, keys_.aes);
  Bytes out;
  ASSERT_TRUE(
      RunCipher(cipher_, ref, true, Vectors().iv, Vectors().plaintext, &out));
  EXPECT_EQ(out, Vectors().ciphertext);
}

TEST_F(CipherTest, FailSoftEncryptStandsInWithRandomCiphertext) {
  TokenKeyRef stale = aes_ref_;
  stale.generation += 1;
  Bytes first;
  Bytes second;
  ASSERT_TRUE(RunCipher(cipher_, stale, true, Vectors().iv, Vectors().plaintext,
                        &first, /*fail_soft=*/true));
  ASSERT_TRUE(RunCipher(cipher_, stale, true, Vectors().iv, Vectors().plaintext,
                        &second, /*fail_soft=*/true));
  EXPECT_EQ(ERR_peek_error(), 0u);  // nothing raised: libssl would abort
  EXPECT_EQ(first.size(), Vectors().ciphertext.size());
  EXPECT_NE(first, Vectors().ciphertext);
  EXPECT_NE(first, second);  // random, not derived from the plaintext
  EXPECT_EQ(observer_->count(TokenOp::kEncrypt, false), 2);
}

TEST_F(CipherTest, FailSoftDecryptFailsAtFinalWithNothingRaised) {
  TokenKeyRef stale = aes_ref_;
  stale.generation += 1;
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  const TokenKeyRef *ref = &stale;
  int soft = 1;
  OSSL_PARAM params[] = {KeyRefParam(&ref),
                         OSSL_PARAM_construct_int(kFailSoftParam, &soft),
                         OSSL_PARAM_construct_end()};
  ASSERT_TRUE(EVP_DecryptInit_ex2(ctx.get(), cipher_, nullptr,
                                  Vectors().iv.data(), params));
  Bytes out(Vectors().ciphertext.size());
  int n = -1;
  ASSERT_TRUE(EVP_DecryptUpdate(ctx.get(), out.data(), &n,
                                Vectors().ciphertext.data(),
                                static_cast<int>(Vectors().ciphertext.size())));
  EXPECT_EQ(n, 0);  // no plaintext at all
  int final_n = -1;
  EXPECT_FALSE(EVP_DecryptFinal_ex(ctx.get(), out.data(), &final_n));
  EXPECT_EQ(ERR_peek_error(), 0u);
  EXPECT_EQ(observer_->count(TokenOp::kDecrypt, false), 1);
}

TEST_F(CipherTest, FailSoftDoesNotHideCallerErrors) {
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  int soft = 1;
  OSSL_PARAM params[] = {OSSL_PARAM_construct_int(kFailSoftParam, &soft),
                         OSSL_PARAM_construct_end()};
  ASSERT_TRUE(EVP_EncryptInit_ex2(ctx.get(), cipher_, nullptr,
                                  Vectors().iv.data(), params));
  Bytes in(16, 1);
  Bytes out(64);
  int n = 0;
  EXPECT_FALSE(EVP_EncryptUpdate(ctx.get(), out.data(), &n, in.data(), 16));
  EXPECT_EQ(TakeProviderError().reason, ProviderReason::kNoKeyRef);
}

TEST_F(CipherTest, ConcurrentContextsEachGetTheirOwnSession) {
  constexpr int kThreads = 4;
  constexpr int kOps = 25;
  std::atomic<int> good{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kOps; ++i) {
        Bytes ciphertext;
        Bytes plaintext;
        if (RunCipher(cipher_, aes_ref_, true, Vectors().iv,
                      Vectors().plaintext, &ciphertext) &&
            ciphertext == Vectors().ciphertext &&
            RunCipher(cipher_, aes_ref_, false, Vectors().iv, ciphertext,
                      &plaintext) &&
            plaintext == Vectors().plaintext) {
          good.fetch_add(1);
        }
      }
    });
  }
  for (std::thread &t : threads) t.join();
  EXPECT_EQ(good.load(), kThreads * kOps);
  EXPECT_EQ(observer_->count(TokenOp::kEncrypt, true), kThreads * kOps);
  EXPECT_EQ(observer_->count(TokenOp::kDecrypt, true), kThreads * kOps);
}

}  // namespace
}  // namespace hsmstek::provider::testing
