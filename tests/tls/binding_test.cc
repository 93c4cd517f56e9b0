// What a ticket may carry between servers and how it is counted, through
// real handshakes: tickets bound to the issuing SSL_CTX's security policy,
// early data (0-RTT) only on request and never with in-memory tickets,
// resumptions counted only when the handshake really resumed.
#include <openssl/evp.h>
#include <openssl/x509.h>

#include <string>

#include "provider/provider.h"
#include "tls/session_hooks.h"
#include "tls_fixture.h"

namespace hsmstek::testing {
namespace {

struct PkeyFree {
  void operator()(EVP_PKEY *k) const { EVP_PKEY_free(k); }
};
struct X509Free {
  void operator()(X509 *x) const { X509_free(x); }
};

// A self-signed certificate: a CA and, for clients, their own identity.
struct Identity {
  std::unique_ptr<EVP_PKEY, PkeyFree> key;
  std::unique_ptr<X509, X509Free> cert;
};

Identity SelfSigned(const char *cn) {
  Identity id;
  id.key.reset(EVP_EC_gen("P-256"));
  id.cert.reset(X509_new());
  if (!id.key || !id.cert) return id;
  X509 *c = id.cert.get();
  X509_set_version(c, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(c), 7);
  X509_gmtime_adj(X509_getm_notBefore(c), -3600);
  X509_gmtime_adj(X509_getm_notAfter(c), 3600L * 24);
  X509_set_pubkey(c, id.key.get());
  X509_NAME *name = X509_get_subject_name(c);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char *>(cn), -1,
                             -1, 0);
  X509_set_issuer_name(c, name);
  if (X509_sign(c, id.key.get(), EVP_sha256()) <= 0) id.cert.reset();
  return id;
}

class BindingTest : public TlsTest, public ::testing::WithParamInterface<int> {
 protected:
  static void SetUpTestSuite() { SoftHsm::Get().CreateToken("bind"); }
  int version() const { return GetParam(); }
  bool tls13() const { return GetParam() == TLS1_3_VERSION; }

  // A routed server context that verifies client certificates against
  // `trusted` (optional: `required` false), configured before install.
  UniqueSslCtx VerifyingServer(std::shared_ptr<tls::TicketContext> context,
                               std::initializer_list<X509 *> trusted,
                               bool required) {
    EXPECT_TRUE(provider::RegisterProvider().ok());
    UniqueSslCtx ctx(SSL_CTX_new_ex(nullptr, provider::kPreferProviderQuery,
                                    TLS_server_method()));
    PrepareServerCtx(ctx.get(), version());
    for (X509 *cert : trusted) {
      EXPECT_EQ(X509_STORE_add_cert(SSL_CTX_get_cert_store(ctx.get()), cert),
                1);
    }
    // OpenSSL resumes no session of a verifying server without one.
    static const unsigned char kSidCtx[] = "binding test";
    EXPECT_EQ(
        SSL_CTX_set_session_id_context(ctx.get(), kSidCtx, sizeof(kSidCtx)), 1);
    SSL_CTX_set_verify(
        ctx.get(),
        SSL_VERIFY_PEER | (required ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
        nullptr);
    Status installed = tls::InstallTicketCallback(ctx.get(), context);
    EXPECT_TRUE(installed.ok()) << installed.message();
    return ctx;
  }

  UniqueSslCtx ClientWith(const Identity &id) {
    UniqueSslCtx client = NewClientCtx(version());
    EXPECT_EQ(SSL_CTX_use_certificate(client.get(), id.cert.get()), 1);
    EXPECT_EQ(SSL_CTX_use_PrivateKey(client.get(), id.key.get()), 1);
    return client;
  }
};

// The reported attack: f trusts CAs X and Y (optional client certificate),
// g trusts X only (required). A Y client admitted by f must not resume its
// f ticket on g: the ticket is ignored and g's full handshake refuses it.
TEST_P(BindingTest, ATicketDoesNotCarryAClientVerdictToAStricterServer) {
  Identity ca_x = SelfSigned("CA X");
  Identity client_y = SelfSigned("clientY");  // its own trust anchor "Y"
  ASSERT_TRUE(ca_x.cert && client_y.cert);
  auto store = ProvisionedStore("bind", tls13() ? "attack13" : "attack12");
  auto f_context = ContextFor(store);
  auto g_context = ContextFor(store);
  auto f =
      VerifyingServer(f_context, {ca_x.cert.get(), client_y.cert.get()}, false);
  auto g = VerifyingServer(g_context, {ca_x.cert.get()}, true);
  auto client = ClientWith(client_y);

  HandshakeResult on_f = Handshake(client.get(), f.get());
  ASSERT_TRUE(on_f.ok && on_f.session) << on_f.error;
  ASSERT_FALSE(TicketOf(on_f.session.get()).empty());
  // Directly, g refuses this client.
  EXPECT_FALSE(Handshake(client.get(), g.get()).ok);

  HandshakeResult on_g = Handshake(client.get(), g.get(), on_f.session.get());
  EXPECT_FALSE(on_g.ok && on_g.reused) << "f's ticket resumed on g";
  EXPECT_FALSE(on_g.ok) << "g admitted a client it does not trust";
  tls::TicketCounters c = g_context->stats->Snapshot();
  EXPECT_EQ(c.rejected_policy, 1u);
  EXPECT_EQ(c.resumed + c.renewed, 0u);

  // The same ticket still resumes where it was issued.
  HandshakeResult back = Handshake(client.get(), f.get(), on_f.session.get());
  EXPECT_TRUE(back.ok && back.reused) << back.error;
}

TEST_P(BindingTest, TicketsMoveBetweenContextsWithTheSamePolicyOnly) {
  Identity ca_x = SelfSigned("CA X");
  Identity ca_y = SelfSigned("CA Y");
  auto store = ProvisionedStore("bind", tls13() ? "move13" : "move12");
  auto a_context = ContextFor(store);
  auto b_context = ContextFor(store);
  auto c_context = ContextFor(store);
  auto a = VerifyingServer(a_context, {ca_x.cert.get()}, false);
  auto b = VerifyingServer(b_context, {ca_x.cert.get()}, false);
  auto c = VerifyingServer(c_context, {ca_y.cert.get()}, false);
  auto client = NewClientCtx(version());

  HandshakeResult on_a = Handshake(client.get(), a.get());
  ASSERT_TRUE(on_a.ok && on_a.session) << on_a.error;
  HandshakeResult on_b = Handshake(client.get(), b.get(), on_a.session.get());
  EXPECT_TRUE(on_b.ok && on_b.reused) << on_b.error;
  // A TLS 1.3 client offers a session once: take another ticket from a.
  HandshakeResult on_a2 = Handshake(client.get(), a.get());
  ASSERT_TRUE(on_a2.ok && on_a2.session) << on_a2.error;
  HandshakeResult on_c = Handshake(client.get(), c.get(), on_a2.session.get());
  ASSERT_TRUE(on_c.ok) << on_c.error;
  EXPECT_FALSE(on_c.reused);
  EXPECT_EQ(c_context->stats->Snapshot().rejected_policy, 1u);
  // The full handshake on c issued a ticket bound to c's policy.
  ASSERT_TRUE(on_c.session);
  HandshakeResult again = Handshake(client.get(), c.get(), on_c.session.get());
  EXPECT_TRUE(again.ok && again.reused) << again.error;
}

TEST_P(BindingTest, DeclaredPolicyBytesSeparateOtherwiseEqualContexts) {
  auto store = ProvisionedStore("bind", tls13() ? "declared13" : "declared12");
  auto a_context = ContextFor(store);
  auto b_context = ContextFor(store);
  auto a = ServerCtx(a_context, version());
  auto b = ServerCtx(b_context, version());
  const uint8_t admin_only[] = {'a', 'd', 'm', 'i', 'n'};
  ASSERT_TRUE(tls::SetDeclaredPolicy(b.get(), admin_only).ok());
  auto client = NewClientCtx(version());
  HandshakeResult on_a = Handshake(client.get(), a.get());
  ASSERT_TRUE(on_a.ok && on_a.session) << on_a.error;
  HandshakeResult on_b = Handshake(client.get(), b.get(), on_a.session.get());
  ASSERT_TRUE(on_b.ok) << on_b.error;
  EXPECT_FALSE(on_b.reused);
  ASSERT_TRUE(tls::SetDeclaredPolicy(a.get(), admin_only).ok());
  HandshakeResult on_a2 = Handshake(client.get(), a.get());
  ASSERT_TRUE(on_a2.ok && on_a2.session) << on_a2.error;
  HandshakeResult on_b2 = Handshake(client.get(), b.get(), on_a2.session.get());
  EXPECT_TRUE(on_b2.ok && on_b2.reused) << on_b2.error;
}

// Verification changed after install without telling hsmstek: the digest
// no longer describes the context, so its tickets stop resuming.
TEST_P(BindingTest, VerificationChangedAfterInstallFailsClosed) {
  Identity ca_x = SelfSigned("CA X");
  auto context =
      ContextFor(ProvisionedStore("bind", tls13() ? "drift13" : "drift12"));
  auto server = ServerCtx(context, version());
  const unsigned char sid_ctx[] = "drift";
  ASSERT_EQ(
      SSL_CTX_set_session_id_context(server.get(), sid_ctx, sizeof(sid_ctx)),
      1);
  auto client = NewClientCtx(version());
  HandshakeResult before = Handshake(client.get(), server.get());
  ASSERT_TRUE(before.ok && before.session) << before.error;
  SSL_CTX_set_verify(server.get(), SSL_VERIFY_PEER, nullptr);
  HandshakeResult after =
      Handshake(client.get(), server.get(), before.session.get());
  ASSERT_TRUE(after.ok) << after.error;
  EXPECT_FALSE(after.reused);
  ASSERT_TRUE(tls::SetDeclaredPolicy(server.get(), {}).ok());
  HandshakeResult fresh = Handshake(client.get(), server.get());
  ASSERT_TRUE(fresh.ok && fresh.session) << fresh.error;
  HandshakeResult resumed =
      Handshake(client.get(), server.get(), fresh.session.get());
  EXPECT_TRUE(resumed.ok && resumed.reused) << resumed.error;
}

// OpenSSL rejects a ticket we opened (another session id context): a full
// handshake, counted as not resumed, not as resumed or renewed.
TEST_P(BindingTest, ASessionIdContextRejectionIsNotCountedAsResumed) {
  auto store = ProvisionedStore("bind", tls13() ? "sidctx13" : "sidctx12");
  auto a_context = ContextFor(store);
  auto b_context = ContextFor(store);
  auto a = ServerCtx(a_context, version());
  auto b = ServerCtx(b_context, version());
  const unsigned char sid_a[] = "server a", sid_b[] = "server b";
  ASSERT_EQ(SSL_CTX_set_session_id_context(a.get(), sid_a, sizeof(sid_a)), 1);
  ASSERT_EQ(SSL_CTX_set_session_id_context(b.get(), sid_b, sizeof(sid_b)), 1);
  auto client = NewClientCtx(version());
  HandshakeResult on_a = Handshake(client.get(), a.get());
  ASSERT_TRUE(on_a.ok && on_a.session) << on_a.error;
  HandshakeResult on_b = Handshake(client.get(), b.get(), on_a.session.get());
  ASSERT_TRUE(on_b.ok) << on_b.error;
  EXPECT_FALSE(on_b.reused);
  tls::TicketCounters c = b_context->stats->Snapshot();
  EXPECT_EQ(c.opens_begun, 1u);  // our callback did open it
  EXPECT_EQ(c.resumed, 0u);
  EXPECT_EQ(c.renewed, 0u);
  EXPECT_EQ(c.not_resumed, 1u);
  // A real resumption still counts.
  HandshakeResult on_a2 = Handshake(client.get(), a.get(), on_a.session.get());
  ASSERT_TRUE(on_a2.ok && on_a2.reused) << on_a2.error;
  tls::TicketCounters ca = a_context->stats->Snapshot();
  EXPECT_EQ(ca.resumed + ca.renewed, 1u);
  EXPECT_EQ(ca.not_resumed, 0u);
}

TEST_P(BindingTest, EarlyDataWithoutTheOptionIsRefusedAtInstall) {
  auto context = ContextFor(ProvisionedStore("bind", "early-refused"));
  ASSERT_TRUE(provider::RegisterProvider().ok());
  UniqueSslCtx ctx(SSL_CTX_new_ex(nullptr, provider::kPreferProviderQuery,
                                  TLS_server_method()));
  ASSERT_EQ(SSL_CTX_set_max_early_data(ctx.get(), 16384), 1);
  Status installed = tls::InstallTicketCallback(ctx.get(), context);
  EXPECT_EQ(installed.code(), ErrorCode::kFailedPrecondition);
  EXPECT_NE(installed.message().find("early data"), std::string::npos)
      << installed.message();
  EXPECT_EQ(tls::TicketContextOf(ctx.get()), nullptr);
}

// With the option, TLS 1.3 tickets stay sealed in the token: OpenSSL's
// anti-replay mode would otherwise issue in-memory (stateful) tickets.
TEST_P(BindingTest, EarlyDataWithTheOptionKeepsTicketsInTheToken) {
  if (!tls13()) GTEST_SKIP() << "early data is TLS 1.3";
  tls::TicketOptions options;
  options.allow_early_data = true;
  auto context = ContextFor(ProvisionedStore("bind", "early-allowed"), options);
  ASSERT_TRUE(provider::RegisterProvider().ok());
  UniqueSslCtx server(SSL_CTX_new_ex(nullptr, provider::kPreferProviderQuery,
                                     TLS_server_method()));
  PrepareServerCtx(server.get(), version());
  ASSERT_EQ(SSL_CTX_set_max_early_data(server.get(), 16384), 1);
  Status installed = tls::InstallTicketCallback(server.get(), context);
  ASSERT_TRUE(installed.ok()) << installed.message();
  auto client = NewClientCtx(version());
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  EXPECT_GT(SSL_SESSION_get_max_early_data(full.session.get()), 0u);
  HandshakeResult again =
      Handshake(client.get(), server.get(), full.session.get());
  ASSERT_TRUE(again.ok && again.reused) << again.error;
  tls::TicketCounters c = context->stats->Snapshot();
  EXPECT_GE(c.issued, 1u);       // sealed by us
  EXPECT_EQ(c.opens_begun, 1u);  // resumed through our callback
  EXPECT_EQ(c.renewed, 1u);
  EXPECT_EQ(SSL_CTX_sess_number(server.get()), 0);  // no in-memory session
}

// Early data switched on after install, without the option: no silent
// switch to in-memory tickets, and the tickets offer no early data.
// With SSL_OP_NO_ANTI_REPLAY too (nginx always sets it): the tickets would
// stay stateless but carry replayable early data.
TEST_P(BindingTest, EarlyDataEnabledAfterInstallIsNotOffered) {
  if (!tls13()) GTEST_SKIP() << "early data is TLS 1.3";
  for (bool no_anti_replay : {false, true}) {
    SCOPED_TRACE(no_anti_replay ? "SSL_OP_NO_ANTI_REPLAY" : "anti-replay");
    auto context = ContextFor(ProvisionedStore(
        "bind", no_anti_replay ? "early-later-nar" : "early-later"));
    auto server = ServerCtx(context, version());
    if (no_anti_replay)
      SSL_CTX_set_options(server.get(), SSL_OP_NO_ANTI_REPLAY);
    ASSERT_EQ(SSL_CTX_set_max_early_data(server.get(), 16384), 1);
    auto client = NewClientCtx(version());
    HandshakeResult full = Handshake(client.get(), server.get());
    ASSERT_TRUE(full.ok && full.session) << full.error;
    EXPECT_EQ(SSL_SESSION_get_max_early_data(full.session.get()), 0u);
    tls::TicketCounters c = context->stats->Snapshot();
    EXPECT_GE(c.issued, 1u);
    EXPECT_GE(c.early_data_refused, 1u);
    EXPECT_EQ(SSL_CTX_sess_number(server.get()), 0);
    // Early data stays off on each connection, so tickets still resume
    // through the token (OpenSSL would look them up in its in-memory cache).
    HandshakeResult again =
        Handshake(client.get(), server.get(), full.session.get());
    EXPECT_TRUE(again.ok && again.reused) << again.error;
    EXPECT_EQ(context->stats->Snapshot().renewed, 1u);
  }
}

// A session cache shared between servers (nginx's ssl_session_cache
// shared:...) never goes through the ticket hooks: f's session, found in
// g's cache by its id (TLS 1.2) or stateful ticket (TLS 1.3), must not
// resume on g. The session id context hsmstek derives from the policy
// makes OpenSSL refuse it.
SSL_SESSION *g_cached_session = nullptr;
int KeepServerSession(SSL * /*ssl*/, SSL_SESSION *session) {
  SSL_SESSION_free(g_cached_session);
  g_cached_session = session;  // we keep OpenSSL's reference
  return 1;
}

TEST_P(BindingTest, ASharedSessionCacheDoesNotCarryAVerdictToAStricterServer) {
  Identity ca_x = SelfSigned("CA X");
  Identity client_y = SelfSigned("clientY");
  ASSERT_TRUE(ca_x.cert && client_y.cert);
  auto store = ProvisionedStore("bind", tls13() ? "cache13" : "cache12");
  auto f_context = ContextFor(store);
  auto g_context = ContextFor(store);
  auto f =
      VerifyingServer(f_context, {ca_x.cert.get(), client_y.cert.get()}, false);
  auto g = VerifyingServer(g_context, {ca_x.cert.get()}, true);
  auto f2 =
      VerifyingServer(f_context, {ca_x.cert.get(), client_y.cert.get()}, false);
  // Session ids (TLS 1.2) and stateful tickets (TLS 1.3): the cache only.
  for (SSL_CTX *server : {f.get(), g.get(), f2.get()}) {
    SSL_CTX_set_options(server, SSL_OP_NO_TICKET);
  }
  SSL_CTX_sess_set_new_cb(f.get(), KeepServerSession);
  auto client = ClientWith(client_y);

  HandshakeResult on_f = Handshake(client.get(), f.get());
  ASSERT_TRUE(on_f.ok && on_f.session) << on_f.error;
  ASSERT_NE(g_cached_session, nullptr);
  // The shared cache: g and f2 find f's session (a copy each, as nginx's
  // shared cache stores sessions serialised).
  UniqueSslSession cached(g_cached_session);
  g_cached_session = nullptr;
  UniqueSslSession for_g(SSL_SESSION_dup(cached.get()));
  UniqueSslSession for_f2(SSL_SESSION_dup(cached.get()));
  ASSERT_TRUE(for_g && for_f2);
  ASSERT_EQ(SSL_CTX_add_session(g.get(), for_g.get()), 1);
  ASSERT_EQ(SSL_CTX_add_session(f2.get(), for_f2.get()), 1);

  HandshakeResult on_g = Handshake(client.get(), g.get(), on_f.session.get());
  EXPECT_FALSE(on_g.ok && on_g.reused) << "f's session resumed on g";
  EXPECT_FALSE(on_g.ok) << "g admitted a client it does not trust";
  // Control: a server with f's policy resumes it from the cache.
  HandshakeResult on_f2 = Handshake(client.get(), f2.get(), on_f.session.get());
  EXPECT_TRUE(on_f2.ok && on_f2.reused) << on_f2.error;
}

// An application that picks the SSL_CTX in its servername callback: OpenSSL
// runs it after the ticket was opened and admitted under the initial
// SSL_CTX's policy (TLS 1.2 and 1.3). The resumption cannot be undone
// there, so the client's verification result must end up failed.
struct Switch {
  SSL_CTX *to = nullptr;
  bool on = false;
};
int SwitchContext(SSL *ssl, int * /*al*/, void *arg) {
  auto *sw = static_cast<Switch *>(arg);
  if (sw->on && SSL_set_SSL_CTX(ssl, sw->to) != nullptr) {
    SSL_set_verify(ssl, SSL_CTX_get_verify_mode(sw->to),
                   SSL_CTX_get_verify_callback(sw->to));
  }
  return SSL_TLSEXT_ERR_OK;
}

TEST_P(BindingTest, ASwitchInTheServernameCallbackFailsTheClientVerdict) {
  Identity ca_x = SelfSigned("CA X");
  Identity client_y = SelfSigned("clientY");
  ASSERT_TRUE(ca_x.cert && client_y.cert);
  auto store = ProvisionedStore("bind", tls13() ? "switch13" : "switch12");
  auto d_context = ContextFor(store);
  auto s_context = ContextFor(store);
  auto d =
      VerifyingServer(d_context, {ca_x.cert.get(), client_y.cert.get()}, false);
  auto s = VerifyingServer(s_context, {ca_x.cert.get()}, true);
  Switch sw{s.get(), false};
  SSL_CTX_set_tlsext_servername_callback(d.get(), SwitchContext);
  SSL_CTX_set_tlsext_servername_arg(d.get(), &sw);
  auto client = ClientWith(client_y);

  HandshakeResult on_d = Handshake(client.get(), d.get());
  ASSERT_TRUE(on_d.ok && on_d.session) << on_d.error;
  EXPECT_EQ(on_d.server_verify_result, X509_V_OK);

  sw.on = true;
  HandshakeResult switched =
      Handshake(client.get(), d.get(), on_d.session.get());
  // OpenSSL 3.0 resumes (TLS 1.2 and 1.3: the session was checked before
  // the callback ran); the verdict must read as failed.
  ASSERT_TRUE(switched.ok && switched.reused) << switched.error;
  EXPECT_NE(switched.server_verify_result, X509_V_OK)
      << "d's verdict reached s's connection";
  tls::TicketCounters c = s_context->stats->Snapshot();
  EXPECT_EQ(c.rejected_policy, 1u);
  EXPECT_EQ(c.resumed + c.renewed, 0u);
  // Control: without the switch the verdict stands.
  sw.on = false;
  HandshakeResult on_d2 = Handshake(client.get(), d.get());
  ASSERT_TRUE(on_d2.ok && on_d2.session) << on_d2.error;
  HandshakeResult back = Handshake(client.get(), d.get(), on_d2.session.get());
  EXPECT_TRUE(back.ok && back.reused) << back.error;
  EXPECT_EQ(back.server_verify_result, X509_V_OK);
}

// hsmstek_ssl_ctx_set_policy (a reinstall) after the application set its
// own info callback keeps calling the application's callback.
int g_app_info_calls = 0;
void AppInfo(const SSL * /*ssl*/, int where, int /*ret*/) {
  if ((where & SSL_CB_HANDSHAKE_DONE) != 0) ++g_app_info_calls;
}

TEST_P(BindingTest, AReinstallKeepsTheApplicationsInfoCallback) {
  auto context =
      ContextFor(ProvisionedStore("bind", tls13() ? "info13" : "info12"));
  auto server = ServerCtx(context, version());
  SSL_CTX_set_info_callback(server.get(), AppInfo);
  ASSERT_TRUE(tls::SetDeclaredPolicy(server.get(), {}).ok());
  EXPECT_EQ(SSL_CTX_get_info_callback(server.get()), &tls::InfoHook);
  auto client = NewClientCtx(version());
  g_app_info_calls = 0;
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  EXPECT_GE(g_app_info_calls, 1);
  // And ours still counts.
  HandshakeResult again =
      Handshake(client.get(), server.get(), full.session.get());
  ASSERT_TRUE(again.ok && again.reused) << again.error;
  tls::TicketCounters c = context->stats->Snapshot();
  EXPECT_EQ(c.resumed + c.renewed, 1u);
}

// An application tightening one connection's verification: the SSL_CTX's
// digest does not describe it, so a ticket of the looser SSL_CTX-wide
// policy must not resume there.
struct Tighten {
  int how = 0;  // 0: nothing, 1: verify mode, 2: verify param flags
};
int TightenConnection(SSL *ssl, int * /*al*/, void *arg) {
  switch (static_cast<Tighten *>(arg)->how) {
    case 1:
      SSL_set_verify(ssl, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                     nullptr);
      break;
    case 2:
      X509_VERIFY_PARAM_set_flags(SSL_get0_param(ssl), X509_V_FLAG_CRL_CHECK);
      break;
    default:
      break;
  }
  return SSL_CLIENT_HELLO_SUCCESS;
}

TEST_P(BindingTest, AConnectionVerifyingMoreStrictlyResumesNothing) {
  auto context =
      ContextFor(ProvisionedStore("bind", tls13() ? "tight13" : "tight12"));
  auto server = ServerCtx(context, version());
  Tighten tighten;
  SSL_CTX_set_client_hello_cb(server.get(), TightenConnection, &tighten);
  auto client = NewClientCtx(version());
  for (int how : {1, 2}) {
    SCOPED_TRACE(how == 1 ? "SSL_set_verify" : "SSL_get0_param flags");
    tighten.how = 0;
    HandshakeResult full = Handshake(client.get(), server.get());
    ASSERT_TRUE(full.ok && full.session) << full.error;
    // Control: the untouched connection resumes.
    HandshakeResult plain =
        Handshake(client.get(), server.get(), full.session.get());
    ASSERT_TRUE(plain.ok && plain.reused) << plain.error;
    HandshakeResult fresh = Handshake(client.get(), server.get());
    ASSERT_TRUE(fresh.ok && fresh.session) << fresh.error;
    tighten.how = how;
    HandshakeResult tight =
        Handshake(client.get(), server.get(), fresh.session.get());
    EXPECT_FALSE(tight.ok && tight.reused) << "the looser verdict resumed";
    // A full handshake requires a certificate this client does not have.
    if (how == 1) {
      EXPECT_FALSE(tight.ok);
    }
  }
  EXPECT_EQ(context->stats->Snapshot().rejected_policy, 2u);
}

// Drift detection: verification changed on the SSL_CTX after install in
// ways the first fingerprint did not look at.
TEST_P(BindingTest, EveryVerificationChangeAfterInstallFailsClosed) {
  Identity ca_x = SelfSigned("CA X");
  ASSERT_TRUE(ca_x.cert);
  for (int change : {0, 1, 2}) {
    SCOPED_TRACE(change == 0   ? "verify store"
                 : change == 1 ? "CRL checking"
                               : "security level");
    auto context = ContextFor(ProvisionedStore(
        "bind", std::string(tls13() ? "drift2-13-" : "drift2-12-") +
                    std::to_string(change)));
    auto server = ServerCtx(context, version());
    auto client = NewClientCtx(version());
    HandshakeResult before = Handshake(client.get(), server.get());
    ASSERT_TRUE(before.ok && before.session) << before.error;
    if (change == 0) {
      X509_STORE *store = X509_STORE_new();
      ASSERT_NE(store, nullptr);
      X509_STORE_add_cert(store, ca_x.cert.get());
      ASSERT_EQ(SSL_CTX_set0_verify_cert_store(server.get(), store), 1);
    } else if (change == 1) {
      X509_VERIFY_PARAM_set_flags(SSL_CTX_get0_param(server.get()),
                                  X509_V_FLAG_CRL_CHECK);
    } else {
      SSL_CTX_set_security_level(server.get(),
                                 SSL_CTX_get_security_level(server.get()) + 1);
    }
    HandshakeResult after =
        Handshake(client.get(), server.get(), before.session.get());
    ASSERT_TRUE(after.ok) << after.error;
    EXPECT_FALSE(after.reused);
  }
}

// The security level is part of the policy: otherwise equal contexts
// (both told hsmstek) do not share tickets.
TEST_P(BindingTest, TheSecurityLevelSeparatesPolicies) {
  auto store = ProvisionedStore("bind", tls13() ? "seclevel13" : "seclevel12");
  auto a_context = ContextFor(store);
  auto b_context = ContextFor(store);
  auto a = ServerCtx(a_context, version());
  auto b = ServerCtx(b_context, version());
  SSL_CTX_set_security_level(b.get(), SSL_CTX_get_security_level(a.get()) + 1);
  ASSERT_TRUE(tls::SetDeclaredPolicy(b.get(), {}).ok());
  auto client = NewClientCtx(version());
  HandshakeResult on_a = Handshake(client.get(), a.get());
  ASSERT_TRUE(on_a.ok && on_a.session) << on_a.error;
  HandshakeResult on_b = Handshake(client.get(), b.get(), on_a.session.get());
  ASSERT_TRUE(on_b.ok) << on_b.error;
  EXPECT_FALSE(on_b.reused);
  tls::TicketCounters c = b_context->stats->Snapshot();
  EXPECT_EQ(c.resumed + c.renewed, 0u);
}

INSTANTIATE_TEST_SUITE_P(Versions, BindingTest,
                         ::testing::Values(TLS1_2_VERSION, TLS1_3_VERSION),
                         [](const ::testing::TestParamInfo<int> &info) {
                           return info.param == TLS1_3_VERSION
                                      ? std::string("TLS13")
                                      : std::string("TLS12");
                         });

}  // namespace
}  // namespace hsmstek::testing
