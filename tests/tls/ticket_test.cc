// Session tickets sealed and opened in SoftHSM, through real OpenSSL
// handshakes (docs/FORMAT.md, "Accepting a ticket" rules, tampering, legacy
// keys, fleets, failures).
#include <openssl/rand.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <vector>

#include "common/log.h"
#include "keystore/legacy_file.h"
#include "tls_fixture.h"

namespace hsmstek::testing {
namespace {

class TicketTest : public TlsTest, public ::testing::WithParamInterface<int> {
 protected:
  static void SetUpTestSuite() {
    for (const char *t : {"tls-a", "tls-b"}) SoftHsm::Get().CreateToken(t);
  }
  int version() const { return GetParam(); }
  bool tls13() const { return GetParam() == TLS1_3_VERSION; }

  // A session whose ticket a stock OpenSSL server sealed under a random
  // nginx-format 80-byte key (name || hmac || aes, OpenSSL's own layout),
  // and a store `label` holding that key as a legacy key.
  struct Legacy {
    Bytes key;
    UniqueSslCtx client;
    UniqueSslSession session;
    std::shared_ptr<keystore::KeyStore> store;
  };
  void MakeLegacy(const std::string &label, Legacy *out) {
    Bytes &key = out->key;
    key.resize(80);
    ASSERT_EQ(RAND_bytes(key.data(), 80), 1);
    UniqueSslCtx stock(SSL_CTX_new(TLS_server_method()));
    PrepareServerCtx(stock.get(), version());
    ASSERT_EQ(SSL_CTX_set_tlsext_ticket_keys(stock.get(), key.data(), 80), 1);
    out->client = NewClientCtx(version());
    HandshakeResult legacy = Handshake(out->client.get(), stock.get());
    ASSERT_TRUE(legacy.ok && legacy.session) << legacy.error;
    out->session = std::move(legacy.session);
    out->store = ProvisionedStore("tls-b", label);
    Result<std::vector<keystore::LegacyKey>> parsed =
        keystore::ParseLegacyKeyFile(keystore::LegacyFormat::kNginx, key);
    ASSERT_TRUE(parsed.ok()) << parsed.status().message();
    Result<p11::Session> s = out->store->token()->Acquire();
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE(keystore::ImportLegacyKeys(*s, out->store->label(), *parsed,
                                           kStart + kDay,
                                           keystore::LegacyFormat::kNginx)
                    .ok());
  }
};

TEST_P(TicketTest, FullHandshakeIssuesATicketThatResumes) {
  auto context = ContextFor(ProvisionedStore("tls-a", "resume"));
  auto server = ServerCtx(context, version());
  auto client = NewClientCtx(version());
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok) << full.error;
  EXPECT_FALSE(full.reused);
  ASSERT_TRUE(full.session);
  Bytes ticket = TicketOf(full.session.get());
  ASSERT_GT(ticket.size(), 16u + 16u + 32u);

  HandshakeResult again =
      Handshake(client.get(), server.get(), full.session.get());
  ASSERT_TRUE(again.ok) << again.error;
  EXPECT_TRUE(again.reused);
  tls::TicketCounters c = context->stats->Snapshot();
  EXPECT_GE(c.issued, 1u);
  if (tls13()) {
    // TLS 1.3 renews by default: single-use tickets.
    EXPECT_EQ(c.renewed, 1u);
    EXPECT_EQ(c.resumed, 0u);
    EXPECT_GE(again.tickets_received, 1);
  } else {
    EXPECT_EQ(c.resumed, 1u);
    EXPECT_EQ(c.renewed, 0u);
  }
  EXPECT_EQ(c.token_errors, 0u);
  EXPECT_EQ(c.seal.count, c.issued);
  EXPECT_GT(c.seal.p50_ns, 0u);
  EXPECT_EQ(c.open.count, 1u);
}

TEST_P(TicketTest, Tls13RenewalCanBeTurnedOff) {
  if (!tls13()) GTEST_SKIP() << "TLS 1.3 only";
  tls::TicketOptions options;
  options.tls13_renew = false;
  auto context = ContextFor(ProvisionedStore("tls-a", "norenew"), options);
  auto server = ServerCtx(context, version());
  auto client = NewClientCtx(version());
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  HandshakeResult again =
      Handshake(client.get(), server.get(), full.session.get());
  ASSERT_TRUE(again.ok) << again.error;
  EXPECT_TRUE(again.reused);
  EXPECT_EQ(context->stats->Snapshot().resumed, 1u);
  EXPECT_EQ(again.tickets_received, 0);
}

TEST_P(TicketTest, CrossingAnEpochBoundaryResumesWithRenewal) {
  auto context = ContextFor(ProvisionedStore("tls-a", "boundary"));
  auto server = ServerCtx(context, version());
  auto client = NewClientCtx(version());
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  Bytes first = TicketOf(full.session.get());

  clock_.Advance(kHour);
  HandshakeResult again =
      Handshake(client.get(), server.get(), full.session.get());
  ASSERT_TRUE(again.ok) << again.error;
  EXPECT_TRUE(again.reused);
  EXPECT_EQ(context->stats->Snapshot().renewed, 1u);
  ASSERT_TRUE(again.session);
  Bytes renewed = TicketOf(again.session.get());
  ASSERT_GE(renewed.size(), 16u);
  // The next epoch's opaque name: another name, not the old one counted up.
  EXPECT_FALSE(std::equal(first.begin(), first.begin() + 16, renewed.begin()));
  EXPECT_NE(LoadBigEndian64(renewed.data() + 8),
            LoadBigEndian64(first.data() + 8) + 1);
}

TEST_P(TicketTest, BeyondTheDecryptWindowIsAFullHandshake) {
  auto context = ContextFor(ProvisionedStore("tls-a", "window"));
  auto server = ServerCtx(context, version());
  auto client = NewClientCtx(version());
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  clock_.Advance(kDay + 2 * kHour);
  HandshakeResult again =
      Handshake(client.get(), server.get(), full.session.get());
  ASSERT_TRUE(again.ok) << again.error;
  EXPECT_FALSE(again.reused);
  // Out of the name table: refused as unknown, with no token call.
  EXPECT_EQ(context->stats->Snapshot().rejected_unknown_key, 1u);
}

// An attacker replays names of many old epochs (names are public: every
// ticket shows one). Past the store's derivation budget they are declined:
// counted as such, never as token errors (which page operators and, with
// several tokens, would read as an outage).
TEST_P(TicketTest, AFloodOfOldNamesIsDeclinedNotATokenError) {
  auto store = ProvisionedStore("tls-a", "flood" + std::to_string(version()),
                                TestPolicy(7 * kDay));
  auto context = ContextFor(store);
  auto server = ServerCtx(context, version());
  auto client = NewClientCtx(version());
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  Bytes ticket = TicketOf(full.session.get());
  ASSERT_GE(ticket.size(), 16u);
  Result<keystore::StoreSnapshot> snap = store->Describe();
  ASSERT_TRUE(snap.ok() && snap->masters.size() == 1);
  const uint64_t now_epoch = kStart / kHour;
  for (uint64_t e = now_epoch - 30; e < now_epoch - 1; ++e) {
    Result<keystore::KeyName> name = store->NameOf(snap->masters[0].id, e);
    ASSERT_TRUE(name.ok()) << name.status().message();
    std::copy(name->bytes.begin(), name->bytes.end(), ticket.begin());
    UniqueSslSession forged = WithTicket(full.session.get(), ticket);
    HandshakeResult r = Handshake(client.get(), server.get(), forged.get());
    ASSERT_TRUE(r.ok) << r.error;
    EXPECT_FALSE(r.reused);  // another epoch's keys: the MAC fails
  }
  const tls::TicketCounters c = context->stats->Snapshot();
  EXPECT_GT(c.rejected_budget, 0u);
  EXPECT_EQ(c.token_errors, 0u);
  // The flood costs genuine current tickets nothing.
  UniqueSslSession genuine =
      WithTicket(full.session.get(), TicketOf(full.session.get()));
  HandshakeResult after = Handshake(client.get(), server.get(), genuine.get());
  ASSERT_TRUE(after.ok) << after.error;
  EXPECT_TRUE(after.reused);
}

TEST_P(TicketTest, NextEpochIsAcceptedOnlyWithinTheClockSkew) {
  auto context = ContextFor(ProvisionedStore("tls-a", "skew"));
  auto server = ServerCtx(context, version());
  auto client = NewClientCtx(version());
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  // This server's clock is behind the issuer's: the ticket's epoch starts
  // 30 s in its future (default tolerance 60 s)...
  const int64_t epoch_start = (kStart / kHour) * kHour;
  clock_.Set(epoch_start - 30);
  HandshakeResult near =
      Handshake(client.get(), server.get(), full.session.get());
  ASSERT_TRUE(near.ok) << near.error;
  EXPECT_TRUE(near.reused);
  // ...and 10 minutes in its future: refused. (A fresh copy of the session:
  // OpenSSL's TLS 1.3 client does not offer a session object twice.)
  clock_.Set(epoch_start - 600);
  UniqueSslSession copy =
      WithTicket(full.session.get(), TicketOf(full.session.get()));
  HandshakeResult far = Handshake(client.get(), server.get(), copy.get());
  ASSERT_TRUE(far.ok) << far.error;
  EXPECT_FALSE(far.reused);
  EXPECT_EQ(context->stats->Snapshot().rejected_future, 1u);
}

TEST_P(TicketTest, TwoStoresInOneProcessDoNotCross) {
  auto a = ContextFor(ProvisionedStore("tls-a", "vhost-a"));
  auto b = ContextFor(ProvisionedStore("tls-a", "vhost-b"));
  auto server_a = ServerCtx(a, version());
  auto server_b = ServerCtx(b, version());
  auto client = NewClientCtx(version());
  HandshakeResult full = Handshake(client.get(), server_a.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  HandshakeResult other =
      Handshake(client.get(), server_b.get(), full.session.get());
  ASSERT_TRUE(other.ok) << other.error;
  EXPECT_FALSE(other.reused);
  EXPECT_EQ(b->stats->Snapshot().rejected_unknown_key, 1u);
  EXPECT_EQ(a->stats->Snapshot().rejected_unknown_key, 0u);
}

TEST_P(TicketTest, EveryTamperedRegionFallsBackToAFullHandshake) {
  auto context = ContextFor(ProvisionedStore("tls-a", "tamper"));
  auto server = ServerCtx(context, version());
  auto client = NewClientCtx(version());
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  const Bytes ticket = TicketOf(full.session.get());
  ASSERT_GT(ticket.size(), 80u);

  struct Case {
    const char *what;
    Bytes bytes;
  };
  std::vector<Case> cases;
  auto flip = [&](const char *what, size_t offset) {
    Bytes t = ticket;
    t[offset] ^= 0x01;
    cases.push_back({what, t});
  };
  flip("store id in the name", 3);
  flip("epoch in the name", 15);
  flip("IV", 20);
  flip("ciphertext", 40);
  flip("last ciphertext block", ticket.size() - 33);
  flip("MAC", ticket.size() - 1);
  cases.push_back(
      {"truncated by one", Bytes(ticket.begin(), ticket.end() - 1)});
  Bytes longer = ticket;
  longer.push_back(0);
  cases.push_back({"one byte longer", longer});
  cases.push_back({"name only", Bytes(ticket.begin(), ticket.begin() + 16)});
  cases.push_back(
      {"too short for a MAC", Bytes(ticket.begin(), ticket.begin() + 60)});

  for (const Case &c : cases) {
    UniqueSslSession forged = WithTicket(full.session.get(), c.bytes);
    ASSERT_TRUE(forged) << c.what;
    HandshakeResult r = Handshake(client.get(), server.get(), forged.get());
    EXPECT_TRUE(r.ok) << c.what << ": " << r.error;
    EXPECT_FALSE(r.reused) << c.what;
  }
  // The untouched ticket still works afterwards.
  HandshakeResult good =
      Handshake(client.get(), server.get(), full.session.get());
  EXPECT_TRUE(good.ok && good.reused) << good.error;
}

// A ticket without a policy digest (a legacy key's) carries no policy: it
// resumes only where no client verdict is at stake. A server that verifies
// client certificates gives it a full handshake (Admissible(), legacy
// branch).
TEST_P(TicketTest, LegacyNginxKeyTicketDoesNotResumeOnAVerifyingServer) {
  Legacy legacy;
  ASSERT_NO_FATAL_FAILURE(
      MakeLegacy(tls13() ? "legacyv13" : "legacyv12", &legacy));
  auto &client = legacy.client;
  auto context = ContextFor(legacy.store);
  auto server = ServerCtx(context, version());
  // Optional verification: the client (no certificate) is still admitted
  // on a full handshake.
  SSL_CTX_set_verify(server.get(), SSL_VERIFY_PEER, nullptr);
  ASSERT_TRUE(tls::SetDeclaredPolicy(server.get(), {}).ok());
  HandshakeResult r =
      Handshake(client.get(), server.get(), legacy.session.get());
  ASSERT_TRUE(r.ok) << r.error;
  EXPECT_FALSE(r.reused);
  EXPECT_EQ(context->stats->Snapshot().rejected_policy, 1u);
}

TEST_P(TicketTest, LegacyNginxKeyTicketResumesAfterImportAndIsRenewed) {
  Legacy legacy;
  ASSERT_NO_FATAL_FAILURE(
      MakeLegacy(tls13() ? "legacy13" : "legacy12", &legacy));
  const Bytes &key = legacy.key;
  auto &client = legacy.client;
  auto context = ContextFor(legacy.store);
  auto server = ServerCtx(context, version());
  HandshakeResult resumed =
      Handshake(client.get(), server.get(), legacy.session.get());
  ASSERT_TRUE(resumed.ok) << resumed.error;
  EXPECT_TRUE(resumed.reused);
  EXPECT_EQ(context->stats->Snapshot().renewed, 1u);
  // The renewed ticket is one of ours.
  ASSERT_TRUE(resumed.session);
  Bytes renewed = TicketOf(resumed.session.get());
  EXPECT_FALSE(std::equal(key.begin(), key.begin() + 16, renewed.begin()));
  HandshakeResult next =
      Handshake(client.get(), server.get(), resumed.session.get());
  EXPECT_TRUE(next.ok && next.reused) << next.error;
}

TEST_P(TicketTest, ATicketFromOneTokenResumesOnAnotherWithTheSameMaster) {
  // The same master in two tokens (here: a test value imported into both;
  // the CLI tests cover export/import).
  Bytes master(32);
  ASSERT_EQ(RAND_bytes(master.data(), 32), 1);
  keystore::StoreId id;
  ASSERT_EQ(RAND_bytes(id.data(), 8), 1);
  std::vector<std::shared_ptr<keystore::KeyStore>> stores;
  for (const char *token : {"tls-a", "tls-b"}) {
    auto store = OpenStore(token, tls13() ? "fleet13" : "fleet12");
    Result<p11::Session> s = store->token()->Acquire();
    ASSERT_TRUE(s.ok());
    p11::Template t = keystore::MasterTemplate(store->label(), id, false, true);
    t.Data(CKA_VALUE, master);
    CK_OBJECT_HANDLE h;
    ASSERT_TRUE(
        P11_CALL(*s, C_CreateObject, s->handle(), t.data(), t.size(), &h).ok());
    ASSERT_TRUE(
        keystore::StorePolicyObject(*s, store->label(), id, TestPolicy()).ok());
    stores.push_back(store);
  }
  auto server_a = ServerCtx(ContextFor(stores[0]), version());
  auto context_b = ContextFor(stores[1]);
  auto server_b = ServerCtx(context_b, version());
  auto client = NewClientCtx(version());
  HandshakeResult full = Handshake(client.get(), server_a.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  HandshakeResult on_b =
      Handshake(client.get(), server_b.get(), full.session.get());
  ASSERT_TRUE(on_b.ok) << on_b.error;
  EXPECT_TRUE(on_b.reused);
}

TEST_P(TicketTest, UnroutedSslCtxIssuesNoTicketsAndSaysWhyOnce) {
  static std::mutex mu;
  static std::vector<std::string> messages;
  log::SetSink(
      [](int level, const char *msg, void *) {
        if (level != static_cast<int>(log::Level::kError)) return;
        std::lock_guard<std::mutex> lock(mu);
        messages.push_back(msg);
      },
      nullptr);
  auto context = ContextFor(
      ProvisionedStore("tls-b", tls13() ? "unrouted13" : "unrouted12"));
  UniqueSslCtx server(SSL_CTX_new(TLS_server_method()));  // no routing
  PrepareServerCtx(server.get(), version());
  ASSERT_TRUE(tls::InstallTicketCallback(server.get(), context).ok());
  auto client = NewClientCtx(version());
  for (int i = 0; i < 3; ++i) {
    HandshakeResult r = Handshake(client.get(), server.get());
    ASSERT_TRUE(r.ok) << r.error;
    if (r.session) {
      EXPECT_TRUE(TicketOf(r.session.get()).empty());
    }
    EXPECT_EQ(r.tickets_received, 0) << "no NewSessionTicket in TLS 1.3";
  }
  log::SetSink(nullptr, nullptr);
  EXPECT_GE(context->stats->Snapshot().rejected_not_routed, 3u);
  EXPECT_EQ(context->stats->Snapshot().issued, 0u);
  std::lock_guard<std::mutex> lock(mu);
  ASSERT_EQ(messages.size(), 1u);
  EXPECT_NE(messages[0].find("does not come from the hsmstek provider"),
            std::string::npos);
  messages.clear();
}

TEST_P(TicketTest, TokenFailureMeansFullHandshakesThenRecovery) {
  auto store = ProvisionedStore("tls-b", tls13() ? "fault13" : "fault12");
  auto context = ContextFor(store);
  auto server = ServerCtx(context, version());
  auto client = NewClientCtx(version());
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  // Pre-armed operations: let the re-armer finish first, so the closed
  // sessions are met by the handshake (an armed step fails) rather than by
  // a background re-arm that would reconnect before it.
  if (context->armed) {
    ASSERT_TRUE(context->armed->WaitUntilArmed(std::chrono::seconds(60)));
  }
  auto token = store->token();
  ASSERT_EQ(token->fn()->C_CloseAllSessions(token->slot()), CKR_OK);

  HandshakeResult during =
      Handshake(client.get(), server.get(), full.session.get());
  ASSERT_TRUE(during.ok) << during.error;
  EXPECT_FALSE(during.reused);
  EXPECT_GE(context->stats->Snapshot().token_errors, 1u);
  // Recovery: tickets are issued and resume again (the prober reconnects;
  // handshakes meanwhile fail soft, never wait for it). The bound catches a
  // store that never recovers, not a speed: about 10 ms plain, over 1 s in
  // a loaded ASan CI run (OutageTest measures recovery time).
  bool resumed = false;
  UniqueSslSession latest = std::move(during.session);
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!resumed && std::chrono::steady_clock::now() < deadline) {
    HandshakeResult r = Handshake(client.get(), server.get(), latest.get());
    ASSERT_TRUE(r.ok) << r.error;
    resumed = r.reused;
    if (r.session) latest = std::move(r.session);
    if (!resumed) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(resumed);
}

TEST_P(TicketTest, AdvertisedLifetimeIsCappedByTheDecryptWindow) {
  auto context = ContextFor(ProvisionedStore(
      "tls-b", tls13() ? "life13" : "life12", TestPolicy(2 * kHour)));
  auto server = ServerCtx(context, version());
  SSL_CTX_set_timeout(server.get(), 30 * kDay);
  auto client = NewClientCtx(version());
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  EXPECT_GT(SSL_SESSION_get_ticket_lifetime_hint(full.session.get()), 0u);
  EXPECT_LE(SSL_SESSION_get_ticket_lifetime_hint(full.session.get()),
            static_cast<unsigned long>(2 * kHour));
}

TEST_P(TicketTest, EightThreadsHandshakeAndResumeOnOneStore) {
  auto context = ContextFor(
      ProvisionedStore("tls-a", tls13() ? "threads13" : "threads12"));
  auto server = ServerCtx(context, version());
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      auto client = NewClientCtx(version());
      for (int i = 0; i < 15; ++i) {
        HandshakeResult full = Handshake(client.get(), server.get());
        if (!full.ok || !full.session) {
          failures++;
          continue;
        }
        HandshakeResult again =
            Handshake(client.get(), server.get(), full.session.get());
        if (!again.ok || !again.reused) failures++;
      }
    });
  }
  for (auto &th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  tls::TicketCounters c = context->stats->Snapshot();
  EXPECT_EQ(c.resumed + c.renewed, 8u * 15u);
  EXPECT_EQ(c.token_errors, 0u);
}

INSTANTIATE_TEST_SUITE_P(Versions, TicketTest,
                         ::testing::Values(TLS1_2_VERSION, TLS1_3_VERSION),
                         [](const ::testing::TestParamInfo<int> &info) {
                           return info.param == TLS1_3_VERSION ? "TLS13"
                                                               : "TLS12";
                         });

}  // namespace
}  // namespace hsmstek::testing
