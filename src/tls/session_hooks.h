// OpenSSL hooks around our ticket key callback, installed with it:
//
// - session id context: set to SHA-256(policy digest, server certificates),
//   so OpenSSL itself refuses a session of another policy, from a ticket or
//   from a (shared) session cache, TLS 1.2 and 1.3. It replaces the
//   application's (OpenSSL has no getter): set yours before install, or
//   declare the difference (hsmstek_ssl_ctx_set_policy).
// - SSL_CTX_set_session_ticket_cb: a sealed ticket carries the issuing
//   SSL_CTX's policy digest (ticket app data); an opened ticket whose digest
//   differs from the resuming SSL_CTX's, or opened on a connection whose
//   verification differs from its SSL_CTX's, is ignored (full handshake, a
//   fresh ticket). A ticket without a digest (a legacy key's, or sealed
//   before binding existed) resumes only where it cannot carry a
//   client-certificate verdict: no peer certificate in it and none verified
//   by the server; it gets our session id context.
// - SSL_CTX switched during the handshake (servername callback, after the
//   ticket was admitted): at handshake end a resumed session whose current
//   SSL_CTX has another digest gets a failed verify result
//   (X509_V_ERR_APPLICATION_VERIFICATION); it cannot become a full
//   handshake any more.
// - early data: switched off per connection (SSL and the session issued)
//   unless the current SSL_CTX was installed with the early-data option,
//   at handshake start, when a ticket is opened and when one is issued.
// - the info callback (chained to the application's): counts an accepted
//   ticket as resumed/renewed only if the handshake really resumed, and runs
//   the checks above.
//
// WARNING: OpenSSL has one session ticket callback pair per SSL_CTX and no
// getter: installing replaces an application's own pair. An info callback
// set later with SSL_CTX_set_info_callback, or one set on an SSL, replaces
// ours until the next install: resumptions are then no longer counted and
// the SSL_CTX-switch check does not run (the rest still holds).
// No token round trip is added: the digest is computed at install time.
#pragma once

#include <openssl/ssl.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <vector>

#include "tls/policy_digest.h"
#include "tls/ticket_callback.h"

namespace hsmstek::tls {

// What the hooks keep per SSL_CTX (ex_data, freed with it): one
// TicketContext may serve several SSL_CTXs with different policies.
struct CtxHooks {
  std::vector<uint8_t> declared;  // from hsmstek_ssl_ctx_set_policy
  PolicyDigest policy{};
  PolicyFingerprint fingerprint;
  // The session id context install set: SHA-256 of the policy digest and
  // the server certificates.
  std::array<uint8_t, SSL_MAX_SID_CTX_LENGTH> sid_ctx{};
  unsigned int sid_ctx_length = 0;
  // The SSL_CTX's info callback before ours.
  void (*previous_info_cb)(const SSL *, int, int) = nullptr;
  std::atomic<bool> drift_logged{false};
};

// InstallSessionHooks binds `ctx` to its policy as configured now (keeping
// bytes declared earlier) and installs both hooks. Returns false if
// OpenSSL refused.
[[nodiscard]] bool InstallSessionHooks(SSL_CTX *ctx);

// HooksOf returns `ctx`'s hooks state, or null if none are installed.
CtxHooks *HooksOf(SSL_CTX *ctx);

// The hooks, exposed for tests. Never throw.
int GenerateTicketHook(SSL *ssl, void *arg) noexcept;
SSL_TICKET_RETURN DecryptTicketHook(SSL *ssl, SSL_SESSION *session,
                                    const unsigned char *key_name,
                                    size_t key_name_len,
                                    SSL_TICKET_STATUS status,
                                    void *arg) noexcept;
void InfoHook(const SSL *ssl, int where, int ret) noexcept;

}  // namespace hsmstek::tls
