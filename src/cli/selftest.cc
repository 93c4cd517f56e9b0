// hsmstek selftest <uri>: TLS 1.2 and TLS 1.3 handshakes plus resumptions,
// in memory, through the store's token, using only the public C API (as a
// server would). Provisions nothing; exits non-zero if a resumption fails.
#include <hsmstek/hsmstek.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <string>

#include "cli/common.h"
#include "common/bytes.h"

namespace hsmstek::cli {
namespace {

template <typename T, void (*Free)(T *)>
struct Deleter {
  void operator()(T *p) const { Free(p); }
};
using UniqueCtx = std::unique_ptr<SSL_CTX, Deleter<SSL_CTX, SSL_CTX_free>>;
using UniqueSsl = std::unique_ptr<SSL, Deleter<SSL, SSL_free>>;
using UniqueSession =
    std::unique_ptr<SSL_SESSION, Deleter<SSL_SESSION, SSL_SESSION_free>>;
using UniqueKey = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY, EVP_PKEY_free>>;
using UniqueCert = std::unique_ptr<X509, Deleter<X509, X509_free>>;
struct StoreCloser {
  void operator()(hsmstek_store *s) const { hsmstek_store_close(s); }
};

// A throwaway P-256 identity for the in-memory server (not a ticket key:
// the ticket keys stay in the token).
Status MakeIdentity(UniqueKey *key, UniqueCert *cert) {
  key->reset(EVP_EC_gen("P-256"));
  cert->reset(X509_new());
  if (!*key || !*cert) return Internal("cannot create a test identity");
  X509 *c = cert->get();
  X509_set_version(c, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(c), 1);
  X509_gmtime_adj(X509_getm_notBefore(c), -60);
  X509_gmtime_adj(X509_getm_notAfter(c), 3600);
  X509_set_pubkey(c, key->get());
  X509_NAME *name = X509_get_subject_name(c);
  X509_NAME_add_entry_by_txt(
      name, "CN", MBSTRING_ASC,
      reinterpret_cast<const unsigned char *>("hsmstek-selftest"), -1, -1, 0);
  X509_set_issuer_name(c, name);
  if (X509_sign(c, key->get(), EVP_sha256()) <= 0) {
    return Internal("cannot sign the test certificate");
  }
  return Status::Ok();
}

struct Outcome {
  bool ok = false;
  bool reused = false;
  UniqueSession session;  // the client's newest session
};

// One handshake over a pair of memory BIOs, then one byte each way so that
// TLS 1.3 tickets reach the client.
Outcome Connect(SSL_CTX *client_ctx, SSL_CTX *server_ctx, SSL_SESSION *resume) {
  Outcome out;
  UniqueSsl client(SSL_new(client_ctx));
  UniqueSsl server(SSL_new(server_ctx));
  if (!client || !server) return out;
  BIO *client_bio = nullptr, *server_bio = nullptr;
  if (BIO_new_bio_pair(&client_bio, 0, &server_bio, 0) != 1) return out;
  SSL_set_bio(client.get(), client_bio, client_bio);
  SSL_set_bio(server.get(), server_bio, server_bio);
  SSL_set_connect_state(client.get());
  SSL_set_accept_state(server.get());
  if (resume != nullptr) SSL_set_session(client.get(), resume);
  bool client_done = false, server_done = false;
  for (int i = 0; i < 64 && !(client_done && server_done); ++i) {
    if (!client_done) client_done = SSL_do_handshake(client.get()) == 1;
    if (!server_done) server_done = SSL_do_handshake(server.get()) == 1;
  }
  if (!client_done || !server_done) return out;
  char byte = 'x';
  if (SSL_write(server.get(), &byte, 1) != 1 ||
      SSL_read(client.get(), &byte, 1) != 1 ||
      SSL_write(client.get(), &byte, 1) != 1 ||
      SSL_read(server.get(), &byte, 1) != 1) {
    return out;
  }
  out.ok = true;
  out.reused = SSL_session_reused(client.get()) == 1;
  out.session.reset(SSL_get1_session(client.get()));
  // A connection freed without a shutdown makes its session non-resumable.
  SSL_set_shutdown(client.get(), SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
  SSL_set_shutdown(server.get(), SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
  return out;
}

std::string TicketName(const SSL_SESSION *session) {
  const unsigned char *ticket = nullptr;
  size_t len = 0;
  SSL_SESSION_get0_ticket(session, &ticket, &len);
  if (ticket == nullptr || len < 16) return "(none)";
  return HexEncode(ByteSpan(ticket, 16));
}

// Runs one full handshake and `rounds` resumptions at `version`; prints
// what happened. Returns false if any resumption failed.
bool RunVersion(hsmstek_store *store, int version, const char *name,
                const UniqueKey &key, const UniqueCert &cert, int rounds) {
  UniqueCtx server(hsmstek_ssl_ctx_new(store, TLS_server_method()));
  UniqueCtx client(SSL_CTX_new(TLS_client_method()));
  if (!server || !client ||
      SSL_CTX_use_certificate(server.get(), cert.get()) != 1 ||
      SSL_CTX_use_PrivateKey(server.get(), key.get()) != 1) {
    std::printf("%s: cannot set up the contexts: %s\n", name,
                hsmstek_last_error());
    return false;
  }
  for (SSL_CTX *ctx : {server.get(), client.get()}) {
    SSL_CTX_set_min_proto_version(ctx, version);
    SSL_CTX_set_max_proto_version(ctx, version);
  }
  Outcome full = Connect(client.get(), server.get(), nullptr);
  if (!full.ok) {
    std::printf("%s: full handshake FAILED\n", name);
    return false;
  }
  std::printf("%s: full handshake ok, ticket key name %s\n", name,
              TicketName(full.session.get()).c_str());
  int resumed = 0;
  UniqueSession latest = std::move(full.session);
  for (int i = 0; i < rounds; ++i) {
    Outcome again = Connect(client.get(), server.get(), latest.get());
    if (again.ok && again.reused) ++resumed;
    // TLS 1.3 tickets are single-use: continue with the newest one.
    if (again.ok && again.session) latest = std::move(again.session);
  }
  std::printf("%s: %d/%d resumptions %s\n", name, resumed, rounds,
              resumed == rounds ? "ok" : "FAILED");
  return resumed == rounds;
}

Status RunSelfTest(const std::string &uri, int rounds) {
  hsmstek_store *raw = nullptr;
  if (hsmstek_store_open(uri.c_str(), &raw) != HSMSTEK_OK) {
    return InvalidArgument(hsmstek_last_error());
  }
  std::unique_ptr<hsmstek_store, StoreCloser> store(raw);
  if (hsmstek_store_check(store.get()) != HSMSTEK_OK) {
    return Unavailable(std::string("store not usable: ") +
                       hsmstek_last_error());
  }
  UniqueKey key;
  UniqueCert cert;
  Status identity = MakeIdentity(&key, &cert);
  if (!identity.ok()) return identity;
  bool ok =
      RunVersion(store.get(), TLS1_2_VERSION, "TLS 1.2", key, cert, rounds);
  ok = RunVersion(store.get(), TLS1_3_VERSION, "TLS 1.3", key, cert, rounds) &&
       ok;
  hsmstek_stats stats;
  if (hsmstek_store_stats(store.get(), &stats) == HSMSTEK_OK) {
    std::printf(
        "tickets: issued %llu, resumed %llu, renewed %llu, token errors %llu\n"
        "seal (encrypt + HMAC in the token): p50 %.1f us, p99 %.1f us, "
        "n=%llu\n"
        "open (HMAC + decrypt in the token): p50 %.1f us, p99 %.1f us, "
        "n=%llu\n",
        static_cast<unsigned long long>(stats.tickets_issued),
        static_cast<unsigned long long>(stats.tickets_resumed),
        static_cast<unsigned long long>(stats.tickets_renewed),
        static_cast<unsigned long long>(stats.token_errors),
        stats.seal.p50_ns / 1e3, stats.seal.p99_ns / 1e3,
        static_cast<unsigned long long>(stats.seal.count),
        stats.open.p50_ns / 1e3, stats.open.p99_ns / 1e3,
        static_cast<unsigned long long>(stats.open.count));
    std::printf("(latencies are log2-bucket estimates: within 2x)\n");
  }
  if (!ok) return FailedPrecondition("self-test failed: see above");
  std::printf("self-test passed\n");
  return Status::Ok();
}

}  // namespace

void RegisterSelfTest(CLI::App &app, std::vector<Command> &out) {
  struct Args {
    std::string uri;
    int rounds = 10;
  };
  auto args = std::make_shared<Args>();
  CLI::App *sub = app.add_subcommand(
      "selftest",
      "Run TLS 1.2 and 1.3 handshakes and resumptions in memory through the "
      "store (provisions nothing; the PIN comes from the URI or HSMSTEK_PIN)");
  sub->add_option("uri", args->uri, "Store URI (object=<label>)")->required();
  sub->add_option("--rounds", args->rounds, "Resumptions per TLS version")
      ->check(CLI::Range(1, 10000));
  out.push_back({sub, [args] { return RunSelfTest(args->uri, args->rounds); }});
}

}  // namespace hsmstek::cli
