// libhsmstek_faulty.so against a real SoftHSM token: pass-through, fault
// rules, token removal, audit log and stats.

#include <dlfcn.h>
#include <gmock/gmock.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <thread>

#include "faulty/testing.h"
#include "faulty_fixture.h"
#include "names.h"

namespace hsmstek::faulty::test {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string Rv(CK_RV rv) { return RvName(rv); }

bool Contains(const std::vector<CK_SLOT_ID> &v, CK_SLOT_ID id) {
  return std::find(v.begin(), v.end(), id) != v.end();
}

std::vector<CK_SLOT_ID> SlotList(CK_FUNCTION_LIST *f, bool present) {
  CK_ULONG n = 0;
  EXPECT_EQ(Rv(f->C_GetSlotList(present, nullptr, &n)), "CKR_OK");
  std::vector<CK_SLOT_ID> slots(n);
  EXPECT_EQ(Rv(f->C_GetSlotList(present, slots.data(), &n)), "CKR_OK");
  slots.resize(n);
  return slots;
}

// ---------------------------------------------------------------------------
// Module shape

TEST(FaultyModule, ExportsOnlyGetFunctionList) {
  void *dl = dlopen(HSMSTEK_FAULTY_MODULE, RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(dl, nullptr) << dlerror();
  EXPECT_NE(dlsym(dl, "C_GetFunctionList"), nullptr);
  EXPECT_EQ(dlsym(dl, "C_Initialize"), nullptr);
  EXPECT_EQ(dlsym(dl, "C_Sign"), nullptr);
  CK_FUNCTION_LIST *fl = Functions();
  ASSERT_NE(fl, nullptr);
  EXPECT_EQ(fl->version.major, 2);
  EXPECT_EQ(fl->version.minor, 40);
  // Every one of the 68 entries is filled in.
  static_assert(sizeof(CK_FUNCTION_LIST) ==
                offsetof(CK_FUNCTION_LIST, C_Initialize) +
                    kFnCount * sizeof(CK_C_Initialize));
  const char *entries = reinterpret_cast<const char *>(fl) +
                        offsetof(CK_FUNCTION_LIST, C_Initialize);
  for (std::size_t i = 0; i < kFnCount; ++i) {
    void *entry = nullptr;
    std::memcpy(&entry, entries + i * sizeof(CK_C_Initialize), sizeof(entry));
    EXPECT_NE(entry, nullptr) << FnName(static_cast<Fn>(i));
  }
  dlclose(dl);
}

// ---------------------------------------------------------------------------
// Pass-through

TEST_F(FaultyTest, PassThroughAesAndHmacWork) {
  CK_OBJECT_HANDLE aes = GenerateAes(session_, "aes");
  CK_OBJECT_HANDLE hmac = GenerateHmac(session_, "hmac");
  EXPECT_EQ(Rv(EncryptDecrypt(session_, aes)), "CKR_OK");
  EXPECT_EQ(Rv(SignOnce(session_, hmac)), "CKR_OK");

  CK_MECHANISM mech = {CKM_SHA256_HMAC, nullptr, 0};
  unsigned char data[] = "data";
  unsigned char mac[32];
  CK_ULONG mac_len = sizeof(mac);
  ASSERT_EQ(Rv(f_->C_SignInit(session_, &mech, hmac)), "CKR_OK");
  ASSERT_EQ(Rv(f_->C_Sign(session_, data, 4, mac, &mac_len)), "CKR_OK");
  ASSERT_EQ(Rv(f_->C_VerifyInit(session_, &mech, hmac)), "CKR_OK");
  EXPECT_EQ(Rv(f_->C_Verify(session_, data, 4, mac, mac_len)), "CKR_OK");
  mac[0] ^= 1;
  ASSERT_EQ(Rv(f_->C_VerifyInit(session_, &mech, hmac)), "CKR_OK");
  EXPECT_EQ(Rv(f_->C_Verify(session_, data, 4, mac, mac_len)),
            "CKR_SIGNATURE_INVALID");

  // Handles found again are the same handles the caller was given.
  std::vector<CK_OBJECT_HANDLE> found = FindByLabel(session_, "aes");
  ASSERT_EQ(found.size(), 1u);
  EXPECT_EQ(found[0], aes);

  EXPECT_EQ(CountCalls(trace(), "C_Sign"), 2u);
  EXPECT_EQ(CountCalls(trace(), "C_Verify", "CKR_SIGNATURE_INVALID"), 1u);
  EXPECT_EQ(CountCalls(trace(), "C_GenerateKey", "CKR_OK"), 2u);
  EXPECT_EQ(CountInjected(trace(), "C_Sign"), 0u);
  EXPECT_TRUE(AuditViolations(audit()).empty());
}

TEST_F(FaultyTest, ObjectHandlesAreRemappedFromTheTargets) {
  // The caller never sees SoftHSM's small handles: a salt sits in the high
  // bits, so code that truncates handles fails here too.
  CK_OBJECT_HANDLE aes = GenerateAes(session_, "aes");
  EXPECT_NE(aes >> 32, 0u) << std::hex << aes;
  EXPECT_EQ(Rv(EncryptDecrypt(session_, aes)), "CKR_OK");
  EXPECT_EQ(Rv(EncryptDecrypt(session_, aes & 0xffffffffUL)),
            "CKR_OBJECT_HANDLE_INVALID");
}

TEST_F(FaultyTest, StatsFileCountsCallsAtFinalize) {
  SetRules("fail C_GenerateRandom after 2 times 1 with CKR_DEVICE_ERROR\n");
  unsigned char buf[8];
  EXPECT_EQ(Rv(f_->C_GenerateRandom(session_, buf, 8)), "CKR_OK");
  EXPECT_EQ(Rv(f_->C_GenerateRandom(session_, buf, 8)), "CKR_OK");
  EXPECT_EQ(Rv(f_->C_GenerateRandom(session_, buf, 8)), "CKR_DEVICE_ERROR");
  ASSERT_EQ(Rv(Finalize()), "CKR_OK");
  std::string stats = ReadFile(Path("stats"));
  EXPECT_THAT(stats, HasSubstr("C_GenerateRandom calls=3 injected=1\n"));
  EXPECT_THAT(stats, HasSubstr("C_Initialize calls=1 injected=0\n"));
  EXPECT_THAT(stats, HasSubstr("C_Finalize calls=1 injected=0\n"));
}

// ---------------------------------------------------------------------------
// Fault rules

TEST_F(FaultyTest, FailAfterNTimesMFiresExactlyOnce) {
  CK_OBJECT_HANDLE hmac = GenerateHmac(session_, "hmac");
  SetRules("fail C_Sign after 2 times 1 with CKR_DEVICE_ERROR\n");
  EXPECT_EQ(Rv(SignOnce(session_, hmac)), "CKR_OK");
  EXPECT_EQ(Rv(SignOnce(session_, hmac)), "CKR_OK");
  EXPECT_EQ(Rv(SignOnce(session_, hmac)), "CKR_DEVICE_ERROR");
  // The failed C_Sign ended the operation, as on a real token: the next
  // C_SignInit is not refused with CKR_OPERATION_ACTIVE.
  EXPECT_EQ(Rv(SignOnce(session_, hmac)), "CKR_OK");
  EXPECT_EQ(Rv(SignOnce(session_, hmac)), "CKR_OK");
  EXPECT_EQ(CountCalls(trace(), "C_Sign"), 5u);
  EXPECT_EQ(CountCalls(trace(), "C_Sign", "CKR_DEVICE_ERROR"), 1u);
  EXPECT_EQ(CountInjected(trace(), "C_Sign"), 1u);
  EXPECT_EQ(CountCalls(trace(), "C_SignInit", "CKR_OK"), 5u);
}

TEST_F(FaultyTest, FailTimesMFiresMTimes) {
  SetRules("fail C_GenerateRandom after 1 times 3 with 0x80000001\n");
  unsigned char buf[8];
  std::vector<std::string> got;
  for (int i = 0; i < 6; ++i) {
    got.push_back(Rv(f_->C_GenerateRandom(session_, buf, sizeof(buf))));
  }
  EXPECT_EQ(got, (std::vector<std::string>{"CKR_OK", "0x80000001", "0x80000001",
                                           "0x80000001", "CKR_OK", "CKR_OK"}));
}

TEST_F(FaultyTest, FailAlwaysUntilRulesChange) {
  CK_OBJECT_HANDLE aes = GenerateAes(session_, "aes");
  SetRules("fail C_EncryptInit after 1 always with CKR_DEVICE_ERROR\n");
  EXPECT_EQ(Rv(EncryptDecrypt(session_, aes)), "CKR_OK");
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(Rv(EncryptDecrypt(session_, aes)), "CKR_DEVICE_ERROR");
  }
  // Other functions are untouched.
  unsigned char buf[8];
  EXPECT_EQ(Rv(f_->C_GenerateRandom(session_, buf, sizeof(buf))), "CKR_OK");
  // New rules (here: none) restart from a clean state.
  SetRules("");
  EXPECT_EQ(Rv(EncryptDecrypt(session_, aes)), "CKR_OK");
  EXPECT_EQ(CountInjected(trace(), "C_EncryptInit"), 3u);
}

TEST_F(FaultyTest, ReloadRestartsCounters) {
  // Two different rule files of equal size written back to back: the module
  // compares content, so the second one is seen although stat may match.
  SetRules("fail C_GenerateRandom after 0 always with CKR_DEVICE_ERROR\n");
  unsigned char buf[8];
  EXPECT_EQ(Rv(f_->C_GenerateRandom(session_, buf, 8)), "CKR_DEVICE_ERROR");
  SetRules("fail C_GenerateRandom after 1 always with CKR_DEVICE_ERROR\n");
  EXPECT_EQ(Rv(f_->C_GenerateRandom(session_, buf, 8)), "CKR_OK");
  EXPECT_EQ(Rv(f_->C_GenerateRandom(session_, buf, 8)), "CKR_DEVICE_ERROR");
}

TEST_F(FaultyTest, StarCountsCallsOfEveryFunction) {
  SetRules("fail * after 2 times 2 with CKR_GENERAL_ERROR\n");
  unsigned char buf[8];
  CK_SESSION_INFO info;
  EXPECT_EQ(Rv(f_->C_GenerateRandom(session_, buf, 8)), "CKR_OK");
  EXPECT_EQ(Rv(f_->C_GetSessionInfo(session_, &info)), "CKR_OK");
  EXPECT_EQ(Rv(f_->C_GetSessionInfo(session_, &info)), "CKR_GENERAL_ERROR");
  EXPECT_EQ(Rv(f_->C_GenerateRandom(session_, buf, 8)), "CKR_GENERAL_ERROR");
  EXPECT_EQ(Rv(f_->C_GenerateRandom(session_, buf, 8)), "CKR_OK");
  // `*` never matches C_Finalize (TearDown relies on it) nor C_Initialize.
  SetRules("fail * after 0 always with CKR_DEVICE_ERROR\n");
  EXPECT_EQ(Rv(f_->C_GenerateRandom(session_, buf, 8)), "CKR_DEVICE_ERROR");
  EXPECT_EQ(Rv(Finalize()), "CKR_OK");
  EXPECT_EQ(Rv(Initialize()), "CKR_OK");
}

TEST_F(FaultyTest, FirstMatchingRuleWinsAndAllCount) {
  SetRules(
      "fail C_GenerateRandom after 0 times 1 with CKR_DEVICE_ERROR\n"
      "fail C_GenerateRandom after 0 times 2 with CKR_DEVICE_MEMORY\n");
  unsigned char buf[8];
  EXPECT_EQ(Rv(f_->C_GenerateRandom(session_, buf, 8)), "CKR_DEVICE_ERROR");
  EXPECT_EQ(Rv(f_->C_GenerateRandom(session_, buf, 8)), "CKR_DEVICE_MEMORY");
  EXPECT_EQ(Rv(f_->C_GenerateRandom(session_, buf, 8)), "CKR_OK");
}

TEST_F(FaultyTest, InjectedSessionHandleInvalidClosesTheSession) {
  CK_OBJECT_HANDLE hmac = GenerateHmac(session_, "hmac");
  SetRules("fail C_Sign after 0 times 1 with CKR_SESSION_HANDLE_INVALID\n");
  EXPECT_EQ(Rv(SignOnce(session_, hmac)), "CKR_SESSION_HANDLE_INVALID");
  // A real token does not take a dead handle back.
  CK_SESSION_INFO info;
  EXPECT_EQ(Rv(f_->C_GetSessionInfo(session_, &info)),
            "CKR_SESSION_HANDLE_INVALID");
  EXPECT_EQ(Rv(f_->C_CloseSession(session_)), "CKR_SESSION_HANDLE_INVALID");
  // The session key died with its session; a new session works.
  CK_SESSION_HANDLE s2 = OpenUserSession(slot_);
  EXPECT_NE(s2, session_);
  EXPECT_TRUE(FindByLabel(s2, "hmac").empty());
  EXPECT_EQ(Rv(SignOnce(s2, GenerateHmac(s2, "hmac2"))), "CKR_OK");
}

TEST_F(FaultyTest, InjectedUpdateFailureEndsTheOperation) {
  CK_OBJECT_HANDLE aes = GenerateAes(session_, "aes");
  SetRules("fail C_EncryptUpdate after 0 times 1 with CKR_DEVICE_ERROR\n");
  unsigned char iv[16] = {};
  CK_MECHANISM mech = {CKM_AES_CBC_PAD, iv, sizeof(iv)};
  unsigned char in[20] = {};
  unsigned char out[64];
  CK_ULONG out_len = sizeof(out);
  ASSERT_EQ(Rv(f_->C_EncryptInit(session_, &mech, aes)), "CKR_OK");
  EXPECT_EQ(Rv(f_->C_EncryptUpdate(session_, in, sizeof(in), out, &out_len)),
            "CKR_DEVICE_ERROR");
  EXPECT_EQ(Rv(f_->C_EncryptFinal(session_, out, &out_len)),
            "CKR_OPERATION_NOT_INITIALIZED");
  EXPECT_EQ(Rv(EncryptDecrypt(session_, aes)), "CKR_OK");
}

TEST_F(FaultyTest, InjectedBufferTooSmallKeepsTheOperation) {
  CK_OBJECT_HANDLE aes = GenerateAes(session_, "aes");
  SetRules("fail C_Encrypt after 0 times 1 with CKR_BUFFER_TOO_SMALL\n");
  unsigned char iv[16] = {};
  CK_MECHANISM mech = {CKM_AES_CBC_PAD, iv, sizeof(iv)};
  unsigned char in[20] = {};
  unsigned char out[64];
  CK_ULONG out_len = sizeof(out);
  ASSERT_EQ(Rv(f_->C_EncryptInit(session_, &mech, aes)), "CKR_OK");
  EXPECT_EQ(Rv(f_->C_Encrypt(session_, in, sizeof(in), out, &out_len)),
            "CKR_BUFFER_TOO_SMALL");
  out_len = sizeof(out);
  EXPECT_EQ(Rv(f_->C_Encrypt(session_, in, sizeof(in), out, &out_len)),
            "CKR_OK");
  EXPECT_EQ(out_len, 32u);
}

TEST_F(FaultyTest, DelayedCallStillSucceeds) {
  CK_OBJECT_HANDLE hmac = GenerateHmac(session_, "hmac");
  SetRules("delay C_Sign 5ms\ndelay * 100us\n");
  EXPECT_EQ(Rv(SignOnce(session_, hmac)), "CKR_OK");
  EXPECT_EQ(CountCalls(trace(), "C_Sign", "CKR_OK"), 1u);
}

TEST_F(FaultyTest, InitializeCanFail) {
  ASSERT_EQ(Rv(Finalize()), "CKR_OK");
  SetRules("fail C_Initialize after 0 times 1 with CKR_DEVICE_ERROR\n");
  EXPECT_EQ(Rv(Initialize()), "CKR_DEVICE_ERROR");
  EXPECT_EQ(Rv(Initialize()), "CKR_OK");
  EXPECT_EQ(Rv(f_->C_Initialize(nullptr)), "CKR_CRYPTOKI_ALREADY_INITIALIZED");
}

TEST_F(FaultyTest, BadControlFileFailsEveryCallUntilFixed) {
  unsigned char buf[8];
  {
    std::ofstream out(Path("control.new"));
    out << "# a typo must not pass silently\n"
        << "fail C_Sign after x with CKR_DEVICE_ERROR\n";
  }
  ASSERT_EQ(std::rename(Path("control.new").c_str(), Path("control").c_str()),
            0);
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(Rv(f_->C_GenerateRandom(session_, buf, 8)), "CKR_GENERAL_ERROR");
  EXPECT_EQ(Rv(f_->C_GenerateRandom(session_, buf, 8)), "CKR_GENERAL_ERROR");
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_THAT(err, HasSubstr("line 2: bad count 'x' after 'after'"));
  // Reported once, not once per call.
  EXPECT_EQ(err.find("line 2"), err.rfind("line 2"));
  SetRules("");
  EXPECT_EQ(Rv(f_->C_GenerateRandom(session_, buf, 8)), "CKR_OK");
}

TEST_F(FaultyTest, ConcurrentCallsCountExactly) {
  CK_OBJECT_HANDLE hmac = GenerateHmac(session_, "hmac");
  SetRules("fail C_Sign after 20 times 10 with CKR_DEVICE_ERROR\n");
  constexpr int kThreads = 4;
  constexpr int kCalls = 25;
  std::vector<CK_SESSION_HANDLE> sessions;
  for (int i = 0; i < kThreads; ++i) sessions.push_back(OpenUserSession(slot_));
  std::vector<int> failures(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kCalls; ++i) {
        if (SignOnce(sessions[t], hmac) == CKR_DEVICE_ERROR) ++failures[t];
      }
    });
  }
  for (std::thread &t : threads) t.join();
  int total = 0;
  for (int n : failures) total += n;
  EXPECT_EQ(total, 10);
  EXPECT_EQ(CountCalls(trace(), "C_Sign"),
            static_cast<std::size_t>(kThreads * kCalls));
}

// ---------------------------------------------------------------------------
// Token removal

TEST_F(FaultyTest, RemovedTokenRefusesEverythingAndKillsSessions) {
  CK_OBJECT_HANDLE token_key = GenerateAes(session_, "token-key", true);
  CK_SESSION_HANDLE other = OpenUserSession(slot_);
  SetRules("remove\n");

  EXPECT_EQ(Rv(EncryptDecrypt(session_, token_key)), "CKR_DEVICE_REMOVED");
  CK_SESSION_INFO sinfo;
  EXPECT_EQ(Rv(f_->C_GetSessionInfo(session_, &sinfo)), "CKR_DEVICE_REMOVED");
  CK_SESSION_HANDLE s = 0;
  EXPECT_EQ(
      Rv(f_->C_OpenSession(slot_, CKF_SERIAL_SESSION, nullptr, nullptr, &s)),
      "CKR_TOKEN_NOT_PRESENT");
  CK_TOKEN_INFO tinfo;
  EXPECT_EQ(Rv(f_->C_GetTokenInfo(slot_, &tinfo)), "CKR_TOKEN_NOT_PRESENT");
  CK_ULONG n = 0;
  EXPECT_EQ(Rv(f_->C_GetMechanismList(slot_, nullptr, &n)),
            "CKR_TOKEN_NOT_PRESENT");
  EXPECT_FALSE(Contains(SlotList(f_, true), slot_));
  EXPECT_TRUE(Contains(SlotList(f_, false), slot_));
  CK_SLOT_INFO slot_info;
  ASSERT_EQ(Rv(f_->C_GetSlotInfo(slot_, &slot_info)), "CKR_OK");
  EXPECT_EQ(slot_info.flags & CKF_TOKEN_PRESENT, 0u);
  // Closing a session the token took with it succeeds once.
  EXPECT_EQ(Rv(f_->C_CloseSession(other)), "CKR_OK");
  EXPECT_EQ(Rv(f_->C_CloseSession(other)), "CKR_SESSION_HANDLE_INVALID");
}

TEST_F(FaultyTest, ReinsertedTokenWorksButOldHandlesFail) {
  CK_OBJECT_HANDLE token_key = GenerateAes(session_, "token-key", true);
  GenerateAes(session_, "session-key", false);
  // Public token objects too: every handle from before the removal is gone.
  Attrs data;
  data.Ulong(CKA_CLASS, CKO_DATA)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, false)
      .Bytes(CKA_LABEL, "public-data");
  CK_OBJECT_HANDLE public_obj = CK_INVALID_HANDLE;
  ASSERT_EQ(
      Rv(f_->C_CreateObject(session_, data.data(), data.size(), &public_obj)),
      "CKR_OK");
  SetRules("remove\n");
  EXPECT_EQ(Rv(EncryptDecrypt(session_, token_key)), "CKR_DEVICE_REMOVED");
  SetRules("insert\n");

  EXPECT_TRUE(Contains(SlotList(f_, true), slot_));
  // Old sessions stay dead.
  CK_SESSION_INFO sinfo;
  EXPECT_EQ(Rv(f_->C_GetSessionInfo(session_, &sinfo)),
            "CKR_SESSION_HANDLE_INVALID");
  EXPECT_EQ(Rv(EncryptDecrypt(session_, token_key)),
            "CKR_SESSION_HANDLE_INVALID");
  // A new session must log in again and find its objects again: the old
  // handle of the token key names nothing now.
  CK_SESSION_HANDLE s = OpenUserSession(slot_);
  EXPECT_EQ(Rv(EncryptDecrypt(s, token_key)), "CKR_OBJECT_HANDLE_INVALID");
  std::vector<CK_OBJECT_HANDLE> found = FindByLabel(s, "token-key");
  ASSERT_EQ(found.size(), 1u);
  EXPECT_NE(found[0], token_key);
  EXPECT_EQ(Rv(EncryptDecrypt(s, found[0])), "CKR_OK");
  // Session objects vanished with their session.
  EXPECT_TRUE(FindByLabel(s, "session-key").empty());
  CK_ULONG size = 0;
  EXPECT_EQ(Rv(f_->C_GetObjectSize(s, public_obj, &size)),
            "CKR_OBJECT_HANDLE_INVALID");
  found = FindByLabel(s, "public-data");
  ASSERT_EQ(found.size(), 1u);
  EXPECT_EQ(Rv(f_->C_GetObjectSize(s, found[0], &size)), "CKR_OK");
}

TEST_F(FaultyTest, RemoveByTokenLabelOrSlotLeavesOtherTokens) {
  CK_SLOT_ID second = InitToken("second");
  CK_SESSION_HANDLE s2 = OpenUserSession(second);
  CK_OBJECT_HANDLE k1 = GenerateAes(session_, "k1");
  CK_OBJECT_HANDLE k2 = GenerateAes(s2, "k2");

  SetRules("remove token second\n");
  EXPECT_EQ(Rv(EncryptDecrypt(session_, k1)), "CKR_OK");
  EXPECT_EQ(Rv(EncryptDecrypt(s2, k2)), "CKR_DEVICE_REMOVED");
  std::vector<CK_SLOT_ID> present = SlotList(f_, true);
  EXPECT_TRUE(Contains(present, slot_));
  EXPECT_FALSE(Contains(present, second));

  SetRules("remove slot " + std::to_string(slot_) + "\n");
  EXPECT_EQ(Rv(EncryptDecrypt(session_, k1)), "CKR_DEVICE_REMOVED");
  // `second` is back; its old session is not.
  EXPECT_EQ(Rv(EncryptDecrypt(s2, k2)), "CKR_SESSION_HANDLE_INVALID");
  CK_SESSION_HANDLE s3 = OpenUserSession(second);
  EXPECT_EQ(Rv(EncryptDecrypt(s3, GenerateAes(s3, "k3"))), "CKR_OK");
}

// ---------------------------------------------------------------------------
// Audit

// The §4 master key: derive only, token, sensitive, never extractable.
CK_OBJECT_HANDLE GenerateMaster(CK_FUNCTION_LIST *f, CK_SESSION_HANDLE s) {
  Attrs a = SecretKeyTemplate(CKK_AES, "master", true, {CKA_DERIVE});
  a.Ulong(CKA_VALUE_LEN, 32).Bytes(CKA_ID, "12345678");
  CK_MECHANISM mech = {CKM_AES_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  EXPECT_EQ(Rv(f->C_GenerateKey(s, &mech, a.data(), a.size(), &key)), "CKR_OK");
  return key;
}

CK_RV Derive(CK_FUNCTION_LIST *f, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE base,
             Attrs &tmpl, CK_OBJECT_HANDLE *out) {
  unsigned char data[32] = {'h', 's', 't', 'k', 'E', 1};
  CK_KEY_DERIVATION_STRING_DATA param = {data, sizeof(data)};
  CK_MECHANISM mech = {CKM_AES_ECB_ENCRYPT_DATA, &param, sizeof(param)};
  return f->C_DeriveKey(s, &mech, base, tmpl.data(), tmpl.size(), out);
}

Attrs DerivedTemplate(CK_KEY_TYPE type, std::vector<CK_ATTRIBUTE_TYPE> usage) {
  Attrs a = SecretKeyTemplate(type, "derived", false, std::move(usage));
  a.Ulong(CKA_VALUE_LEN, 32);
  return a;
}

TEST_F(FaultyTest, AuditCompliantSequenceLogsNothing) {
  CK_OBJECT_HANDLE master = GenerateMaster(f_, session_);
  Attrs enc = DerivedTemplate(CKK_AES, {CKA_ENCRYPT, CKA_DECRYPT});
  Attrs mac = DerivedTemplate(CKK_GENERIC_SECRET, {CKA_SIGN, CKA_VERIFY});
  CK_OBJECT_HANDLE enc_key = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE mac_key = CK_INVALID_HANDLE;
  ASSERT_EQ(Rv(Derive(f_, session_, master, enc, &enc_key)), "CKR_OK");
  ASSERT_EQ(Rv(Derive(f_, session_, master, mac, &mac_key)), "CKR_OK");
  EXPECT_EQ(Rv(EncryptDecrypt(session_, enc_key)), "CKR_OK");
  EXPECT_EQ(Rv(SignOnce(session_, mac_key)), "CKR_OK");

  // Reading boolean attributes back is how hsmstek checks key strength.
  CK_BBOOL sensitive = CK_FALSE;
  CK_ATTRIBUTE attr = {CKA_SENSITIVE, &sensitive, sizeof(sensitive)};
  EXPECT_EQ(Rv(f_->C_GetAttributeValue(session_, master, &attr, 1)), "CKR_OK");
  EXPECT_EQ(sensitive, CK_TRUE);

  // Legacy import: the key value passes once, into a sensitive,
  // non-extractable, decrypt-only object.
  Attrs legacy = SecretKeyTemplate(CKK_AES, "legacy", true, {CKA_DECRYPT});
  legacy.Bytes(CKA_VALUE, std::string(32, '\x5a'))
      .Bytes(CKA_ID, std::string(16, '\x01'));
  CK_OBJECT_HANDLE legacy_key = CK_INVALID_HANDLE;
  EXPECT_EQ(Rv(f_->C_CreateObject(session_, legacy.data(), legacy.size(),
                                  &legacy_key)),
            "CKR_OK");

  // The policy is a data object; reading its value is fine.
  Attrs policy;
  policy.Ulong(CKA_CLASS, CKO_DATA)
      .Bool(CKA_TOKEN, true)
      .Bytes(CKA_APPLICATION, "hsmstek")
      .Bytes(CKA_LABEL, "master")
      .Bytes(CKA_VALUE, "v1 period=86400");
  CK_OBJECT_HANDLE policy_obj = CK_INVALID_HANDLE;
  ASSERT_EQ(Rv(f_->C_CreateObject(session_, policy.data(), policy.size(),
                                  &policy_obj)),
            "CKR_OK");
  char value[64];
  CK_ATTRIBUTE v = {CKA_VALUE, value, sizeof(value)};
  EXPECT_EQ(Rv(f_->C_GetAttributeValue(session_, policy_obj, &v, 1)), "CKR_OK");

  ASSERT_EQ(Rv(Finalize()), "CKR_OK");
  EXPECT_TRUE(AuditViolations(audit()).empty());
  EXPECT_EQ(ReadFile(audit()), "");  // not even a summary line
}

TEST_F(FaultyTest, AuditLogsExtractableAndNonSensitiveKeys) {
  Attrs weak;
  weak.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_AES)
      .Ulong(CKA_VALUE_LEN, 32)
      .Bytes(CKA_LABEL, "exportable")
      .Bool(CKA_EXTRACTABLE, true)
      .Bool(CKA_ENCRYPT, true);
  CK_MECHANISM mech = {CKM_AES_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  ASSERT_EQ(
      Rv(f_->C_GenerateKey(session_, &mech, weak.data(), weak.size(), &key)),
      "CKR_OK");
  std::vector<std::string> v = AuditViolations(audit());
  ASSERT_EQ(v.size(), 1u);
  EXPECT_THAT(v[0], HasSubstr("weak-key C_GenerateKey pid="));
  EXPECT_THAT(v[0], HasSubstr("class=CKO_SECRET_KEY label=\"exportable\""));
  EXPECT_THAT(v[0], HasSubstr("template:sensitive-missing"));
  EXPECT_THAT(v[0], HasSubstr("template:extractable-true"));
  EXPECT_THAT(v[0], HasSubstr("object:extractable-true"));

  // Making an existing key weaker is caught too.
  CK_OBJECT_HANDLE good = GenerateAes(session_, "good");
  CK_BBOOL no = CK_FALSE;
  CK_ATTRIBUTE set = {CKA_SENSITIVE, &no, sizeof(no)};
  EXPECT_EQ(Rv(f_->C_SetAttributeValue(session_, good, &set, 1)),
            "CKR_ATTRIBUTE_READ_ONLY");
  v = AuditViolations(audit());
  ASSERT_EQ(v.size(), 2u);
  EXPECT_THAT(v[1], HasSubstr("weak-key C_SetAttributeValue pid="));
  EXPECT_THAT(v[1],
              HasSubstr("label=\"good\" problems=template:sensitive-false"));

  // An extractable key under a trusted wrapping key is the one exception.
  Attrs r;
  r.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_AES)
      .Ulong(CKA_VALUE_LEN, 32)
      .Bytes(CKA_LABEL, "replicable")
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, true)
      .Bool(CKA_WRAP_WITH_TRUSTED, true)
      .Bool(CKA_DERIVE, true);
  ASSERT_EQ(Rv(f_->C_GenerateKey(session_, &mech, r.data(), r.size(), &key)),
            "CKR_OK");
  EXPECT_EQ(AuditViolations(audit()).size(), 2u);

  ASSERT_EQ(Rv(Finalize()), "CKR_OK");
  EXPECT_THAT(ReadFile(audit()),
              HasSubstr(" violations=2 read-value=0 weak-key=2 wrap=0 "
                        "derive-usage=0\n"));
}

TEST_F(FaultyTest, AuditLogsReadingASecretValue) {
  CK_OBJECT_HANDLE key = GenerateAes(session_, "ticket-key");
  unsigned char value[32];
  CK_ATTRIBUTE attr = {CKA_VALUE, value, sizeof(value)};
  // SoftHSM refuses, but asking is the violation.
  EXPECT_EQ(Rv(f_->C_GetAttributeValue(session_, key, &attr, 1)),
            "CKR_ATTRIBUTE_SENSITIVE");
  std::vector<std::string> v = AuditViolations(audit());
  ASSERT_EQ(v.size(), 1u);
  EXPECT_THAT(v[0], HasSubstr("read-value C_GetAttributeValue pid="));
  EXPECT_THAT(v[0], HasSubstr("class=CKO_SECRET_KEY label=\"ticket-key\""));
}

TEST_F(FaultyTest, AuditLogsEveryWrap) {
  CK_OBJECT_HANDLE master = GenerateMaster(f_, session_);
  Attrs t =
      SecretKeyTemplate(CKK_AES, "transport", false, {CKA_WRAP, CKA_UNWRAP});
  t.Ulong(CKA_VALUE_LEN, 32);
  CK_MECHANISM gen = {CKM_AES_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE transport = CK_INVALID_HANDLE;
  ASSERT_EQ(
      Rv(f_->C_GenerateKey(session_, &gen, t.data(), t.size(), &transport)),
      "CKR_OK");
  CK_MECHANISM wrap = {CKM_AES_KEY_WRAP_PAD, nullptr, 0};
  unsigned char out[64];
  CK_ULONG out_len = 0;
  // Even asking for the length is logged.
  EXPECT_EQ(
      Rv(f_->C_WrapKey(session_, &wrap, transport, master, nullptr, &out_len)),
      "CKR_KEY_UNEXTRACTABLE");
  out_len = sizeof(out);
  // The master is not extractable, so the token refuses; the attempt is
  // still logged.
  EXPECT_EQ(
      Rv(f_->C_WrapKey(session_, &wrap, transport, master, out, &out_len)),
      "CKR_KEY_UNEXTRACTABLE");
  std::vector<std::string> v = AuditViolations(audit());
  ASSERT_EQ(v.size(), 2u);
  EXPECT_THAT(v[0], HasSubstr("wrap C_WrapKey pid="));
  EXPECT_THAT(v[0], HasSubstr("label=\"master\" mechanism=CKM_AES_KEY_WRAP_PAD "
                              "wrapping_label=\"transport\" length-query"));
  EXPECT_THAT(v[1], HasSubstr("label=\"master\" mechanism=CKM_AES_KEY_WRAP_PAD "
                              "wrapping_label=\"transport\""));
  EXPECT_THAT(v[1], Not(HasSubstr("length-query")));
  // Export tests allow wraps and nothing else.
  EXPECT_TRUE(AuditViolations(audit(), /*allow_wrap=*/true).empty());
}

TEST_F(FaultyTest, AuditLogsDerivedKeysWithExtraUsage) {
  CK_OBJECT_HANDLE master = GenerateMaster(f_, session_);
  Attrs aes = DerivedTemplate(CKK_AES, {CKA_ENCRYPT, CKA_DECRYPT, CKA_SIGN});
  CK_OBJECT_HANDLE k = CK_INVALID_HANDLE;
  ASSERT_EQ(Rv(Derive(f_, session_, master, aes, &k)), "CKR_OK");
  std::vector<std::string> v = AuditViolations(audit());
  ASSERT_EQ(v.size(), 1u);
  EXPECT_THAT(v[0], HasSubstr("derive-usage C_DeriveKey pid="));
  EXPECT_THAT(v[0], HasSubstr("key_type=CKK_AES label=\"derived\" "
                              "problems=template:sign,object:sign"));

  Attrs mac =
      DerivedTemplate(CKK_GENERIC_SECRET, {CKA_SIGN, CKA_VERIFY, CKA_DERIVE});
  ASSERT_EQ(Rv(Derive(f_, session_, master, mac, &k)), "CKR_OK");
  v = AuditViolations(audit());
  ASSERT_EQ(v.size(), 2u);
  EXPECT_THAT(v[1], HasSubstr("key_type=CKK_GENERIC_SECRET label=\"derived\" "
                              "problems=template:derive,object:derive"));
}

TEST_F(FaultyTest, AuditLogsDerivedTokenKeysAndUnsetFlags) {
  CK_OBJECT_HANDLE master = GenerateMaster(f_, session_);
  Attrs token =
      SecretKeyTemplate(CKK_AES, "derived", true, {CKA_ENCRYPT, CKA_DECRYPT});
  token.Ulong(CKA_VALUE_LEN, 32);
  CK_OBJECT_HANDLE k = CK_INVALID_HANDLE;
  ASSERT_EQ(Rv(Derive(f_, session_, master, token, &k)), "CKR_OK");
  std::vector<std::string> v = AuditViolations(audit());
  ASSERT_EQ(v.size(), 1u);
  EXPECT_THAT(v[0], HasSubstr("problems=template:token,object:token"));

  // A template that leaves usage flags to the token's defaults: the derived
  // key itself is checked, so defaults that grant more are caught.
  Attrs minimal;
  minimal.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET)
      .Ulong(CKA_VALUE_LEN, 32)
      .Bool(CKA_TOKEN, false)
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, false)
      .Bool(CKA_SIGN, true);
  ASSERT_EQ(Rv(Derive(f_, session_, master, minimal, &k)), "CKR_OK");
  v = AuditViolations(audit());
  ASSERT_EQ(v.size(), 2u);
  // SoftHSM 2.6 defaults ENCRYPT, DECRYPT, WRAP and UNWRAP to TRUE.
  EXPECT_THAT(v[1], HasSubstr("derive-usage C_DeriveKey pid="));
  EXPECT_THAT(v[1], HasSubstr("key_type=CKK_GENERIC_SECRET label=? "
                              "problems=object:encrypt,object:decrypt,"
                              "object:wrap,object:unwrap"));
}

}  // namespace
}  // namespace hsmstek::faulty::test
