#include "tls_harness.h"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>

namespace hsmstek::testing {
namespace {

struct TestIdentity {
  EVP_PKEY *key = nullptr;
  X509 *cert = nullptr;
};

const TestIdentity &Identity() {
  static const TestIdentity identity = [] {
    TestIdentity id;
    id.key = EVP_EC_gen("P-256");
    id.cert = X509_new();
    if (id.key == nullptr || id.cert == nullptr) std::abort();
    X509_set_version(id.cert, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(id.cert), 1);
    X509_gmtime_adj(X509_getm_notBefore(id.cert), -3600);
    X509_gmtime_adj(X509_getm_notAfter(id.cert), 3600L * 24 * 365);
    X509_set_pubkey(id.cert, id.key);
    X509_NAME *name = X509_get_subject_name(id.cert);
    X509_NAME_add_entry_by_txt(
        name, "CN", MBSTRING_ASC,
        reinterpret_cast<const unsigned char *>("localhost"), -1, -1, 0);
    X509_set_issuer_name(id.cert, name);
    if (X509_sign(id.cert, id.key, EVP_sha256()) <= 0) std::abort();
    return id;
  }();
  return identity;
}

int g_session_index = -1;

// Keeps the newest session with a ticket on the client SSL.
int OnNewSession(SSL *ssl, SSL_SESSION *session) {
  auto *slot =
      static_cast<HandshakeResult *>(SSL_get_ex_data(ssl, g_session_index));
  if (slot == nullptr) return 0;
  slot->session.reset(session);  // we take the reference
  slot->tickets_received++;
  return 1;
}

std::string Errors() {
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

// Shuttles bytes between the two memory BIOs.
void Pump(BIO *client_out, BIO *server_in, BIO *server_out, BIO *client_in) {
  char buf[16384];
  int n;
  while ((n = BIO_read(client_out, buf, sizeof(buf))) > 0)
    BIO_write(server_in, buf, n);
  while ((n = BIO_read(server_out, buf, sizeof(buf))) > 0)
    BIO_write(client_in, buf, n);
}

size_t DerLength(const uint8_t *p, size_t avail, size_t *header) {
  if (avail < 2) return SIZE_MAX;
  if (p[1] < 0x80) {
    *header = 2;
    return p[1];
  }
  size_t n = p[1] & 0x7f;
  if (n == 0 || n > 3 || avail < 2 + n) return SIZE_MAX;
  size_t len = 0;
  for (size_t i = 0; i < n; ++i) len = len << 8 | p[2 + i];
  *header = 2 + n;
  return len;
}

void PutDer(Bytes &out, uint8_t tag, ByteSpan content) {
  out.push_back(tag);
  size_t n = content.size();
  if (n < 0x80) {
    out.push_back(static_cast<uint8_t>(n));
  } else if (n < 0x100) {
    out.push_back(0x81);
    out.push_back(static_cast<uint8_t>(n));
  } else if (n < 0x10000) {
    out.push_back(0x82);
    out.push_back(static_cast<uint8_t>(n >> 8));
    out.push_back(static_cast<uint8_t>(n));
  } else {
    out.push_back(0x83);
    out.push_back(static_cast<uint8_t>(n >> 16));
    out.push_back(static_cast<uint8_t>(n >> 8));
    out.push_back(static_cast<uint8_t>(n));
  }
  out.insert(out.end(), content.begin(), content.end());
}

}  // namespace

void UseTestCertificate(SSL_CTX *ctx) {
  const TestIdentity &id = Identity();
  if (SSL_CTX_use_certificate(ctx, id.cert) != 1 ||
      SSL_CTX_use_PrivateKey(ctx, id.key) != 1) {
    std::abort();
  }
}

void PrepareServerCtx(SSL_CTX *ctx, int version) {
  SSL_CTX_set_min_proto_version(ctx, version);
  SSL_CTX_set_max_proto_version(ctx, version);
  UseTestCertificate(ctx);
}

UniqueSslCtx NewClientCtx(int version) {
  static std::once_flag once;
  std::call_once(once, [] {
    g_session_index =
        SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  });
  UniqueSslCtx ctx(SSL_CTX_new(TLS_client_method()));
  SSL_CTX_set_min_proto_version(ctx.get(), version);
  SSL_CTX_set_max_proto_version(ctx.get(), version);
  SSL_CTX_set_session_cache_mode(
      ctx.get(), SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
  SSL_CTX_sess_set_new_cb(ctx.get(), OnNewSession);
  return ctx;
}

HandshakeResult Handshake(SSL_CTX *client_ctx, SSL_CTX *server_ctx,
                          SSL_SESSION *resume) {
  HandshakeResult result;
  ERR_clear_error();
  SSL *client = SSL_new(client_ctx);
  SSL *server = SSL_new(server_ctx);
  BIO *c_in = BIO_new(BIO_s_mem());
  BIO *c_out = BIO_new(BIO_s_mem());
  BIO *s_in = BIO_new(BIO_s_mem());
  BIO *s_out = BIO_new(BIO_s_mem());
  SSL_set_bio(client, c_in, c_out);
  SSL_set_bio(server, s_in, s_out);
  SSL_set_connect_state(client);
  SSL_set_accept_state(server);
  SSL_set_ex_data(client, g_session_index, &result);
  if (resume != nullptr) SSL_set_session(client, resume);

  bool client_done = false, server_done = false;
  for (int round = 0; round < 50 && !(client_done && server_done); ++round) {
    if (!client_done) {
      int r = SSL_do_handshake(client);
      if (r == 1)
        client_done = true;
      else if (SSL_get_error(client, r) != SSL_ERROR_WANT_READ) {
        result.error = "client handshake: " + Errors();
        break;
      }
    }
    if (!server_done) {
      int r = SSL_do_handshake(server);
      if (r == 1)
        server_done = true;
      else if (SSL_get_error(server, r) != SSL_ERROR_WANT_READ) {
        result.error = "server handshake: " + Errors();
        break;
      }
    }
    Pump(c_out, s_in, s_out, c_in);
  }
  if (client_done && server_done) {
    // One byte each way: the client reads the server's post-handshake
    // messages (TLS 1.3 NewSessionTicket) on the way.
    char byte = 'x';
    bool ok = SSL_write(server, &byte, 1) == 1;
    Pump(c_out, s_in, s_out, c_in);
    ok = ok && SSL_read(client, &byte, 1) == 1;
    ok = ok && SSL_write(client, &byte, 1) == 1;
    Pump(c_out, s_in, s_out, c_in);
    ok = ok && SSL_read(server, &byte, 1) == 1;
    if (!ok) {
      result.error = "data exchange: " + Errors();
    } else {
      result.ok = true;
      result.reused = SSL_session_reused(client) == 1;
      result.server_verify_result = SSL_get_verify_result(server);
      // TLS 1.2 clients do not always report a renewed ticket through the
      // new-session callback; the connection's session holds the newest.
      if (SSL_version(client) != TLS1_3_VERSION) {
        result.session.reset(SSL_get1_session(client));
      }
    }
  } else if (result.error.empty()) {
    result.error = "handshake did not finish";
  }
  SSL_set_ex_data(client, g_session_index, nullptr);
  // Freeing a connection that was not shut down marks its session
  // non-resumable: close both ends quietly, as after a close_notify.
  if (result.ok) {
    SSL_set_shutdown(client, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
    SSL_set_shutdown(server, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
  }
  SSL_free(client);
  SSL_free(server);
  return result;
}

Bytes TicketOf(const SSL_SESSION *session) {
  const unsigned char *tick = nullptr;
  size_t len = 0;
  SSL_SESSION_get0_ticket(session, &tick, &len);
  return tick == nullptr ? Bytes() : Bytes(tick, tick + len);
}

UniqueSslSession WithTicket(const SSL_SESSION *session, ByteSpan ticket) {
  int der_len = i2d_SSL_SESSION(const_cast<SSL_SESSION *>(session), nullptr);
  Bytes der(der_len);
  unsigned char *p = der.data();
  i2d_SSL_SESSION(const_cast<SSL_SESSION *>(session), &p);
  // SSL_SESSION ::= SEQUENCE { ..., [10] EXPLICIT OCTET STRING ticket, ... }
  size_t header = 0;
  size_t body_len = DerLength(der.data(), der.size(), &header);
  if (der[0] != 0x30 || body_len == SIZE_MAX) std::abort();
  Bytes body;
  size_t pos = header;
  while (pos < header + body_len) {
    size_t h = 0;
    size_t len = DerLength(der.data() + pos, der.size() - pos, &h);
    if (len == SIZE_MAX) std::abort();
    if (der[pos] == 0xAA) {
      Bytes octets;
      PutDer(octets, 0x04, ticket);
      PutDer(body, 0xAA, octets);
    } else {
      body.insert(body.end(), der.begin() + pos, der.begin() + pos + h + len);
    }
    pos += h + len;
  }
  Bytes out;
  PutDer(out, 0x30, body);
  const unsigned char *q = out.data();
  SSL_SESSION *copy =
      d2i_SSL_SESSION(nullptr, &q, static_cast<long>(out.size()));
  return UniqueSslSession(copy);
}

}  // namespace hsmstek::testing
