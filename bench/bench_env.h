// Shared set-up of the benchmarks: a throwaway SoftHSM token with one
// provisioned store, the three kinds of TLS server contexts compared
// (OpenSSL's built-in tickets, an nginx-style in-memory key callback,
// hsmstek), a lean in-memory handshake driver, and the ticket plaintext that
// the seal/open benchmarks use.
#pragma once

#include <hsmstek/hsmstek.h>
#include <openssl/ssl.h>

#include <memory>
#include <string>
#include <vector>

#include "keystore/store.h"
#include "tls_harness.h"

namespace hsmstek::bench {

using testing::UniqueSslCtx;
using testing::UniqueSslSession;

// Which ticket implementation a server context uses.
enum class Tickets {
  kBuiltin,     // OpenSSL's own keys (in memory), no callback
  kNginxStyle,  // SSL_CTX_set_tlsext_ticket_key_evp_cb, raw keys in memory
  kHsmstek,     // hsmstek_ssl_ctx_new: keys in the token (scoped routing)
  // OpenSSL's built-in tickets on an SSL_CTX created like hsmstek's (scoped
  // "?provider=hsmstek" query, every HMAC through the delegating HMAC):
  // prices the routing alone. Informational.
  kBuiltinScoped,
};

const char *TicketsName(Tickets tickets);

// Provision creates a master in the store named by `uri` (the token must
// exist; SOFTHSM2_CONF is taken from the environment): period 1 h, decrypt
// window 1 day, active since a day ago. Returns a loaded internal handle.
[[nodiscard]] Result<std::shared_ptr<keystore::KeyStore>> Provision(
    const std::string &uri);

// Env is the process-wide benchmark fixture. Created by Env::Init() (first
// thing in main: it points SOFTHSM2_CONF at a fresh directory), then shared
// read-only by all benchmarks and threads.
class Env {
 public:
  // Creates the token "bench", a store "tickets" with one active master
  // (period 1 h, decrypt window 1 day, active since yesterday, system
  // clock) and opens it through the public C API. Aborts on failure.
  static void Init();
  static Env &Get();

  // The store as a server would open it (hsmstek_store_open, defaults:
  // system clock, background maintenance, TLS 1.3 renewal on).
  hsmstek_store *store() const { return store_; }
  // A second, internal handle on the same store (its own PKCS#11 sessions),
  // used by the floor benchmark to obtain key handles of the same types.
  const std::shared_ptr<keystore::KeyStore> &keystore() const {
    return keystore_;
  }
  const std::string &uri() const { return uri_; }

  // A new server context for `version` (TLS1_2_VERSION / TLS1_3_VERSION)
  // whose tickets use `tickets`. Server-side session cache off for all
  // kinds (so only tickets resume, identically for every variant).
  UniqueSslCtx NewServerCtx(Tickets tickets, int version) const;

  // The long-lived server context for (tickets, version), created by Init()
  // and shared by every benchmark and thread (as a server shares its
  // SSL_CTX between connections). Not owned by the caller.
  SSL_CTX *ServerCtx(Tickets tickets, int version) const;

 private:
  Env() = default;
  hsmstek_store *store_ = nullptr;
  std::shared_ptr<keystore::KeyStore> keystore_;
  std::string uri_;
  UniqueSslCtx server_ctx_[4][2];  // [Tickets][TLS 1.2, TLS 1.3]
};

// A client context pinned to `version` that keeps the newest session it
// receives (see Connect). One per benchmark thread.
UniqueSslCtx NewClientCtx(int version);

struct Outcome {
  bool reused = false;
  UniqueSslSession newest;  // the last session the client received, if any
  std::string error;        // set when the handshake failed
};

// Connect runs one handshake between fresh client and server SSLs over a BIO
// pair, resuming `resume` if not null. After the handshake the client reads
// once so that TLS 1.3 NewSessionTicket messages are processed (no
// application data is exchanged). Returns false (and sets out->error) on
// failure. Identical work for every server variant.
bool Connect(SSL_CTX *client, SSL_CTX *server, SSL_SESSION *resume,
             Outcome *out);

// The nginx-style ticket key callback (raw keys in memory), exposed for the
// seal/open benchmarks that drive a callback the way libssl does.
int NginxStyleCallback(SSL *ssl, unsigned char key_name[16],
                       unsigned char iv[16], EVP_CIPHER_CTX *cipher_ctx,
                       EVP_MAC_CTX *mac_ctx, int encrypt);

// The plaintext libssl seals for a TLS 1.3 session of these benchmarks
// (measured: see TicketPlaintextSize), so the seal/open benchmarks handle
// tickets of the real size.
size_t TicketPlaintextSize(int version);

}  // namespace hsmstek::bench
