// The session-ticket callback (docs/FORMAT.md, "Accepting a ticket") and its installation on SSL_CTXs.
//
// Encrypt: the active master's current epoch keys, a random IV, the
// provider's cipher and HMAC on token handles; 1 on success, 0 (no ticket)
// on any failure. Decrypt: the store's verdict on the key name; 1 for a
// current ticket in TLS 1.2, 2 (renew) for a current ticket in TLS 1.3 by
// default and for any older or legacy ticket, 0 for everything else. Never
// -1 for token trouble: the handshake completes in full.
#pragma once

#include <openssl/ssl.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>

#include "common/status.h"
#include "keystore/store.h"
#include "keystore/store_set.h"
#include "provider/armed_pool.h"
#include "tls/stats.h"

namespace hsmstek::tls {

struct TicketOptions {
  // TLS 1.3: ask for a fresh ticket when resuming with a current one.
  bool tls13_renew = true;
  // Keep token operations initialised ahead of use (provider/armed_pool.h):
  // one token round trip per step on the handshake thread instead of two.
  bool prearm = true;
  // TLS 1.3 early data (0-RTT) accepted on SSL_CTXs that enable it. Off:
  // installing on such an SSL_CTX fails, and tickets issued where it was
  // enabled later carry no early data. On: SSL_OP_NO_ANTI_REPLAY is set so
  // that tickets stay stateless (sealed in the token); a recorded 0-RTT
  // flight can then be replayed on every server of the fleet for the
  // ticket's lifetime (docs/SECURITY.md).
  bool allow_early_data = false;
};

// What one SSL_CTX's callback works with. Owned by the SSL_CTX (ex_data)
// through a shared_ptr, so the store outlives every context using it.
struct TicketContext {
  // The preferred store; with `stores` unset, the only one.
  std::shared_ptr<keystore::KeyStore> store;
  // Every token of the store, for failover (keystore/store_set.h); each
  // handshake uses the member stores->Active() picks. InstallTicketCallback
  // sets a one-member set around `store` when unset.
  std::shared_ptr<keystore::StoreSet> stores;
  std::shared_ptr<TicketStats> stats;
  TicketOptions options;
  // Shared by the contexts of one store; InstallTicketCallback creates one
  // when `options.prearm` and none is set.
  std::shared_ptr<provider::ArmedPool> armed;
  // Rate limit for the "not routed" error: next Unix second to log at.
  std::atomic<int64_t> next_routing_log{0};
  // Log-once flag for early data enabled after install (session_hooks.h).
  std::atomic<bool> early_data_logged{false};
  // Log-once flag for a resumed session whose SSL_CTX was switched to
  // another policy during the handshake (session_hooks.h).
  std::atomic<bool> switch_logged{false};
};

// TicketContextOf returns the context installed on `ssl`'s current SSL_CTX,
// or null.
TicketContext *TicketContextOf(const SSL *ssl);
TicketContext *TicketContextOf(SSL_CTX *ctx);

// InstallTicketCallback makes `ctx` seal and open its tickets through
// `context`'s store, replacing any other ticket key callback (and any
// previously installed context), and caps the session timeout (the
// advertised ticket lifetime) at 7 days. Registers the provider. Does not
// change whether tickets are enabled (SSL_OP_NO_TICKET is respected).
// Binds tickets to `ctx`'s security policy as configured now and installs
// the session hooks (tls/session_hooks.h). Fails with kFailedPrecondition
// if `ctx` has early data enabled and `context->options.allow_early_data`
// is off.
[[nodiscard]] Status InstallTicketCallback(
    SSL_CTX *ctx, std::shared_ptr<TicketContext> context);

// SetDeclaredPolicy recomputes the policy digest of `ctx` (which must have
// a context installed) from its current verification settings plus
// `declared`. Call it after changing `ctx`'s verification, before serving.
[[nodiscard]] Status SetDeclaredPolicy(SSL_CTX *ctx,
                                       std::span<const uint8_t> declared);

// NewScopedSslCtx returns an SSL_CTX created with
// SSL_CTX_new_ex(NULL, "?provider=hsmstek", method) with the callback
// installed: only this context routes its ticket HMAC to the provider.
[[nodiscard]] Result<SSL_CTX *> NewScopedSslCtx(
    const SSL_METHOD *method, std::shared_ptr<TicketContext> context);

// The callback libssl calls: TicketKeyCallback inside the exception
// barrier. An exception becomes 0 (no ticket: a full handshake), counted as
// a token error and an exception in the context's stats.
int GuardedTicketKeyCallback(SSL *ssl, unsigned char key_name[16],
                             unsigned char iv[16], EVP_CIPHER_CTX *cipher_ctx,
                             EVP_MAC_CTX *mac_ctx, int encrypt) noexcept;

// The callback itself, exposed for tests and fuzzers. May throw (only what
// the standard library throws): install GuardedTicketKeyCallback.
int TicketKeyCallback(SSL *ssl, unsigned char key_name[16],
                      unsigned char iv[16], EVP_CIPHER_CTX *cipher_ctx,
                      EVP_MAC_CTX *mac_ctx, int encrypt);

}  // namespace hsmstek::tls
