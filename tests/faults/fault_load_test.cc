// Faults under load (docs/TESTING.md): the token removed and re-inserted while
// threads handshake, and a slow token with eight threads. These tests assert
// outcomes, never durations; waits are on progress counters (no sleeps). A
// hang would be a deadlock: ctest's TIMEOUT ends it.
#include <openssl/ssl.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "fault_fixture.h"
#include "pkcs11/token.h"
#include "pkcs11/uri.h"

namespace hsmstek::testing {
namespace {

class FaultLoadTest : public FaultTest,
                      public ::testing::WithParamInterface<int> {
 protected:
  static void SetUpTestSuite() { EnsureFaultStore("load"); }
  int version() const { return GetParam(); }
};

// Phases of the removal test, as seen by a handshake at its start and end.
enum Phase : int {
  kPresent = 0,    // before the removal
  kRemoved = 1,    // the control file says "remove" (write completed)
  kInserting = 2,  // "insert" is being written
  kInserted = 3,   // "insert" written: the token is back
};

struct Attempt {
  int start = kPresent, end = kPresent;
  bool ok = false;
  std::string error;
  bool resume = false;  // offered a ticket
  bool reused = false;
  int sealed_in = kPresent;  // for a resume: the phase its ticket came from
  UniqueSslSession session;  // for a full handshake: what the client kept
};

// ApplyControlFile makes one PKCS#11 call, so the faulty module reloads its
// control file (and applies a removal) on this thread, now. Not a slot
// call: the store may be re-initialising the module meanwhile (a removed
// token is looked for again after C_Finalize + C_Initialize), and
// C_GetFunctionList answers in any state.
void ApplyControlFile() {
  CK_FUNCTION_LIST *list = nullptr;
  EXPECT_EQ(SoftHsm::Get().module()->functions()->C_GetFunctionList(&list),
            static_cast<CK_RV>(CKR_OK));
}

// The threads keep handshaking before, during and after the removal, which
// lands between any two PKCS#11 calls of a handshake in flight (the faulty
// module waits for calls already inside SoftHSM before closing its
// sessions, as SoftHSM 2.6 crashes when a session is closed under a call):
// every session, handle and cached key of the store dies mid-handshake.
TEST_P(FaultLoadTest, RemovalAndReinsertionMidLoad) {
  constexpr int kThreads = 4;
  // Handshakes (full or resuming) that must complete in each phase before
  // the test moves on.
  constexpr int kPerPhase = 16;
  auto context = ContextFor(OpenStore("load"));
  auto server = ServerCtx(context, version());
  const size_t mark = TraceMark();

  std::atomic<int> phase{kPresent};
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::condition_variable cv;
  int completed_from[4] = {0, 0, 0, 0};  // by start phase; guarded by mu
  int resumes_sealed_inserted = 0;       // guarded by mu
  std::vector<std::vector<Attempt>> attempts(kThreads);

  auto run = [&](std::vector<Attempt> &mine) {
    auto client = NewClientCtx(version());
    auto record = [&](Attempt a) {
      std::lock_guard<std::mutex> lock(mu);
      completed_from[a.start]++;
      if (a.resume && a.sealed_in == kInserted) resumes_sealed_inserted++;
      mine.push_back(std::move(a));
      cv.notify_all();
    };
    while (!stop.load()) {
      Attempt full;
      full.start = phase.load();
      HandshakeResult r = Handshake(client.get(), server.get());
      full.end = phase.load();
      full.ok = r.ok;
      full.error = r.error;
      Bytes ticket = TicketOfResult(r);
      full.session = ticket.empty() ? nullptr : Reoffer(r.session.get());
      const int sealed_in = full.start == full.end ? full.start : -1;
      UniqueSslSession offer = Reoffer(full.session.get());
      record(std::move(full));
      if (!offer) continue;
      Attempt resume;
      resume.resume = true;
      resume.sealed_in = sealed_in;
      resume.start = phase.load();
      HandshakeResult again =
          Handshake(client.get(), server.get(), offer.get());
      resume.end = phase.load();
      resume.ok = again.ok;
      resume.error = again.error;
      resume.reused = again.reused;
      record(std::move(resume));
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back(run, std::ref(attempts[t]));
  }
  auto wait_for = [&](auto done) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, done);
  };
  wait_for([&] { return completed_from[kPresent] >= kPerPhase; });
  SetRules("remove\n");
  ApplyControlFile();
  phase.store(kRemoved);
  wait_for([&] { return completed_from[kRemoved] >= kPerPhase; });
  phase.store(kInserting);
  SetRules("insert\n");
  phase.store(kInserted);
  wait_for([&] {
    return completed_from[kInserted] >= kPerPhase &&
           resumes_sealed_inserted >= kPerPhase;
  });
  stop.store(true);
  for (std::thread &t : threads) t.join();

  std::vector<UniqueSslSession> removed_tickets;
  int resumed_after_insert = 0;
  for (std::vector<Attempt> &mine : attempts) {
    for (Attempt &a : mine) {
      EXPECT_TRUE(a.ok) << "phase " << a.start << ": " << a.error;
      const bool inside_removal = a.start == kRemoved && a.end == kRemoved;
      if (a.resume && inside_removal) {
        EXPECT_FALSE(a.reused) << "resumed while the token was removed";
      }
      if (a.resume && a.sealed_in == kInserted) {
        // Sealed and offered with the token back: must resume.
        EXPECT_TRUE(a.reused) << "a ticket sealed after insertion failed";
        resumed_after_insert += a.reused ? 1 : 0;
      }
      if (!a.resume && inside_removal && a.session) {
        removed_tickets.push_back(std::move(a.session));
      }
    }
  }
  EXPECT_GE(resumed_after_insert, kPerPhase);
  const std::vector<TraceCall> calls = TraceSince(mark);
  size_t removal_errors = 0;
  for (const TraceCall &c : calls) {
    if (c.result == "CKR_DEVICE_REMOVED" || c.result == "CKR_TOKEN_NOT_PRESENT")
      removal_errors++;
  }
  // The store was connected when the token went: its sessions saw it.
  EXPECT_GT(removal_errors, 0u);
  EXPECT_GT(context->stats->Snapshot().token_errors, 0u);

  // Whatever the client got while the token was out never resumes, now
  // that it is back (stand-in bytes, never a key outside the token).
  auto client = NewClientCtx(version());
  for (const UniqueSslSession &s : removed_tickets) {
    UniqueSslSession offer = Reoffer(s.get());
    HandshakeResult r = Handshake(client.get(), server.get(), offer.get());
    EXPECT_TRUE(r.ok) << r.error;
    EXPECT_FALSE(r.reused) << "a ticket sealed while the token was removed";
  }
}

// A token that is connecting counts its module as in use: another token
// that finds nothing and re-initialises the module to look again must not
// C_Finalize it under the first one's C_Login.
TEST_F(FaultTest, ModuleIsNotReinitialisedUnderAConnectInProgress) {
  EnsureFaultStore("connecting");
  std::shared_ptr<p11::Module> module = SoftHsm::Get().module();
  // Precondition: nothing of ours uses the module now, so only the connect
  // below can keep it from being re-initialised.
  ASSERT_TRUE(module->TryReinitialize());
  SetRules("delay C_Login 300ms\n");
  Result<p11::TokenUri> uri =
      p11::ParseTokenUri(SoftHsm::Get().Uri(kFaultToken, "connecting"));
  ASSERT_TRUE(uri.ok()) << uri.status().message();
  Result<std::shared_ptr<p11::Token>> token = p11::Token::Create(*uri, {});
  ASSERT_TRUE(token.ok()) << token.status().message();
  const size_t mark = TraceMark();
  Status connected = Internal("not run");
  std::thread connecting([&] { connected = (*token)->Connect(); });
  // The object session opens right before the (delayed) login: wait for it
  // in the trace, i.e. for the connect to be in flight.
  while (Count(TraceSince(mark), "C_OpenSession") == 0) {
    std::this_thread::yield();
  }
  EXPECT_FALSE(module->TryReinitialize());
  connecting.join();
  EXPECT_TRUE(connected.ok()) << connected.message();
}

TEST_P(FaultLoadTest, SlowTokenWithEightThreadsNeverDeadlocksThePool) {
  constexpr int kThreads = 8;
  constexpr int kPairs = 6;  // full handshake + resumption, per thread
  auto context = ContextFor(OpenStore("load"));
  auto server = ServerCtx(context, version());
  const size_t mark = TraceMark();
  // Every MAC and derivation takes 20 ms, and one decryption fails with a
  // connection fault: a reconnect (new sessions, re-login, reload,
  // re-derivation) while eight threads hold or wait for sessions.
  SetRules(
      "delay C_Sign 20ms\n"
      "delay C_DeriveKey 20ms\n"
      "fail C_Decrypt after 12 times 1 with CKR_DEVICE_ERROR\n");

  std::atomic<int> failed_handshakes{0}, failed_pairs{0}, resumed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      auto client = NewClientCtx(version());
      for (int i = 0; i < kPairs; ++i) {
        HandshakeResult full = Handshake(client.get(), server.get());
        if (!full.ok) failed_handshakes++;
        UniqueSslSession offer = Reoffer(full.session.get());
        if (!offer || TicketOf(offer.get()).empty()) {
          failed_pairs++;
          continue;
        }
        HandshakeResult again =
            Handshake(client.get(), server.get(), offer.get());
        if (!again.ok) failed_handshakes++;
        if (again.reused) {
          resumed++;
        } else {
          failed_pairs++;
        }
      }
    });
  }
  for (std::thread &t : threads) t.join();  // a deadlock hangs here
  SetRules("");

  EXPECT_EQ(failed_handshakes.load(), 0);
  const std::vector<TraceCall> calls = TraceSince(mark);
  EXPECT_EQ(Count(calls, "C_Decrypt", /*injected_only=*/true), 1u);
  EXPECT_GE(Count(calls, "C_Login"), 1u) << "the fault forced no reconnect";
  // Only the handshakes in flight when the fault dropped the connection
  // lose their ticket or resumption: at most one pair per thread.
  EXPECT_LE(failed_pairs.load(), kThreads);
  EXPECT_EQ(resumed.load() + failed_pairs.load(), kThreads * kPairs);
  EXPECT_GE(context->stats->Snapshot().token_errors, 1u);
}

INSTANTIATE_TEST_SUITE_P(Versions, FaultLoadTest,
                         ::testing::Values(TLS1_2_VERSION, TLS1_3_VERSION),
                         [](const ::testing::TestParamInfo<int> &info) {
                           return info.param == TLS1_3_VERSION ? "TLS13"
                                                               : "TLS12";
                         });

}  // namespace
}  // namespace hsmstek::testing
