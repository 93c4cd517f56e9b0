// OpenSSL hooks around our ticket key callback, installed with it:
//
// - SSL_CTX_set_session_ticket_cb: a sealed ticket carries the issuing
//   SSL_CTX's policy digest (ticket app data); an opened ticket whose digest
//   differs from the resuming SSL_CTX's is ignored (full handshake, a fresh
//   ticket). A ticket without a digest (a legacy key's, or sealed before
//   binding existed) resumes only where it cannot carry a client-certificate
//   verdict: no peer certificate in it and none verified by the server.
// - early data: keeps TLS 1.3 tickets stateless when early data was enabled
//   after install (OpenSSL would switch to in-memory tickets): early data is
//   turned off per connection unless the early-data option is on.
// - the info callback (chained to the application's): counts an accepted
//   ticket as resumed/renewed only if the handshake really resumed, and runs
//   the early-data guard when a server handshake starts.
//
// WARNING: OpenSSL has one session ticket callback pair per SSL_CTX and no
// getter: installing replaces an application's own pair. An info callback
// set later with SSL_CTX_set_info_callback, or one set on an SSL, replaces
// ours: resumptions are then no longer counted (policy binding still holds).
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
