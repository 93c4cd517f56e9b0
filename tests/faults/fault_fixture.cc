#include "fault_fixture.h"

#include <mutex>
#include <set>

namespace hsmstek::testing {

namespace {

keystore::Policy FaultPolicy() {
  keystore::Policy p;
  p.period_s = kHour;
  p.decrypt_window_s = kDay;
  p.not_before = kStart - 30 * kDay;
  p.created_at = p.not_before;
  return p;
}

}  // namespace

void EnsureFaultStore(const std::string &label) {
  static std::mutex mu;
  static bool token_created = false;
  static std::set<std::string> stores;
  std::lock_guard<std::mutex> lock(mu);
  if (!token_created) {
    SoftHsm::Get().CreateToken(kFaultToken);
    token_created = true;
  }
  if (stores.count(label) != 0) return;
  keystore::StoreOptions options;
  options.background_maintenance = false;
  options.token.read_write = true;
  auto store =
      keystore::KeyStore::Open(SoftHsm::Get().Uri(kFaultToken, label), options);
  ASSERT_TRUE(store.ok()) << store.status().message();
  Result<p11::Session> s = (*store)->token()->Acquire();
  ASSERT_TRUE(s.ok()) << s.status().message();
  Result<keystore::StoreId> id =
      keystore::CreateMaster(*s, label, FaultPolicy());
  ASSERT_TRUE(id.ok()) << id.status().message();
  stores.insert(label);
}

std::shared_ptr<keystore::KeyStore> FaultTest::OpenStore(
    const std::string &label) {
  keystore::StoreOptions options;
  options.clock = &clock_;
  options.background_maintenance = false;
  options.token.backoff_initial = std::chrono::milliseconds(0);
  options.token.backoff_max = std::chrono::milliseconds(0);
  // Recovery driven by handshakes alone (no prober thread), as these
  // tests count the calls of each handshake.
  options.token.background_probe = false;
  auto store =
      keystore::KeyStore::Open(SoftHsm::Get().Uri(kFaultToken, label), options);
  EXPECT_TRUE(store.ok()) << store.status().message();
  return store.ok() ? *store : nullptr;
}

std::shared_ptr<tls::TicketContext> FaultTest::ContextFor(
    std::shared_ptr<keystore::KeyStore> store) {
  auto context = std::make_shared<tls::TicketContext>();
  context->store = std::move(store);
  context->stats = std::make_shared<tls::TicketStats>();
  // The matrix and load tests read the ticket steps from the process-wide
  // call sequence, which background re-arming would interleave: they test
  // the on-demand path (every step's *Init on the handshake thread), which
  // is also every pre-armed step's fallback. Pre-armed operations have
  // their own tests (round_trip_test.cc).
  context->options.prearm = false;
  return context;
}

UniqueSslCtx FaultTest::ServerCtx(std::shared_ptr<tls::TicketContext> context,
                                  int version) {
  Result<SSL_CTX *> ctx =
      tls::NewScopedSslCtx(TLS_server_method(), std::move(context));
  EXPECT_TRUE(ctx.ok()) << ctx.status().message();
  if (!ctx.ok()) return nullptr;
  PrepareServerCtx(*ctx, version);
  // TLS 1.2 would otherwise also resume by session id from the server's
  // in-memory cache, which says nothing about tickets.
  SSL_CTX_set_session_cache_mode(*ctx, SSL_SESS_CACHE_OFF);
  return UniqueSslCtx(*ctx);
}

UniqueSslSession Reoffer(const SSL_SESSION *session) {
  if (session == nullptr) return nullptr;
  return WithTicket(session, TicketOf(session));
}

Bytes TicketOfResult(const HandshakeResult &r) {
  return r.session ? TicketOf(r.session.get()) : Bytes{};
}

}  // namespace hsmstek::testing
