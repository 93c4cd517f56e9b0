// No exception crosses a C boundary (docs/TESTING.md). Test seams
// (common/test_seam.h) make the ticket path's allocation, a token
// operation, the store's thread start or a provider dispatch entry throw
// what the standard library throws under exhaustion; every handshake still
// completes (in full where the ticket could not be used), the counters
// move, and the process lives. Runs under ASan/UBSan in the CI subset.
#include <openssl/err.h>
#include <openssl/evp.h>

#include <thread>

#include "common/barrier.h"
#include "common/test_seam.h"
#include "provider/provider.h"
#include "tls_fixture.h"

namespace hsmstek::testing {
namespace {

class ExceptionTest : public TlsTest,
                      public ::testing::WithParamInterface<int> {
 protected:
  static void SetUpTestSuite() { SoftHsm::Get().CreateToken("exceptions"); }
  void TearDown() override {
    for (int p = 0; p < static_cast<int>(seam::Point::kCount); ++p) {
      seam::Arm(static_cast<seam::Point>(p), 0);
    }
  }
  int version() const { return GetParam(); }
  UniqueSslCtx TicketOnly(std::shared_ptr<tls::TicketContext> context) {
    UniqueSslCtx ctx = ServerCtx(std::move(context), version());
    SSL_CTX_set_session_cache_mode(ctx.get(), SSL_SESS_CACHE_OFF);
    SSL_CTX_set_num_tickets(ctx.get(), 1);  // one seal per TLS 1.3 handshake
    return ctx;
  }
};

TEST_P(ExceptionTest, ThrowOnTheSealPathIsAFullHandshakeWithoutTicket) {
  auto context = ContextFor(ProvisionedStore("exceptions", "seal"));
  auto server = TicketOnly(context);
  auto client = NewClientCtx(version());
  const uint64_t caught = barrier::CaughtCount();
  seam::Arm(seam::Point::kStoreLookup, 1);
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok) << full.error;
  EXPECT_FALSE(full.reused);
  tls::TicketCounters c = context->stats->Snapshot();
  EXPECT_EQ(c.exceptions, 1u);
  EXPECT_EQ(c.token_errors, 1u);
  EXPECT_EQ(c.issued, 0u);
  EXPECT_EQ(barrier::CaughtCount(), caught + 1);

  // Disarmed: tickets issue and resume again.
  HandshakeResult next = Handshake(client.get(), server.get());
  ASSERT_TRUE(next.ok && next.session) << next.error;
  HandshakeResult again =
      Handshake(client.get(), server.get(), next.session.get());
  ASSERT_TRUE(again.ok) << again.error;
  EXPECT_TRUE(again.reused);
}

TEST_P(ExceptionTest, ThrowOnTheOpenPathIsAFullHandshake) {
  auto context = ContextFor(ProvisionedStore("exceptions", "open"));
  auto server = TicketOnly(context);
  auto client = NewClientCtx(version());
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  seam::Arm(seam::Point::kStoreLookup, 1);
  HandshakeResult resume =
      Handshake(client.get(), server.get(), full.session.get());
  ASSERT_TRUE(resume.ok) << resume.error;
  EXPECT_FALSE(resume.reused);
  EXPECT_EQ(context->stats->Snapshot().exceptions, 1u);
}

TEST_P(ExceptionTest, ThrowInATokenOperationIsFailSoft) {
  auto context = ContextFor(ProvisionedStore("exceptions", "tokenop"));
  auto server = TicketOnly(context);
  auto client = NewClientCtx(version());
  // The seal's first token operation (the encryption) throws: fail-soft
  // makes the ticket unusable, the handshake itself succeeds.
  seam::Arm(seam::Point::kTokenOperation, 1);
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  tls::TicketCounters c = context->stats->Snapshot();
  EXPECT_EQ(c.exceptions, 1u);
  EXPECT_GE(c.token_errors, 1u);
  HandshakeResult resume =
      Handshake(client.get(), server.get(), full.session.get());
  ASSERT_TRUE(resume.ok) << resume.error;
  EXPECT_FALSE(resume.reused);
}

// The token HMAC buffers a ticket's bytes (an allocation) in its update,
// after the callback returned: libssl ends the connection on any failure
// there, so a lost input must fail soft (an unusable MAC: a full handshake
// when opening, an unusable ticket when sealing) and be counted.
TEST_P(ExceptionTest, ThrowWhileBufferingTheMacInputIsFailSoft) {
  auto context = ContextFor(ProvisionedStore("exceptions", "macinput"));
  auto server = TicketOnly(context);
  auto client = NewClientCtx(version());
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;

  // Opening: the MAC check's update throws.
  seam::Arm(seam::Point::kTokenMacInput, 1);
  HandshakeResult resume =
      Handshake(client.get(), server.get(), full.session.get());
  ASSERT_TRUE(resume.ok) << resume.error;
  EXPECT_FALSE(resume.reused);
  EXPECT_EQ(context->stats->Snapshot().exceptions, 1u);
  ASSERT_TRUE(resume.session);

  // Sealing: the ticket issued in this handshake carries a random MAC.
  seam::Arm(seam::Point::kTokenMacInput, 1);
  HandshakeResult sealed = Handshake(client.get(), server.get());
  ASSERT_TRUE(sealed.ok && sealed.session) << sealed.error;
  EXPECT_EQ(context->stats->Snapshot().exceptions, 2u);
  HandshakeResult unusable =
      Handshake(client.get(), server.get(), sealed.session.get());
  ASSERT_TRUE(unusable.ok) << unusable.error;
  EXPECT_FALSE(unusable.reused);

  // Disarmed: the first ticket still resumes.
  HandshakeResult again =
      Handshake(client.get(), server.get(), full.session.get());
  ASSERT_TRUE(again.ok) << again.error;
  EXPECT_TRUE(again.reused);
}

TEST_P(ExceptionTest, FailedThreadStartLeavesTheHandshakeAlone) {
  keystore::StoreOptions options;
  options.clock = &clock_;
  options.background_maintenance = true;
  options.token.read_write = true;
  ProvisionedStore("exceptions", "thread");  // the master, made elsewhere
  auto store = keystore::KeyStore::Open(
      SoftHsm::Get().Uri("exceptions", "thread"), options);
  ASSERT_TRUE(store.ok()) << store.status().message();
  auto context = ContextFor(*store);
  auto server = TicketOnly(context);
  auto client = NewClientCtx(version());
  // The first ticket starts the maintenance thread; that start throws.
  seam::Arm(seam::Point::kStoreThreadStart, 1);
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  EXPECT_EQ((*store)->exceptions(), 1u);
  // Tickets do not depend on the thread; the next use starts it.
  HandshakeResult again =
      Handshake(client.get(), server.get(), full.session.get());
  ASSERT_TRUE(again.ok) << again.error;
  EXPECT_TRUE(again.reused);
  EXPECT_EQ((*store)->exceptions(), 1u);
}

// An exception in the maintenance thread's pass (its store lookup
// allocates) is stopped in that thread: escaping a std::thread's body is
// std::terminate, the whole process. Without the thread's barrier this test
// dies. The thread runs a pass at start and then every second; the wait
// below ends when the armed pass has thrown (ctest bounds a hang).
TEST_P(ExceptionTest, ThrowInTheMaintenanceThreadIsCaughtThere) {
  keystore::StoreOptions options;
  options.clock = &clock_;
  options.background_maintenance = true;
  options.token.read_write = true;
  ProvisionedStore("exceptions", "maint");  // the master, made elsewhere
  auto store = keystore::KeyStore::Open(
      SoftHsm::Get().Uri("exceptions", "maint"), options);
  ASSERT_TRUE(store.ok()) << store.status().message();
  auto context = ContextFor(*store);
  auto server = TicketOnly(context);
  auto client = NewClientCtx(version());
  // The first ticket starts the maintenance thread (unarmed).
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  const uint64_t caught = barrier::CaughtCount();
  // Only the maintenance thread looks views up from here on.
  seam::Arm(seam::Point::kStoreLookup, 1);
  while ((*store)->exceptions() == 0) std::this_thread::yield();
  EXPECT_EQ(barrier::CaughtCount(), caught + 1);
  // The process, the thread and tickets live on.
  HandshakeResult again =
      Handshake(client.get(), server.get(), full.session.get());
  ASSERT_TRUE(again.ok) << again.error;
  EXPECT_TRUE(again.reused);
}

INSTANTIATE_TEST_SUITE_P(Versions, ExceptionTest,
                         ::testing::Values(TLS1_2_VERSION, TLS1_3_VERSION),
                         [](const ::testing::TestParamInfo<int> &info) {
                           return info.param == TLS1_3_VERSION ? "TLS13"
                                                               : "TLS12";
                         });

// A provider dispatch entry that throws fails with its contract's failure
// value and an OpenSSL error; nothing unwinds into libcrypto.
TEST(ProviderBarrierTest, ThrowingDispatchEntryRaisesAnError) {
  ASSERT_TRUE(provider::RegisterProvider().ok());
  EVP_MAC *mac = EVP_MAC_fetch(nullptr, "HMAC", "provider=hsmstek");
  ASSERT_NE(mac, nullptr);
  const uint64_t caught = barrier::CaughtCount();
  ERR_clear_error();
  seam::Arm(seam::Point::kProviderDispatch, 1);
  EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(mac);
  EXPECT_EQ(ctx, nullptr);
  bool raised = false;
  const char *data = nullptr;
  int flags = 0;
  while (unsigned long e =
             ERR_get_error_all(nullptr, nullptr, nullptr, &data, &flags)) {
    raised =
        raised || (ERR_GET_LIB(e) == ERR_LIB_PROV && (flags & ERR_TXT_STRING) &&
                   std::string(data).find("exception") != std::string::npos);
  }
  EXPECT_TRUE(raised) << "no provider error naming the exception";
  EXPECT_EQ(barrier::CaughtCount(), caught + 1);
  ERR_clear_error();
  // Disarmed, the same call works.
  ctx = EVP_MAC_CTX_new(mac);
  EXPECT_NE(ctx, nullptr);
  EVP_MAC_CTX_free(ctx);
  EVP_MAC_free(mac);
}

}  // namespace
}  // namespace hsmstek::testing
