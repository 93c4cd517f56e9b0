#include "bench_env.h"

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>

#include "common/clock.h"
#include "keystore/provisioning.h"
#include "pkcs11/uri.h"
#include "provider/provider.h"
#include "softhsm.h"

namespace hsmstek::bench {
namespace {

constexpr char kTokenLabel[] = "bench";
constexpr char kStoreLabel[] = "tickets";
constexpr int64_t kHour = 3600;
constexpr int64_t kDay = 24 * kHour;

[[noreturn]] void Die(const std::string &what) {
  std::fprintf(stderr, "bench set-up failed: %s\n", what.c_str());
  std::abort();
}

Env *g_env = nullptr;

// ---- nginx-style ticket key callback ---------------------------------------
//
// What nginx does with `ssl_session_ticket_key` (an 80-byte file: name16,
// hmac32, aes32): the raw keys live in process memory and the callback hands
// them to the cipher and HMAC contexts libssl created. Renewal follows nginx
// >= 1.23.2: always renew in TLS 1.3 (single-use tickets, like OpenSSL's
// built-in tickets and hsmstek's default), in TLS 1.2 only for a non-current
// key. One key here, so TLS 1.2 never renews.
struct RawTicketKey {
  unsigned char name[16];
  unsigned char hmac[32];
  unsigned char aes[32];
};
RawTicketKey g_raw_key;

}  // namespace

int NginxStyleCallback(SSL *ssl, unsigned char key_name[16],
                       unsigned char iv[16], EVP_CIPHER_CTX *cipher_ctx,
                       EVP_MAC_CTX *mac_ctx, int encrypt) {
  char digest[] = "SHA256";
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, g_raw_key.hmac,
                                        sizeof(g_raw_key.hmac)),
      OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
      OSSL_PARAM_construct_end()};
  if (encrypt == 1) {
    if (RAND_bytes(iv, 16) != 1) return -1;
    if (EVP_EncryptInit_ex(cipher_ctx, EVP_aes_256_cbc(), nullptr,
                           g_raw_key.aes, iv) != 1) {
      return -1;
    }
    if (EVP_MAC_CTX_set_params(mac_ctx, params) != 1) return -1;
    std::memcpy(key_name, g_raw_key.name, 16);
    return 1;
  }
  if (std::memcmp(key_name, g_raw_key.name, 16) != 0) return 0;
  if (EVP_MAC_CTX_set_params(mac_ctx, params) != 1) return -1;
  if (EVP_DecryptInit_ex(cipher_ctx, EVP_aes_256_cbc(), nullptr, g_raw_key.aes,
                         iv) != 1) {
    return -1;
  }
  return SSL_version(ssl) == TLS1_3_VERSION ? 2 : 1;
}

namespace {

// ---- client session capture
// --------------------------------------------------

int SlotIndex() {
  static const int index =
      SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}

int OnNewSession(SSL *ssl, SSL_SESSION *session) {
  auto *slot = static_cast<Outcome *>(SSL_get_ex_data(ssl, SlotIndex()));
  if (slot == nullptr) return 0;
  slot->newest.reset(session);  // takes the reference
  return 1;
}

std::string DrainErrors() {
  std::string out;
  unsigned long e;
  while ((e = ERR_get_error()) != 0) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out;
}

size_t g_plaintext_tls13 = 0;
size_t g_plaintext_tls12 = 0;

// Decrypts the ticket of `session` (issued under g_raw_key) and returns the
// plaintext length: exactly what libssl sealed.
size_t MeasurePlaintext(const SSL_SESSION *session) {
  const unsigned char *tick = nullptr;
  size_t len = 0;
  SSL_SESSION_get0_ticket(session, &tick, &len);
  if (tick == nullptr || len < 16 + 16 + 16 + 32) Die("no ticket to measure");
  std::vector<unsigned char> out(len);
  struct CipherCtxFree {
    void operator()(EVP_CIPHER_CTX *c) const { EVP_CIPHER_CTX_free(c); }
  };
  std::unique_ptr<EVP_CIPHER_CTX, CipherCtxFree> ctx(EVP_CIPHER_CTX_new());
  int n = 0, m = 0;
  const int ct_len = static_cast<int>(len - 16 - 16 - 32);
  if (ctx == nullptr ||
      EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_cbc(), nullptr, g_raw_key.aes,
                         tick + 16) != 1 ||
      EVP_DecryptUpdate(ctx.get(), out.data(), &n, tick + 32, ct_len) != 1 ||
      EVP_DecryptFinal_ex(ctx.get(), out.data() + n, &m) != 1) {
    Die("measuring the ticket plaintext: " + DrainErrors());
  }
  return static_cast<size_t>(n + m);
}

}  // namespace

Result<std::shared_ptr<keystore::KeyStore>> Provision(const std::string &uri) {
  // An internal read/write handle, as the CLI would use.
  keystore::StoreOptions options;
  options.background_maintenance = false;
  options.token.read_write = true;
  Result<std::shared_ptr<keystore::KeyStore>> ks =
      keystore::KeyStore::Open(uri, options);
  if (!ks.ok()) return ks.status();
  Result<p11::Session> session = (*ks)->token()->Acquire();
  if (!session.ok()) return session.status();
  Result<p11::TokenUri> parsed = p11::ParseTokenUri(uri);
  if (!parsed.ok()) return parsed.status();
  keystore::Policy policy;
  policy.period_s = kHour;
  policy.decrypt_window_s = kDay;
  policy.not_before = SystemClock::Instance().NowUnix() - kDay;
  policy.created_at = policy.not_before;
  Result<keystore::StoreId> id =
      keystore::CreateMaster(*session, parsed->object.value_or(""), policy);
  if (!id.ok()) return id.status();
  Status loaded = (*ks)->Load();
  if (!loaded.ok()) return loaded;
  return *ks;
}

const char *TicketsName(Tickets tickets) {
  switch (tickets) {
    case Tickets::kBuiltin:
      return "builtin";
    case Tickets::kNginxStyle:
      return "nginx_style";
    case Tickets::kBuiltinScoped:
      return "builtin_scoped";
    case Tickets::kHsmstek:
    default:
      return "hsmstek";
  }
}

void Env::Init() {
  if (g_env != nullptr) return;
  testing::SoftHsm &hsm = testing::SoftHsm::Get();  // sets SOFTHSM2_CONF
  hsm.CreateToken(kTokenLabel);
  auto *env = new Env();
  env->uri_ = hsm.Uri(kTokenLabel, kStoreLabel);

  Result<std::shared_ptr<keystore::KeyStore>> ks = Provision(env->uri_);
  if (!ks.ok()) Die(ks.status().message());
  env->keystore_ = *ks;

  // The server's handle, through the public API.
  if (hsmstek_store_open(env->uri_.c_str(), &env->store_) != HSMSTEK_OK ||
      hsmstek_store_check(env->store_) != HSMSTEK_OK) {
    Die(std::string("hsmstek_store_open/check: ") + hsmstek_last_error());
  }
  if (RAND_bytes(reinterpret_cast<unsigned char *>(&g_raw_key),
                 sizeof(g_raw_key)) != 1) {
    Die("RAND_bytes");
  }
  g_env = env;
  for (Tickets t : {Tickets::kBuiltin, Tickets::kNginxStyle, Tickets::kHsmstek,
                    Tickets::kBuiltinScoped}) {
    for (int v : {TLS1_2_VERSION, TLS1_3_VERSION}) {
      env->server_ctx_[static_cast<int>(t)][v == TLS1_3_VERSION] =
          env->NewServerCtx(t, v);
    }
  }

  // Measure what libssl seals (full handshake, nginx-style keys we can
  // decrypt with).
  for (int version : {TLS1_3_VERSION, TLS1_2_VERSION}) {
    UniqueSslCtx server = env->NewServerCtx(Tickets::kNginxStyle, version);
    UniqueSslCtx client = NewClientCtx(version);
    Outcome out;
    if (!Connect(client.get(), server.get(), nullptr, &out) || !out.newest) {
      Die("measuring handshake failed: " + out.error);
    }
    (version == TLS1_3_VERSION ? g_plaintext_tls13 : g_plaintext_tls12) =
        MeasurePlaintext(out.newest.get());
  }
}

Env &Env::Get() {
  if (g_env == nullptr) Die("Env::Init() was not called");
  return *g_env;
}

UniqueSslCtx Env::NewServerCtx(Tickets tickets, int version) const {
  SSL_CTX *ctx = nullptr;
  if (tickets == Tickets::kHsmstek) {
    ctx = hsmstek_ssl_ctx_new(store_, TLS_server_method());
  } else if (tickets == Tickets::kBuiltinScoped) {
    if (Status s = provider::RegisterProvider(); !s.ok()) Die(s.message());
    ctx = SSL_CTX_new_ex(nullptr, provider::kPreferProviderQuery,
                         TLS_server_method());
  } else {
    ctx = SSL_CTX_new(TLS_server_method());
  }
  if (ctx == nullptr) {
    Die(std::string("server SSL_CTX: ") + hsmstek_last_error() + " " +
        DrainErrors());
  }
  testing::PrepareServerCtx(ctx, version);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  if (tickets == Tickets::kNginxStyle &&
      SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, NginxStyleCallback) != 1) {
    Die("SSL_CTX_set_tlsext_ticket_key_evp_cb");
  }
  return UniqueSslCtx(ctx);
}

SSL_CTX *Env::ServerCtx(Tickets tickets, int version) const {
  return server_ctx_[static_cast<int>(tickets)][version == TLS1_3_VERSION]
      .get();
}

UniqueSslCtx NewClientCtx(int version) {
  UniqueSslCtx ctx(SSL_CTX_new(TLS_client_method()));
  if (!ctx) Die("client SSL_CTX_new");
  SSL_CTX_set_min_proto_version(ctx.get(), version);
  SSL_CTX_set_max_proto_version(ctx.get(), version);
  SSL_CTX_set_session_cache_mode(
      ctx.get(), SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
  SSL_CTX_sess_set_new_cb(ctx.get(), OnNewSession);
  (void)SlotIndex();
  return ctx;
}

bool Connect(SSL_CTX *client_ctx, SSL_CTX *server_ctx, SSL_SESSION *resume,
             Outcome *out) {
  struct SslFree {
    void operator()(SSL *ssl) const { SSL_free(ssl); }
  };
  std::unique_ptr<SSL, SslFree> client_owner(SSL_new(client_ctx));
  std::unique_ptr<SSL, SslFree> server_owner(SSL_new(server_ctx));
  SSL *client = client_owner.get();
  SSL *server = server_owner.get();
  BIO *client_bio = nullptr;
  BIO *server_bio = nullptr;
  if (client == nullptr || server == nullptr ||
      BIO_new_bio_pair(&client_bio, 0, &server_bio, 0) != 1) {
    out->error = "SSL_new/BIO_new_bio_pair: " + DrainErrors();
    return false;
  }
  // Each SSL owns one end of the pair from here on.
  SSL_set_bio(client, client_bio, client_bio);
  SSL_set_bio(server, server_bio, server_bio);
  SSL_set_connect_state(client);
  SSL_set_accept_state(server);
  SSL_set_ex_data(client, SlotIndex(), out);
  if (resume != nullptr) SSL_set_session(client, resume);

  bool client_done = false, server_done = false, ok = true;
  for (int round = 0; round < 20 && !(client_done && server_done); ++round) {
    if (!client_done) {
      int r = SSL_do_handshake(client);
      if (r == 1) {
        client_done = true;
      } else if (SSL_get_error(client, r) != SSL_ERROR_WANT_READ) {
        out->error = "client handshake: " + DrainErrors();
        ok = false;
        break;
      }
    }
    if (!server_done) {
      int r = SSL_do_handshake(server);
      if (r == 1) {
        server_done = true;
      } else if (SSL_get_error(server, r) != SSL_ERROR_WANT_READ) {
        out->error = "server handshake: " + DrainErrors();
        ok = false;
        break;
      }
    }
  }
  if (ok && !(client_done && server_done)) {
    out->error = "handshake did not finish";
    ok = false;
  }
  if (ok) {
    // Processes the TLS 1.3 NewSessionTicket messages; there is no
    // application data, so the read ends with WANT_READ.
    char byte;
    int r = SSL_read(client, &byte, 1);
    if (r <= 0 && SSL_get_error(client, r) != SSL_ERROR_WANT_READ) {
      out->error = "client read: " + DrainErrors();
      ok = false;
    }
  }
  if (ok) {
    out->reused = SSL_session_reused(client) == 1;
    // TLS 1.2 clients do not always report a renewed ticket through the
    // new-session callback; the connection's session holds the newest.
    if (SSL_version(client) != TLS1_3_VERSION) {
      out->newest.reset(SSL_get1_session(client));
    }
    // Freeing an SSL that was not shut down marks its session
    // non-resumable: close quietly, as after close_notify.
    SSL_set_shutdown(client, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
    SSL_set_shutdown(server, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
  }
  SSL_set_ex_data(client, SlotIndex(), nullptr);
  return ok;
}

size_t TicketPlaintextSize(int version) {
  return version == TLS1_3_VERSION ? g_plaintext_tls13 : g_plaintext_tls12;
}

}  // namespace hsmstek::bench
