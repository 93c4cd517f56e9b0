// The exported C API (and the C++ wrapper over it), linked against the
// shared library exactly as a server would.
#include <gtest/gtest.h>
#include <hsmstek/hsmstek.h>

#include <cstddef>
#include <cstring>
#include <hsmstek/hsmstek.hpp>
#include <string>
#include <vector>

#include "keystore/provisioning.h"
#include "keystore/store.h"
#include "softhsm.h"
#include "tls_harness.h"

namespace hsmstek::testing {
namespace {

class CApiTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    SoftHsm::Get().CreateToken("capi");
    // Provision one store through the key store (the CLI tests cover the
    // tool); the API under test only opens it.
    keystore::StoreOptions options;
    options.token.read_write = true;
    options.background_maintenance = false;
    auto store =
        keystore::KeyStore::Open(SoftHsm::Get().Uri("capi", "web"), options);
    ASSERT_TRUE(store.ok());
    auto session = (*store)->token()->Acquire();
    ASSERT_TRUE(session.ok());
    keystore::Policy p;
    p.period_s = 3600;
    p.decrypt_window_s = 86400;
    // A month back: the ratchet catches up 30 links on first use (from
    // 1970 it would need tens of thousands).
    p.not_before = time(nullptr) - 30 * 86400;
    p.created_at = p.not_before;
    ASSERT_TRUE(keystore::CreateMaster(*session, "web", p).ok());
  }
};

TEST_F(CApiTest, OpenFailuresAreImmediateAndExplained) {
  hsmstek_store *store = reinterpret_cast<hsmstek_store *>(0x1);
  EXPECT_EQ(hsmstek_store_open("https://example.com", &store),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(store, nullptr);
  EXPECT_NE(std::string(hsmstek_last_error()).find("pkcs11:"),
            std::string::npos);

  EXPECT_EQ(hsmstek_store_open("pkcs11:token=capi", &store),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(hsmstek_last_error()).find("object=<label>"),
            std::string::npos);

  EXPECT_EQ(
      hsmstek_store_open(
          "pkcs11:token=capi;object=web?module-path=/nonexistent.so", &store),
      HSMSTEK_ERR_NOT_FOUND);
  EXPECT_NE(std::string(hsmstek_last_error()).find("/nonexistent.so"),
            std::string::npos);
  EXPECT_EQ(hsmstek_store_open(nullptr, &store), HSMSTEK_ERR_INVALID_ARGUMENT);
}

TEST_F(CApiTest, TokenProblemsAreDeferredToCheck) {
  hsmstek_store *store = nullptr;
  ASSERT_EQ(
      hsmstek_store_open(SoftHsm::Get().Uri("absent", "web").c_str(), &store),
      HSMSTEK_OK);
  EXPECT_STREQ(hsmstek_last_error(), "");
  EXPECT_EQ(hsmstek_store_check(store), HSMSTEK_ERR_NOT_FOUND);
  EXPECT_NE(std::string(hsmstek_last_error()).find("\"capi\""),
            std::string::npos);
  // A server built on it still completes full handshakes, without tickets.
  SSL_CTX *ctx = hsmstek_ssl_ctx_new(store, TLS_server_method());
  ASSERT_NE(ctx, nullptr);
  PrepareServerCtx(ctx, TLS1_3_VERSION);
  UniqueSslCtx client = NewClientCtx(TLS1_3_VERSION);
  HandshakeResult r = Handshake(client.get(), ctx);
  EXPECT_TRUE(r.ok) << r.error;
  EXPECT_EQ(r.tickets_received, 0);
  SSL_CTX_free(ctx);
  hsmstek_store_close(store);
}

// Early data needs an explicit opt-in; the policy API and the resumption
// counters are reachable from C.
TEST_F(CApiTest, EarlyDataOptInPolicyAndResumptionStats) {
  hsmstek_store *store = nullptr;
  ASSERT_EQ(
      hsmstek_store_open(SoftHsm::Get().Uri("capi", "web").c_str(), &store),
      HSMSTEK_OK);
  SSL_CTX *early = SSL_CTX_new(TLS_server_method());
  ASSERT_EQ(SSL_CTX_set_max_early_data(early, 16384), 1);
  EXPECT_EQ(hsmstek_ssl_ctx_install(store, early),
            HSMSTEK_ERR_FAILED_PRECONDITION);
  EXPECT_NE(std::string(hsmstek_last_error()).find("HSMSTEK_OPT_EARLY_DATA"),
            std::string::npos);
  EXPECT_EQ(hsmstek_store_set_option(store, HSMSTEK_OPT_EARLY_DATA, 2),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  ASSERT_EQ(hsmstek_store_set_option(store, HSMSTEK_OPT_EARLY_DATA, 1),
            HSMSTEK_OK);
  EXPECT_EQ(hsmstek_ssl_ctx_install(store, early), HSMSTEK_OK)
      << hsmstek_last_error();
  EXPECT_NE(SSL_CTX_get_options(early) & SSL_OP_NO_ANTI_REPLAY, 0u);
  SSL_CTX_free(early);

  SSL_CTX *plain = SSL_CTX_new(TLS_server_method());
  EXPECT_EQ(hsmstek_ssl_ctx_set_policy(plain, "x", 1),
            HSMSTEK_ERR_FAILED_PRECONDITION);
  ASSERT_EQ(hsmstek_ssl_ctx_install(store, plain), HSMSTEK_OK);
  EXPECT_EQ(hsmstek_ssl_ctx_set_policy(plain, "x", 1), HSMSTEK_OK);
  EXPECT_EQ(hsmstek_ssl_ctx_set_policy(plain, nullptr, 1),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  SSL_CTX_free(plain);

  hsmstek_resumption_stats r;
  ASSERT_EQ(hsmstek_store_resumption_stats(store, &r, sizeof(r)), HSMSTEK_OK);
  const hsmstek_resumption_stats before = r;

  // Handshakes that move each counter: a ticket of `a` presented to `b`
  // (declared policy "x"): rejected_policy; to `other` (same policy, the
  // application's own session id context set after install): opened but
  // refused by OpenSSL, opened_not_resumed; early data switched on after
  // install without the option: early_data_refused.
  ASSERT_EQ(hsmstek_store_set_option(store, HSMSTEK_OPT_EARLY_DATA, 0),
            HSMSTEK_OK);
  SSL_CTX *a = hsmstek_ssl_ctx_new(store, TLS_server_method());
  SSL_CTX *b = hsmstek_ssl_ctx_new(store, TLS_server_method());
  SSL_CTX *other = hsmstek_ssl_ctx_new(store, TLS_server_method());
  ASSERT_TRUE(a && b && other) << hsmstek_last_error();
  for (SSL_CTX *ctx : {a, b, other}) PrepareServerCtx(ctx, TLS1_3_VERSION);
  ASSERT_EQ(hsmstek_ssl_ctx_set_policy(b, "x", 1), HSMSTEK_OK);
  static const unsigned char kOwn[] = "application";
  ASSERT_EQ(SSL_CTX_set_session_id_context(other, kOwn, sizeof(kOwn)), 1);
  ASSERT_EQ(SSL_CTX_set_max_early_data(a, 16384), 1);
  SSL_CTX_set_options(a, SSL_OP_NO_ANTI_REPLAY);
  UniqueSslCtx client = NewClientCtx(TLS1_3_VERSION);
  HandshakeResult full = Handshake(client.get(), a);
  ASSERT_TRUE(full.ok && full.session) << full.error;
  EXPECT_EQ(SSL_SESSION_get_max_early_data(full.session.get()), 0u);
  HandshakeResult on_b = Handshake(client.get(), b, full.session.get());
  ASSERT_TRUE(on_b.ok) << on_b.error;
  EXPECT_FALSE(on_b.reused);
  HandshakeResult on_other = Handshake(client.get(), other, full.session.get());
  ASSERT_TRUE(on_other.ok) << on_other.error;
  EXPECT_FALSE(on_other.reused);
  ASSERT_EQ(hsmstek_store_resumption_stats(store, &r, sizeof(r)), HSMSTEK_OK);
  EXPECT_EQ(r.rejected_policy - before.rejected_policy, 1u);
  EXPECT_EQ(r.opened_not_resumed - before.opened_not_resumed, 1u);
  EXPECT_GE(r.early_data_refused - before.early_data_refused, 1u);
  for (SSL_CTX *ctx : {a, b, other}) SSL_CTX_free(ctx);
  EXPECT_EQ(hsmstek_store_resumption_stats(nullptr, &r, sizeof(r)),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  hsmstek_store_close(store);
}

TEST_F(CApiTest, WrongPinIsReportedByCheckWithoutThePin) {
  hsmstek_store *store = nullptr;
  std::string uri =
      "pkcs11:token=capi;object=web?module-path=" + SoftHsmModulePath() +
      "&pin-value=86420";
  ASSERT_EQ(hsmstek_store_open(uri.c_str(), &store), HSMSTEK_OK);
  EXPECT_EQ(hsmstek_store_check(store), HSMSTEK_ERR_PERMISSION_DENIED);
  std::string error = hsmstek_last_error();
  EXPECT_NE(error.find("CKR_PIN_INCORRECT"), std::string::npos);
  EXPECT_EQ(error.find("86420"), std::string::npos);
  hsmstek_store_close(store);
}

TEST_F(CApiTest, ScopedContextResumesAndCountsAndOutlivesItsStore) {
  hsmstek_store *store = nullptr;
  ASSERT_EQ(
      hsmstek_store_open(SoftHsm::Get().Uri("capi", "web").c_str(), &store),
      HSMSTEK_OK);
  ASSERT_EQ(hsmstek_store_check(store), HSMSTEK_OK) << hsmstek_last_error();
  ASSERT_EQ(hsmstek_store_set_option(store, HSMSTEK_OPT_TLS13_RENEW, 0),
            HSMSTEK_OK);
  SSL_CTX *ctx = hsmstek_ssl_ctx_new(store, TLS_server_method());
  ASSERT_NE(ctx, nullptr) << hsmstek_last_error();
  PrepareServerCtx(ctx, TLS1_3_VERSION);
  UniqueSslCtx client = NewClientCtx(TLS1_3_VERSION);
  HandshakeResult full = Handshake(client.get(), ctx);
  ASSERT_TRUE(full.ok && full.session) << full.error;
  HandshakeResult again = Handshake(client.get(), ctx, full.session.get());
  ASSERT_TRUE(again.ok) << again.error;
  EXPECT_TRUE(again.reused);

  hsmstek_stats stats;
  ASSERT_EQ(hsmstek_store_stats(store, &stats), HSMSTEK_OK);
  EXPECT_EQ(stats.tickets_issued, 2u);   // two NewSessionTickets in TLS 1.3
  EXPECT_EQ(stats.tickets_resumed, 1u);  // renewal turned off
  EXPECT_EQ(stats.tickets_renewed, 0u);
  EXPECT_EQ(stats.seal.count, 2u);
  EXPECT_EQ(stats.open.count, 1u);
  EXPECT_GE(stats.derivations, 1u);
  EXPECT_GE(stats.reconnects, 1u);

  // Round trips and per-step token latency: two seals and one open, each
  // step one or two token calls on this (the handshake) thread.
  hsmstek_token_stats token;
  ASSERT_EQ(hsmstek_store_token_stats(store, &token, sizeof(token)),
            HSMSTEK_OK);
  EXPECT_EQ(token.seals, 2u);
  EXPECT_EQ(token.opens, 1u);
  EXPECT_GE(token.seal_round_trips, 4u);  // encrypt + HMAC per seal, >= 1 each
  EXPECT_LE(token.seal_round_trips, 8u);
  EXPECT_GE(token.open_round_trips, 2u);
  EXPECT_LE(token.open_round_trips, 4u);
  EXPECT_EQ(token.round_trips_per_seal_milli,
            token.seal_round_trips * 1000 / 2);
  EXPECT_EQ(token.encrypt.count, 2u);
  EXPECT_EQ(token.decrypt.count, 1u);
  EXPECT_EQ(token.sign.count, 3u);
  EXPECT_GT(token.sign.p50_ns, 0u);
  EXPECT_GE(token.sign.p99_ns, token.sign.p50_ns);
  EXPECT_EQ(token.armed_hits + token.armed_misses, 6u);  // every step asked
  // An older caller's smaller struct is filled only as far as it goes.
  uint64_t first_two[3] = {0, 0, 0xdeadbeef};
  ASSERT_EQ(hsmstek_store_token_stats(
                store, reinterpret_cast<hsmstek_token_stats *>(first_two),
                2 * sizeof(uint64_t)),
            HSMSTEK_OK);
  EXPECT_EQ(first_two[0], 2u);
  EXPECT_EQ(first_two[1], 1u);
  EXPECT_EQ(first_two[2], 0xdeadbeefu);

  // The SSL_CTX keeps its own reference: closing the store first is fine.
  hsmstek_store_close(store);
  UniqueSslCtx client2 = NewClientCtx(TLS1_3_VERSION);
  HandshakeResult after = Handshake(client2.get(), ctx);
  EXPECT_TRUE(after.ok) << after.error;
  EXPECT_GE(after.tickets_received, 1);
  SSL_CTX_free(ctx);
}

TEST_F(CApiTest, OptionsAreValidated) {
  hsmstek_store *store = nullptr;
  ASSERT_EQ(
      hsmstek_store_open(SoftHsm::Get().Uri("capi", "web").c_str(), &store),
      HSMSTEK_OK);
  EXPECT_EQ(hsmstek_store_set_option(store, HSMSTEK_OPT_CLOCK_SKEW_SECONDS, 30),
            HSMSTEK_OK);
  EXPECT_EQ(hsmstek_store_set_option(store, HSMSTEK_OPT_CLOCK_SKEW_SECONDS, -1),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(hsmstek_store_set_option(store, HSMSTEK_OPT_TLS13_RENEW, 2),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(hsmstek_store_set_option(store, 99, 0),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(hsmstek_last_error()).find("unknown option 99"),
            std::string::npos);
  hsmstek_store_close(store);
}

TEST_F(CApiTest, NullAndForeignHandlesAreRefused) {
  hsmstek_stats stats;
  EXPECT_EQ(hsmstek_store_stats(nullptr, &stats), HSMSTEK_ERR_INVALID_ARGUMENT);
  hsmstek_token_stats token;
  EXPECT_EQ(hsmstek_store_token_stats(nullptr, &token, sizeof(token)),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(hsmstek_store_check(nullptr), HSMSTEK_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(hsmstek_ssl_ctx_new(nullptr, TLS_server_method()), nullptr);
  alignas(8) unsigned char garbage[64] = {};
  auto *fake = reinterpret_cast<hsmstek_store *>(garbage);
  EXPECT_EQ(hsmstek_store_check(fake), HSMSTEK_ERR_INVALID_ARGUMENT);
  hsmstek_store_close(nullptr);
  hsmstek_store_close(fake);  // ignored: wrong magic
}

TEST_F(CApiTest, CppWrapperOwnsTheStoreAndReportsErrors) {
  std::string error;
  Store bad = Store::Open("pkcs11:token=capi", &error);
  EXPECT_FALSE(bad);
  EXPECT_NE(error.find("object=<label>"), std::string::npos);

  Store store = Store::Open(SoftHsm::Get().Uri("capi", "web"), &error);
  ASSERT_TRUE(store) << error;
  EXPECT_TRUE(store.Check(&error)) << error;
  EXPECT_FALSE(store.SetOption(HSMSTEK_OPT_TLS13_RENEW, 7, &error));
  hsmstek::UniqueSslCtx ctx = store.NewSslCtx(TLS_server_method(), &error);
  ASSERT_TRUE(ctx) << error;
  PrepareServerCtx(ctx.get(), TLS1_2_VERSION);
  UniqueSslCtx client = NewClientCtx(TLS1_2_VERSION);
  HandshakeResult full = Handshake(client.get(), ctx.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  HandshakeResult again =
      Handshake(client.get(), ctx.get(), full.session.get());
  EXPECT_TRUE(again.reused);
  EXPECT_EQ(store.Stats().tickets_resumed, 1u);
  EXPECT_EQ(store.ResumptionStats().opened_not_resumed, 0u);
  // Declaring another policy: the session no longer resumes there.
  ASSERT_TRUE(Store::SetPolicy(ctx.get(), "admins", 6, &error)) << error;
  HandshakeResult other =
      Handshake(client.get(), ctx.get(), full.session.get());
  ASSERT_TRUE(other.ok) << other.error;
  EXPECT_FALSE(other.reused);
  EXPECT_EQ(store.ResumptionStats().rejected_policy, 1u);
}

// The forward secrecy of the active master, as the maintenance pass saw
// it: nothing before the token was reached, then the link, check value and
// horizon the C++ store computes in the token; a short size fills a prefix.
// (The values moving across ratchet steps: ratchet_test,
// ForwardSecrecySnapshotFollowsTheRatchet, on a fake clock.)
TEST_F(CApiTest, ForwardSecrecyOfTheActiveMaster) {
  hsmstek_store *store = nullptr;
  const std::string uri = SoftHsm::Get().Uri("capi", "web");
  ASSERT_EQ(hsmstek_store_open(uri.c_str(), &store), HSMSTEK_OK);
  hsmstek_forward_secrecy fs{};
  EXPECT_EQ(hsmstek_store_forward_secrecy(store, &fs, sizeof(fs)),
            HSMSTEK_ERR_FAILED_PRECONDITION);
  EXPECT_NE(std::string(hsmstek_last_error()).find("no active master"),
            std::string::npos)
      << hsmstek_last_error();
  EXPECT_EQ(hsmstek_store_forward_secrecy(nullptr, &fs, sizeof(fs)),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(hsmstek_store_forward_secrecy(store, &fs, sizeof(fs) + 1),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  ASSERT_EQ(hsmstek_store_check(store), HSMSTEK_OK) << hsmstek_last_error();
  ASSERT_EQ(hsmstek_store_forward_secrecy(store, &fs, sizeof(fs)), HSMSTEK_OK)
      << hsmstek_last_error();

  // The same store through the C++ key store, computed in the token now.
  keystore::StoreOptions options;
  options.background_maintenance = false;
  auto cpp = keystore::KeyStore::Open(uri, options);
  ASSERT_TRUE(cpp.ok());
  ASSERT_TRUE((*cpp)->Load().ok());
  Result<keystore::StoreSnapshot> snap = (*cpp)->Describe();
  ASSERT_TRUE(snap.ok());
  ASSERT_EQ(snap->masters.size(), 1u);
  const keystore::MasterInfo &m = snap->masters[0];
  EXPECT_EQ(std::vector<uint8_t>(fs.master, fs.master + 8),
            std::vector<uint8_t>(m.id.begin(), m.id.end()));
  ASSERT_TRUE(m.current_link.has_value());
  EXPECT_EQ(fs.current_link, *m.current_link);
  // Activated a month back with a 1 day ratchet: well past link 0.
  EXPECT_GE(fs.current_link, 29u);
  // Loading the C++ store (and the stores of earlier tests) may have
  // destroyed old links since the C store's pass: the horizon only moves
  // on, links only go.
  // Exact equality with Describe on one store: ratchet_test.
  ASSERT_TRUE(m.horizon.has_value());
  EXPECT_LE(fs.horizon, *m.horizon);
  EXPECT_LT(fs.horizon, time(nullptr) - 86400);  // the decrypt window
  EXPECT_GE(fs.links_held, m.links.size());
  EXPECT_LE(fs.as_of, time(nullptr));
  EXPECT_GE(fs.as_of, time(nullptr) - 60);
  uint64_t link = 0;
  auto check = (*cpp)->CheckValue(m.id, &link);
  ASSERT_TRUE(check.ok()) << check.status().message();
  EXPECT_EQ(link, fs.current_link);
  EXPECT_EQ(
      std::vector<uint8_t>(fs.current_link_check, fs.current_link_check + 8),
      std::vector<uint8_t>(check->begin(), check->end()));

  // An older caller's smaller struct: only its prefix is written.
  std::vector<uint8_t> bytes(sizeof(fs), 0xee);
  const size_t cut = offsetof(hsmstek_forward_secrecy, horizon);
  ASSERT_EQ(hsmstek_store_forward_secrecy(
                store,
                reinterpret_cast<hsmstek_forward_secrecy *>(bytes.data()), cut),
            HSMSTEK_OK);
  EXPECT_EQ(std::memcmp(bytes.data(), &fs, cut), 0);
  EXPECT_EQ(bytes[cut], 0xee);

  // The C++ wrapper.
  std::string error;
  Store wrapped = Store::Open(uri, &error);
  ASSERT_TRUE(wrapped) << error;
  hsmstek_forward_secrecy via_cpp{};
  EXPECT_FALSE(wrapped.ForwardSecrecy(&via_cpp, &error));
  EXPECT_NE(error.find("no active master"), std::string::npos) << error;
  ASSERT_TRUE(wrapped.Check(&error)) << error;
  ASSERT_TRUE(wrapped.ForwardSecrecy(&via_cpp, &error)) << error;
  EXPECT_EQ(via_cpp.current_link, fs.current_link);
  EXPECT_GE(via_cpp.horizon, fs.horizon);
  hsmstek_store_close(store);
}

}  // namespace
}  // namespace hsmstek::testing

namespace hsmstek::testing {
namespace {

// hsmstek_store_open_tokens: argument checks, and the health of a store's
// token before and after it connects (one token here; failover between
// two is tested in tests/faults/failover_test.cc).
TEST_F(CApiTest, OpenTokensAndTokenHealth) {
  hsmstek_store *store = reinterpret_cast<hsmstek_store *>(1);
  EXPECT_EQ(hsmstek_store_open_tokens(nullptr, 1, &store),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(store, nullptr);
  const std::string uri = SoftHsm::Get().Uri("capi", "web");
  const char *uris[] = {uri.c_str()};
  EXPECT_EQ(hsmstek_store_open_tokens(uris, 0, &store),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  ASSERT_EQ(hsmstek_store_open_tokens(uris, 1, &store), HSMSTEK_OK)
      << hsmstek_last_error();
  EXPECT_EQ(hsmstek_store_token_count(store), 1u);
  hsmstek_token_health h{};
  EXPECT_EQ(hsmstek_store_token_health(store, 1, &h, sizeof(h)),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  ASSERT_EQ(hsmstek_store_token_health(store, 0, &h, sizeof(h)), HSMSTEK_OK);
  EXPECT_EQ(h.up, 0);  // lazy: not connected before first use
  EXPECT_EQ(h.ms_since_success, -1);
  ASSERT_EQ(hsmstek_store_check(store), HSMSTEK_OK) << hsmstek_last_error();
  ASSERT_EQ(hsmstek_store_token_health(store, 0, &h, sizeof(h)), HSMSTEK_OK);
  EXPECT_EQ(h.up, 1);
  EXPECT_EQ(h.active, 1);
  EXPECT_EQ(h.verified, 1);
  EXPECT_GE(h.ms_since_success, 0);
  EXPECT_EQ(h.failovers, 0u);
  EXPECT_NE(std::string(h.token).find("capi"), std::string::npos) << h.token;
  EXPECT_EQ(hsmstek_store_token_count(nullptr), 0u);
  hsmstek_store_close(store);
}

// Two tokens (here two connections to one token, which hold the same
// masters by construction), the argument checks, and a partial out_size.
TEST_F(CApiTest, OpenTwoTokensHealthOfEachAndPartialSizes) {
  const std::string uri = SoftHsm::Get().Uri("capi", "web");
  const char *nine[9];
  for (const char *&u : nine) u = uri.c_str();
  hsmstek_store *store = nullptr;
  EXPECT_EQ(hsmstek_store_open_tokens(nine, 9, &store),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  const char *with_null[] = {uri.c_str(), nullptr};
  EXPECT_EQ(hsmstek_store_open_tokens(with_null, 2, &store),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  ASSERT_EQ(hsmstek_store_open_tokens(nine, 2, &store), HSMSTEK_OK)
      << hsmstek_last_error();
  EXPECT_EQ(hsmstek_store_token_count(store), 2u);
  ASSERT_EQ(hsmstek_store_check(store), HSMSTEK_OK) << hsmstek_last_error();
  hsmstek_token_health h[2]{};
  for (size_t i = 0; i < 2; ++i) {
    ASSERT_EQ(hsmstek_store_token_health(store, i, &h[i], sizeof(h[i])),
              HSMSTEK_OK);
    EXPECT_EQ(h[i].up, 1);
    EXPECT_EQ(h[i].verified, 1) << i;
  }
  EXPECT_EQ(h[0].active, 1);
  EXPECT_EQ(h[1].active, 0);
  EXPECT_EQ(hsmstek_store_token_health(store, 2, &h[0], sizeof(h[0])),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(hsmstek_store_token_health(store, 0, &h[0], sizeof(h[0]) + 1),
            HSMSTEK_ERR_INVALID_ARGUMENT);
  // Cut inside the token name: what is there is a NUL-terminated string.
  const size_t cut = offsetof(hsmstek_token_health, token) + 4;
  std::vector<char> bytes(sizeof(hsmstek_token_health), 'x');
  ASSERT_EQ(hsmstek_store_token_health(
                store, 0,
                reinterpret_cast<hsmstek_token_health *>(bytes.data()), cut),
            HSMSTEK_OK);
  EXPECT_EQ(bytes[cut - 1], '\0');
  EXPECT_EQ(bytes[cut], 'x');  // nothing written past out_size
  hsmstek_store_close(store);
}

}  // namespace
}  // namespace hsmstek::testing
