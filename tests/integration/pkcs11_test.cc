// The PKCS#11 access layer against real SoftHSM tokens.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <thread>
#include <vector>

#include "common/log.h"
#include "pkcs11/object.h"
#include "pkcs11/token.h"
#include "softhsm.h"

namespace hsmstek::p11 {
namespace {

using testing::SoftHsm;

class Pkcs11Test : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    SoftHsm::Get().CreateToken("p11-a");
    SoftHsm::Get().CreateToken("p11-b");
  }

  static std::shared_ptr<Token> Open(const std::string &uri_text,
                                     TokenOptions options = {}) {
    Result<TokenUri> uri = ParseTokenUri(uri_text);
    EXPECT_TRUE(uri.ok()) << uri.status().message();
    Result<std::shared_ptr<Token>> token = Token::Create(*uri, options);
    EXPECT_TRUE(token.ok()) << token.status().message();
    return *token;
  }

  // Creates an AES-256 and an HMAC session key in the long-lived session.
  static void MakeSessionKeys(Token &token, CK_OBJECT_HANDLE *aes,
                              CK_OBJECT_HANDLE *hmac) {
    Status s = token.WithObjectSession([&](Session &session) {
      CK_MECHANISM aes_gen{CKM_AES_KEY_GEN, nullptr, 0};
      Template t;
      t.Bool(CKA_TOKEN, false)
          .Bool(CKA_SENSITIVE, true)
          .Bool(CKA_EXTRACTABLE, false)
          .Bool(CKA_ENCRYPT, true)
          .Ulong(CKA_VALUE_LEN, 32);
      Status st = P11_CALL(session, C_GenerateKey, session.handle(), &aes_gen,
                           t.data(), t.size(), aes);
      if (!st.ok()) return st;
      CK_MECHANISM gen{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
      Template h;
      h.Bool(CKA_TOKEN, false)
          .Bool(CKA_SENSITIVE, true)
          .Bool(CKA_EXTRACTABLE, false)
          .Bool(CKA_SIGN, true)
          .Ulong(CKA_VALUE_LEN, 32);
      return P11_CALL(session, C_GenerateKey, session.handle(), &gen, h.data(),
                      h.size(), hmac);
    });
    ASSERT_TRUE(s.ok()) << s.message();
  }

  // One AES-CBC-PAD encryption and one HMAC on a pooled session.
  static Status EncryptAndSign(Token &token, CK_OBJECT_HANDLE aes,
                               CK_OBJECT_HANDLE hmac) {
    Result<Session> session = token.Acquire();
    if (!session.ok()) return session.status();
    uint8_t iv[16] = {};
    CK_MECHANISM cbc{CKM_AES_CBC_PAD, iv, sizeof(iv)};
    uint8_t in[100] = {1, 2, 3};
    uint8_t out[128];
    CK_ULONG out_len = sizeof(out);
    Status s = P11_CALL(*session, C_EncryptInit, session->handle(), &cbc, aes);
    if (!s.ok()) return s;
    s = P11_CALL(*session, C_Encrypt, session->handle(), in, sizeof(in), out,
                 &out_len);
    if (!s.ok()) return s;
    if (out_len != 112) return Internal("unexpected ciphertext length");
    CK_MECHANISM mac{CKM_SHA256_HMAC, nullptr, 0};
    s = P11_CALL(*session, C_SignInit, session->handle(), &mac, hmac);
    if (!s.ok()) return s;
    uint8_t tag[32];
    CK_ULONG tag_len = sizeof(tag);
    s = P11_CALL(*session, C_Sign, session->handle(), out, out_len, tag,
                 &tag_len);
    if (!s.ok()) return s;
    return tag_len == 32 ? Status::Ok() : Internal("bad tag length");
  }
};

TEST_F(Pkcs11Test, ConnectsToTheTokenNamedByLabel) {
  auto token = Open(SoftHsm::Get().Uri("p11-a"));
  ASSERT_TRUE(token->Connect().ok());
  EXPECT_EQ(token->label(), "p11-a");
  EXPECT_EQ(token->state(), TokenState::kConnected);
  EXPECT_FALSE(token->serial().empty());
}

TEST_F(Pkcs11Test, NoMatchingTokenListsTheTokensSeen) {
  auto token = Open(SoftHsm::Get().Uri("nope"));
  Status s = token->Connect();
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), ErrorCode::kNotFound);
  EXPECT_NE(s.message().find("no token matches"), std::string::npos);
  EXPECT_NE(s.message().find("\"p11-a\" (serial "), std::string::npos);
  EXPECT_NE(s.message().find("\"p11-b\""), std::string::npos);
}

TEST_F(Pkcs11Test, AmbiguousUriIsAnErrorNotAGuess) {
  auto token = Open("pkcs11:?module-path=" + testing::SoftHsmModulePath() +
                    "&pin-source=file:" + SoftHsm::Get().pin_file());
  Status s = token->Connect();
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(s.message().find("more than one token matches"), std::string::npos);
  EXPECT_NE(s.message().find("\"p11-a\""), std::string::npos);
}

TEST_F(Pkcs11Test, WrongPinIsNamedWithoutRevealingThePin) {
  auto token =
      Open("pkcs11:token=p11-a?module-path=" + testing::SoftHsmModulePath() +
           "&pin-value=97531");
  Status s = token->Connect();
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), ErrorCode::kPermissionDenied);
  EXPECT_EQ(s.ckr(), CKR_PIN_INCORRECT);
  EXPECT_NE(s.message().find("C_Login: CKR_PIN_INCORRECT"), std::string::npos);
  EXPECT_NE(s.message().find("p11-a"), std::string::npos);
  EXPECT_EQ(s.message().find("97531"), std::string::npos);
  EXPECT_EQ(token->uri().text.find("97531"), std::string::npos);
}

TEST_F(Pkcs11Test, MissingPinFileIsAClearError) {
  auto token =
      Open("pkcs11:token=p11-a?module-path=" + testing::SoftHsmModulePath() +
           "&pin-source=file:/nonexistent/pin");
  Status s = token->Connect();
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), ErrorCode::kPermissionDenied);
  EXPECT_NE(s.message().find("cannot read PIN file /nonexistent/pin"),
            std::string::npos);
}

TEST_F(Pkcs11Test, PinFileWithCrLfAndEnvironmentPin) {
  std::string pin_file = SoftHsm::Get().dir() + "/crlf.pin";
  std::ofstream(pin_file) << testing::kUserPin << "\r\n";
  auto token =
      Open("pkcs11:token=p11-a?module-path=" + testing::SoftHsmModulePath() +
           "&pin-source=file://" + pin_file);
  EXPECT_TRUE(token->Connect().ok());

  setenv("HSMSTEK_PIN", testing::kUserPin, 1);
  auto env_token =
      Open("pkcs11:token=p11-b?module-path=" + testing::SoftHsmModulePath());
  Status s = env_token->Connect();
  unsetenv("HSMSTEK_PIN");
  EXPECT_TRUE(s.ok()) << s.message();
}

TEST_F(Pkcs11Test, PinFileThatAppearsLaterIsUsedAfterBackoff) {
  std::string pin_file = SoftHsm::Get().dir() + "/late.pin";
  std::remove(pin_file.c_str());
  TokenOptions options;
  options.backoff_initial = std::chrono::milliseconds(0);
  auto token =
      Open("pkcs11:token=p11-b?module-path=" + testing::SoftHsmModulePath() +
               "&pin-source=file:" + pin_file,
           options);
  Result<Session> first = token->Acquire();
  ASSERT_FALSE(first.ok());
  EXPECT_EQ(token->state(), TokenState::kBackoff);
  std::ofstream(pin_file) << testing::kUserPin << "\n";
  // The background prober retries (at least 50 ms apart) and picks it up;
  // Acquire itself never connects while a probe is pending.
  Result<Session> second = token->Acquire();
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!second.ok() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    second = token->Acquire();
  }
  EXPECT_TRUE(second.ok()) << second.status().message();
}

TEST_F(Pkcs11Test, ARejectedPinIsNotSentAgainUntilItsSourceChanges) {
  std::string pin_file = SoftHsm::Get().dir() + "/wrong.pin";
  std::ofstream(pin_file) << "0000\n";
  TokenOptions options;
  options.backoff_initial = std::chrono::milliseconds(0);
  auto token =
      Open("pkcs11:token=p11-b?module-path=" + testing::SoftHsmModulePath() +
               "&pin-source=file:" + pin_file,
           options);
  Status first = token->Connect();
  ASSERT_FALSE(first.ok());
  EXPECT_EQ(first.ckr(), CKR_PIN_INCORRECT);
  // Back-off has elapsed (zero), yet the token is not asked again: tokens
  // lock a PIN after a few failures.
  Status second = token->Connect();
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.ckr(), 0u);
  EXPECT_NE(second.message().find("not trying it again"), std::string::npos);
  // The operator fixes the PIN file: the next attempt logs in.
  std::ofstream(pin_file, std::ios::trunc) << testing::kUserPin << "\n";
  Status fixed = token->Connect();
  EXPECT_TRUE(fixed.ok()) << fixed.message();
}

TEST_F(Pkcs11Test, BackoffRefusesWithoutTouchingTheToken) {
  TokenOptions options;
  options.backoff_initial = std::chrono::hours(1);
  auto token =
      Open("pkcs11:token=p11-a?module-path=" + testing::SoftHsmModulePath() +
               "&pin-value=0000",
           options);
  ASSERT_FALSE(token->Acquire().ok());
  Result<Session> again = token->Acquire();
  ASSERT_FALSE(again.ok());
  EXPECT_NE(again.status().message().find("retrying"), std::string::npos);
  // kUnavailable (token trouble on the ticket path), naming the cause.
  EXPECT_EQ(again.status().code(), ErrorCode::kUnavailable);
  EXPECT_NE(again.status().message().find("CKR_PIN_INCORRECT"),
            std::string::npos)
      << again.status().message();
}

TEST_F(Pkcs11Test, ATokenCreatedByAnotherProcessIsFoundAfterReinitialising) {
  // SoftHSM reads its token files only in C_Initialize. A token that another
  // process creates afterwards (or rewrites at that moment, as a sibling
  // nginx worker logging in does) is invisible until the module is
  // initialised again, which the token layer does when nothing matches.
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    execlp("softhsm2-util", "softhsm2-util", "--init-token", "--free",
           "--label", "p11-late", "--so-pin", testing::kSoPin, "--pin",
           testing::kUserPin, static_cast<char *>(nullptr));
    _exit(127);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);

  auto token = Open(SoftHsm::Get().Uri("p11-late"));
  Status s = token->Connect();
  EXPECT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(token->label(), "p11-late");
}

TEST_F(Pkcs11Test, MissingMechanismIsNamed) {
  TokenOptions options;
  options.required_mechanisms = {CKM_AES_CBC_PAD, CKM_SHA256_HMAC,
                                 CKM_AES_ECB_ENCRYPT_DATA};
  auto ok = Open(SoftHsm::Get().Uri("p11-a"), options);
  EXPECT_TRUE(ok->Connect().ok());

  options.required_mechanisms.push_back(CKM_VENDOR_DEFINED | 0x4242);
  auto missing = Open(SoftHsm::Get().Uri("p11-a"), options);
  Status s = missing->Connect();
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), ErrorCode::kUnsupported);
  EXPECT_NE(s.message().find("lacks mechanism CKM_0x80004242"),
            std::string::npos);
}

TEST_F(Pkcs11Test, EightThreadsNeverShareAnOperation) {
  auto token = Open(SoftHsm::Get().Uri("p11-a"));
  CK_OBJECT_HANDLE aes, hmac;
  MakeSessionKeys(*token, &aes, &hmac);
  std::atomic<int> failures{0};
  std::string first_error;
  std::mutex error_mu;
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 150; ++i) {
        Status s = EncryptAndSign(*token, aes, hmac);
        if (!s.ok()) {
          failures++;
          std::lock_guard<std::mutex> lock(error_mu);
          if (first_error.empty()) first_error = s.message();
        }
      }
    });
  }
  for (auto &th : threads) th.join();
  EXPECT_EQ(failures.load(), 0) << first_error;
}

TEST_F(Pkcs11Test, SessionObjectsSurvivePoolReuse) {
  TokenOptions options;
  options.max_idle_sessions = 2;
  auto token = Open(SoftHsm::Get().Uri("p11-b"), options);
  CK_OBJECT_HANDLE aes, hmac;
  MakeSessionKeys(*token, &aes, &hmac);
  {
    // Lease more sessions than the pool keeps, so some get closed on return.
    std::vector<Session> held;
    for (int i = 0; i < 6; ++i) {
      Result<Session> s = token->Acquire();
      ASSERT_TRUE(s.ok());
      held.push_back(std::move(*s));
    }
  }
  for (int i = 0; i < 10; ++i) {
    Status s = EncryptAndSign(*token, aes, hmac);
    ASSERT_TRUE(s.ok()) << s.message();
  }
}

TEST_F(Pkcs11Test, RecoversAfterAllSessionsClosedBehindItsBack) {
  auto token = Open(SoftHsm::Get().Uri("p11-a"));
  CK_OBJECT_HANDLE aes, hmac;
  MakeSessionKeys(*token, &aes, &hmac);
  ASSERT_TRUE(EncryptAndSign(*token, aes, hmac).ok());
  uint64_t before = token->generation();

  ASSERT_EQ(token->fn()->C_CloseAllSessions(token->slot()), CKR_OK);

  Status broken = EncryptAndSign(*token, aes, hmac);
  ASSERT_FALSE(broken.ok());
  EXPECT_EQ(broken.code(), ErrorCode::kUnavailable);
  EXPECT_NE(broken.message().find("CKR_SESSION_HANDLE_INVALID"),
            std::string::npos);
  // The next use reconnects and logs in again: a new generation, whose
  // owner must recreate its session objects.
  MakeSessionKeys(*token, &aes, &hmac);
  EXPECT_GT(token->generation(), before);
  EXPECT_EQ(token->state(), TokenState::kConnected);
  EXPECT_TRUE(EncryptAndSign(*token, aes, hmac).ok());
}

TEST_F(Pkcs11Test, ModuleIsNotReinitialisedUnderACallInFlight) {
  // A disconnected token whose sessions are still leased (a thread inside a
  // call) keeps its module from being finalised: C_Finalize under a call in
  // flight crashes SoftHSM.
  auto token = Open(SoftHsm::Get().Uri("p11-a"));
  std::shared_ptr<Module> module = SoftHsm::Get().module();
  Result<Session> leased = token->Acquire();
  ASSERT_TRUE(leased.ok()) << leased.status().message();
  token->Disconnect();
  EXPECT_FALSE(module->TryReinitialize());
  CK_SESSION_INFO info;
  EXPECT_EQ(token->fn()->C_GetSessionInfo(leased->handle(), &info), CKR_OK);
  leased = Unavailable("returned");  // the lease ends here
  EXPECT_TRUE(module->TryReinitialize());
  // Reconnects from scratch afterwards.
  CK_OBJECT_HANDLE aes, hmac;
  MakeSessionKeys(*token, &aes, &hmac);
  EXPECT_TRUE(EncryptAndSign(*token, aes, hmac).ok());
}

TEST_F(Pkcs11Test, DisconnectDuringObjectSessionUseClosesItAfterwards) {
  // A fault reported while the object session is in use (here: by the same
  // thread) must not close it under its user; it is closed when the user is
  // done.
  auto token = Open(SoftHsm::Get().Uri("p11-b"));
  CK_SESSION_HANDLE used = CK_INVALID_HANDLE;
  CK_RV during = CKR_GENERAL_ERROR;
  Status s = token->WithObjectSession([&](Session &session) {
    used = session.handle();
    token->Disconnect();
    CK_SESSION_INFO info;
    during = token->fn()->C_GetSessionInfo(used, &info);
    return Status::Ok();
  });
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(during, CKR_OK);
  CK_SESSION_INFO info;
  EXPECT_EQ(token->fn()->C_GetSessionInfo(used, &info),
            CKR_SESSION_HANDLE_INVALID);
  // The next use gets a new object session.
  CK_OBJECT_HANDLE aes, hmac;
  MakeSessionKeys(*token, &aes, &hmac);
  EXPECT_TRUE(EncryptAndSign(*token, aes, hmac).ok());
}

TEST_F(Pkcs11Test, ReconnectAndSecondDisconnectDuringObjectSessionUse) {
  // While one caller still uses its object session, the token reconnects
  // (new object session) and drops again: the new one, unused, is closed at
  // once; the one in use is closed when its user is done.
  auto token = Open(SoftHsm::Get().Uri("p11-b"));
  CK_SESSION_HANDLE used = CK_INVALID_HANDLE;
  CK_RV during = CKR_GENERAL_ERROR;
  Status s = token->WithObjectSession([&](Session &session) {
    used = session.handle();
    token->Disconnect();
    Result<Session> other = token->Acquire();  // reconnects
    if (!other.ok()) return other.status();
    other = Unavailable("returned");
    token->Disconnect();
    CK_SESSION_INFO info;
    during = session.fn()->C_GetSessionInfo(used, &info);
    return Status::Ok();
  });
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(during, CKR_OK);
  CK_SESSION_INFO info;
  EXPECT_EQ(token->fn()->C_GetSessionInfo(used, &info),
            CKR_SESSION_HANDLE_INVALID);
  CK_OBJECT_HANDLE aes, hmac;
  MakeSessionKeys(*token, &aes, &hmac);
  EXPECT_TRUE(EncryptAndSign(*token, aes, hmac).ok());
}

TEST_F(Pkcs11Test, ForkedChildReinitialisesAndWorks) {
  auto token = Open(SoftHsm::Get().Uri("p11-b"));
  CK_OBJECT_HANDLE aes, hmac;
  MakeSessionKeys(*token, &aes, &hmac);
  ASSERT_TRUE(EncryptAndSign(*token, aes, hmac).ok());
  uint64_t parent_generation = token->generation();

  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // Child: nothing of the parent's may be used; new keys, new sessions.
    int code = 0;
    CK_OBJECT_HANDLE child_aes = 0, child_hmac = 0;
    Status s = token->WithObjectSession([&](Session &session) {
      CK_MECHANISM gen{CKM_AES_KEY_GEN, nullptr, 0};
      Template t;
      t.Bool(CKA_TOKEN, false).Bool(CKA_ENCRYPT, true).Ulong(CKA_VALUE_LEN, 32);
      Status st = P11_CALL(session, C_GenerateKey, session.handle(), &gen,
                           t.data(), t.size(), &child_aes);
      if (!st.ok()) return st;
      CK_MECHANISM hgen{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
      Template h;
      h.Bool(CKA_TOKEN, false).Bool(CKA_SIGN, true).Ulong(CKA_VALUE_LEN, 32);
      return P11_CALL(session, C_GenerateKey, session.handle(), &hgen, h.data(),
                      h.size(), &child_hmac);
    });
    if (!s.ok()) code = 2;
    if (code == 0 && token->generation() == parent_generation) code = 3;
    if (code == 0 && !EncryptAndSign(*token, child_aes, child_hmac).ok())
      code = 4;
    _exit(code);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  // The parent is untouched by the child's work.
  EXPECT_TRUE(EncryptAndSign(*token, aes, hmac).ok());
  EXPECT_EQ(token->generation(), parent_generation);
}

// A token label is outside input; with a newline or control
// bytes it must reach the log quoted (QuoteForMessage), or it could forge
// log lines.
std::vector<std::string> *g_log_lines = nullptr;
void CollectLog(int /*level*/, const char *msg, void * /*arg*/) {
  g_log_lines->push_back(msg);
}

TEST_F(Pkcs11Test, LabelWithControlBytesReachesTheLogQuoted) {
  const std::string label = "evil\nhsmstek: forged\x1b[0m";
  SoftHsm::Get().CreateToken(label);
  std::vector<std::string> lines;
  g_log_lines = &lines;
  log::SetSink(CollectLog, nullptr);
  // RFC 7512 percent-encoding names the label exactly.
  std::shared_ptr<Token> token =
      Open(SoftHsm::Get().Uri("evil%0Ahsmstek:%20forged%1B%5B0m"));
  Status connected = token->Connect();
  log::SetSink(nullptr, nullptr);
  g_log_lines = nullptr;
  ASSERT_TRUE(connected.ok()) << connected.message();
  bool seen = false;
  for (const std::string &line : lines) {
    EXPECT_EQ(line.find('\n'), std::string::npos) << line;
    EXPECT_EQ(line.find('\x1b'), std::string::npos) << line;
    if (line.find("connected to token \"evil\\x0ahsmstek: forged\\x1b[0m\"") !=
        std::string::npos) {
      seen = true;
    }
  }
  EXPECT_TRUE(seen) << "no quoted connect line among " << lines.size();
}

// The access layer refuses CKA_VALUE by construction. The key here is one
// the token WOULD reveal (not sensitive, extractable), so only the guard in
// object.cc stands between the caller and the bytes: the test checks the
// guard's own error, and would fail if the guard were removed (the token
// then answers with the value).
TEST_F(Pkcs11Test, CkaValueOfASecretKeyIsRefusedByTheLayerItself) {
  std::shared_ptr<Token> token = Open(SoftHsm::Get().Uri("p11-a"));
  ASSERT_TRUE(token->Connect().ok());
  Result<Session> session = token->Acquire();
  ASSERT_TRUE(session.ok()) << session.status().message();
  CK_MECHANISM gen{CKM_AES_KEY_GEN, nullptr, 0};
  Template t;
  t.Bool(CKA_TOKEN, false)
      .Bool(CKA_SENSITIVE, false)
      .Bool(CKA_EXTRACTABLE, true)
      .Bool(CKA_ENCRYPT, true)
      .Ulong(CKA_VALUE_LEN, 32);
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  ASSERT_TRUE(P11_CALL(*session, C_GenerateKey, session->handle(), &gen,
                       t.data(), t.size(), &key)
                  .ok());
  ScopedObject owner(*session, key);

  Result<Bytes> value = ReadAttribute(*session, key, CKA_VALUE);
  ASSERT_FALSE(value.ok());
  EXPECT_EQ(value.status().code(), ErrorCode::kInternal);
  EXPECT_EQ(value.status().message(),
            "refusing to read CKA_VALUE through ReadAttribute");
  Result<Bytes> data = ReadDataValue(*session, key);
  ASSERT_FALSE(data.ok());
  EXPECT_EQ(data.status().message(),
            "refusing to read CKA_VALUE of a non-data object");
  // Other attributes still read: the refusal is about CKA_VALUE alone.
  Result<CK_ULONG> length = ReadUlong(*session, key, CKA_VALUE_LEN);
  ASSERT_TRUE(length.ok());
  EXPECT_EQ(*length, 32u);
}

}  // namespace
}  // namespace hsmstek::p11
