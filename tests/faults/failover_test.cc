// One store on two tokens (docs/TESTING.md, "Token outages and failover"): fo-a
// and fo-b hold the same master, replicated with the CLI ceremony of
// docs/CLI.md (wrap-key generate on B, wrap-key trust on A as the SO, signer
// generate on A, signer trust on B, provision --replicable + export on A,
// import on B); fo-c holds its own master under the same label. Every call goes
// through the faulty module, which removes fo-a under load.
#include <openssl/ssl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/bytes.h"
#include "fault_fixture.h"
#include "keystore/store_set.h"

namespace hsmstek::testing {
namespace {

using std::chrono::steady_clock;

constexpr char kA[] = "fo-a";
constexpr char kB[] = "fo-b";
constexpr char kC[] = "fo-c";
constexpr char kD[] = "fo-d";  // a replica of fo-a, re-provisioned by a test
constexpr char kLabel[] = "fo";

// SoftHSM itself, not the faulty module: the ceremony's export wraps a
// master, which the custody audit of this binary would (rightly) flag.
std::string TargetModule() {
  const char *target = std::getenv("HSMSTEK_FAULTY_TARGET");
  return target != nullptr ? target : "/usr/lib/softhsm/libsofthsm2.so";
}

std::string Direct(const std::string &token, const std::string &object,
                   bool pin) {
  std::string uri = "pkcs11:token=" + token + ";object=" + object +
                    "?module-path=" + TargetModule();
  if (pin) uri += "&pin-source=file:" + SoftHsm::Get().pin_file();
  return uri;
}

// Runs the CLI (against SoftHSM directly, same token directory); returns
// its stdout, failing the test on a non-zero exit.
std::string Cli(const std::string &args) {
  const std::string out = SoftHsm::Get().dir() + "/cli.out";
  const std::string cmd =
      std::string(HSMSTEK_CLI_PATH) + " " + args + " >" + out + " 2>&1";
  const int rc = std::system(cmd.c_str());
  std::ifstream in(out);
  std::string text((std::istreambuf_iterator<char>(in)),
                   std::istreambuf_iterator<char>());
  EXPECT_EQ(rc, 0) << cmd << "\n" << text;
  return text;
}

std::string PrintedId(const std::string &out) {
  const size_t at = out.find("store id:");
  if (at == std::string::npos) return "";
  size_t i = at + 9;
  while (i < out.size() && out[i] == ' ') ++i;
  return out.substr(i, 16);
}

// Creates fo-a, fo-b (replicated master) and fo-c (its own) once.
void EnsureTokens() {
  static bool done = false;
  if (done) return;
  done = true;
  SoftHsm &hsm = SoftHsm::Get();
  for (const char *t : {kA, kB, kC}) hsm.CreateToken(t);
  const std::string dir = hsm.dir();
  {
    std::ofstream so(dir + "/so.pin");
    so << kSoPin << "\n";
  }
  Cli("wrap-key generate '" + Direct(kB, "fo-wrap", true) + "' --out " + dir +
      "/b-wrap.pem");
  Cli("wrap-key trust '" + Direct(kA, "fo-wrap", false) + "' --in " + dir +
      "/b-wrap.pem --so-pin-source file:" + dir + "/so.pin");
  Cli("signer generate '" + Direct(kA, "fo-signer", true) + "' --out " + dir +
      "/a-signer.pem");
  Cli("signer trust '" + Direct(kB, "fo-signer", false) + "' --in " + dir +
      "/a-signer.pem --so-pin-source file:" + dir + "/so.pin");
  const std::string id = PrintedId(
      Cli("provision '" + Direct(kA, kLabel, true) + "' --replicable"));
  ASSERT_EQ(id.size(), 16u);
  Cli("export '" + Direct(kA, kLabel, true) + "' --id " + id +
      " --wrap-key pkcs11:object=fo-wrap --signer pkcs11:object=fo-signer "
      "--out " +
      dir + "/fo.bundle");
  Cli("import '" + Direct(kB, kLabel, true) +
      "' --unwrap-key pkcs11:object=fo-wrap --in " + dir + "/fo.bundle");
  Cli("provision '" + Direct(kC, kLabel, true) + "'");
  // fo-d: a second replica of fo-a's master (same ceremony).
  hsm.CreateToken(kD);
  Cli("wrap-key generate '" + Direct(kD, "fo-wrap-d", true) + "' --out " + dir +
      "/d-wrap.pem");
  Cli("wrap-key trust '" + Direct(kA, "fo-wrap-d", false) + "' --in " + dir +
      "/d-wrap.pem --so-pin-source file:" + dir + "/so.pin");
  Cli("signer trust '" + Direct(kD, "fo-signer", false) + "' --in " + dir +
      "/a-signer.pem --so-pin-source file:" + dir + "/so.pin");
  Cli("export '" + Direct(kA, kLabel, true) + "' --id " + id +
      " --wrap-key pkcs11:object=fo-wrap-d --signer pkcs11:object=fo-signer "
      "--out " +
      dir + "/fo-d.bundle");
  Cli("import '" + Direct(kD, kLabel, true) +
      "' --unwrap-key pkcs11:object=fo-wrap-d --in " + dir + "/fo-d.bundle");
}

void ApplyControlFile() {
  CK_FUNCTION_LIST *list = nullptr;
  EXPECT_EQ(SoftHsm::Get().module()->functions()->C_GetFunctionList(&list),
            static_cast<CK_RV>(CKR_OK));
}

keystore::StoreOptions Options() {
  keystore::StoreOptions options;  // the system clock: masters are real-time
  options.background_maintenance = false;
  return options;
}

class FailoverTest : public FaultTest {
 protected:
  static void SetUpTestSuite() { EnsureTokens(); }

  std::shared_ptr<keystore::StoreSet> OpenSet(const char *first,
                                              const char *second) {
    auto set = keystore::StoreSet::Open(
        {SoftHsm::Get().Uri(first, kLabel), SoftHsm::Get().Uri(second, kLabel)},
        Options());
    EXPECT_TRUE(set.ok()) << set.status().message();
    return set.ok() ? *set : nullptr;
  }
};

TEST_F(FailoverTest, PrimaryRemovedUnderLoadKeepsResuming) {
  auto set = OpenSet(kA, kB);
  ASSERT_TRUE(set);
  ASSERT_TRUE(set->Load().ok());
  auto context = std::make_shared<tls::TicketContext>();
  context->stores = set;
  context->stats = std::make_shared<tls::TicketStats>();
  context->options.prearm = false;
  auto server = ServerCtx(context, TLS1_3_VERSION);

  constexpr int kThreads = 4;
  std::atomic<bool> stop{false};
  std::atomic<bool> a_removed{false};
  std::atomic<int> resumes{0}, resumed{0}, failed{0};
  std::atomic<int> resumes_after_removal{0};
  std::mutex mu;
  std::vector<UniqueSslSession> sealed_by_b;  // guarded by mu
  auto run = [&] {
    auto client = NewClientCtx(TLS1_3_VERSION);
    UniqueSslSession ticket;
    while (!stop.load()) {
      if (!ticket) {
        HandshakeResult r = Handshake(client.get(), server.get());
        if (!r.ok) {
          failed++;
          continue;
        }
        ticket = Reoffer(r.session.get());
        continue;
      }
      const bool removed = a_removed.load();
      HandshakeResult r =
          Handshake(client.get(), server.get(), Reoffer(ticket.get()).get());
      if (!r.ok) {
        failed++;
        continue;
      }
      resumes++;
      resumed += r.reused;
      if (removed) resumes_after_removal++;
      // The renewed ticket (TLS 1.3) is the one to offer next.
      UniqueSslSession next = Reoffer(r.session.get());
      if (removed && r.reused && a_removed.load() && next) {
        std::lock_guard<std::mutex> lock(mu);
        if (sealed_by_b.size() < 16) {
          sealed_by_b.push_back(Reoffer(r.session.get()));
        }
      }
      if (next) ticket = std::move(next);
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(run);
  auto wait_until = [&](auto done) {
    const auto deadline = steady_clock::now() + std::chrono::seconds(30);
    while (!done() && steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return done();
  };
  EXPECT_TRUE(wait_until([&] { return resumes.load() >= 100; }));
  SetRules(std::string("remove token ") + kA + "\n");
  ApplyControlFile();
  a_removed.store(true);
  EXPECT_TRUE(wait_until([&] { return resumes_after_removal.load() >= 300; }));
  EXPECT_TRUE(set->Health(1).active) << "no failover to " << kB;
  a_removed.store(false);
  SetRules("insert\n");
  // Failback once the prober has reconnected fo-a (~1 s).
  EXPECT_TRUE(wait_until([&] { return set->Health(0).active; }));
  const int before_failback_check = resumes.load();
  EXPECT_TRUE(
      wait_until([&] { return resumes.load() >= before_failback_check + 50; }));
  stop.store(true);
  for (std::thread &t : threads) t.join();

  std::printf(
      "[ failover ] %d resumptions, %d resumed (%.1f %%), %d failed "
      "connections, %llu failovers\n",
      resumes.load(), resumed.load(),
      100.0 * resumed.load() / std::max(1, resumes.load()), failed.load(),
      static_cast<unsigned long long>(set->failovers()));
  EXPECT_EQ(failed.load(), 0);
  EXPECT_GE(resumed.load() * 100, resumes.load() * 95);
  EXPECT_GE(set->failovers(), 1u);
  EXPECT_EQ(set->Health(0).failovers, 1u);

  // Tickets sealed on fo-b while fo-a was out open on fo-a after failback.
  ASSERT_TRUE(set->Health(0).active);
  ASSERT_FALSE(sealed_by_b.empty());
  auto client = NewClientCtx(TLS1_3_VERSION);
  for (const UniqueSslSession &s : sealed_by_b) {
    HandshakeResult r =
        Handshake(client.get(), server.get(), Reoffer(s.get()).get());
    EXPECT_TRUE(r.ok) << r.error;
    EXPECT_TRUE(r.reused) << "a ticket sealed on fo-b did not open on fo-a";
  }
  EXPECT_TRUE(set->Health(0).active);
}

TEST_F(FailoverTest, TokenWithDifferentMastersIsRefusedNamingBothCheckValues) {
  // The check values each token computes for its active master.
  auto check_of = [](const char *token) {
    auto store =
        keystore::KeyStore::Open(SoftHsm::Get().Uri(token, kLabel), Options());
    EXPECT_TRUE(store.ok());
    Result<keystore::StoreSnapshot> snap = (*store)->Describe();
    EXPECT_TRUE(snap.ok()) << snap.status().message();
    for (const keystore::MasterInfo &m : snap->masters) {
      if (m.state != keystore::KeyState::kActive) continue;
      auto cv = (*store)->CheckValue(m.id);
      EXPECT_TRUE(cv.ok());
      return HexEncode(ByteSpan(cv->data(), cv->size()));
    }
    ADD_FAILURE() << "no active master in " << token;
    return std::string();
  };
  const std::string a = check_of(kA), c = check_of(kC);
  ASSERT_NE(a, c);
  auto set = OpenSet(kA, kC);
  ASSERT_TRUE(set);
  Status loaded = set->Load();
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.code(), ErrorCode::kFailedPrecondition);
  EXPECT_NE(loaded.message().find(a), std::string::npos) << loaded.message();
  EXPECT_NE(loaded.message().find(c), std::string::npos) << loaded.message();
  EXPECT_NE(loaded.message().find("fo-c"), std::string::npos)
      << loaded.message();
  // The replicated pair loads.
  auto good = OpenSet(kA, kB);
  ASSERT_TRUE(good);
  EXPECT_TRUE(good->Load().ok());
}

// Review finding 1: the first token is the reference even when it cannot
// be reached at load. Before, fo-c (its own master) became the reference,
// verified and active, and stayed so after fo-a came back.
TEST_F(FailoverTest, PrimaryUnreachableAtLoadLeavesAMismatchedSecondaryUnused) {
  SetRules(std::string("remove token ") + kA + "\n");
  ApplyControlFile();
  auto set = OpenSet(kA, kC);
  ASSERT_TRUE(set);
  Status loaded = set->Load();
  EXPECT_FALSE(loaded.ok());
  EXPECT_FALSE(set->Health(1).verified);
  for (int i = 0; i < 20; ++i) {
    EXPECT_NE(set->Active().get(), set->member(1).get());
  }
  SetRules("insert\n");
  ApplyControlFile();
  // fo-a answers again: the background pass reads it and compares fo-c,
  // which it refuses.
  const auto deadline = steady_clock::now() + std::chrono::seconds(10);
  while (steady_clock::now() < deadline &&
         (!set->Health(0).health.up || set->Health(1).verified)) {
    set->VerifyNow();
    (void)set->Active();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  set->VerifyNow();
  EXPECT_TRUE(set->Health(0).health.up);
  EXPECT_FALSE(set->Health(1).verified);
  EXPECT_TRUE(set->Health(0).active);
  EXPECT_EQ(set->Active().get(), set->member(0).get());
}

// Review finding 2: verification is not once-only. fo-d is verified, then
// a master is planted on it (rotate --activate-in 0s, as an attacker with
// its PIN would). Its next reload unpins it at once; the next pass refuses
// it; with fo-a failing it is never chosen. Before, it stayed verified and
// the set failed over to it.
TEST_F(FailoverTest, SecondaryReprovisionedAfterLoadIsRefused) {
  auto set = OpenSet(kA, kD);
  ASSERT_TRUE(set);
  Status loaded = set->Load();
  ASSERT_TRUE(loaded.ok()) << loaded.message();
  ASSERT_TRUE(set->Health(1).verified);
  Cli("rotate '" + Direct(kD, kLabel, true) + "' --activate-in 0s");
  // fo-d's own refresh (every 30 s in a server) picks the new master up.
  ASSERT_TRUE(set->member(1)->Load().ok());
  EXPECT_FALSE(set->Health(1).verified) << "a reloaded member stays pinned";
  set->VerifyNow();
  EXPECT_FALSE(set->Health(1).verified);
  const auto &a = set->member(0)->token();
  a->ReportFault(CKR_DEVICE_REMOVED, a->generation());
  ASSERT_TRUE(a->failing());
  for (int i = 0; i < 20; ++i) {
    EXPECT_NE(set->Active().get(), set->member(1).get());
  }
  EXPECT_FALSE(set->Health(1).active);
}

// A forked child (an nginx worker forked after load) has none of the
// parent's threads and its tokens start a new generation, so every other
// member is unpinned there: its first Active() starts its own
// verification thread, which re-verifies them off the handshake path.
TEST_F(FailoverTest, ForkedChildVerifiesTheOtherTokensInTheBackground) {
  auto set = OpenSet(kA, kB);
  ASSERT_TRUE(set);
  ASSERT_TRUE(set->Load().ok());
  ASSERT_TRUE(set->Health(1).verified);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    (void)set->Active();
    const auto deadline = steady_clock::now() + std::chrono::seconds(5);
    while (!set->Health(1).verified && steady_clock::now() < deadline) {
      (void)set->Active();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    _exit(set->Health(1).verified ? 0 : 2);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "2: fo-b never re-verified in the child";
}

}  // namespace
}  // namespace hsmstek::testing
