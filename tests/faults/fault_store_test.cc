// Key lock-down and per-master loading seen through the fault-injecting
// module: the templates hsmstek sends (trace), the fallback on a token that
// refuses an attribute (`refuse` rule), and how often a store with bad
// objects reloads under traffic.
#include <openssl/ssl.h>

#include <fstream>

#include "common/log.h"
#include "fault_fixture.h"
#include "faulty/testing.h"
#include "keystore/key_attributes.h"
#include "pkcs11/object.h"

namespace hsmstek::testing {
namespace {

// The trace lines of `function` since `mark`, raw ("<pid> C_X CKR_Y ...").
std::vector<std::string> RawTrace(size_t mark_bytes) {
  std::ifstream in(TracePath());
  in.seekg(static_cast<std::streamoff>(mark_bytes));
  std::vector<std::string> out;
  std::string line;
  while (std::getline(in, line)) out.push_back(line);
  return out;
}

size_t TraceBytes() {
  std::ifstream in(TracePath(), std::ios::ate);
  return in ? static_cast<size_t>(in.tellg()) : 0;
}

class LockdownTest : public FaultTest {
 protected:
  static void SetUpTestSuite() { EnsureFaultStore("lockdown-base"); }

  // Provisions a master in store `label` and returns the C_GenerateKey
  // lines of the trace and the store's view of it.
  std::vector<std::string> Provision(const std::string &label) {
    const size_t mark = TraceBytes();
    keystore::StoreOptions options;
    options.background_maintenance = false;
    options.token.read_write = true;
    auto store = keystore::KeyStore::Open(
        SoftHsm::Get().Uri(kFaultToken, label), options);
    EXPECT_TRUE(store.ok());
    if (!store.ok()) return {};
    Result<p11::Session> s = (*store)->token()->Acquire();
    EXPECT_TRUE(s.ok());
    keystore::Policy p;
    p.period_s = kHour;
    p.decrypt_window_s = kDay;
    p.not_before = kStart - kDay;
    p.created_at = p.not_before;
    Result<keystore::StoreId> id = keystore::CreateMaster(*s, label, p);
    EXPECT_TRUE(id.ok()) << id.status().message();
    std::vector<std::string> out;
    for (const std::string &l : RawTrace(mark)) {
      if (l.find(" C_GenerateKey ") != std::string::npos) out.push_back(l);
    }
    return out;
  }
};

TEST_F(LockdownTest, MasterTemplatesCarryBothAttributes) {
  std::vector<std::string> calls = Provision("lockdown-full");
  ASSERT_FALSE(calls.empty());
  // The first attempt asks for both; SoftHSM 2.6 refuses the derive
  // template, and the retry keeps the allowed mechanisms.
  EXPECT_NE(calls.front().find("CKA_DERIVE_TEMPLATE"), std::string::npos)
      << calls.front();
  EXPECT_NE(calls.front().find("CKA_ALLOWED_MECHANISMS"), std::string::npos)
      << calls.front();
  EXPECT_NE(calls.back().find(" CKR_OK "), std::string::npos) << calls.back();
  EXPECT_NE(calls.back().find("CKA_ALLOWED_MECHANISMS"), std::string::npos)
      << calls.back();
}

TEST_F(LockdownTest, FallsBackAndReportsWhereTheTokenRefuses) {
  SetRules("refuse CKA_ALLOWED_MECHANISMS\nrefuse CKA_DERIVE_TEMPLATE\n");
  std::vector<std::string> calls = Provision("lockdown-refused");
  ASSERT_GE(calls.size(), 2u);
  EXPECT_NE(calls.front().find("CKR_ATTRIBUTE_TYPE_INVALID"), std::string::npos)
      << calls.front();
  EXPECT_NE(calls.back().find(" CKR_OK "), std::string::npos) << calls.back();
  EXPECT_EQ(calls.back().find("CKA_ALLOWED_MECHANISMS"), std::string::npos)
      << calls.back();
  auto store = OpenStore("lockdown-refused");
  ASSERT_TRUE(store->Load().ok());
  ASSERT_TRUE(store->KeysForEncrypt().ok());
  Result<keystore::StoreSnapshot> snap = store->Describe();
  ASSERT_TRUE(snap.ok());
  ASSERT_EQ(snap->masters.size(), 1u);
  EXPECT_EQ(snap->masters[0].protections.allowed_mechanisms,
            keystore::Protection::kUnsupported);
  EXPECT_EQ(snap->masters[0].protections.derive_template,
            keystore::Protection::kUnsupported);
  EXPECT_EQ(store->derived_allowed_mechanisms(),
            keystore::Protection::kUnsupported);
}

// An orphan master next to a good one: before, every handshake re-ran the
// whole reload (the load failed); now the orphan is left out once.
TEST_F(LockdownTest, BadObjectsCostNoReloadPerHandshake) {
  EnsureFaultStore("orphans");
  {
    keystore::StoreOptions options;
    options.background_maintenance = false;
    options.token.read_write = true;
    auto admin = keystore::KeyStore::Open(
        SoftHsm::Get().Uri(kFaultToken, "orphans"), options);
    ASSERT_TRUE(admin.ok());
    Result<p11::Session> s = (*admin)->token()->Acquire();
    ASSERT_TRUE(s.ok());
    keystore::StoreId id = {4, 4, 4, 4, 4, 4, 4, 4};
    p11::Template t = keystore::MasterTemplate("orphans", id, false, false);
    CK_MECHANISM gen{CKM_AES_KEY_GEN, nullptr, 0};
    CK_OBJECT_HANDLE h;
    ASSERT_TRUE(
        P11_CALL(*s, C_GenerateKey, s->handle(), &gen, t.data(), t.size(), &h)
            .ok());
  }
  auto context = ContextFor(OpenStore("orphans"));
  // The first load catches the ratchet up (30 links of a master activated
  // a month ago, one search each): once, and not what is counted here.
  ASSERT_TRUE(context->store->Load().ok());
  auto server = ServerCtx(context, TLS1_3_VERSION);
  auto client = NewClientCtx(TLS1_3_VERSION);
  const size_t mark = TraceMark();
  HandshakeResult first = Handshake(client.get(), server.get());
  ASSERT_TRUE(first.ok);
  UniqueSslSession offer = Reoffer(first.session.get());
  int resumed = 0;
  for (int i = 0; i < 100; ++i) {
    HandshakeResult r = Handshake(client.get(), server.get(), offer.get());
    ASSERT_TRUE(r.ok) << r.error;
    resumed += r.reused ? 1 : 0;
    offer = Reoffer(r.session.get());
  }
  EXPECT_EQ(resumed, 100);
  // A reload is one C_FindObjectsInit for masters, one for policies, one
  // for legacy infos: one load, not one per handshake.
  EXPECT_LE(Count(TraceSince(mark), "C_FindObjectsInit"), 3u);
}

// A reload that fails without a reconnect (here every C_FindObjectsInit
// answers CKR_FUNCTION_FAILED) backs off on the store's clock: handshakes
// meanwhile are full, and do not each re-run it.
TEST_F(LockdownTest, AFailedReloadBacksOff) {
  EnsureFaultStore("backoff");
  auto store = OpenStore("backoff");
  auto context = ContextFor(store);
  auto server = ServerCtx(context, TLS1_3_VERSION);
  auto client = NewClientCtx(TLS1_3_VERSION);
  SetRules("fail C_FindObjectsInit after 0 always with CKR_FUNCTION_FAILED\n");
  // Warnings from the handshake path are rate-limited per cause.
  int warnings = 0;
  log::SetSink(
      [](int level, const char *msg, void *arg) {
        // Token trouble is logged as an outage (common/outage_log.h).
        if (level == static_cast<int>(log::Level::kWarning) &&
            std::string_view(msg).find("token outage") !=
                std::string_view::npos) {
          ++*static_cast<int *>(arg);
        }
      },
      &warnings);
  const size_t mark = TraceMark();
  for (int i = 0; i < 100; ++i) {
    HandshakeResult r = Handshake(client.get(), server.get());
    ASSERT_TRUE(r.ok) << r.error;
    EXPECT_FALSE(r.reused);
  }
  log::SetSink(nullptr, nullptr);
  EXPECT_LE(Count(TraceSince(mark), "C_FindObjectsInit"), 2u);
  EXPECT_EQ(warnings, 1);
  // The fault clears and the back-off passes: tickets again.
  SetRules("");
  clock_.Advance(60);
  HandshakeResult r = Handshake(client.get(), server.get());
  ASSERT_TRUE(r.ok);
  EXPECT_FALSE(TicketOfResult(r).empty());
}

// The stale view served during the back-off must not outlive a retire:
// an operator retires a compromised master, then every reload fails (here
// C_FindObjectsInit, without a reconnect). Before, the view loaded before
// the retire kept sealing and resuming under that master for as long as
// the reloads failed.
TEST_F(LockdownTest, RetireTakesEffectWhileReloadsFail) {
  EnsureFaultStore("stale-retire");
  auto store = OpenStore("stale-retire");
  auto context = ContextFor(store);
  auto server = ServerCtx(context, TLS1_3_VERSION);
  auto client = NewClientCtx(TLS1_3_VERSION);
  HandshakeResult first = Handshake(client.get(), server.get());
  ASSERT_TRUE(first.ok) << first.error;
  ASSERT_FALSE(TicketOfResult(first).empty());
  {
    keystore::StoreOptions options;
    options.background_maintenance = false;
    options.token.read_write = true;
    auto admin = keystore::KeyStore::Open(
        SoftHsm::Get().Uri(kFaultToken, "stale-retire"), options);
    ASSERT_TRUE(admin.ok());
    Result<p11::Session> s = (*admin)->token()->Acquire();
    ASSERT_TRUE(s.ok());
    Result<std::vector<keystore::Master>> masters =
        keystore::LoadMasters(*s, "stale-retire");
    ASSERT_TRUE(masters.ok());
    ASSERT_EQ(masters->size(), 1u);
    keystore::Policy retired = (*masters)[0].policy;
    retired.retire_at = clock_.NowUnix();
    ASSERT_TRUE(
        keystore::UpdatePolicy(*s, (*masters)[0], "stale-retire", retired)
            .ok());
  }
  SetRules("fail C_FindObjectsInit after 0 always with CKR_FUNCTION_FAILED\n");
  clock_.Advance(kHour);
  UniqueSslSession offer = Reoffer(first.session.get());
  for (int i = 0; i < 20; ++i) {
    clock_.Advance(60);
    HandshakeResult r = Handshake(client.get(), server.get(), offer.get());
    ASSERT_TRUE(r.ok) << r.error;
    EXPECT_FALSE(r.reused) << "handshake " << i;
    EXPECT_TRUE(TicketOfResult(r).empty()) << "handshake " << i;
  }
}

// Opaque names (version 2): a ticket name that is not in the name table is
// refused with no token call at all, neither a derivation nor an HMAC; a
// version-1 name of our own master likewise. Only the trace can show it.
TEST_F(LockdownTest, UnknownNamesCostNoTokenCall) {
  EnsureFaultStore("names");
  std::shared_ptr<keystore::KeyStore> store = OpenStore("names");
  ASSERT_TRUE(store->Load().ok());
  Result<keystore::TicketKeys> current = store->KeysForEncrypt();
  ASSERT_TRUE(current.ok()) << current.status().message();
  Result<keystore::StoreSnapshot> snap = store->Describe();
  ASSERT_TRUE(snap.ok() && !snap->masters.empty());
  const keystore::StoreId id = snap->masters[0].id;
  const uint64_t n = keystore::EpochAt(clock_.NowUnix(), kHour);
  keystore::KeyName forged = current->name;
  forged.bytes[15] ^= 1;  // one bit away from a real name
  const size_t mark = TraceMark();
  for (const keystore::KeyName &name : {forged, keystore::MakeKeyName(id, n),
                                        keystore::MakeKeyName(id, n - 1)}) {
    EXPECT_EQ(store->KeysForDecrypt(name).verdict,
              keystore::DecryptVerdict::kUnknownKey);
  }
  const std::vector<TraceCall> calls = TraceSince(mark);
  EXPECT_EQ(Count(calls, "C_DeriveKey"), 0u);
  EXPECT_EQ(Count(calls, "C_Sign"), 0u);
  EXPECT_EQ(Count(calls, "C_SignInit"), 0u);
  EXPECT_TRUE(calls.empty())
      << calls.size() << " calls, first " << calls.front().function;
  // The real name is known, and costs no derivation either (cached).
  const size_t known = TraceMark();
  EXPECT_EQ(store->KeysForDecrypt(current->name).verdict,
            keystore::DecryptVerdict::kCurrent);
  EXPECT_EQ(Count(TraceSince(known), "C_DeriveKey"), 0u);
}

}  // namespace
}  // namespace hsmstek::testing
