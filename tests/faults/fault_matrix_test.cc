// The fault matrix (docs/TESTING.md): every PKCS#11 function on the ticket path
// x every token fault x TLS 1.2 and 1.3, injected by libhsmstek_faulty.so into
// real in-memory handshakes against SoftHSM.
//
// Each case:
//   1. healthy: a full handshake issues ticket T0;
//   2. the fault starts ("fail <function> after 0 always with <CKR>") and
//      the store's token connection is dropped, so the fault meets a
//      reconnect: session open, login, object search, derivation and the
//      ticket operations all run under it. Two handshakes: resuming T0 and a
//      new full handshake. Both complete; whether T0 resumes and what the
//      new ticket is worth follow from the function (kExpectations); every
//      resumption was verified and decrypted by the token; issued tickets
//      are counted only for seals whose C_Encrypt and C_Sign succeeded in
//      the token; every window with an injected failure counts token_errors;
//   3. the fault clears: within kRecoveryBound handshakes the client's
//      newest session resumes (no back-off wait: back-off is 0 here);
//   4. every ticket the client received resumes iff its seal succeeded in
//      the token: a ticket sealed while C_Encrypt or C_Sign failed never
//      resumes, even with the token healthy again.
#include <openssl/ssl.h>

#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "fault_fixture.h"

namespace hsmstek::testing {
namespace {

// After a fault clears, the first handshake gets a ticket sealed in the
// token (or resumes one that was sealed during the fault) and the second at
// the latest resumes: the store reconnects on the next use (back-off 0) and
// nothing is cached across the fault.
constexpr int kRecoveryBound = 2;

enum class NewTicket {
  kNone,      // no keys: the callback declines, the client gets no ticket
  kUnusable,  // sealed with stand-in bytes (fail-soft): never resumes
  kValid,     // sealed in the token: resumes once the token is healthy
};

struct Expectation {
  bool t0_resumes_during_fault;
  NewTicket new_ticket;
};

// What "fail <function> always" must do to a resumption and to a new ticket.
const std::map<std::string, Expectation> &Expectations() {
  static const auto *table = new std::map<std::string, Expectation>{
      // No connection, no store view or no epoch keys: nothing to seal or
      // open with.
      {"C_OpenSession", {false, NewTicket::kNone}},
      {"C_Login", {false, NewTicket::kNone}},
      {"C_FindObjectsInit", {false, NewTicket::kNone}},
      {"C_FindObjects", {false, NewTicket::kNone}},
      {"C_DeriveKey", {false, NewTicket::kNone}},
      // Opening needs no encryption; the new ticket's ciphertext is random.
      {"C_EncryptInit", {true, NewTicket::kUnusable}},
      {"C_Encrypt", {true, NewTicket::kUnusable}},
      // The MAC check of an open fails; the new ticket's MAC is random.
      {"C_SignInit", {false, NewTicket::kUnusable}},
      {"C_Sign", {false, NewTicket::kUnusable}},
      // Opening fails; sealing is untouched.
      {"C_DecryptInit", {false, NewTicket::kValid}},
      {"C_Decrypt", {false, NewTicket::kValid}},
  };
  return *table;
}

const std::vector<std::string> &TicketPathFunctions() {
  static const auto *names = new std::vector<std::string>{
      "C_OpenSession", "C_Login",       "C_FindObjectsInit", "C_FindObjects",
      "C_DeriveKey",   "C_EncryptInit", "C_Encrypt",         "C_SignInit",
      "C_Sign",        "C_DecryptInit", "C_Decrypt"};
  return *names;
}

// Multi-part variants: hsmstek's cipher and MAC are single-part, so these
// are never called. The matrix proves it instead of pretending to test them.
const std::vector<std::string> &UnusedFunctions() {
  static const auto *names = new std::vector<std::string>{
      "C_EncryptUpdate", "C_EncryptFinal",  "C_SignUpdate",
      "C_SignFinal",     "C_DecryptUpdate", "C_DecryptFinal"};
  return *names;
}

const std::vector<std::string> &Faults() {
  static const auto *names = new std::vector<std::string>{
      "CKR_DEVICE_ERROR",      "CKR_SESSION_HANDLE_INVALID",
      "CKR_SESSION_CLOSED",    "CKR_DEVICE_REMOVED",
      "CKR_TOKEN_NOT_PRESENT", "CKR_USER_NOT_LOGGED_IN",
      "CKR_GENERAL_ERROR",     "CKR_FUNCTION_FAILED"};
  return *names;
}

using Param = std::tuple<std::string, std::string, int>;

std::string ParamName(const ::testing::TestParamInfo<Param> &info) {
  return std::get<0>(info.param) + "_" + std::get<1>(info.param) + "_" +
         (std::get<2>(info.param) == TLS1_3_VERSION ? "TLS13" : "TLS12");
}

std::string Rule(const std::string &function, const std::string &ckr) {
  return "fail " + function + " after 0 always with " + ckr + "\n";
}

// A ticket the client received, to be offered again once the token is
// healthy: it must resume iff it was sealed in the token.
struct ReceivedTicket {
  std::string what;
  UniqueSslSession session;
  bool sealed_in_token;
};

class FaultMatrixTest : public FaultTest,
                        public ::testing::WithParamInterface<Param> {
 protected:
  static void SetUpTestSuite() { EnsureFaultStore("matrix"); }

  const std::string &function() const { return std::get<0>(GetParam()); }
  const std::string &ckr() const { return std::get<1>(GetParam()); }
  int version() const { return std::get<2>(GetParam()); }

  // One handshake under observation: completes, every resumption was
  // opened by the token, issued/resumed/token_errors counters match the
  // trace. Records the new ticket (if the client got one other than
  // `offered`) for the after-recovery check.
  HandshakeResult Observe(const std::string &what, SSL_SESSION *offer,
                          std::vector<ReceivedTicket> *received) {
    const Bytes offered = offer ? TicketOf(offer) : Bytes{};
    const tls::TicketCounters before = context_->stats->Snapshot();
    const size_t mark = TraceMark();
    HandshakeResult r = Handshake(client_.get(), server_.get(), offer);
    const std::vector<TraceCall> window = TraceSince(mark);
    const tls::TicketCounters after = context_->stats->Snapshot();
    EXPECT_TRUE(r.ok) << what << ": " << r.error;
    if (r.reused) {
      EXPECT_TRUE(OpenedInToken(window))
          << what << ": resumed without the token verifying and decrypting";
    }
    const SealSummary seals = Seals(window);
    EXPECT_EQ(after.issued - before.issued, static_cast<uint64_t>(seals.good))
        << what << ": issued must count exactly the seals done in the token";
    EXPECT_EQ(after.resumed + after.renewed - before.resumed - before.renewed,
              r.reused ? 1u : 0u)
        << what;
    const size_t injected = Count(window, function(), /*injected_only=*/true);
    injected_ += injected;
    if (injected > 0) {
      EXPECT_GT(after.token_errors, before.token_errors)
          << what << ": " << injected << " injected " << function()
          << " failures not counted as token errors";
    }
    Bytes ticket = TicketOfResult(r);
    if (!ticket.empty() && ticket != offered) {
      EXPECT_GT(seals.attempts, 0) << what << ": a ticket without a seal";
      received->push_back({what, Reoffer(r.session.get()),
                           seals.attempts > 0 && seals.last_good});
    }
    return r;
  }

  std::shared_ptr<tls::TicketContext> context_;
  UniqueSslCtx server_;
  UniqueSslCtx client_;
  size_t injected_ = 0;
};

TEST_P(FaultMatrixTest, HandshakesCompleteNoTicketOutsideTheTokenRecovers) {
  const Expectation expect = Expectations().at(function());
  auto store = OpenStore("matrix");
  ASSERT_TRUE(store);
  context_ = ContextFor(store);
  server_ = ServerCtx(context_, version());
  client_ = NewClientCtx(version());
  ASSERT_TRUE(server_);
  std::vector<ReceivedTicket> received;

  // 1. Healthy.
  HandshakeResult first = Observe("healthy full handshake", nullptr, &received);
  ASSERT_TRUE(first.ok && first.session) << first.error;
  ASSERT_FALSE(TicketOf(first.session.get()).empty());
  ASSERT_EQ(received.size(), 1u);
  ASSERT_TRUE(received[0].sealed_in_token);
  UniqueSslSession t0 = Reoffer(first.session.get());
  // TLS 1.3 sends two tickets per full handshake.
  const uint64_t issued_healthy = context_->stats->Snapshot().issued;

  // 2. The fault, met by a reconnect.
  SetRules(Rule(function(), ckr()));
  store->token()->Disconnect();

  UniqueSslSession offer = Reoffer(t0.get());
  HandshakeResult during_resume =
      Observe("resuming T0 during the fault", offer.get(), &received);
  EXPECT_EQ(during_resume.reused, expect.t0_resumes_during_fault);

  HandshakeResult during_full =
      Observe("full handshake during the fault", nullptr, &received);
  EXPECT_FALSE(during_full.reused);
  const Bytes fault_ticket = TicketOfResult(during_full);
  switch (expect.new_ticket) {
    case NewTicket::kNone:
      EXPECT_TRUE(fault_ticket.empty())
          << "a ticket was issued although no keys could be had";
      break;
    case NewTicket::kUnusable:
    case NewTicket::kValid:
      ASSERT_FALSE(fault_ticket.empty());
      ASSERT_FALSE(received.empty());
      EXPECT_EQ(received.back().sealed_in_token,
                expect.new_ticket == NewTicket::kValid);
      break;
  }
  EXPECT_GT(injected_, 0u) << "the fault never hit " << function();
  // Stand-in seals are never counted as issued tickets.
  if (expect.new_ticket != NewTicket::kValid) {
    tls::TicketCounters c = context_->stats->Snapshot();
    EXPECT_EQ(c.issued, issued_healthy) << "issued during the fault";
  }

  // 3. The fault clears: resumption within kRecoveryBound handshakes,
  // starting from the client's newest session.
  SetRules("");
  UniqueSslSession latest = Reoffer(during_full.session.get());
  int handshakes = 0;
  bool resumed = false;
  while (!resumed && handshakes < kRecoveryBound) {
    ++handshakes;
    // A failed reload backs off on the store's clock (1 s first) instead
    // of re-running on every handshake: let that second pass.
    clock_.Advance(1);
    HandshakeResult r =
        Observe("recovery handshake " + std::to_string(handshakes),
                latest.get(), &received);
    ASSERT_TRUE(r.ok) << r.error;
    resumed = r.reused;
    latest = Reoffer(r.session.get());
  }
  EXPECT_TRUE(resumed) << "no resumption within " << kRecoveryBound
                       << " handshakes after the fault cleared";

  // 4. Every ticket received resumes iff the token sealed it; T0 still does.
  received.push_back({"T0", std::move(t0), true});
  for (ReceivedTicket &t : received) {
    UniqueSslSession copy = Reoffer(t.session.get());
    const size_t mark = TraceMark();
    HandshakeResult r = Handshake(client_.get(), server_.get(), copy.get());
    ASSERT_TRUE(r.ok) << t.what << ": " << r.error;
    EXPECT_EQ(r.reused, t.sealed_in_token)
        << t.what
        << (t.sealed_in_token ? ": a token-sealed ticket was lost"
                              : ": a ticket sealed while the token "
                                "failed was accepted");
    if (r.reused) {
      EXPECT_TRUE(OpenedInToken(TraceSince(mark))) << t.what;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    TicketPath, FaultMatrixTest,
    ::testing::Combine(::testing::ValuesIn(TicketPathFunctions()),
                       ::testing::ValuesIn(Faults()),
                       ::testing::Values(TLS1_2_VERSION, TLS1_3_VERSION)),
    ParamName);

// The multi-part functions: a rule on them never fires, because they are
// never called; tickets work exactly as without the rule.
class UnusedFunctionTest : public FaultTest,
                           public ::testing::WithParamInterface<Param> {
 protected:
  static void SetUpTestSuite() { EnsureFaultStore("matrix"); }
};

TEST_P(UnusedFunctionTest, IsNeverCalledOnTheTicketPath) {
  const std::string &function = std::get<0>(GetParam());
  const int version = std::get<2>(GetParam());
  const size_t mark = TraceMark();
  SetRules(Rule(function, std::get<1>(GetParam())));
  auto context = ContextFor(OpenStore("matrix"));
  auto server = ServerCtx(context, version);
  auto client = NewClientCtx(version);
  HandshakeResult full = Handshake(client.get(), server.get());
  ASSERT_TRUE(full.ok && full.session) << full.error;
  UniqueSslSession offer = Reoffer(full.session.get());
  HandshakeResult again = Handshake(client.get(), server.get(), offer.get());
  ASSERT_TRUE(again.ok) << again.error;
  EXPECT_TRUE(again.reused);

  const std::vector<TraceCall> calls = TraceSince(mark);
  EXPECT_EQ(Count(calls, function), 0u) << function << " was called";
  // The single-part calls did the work.
  EXPECT_GT(Count(calls, "C_Encrypt"), 0u);
  EXPECT_GT(Count(calls, "C_Decrypt"), 0u);
  EXPECT_GT(Count(calls, "C_Sign"), 0u);
  tls::TicketCounters c = context->stats->Snapshot();
  EXPECT_EQ(c.token_errors, 0u);
  EXPECT_EQ(c.resumed + c.renewed, 1u);
}

INSTANTIATE_TEST_SUITE_P(
    MultiPart, UnusedFunctionTest,
    ::testing::Combine(::testing::ValuesIn(UnusedFunctions()),
                       ::testing::ValuesIn(Faults()),
                       ::testing::Values(TLS1_2_VERSION, TLS1_3_VERSION)),
    ParamName);

}  // namespace
}  // namespace hsmstek::testing
