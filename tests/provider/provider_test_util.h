// Shared helpers for the provider tests: a SoftHSM token holding the docs/FORMAT.md
// known-answer keys (imported master, per-epoch keys derived in the token),
// OpenSSL error inspection, and in-memory TLS handshakes with a minimal
// ticket callback that uses the provider.
#pragma once

#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <array>
#include <atomic>
#include <memory>
#include <string>

#include "common/bytes.h"
#include "pkcs11/token.h"
#include "provider/errors.h"
#include "provider/key_ref.h"

namespace hsmstek::provider::testing {

// The docs/FORMAT.md vectors (tests/vectors/derivation.json).
struct KnownAnswers {
  Bytes master;
  Bytes derive_data_e;
  Bytes derive_data_m;
  Bytes key_name;
  Bytes iv;
  Bytes plaintext;
  Bytes ciphertext;
  Bytes hmac;  // over key_name || iv || ciphertext
};
const KnownAnswers &Vectors();

// Counts token operations per kind and outcome. Thread-safe.
class RecordingObserver : public TokenOpObserver {
 public:
  void OnTokenOp(TokenOp op, bool ok) override {
    counts_[Index(op, ok)].fetch_add(1);
  }
  int count(TokenOp op, bool ok) const { return counts_[Index(op, ok)].load(); }

 private:
  static size_t Index(TokenOp op, bool ok) {
    return static_cast<size_t>(op) * 2 + (ok ? 1 : 0);
  }
  std::array<std::atomic<int>, 6> counts_{};
};

// The token-side keys of the vectors: the imported master (derive only) and
// the derived encryption (AES) and HMAC keys, all session objects of the
// token's long-lived object session.
struct TokenKeys {
  CK_OBJECT_HANDLE master = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE aes = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE hmac = CK_INVALID_HANDLE;
};

// Returns this process's connected token (created on first call, labelled
// `label`); the provider is registered too. Fails the calling test on error.
std::shared_ptr<p11::Token> SharedToken();

// Imports the vector master and derives the E/M keys in the token.
[[nodiscard]] Result<TokenKeys> CreateKnownAnswerKeys(p11::Token &token);

// A ref for `handle` in the token's current generation.
TokenKeyRef MakeRef(const std::shared_ptr<p11::Token> &token,
                    CK_OBJECT_HANDLE handle,
                    std::shared_ptr<TokenOpObserver> observer = nullptr);

// The first error raised by the hsmstek provider in the calling thread's
// OpenSSL error queue; the whole queue is consumed.
struct ProviderError {
  bool found = false;
  ProviderReason reason{};
  std::string data;     // the detail string
  std::string printed;  // ERR_print_errors output of the whole queue
};
ProviderError TakeProviderError();

// ---- TLS --------------------------------------------------------------------

struct SslCtxDeleter {
  void operator()(SSL_CTX *c) const { SSL_CTX_free(c); }
};
struct SslSessionDeleter {
  void operator()(SSL_SESSION *s) const { SSL_SESSION_free(s); }
};
using SslCtxPtr = std::unique_ptr<SSL_CTX, SslCtxDeleter>;
using SslSessionPtr = std::unique_ptr<SSL_SESSION, SslSessionDeleter>;

// Loads a process-wide self-signed RSA-2048 certificate and key into `ctx`.
void UseTestCertificate(SSL_CTX *ctx);

// What the test ticket callback uses and records.
struct TicketCallbackState {
  TokenKeyRef aes;
  TokenKeyRef mac;
  std::array<uint8_t, 16> key_name{};
  const EVP_CIPHER *cipher = nullptr;
  bool fail_soft = false;  // sets kFailSoftParam on both contexts
  std::atomic<int> issued{0};
  std::atomic<int> accepted{0};
  std::atomic<int> not_our_mac{0};  // hctx not from the provider: no ticket
  std::atomic<int> failed{0};
};

// Installs the minimal ticket callback on a server ctx (state must outlive
// it): encrypt with the provider cipher + MAC on the token keys; decrypt
// tickets with our key name. Returns 0 (no ticket / full handshake) when the
// HMAC ctx is not the provider's.
void InstallTicketCallback(SSL_CTX *server, TicketCallbackState *state);

struct HandshakeOutcome {
  bool ok = false;
  std::string error;
  bool reused = false;    // the client's view (SSL_session_reused)
  std::string version;    // SSL_get_version
  std::string cipher;     // SSL_get_cipher_name
  SslSessionPtr session;  // the client's session after reading tickets
};

// Runs a handshake over a BIO pair, then exchanges application data both
// ways (which also makes the client read TLS 1.3 tickets).
HandshakeOutcome RunHandshake(SSL_CTX *server, SSL_CTX *client,
                              SSL_SESSION *resume);

// ---- Fixture ----------------------------------------------------------------

// Each test gets fresh vector keys in the shared token, refs to them with a
// recording observer, the provider's cipher, and a clean error queue.
class ProviderTokenTest : public ::testing::Test {
 protected:
  void SetUp() override;
  void TearDown() override;

  std::shared_ptr<p11::Token> token_;
  TokenKeys keys_;
  std::shared_ptr<RecordingObserver> observer_;
  TokenKeyRef aes_ref_;
  TokenKeyRef mac_ref_;
  const EVP_CIPHER *cipher_ = nullptr;
};

struct CipherCtxDeleter {
  void operator()(EVP_CIPHER_CTX *c) const { EVP_CIPHER_CTX_free(c); }
};
struct MacDeleter {
  void operator()(EVP_MAC *m) const { EVP_MAC_free(m); }
};
struct MacCtxDeleter {
  void operator()(EVP_MAC_CTX *c) const { EVP_MAC_CTX_free(c); }
};
using CipherCtxPtr = std::unique_ptr<EVP_CIPHER_CTX, CipherCtxDeleter>;
using MacPtr = std::unique_ptr<EVP_MAC, MacDeleter>;
using MacCtxPtr = std::unique_ptr<EVP_MAC_CTX, MacCtxDeleter>;

// Runs the provider cipher over `in` the way libssl does (init with the ref
// and IV, one update, final); the decrypt output buffer is exactly the
// input's size. Returns false (errors left on the queue) on failure.
bool RunCipher(const EVP_CIPHER *cipher, const TokenKeyRef &ref, bool encrypt,
               ByteSpan iv, ByteSpan in, Bytes *out, bool fail_soft = false);

// HMAC through the provider in token mode (set_params only, like libssl).
bool RunTokenMac(const TokenKeyRef &ref, ByteSpan in, Bytes *out,
                 bool fail_soft = false);

}  // namespace hsmstek::provider::testing
