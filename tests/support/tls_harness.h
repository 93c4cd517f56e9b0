// In-memory TLS for tests: a self-signed server certificate, client and
// server SSL_CTXs, a handshake driver over a BIO pair that also delivers
// TLS 1.3 NewSessionTicket messages, and a way to rewrite the ticket inside
// a client session (for tamper tests and fuzzing).
#pragma once

#include <openssl/ssl.h>

#include <memory>
#include <string>

#include "common/bytes.h"

namespace hsmstek::testing {

struct SslCtxFree {
  void operator()(SSL_CTX *c) const { SSL_CTX_free(c); }
};
struct SslSessionFree {
  void operator()(SSL_SESSION *s) const { SSL_SESSION_free(s); }
};
using UniqueSslCtx = std::unique_ptr<SSL_CTX, SslCtxFree>;
using UniqueSslSession = std::unique_ptr<SSL_SESSION, SslSessionFree>;

// Loads a process-wide self-signed P-256 certificate and key into `ctx`.
void UseTestCertificate(SSL_CTX *ctx);

// A client context pinned to `version` (TLS1_2_VERSION or TLS1_3_VERSION)
// that keeps the newest session it receives (see Handshake).
UniqueSslCtx NewClientCtx(int version);

// Sets `ctx`'s protocol range to exactly `version` and loads the test cert.
void PrepareServerCtx(SSL_CTX *ctx, int version);

struct HandshakeResult {
  bool ok = false;
  std::string error;
  bool reused = false;
  // The last session the client stored (with the newest ticket), if any.
  UniqueSslSession session;
  int tickets_received = 0;
  // The server's SSL_get_verify_result() once the handshake completed.
  long server_verify_result = -1;
};

// Runs one handshake between `client` and `server`, resuming `resume` if
// given, then exchanges one byte each way so TLS 1.3 tickets arrive.
HandshakeResult Handshake(SSL_CTX *client, SSL_CTX *server,
                          SSL_SESSION *resume = nullptr);

// The ticket bytes held by `session` (empty if none).
Bytes TicketOf(const SSL_SESSION *session);

// Returns a copy of `session` whose ticket is `ticket` (any length, even
// empty), by re-encoding the session's DER.
UniqueSslSession WithTicket(const SSL_SESSION *session, ByteSpan ticket);

}  // namespace hsmstek::testing
