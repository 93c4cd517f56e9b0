// A token outage seen by one store (docs/TESTING.md, "Token outages and
// failover"): recovery within a second of the token answering again however
// long the outage lasted (a background prober reconnects, capped at ~1 s
// between probes), and a bounded error log (a line when the outage starts, one
// a minute, one when it ends). Real time for the token (the prober's back-off),
// a fake clock moved along for the store (epochs, outage durations: 15 store
// seconds per real second, so a 10 s outage spans 150 store seconds and two
// minute lines).
#include <openssl/ssl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/log.h"
#include "fault_fixture.h"

namespace hsmstek::testing {
namespace {

using std::chrono::steady_clock;

struct CapturedLog {
  std::mutex mu;
  std::vector<std::string> lines;
};

// What reaches an error log at its default level (nginx: "error" and
// above; we count warnings and info too, not debug).
void Capture(int level, const char *msg, void *arg) {
  if (level > static_cast<int>(log::Level::kInfo)) return;
  auto *log = static_cast<CapturedLog *>(arg);
  std::lock_guard<std::mutex> lock(log->mu);
  log->lines.emplace_back(msg);
}

size_t CountContaining(const std::vector<std::string> &lines,
                       std::string_view what) {
  size_t n = 0;
  for (const std::string &l : lines) n += l.find(what) != std::string::npos;
  return n;
}

class OutageTest : public FaultTest {
 protected:
  static void SetUpTestSuite() { EnsureFaultStore("outage"); }
  void TearDown() override {
    log::SetSink(nullptr, nullptr);
    FaultTest::TearDown();
  }
};

TEST_F(OutageTest, ResumesWithinASecondOfReinsertionWithABoundedLog) {
#if defined(__SANITIZE_ADDRESS__)
  // Measures recovery time and log lines per store minute against the wall
  // clock: a sanitizer build is 5-10x slower (an ASan CI run: 2459 ms).
  // The plain suite runs it.
  GTEST_SKIP() << "timing measurement: plain builds only";
#endif
  keystore::StoreOptions options;
  options.clock = &clock_;
  options.background_maintenance = false;
  // Default token options: back-off 200 ms doubling to 1 s, prober on.
  auto store = keystore::KeyStore::Open(
      SoftHsm::Get().Uri(kFaultToken, "outage"), options);
  ASSERT_TRUE(store.ok()) << store.status().message();
  auto context = ContextFor(*store);
  auto server = ServerCtx(context, TLS1_3_VERSION);
  auto client = NewClientCtx(TLS1_3_VERSION);

  HandshakeResult first = Handshake(client.get(), server.get());
  ASSERT_TRUE(first.ok) << first.error;
  UniqueSslSession ticket = Reoffer(first.session.get());
  ASSERT_TRUE(ticket);
  HandshakeResult warm =
      Handshake(client.get(), server.get(), Reoffer(ticket.get()).get());
  ASSERT_TRUE(warm.reused);

  CapturedLog log;
  log::SetSink(Capture, &log);
  SetRules("remove\n");
  const auto removed = steady_clock::now();
  auto store_time = [&] {
    const auto real = std::chrono::duration_cast<std::chrono::milliseconds>(
        steady_clock::now() - removed);
    clock_.Set(kStart + real.count() * 15 / 1000);
  };
  // Ten seconds out, under load (a handshake every ~10 ms): every one
  // completes, none resumes.
  int during = 0;
  while (steady_clock::now() - removed < std::chrono::seconds(10)) {
    store_time();
    HandshakeResult r =
        Handshake(client.get(), server.get(), Reoffer(ticket.get()).get());
    ASSERT_TRUE(r.ok) << r.error;
    EXPECT_FALSE(r.reused);
    ++during;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  SetRules("insert\n");
  const auto inserted = steady_clock::now();
  bool resumed = false;
  while (!resumed && steady_clock::now() - inserted < std::chrono::seconds(5)) {
    store_time();
    HandshakeResult r =
        Handshake(client.get(), server.get(), Reoffer(ticket.get()).get());
    ASSERT_TRUE(r.ok) << r.error;
    resumed = r.reused;
    if (!resumed) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const auto back = std::chrono::duration_cast<std::chrono::milliseconds>(
      steady_clock::now() - inserted);
  log::SetSink(nullptr, nullptr);
  ASSERT_TRUE(resumed) << "no resumption within 5 s of re-insertion";
  // The prober's interval is capped at 1 s; the handshake after it
  // reconnects reloads the store (a few ms with SoftHSM).
  EXPECT_LE(back.count(), 1000)
      << "first resumption " << back.count() << " ms after re-insertion";
  std::printf(
      "[ outage   ] %d handshakes during a 10 s outage; resumption "
      "back %lld ms after re-insertion\n",
      during, static_cast<long long>(back.count()));

  std::lock_guard<std::mutex> lock(log.mu);
  for (const std::string &l : log.lines)
    std::printf("[ log      ] %s\n", l.c_str());
  EXPECT_EQ(CountContaining(log.lines, "token outage:"), 1u);
  // 150 store seconds: one line a minute while it lasts.
  EXPECT_EQ(CountContaining(log.lines, "token outage continues"), 2u);
  ASSERT_EQ(CountContaining(log.lines, "token outage over after "), 1u);
  for (const std::string &l : log.lines) {
    const size_t at = l.find("token outage over after ");
    if (at == std::string::npos) continue;
    // 10 s out at 15 store seconds per second, plus the recovery.
    const long duration = std::strtol(l.c_str() + at + 24, nullptr, 10);
    EXPECT_GE(duration, 150);
    EXPECT_LE(duration, 170);
  }
  // Everything else: the fault, the first failed reconnect (each distinct
  // message once), fail-soft in flight, the reconnect. Not one per probe
  // (~10) nor per handshake (hundreds).
  EXPECT_LE(log.lines.size(), 10u);
  EXPECT_GT(during, 100);
}

// Review finding 6: a child forked while its parent's token was failing
// (faulted, disconnected, nothing held) kept failing_ while the prober's
// schedule was dropped at fork: StoreSet skipped the member for the
// child's life and nothing reconnected it. The child must start fresh.
TEST_F(OutageTest, ChildForkedDuringAFaultStartsFreshAndReconnects) {
  auto store = OpenStore("outage");
  ASSERT_NE(store, nullptr);
  auto context = ContextFor(store);
  auto server = ServerCtx(context, TLS1_3_VERSION);
  auto client = NewClientCtx(TLS1_3_VERSION);
  HandshakeResult first = Handshake(client.get(), server.get());
  ASSERT_TRUE(first.ok) << first.error;
  UniqueSslSession ticket = Reoffer(first.session.get());
  ASSERT_TRUE(ticket);
  const auto &token = store->token();
  token->ReportFault(CKR_DEVICE_REMOVED, token->generation());
  ASSERT_TRUE(token->failing());
  ASSERT_NE(token->state(), p11::TokenState::kConnected);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    int code = 0;
    if (token->failing()) code = 2;
    HandshakeResult r =
        Handshake(client.get(), server.get(), Reoffer(ticket.get()).get());
    if (code == 0 && !(r.ok && r.reused)) code = 3;
    if (code == 0 && token->failing()) code = 4;
    _exit(code);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0)
      << "2: the child inherited failing; 3: no resumption; 4: still failing";
}

keystore::StoreOptions ProberOptions(const FakeClock *clock) {
  keystore::StoreOptions options;
  options.clock = clock;
  options.background_maintenance = false;
  return options;  // default token options: prober on, back-off 200..750 ms
}

// Review finding 3: a token that logs in but fails every operation made a
// reconnect loop with no back-off (the connect reset it, the probe ran at
// once, each cycle logged a fault and a connect). Now a fault soon after a
// connect keeps the back-off growing and is logged once a minute.
TEST_F(OutageTest, TokenThatConnectsThenFailsBacksOffAndLogsOnce) {
  auto store = keystore::KeyStore::Open(
      SoftHsm::Get().Uri(kFaultToken, "outage"), ProberOptions(&clock_));
  ASSERT_TRUE(store.ok()) << store.status().message();
  auto context = ContextFor(*store);
  auto server = ServerCtx(context, TLS1_3_VERSION);
  auto client = NewClientCtx(TLS1_3_VERSION);
  ASSERT_TRUE(Handshake(client.get(), server.get()).ok);
  CapturedLog log;
  log::SetSink(Capture, &log);
  SetRules(
      "fail C_FindObjectsInit after 0 always with CKR_DEVICE_ERROR\n"
      "fail C_EncryptInit after 0 always with CKR_DEVICE_ERROR\n"
      "fail C_DecryptInit after 0 always with CKR_DEVICE_ERROR\n");
  const auto token = (*store)->token();
  const uint64_t faults_before = token->Health().faults;
  const auto start = steady_clock::now();
  while (steady_clock::now() - start < std::chrono::seconds(4)) {
    ASSERT_TRUE(Handshake(client.get(), server.get()).ok);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  SetRules("");
  log::SetSink(nullptr, nullptr);
  const uint64_t faults = token->Health().faults - faults_before;
  std::lock_guard<std::mutex> lock(log.mu);
  std::printf("[ flapping ] %llu faults, %zu log lines in 4 s\n",
              static_cast<unsigned long long>(faults), log.lines.size());
  // Back-off 200, 400, 750, 750, ... ms: about 7 cycles in 4 s.
  EXPECT_GE(faults, 2u);
  EXPECT_LE(faults, 10u);
  EXPECT_LE(CountContaining(log.lines, "CKR_DEVICE_ERROR"), 4u);
  EXPECT_LE(CountContaining(log.lines, "connected to token"), 1u);
}

// Review finding 4: the prober held Token::mu_ through a connect, and a
// handshake (Acquire right after a fault), label() and Health() waited for
// it. With C_Login taking 2 s, none of them may wait.
TEST_F(OutageTest, HandshakesDoNotWaitForASlowProbe) {
  auto store = keystore::KeyStore::Open(
      SoftHsm::Get().Uri(kFaultToken, "outage"), ProberOptions(&clock_));
  ASSERT_TRUE(store.ok()) << store.status().message();
  auto context = ContextFor(*store);
  auto server = ServerCtx(context, TLS1_3_VERSION);
  auto client = NewClientCtx(TLS1_3_VERSION);
  ASSERT_TRUE(Handshake(client.get(), server.get()).ok);
  SetRules("delay C_Login 2s\n");
  const auto token = (*store)->token();
  token->ReportFault(CKR_DEVICE_REMOVED, token->generation());
  // The prober starts its (2 s) connect at once; a handshake that took
  // the lock before it would reconnect inline (docs/SECURITY.md).
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  using ms = std::chrono::milliseconds;
  ms worst_handshake{0}, worst_info{0};
  int handshakes = 0;
  const auto start = steady_clock::now();
  while (steady_clock::now() - start < std::chrono::milliseconds(1500)) {
    auto t0 = steady_clock::now();
    ASSERT_TRUE(Handshake(client.get(), server.get()).ok);
    ++handshakes;
    auto t1 = steady_clock::now();
    (void)token->Health();
    (void)token->label();
    (void)token->serial();
    auto t2 = steady_clock::now();
    worst_handshake =
        std::max(worst_handshake, std::chrono::duration_cast<ms>(t1 - t0));
    worst_info = std::max(worst_info, std::chrono::duration_cast<ms>(t2 - t1));
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  SetRules("");
  std::printf("[ slow     ] worst handshake %lld ms, worst Health %lld ms\n",
              static_cast<long long>(worst_handshake.count()),
              static_cast<long long>(worst_info.count()));
  // Not a speed bound: one that waited for the probe would take the rest of
  // its 2 s C_Login (at least 1.9 s); half of that tells the two apart on
  // a loaded sanitizer build (an ASan CI run saw 307 ms with no waiting).
  EXPECT_LT(worst_handshake.count(), 1000);
  EXPECT_LT(worst_info.count(), 1000);
  EXPECT_GE(handshakes, 2) << "handshakes in the 1.5 s the probe held";
  // And it does reconnect.
  const auto deadline = steady_clock::now() + std::chrono::seconds(6);
  while (token->state() != p11::TokenState::kConnected &&
         steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(token->state(), p11::TokenState::kConnected);
}

}  // namespace
}  // namespace hsmstek::testing
