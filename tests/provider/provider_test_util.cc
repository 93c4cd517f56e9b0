#include "provider_test_util.h"

#include <gtest/gtest.h>
#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/rand.h>

#include <cstring>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>

#include "pkcs11/object.h"
#include "pkcs11/uri.h"
#include "provider/provider.h"
#include "softhsm.h"

namespace hsmstek::provider::testing {
namespace {

Bytes Hex(const std::string &hex) {
  Result<Bytes> bytes = HexDecode(hex);
  EXPECT_TRUE(bytes.ok()) << bytes.status().message();
  return bytes.ok() ? *bytes : Bytes();
}

}  // namespace

const KnownAnswers &Vectors() {
  static const KnownAnswers vectors = [] {
    std::ifstream in(HSMSTEK_VECTORS);
    nlohmann::json v = nlohmann::json::parse(in);
    KnownAnswers k;
    k.master = Hex(v["master_key_hex"]);
    k.derive_data_e = Hex(v["derive_data_E_hex"]);
    k.derive_data_m = Hex(v["derive_data_M_hex"]);
    k.key_name = Hex(v["key_name_hex"]);
    k.iv = Hex(v["ticket_iv_hex"]);
    std::string plaintext = v["ticket_plaintext_ascii"];
    k.plaintext.assign(plaintext.begin(), plaintext.end());
    k.ciphertext = Hex(v["ticket_ciphertext_hex"]);
    k.hmac = Hex(v["ticket_hmac_hex"]);
    return k;
  }();
  return vectors;
}

std::shared_ptr<p11::Token> SharedToken() {
  static std::shared_ptr<p11::Token> token = [] {
    Status registered = RegisterProvider();
    EXPECT_TRUE(registered.ok()) << registered.message();
    hsmstek::testing::SoftHsm::Get().CreateToken("provider");
    Result<p11::TokenUri> uri =
        p11::ParseTokenUri(hsmstek::testing::SoftHsm::Get().Uri("provider"));
    EXPECT_TRUE(uri.ok()) << uri.status().message();
    p11::TokenOptions options;
    options.backoff_initial = std::chrono::milliseconds(0);
    Result<std::shared_ptr<p11::Token>> t = p11::Token::Create(*uri, options);
    EXPECT_TRUE(t.ok()) << t.status().message();
    Status connected = (*t)->Connect();
    EXPECT_TRUE(connected.ok()) << connected.message();
    return *t;
  }();
  return token;
}

namespace {

// Derives a 32-byte per-epoch key from `master` with `data` (docs/FORMAT.md).
Status Derive(p11::Session &session, CK_OBJECT_HANDLE master, const Bytes &data,
              bool aes, CK_OBJECT_HANDLE *out) {
  Bytes copy = data;
  CK_KEY_DERIVATION_STRING_DATA params{copy.data(),
                                       static_cast<CK_ULONG>(copy.size())};
  CK_MECHANISM mechanism{CKM_AES_ECB_ENCRYPT_DATA, &params, sizeof(params)};
  p11::Template t;
  t.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, aes ? CKK_AES : CKK_GENERIC_SECRET)
      .Ulong(CKA_VALUE_LEN, 32)
      .Bool(CKA_TOKEN, false)
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, false)
      .Bool(CKA_ENCRYPT, aes)
      .Bool(CKA_DECRYPT, aes)
      .Bool(CKA_SIGN, !aes)
      .Bool(CKA_VERIFY, !aes)
      // Every usage flag explicit: SoftHSM defaults WRAP/UNWRAP to TRUE
      // (the key-custody audit, tests/audit, flags that).
      .Bool(CKA_WRAP, false)
      .Bool(CKA_UNWRAP, false)
      .Bool(CKA_DERIVE, false);
  return P11_CALL(session, C_DeriveKey, session.handle(), &mechanism, master,
                  t.data(), t.size(), out);
}

}  // namespace

Result<TokenKeys> CreateKnownAnswerKeys(p11::Token &token) {
  TokenKeys keys;
  Status status = token.WithObjectSession([&](p11::Session &session) {
    // A test master with a known value (never done outside tests).
    p11::Template t;
    t.Ulong(CKA_CLASS, CKO_SECRET_KEY)
        .Ulong(CKA_KEY_TYPE, CKK_AES)
        .Data(CKA_VALUE, Vectors().master)
        .Bool(CKA_TOKEN, false)
        .Bool(CKA_SENSITIVE, true)
        .Bool(CKA_EXTRACTABLE, false)
        .Bool(CKA_DERIVE, true)
        .Bool(CKA_ENCRYPT, false)
        .Bool(CKA_DECRYPT, false)
        .Bool(CKA_SIGN, false)
        .Bool(CKA_VERIFY, false)
        .Bool(CKA_WRAP, false)
        .Bool(CKA_UNWRAP, false);
    Status s = P11_CALL(session, C_CreateObject, session.handle(), t.data(),
                        t.size(), &keys.master);
    if (!s.ok()) return s;
    s = Derive(session, keys.master, Vectors().derive_data_e, true, &keys.aes);
    if (!s.ok()) return s;
    return Derive(session, keys.master, Vectors().derive_data_m, false,
                  &keys.hmac);
  });
  if (!status.ok()) return status;
  return keys;
}

TokenKeyRef MakeRef(const std::shared_ptr<p11::Token> &token,
                    CK_OBJECT_HANDLE handle,
                    std::shared_ptr<TokenOpObserver> observer) {
  TokenKeyRef ref;
  ref.token = token;
  ref.handle = handle;
  ref.generation = token->generation();
  ref.observer = std::move(observer);
  return ref;
}

ProviderError TakeProviderError() {
  ProviderError out;
  const char *data = nullptr;
  int flags = 0;
  unsigned long e;
  const char *func = nullptr;
  while ((e = ERR_get_error_all(nullptr, nullptr, &func, &data, &flags)) != 0) {
    char line[256];
    ERR_error_string_n(e, line, sizeof(line));
    std::string text = std::string(line) + " (" + (func ? func : "") + ")";
    if (data != nullptr && (flags & ERR_TXT_STRING))
      text += std::string(":") + data;
    out.printed += text + "\n";
    const char *lib = ERR_lib_error_string(e);
    if (out.found || lib == nullptr || std::strcmp(lib, "hsmstek") != 0) {
      continue;
    }
    out.found = true;
    out.reason = static_cast<ProviderReason>(ERR_GET_REASON(e));
    if (data != nullptr && (flags & ERR_TXT_STRING)) out.data = data;
  }
  return out;
}

void ProviderTokenTest::SetUp() {
  token_ = SharedToken();
  ASSERT_NE(token_, nullptr);
  Result<TokenKeys> keys = CreateKnownAnswerKeys(*token_);
  ASSERT_TRUE(keys.ok()) << keys.status().message();
  keys_ = *keys;
  observer_ = std::make_shared<RecordingObserver>();
  aes_ref_ = MakeRef(token_, keys_.aes, observer_);
  mac_ref_ = MakeRef(token_, keys_.hmac, observer_);
  Result<const EVP_CIPHER *> cipher = TicketCipher();
  ASSERT_TRUE(cipher.ok()) << cipher.status().message();
  cipher_ = *cipher;
  ERR_clear_error();
}

void ProviderTokenTest::TearDown() { ERR_clear_error(); }

bool RunCipher(const EVP_CIPHER *cipher, const TokenKeyRef &ref, bool encrypt,
               ByteSpan iv, ByteSpan in, Bytes *out, bool fail_soft) {
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  const TokenKeyRef *ref_ptr = &ref;
  int soft = fail_soft ? 1 : 0;
  OSSL_PARAM params[] = {KeyRefParam(&ref_ptr),
                         OSSL_PARAM_construct_int(kFailSoftParam, &soft),
                         OSSL_PARAM_construct_end()};
  if (!EVP_CipherInit_ex2(ctx.get(), cipher, nullptr, iv.data(),
                          encrypt ? 1 : 0, params)) {
    return false;
  }
  out->assign(encrypt ? in.size() + 16 : in.size(), 0);
  int n = 0;
  int final_n = 0;
  if (!EVP_CipherUpdate(ctx.get(), out->data(), &n, in.data(),
                        static_cast<int>(in.size())) ||
      !EVP_CipherFinal_ex(ctx.get(), out->data() + n, &final_n)) {
    return false;
  }
  out->resize(static_cast<size_t>(n + final_n));
  return true;
}

bool RunTokenMac(const TokenKeyRef &ref, ByteSpan in, Bytes *out,
                 bool fail_soft) {
  MacPtr mac(EVP_MAC_fetch(nullptr, "HMAC", "provider=hsmstek"));
  if (!mac) return false;
  MacCtxPtr ctx(EVP_MAC_CTX_new(mac.get()));
  const TokenKeyRef *ref_ptr = &ref;
  int soft = fail_soft ? 1 : 0;
  OSSL_PARAM params[] = {KeyRefParam(&ref_ptr),
                         OSSL_PARAM_construct_int(kFailSoftParam, &soft),
                         OSSL_PARAM_construct_end()};
  if (!ctx || !EVP_MAC_CTX_set_params(ctx.get(), params) ||
      !EVP_MAC_update(ctx.get(), in.data(), in.size())) {
    return false;
  }
  out->assign(EVP_MAC_CTX_get_mac_size(ctx.get()), 0);
  size_t n = 0;
  if (!EVP_MAC_final(ctx.get(), out->data(), &n, out->size())) return false;
  out->resize(n);
  return true;
}

// ---- TLS --------------------------------------------------------------------

namespace {

struct PkeyDeleter {
  void operator()(EVP_PKEY *k) const { EVP_PKEY_free(k); }
};
struct X509Deleter {
  void operator()(X509 *x) const { X509_free(x); }
};
struct SslDeleter {
  void operator()(SSL *s) const { SSL_free(s); }
};
using SslPtr = std::unique_ptr<SSL, SslDeleter>;

struct TestCertificate {
  std::unique_ptr<EVP_PKEY, PkeyDeleter> key;
  std::unique_ptr<X509, X509Deleter> cert;
};

const TestCertificate &Certificate() {
  static const TestCertificate *certificate = [] {
    auto *c = new TestCertificate;
    c->key.reset(EVP_RSA_gen(2048));
    c->cert.reset(X509_new());
    X509 *x = c->cert.get();
    X509_set_version(x, X509_VERSION_3);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_gmtime_adj(X509_getm_notBefore(x), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x), 24 * 3600);
    X509_NAME *name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(
        name, "CN", MBSTRING_ASC,
        reinterpret_cast<const unsigned char *>("localhost"), -1, -1, 0);
    X509_set_issuer_name(x, name);
    X509_set_pubkey(x, c->key.get());
    X509_sign(x, c->key.get(), EVP_sha256());
    return c;
  }();
  return *certificate;
}

int TicketCallback(SSL *ssl, unsigned char key_name[16], unsigned char *iv,
                   EVP_CIPHER_CTX *ctx, EVP_MAC_CTX *hctx, int enc) {
  auto *state = static_cast<TicketCallbackState *>(
      SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl)));
  if (!IsProviderMac(hctx)) {
    state->not_our_mac.fetch_add(1);
    return 0;  // fail closed: no ticket, full handshake
  }
  const TokenKeyRef *aes = &state->aes;
  const TokenKeyRef *mac = &state->mac;
  char digest[] = "SHA256";
  int soft = state->fail_soft ? 1 : 0;
  OSSL_PARAM cipher_params[] = {KeyRefParam(&aes),
                                OSSL_PARAM_construct_int(kFailSoftParam, &soft),
                                OSSL_PARAM_construct_end()};
  OSSL_PARAM mac_params[] = {
      KeyRefParam(&mac),
      OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
      OSSL_PARAM_construct_int(kFailSoftParam, &soft),
      OSSL_PARAM_construct_end()};
  if (enc) {
    std::memcpy(key_name, state->key_name.data(), 16);
    if (RAND_bytes(iv, 16) != 1 ||
        !EVP_EncryptInit_ex2(ctx, state->cipher, nullptr, iv, cipher_params) ||
        !EVP_MAC_CTX_set_params(hctx, mac_params)) {
      state->failed.fetch_add(1);
      return 0;
    }
    state->issued.fetch_add(1);
    return 1;
  }
  if (std::memcmp(key_name, state->key_name.data(), 16) != 0) return 0;
  if (!EVP_DecryptInit_ex2(ctx, state->cipher, nullptr, iv, cipher_params) ||
      !EVP_MAC_CTX_set_params(hctx, mac_params)) {
    state->failed.fetch_add(1);
    return 0;
  }
  state->accepted.fetch_add(1);
  return 1;
}

bool Retryable(SSL *ssl, int rc) {
  int err = SSL_get_error(ssl, rc);
  return err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE;
}

std::string DrainErrors() { return TakeProviderError().printed; }

// Sends `message` from `from` and reads it at `to`.
bool Exchange(SSL *from, SSL *to, const std::string &message) {
  if (SSL_write(from, message.data(), static_cast<int>(message.size())) !=
      static_cast<int>(message.size())) {
    return false;
  }
  char buf[64];
  for (int i = 0; i < 10; ++i) {
    int n = SSL_read(to, buf, sizeof(buf));
    if (n > 0) return std::string(buf, static_cast<size_t>(n)) == message;
    if (!Retryable(to, n)) return false;
  }
  return false;
}

}  // namespace

void UseTestCertificate(SSL_CTX *ctx) {
  ASSERT_EQ(SSL_CTX_use_certificate(ctx, Certificate().cert.get()), 1);
  ASSERT_EQ(SSL_CTX_use_PrivateKey(ctx, Certificate().key.get()), 1);
}

void InstallTicketCallback(SSL_CTX *server, TicketCallbackState *state) {
  SSL_CTX_set_app_data(server, state);
  // Only tickets may resume: no server-side session cache.
  SSL_CTX_set_session_cache_mode(server, SSL_SESS_CACHE_OFF);
  ASSERT_EQ(SSL_CTX_set_tlsext_ticket_key_evp_cb(server, TicketCallback), 1);
}

HandshakeOutcome RunHandshake(SSL_CTX *server_ctx, SSL_CTX *client_ctx,
                              SSL_SESSION *resume) {
  HandshakeOutcome out;
  SslPtr server(SSL_new(server_ctx));
  SslPtr client(SSL_new(client_ctx));
  BIO *server_bio = nullptr;
  BIO *client_bio = nullptr;
  if (!server || !client ||
      BIO_new_bio_pair(&server_bio, 0, &client_bio, 0) != 1) {
    out.error = "setup: " + DrainErrors();
    return out;
  }
  SSL_set_bio(server.get(), server_bio, server_bio);
  SSL_set_bio(client.get(), client_bio, client_bio);
  SSL_set_accept_state(server.get());
  SSL_set_connect_state(client.get());
  if (resume != nullptr) SSL_set_session(client.get(), resume);

  bool client_done = false;
  bool server_done = false;
  for (int round = 0; round < 50 && !(client_done && server_done); ++round) {
    if (!client_done) {
      int rc = SSL_do_handshake(client.get());
      client_done = rc == 1;
      if (!client_done && !Retryable(client.get(), rc)) {
        out.error = "client handshake: " + DrainErrors();
        return out;
      }
    }
    if (!server_done) {
      int rc = SSL_do_handshake(server.get());
      server_done = rc == 1;
      if (!server_done && !Retryable(server.get(), rc)) {
        out.error = "server handshake: " + DrainErrors();
        return out;
      }
    }
  }
  if (!client_done || !server_done) {
    out.error = "handshake did not finish";
    return out;
  }
  if (!Exchange(server.get(), client.get(), "ping") ||
      !Exchange(client.get(), server.get(), "pong")) {
    out.error = "application data: " + DrainErrors();
    return out;
  }
  out.ok = true;
  out.reused = SSL_session_reused(client.get()) == 1;
  out.version = SSL_get_version(client.get());
  out.cipher = SSL_get_cipher_name(client.get());
  out.session.reset(SSL_get1_session(client.get()));
  // Send close_notify both ways: SSL_free without it marks the session
  // not resumable.
  SSL_shutdown(client.get());
  SSL_shutdown(server.get());
  return out;
}

}  // namespace hsmstek::provider::testing
