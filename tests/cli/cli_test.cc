// The `hsmstek` binary, run as a subprocess against real SoftHSM tokens
// that this test process creates; what it did is checked in-process
// through the key store library (docs/FORMAT.md layout, states, legacy keys,
// replication between two tokens).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/sha.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "keystore/bundle.h"
#include "keystore/derivation.h"
#include "keystore/key_name.h"
#include "keystore/ossl.h"
#include "keystore/provisioning.h"
#include "keystore/replication.h"
#include "keystore/signing.h"
#include "keystore/store.h"
#include "keystore/time_format.h"
#include "pkcs11/error.h"
#include "pkcs11/object.h"
#include "softhsm.h"

extern char **environ;

namespace hsmstek::keystore {
namespace {

using hsmstek::testing::kSoPin;
using hsmstek::testing::kUserPin;
using hsmstek::testing::SoftHsm;
using Json = nlohmann::json;

// Tokens of this process. kAesA/kAesB hold an AES transport key installed
// by the SO before anything else logs in (SetUpTestSuite).
constexpr char kMain[] = "cli-main";
constexpr char kSend[] = "cli-send";
constexpr char kRecv[] = "cli-recv";
constexpr char kAesA[] = "cli-aes-a";
constexpr char kAesB[] = "cli-aes-b";
constexpr char kTransportLabel[] = "transport";
constexpr char kTransportId[] = "transport-1";

// ---------------------------------------------------------------------------
// Running the binary.

struct RunResult {
  int code = -1;
  std::string out;
  std::string err;
};

std::string Scratch() {
  static const std::string dir = [] {
    std::string d = SoftHsm::Get().dir() + "/scratch";
    std::filesystem::create_directories(d);
    return d;
  }();
  return dir;
}

std::string ReadAll(const std::string &path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteAll(const std::string &path, std::string_view data) {
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      .write(data.data(), static_cast<std::streamsize>(data.size()));
}

// Runs `program` with `args`, stdin from /dev/null, stdout and stderr
// captured in files; `env` entries ("NAME=value") replace or extend ours
// (which carry SOFTHSM2_CONF).
RunResult RunProgram(const std::string &program,
                     const std::vector<std::string> &args,
                     const std::vector<std::string> &env = {}) {
  static int counter = 0;
  const std::string base = Scratch() + "/run" + std::to_string(++counter);
  const std::string out_path = base + ".out";
  const std::string err_path = base + ".err";
  std::vector<std::string> env_strings;
  for (char **e = environ; *e != nullptr; ++e) {
    std::string entry(*e);
    std::string name = entry.substr(0, entry.find('='));
    bool replaced = false;
    for (const std::string &x : env) {
      replaced = replaced || x.substr(0, x.find('=')) == name;
    }
    if (!replaced) env_strings.push_back(entry);
  }
  env_strings.insert(env_strings.end(), env.begin(), env.end());
  std::vector<char *> envp;
  for (std::string &s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_strings = {program};
  argv_strings.insert(argv_strings.end(), args.begin(), args.end());
  std::vector<char *> argv;
  for (std::string &s : argv_strings) argv.push_back(s.data());
  argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, out_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0600);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, program.c_str(), &actions, nullptr, argv.data(),
                       envp.data());
  posix_spawn_file_actions_destroy(&actions);
  RunResult r;
  if (rc != 0) {
    r.err = "posix_spawn failed: " + std::string(std::strerror(rc));
    return r;
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = ReadAll(out_path);
  r.err = ReadAll(err_path);
  return r;
}

RunResult Cli(const std::vector<std::string> &args,
              const std::vector<std::string> &env = {}) {
  return RunProgram(HSMSTEK_CLI_PATH, args, env);
}

std::string Describe(const RunResult &r) {
  return "exit " + std::to_string(r.code) + "\nstdout:\n" + r.out +
         "\nstderr:\n" + r.err;
}

std::string Uri(const std::string &token, const std::string &object) {
  return SoftHsm::Get().Uri(token, object);
}

// The URI without pin-source (for PIN tests).
std::string UriWithoutPin(const std::string &token, const std::string &object,
                          const std::string &extra_query = "") {
  return "pkcs11:token=" + token + ";object=" + object +
         "?module-path=" + hsmstek::testing::SoftHsmModulePath() + extra_query;
}

std::string SoPinFile() {
  static const std::string path = [] {
    std::string p = Scratch() + "/so.pin";
    WriteAll(p, std::string(kSoPin) + "\n");
    chmod(p.c_str(), 0600);
    return p;
  }();
  return path;
}

// The 16 hex digits after "store id:" in provision/rotate output.
std::string PrintedId(const RunResult &r) {
  size_t at = r.out.find("store id:");
  if (at == std::string::npos) return "";
  at = r.out.find_first_not_of(' ', at + 9);
  return r.out.substr(at, 16);
}

StoreId ToStoreId(const std::string &hex) {
  Result<Bytes> b = HexDecode(hex);
  StoreId id{};
  if (b.ok() && b->size() == id.size()) {
    std::copy(b->begin(), b->end(), id.begin());
  }
  return id;
}

int64_t Now() { return SystemClock::Instance().NowUnix(); }

// ---------------------------------------------------------------------------
// In-process views of the tokens.

std::shared_ptr<p11::Token> UserToken(const std::string &label) {
  static std::map<std::string, std::shared_ptr<p11::Token>> tokens;
  auto &t = tokens[label];
  if (!t) {
    p11::TokenOptions options;
    options.read_write = true;
    Result<std::shared_ptr<p11::Token>> token =
        p11::Token::Create(*p11::ParseTokenUri(Uri(label, "")), options);
    EXPECT_TRUE(token.ok()) << token.status().message();
    t = *token;
  }
  return t;
}

p11::Session UserSession(const std::string &token) {
  Result<p11::Session> s = UserToken(token)->Acquire();
  EXPECT_TRUE(s.ok()) << s.status().message();
  return std::move(s).value();
}

// Token objects visible to the user (private and public).
size_t CountTokenObjects(const std::string &token) {
  p11::Session s = UserSession(token);
  p11::Template t;
  t.Bool(CKA_TOKEN, true);
  Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(s, t, 100000);
  EXPECT_TRUE(found.ok()) << found.status().message();
  return found.ok() ? found->size() : 0;
}

std::shared_ptr<KeyStore> OpenStore(const std::string &token,
                                    const std::string &label) {
  StoreOptions options;
  options.background_maintenance = false;
  options.token.read_write = true;
  Result<std::shared_ptr<KeyStore>> store =
      KeyStore::Open(Uri(token, label), options);
  EXPECT_TRUE(store.ok()) << store.status().message();
  Status loaded = (*store)->Load();
  EXPECT_TRUE(loaded.ok()) << loaded.message();
  return *store;
}

std::vector<Master> Masters(const std::string &token,
                            const std::string &label) {
  p11::Session s = UserSession(token);
  Result<std::vector<Master>> m = LoadMasters(s, label);
  EXPECT_TRUE(m.ok()) << m.status().message();
  return m.ok() ? *m : std::vector<Master>{};
}

Json StatusJson(const std::string &token, const std::string &label) {
  RunResult r = Cli({"status", "--json", Uri(token, label)});
  EXPECT_EQ(r.code, 0) << Describe(r);
  Json j = Json::parse(r.out, nullptr, /*allow_exceptions=*/false);
  EXPECT_TRUE(j.is_object()) << r.out;
  return j;
}

Json StoreEntry(const Json &status, const std::string &id) {
  for (const Json &s : status["stores"]) {
    if (s["id"] == id) return s;
  }
  ADD_FAILURE() << "store " << id << " not in " << status.dump();
  return Json::object();
}

std::string Check(KeyStore &store, const std::string &id_hex) {
  Result<std::array<uint8_t, kCheckValueSize>> c =
      store.CheckValue(ToStoreId(id_hex));
  EXPECT_TRUE(c.ok()) << c.status().message();
  return c.ok() ? HexEncode(*c) : "";
}

// Encrypts and MACs a ticket body inside the token, like the provider.
struct Sealed {
  Bytes ct;
  Bytes tag;
};
Sealed Seal(KeyStore &store, const TicketKeys &keys, ByteSpan iv,
            std::string_view plaintext) {
  Result<p11::Session> s = store.token()->Acquire();
  EXPECT_TRUE(s.ok());
  CK_MECHANISM cbc{CKM_AES_CBC_PAD, const_cast<uint8_t *>(iv.data()),
                   static_cast<CK_ULONG>(iv.size())};
  Bytes ct(plaintext.size() + 16);
  CK_ULONG ct_len = ct.size();
  EXPECT_TRUE(P11_CALL(*s, C_EncryptInit, s->handle(), &cbc, keys.aes).ok());
  EXPECT_TRUE(P11_CALL(*s, C_Encrypt, s->handle(),
                       reinterpret_cast<CK_BYTE_PTR>(
                           const_cast<char *>(plaintext.data())),
                       plaintext.size(), ct.data(), &ct_len)
                  .ok());
  ct.resize(ct_len);
  Bytes macced(keys.name.bytes.begin(), keys.name.bytes.end());
  macced.insert(macced.end(), iv.begin(), iv.end());
  macced.insert(macced.end(), ct.begin(), ct.end());
  CK_MECHANISM mac{CKM_SHA256_HMAC, nullptr, 0};
  Bytes tag(32);
  CK_ULONG tag_len = tag.size();
  EXPECT_TRUE(P11_CALL(*s, C_SignInit, s->handle(), &mac, keys.hmac).ok());
  EXPECT_TRUE(P11_CALL(*s, C_Sign, s->handle(), macced.data(), macced.size(),
                       tag.data(), &tag_len)
                  .ok());
  return {ct, tag};
}

// Verifies the HMAC over name || iv || ct and decrypts, inside the token.
Result<std::string> Open(KeyStore &store, const TicketKeys &keys,
                         const KeyName &name, ByteSpan iv, ByteSpan ct,
                         ByteSpan tag) {
  Result<p11::Session> s = store.token()->Acquire();
  if (!s.ok()) return s.status();
  Bytes macced(name.bytes.begin(), name.bytes.end());
  macced.insert(macced.end(), iv.begin(), iv.end());
  macced.insert(macced.end(), ct.begin(), ct.end());
  CK_MECHANISM mac{CKM_SHA256_HMAC, nullptr, 0};
  Status st = P11_CALL(*s, C_VerifyInit, s->handle(), &mac, keys.hmac);
  if (!st.ok()) return st;
  st = P11_CALL(*s, C_Verify, s->handle(), macced.data(), macced.size(),
                const_cast<uint8_t *>(tag.data()), tag.size());
  if (!st.ok()) return st;
  CK_MECHANISM cbc{CKM_AES_CBC_PAD, const_cast<uint8_t *>(iv.data()),
                   static_cast<CK_ULONG>(iv.size())};
  Bytes pt(ct.size());
  CK_ULONG pt_len = pt.size();
  st = P11_CALL(*s, C_DecryptInit, s->handle(), &cbc, keys.aes);
  if (!st.ok()) return st;
  st = P11_CALL(*s, C_Decrypt, s->handle(), const_cast<uint8_t *>(ct.data()),
                ct.size(), pt.data(), &pt_len);
  if (!st.ok()) return st;
  return std::string(pt.begin(), pt.begin() + pt_len);
}

// The AES transport key's value (a TEST value) in both tokens.
Bytes TransportValue() {
  Bytes value(32);
  for (size_t i = 0; i < value.size(); ++i) {
    value[i] = static_cast<uint8_t>(0x3c ^ (i * 29));
  }
  return value;
}

// Installs the wrapping half of the AES transport key in `token` as the SO:
// public, trusted, wrap only, neither modifiable nor copyable. Test set-up
// only; must run before any user login of this process on `token`.
void InstallTransportKey(const std::string &token,
                         const char *label = kTransportLabel,
                         bool unwrap = false) {
  CK_FUNCTION_LIST *f = SoftHsm::Get().module()->functions();
  CK_ULONG count = 0;
  ASSERT_EQ(f->C_GetSlotList(CK_TRUE, nullptr, &count), CKR_OK);
  std::vector<CK_SLOT_ID> slots(count);
  ASSERT_EQ(f->C_GetSlotList(CK_TRUE, slots.data(), &count), CKR_OK);
  for (CK_SLOT_ID slot : slots) {
    CK_TOKEN_INFO info;
    if (f->C_GetTokenInfo(slot, &info) != CKR_OK) continue;
    if (p11::TrimPadded(info.label, sizeof(info.label)) != token) continue;
    CK_SESSION_HANDLE s;
    ASSERT_EQ(f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION,
                               nullptr, nullptr, &s),
              CKR_OK);
    ASSERT_EQ(f->C_Login(
                  s, CKU_SO,
                  reinterpret_cast<CK_UTF8CHAR_PTR>(const_cast<char *>(kSoPin)),
                  std::strlen(kSoPin)),
              CKR_OK);
    p11::Template t;
    t.Ulong(CKA_CLASS, CKO_SECRET_KEY)
        .Ulong(CKA_KEY_TYPE, CKK_AES)
        .Bool(CKA_TOKEN, true)
        .Bool(CKA_PRIVATE, false)  // the SO can only create public objects
        .Bool(CKA_SENSITIVE, true)
        .Bool(CKA_EXTRACTABLE, false)
        .Bool(CKA_MODIFIABLE, false)
        .Bool(CKA_COPYABLE, false)
        .Bool(CKA_TRUSTED, true)
        .Bool(CKA_WRAP, true)
        .Bool(CKA_UNWRAP, unwrap)
        .Bool(CKA_ENCRYPT, false)
        .Bool(CKA_DECRYPT, false)
        .Bool(CKA_SIGN, false)
        .Bool(CKA_VERIFY, false)
        .Bool(CKA_DERIVE, false)
        .String(CKA_LABEL, label)
        .String(CKA_ID, kTransportId)
        .Data(CKA_VALUE, TransportValue());
    CK_OBJECT_HANDLE h;
    EXPECT_EQ(f->C_CreateObject(s, t.data(), t.size(), &h), CKR_OK);
    f->C_Logout(s);
    f->C_CloseSession(s);
    return;
  }
  FAIL() << "token " << token << " not found";
}

// How InstallUnwrapTransportKey makes the unwrapping half; the defaults
// are what hsmstek accepts (unwrap only, sensitive, not modifiable, an
// unwrap template that forces a master's attributes).
struct TransportKeySpec {
  const char *label = kTransportLabel;
  const char *id = kTransportId;
  bool decrypt = false;
  bool sensitive = true;
  bool modifiable = false;
  bool unwrap_template = true;
};

// Installs the unwrapping half of the AES transport key in `token` as the
// user (private), with the same value and CKA_ID as the wrapping half.
void InstallUnwrapTransportKey(const std::string &token,
                               const TransportKeySpec &spec = {}) {
  p11::Session s = UserSession(token);
  p11::Template forced;  // as replication.cc's UnwrapTemplate
  forced.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_AES)
      .Bool(CKA_PRIVATE, true)
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_WRAP_WITH_TRUSTED, true)
      .Bool(CKA_DERIVE, true)
      .Bool(CKA_ENCRYPT, false)
      .Bool(CKA_DECRYPT, false)
      .Bool(CKA_SIGN, false)
      .Bool(CKA_VERIFY, false)
      .Bool(CKA_WRAP, false)
      .Bool(CKA_UNWRAP, false);
  p11::Template t;
  t.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_AES)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, true)
      .Bool(CKA_SENSITIVE, spec.sensitive)
      .Bool(CKA_EXTRACTABLE, false)
      .Bool(CKA_MODIFIABLE, spec.modifiable)
      .Bool(CKA_COPYABLE, false)
      .Bool(CKA_WRAP, false)
      .Bool(CKA_UNWRAP, true)
      .Bool(CKA_ENCRYPT, false)
      .Bool(CKA_DECRYPT, spec.decrypt)
      .Bool(CKA_SIGN, false)
      .Bool(CKA_VERIFY, false)
      .Bool(CKA_DERIVE, false)
      .String(CKA_LABEL, spec.label)
      .String(CKA_ID, spec.id)
      .Data(CKA_VALUE, TransportValue());
  if (spec.unwrap_template) {
    t.Data(CKA_UNWRAP_TEMPLATE,
           ByteSpan(reinterpret_cast<const uint8_t *>(forced.data()),
                    forced.size() * sizeof(CK_ATTRIBUTE)));
  }
  CK_OBJECT_HANDLE h;
  Status st = P11_CALL(s, C_CreateObject, s.handle(), t.data(), t.size(), &h);
  EXPECT_TRUE(st.ok()) << st.message();
}

class CliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    for (const char *t : {kMain, kSend, kRecv, kAesA, kAesB}) {
      SoftHsm::Get().CreateToken(t);
    }
    InstallTransportKey(kAesA);
    InstallTransportKey(kAesB);
    // A wrapping key that can also unwrap (what this suite used before).
    InstallTransportKey(kAesA, "weak-unwraps", true);
    InstallUnwrapTransportKey(kAesA);
    InstallUnwrapTransportKey(kAesB);
    // Transport keys weaker than hsmstek accepts (one can also decrypt, one
    // is not sensitive), with the good key's id so only strength differs.
    InstallUnwrapTransportKey(kAesB, {"weak-decrypt", kTransportId, true});
    InstallUnwrapTransportKey(kAesB,
                              {"weak-plain", kTransportId, false, false});
    SetUpSigner(kAesA, kAesB, AesSigner(kAesA));
    SetUpSigner(kAesB, kAesA, AesSigner(kAesB));
  }

  // The sending token `send` generates a signing key labelled `label`, the
  // SO of `recv` pins its public key; returns the PEM path.
  static std::string SetUpSigner(const std::string &send,
                                 const std::string &recv,
                                 const std::string &label) {
    const std::string pem = Scratch() + "/" + send + "-" + label + ".pem";
    RunResult gen = Cli({"signer", "generate", Uri(send, label), "--out", pem});
    EXPECT_EQ(gen.code, 0) << Describe(gen);
    RunResult trust =
        Cli({"signer", "trust", UriWithoutPin(recv, label), "--in", pem,
             "--so-pin-source", "file:" + SoPinFile()});
    EXPECT_EQ(trust.code, 0) << Describe(trust);
    return pem;
  }

  // Receiving side generates an unwrap key pair, the SO of the sending side
  // trusts its public key; returns the PEM path.
  static std::string SetUpRsaTransport(const std::string &key_label) {
    const std::string pem = Scratch() + "/" + key_label + ".pem";
    RunResult gen =
        Cli({"wrap-key", "generate", Uri(kRecv, key_label), "--out", pem});
    EXPECT_EQ(gen.code, 0) << Describe(gen);
    RunResult trust =
        Cli({"wrap-key", "trust", UriWithoutPin(kSend, key_label), "--in", pem,
             "--so-pin-source", "file:" + SoPinFile()});
    EXPECT_EQ(trust.code, 0) << Describe(trust);
    SetUpSigner(kSend, kRecv, SignerOf(key_label));
    return pem;
  }

  // The signing key of kAesA / kAesB (each pinned in the other).
  static std::string AesSigner(const std::string &token) {
    return token + "-signer";
  }

  // The signer SetUpRsaTransport(key_label) pins, and its --signer URI.
  static std::string SignerOf(const std::string &key_label) {
    return key_label + "-signer";
  }
  static std::string SignerUri(const std::string &key_label) {
    return "pkcs11:object=" + SignerOf(key_label);
  }
};

// ---------------------------------------------------------------------------
// provision

TEST_F(CliTest, ProvisionCreatesTheSpecMasterAndPolicy) {
  const int64_t before = Now();
  RunResult r = Cli({"provision", Uri(kMain, "prov"), "--period", "15m",
                     "--decrypt-window", "2h"});
  const int64_t after = Now();
  ASSERT_EQ(r.code, 0) << Describe(r);
  const std::string id = PrintedId(r);
  ASSERT_EQ(id.size(), 16u) << r.out;

  p11::Session s = UserSession(kMain);
  p11::Template find;
  find.Ulong(CKA_CLASS, CKO_SECRET_KEY).String(CKA_LABEL, "prov");
  Result<std::vector<CK_OBJECT_HANDLE>> keys = p11::FindObjects(s, find);
  ASSERT_TRUE(keys.ok());
  ASSERT_EQ(keys->size(), 1u);
  const CK_OBJECT_HANDLE key = (*keys)[0];
  static constexpr CK_ATTRIBUTE_TYPE kTypes[] = {CKA_TOKEN,
                                                 CKA_PRIVATE,
                                                 CKA_SENSITIVE,
                                                 CKA_EXTRACTABLE,
                                                 CKA_DERIVE,
                                                 CKA_ENCRYPT,
                                                 CKA_DECRYPT,
                                                 CKA_SIGN,
                                                 CKA_VERIFY,
                                                 CKA_WRAP,
                                                 CKA_UNWRAP,
                                                 CKA_ALWAYS_SENSITIVE,
                                                 CKA_NEVER_EXTRACTABLE,
                                                 CKA_MODIFIABLE};
  Result<std::vector<std::optional<bool>>> bools =
      p11::ReadBools(s, key, kTypes);
  ASSERT_TRUE(bools.ok());
  const std::vector<std::optional<bool>> expected = {
      true,  true,  true,  false, true, false, false,
      false, false, false, false, true, true,  false};
  EXPECT_EQ(*bools, expected);
  EXPECT_EQ(*p11::ReadUlong(s, key, CKA_KEY_TYPE), CKK_AES);
  EXPECT_EQ(*p11::ReadUlong(s, key, CKA_VALUE_LEN), 32u);
  Bytes label = *p11::ReadAttribute(s, key, CKA_LABEL);
  EXPECT_EQ(std::string(label.begin(), label.end()), "prov");
  EXPECT_EQ(HexEncode(*p11::ReadAttribute(s, key, CKA_ID)), id);

  p11::Template pol;
  pol.Ulong(CKA_CLASS, CKO_DATA)
      .String(CKA_APPLICATION, "hsmstek")
      .String(CKA_LABEL, "prov")
      .Data(kDataIdAttribute, ToStoreId(id));
  Result<std::vector<CK_OBJECT_HANDLE>> policies = p11::FindObjects(s, pol);
  ASSERT_TRUE(policies.ok());
  ASSERT_EQ(policies->size(), 1u);
  Result<std::vector<std::optional<bool>>> pol_bools =
      p11::ReadBools(s, (*policies)[0], std::array{CKA_TOKEN, CKA_PRIVATE});
  ASSERT_TRUE(pol_bools.ok());
  EXPECT_EQ((*pol_bools)[0], true);
  EXPECT_EQ((*pol_bools)[1], true);
  Bytes text = *p11::ReadDataValue(s, (*policies)[0]);
  Result<Policy> policy = ParsePolicy(std::string(text.begin(), text.end()));
  ASSERT_TRUE(policy.ok()) << policy.status().message();
  EXPECT_EQ(policy->period_s, 15 * 60);
  EXPECT_EQ(policy->decrypt_window_s, 2 * 3600);
  EXPECT_GE(policy->not_before, before);
  EXPECT_LE(policy->not_before, after);
  EXPECT_GE(policy->created_at, before);
  EXPECT_LE(policy->created_at, after);
  EXPECT_FALSE(policy->retire_at.has_value());
  EXPECT_FALSE(policy->replicable);
  EXPECT_EQ(policy->kdf, kKdfAesEcbV1);

  // The printed check value is the master's.
  auto store = OpenStore(kMain, "prov");
  EXPECT_NE(r.out.find("check value:     " + Check(*store, id)),
            std::string::npos)
      << r.out;
}

TEST_F(CliTest, ProvisionReplicableIsExtractableOnlyUnderTrustedWrap) {
  RunResult r = Cli({"provision", Uri(kMain, "prov-repl"), "--replicable"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  std::vector<Master> m = Masters(kMain, "prov-repl");
  ASSERT_EQ(m.size(), 1u);
  EXPECT_TRUE(m[0].policy.replicable);
  EXPECT_TRUE(m[0].extractable);
  p11::Session s = UserSession(kMain);
  Result<std::vector<std::optional<bool>>> v = p11::ReadBools(
      s, m[0].key, std::array{CKA_WRAP_WITH_TRUSTED, CKA_SENSITIVE});
  ASSERT_TRUE(v.ok());
  EXPECT_EQ((*v)[0], true);
  EXPECT_EQ((*v)[1], true);
  EXPECT_EQ(m[0].policy.period_s, 3600);  // defaults: 1h / 24h
  EXPECT_EQ(m[0].policy.decrypt_window_s, 24 * 3600);
}

TEST_F(CliTest, ProvisionTwiceIsRefused) {
  ASSERT_EQ(Cli({"provision", Uri(kMain, "twice")}).code, 0);
  const size_t objects = CountTokenObjects(kMain);
  RunResult r = Cli({"provision", Uri(kMain, "twice")});
  EXPECT_EQ(r.code, 1) << Describe(r);
  EXPECT_NE(r.err.find("hsmstek: store \"twice\" already has a master"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("use `hsmstek rotate`"), std::string::npos);
  EXPECT_EQ(CountTokenObjects(kMain), objects);
  EXPECT_EQ(Masters(kMain, "twice").size(), 1u);
}

struct BadInput {
  std::vector<std::string> flags;
  std::string message;  // the whole stderr line after "hsmstek: "
};

TEST_F(CliTest, BadPolicyInputsExitOneAndCreateNothing) {
  const std::vector<BadInput> cases = {
      {{"--period", "5x"},
       "--period: duration \"5x\" has unknown unit \"x\" (use s, m, h or d)"},
      {{"--period=-1h"}, "--period: duration \"-1h\" is negative"},
      {{"--period", "1h", "--decrypt-window", "90m"},
       "decrypt-window 1h30m is not a multiple of period 1h"},
      {{"--decrypt-window", "8d"},
       "decrypt-window 8d is longer than the maximum 7d"},
      {{"--period", "30s", "--decrypt-window", "1h"},
       "period 30s is shorter than the minimum 1m"},
      {{"--decrypt-window", "0s"},
       "--decrypt-window: duration \"0s\" must be positive"},
      {{"--activate-in", "soon"},
       "--activate-in: duration \"soon\" has no number before \"s\""},
  };
  const size_t objects = CountTokenObjects(kMain);
  for (const BadInput &c : cases) {
    std::vector<std::string> args = {"provision", Uri(kMain, "bad")};
    args.insert(args.end(), c.flags.begin(), c.flags.end());
    RunResult r = Cli(args);
    EXPECT_EQ(r.code, 1) << Describe(r);
    EXPECT_EQ(r.err, "hsmstek: " + c.message + "\n") << c.flags[0];
    EXPECT_EQ(r.out, "");
  }
  RunResult at = Cli({"provision", Uri(kMain, "bad"), "--activate-at",
                      "2026-13-01T00:00:00Z"});
  EXPECT_EQ(at.code, 1);
  EXPECT_EQ(at.err.rfind("hsmstek: --activate-at: ", 0), 0u) << at.err;
  EXPECT_EQ(CountTokenObjects(kMain), objects);
  EXPECT_TRUE(Masters(kMain, "bad").empty());
}

TEST_F(CliTest, UsageErrorsExitTwo) {
  EXPECT_EQ(Cli({}).code, 2);
  EXPECT_EQ(Cli({"provision"}).code, 2);
  EXPECT_EQ(Cli({"frobnicate"}).code, 2);
  RunResult both = Cli({"provision", Uri(kMain, "usage"), "--activate-in", "1h",
                        "--activate-at", "2030-01-01T00:00:00Z"});
  EXPECT_EQ(both.code, 2) << Describe(both);
  EXPECT_EQ(both.err.rfind("hsmstek: ", 0), 0u);
  // CLI11 quotes unexpected arguments: a pin-value never reaches stderr.
  RunResult extra = Cli(
      {"status", UriWithoutPin(kMain, "usage", "&pin-value=s3cr3t-pin"), "x"});
  EXPECT_EQ(extra.code, 2);
  EXPECT_EQ(extra.err.find("s3cr3t-pin"), std::string::npos) << extra.err;
  RunResult help = Cli({"provision", "--help"});
  EXPECT_EQ(help.code, 0);
  EXPECT_NE(help.out.find("--decrypt-window"), std::string::npos);
  EXPECT_TRUE(Masters(kMain, "usage").empty());
}

// ---------------------------------------------------------------------------
// status

TEST_F(CliTest, StatusJsonDescribesMastersAndLegacyKeys) {
  ASSERT_EQ(Cli({"provision", Uri(kMain, "stat"), "--period", "1h",
                 "--decrypt-window", "1d", "--replicable"})
                .code,
            0);
  const std::string nginx = Scratch() + "/stat-nginx.key";
  Bytes file(80);
  for (size_t i = 0; i < file.size(); ++i) {
    file[i] = static_cast<uint8_t>(i * 11 + 1);
  }
  WriteAll(nginx, std::string(file.begin(), file.end()));
  ASSERT_EQ(
      Cli({"import-legacy", Uri(kMain, "stat"), "--format", "nginx", nginx})
          .code,
      0);

  const int64_t before = Now();
  RunResult r = Cli({"status", "--json", Uri(kMain, "stat")});
  const int64_t after = Now();
  ASSERT_EQ(r.code, 0) << Describe(r);
  // Exactly one JSON object (one line).
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1);
  Json j = Json::parse(r.out, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  ASSERT_EQ(j["stores"].size(), 1u);
  const Json &s = j["stores"][0];
  std::vector<Master> masters = Masters(kMain, "stat");
  ASSERT_EQ(masters.size(), 1u);
  const std::string id = HexEncode(masters[0].id);
  EXPECT_EQ(s["label"], "stat");
  EXPECT_EQ(s["id"], id);
  EXPECT_EQ(s["state"], "active");
  auto store = OpenStore(kMain, "stat");
  EXPECT_EQ(s["check"], Check(*store, id));
  EXPECT_EQ(s["period_s"], 3600);
  EXPECT_EQ(s["decrypt_window_s"], 86400);
  EXPECT_EQ(s["activation"], FormatRfc3339(masters[0].policy.not_before));
  EXPECT_EQ(s["replicable"], true);
  EXPECT_TRUE(s["retire_at"].is_null());
  // The opaque (version 2) name of the epoch shown, never the store id.
  const std::string name = s["current_key_name"];
  Result<KeyName> expected_name =
      store->NameOf(masters[0].id, s["epoch"].get<uint64_t>());
  ASSERT_TRUE(expected_name.ok()) << expected_name.status().message();
  EXPECT_EQ(name, HexEncode(expected_name->bytes));
  EXPECT_EQ(name.find(id), std::string::npos);
  // A fresh master: link 0 serves, the horizon is its activation epoch.
  EXPECT_EQ(s["ratchet_periods"], 24);
  EXPECT_EQ(s["current_link"], 0);
  EXPECT_EQ(s["links"], Json::array({0}));
  EXPECT_EQ(s["forward_secrecy_horizon"],
            FormatRfc3339(
                EpochStart(EpochAt(masters[0].policy.not_before, 3600), 3600)));
  EXPECT_EQ(s["next_rotation"],
            FormatRfc3339(EpochStart(s["epoch"].get<uint64_t>() + 1, 3600)));
  ASSERT_EQ(j["legacy"].size(), 1u);
  EXPECT_EQ(j["legacy"][0]["name"], HexEncode(ByteSpan(file.data(), 16)));
  Result<int64_t> expires =
      ParseRfc3339(j["legacy"][0]["expires"].get<std::string>());
  ASSERT_TRUE(expires.ok());
  EXPECT_GE(*expires, before - 5 + 24 * 3600);
  EXPECT_LE(*expires, after + 24 * 3600);

  // The table names the same things.
  RunResult table = Cli({"status", Uri(kMain, "stat")});
  ASSERT_EQ(table.code, 0) << Describe(table);
  for (const std::string &needle :
       {id, std::string("active"), s["check"].get<std::string>(),
        std::string("1h"), std::string("1d"),
        HexEncode(ByteSpan(file.data(), 16)), std::string("expires")}) {
    EXPECT_NE(table.out.find(needle), std::string::npos) << needle;
  }
  // The columns are aligned: LINK, CHECK and HORIZON of the master's row
  // are the JSON's current link, its check value and the horizon.
  std::istringstream lines(table.out);
  std::string line, header, row;
  while (std::getline(lines, line)) {
    if (line.rfind("LABEL", 0) == 0) header = line;
    if (!header.empty() && line.rfind("stat ", 0) == 0) {
      row = line;
      break;
    }
  }
  ASSERT_FALSE(row.empty()) << table.out;
  auto column = [&](const std::string &name) {
    const size_t at = header.find("  " + name + " ");
    EXPECT_NE(at, std::string::npos) << name;
    if (at == std::string::npos || at + 2 >= row.size()) return std::string();
    const size_t start = at + 2;
    return row.substr(start, row.find(' ', start) - start);
  };
  EXPECT_EQ(column("LINK"), std::to_string(s["current_link"].get<uint64_t>()));
  EXPECT_EQ(column("CHECK"), s["check"].get<std::string>());
  EXPECT_EQ(column("HORIZON"), s["forward_secrecy_horizon"].get<std::string>());
}

// --ratchet sets how long one link serves (docs/CLI.md); the policy rules
// apply (a multiple of the period), checked before the token is touched.
TEST_F(CliTest, ProvisionSetsTheRatchetInterval) {
  RunResult bad = Cli({"provision", Uri(kMain, "ratchet-bad"), "--period", "1m",
                       "--decrypt-window", "5m", "--ratchet", "90s"});
  EXPECT_NE(bad.code, 0);
  // The policy's own refusal (an unknown option would fail too).
  EXPECT_NE(bad.err.find("ratchet 1m30s is not a positive multiple of period"),
            std::string::npos)
      << bad.err;
  EXPECT_TRUE(Masters(kMain, "ratchet-bad").empty());
  RunResult ok = Cli({"provision", Uri(kMain, "ratchet"), "--period", "1m",
                      "--decrypt-window", "5m", "--ratchet", "2m"});
  ASSERT_EQ(ok.code, 0) << Describe(ok);
  Json j = StatusJson(kMain, "ratchet");
  ASSERT_EQ(j["stores"].size(), 1u);
  EXPECT_EQ(j["stores"][0]["ratchet_s"], 120);
  EXPECT_EQ(j["stores"][0]["ratchet_periods"], 2);

  // rotate keeps the newest master's interval unless told otherwise.
  ASSERT_EQ(Cli({"rotate", Uri(kMain, "ratchet")}).code, 0);
  RunResult changed = Cli({"rotate", Uri(kMain, "ratchet"), "--ratchet", "3m"});
  ASSERT_EQ(changed.code, 0) << Describe(changed);
  j = StatusJson(kMain, "ratchet");
  std::multiset<int64_t> intervals;
  for (const Json &m : j["stores"]) {
    intervals.insert(m["ratchet_s"].get<int64_t>());
  }
  EXPECT_EQ(intervals, (std::multiset<int64_t>{120, 120, 180}));
}

// The operator sees which protections the token gave each key, and the
// objects left out with their reasons, in both forms.
TEST_F(CliTest, StatusShowsProtectionsAndLeftOutObjects) {
  const std::string uri = Uri(kMain, "prot");
  ASSERT_EQ(Cli({"provision", uri}).code, 0);
  {
    // An orphan master: a provision killed before its policy was stored.
    p11::Session s = UserSession(kMain);
    StoreId orphan = {5, 5, 5, 5, 5, 5, 5, 5};
    p11::Template t = MasterTemplate("prot", orphan, false, false);
    CK_MECHANISM gen{CKM_AES_KEY_GEN, nullptr, 0};
    CK_OBJECT_HANDLE h;
    ASSERT_TRUE(
        P11_CALL(s, C_GenerateKey, s.handle(), &gen, t.data(), t.size(), &h)
            .ok());
  }
  Json j = StatusJson(kMain, "prot");
  ASSERT_EQ(j["stores"].size(), 1u);
  // SoftHSM 2.6: allowed mechanisms yes, derive template unknown to it.
  EXPECT_EQ(j["stores"][0]["protections"]["allowed_mechanisms"], "applied");
  EXPECT_EQ(j["stores"][0]["protections"]["derive_template"], "unsupported");
  EXPECT_EQ(j["derived_protections"]["allowed_mechanisms"], "applied");
  ASSERT_EQ(j["skipped"].size(), 1u);
  EXPECT_EQ(j["skipped"][0]["object"], "master 0505050505050505");
  EXPECT_NE(
      j["skipped"][0]["reason"].get<std::string>().find("no policy object"),
      std::string::npos);
  RunResult table = Cli({"status", uri});
  ASSERT_EQ(table.code, 0) << Describe(table);
  for (const char *needle : {"allowed-mechanisms applied",
                             "derive-template unsupported by the token",
                             "master 0505050505050505: no policy object"}) {
    EXPECT_NE(table.out.find(needle), std::string::npos) << needle << "\n"
                                                         << table.out;
  }
}

// A user-PIN holder can plant a master of bytes they know, with the
// attributes of a genuine one and a policy that makes it active: nothing
// in its attributes refuses it (docs/SECURITY.md 2.3), but `status` shows
// that it did not come from this token, the audit after a PIN compromise.
TEST_F(CliTest, StatusShowsWhereEachMasterCameFrom) {
  const std::string uri = Uri(kMain, "origin");
  ASSERT_EQ(Cli({"provision", uri}).code, 0);
  StoreId planted = {6, 6, 6, 6, 6, 6, 6, 6};
  {
    p11::Session s = UserSession(kMain);
    p11::Template t = MasterTemplate("origin", planted, false, true);
    Bytes known(32, 0x5a);
    t.Data(CKA_VALUE, known);
    CK_OBJECT_HANDLE h;
    ASSERT_TRUE(
        P11_CALL(s, C_CreateObject, s.handle(), t.data(), t.size(), &h).ok());
    keystore::Policy p;
    p.period_s = 3600;
    p.decrypt_window_s = 86400;
    p.not_before = time(nullptr) - 60;
    p.created_at = p.not_before;
    ASSERT_TRUE(keystore::StorePolicyObject(s, "origin", planted, p).ok());
  }
  Json j = StatusJson(kMain, "origin");
  ASSERT_EQ(j["stores"].size(), 2u);
  std::map<std::string, std::string> origin;
  for (const Json &m : j["stores"]) origin[m["id"]] = m["origin"];
  EXPECT_EQ(origin[HexEncode(planted)], "outside");
  origin.erase(HexEncode(planted));
  ASSERT_EQ(origin.size(), 1u);
  EXPECT_EQ(origin.begin()->second, "generated");
  RunResult table = Cli({"status", uri});
  ASSERT_EQ(table.code, 0) << Describe(table);
  EXPECT_NE(table.out.find("origin from outside the token"), std::string::npos)
      << table.out;
}

// ---------------------------------------------------------------------------
// rotate, retire, destroy

TEST_F(CliTest, RotateStagesThenActivatesNewGenerations) {
  const std::string uri = Uri(kMain, "rot");
  RunResult p = Cli({"provision", uri, "--replicable", "--activate-at",
                     FormatRfc3339(Now() - 7200)});
  ASSERT_EQ(p.code, 0) << Describe(p);
  const std::string first = PrintedId(p);

  RunResult staged = Cli({"rotate", uri, "--activate-in", "1h"});
  ASSERT_EQ(staged.code, 0) << Describe(staged);
  EXPECT_EQ(staged.err, "");  // staged beyond the servers' refresh
  const std::string second = PrintedId(staged);
  Json j = StatusJson(kMain, "rot");
  EXPECT_EQ(StoreEntry(j, first)["state"], "active");
  EXPECT_EQ(StoreEntry(j, second)["state"], "pending");
  EXPECT_EQ(StoreEntry(j, second)["replicable"], true);  // copied

  RunResult now =
      Cli({"rotate", uri, "--activate-in", "0s", "--period", "30m"});
  ASSERT_EQ(now.code, 0) << Describe(now);
  // Activating sooner than servers refresh works, with a warning.
  EXPECT_NE(now.err.find("hsmstek: warning: the new master activates in less "
                         "than the servers' 30 s refresh"),
            std::string::npos)
      << now.err;
  const std::string third = PrintedId(now);
  j = StatusJson(kMain, "rot");
  EXPECT_EQ(j["stores"].size(), 3u);
  EXPECT_EQ(StoreEntry(j, third)["state"], "active");
  EXPECT_EQ(StoreEntry(j, third)["period_s"], 1800);           // overridden
  EXPECT_EQ(StoreEntry(j, third)["decrypt_window_s"], 86400);  // copied
  EXPECT_EQ(StoreEntry(j, first)["state"], "decrypt-only");
  EXPECT_EQ(StoreEntry(j, second)["state"], "pending");

  // The library agrees, and encrypts under the third master.
  auto store = OpenStore(kMain, "rot");
  Result<TicketKeys> keys = store->KeysForEncrypt();
  ASSERT_TRUE(keys.ok()) << keys.status().message();
  Result<Bytes> third_raw = HexDecode(third);
  ASSERT_TRUE(third_raw.ok() && third_raw->size() == 8u);
  StoreId third_id{};
  std::copy(third_raw->begin(), third_raw->end(), third_id.begin());
  Result<KeyName> third_name =
      store->NameOf(third_id, EpochAt(SystemClock::Instance().NowUnix(), 1800));
  ASSERT_TRUE(third_name.ok()) << third_name.status().message();
  EXPECT_EQ(keys->name, *third_name);

  // A generation that would be superseded at once is refused.
  const size_t objects = CountTokenObjects(kMain);
  RunResult stale =
      Cli({"rotate", uri, "--activate-at", FormatRfc3339(Now() - 3600)});
  EXPECT_EQ(stale.code, 1);
  EXPECT_NE(stale.err.find("so it would never encrypt"), std::string::npos)
      << stale.err;
  EXPECT_EQ(CountTokenObjects(kMain), objects);

  RunResult none = Cli({"rotate", Uri(kMain, "rot-none")});
  EXPECT_EQ(none.code, 1);
  EXPECT_NE(none.err.find("has no master to rotate; use `hsmstek provision`"),
            std::string::npos)
      << none.err;
}

TEST_F(CliTest, RetireStopsDecryptingAtOnce) {
  RunResult p = Cli({"provision", Uri(kMain, "ret")});
  ASSERT_EQ(p.code, 0) << Describe(p);
  const std::string id = PrintedId(p);
  auto store = OpenStore(kMain, "ret");
  Result<TicketKeys> keys = store->KeysForEncrypt();
  ASSERT_TRUE(keys.ok()) << keys.status().message();
  const DecryptVerdict live = store->KeysForDecrypt(keys->name).verdict;
  EXPECT_TRUE(live == DecryptVerdict::kCurrent || live == DecryptVerdict::kOld);

  RunResult r = Cli({"retire", Uri(kMain, "ret"), "--id", id});
  ASSERT_EQ(r.code, 0) << Describe(r);
  EXPECT_NE(r.out.find("within 30 s by default"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("now has no active master"), std::string::npos);
  Json j = StatusJson(kMain, "ret");
  EXPECT_EQ(StoreEntry(j, id)["state"], "retired");
  EXPECT_TRUE(StoreEntry(j, id)["retire_at"].is_string());

  ASSERT_TRUE(store->Load().ok());
  // Retired: its names left the table (unknown), or expired.
  const DecryptVerdict after_retire = store->KeysForDecrypt(keys->name).verdict;
  EXPECT_TRUE(after_retire == DecryptVerdict::kExpired ||
              after_retire == DecryptVerdict::kUnknownKey);
  Result<TicketKeys> none = store->KeysForEncrypt();
  EXPECT_EQ(none.status().code(), ErrorCode::kFailedPrecondition);

  RunResult again = Cli({"retire", Uri(kMain, "ret"), "--id", id});
  EXPECT_EQ(again.code, 0);
  EXPECT_NE(again.out.find("already retired"), std::string::npos);
  RunResult unknown =
      Cli({"retire", Uri(kMain, "ret"), "--id", "0000000000000001"});
  EXPECT_EQ(unknown.code, 1);
  EXPECT_NE(unknown.err.find("no master 0000000000000001 in store \"ret\""),
            std::string::npos)
      << unknown.err;
}

TEST_F(CliTest, DestroyNeedsYesAndForceForTheActiveMaster) {
  const std::string uri = Uri(kMain, "dest");
  RunResult p =
      Cli({"provision", uri, "--activate-at", FormatRfc3339(Now() - 3600)});
  ASSERT_EQ(p.code, 0);
  const std::string old_id = PrintedId(p);
  RunResult rot = Cli({"rotate", uri, "--activate-in", "0s"});
  ASSERT_EQ(rot.code, 0);
  const std::string new_id = PrintedId(rot);
  const size_t objects = CountTokenObjects(kMain);

  RunResult no_yes = Cli({"destroy", uri, "--id", old_id});
  EXPECT_EQ(no_yes.code, 1);
  EXPECT_EQ(no_yes.err.rfind("hsmstek: refusing to destroy without --yes", 0),
            0u)
      << no_yes.err;
  RunResult active = Cli({"destroy", uri, "--id", new_id, "--yes"});
  EXPECT_EQ(active.code, 1);
  EXPECT_NE(active.err.find("is the active master of store \"dest\""),
            std::string::npos)
      << active.err;
  EXPECT_EQ(CountTokenObjects(kMain), objects);

  RunResult old = Cli({"destroy", uri, "--id", old_id, "--yes"});
  ASSERT_EQ(old.code, 0) << Describe(old);
  EXPECT_NE(old.out.find("was decrypt-only"), std::string::npos) << old.out;
  EXPECT_EQ(CountTokenObjects(kMain), objects - 2);  // master + policy
  RunResult forced = Cli({"destroy", uri, "--id", new_id, "--yes", "--force"});
  ASSERT_EQ(forced.code, 0) << Describe(forced);
  EXPECT_EQ(CountTokenObjects(kMain), objects - 4);
  EXPECT_TRUE(Masters(kMain, "dest").empty());

  RunResult bad_id = Cli({"destroy", uri, "--id", "xyz", "--yes"});
  EXPECT_EQ(bad_id.code, 1);
  EXPECT_NE(bad_id.err.find("is neither a store id"), std::string::npos);
}

// ---------------------------------------------------------------------------
// import-legacy

// A legacy key made of TEST values only.
struct TestLegacyKey {
  Bytes name, aes, hmac;
};

TestLegacyKey MakeLegacyKey(uint8_t seed, size_t secret_size) {
  TestLegacyKey k;
  for (size_t i = 0; i < 16; ++i) k.name.push_back(seed + i);
  for (size_t i = 0; i < secret_size; ++i) {
    k.aes.push_back(static_cast<uint8_t>(seed * 3 + i * 7 + 1));
    k.hmac.push_back(static_cast<uint8_t>(seed * 5 + i * 13 + 2));
  }
  return k;
}

Bytes Concat(std::initializer_list<const Bytes *> parts) {
  Bytes out;
  for (const Bytes *p : parts) out.insert(out.end(), p->begin(), p->end());
  return out;
}

// Checks that `key` decrypts, inside the token, what OpenSSL encrypted with
// its bytes, and verifies an OpenSSL HMAC with them.
void ExpectLegacyKeyWorks(const std::string &label, const TestLegacyKey &key) {
  auto store = OpenStore(kMain, label);
  KeyName name;
  std::copy(key.name.begin(), key.name.end(), name.bytes.begin());
  DecryptLookup lookup = store->KeysForDecrypt(name);
  ASSERT_EQ(lookup.verdict, DecryptVerdict::kOld) << HexEncode(key.name);

  const std::string plaintext = "legacy session state, 40 bytes long.....";
  Bytes iv(16, 0xa5);
  const EVP_CIPHER *cipher =
      key.aes.size() == 16 ? EVP_aes_128_cbc() : EVP_aes_256_cbc();
  EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
  Bytes ct(plaintext.size() + 16);
  int len1 = 0, len2 = 0;
  ASSERT_EQ(EVP_EncryptInit_ex(ctx, cipher, nullptr, key.aes.data(), iv.data()),
            1);
  ASSERT_EQ(
      EVP_EncryptUpdate(ctx, ct.data(), &len1,
                        reinterpret_cast<const uint8_t *>(plaintext.data()),
                        static_cast<int>(plaintext.size())),
      1);
  ASSERT_EQ(EVP_EncryptFinal_ex(ctx, ct.data() + len1, &len2), 1);
  EVP_CIPHER_CTX_free(ctx);
  ct.resize(static_cast<size_t>(len1 + len2));
  Bytes macced = Concat({&key.name, &iv, &ct});
  uint8_t tag[32];
  unsigned int tag_len = 0;
  ASSERT_NE(
      HMAC(EVP_sha256(), key.hmac.data(), static_cast<int>(key.hmac.size()),
           macced.data(), macced.size(), tag, &tag_len),
      nullptr);
  Result<std::string> opened =
      Open(*store, lookup.keys, name, iv, ct, ByteSpan(tag, tag_len));
  ASSERT_TRUE(opened.ok()) << opened.status().message();
  EXPECT_EQ(*opened, plaintext);
}

TEST_F(CliTest, ImportsEveryLegacyFormatAsDecryptOnlyKeys) {
  // nginx 80: name || HMAC-32 || AES-32; nginx 48: name || AES-16 || HMAC-16.
  TestLegacyKey n80 = MakeLegacyKey(0x10, 32);
  TestLegacyKey n48 = MakeLegacyKey(0x30, 16);
  // haproxy: base64 lines of name || AES || HMAC, 80 and 48 bytes.
  TestLegacyKey h80 = MakeLegacyKey(0x50, 32);
  TestLegacyKey h48 = MakeLegacyKey(0x70, 16);
  const std::string f80 = Scratch() + "/nginx80.key";
  const std::string f48 = Scratch() + "/nginx48.key";
  const std::string fha = Scratch() + "/haproxy.keys";
  Bytes b80 = Concat({&n80.name, &n80.hmac, &n80.aes});
  Bytes b48 = Concat({&n48.name, &n48.aes, &n48.hmac});
  WriteAll(f80, std::string(b80.begin(), b80.end()));
  WriteAll(f48, std::string(b48.begin(), b48.end()));
  WriteAll(fha, "# tls-ticket-keys for the edge\n\n" +
                    Base64Encode(Concat({&h80.name, &h80.aes, &h80.hmac})) +
                    "\r\n   \n# older key\n" +
                    Base64Encode(Concat({&h48.name, &h48.aes, &h48.hmac})) +
                    "  \n");

  const int64_t before = Now();
  for (const auto &[format, file] :
       std::vector<std::pair<std::string, std::string>>{
           {"nginx", f80}, {"nginx", f48}, {"haproxy", fha}}) {
    RunResult r = Cli({"import-legacy", Uri(kMain, "legacy"), "--format",
                       format, "--expires-in", "2d", file});
    ASSERT_EQ(r.code, 0) << Describe(r);
    EXPECT_NE(r.out.find("shred -u " + file), std::string::npos) << r.out;
  }
  for (const TestLegacyKey *k : {&n80, &n48, &h80, &h48}) {
    ExpectLegacyKeyWorks("legacy", *k);
  }
  Json j = StatusJson(kMain, "legacy");
  ASSERT_EQ(j["legacy"].size(), 4u);
  for (const Json &l : j["legacy"]) {
    Result<int64_t> expires = ParseRfc3339(l["expires"].get<std::string>());
    ASSERT_TRUE(expires.ok());
    EXPECT_GE(*expires, before + 2 * 86400);
    EXPECT_LE(*expires, Now() + 2 * 86400);
  }
  // The imported AES key only decrypts.
  auto store = OpenStore(kMain, "legacy");
  KeyName name;
  std::copy(n80.name.begin(), n80.name.end(), name.bytes.begin());
  DecryptLookup lookup = store->KeysForDecrypt(name);
  p11::Session s = UserSession(kMain);
  Result<std::vector<std::optional<bool>>> v = p11::ReadBools(
      s, lookup.keys.aes,
      std::array{CKA_ENCRYPT, CKA_DECRYPT, CKA_SENSITIVE, CKA_EXTRACTABLE});
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, (std::vector<std::optional<bool>>{false, true, true, false}));

  // Importing the same name again is refused and changes nothing.
  const size_t objects = CountTokenObjects(kMain);
  RunResult dup =
      Cli({"import-legacy", Uri(kMain, "legacy"), "--format", "nginx", f80});
  EXPECT_EQ(dup.code, 1);
  EXPECT_NE(dup.err.find("is already in the token"), std::string::npos);
  EXPECT_EQ(CountTokenObjects(kMain), objects);

  // A legacy key is destroyed by its 32-hex name.
  RunResult d = Cli(
      {"destroy", Uri(kMain, "legacy"), "--id", HexEncode(n48.name), "--yes"});
  ASSERT_EQ(d.code, 0) << Describe(d);
  EXPECT_EQ(CountTokenObjects(kMain), objects - 3);
}

TEST_F(CliTest, BadLegacyFilesAreRefusedAndLeaveNothing) {
  TestLegacyKey k = MakeLegacyKey(0x21, 32);
  TestLegacyKey k2 = MakeLegacyKey(0x61, 32);
  Bytes good = Concat({&k.name, &k.hmac, &k.aes});
  // nginx 80: name (0..15) || HMAC (16..47) || AES (48..79).
  Bytes zero_aes = good;
  Bytes repeated_hmac = good;
  for (size_t i = 0; i < 32; ++i) {
    zero_aes[48 + i] = 0;
    repeated_hmac[16 + i] = 0x41;
  }
  Bytes short_file(good.begin(), good.begin() + 47);
  Bytes haproxy_k = Concat({&k.name, &k.aes, &k.hmac});
  Bytes haproxy_k2 = Concat({&k.name, &k2.aes, &k2.hmac});  // same name
  struct Case {
    std::string format;
    std::string contents;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"nginx", std::string(short_file.begin(), short_file.end()),
       "nginx key file is 47 bytes; expected 48"},
      {"nginx", std::string(zero_aes.begin(), zero_aes.end()),
       "nginx key file: AES key is all zeros"},
      {"nginx", std::string(repeated_hmac.begin(), repeated_hmac.end()),
       "nginx key file: HMAC key is a single repeated byte"},
      {"haproxy",
       Base64Encode(haproxy_k) + "\n" + Base64Encode(haproxy_k2) + "\n",
       "haproxy key file line 2: duplicate key name (also on line 1)"},
      {"haproxy", "# a comment\n!!!notbase64!!!\n",
       "haproxy key file line 2: invalid base64"},
      {"haproxy", "# only comments\n\n", "haproxy key file has no keys"},
  };
  const size_t objects = CountTokenObjects(kMain);
  int n = 0;
  for (const Case &c : cases) {
    const std::string path = Scratch() + "/bad" + std::to_string(++n) + ".key";
    WriteAll(path, c.contents);
    RunResult r = Cli(
        {"import-legacy", Uri(kMain, "badlegacy"), "--format", c.format, path});
    EXPECT_EQ(r.code, 1) << Describe(r);
    EXPECT_EQ(r.err.rfind("hsmstek: " + path + ": " + c.message, 0), 0u)
        << r.err;
    EXPECT_EQ(r.out, "");
  }
  RunResult fmt = Cli({"import-legacy", Uri(kMain, "badlegacy"), "--format",
                       "apache", Scratch() + "/bad1.key"});
  EXPECT_EQ(fmt.code, 1);
  EXPECT_NE(fmt.err.find("--format: unknown legacy key file format"),
            std::string::npos);
  const std::string ok = Scratch() + "/good.key";
  WriteAll(ok, std::string(good.begin(), good.end()));
  RunResult long_expiry = Cli({"import-legacy", Uri(kMain, "badlegacy"),
                               "--format", "nginx", "--expires-in", "8d", ok});
  EXPECT_EQ(long_expiry.code, 1);
  EXPECT_EQ(long_expiry.err,
            "hsmstek: --expires-in 8d is longer than the maximum 7d\n");
  EXPECT_EQ(CountTokenObjects(kMain), objects);
}

// ---------------------------------------------------------------------------
// PINs and names

TEST_F(CliTest, WrongPinAndWrongLabelGiveClearErrors) {
  ASSERT_EQ(Cli({"provision", Uri(kMain, "pins")}).code, 0);
  const std::string wrong = "wr0ng-p1n-77";
  RunResult by_uri =
      Cli({"status", UriWithoutPin(kMain, "pins", "&pin-value=" + wrong)});
  EXPECT_EQ(by_uri.code, 1);
  EXPECT_NE(by_uri.err.find("C_Login: CKR_PIN_INCORRECT (token \"cli-main\")"),
            std::string::npos)
      << by_uri.err;
  RunResult by_env =
      Cli({"status", UriWithoutPin(kMain, "pins")}, {"HSMSTEK_PIN=" + wrong});
  EXPECT_EQ(by_env.code, 1);
  EXPECT_NE(by_env.err.find("CKR_PIN_INCORRECT"), std::string::npos);
  for (const RunResult *r : {&by_uri, &by_env}) {
    EXPECT_EQ(r->err.find(wrong), std::string::npos) << r->err;
    EXPECT_EQ(r->out.find(wrong), std::string::npos);
  }
  // The right PIN from the environment works.
  RunResult env_ok = Cli({"status", UriWithoutPin(kMain, "pins")},
                         {std::string("HSMSTEK_PIN=") + kUserPin});
  EXPECT_EQ(env_ok.code, 0) << Describe(env_ok);
  // No PIN anywhere and no terminal: a clear refusal, no prompt.
  RunResult none =
      Cli({"status", UriWithoutPin(kMain, "pins")}, {"HSMSTEK_PIN="});
  EXPECT_EQ(none.code, 1);
  RunResult none2 =
      RunProgram("/usr/bin/env", {"-u", "HSMSTEK_PIN", HSMSTEK_CLI_PATH,
                                  "status", UriWithoutPin(kMain, "pins")});
  EXPECT_EQ(none2.code, 1);
  EXPECT_NE(none2.err.find("no PIN: add pin-source=file:/path to the URI or "
                           "set HSMSTEK_PIN"),
            std::string::npos)
      << none2.err;

  RunResult token = Cli({"status", Uri("no-such-token", "pins")});
  EXPECT_EQ(token.code, 1);
  EXPECT_NE(token.err.find("no token matches \"pkcs11:token=no-such-token"),
            std::string::npos)
      << token.err;
  EXPECT_NE(token.err.find("tokens present: "), std::string::npos);
  EXPECT_NE(token.err.find("\"cli-main\""), std::string::npos);

  RunResult label = Cli({"status", Uri(kMain, "no-such-store")});
  EXPECT_EQ(label.code, 1);
  EXPECT_NE(label.err.find("no store \"no-such-store\" in token \"cli-main\""),
            std::string::npos)
      << label.err;
  EXPECT_NE(label.err.find("\"pins\""), std::string::npos);  // stores present
}

// ---------------------------------------------------------------------------
// Replication

// Seals a ticket body with `a`'s current keys and opens it with `b`.
void ExpectTicketsCrossTokens(KeyStore &a, KeyStore &b) {
  Result<TicketKeys> ka = a.KeysForEncrypt();
  ASSERT_TRUE(ka.ok()) << ka.status().message();
  Bytes iv(16);
  for (size_t i = 0; i < iv.size(); ++i) iv[i] = static_cast<uint8_t>(i * 9);
  const std::string pt = "session state issued by server A";
  Sealed sealed = Seal(a, *ka, iv, pt);
  DecryptLookup kb = b.KeysForDecrypt(ka->name);
  // kOld only if an epoch boundary passed between the two calls.
  ASSERT_TRUE(kb.verdict == DecryptVerdict::kCurrent ||
              kb.verdict == DecryptVerdict::kOld)
      << static_cast<int>(kb.verdict);
  Result<std::string> opened =
      Open(b, kb.keys, ka->name, iv, sealed.ct, sealed.tag);
  ASSERT_TRUE(opened.ok()) << opened.status().message();
  EXPECT_EQ(*opened, pt);
}

TEST_F(CliTest, ExportImportWithRsaOaepBetweenTwoTokens) {
  SetUpRsaTransport("wrap-rsa");
  // The keys the ceremony made: unwrap-only on the receiver, trusted on the
  // sender.
  {
    p11::Session s = UserSession(kRecv);
    p11::Template t;
    t.Ulong(CKA_CLASS, CKO_PRIVATE_KEY).String(CKA_LABEL, "wrap-rsa");
    Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(s, t);
    ASSERT_TRUE(found.ok());
    ASSERT_EQ(found->size(), 1u);
    Result<std::vector<std::optional<bool>>> v = p11::ReadBools(
        s, (*found)[0],
        std::array{CKA_UNWRAP, CKA_DECRYPT, CKA_SIGN, CKA_SENSITIVE,
                   CKA_EXTRACTABLE, CKA_MODIFIABLE, CKA_COPYABLE, CKA_TOKEN});
    ASSERT_TRUE(v.ok());
    EXPECT_EQ(*v, (std::vector<std::optional<bool>>{
                      true, false, false, true, false, false, false, true}));
    p11::Template pubs;
    pubs.Ulong(CKA_CLASS, CKO_PUBLIC_KEY).String(CKA_LABEL, "wrap-rsa");
    EXPECT_TRUE(p11::FindObjects(s, pubs)->empty());  // only the PEM left
    p11::Session a = UserSession(kSend);
    Result<std::vector<CK_OBJECT_HANDLE>> trusted = p11::FindObjects(a, pubs);
    ASSERT_TRUE(trusted.ok());
    ASSERT_EQ(trusted->size(), 1u);
    Result<std::vector<std::optional<bool>>> tv = p11::ReadBools(
        a, (*trusted)[0],
        std::array{CKA_TRUSTED, CKA_WRAP, CKA_ENCRYPT, CKA_MODIFIABLE});
    ASSERT_TRUE(tv.ok());
    EXPECT_EQ(*tv,
              (std::vector<std::optional<bool>>{true, true, false, false}));
  }

  RunResult p = Cli({"provision", Uri(kSend, "fleet"), "--replicable"});
  ASSERT_EQ(p.code, 0) << Describe(p);
  const std::string id = PrintedId(p);
  const std::string bundle = Scratch() + "/fleet-rsa.bundle";
  RunResult e = Cli({"export", Uri(kSend, "fleet"), "--id", id, "--wrap-key",
                     "pkcs11:object=wrap-rsa", "--signer",
                     SignerUri("wrap-rsa"), "--out", bundle});
  ASSERT_EQ(e.code, 0) << Describe(e);
  const std::string text = ReadAll(bundle);
  // SoftHSM 2.6 refuses SHA-256 OAEP for wrapping: the SHA-1 fallback.
  EXPECT_NE(text.find("\nmechanism rsa-oaep-sha1\n"), std::string::npos);
  EXPECT_EQ(text.find("\nlabel fleet\nstore-id " + id + "\n"),
            std::string("hsmstek-bundle 1").size());
  // The user PIN of the receiving token is not enough to unwrap the bundle
  // into a readable key: the unwrap key's CKA_UNWRAP_TEMPLATE forbids it.
  {
    Result<Bundle> parsed = ParseBundle(text);
    ASSERT_TRUE(parsed.ok());
    p11::Session s = UserSession(kRecv);
    p11::Template t;
    t.Ulong(CKA_CLASS, CKO_PRIVATE_KEY).String(CKA_LABEL, "wrap-rsa");
    Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(s, t);
    ASSERT_TRUE(found.ok());
    ASSERT_EQ(found->size(), 1u);
    p11::Template readable;
    readable.Ulong(CKA_CLASS, CKO_SECRET_KEY)
        .Ulong(CKA_KEY_TYPE, CKK_AES)
        .Bool(CKA_TOKEN, false)
        .Bool(CKA_SENSITIVE, false)
        .Bool(CKA_EXTRACTABLE, true);
    CK_RSA_PKCS_OAEP_PARAMS oaep{CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED,
                                 nullptr, 0};
    CK_MECHANISM mech{CKM_RSA_PKCS_OAEP, &oaep, sizeof(oaep)};
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    Status unwrap = P11_CALL(s, C_UnwrapKey, s.handle(), &mech, (*found)[0],
                             parsed->wrapped.data(), parsed->wrapped.size(),
                             readable.data(), readable.size(), &h);
    EXPECT_EQ(unwrap.ckr(), CKR_TEMPLATE_INCONSISTENT) << unwrap.message();
  }
  RunResult i = Cli({"import", Uri(kRecv, "fleet"), "--unwrap-key",
                     "pkcs11:object=wrap-rsa", "--in", bundle});
  ASSERT_EQ(i.code, 0) << Describe(i);
  EXPECT_EQ(i.out.find("WARNING"), std::string::npos);

  Json ja = StatusJson(kSend, "fleet");
  Json jb = StatusJson(kRecv, "fleet");
  EXPECT_EQ(StoreEntry(jb, id)["check"], StoreEntry(ja, id)["check"]);
  EXPECT_EQ(StoreEntry(jb, id)["state"], "active");
  EXPECT_EQ(StoreEntry(jb, id)["activation"], StoreEntry(ja, id)["activation"]);
  auto a = OpenStore(kSend, "fleet");
  auto b = OpenStore(kRecv, "fleet");
  EXPECT_EQ(StoreEntry(jb, id)["check"], Check(*b, id));
  ExpectTicketsCrossTokens(*a, *b);

  // The imported master has the docs/FORMAT.md attributes (still replicable).
  std::vector<Master> m = Masters(kRecv, "fleet");
  ASSERT_EQ(m.size(), 1u);
  p11::Session s = UserSession(kRecv);
  Result<std::vector<std::optional<bool>>> v = p11::ReadBools(
      s, m[0].key,
      std::array{CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, CKA_EXTRACTABLE,
                 CKA_WRAP_WITH_TRUSTED, CKA_DERIVE, CKA_ENCRYPT, CKA_DECRYPT,
                 CKA_SIGN, CKA_VERIFY, CKA_WRAP, CKA_UNWRAP, CKA_MODIFIABLE});
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, (std::vector<std::optional<bool>>{true, true, true, true, true,
                                                  true, false, false, false,
                                                  false, false, false, false}));

  // The same bundle twice: the same link with the same check value is
  // already there; nothing added.
  const size_t objects = CountTokenObjects(kRecv);
  RunResult again = Cli({"import", Uri(kRecv, "fleet"), "--unwrap-key",
                         "pkcs11:object=wrap-rsa", "--in", bundle});
  EXPECT_EQ(again.code, 0) << Describe(again);
  EXPECT_NE(again.out.find("already holds ratchet link 0 with check value"),
            std::string::npos)
      << again.out;
  EXPECT_EQ(CountTokenObjects(kRecv), objects);

  // Both tokens as one store (status --token): the replica is verified,
  // each token's health shown.
  RunResult both = Cli({"status", "--json", Uri(kSend, "fleet"), "--token",
                        Uri(kRecv, "fleet")});
  ASSERT_EQ(both.code, 0) << Describe(both);
  Json j = Json::parse(both.out, nullptr, /*allow_exceptions=*/false);
  ASSERT_TRUE(j.is_object()) << both.out;
  ASSERT_EQ(j["tokens"].size(), 2u) << both.out;
  EXPECT_EQ(j["tokens"][0]["up"], true);
  EXPECT_EQ(j["tokens"][1]["up"], true);
  EXPECT_EQ(j["tokens"][1]["verified"], true);
  EXPECT_EQ(j["tokens"][1]["failovers"], 0);
  EXPECT_TRUE(j["tokens_error"].is_null()) << both.out;
}

TEST_F(CliTest, ExportImportWithAesKeyWrapPadBetweenTwoTokens) {
  RunResult p = Cli({"provision", Uri(kAesA, "edge"), "--replicable"});
  ASSERT_EQ(p.code, 0) << Describe(p);
  const std::string id = PrintedId(p);
  const std::string bundle = Scratch() + "/edge-aes.bundle";
  RunResult e = Cli({"export", Uri(kAesA, "edge"), "--id", id, "--wrap-key",
                     "pkcs11:object=transport", "--signer",
                     "pkcs11:object=" + AesSigner(kAesA), "--out", bundle});
  ASSERT_EQ(e.code, 0) << Describe(e);
  const std::string text = ReadAll(bundle);
  EXPECT_NE(text.find("\nmechanism aes-key-wrap-pad\n"), std::string::npos);
  EXPECT_NE(text.find("\nrecipient " +
                      HexEncode(ByteSpan(
                          reinterpret_cast<const uint8_t *>(kTransportId),
                          std::strlen(kTransportId))) +
                      "\n"),
            std::string::npos);
  RunResult i = Cli({"import", Uri(kAesB, "edge"), "--unwrap-key",
                     "pkcs11:object=transport", "--in", bundle});
  ASSERT_EQ(i.code, 0) << Describe(i);
  Json ja = StatusJson(kAesA, "edge");
  Json jb = StatusJson(kAesB, "edge");
  EXPECT_EQ(StoreEntry(jb, id)["check"], StoreEntry(ja, id)["check"]);
  auto a = OpenStore(kAesA, "edge");
  auto b = OpenStore(kAesB, "edge");
  ExpectTicketsCrossTokens(*a, *b);
  // And back again: B's copy is replicable under B's trusted key too.
  const std::string back = Scratch() + "/edge-back.bundle";
  RunResult e2 = Cli({"export", Uri(kAesB, "edge"), "--id", id, "--wrap-key",
                      "pkcs11:object=transport", "--signer",
                      "pkcs11:object=" + AesSigner(kAesB), "--out", back});
  EXPECT_EQ(e2.code, 0) << Describe(e2);
}

TEST_F(CliTest, TamperedOrMisdirectedBundlesAreRefusedAndLeaveNothing) {
  SetUpRsaTransport("wrap-tamper");
  RunResult p = Cli({"provision", Uri(kSend, "tamper"), "--replicable"});
  ASSERT_EQ(p.code, 0) << Describe(p);
  const std::string id = PrintedId(p);
  const std::string good = Scratch() + "/tamper.bundle";
  ASSERT_EQ(Cli({"export", Uri(kSend, "tamper"), "--id", id, "--wrap-key",
                 "pkcs11:object=wrap-tamper", "--signer",
                 SignerUri("wrap-tamper"), "--out", good})
                .code,
            0);
  const std::string text = ReadAll(good);
  const size_t objects = CountTokenObjects(kRecv);
  int n = 0;
  auto import = [&](const std::string &contents,
                    const std::string &label = "tamper") {
    const std::string path = Scratch() + "/t" + std::to_string(++n) + ".bundle";
    WriteAll(path, contents);
    return Cli({"import", Uri(kRecv, label), "--unwrap-key",
                "pkcs11:object=wrap-tamper", "--in", path});
  };

  // A flipped byte in each line: the signature (or the strict parser)
  // catches it.
  size_t line_start = 0;
  int line_no = 0;
  while (line_start < text.size()) {
    ++line_no;
    size_t nl = text.find('\n', line_start);
    std::string bad = text;
    char &c = bad[nl - 1];
    c = c == 'a' ? 'b' : 'a';
    RunResult r = import(bad);
    EXPECT_EQ(r.code, 1) << "line " << line_no << ": " << Describe(r);
    line_start = nl + 1;
  }
  EXPECT_EQ(line_no, 12);
  // Cut short anywhere.
  for (size_t cut : {size_t{0}, size_t{10}, text.size() / 2, text.size() - 1}) {
    RunResult r = import(text.substr(0, cut));
    EXPECT_EQ(r.code, 1) << cut;
    EXPECT_TRUE(r.err.find("truncated") != std::string::npos ||
                r.err.find("empty bundle") != std::string::npos ||
                r.err.find("not an hsmstek bundle") != std::string::npos)
        << cut << ": " << r.err;
  }

  // Edits of any signed field (the text re-serialized, the signature
  // kept): the signature no longer verifies, before anything is unwrapped.
  Result<Bundle> parsed = ParseBundle(text);
  ASSERT_TRUE(parsed.ok()) << parsed.status().message();
  auto expect_altered = [&](const Bundle &edited, const char *what) {
    RunResult r = import(SerializeBundle(edited));
    EXPECT_EQ(r.code, 1) << what;
    EXPECT_NE(r.err.find("bundle signature is invalid: the bundle was altered"),
              std::string::npos)
        << what << ": " << r.err;
  };
  Bundle wrong_check = *parsed;
  wrong_check.check[0] ^= 1;
  expect_altered(wrong_check, "check");
  Bundle wrong_wrapped = *parsed;
  wrong_wrapped.wrapped[7] ^= 0x80;
  expect_altered(wrong_wrapped, "wrapped");
  Bundle wrong_key = *parsed;
  wrong_key.wrapping_key_id[0] ^= 1;
  expect_altered(wrong_key, "recipient");
  Bundle sha256 = *parsed;
  sha256.mechanism = WrapMechanism::kRsaOaepSha256;
  expect_altered(sha256, "mechanism");
  Bundle later = *parsed;
  later.not_after += 3600;
  expect_altered(later, "not-after");
  Bundle aes = *parsed;
  aes.mechanism = WrapMechanism::kAesKeyWrapPad;
  RunResult r5 = import(SerializeBundle(aes));
  EXPECT_EQ(r5.code, 1);
  EXPECT_NE(r5.err.find("no secret key matches --unwrap-key"),
            std::string::npos)
      << r5.err;
  // A signature of the wrong length is refused by the parser.
  std::string short_sig = text;
  short_sig.erase(short_sig.size() - 3, 2);
  RunResult r6 = import(short_sig);
  EXPECT_EQ(r6.code, 1);
  EXPECT_NE(r6.err.find("bundle signature line: expected 128 hex digits"),
            std::string::npos)
      << r6.err;

  // A bundle for another label, as is and relabelled.
  RunResult other = import(text, "another");
  EXPECT_EQ(other.code, 1);
  EXPECT_EQ(other.err,
            "hsmstek: bundle is for label \"tamper\", not \"another\"\n");
  EXPECT_EQ(CountTokenObjects(kRecv), objects);

  // The untouched bundle still imports.
  RunResult ok = import(text);
  EXPECT_EQ(ok.code, 0) << Describe(ok);
  // The master, its policy and the import record.
  EXPECT_EQ(CountTokenObjects(kRecv), objects + 3);
}

TEST_F(CliTest, ExportRefusesNonReplicableMastersAndUntrustedKeys) {
  const std::string pem = SetUpRsaTransport("wrap-refuse");
  RunResult p = Cli({"provision", Uri(kSend, "local-only")});
  ASSERT_EQ(p.code, 0);
  const std::string out = Scratch() + "/local-only.bundle";
  RunResult e = Cli({"export", Uri(kSend, "local-only"), "--id", PrintedId(p),
                     "--wrap-key", "pkcs11:object=wrap-refuse", "--signer",
                     SignerUri("wrap-refuse"), "--out", out});
  EXPECT_EQ(e.code, 1);
  EXPECT_NE(e.err.find("master " + PrintedId(p) +
                       " of \"local-only\" is not replicable"),
            std::string::npos)
      << e.err;
  EXPECT_FALSE(std::filesystem::exists(out));

  // An RSA public key the user installed (not trusted) cannot carry a
  // replicable master: the tool says so, and SoftHSM itself refuses.
  Result<RsaPublicKey> key = RsaPublicKeyFromPem(ReadAll(pem));
  ASSERT_TRUE(key.ok());
  p11::Session s = UserSession(kSend);
  p11::Template t;
  t.Ulong(CKA_CLASS, CKO_PUBLIC_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_RSA)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, false)
      .Bool(CKA_WRAP, true)
      .String(CKA_LABEL, "untrusted")
      .Data(CKA_MODULUS, key->modulus)
      .Data(CKA_PUBLIC_EXPONENT, key->exponent);
  CK_OBJECT_HANDLE untrusted;
  ASSERT_TRUE(
      P11_CALL(s, C_CreateObject, s.handle(), t.data(), t.size(), &untrusted)
          .ok());
  // Only the SO may set CKA_TRUSTED.
  p11::Template trusted;
  trusted.Ulong(CKA_CLASS, CKO_PUBLIC_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_RSA)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, false)
      .Bool(CKA_WRAP, true)
      .Bool(CKA_TRUSTED, true)
      .String(CKA_LABEL, "would-be-trusted")
      .Data(CKA_MODULUS, key->modulus)
      .Data(CKA_PUBLIC_EXPONENT, key->exponent);
  CK_OBJECT_HANDLE h;
  Status refused = P11_CALL(s, C_CreateObject, s.handle(), trusted.data(),
                            trusted.size(), &h);
  EXPECT_EQ(refused.ckr(), CKR_ATTRIBUTE_READ_ONLY);

  RunResult r = Cli({"provision", Uri(kSend, "repl2"), "--replicable"});
  ASSERT_EQ(r.code, 0);
  RunResult e2 = Cli({"export", Uri(kSend, "repl2"), "--id", PrintedId(r),
                      "--wrap-key", "pkcs11:object=untrusted", "--signer",
                      SignerUri("wrap-refuse"), "--out", out});
  EXPECT_EQ(e2.code, 1);
  EXPECT_NE(e2.err.find("has CKA_TRUSTED=FALSE"), std::string::npos) << e2.err;
  EXPECT_FALSE(std::filesystem::exists(out));
  std::vector<Master> m = Masters(kSend, "repl2");
  ASSERT_EQ(m.size(), 1u);
  CK_RSA_PKCS_OAEP_PARAMS oaep{CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED,
                               nullptr, 0};
  CK_MECHANISM mech{CKM_RSA_PKCS_OAEP, &oaep, sizeof(oaep)};
  CK_ULONG len = 0;
  Status wrap = P11_CALL(s, C_WrapKey, s.handle(), &mech, untrusted, m[0].key,
                         nullptr, &len);
  EXPECT_EQ(wrap.ckr(), CKR_KEY_NOT_WRAPPABLE) << wrap.message();

  // The SO ceremony with a wrong SO PIN fails cleanly.
  const std::string bad_so = Scratch() + "/bad-so.pin";
  WriteAll(bad_so, "00000000\n");
  RunResult so = Cli({"wrap-key", "trust", UriWithoutPin(kSend, "wrap-x"),
                      "--in", pem, "--so-pin-source", "file:" + bad_so});
  EXPECT_EQ(so.code, 1);
  EXPECT_NE(so.err.find("CKR_PIN_INCORRECT"), std::string::npos) << so.err;
  // Nor can the same public key be trusted twice.
  RunResult twice =
      Cli({"wrap-key", "trust", UriWithoutPin(kSend, "wrap-y"), "--in", pem,
           "--so-pin-source", "file:" + SoPinFile()});
  EXPECT_EQ(twice.code, 1);
  EXPECT_NE(twice.err.find("is already installed"), std::string::npos)
      << twice.err;
  // And an existing PEM is never overwritten.
  RunResult clobber =
      Cli({"wrap-key", "generate", Uri(kRecv, "wrap-z"), "--out", pem});
  EXPECT_EQ(clobber.code, 1);
  EXPECT_NE(clobber.err.find("refusing to overwrite " + pem),
            std::string::npos);
}

// ---------------------------------------------------------------------------
// Forged and replayed bundles: what an attacker with public material only
// (the receiver's PEM, a genuine bundle, the key names) can build.

// RSA-OAEP (SHA-1, as SoftHSM 2.6 unwraps) of `key` under the PEM public
// key, in software.
Bytes OaepWrap(const std::string &pem, ByteSpan key) {
  BIO *bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  EVP_PKEY *pkey = PEM_read_bio_PUBKEY(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  EXPECT_NE(pkey, nullptr);
  EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pkey, nullptr);
  EXPECT_EQ(EVP_PKEY_encrypt_init(ctx), 1);
  EXPECT_EQ(EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING), 1);
  size_t len = 0;
  EXPECT_EQ(EVP_PKEY_encrypt(ctx, nullptr, &len, key.data(), key.size()), 1);
  Bytes out(len);
  EXPECT_EQ(EVP_PKEY_encrypt(ctx, out.data(), &len, key.data(), key.size()), 1);
  out.resize(len);
  EVP_PKEY_CTX_free(ctx);
  EVP_PKEY_free(pkey);
  return out;
}

// The check value of a master whose value is `key`, in software: the
// derivation is public (docs/FORMAT.md).
std::array<uint8_t, kCheckValueSize> SoftwareCheckValue(ByteSpan key) {
  const auto data = DerivationData(kPurposeCheck, kCheckEpoch);
  EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
  uint8_t derived[32];
  int n = 0;
  EXPECT_EQ(
      EVP_EncryptInit_ex(ctx, EVP_aes_256_ecb(), nullptr, key.data(), nullptr),
      1);
  EVP_CIPHER_CTX_set_padding(ctx, 0);
  EXPECT_EQ(EVP_EncryptUpdate(ctx, derived, &n, data.data(),
                              static_cast<int>(data.size())),
            1);
  EXPECT_EQ(n, 32);
  EVP_CIPHER_CTX_free(ctx);
  uint8_t mac[32];
  unsigned int mac_len = 0;
  HMAC(EVP_sha256(), derived, sizeof(derived),
       reinterpret_cast<const uint8_t *>(kCheckMessage), kCheckMessageSize, mac,
       &mac_len);
  std::array<uint8_t, kCheckValueSize> out;
  std::copy(mac, mac + kCheckValueSize, out.begin());
  return out;
}

// A P-256 signer that nobody pinned, in software.
struct SoftwareSigner {
  EVP_PKEY *key = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
  ~SoftwareSigner() { EVP_PKEY_free(key); }

  Bytes Fingerprint() const {
    Result<Bytes> f = PublicKeyFingerprint(key);
    EXPECT_TRUE(f.ok());
    return f.ok() ? *f : Bytes();
  }
  std::string Pem() const {
    Result<std::string> pem = PublicKeyPem(key);
    EXPECT_TRUE(pem.ok());
    return pem.ok() ? *pem : "";
  }
  // ECDSA over SHA-256 of `text`, as r || s.
  Bytes Sign(const std::string &text) const {
    uint8_t md[32];
    SHA256(reinterpret_cast<const uint8_t *>(text.data()), text.size(), md);
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(key, nullptr);
    EXPECT_EQ(EVP_PKEY_sign_init(ctx), 1);
    uint8_t der[128];
    size_t der_len = sizeof(der);
    EXPECT_EQ(EVP_PKEY_sign(ctx, der, &der_len, md, sizeof(md)), 1);
    EVP_PKEY_CTX_free(ctx);
    const uint8_t *p = der;
    ECDSA_SIG *sig = d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(der_len));
    Bytes out(64);
    BN_bn2binpad(ECDSA_SIG_get0_r(sig), out.data(), 32);
    BN_bn2binpad(ECDSA_SIG_get0_s(sig), out.data() + 32, 32);
    ECDSA_SIG_free(sig);
    return out;
  }
};

TEST_F(CliTest, SoftwareCheckValueIsTheTokensCheckValue) {
  // The forgery below is exact: for a key of known value, the software
  // check value equals the one the token computes.
  Bytes k(32);
  for (size_t i = 0; i < k.size(); ++i) k[i] = static_cast<uint8_t>(0xa5 ^ i);
  p11::Session s = UserSession(kMain);
  p11::Template t;
  t.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_AES)
      .Bool(CKA_TOKEN, false)
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, false)
      .Bool(CKA_DERIVE, true)
      .Data(CKA_VALUE, k);
  CK_OBJECT_HANDLE h;
  ASSERT_TRUE(
      P11_CALL(s, C_CreateObject, s.handle(), t.data(), t.size(), &h).ok());
  p11::ScopedObject owner(s, h);
  Result<std::array<uint8_t, kCheckValueSize>> in_token =
      ComputeCheckValue(s, h);
  ASSERT_TRUE(in_token.ok()) << in_token.status().message();
  EXPECT_EQ(*in_token, SoftwareCheckValue(k));
}

TEST_F(CliTest, ForgedAlteredMisdirectedStaleAndReplayedBundlesChangeNothing) {
  const std::string pem = SetUpRsaTransport("wrap-forge");
  // The receiver's own master, so that `status` has something to show.
  ASSERT_EQ(Cli({"provision", Uri(kRecv, "forge")}).code, 0);
  RunResult p = Cli({"provision", Uri(kSend, "forge"), "--replicable"});
  ASSERT_EQ(p.code, 0) << Describe(p);
  const std::string id = PrintedId(p);
  const std::string genuine_path = Scratch() + "/forge.bundle";
  RunResult e = Cli({"export", Uri(kSend, "forge"), "--id", id, "--wrap-key",
                     "pkcs11:object=wrap-forge", "--signer",
                     SignerUri("wrap-forge"), "--out", genuine_path});
  ASSERT_EQ(e.code, 0) << Describe(e);
  const std::string text = ReadAll(genuine_path);
  Result<Bundle> genuine = ParseBundle(text);
  ASSERT_TRUE(genuine.ok()) << genuine.status().message();

  const Json before = StatusJson(kRecv, "forge")["stores"];
  const size_t objects = CountTokenObjects(kRecv);
  int n = 0;
  auto import = [&](const std::string &contents,
                    const std::vector<std::string> &extra = {}) {
    const std::string path = Scratch() + "/f" + std::to_string(++n) + ".bundle";
    WriteAll(path, contents);
    std::vector<std::string> args = {"import",       Uri(kRecv, "forge"),
                                     "--unwrap-key", "pkcs11:object=wrap-forge",
                                     "--in",         path};
    args.insert(args.end(), extra.begin(), extra.end());
    return Cli(args);
  };
  auto refused = [&](const RunResult &r, const std::string &why) {
    EXPECT_EQ(r.code, 1) << Describe(r);
    EXPECT_NE(r.err.find(why), std::string::npos) << r.err;
    EXPECT_EQ(StatusJson(kRecv, "forge")["stores"], before);
    EXPECT_EQ(CountTokenObjects(kRecv), objects);
  };

  // The forged-bundle attack (docs/SECURITY.md §5): a master K the attacker
  // knows, wrapped under the public PEM, with its check value and (version 1)
  // digest recomputed.
  Bytes k(32);
  for (size_t i = 0; i < k.size(); ++i) k[i] = static_cast<uint8_t>(7 * i + 1);
  Bundle forged = *genuine;
  forged.store_id[0] ^= 0x55;
  forged.wrapped = OaepWrap(ReadAll(pem), k);
  forged.check = SoftwareCheckValue(k);
  Bundle v1 = forged;
  v1.version = 1;
  refused(import(SerializeBundle(v1)), "unsigned bundle (version 1)");
  // The same as version 2 with the genuine signer line and signature.
  refused(import(SerializeBundle(forged)),
          "bundle signature is invalid: the bundle was altered");
  // Signed by the attacker's own key.
  SoftwareSigner attacker;
  forged.signer = attacker.Fingerprint();
  forged.signature = attacker.Sign(BundleSignedText(forged));
  refused(import(SerializeBundle(forged)),
          "unknown signer " + HexEncode(forged.signer) +
              ": no public key with that fingerprint is in this token");
  // ... whose public key a user-PIN holder put into the receiving token:
  // not trusted, and the user cannot make it so.
  {
    Result<EcPublicKey> ec = EcPublicKeyFromPem(attacker.Pem());
    ASSERT_TRUE(ec.ok()) << ec.status().message();
    Bytes point = {0x04, 0x41};
    point.insert(point.end(), ec->point.begin(), ec->point.end());
    const uint8_t p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48,
                            0xce, 0x3d, 0x03, 0x01, 0x07};
    p11::Session s = UserSession(kRecv);
    auto make = [&](bool trusted) {
      p11::Template t;
      t.Ulong(CKA_CLASS, CKO_PUBLIC_KEY)
          .Ulong(CKA_KEY_TYPE, CKK_EC)
          .Bool(CKA_TOKEN, true)
          .Bool(CKA_PRIVATE, false)
          .Bool(CKA_VERIFY, true)
          .Data(CKA_ID, forged.signer)
          .Data(CKA_EC_PARAMS, p256)
          .Data(CKA_EC_POINT, point);
      if (trusted) t.Bool(CKA_TRUSTED, true);
      CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
      Status st =
          P11_CALL(s, C_CreateObject, s.handle(), t.data(), t.size(), &h);
      return std::make_pair(st, h);
    };
    EXPECT_EQ(make(true).first.ckr(), CKR_ATTRIBUTE_READ_ONLY);
    // Nor by generating a key pair whose public half is trusted.
    {
      p11::Template gpub;
      gpub.Bool(CKA_TOKEN, false)
          .Data(CKA_EC_PARAMS, p256)
          .Bool(CKA_VERIFY, true)
          .Bool(CKA_TRUSTED, true);
      p11::Template gpriv;
      gpriv.Bool(CKA_TOKEN, false)
          .Bool(CKA_SENSITIVE, true)
          .Bool(CKA_EXTRACTABLE, false)
          .Bool(CKA_SIGN, true);
      CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
      CK_OBJECT_HANDLE gp = CK_INVALID_HANDLE, gk = CK_INVALID_HANDLE;
      EXPECT_EQ(P11_CALL(s, C_GenerateKeyPair, s.handle(), &gen, gpub.data(),
                         gpub.size(), gpriv.data(), gpriv.size(), &gp, &gk)
                    .ckr(),
                CKR_ATTRIBUTE_READ_ONLY);
    }
    auto [st, h] = make(false);
    ASSERT_TRUE(st.ok()) << st.message();
    p11::ScopedObject owner(s, h);
    p11::Template set;
    set.Bool(CKA_TRUSTED, true);
    EXPECT_EQ(
        P11_CALL(s, C_SetAttributeValue, s.handle(), h, set.data(), set.size())
            .ckr(),
        CKR_ATTRIBUTE_READ_ONLY);
    RunResult r = import(SerializeBundle(forged));
    EXPECT_EQ(r.code, 1);
    EXPECT_NE(r.err.find("unknown signer " + HexEncode(forged.signer) +
                         ": its public key is weaker than required: "
                         "CKA_TRUSTED is FALSE"),
              std::string::npos)
        << r.err;
    // Nor can a user copy the pinned signer (to give it another point).
    p11::Template pinned;
    pinned.Ulong(CKA_CLASS, CKO_PUBLIC_KEY)
        .String(CKA_LABEL, SignerOf("wrap-forge"));
    Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(s, pinned);
    ASSERT_TRUE(found.ok());
    ASSERT_EQ(found->size(), 1u);
    p11::Template copy;
    copy.Data(CKA_EC_POINT, point);
    CK_OBJECT_HANDLE c;
    EXPECT_EQ(P11_CALL(s, C_CopyObject, s.handle(), (*found)[0], copy.data(),
                       copy.size(), &c)
                  .ckr(),
              CKR_ACTION_PROHIBITED);
  }
  EXPECT_EQ(CountTokenObjects(kRecv), objects);

  // Point 2: a genuine bundle with its policy rewritten in transit.
  Bundle rewritten = *genuine;
  rewritten.policy.not_before -= 3600;
  rewritten.policy.decrypt_window_s *= 2;
  refused(import(SerializeBundle(rewritten)),
          "bundle signature is invalid: the bundle was altered");

  // A genuine bundle for another recipient (the receiver's second unwrap
  // key): refused before anything is unwrapped.
  const std::string pem2 = Scratch() + "/wrap-forge-2.pem";
  ASSERT_EQ(
      Cli({"wrap-key", "generate", Uri(kRecv, "wrap-forge-2"), "--out", pem2})
          .code,
      0);
  ASSERT_EQ(Cli({"wrap-key", "trust", UriWithoutPin(kSend, "wrap-forge-2"),
                 "--in", pem2, "--so-pin-source", "file:" + SoPinFile()})
                .code,
            0);
  const size_t objects_now = CountTokenObjects(kRecv);
  const std::string other = Scratch() + "/forge-other.bundle";
  ASSERT_EQ(Cli({"export", Uri(kSend, "forge"), "--id", id, "--wrap-key",
                 "pkcs11:object=wrap-forge-2", "--signer",
                 SignerUri("wrap-forge"), "--out", other})
                .code,
            0);
  RunResult wrong = import(ReadAll(other));
  EXPECT_EQ(wrong.code, 1);
  EXPECT_NE(wrong.err.find("wrong recipient: the bundle is for key "),
            std::string::npos)
      << wrong.err;
  EXPECT_EQ(CountTokenObjects(kRecv), objects_now);

  // A bundle the sending token signed two days ago, valid for one.
  {
    p11::Session s = UserSession(kSend);
    ExportOptions old;
    old.signer = *p11::ParseTokenUri(SignerUri("wrap-forge"));
    old.now = Now() - 2 * 86400;
    old.valid_for_s = 86400;
    Result<Bundle> stale =
        ExportMaster(s, "forge", ToStoreId(id),
                     *p11::ParseTokenUri("pkcs11:object=wrap-forge"), old);
    ASSERT_TRUE(stale.ok()) << stale.status().message();
    RunResult r = import(SerializeBundle(*stale));
    EXPECT_EQ(r.code, 1);
    EXPECT_NE(r.err.find("stale bundle: it expired at " +
                         FormatRfc3339(old.now + old.valid_for_s)),
              std::string::npos)
        << r.err;
  }
  // The check value confirmed out of band does not match.
  RunResult mismatch = import(text, {"--expect-check", "0000000000000000"});
  EXPECT_EQ(mismatch.code, 1);
  EXPECT_NE(mismatch.err.find("the bundle's check value " +
                              HexEncode(genuine->check) +
                              " is not the expected 0000000000000000"),
            std::string::npos)
      << mismatch.err;
  EXPECT_EQ(CountTokenObjects(kRecv), objects_now);

  // Genuine: imports.
  RunResult ok = import(text, {"--expect-check", HexEncode(genuine->check)});
  ASSERT_EQ(ok.code, 0) << Describe(ok);
  EXPECT_EQ(Masters(kRecv, "forge").size(), 2u);
  // Replayed while the master is there: nothing changes (the same link,
  // the same check value); after the master was destroyed: refused.
  RunResult again = import(text);
  EXPECT_EQ(again.code, 0) << Describe(again);
  EXPECT_NE(again.out.find("nothing imported"), std::string::npos) << again.out;
  EXPECT_EQ(Masters(kRecv, "forge").size(), 2u);
  ASSERT_EQ(
      Cli({"destroy", Uri(kRecv, "forge"), "--id", id, "--yes", "--force"})
          .code,
      0);
  RunResult replayed = import(text);
  EXPECT_EQ(replayed.code, 1);
  EXPECT_NE(replayed.err.find("replayed bundle: master " + id +
                              " was imported into store \"forge\" before"),
            std::string::npos)
      << replayed.err;
  EXPECT_EQ(Masters(kRecv, "forge").size(), 1u);
}

// Whoever holds the sending token's user PIN for a while can make its
// signer sign anything (C_Sign). A bundle they mint then, planting a key
// they know, must not stay importable after they lose the PIN: import caps
// the validity as export does.
TEST_F(CliTest, BundlesMintedWithTheSendersPinExpireWithinAWeek) {
  const std::string pem = SetUpRsaTransport("wrap-mint");
  RunResult p = Cli({"provision", Uri(kSend, "mint"), "--replicable"});
  ASSERT_EQ(p.code, 0) << Describe(p);
  const std::string path = Scratch() + "/mint-genuine.bundle";
  ASSERT_EQ(Cli({"export", Uri(kSend, "mint"), "--id", PrintedId(p),
                 "--wrap-key", "pkcs11:object=wrap-mint", "--signer",
                 SignerUri("wrap-mint"), "--out", path})
                .code,
            0);
  Result<Bundle> genuine = ParseBundle(ReadAll(path));
  ASSERT_TRUE(genuine.ok()) << genuine.status().message();
  ASSERT_EQ(genuine->mechanism, WrapMechanism::kRsaOaepSha1);
  Bytes k(32);
  for (size_t i = 0; i < k.size(); ++i) k[i] = static_cast<uint8_t>(3 * i + 5);
  Bundle minted = *genuine;
  minted.store_id[0] ^= 0x33;
  minted.wrapped = OaepWrap(ReadAll(pem), k);
  minted.check = SoftwareCheckValue(k);
  minted.created = Now();
  minted.not_after = minted.created + 10 * 365 * 86400;
  {
    p11::Session s = UserSession(kSend);
    Status st =
        SignBundle(s, *p11::ParseTokenUri(SignerUri("wrap-mint")), minted);
    ASSERT_TRUE(st.ok()) << st.message();
  }
  const std::string out = Scratch() + "/mint.bundle";
  WriteAll(out, SerializeBundle(minted));
  const size_t objects = CountTokenObjects(kRecv);
  RunResult r = Cli({"import", Uri(kRecv, "mint"), "--unwrap-key",
                     "pkcs11:object=wrap-mint", "--in", out});
  EXPECT_EQ(r.code, 1) << Describe(r);
  EXPECT_NE(r.err.find("bundle validity is longer than 7d"), std::string::npos)
      << r.err;
  EXPECT_EQ(CountTokenObjects(kRecv), objects);
  EXPECT_TRUE(Masters(kRecv, "mint").empty());
}

// The import record is what stops a destroyed master from coming back
// through its old bundle. A user-PIN holder on the receiving token must not
// be able to erase or relabel it and then replay the bundle.
TEST_F(CliTest, AUserPinHolderCannotEraseTheImportRecord) {
  SetUpRsaTransport("wrap-record");
  RunResult p = Cli({"provision", Uri(kSend, "record"), "--replicable"});
  ASSERT_EQ(p.code, 0) << Describe(p);
  const std::string id = PrintedId(p);
  const std::string path = Scratch() + "/record.bundle";
  ASSERT_EQ(Cli({"export", Uri(kSend, "record"), "--id", id, "--wrap-key",
                 "pkcs11:object=wrap-record", "--signer",
                 SignerUri("wrap-record"), "--out", path})
                .code,
            0);
  const std::vector<std::string> import = {
      "import",       Uri(kRecv, "record"),
      "--unwrap-key", "pkcs11:object=wrap-record",
      "--in",         path};
  RunResult ok = Cli(import);
  ASSERT_EQ(ok.code, 0) << Describe(ok);
  ASSERT_EQ(
      Cli({"destroy", Uri(kRecv, "record"), "--id", id, "--yes", "--force"})
          .code,
      0);
  {
    p11::Session s = UserSession(kRecv);
    p11::Template q;
    q.Ulong(CKA_CLASS, CKO_DATA)
        .String(CKA_APPLICATION, "hsmstek-import")
        .String(CKA_LABEL, "record");
    Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(s, q);
    ASSERT_TRUE(found.ok());
    ASSERT_EQ(found->size(), 1u);
    const CK_OBJECT_HANDLE record = (*found)[0];
    p11::Template relabel;
    relabel.String(CKA_LABEL, "elsewhere");
    EXPECT_EQ(P11_CALL(s, C_SetAttributeValue, s.handle(), record,
                       relabel.data(), relabel.size())
                  .ckr(),
              CKR_ACTION_PROHIBITED);
    EXPECT_EQ(P11_CALL(s, C_DestroyObject, s.handle(), record).ckr(),
              CKR_ACTION_PROHIBITED);
  }
  RunResult replayed = Cli(import);
  EXPECT_EQ(replayed.code, 1) << Describe(replayed);
  EXPECT_NE(replayed.err.find("replayed bundle: master " + id +
                              " was imported into store \"record\" before"),
            std::string::npos)
      << replayed.err;
  EXPECT_TRUE(Masters(kRecv, "record").empty());
}

TEST_F(CliTest, WeakTransportAndSigningKeysAreRefused) {
  RunResult p = Cli({"provision", Uri(kAesA, "weak"), "--replicable"});
  ASSERT_EQ(p.code, 0) << Describe(p);
  const std::string id = PrintedId(p);
  const std::string bundle = Scratch() + "/weak.bundle";
  ASSERT_EQ(Cli({"export", Uri(kAesA, "weak"), "--id", id, "--wrap-key",
                 "pkcs11:object=transport", "--signer",
                 "pkcs11:object=" + AesSigner(kAesA), "--out", bundle})
                .code,
            0);
  const size_t objects = CountTokenObjects(kAesB);
  const std::pair<const char *, const char *> kWeak[] = {
      {"weak-decrypt", "CKA_DECRYPT is TRUE (must be FALSE)"},
      {"weak-plain", "CKA_SENSITIVE is FALSE (must be TRUE)"}};
  for (const auto &[label, why] : kWeak) {
    RunResult r = Cli({"import", Uri(kAesB, "weak"), "--unwrap-key",
                       std::string("pkcs11:object=") + label, "--in", bundle});
    EXPECT_EQ(r.code, 1) << label;
    EXPECT_NE(r.err.find(std::string("transport key \"") + label + "\" (id " +
                         HexEncode(ByteSpan(
                             reinterpret_cast<const uint8_t *>(kTransportId),
                             std::strlen(kTransportId))) +
                         ") is weaker than required: " + why),
              std::string::npos)
        << r.err;
  }
  EXPECT_EQ(CountTokenObjects(kAesB), objects);

  // A signing key a user made extractable: export refuses to sign with it.
  p11::Session s = UserSession(kAesA);
  const uint8_t p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48,
                          0xce, 0x3d, 0x03, 0x01, 0x07};
  p11::Template pub;
  pub.Bool(CKA_TOKEN, true)
      .Data(CKA_EC_PARAMS, p256)
      .Bool(CKA_VERIFY, true)
      .String(CKA_LABEL, "weak-signer")
      .String(CKA_ID, "weak-signer");
  p11::Template priv;
  priv.Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, true)
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, true)
      .Bool(CKA_SIGN, true)
      .String(CKA_LABEL, "weak-signer")
      .String(CKA_ID, "weak-signer");
  CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE ph, kh;
  ASSERT_TRUE(P11_CALL(s, C_GenerateKeyPair, s.handle(), &gen, pub.data(),
                       pub.size(), priv.data(), priv.size(), &ph, &kh)
                  .ok());
  const std::string out = Scratch() + "/weak-signed.bundle";
  RunResult e = Cli({"export", Uri(kAesA, "weak"), "--id", id, "--wrap-key",
                     "pkcs11:object=transport", "--signer",
                     "pkcs11:object=weak-signer", "--out", out});
  EXPECT_EQ(e.code, 1);
  EXPECT_NE(e.err.find("is weaker than required: CKA_EXTRACTABLE is TRUE"),
            std::string::npos)
      << e.err;
  EXPECT_FALSE(std::filesystem::exists(out));
}

// AES transport keys a user-PIN holder could turn into a way to read the
// masters of every bundle (bundles are public): one that is modifiable
// (CKA_DECRYPT can be switched on), one without an unwrap template (unwrap
// with CKA_SENSITIVE=FALSE), and a wrapping key that can also unwrap.
TEST_F(CliTest, TransportKeysAUserCouldTurnAgainstBundlesAreRefused) {
  InstallUnwrapTransportKey(
      kAesB, {"weak-modifiable", kTransportId, false, true, true});
  InstallUnwrapTransportKey(
      kAesB, {"weak-untemplated", kTransportId, false, true, false, false});
  RunResult p = Cli({"provision", Uri(kAesA, "turn"), "--replicable"});
  ASSERT_EQ(p.code, 0) << Describe(p);
  const std::string id = PrintedId(p);
  const std::string path = Scratch() + "/turn.bundle";
  ASSERT_EQ(Cli({"export", Uri(kAesA, "turn"), "--id", id, "--wrap-key",
                 "pkcs11:object=transport", "--signer",
                 "pkcs11:object=" + AesSigner(kAesA), "--out", path})
                .code,
            0);
  Result<Bundle> bundle = ParseBundle(ReadAll(path));
  ASSERT_TRUE(bundle.ok());
  const size_t objects = CountTokenObjects(kAesB);
  const std::pair<const char *, const char *> kWeak[] = {
      {"weak-modifiable", "CKA_MODIFIABLE is TRUE (must be FALSE)"},
      {"weak-untemplated",
       "its CKA_UNWRAP_TEMPLATE does not force CKA_SENSITIVE=TRUE"}};
  for (const auto &[label, why] : kWeak) {
    RunResult r = Cli({"import", Uri(kAesB, "turn"), "--unwrap-key",
                       std::string("pkcs11:object=") + label, "--in", path});
    EXPECT_EQ(r.code, 1) << label;
    EXPECT_NE(r.err.find(why), std::string::npos) << r.err;
  }
  EXPECT_EQ(CountTokenObjects(kAesB), objects);
  // The export side: a wrapping key that also unwraps.
  const std::string out = Scratch() + "/turn-unwraps.bundle";
  RunResult e = Cli({"export", Uri(kAesA, "turn"), "--id", id, "--wrap-key",
                     "pkcs11:object=weak-unwraps", "--signer",
                     "pkcs11:object=" + AesSigner(kAesA), "--out", out});
  EXPECT_EQ(e.code, 1);
  EXPECT_NE(e.err.find("CKA_UNWRAP is TRUE (must be FALSE)"), std::string::npos)
      << e.err;
  EXPECT_FALSE(std::filesystem::exists(out));

  // Why: what each weak key lets a user do with the public bundle, and
  // what the accepted key refuses.
  auto find = [](p11::Session &s, const char *label) {
    p11::Template q;
    q.Ulong(CKA_CLASS, CKO_SECRET_KEY)
        .String(CKA_LABEL, label)
        .Bool(CKA_UNWRAP, true);
    Result<std::vector<CK_OBJECT_HANDLE>> f = p11::FindObjects(s, q);
    EXPECT_TRUE(f.ok() && f->size() == 1u) << label;
    return f.ok() && !f->empty() ? (*f)[0] : CK_INVALID_HANDLE;
  };
  auto readable = [&](p11::Session &s, CK_OBJECT_HANDLE key) {
    p11::Template t;
    t.Ulong(CKA_CLASS, CKO_SECRET_KEY)
        .Ulong(CKA_KEY_TYPE, CKK_AES)
        .Bool(CKA_TOKEN, false)
        .Bool(CKA_SENSITIVE, false)
        .Bool(CKA_EXTRACTABLE, true);
    CK_MECHANISM m{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
    Bytes wrapped = bundle->wrapped;
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    Status st = P11_CALL(s, C_UnwrapKey, s.handle(), &m, key, wrapped.data(),
                         wrapped.size(), t.data(), t.size(), &h);
    if (st.ok()) (void)P11_CALL(s, C_DestroyObject, s.handle(), h);
    return st;
  };
  p11::Session b = UserSession(kAesB);
  EXPECT_TRUE(readable(b, find(b, "weak-untemplated")).ok());
  EXPECT_EQ(readable(b, find(b, "transport")).ckr(), CKR_TEMPLATE_INCONSISTENT);
  p11::Template decrypt;
  decrypt.Bool(CKA_DECRYPT, true);
  EXPECT_TRUE(P11_CALL(b, C_SetAttributeValue, b.handle(),
                       find(b, "weak-modifiable"), decrypt.data(),
                       decrypt.size())
                  .ok());
  EXPECT_FALSE(P11_CALL(b, C_SetAttributeValue, b.handle(),
                        find(b, "transport"), decrypt.data(), decrypt.size())
                   .ok());
  p11::Session a = UserSession(kAesA);
  EXPECT_TRUE(readable(a, find(a, "weak-unwraps")).ok());
}

// A user-PIN holder of the sending token can create a signing key whose
// value they know, with every usage flag of a good one. Its holder could
// sign bundles outside the token, forever; export must not sign with it.
TEST_F(CliTest, ExportRefusesASigningKeyMadeOutsideTheToken) {
  RunResult p = Cli({"provision", Uri(kAesA, "known-signer"), "--replicable"});
  ASSERT_EQ(p.code, 0) << Describe(p);
  SoftwareSigner attacker;
  BIGNUM *d = nullptr;
  ASSERT_EQ(EVP_PKEY_get_bn_param(attacker.key, "priv", &d), 1);
  Bytes scalar(32);
  ASSERT_EQ(BN_bn2binpad(d, scalar.data(), 32), 32);
  BN_clear_free(d);
  Result<EcPublicKey> pub = EcPublicKeyFromPem(attacker.Pem());
  ASSERT_TRUE(pub.ok());
  Bytes point = {0x04, 0x41};
  point.insert(point.end(), pub->point.begin(), pub->point.end());
  const uint8_t p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48,
                          0xce, 0x3d, 0x03, 0x01, 0x07};
  {
    p11::Session s = UserSession(kAesA);
    p11::Template priv;
    priv.Ulong(CKA_CLASS, CKO_PRIVATE_KEY)
        .Ulong(CKA_KEY_TYPE, CKK_EC)
        .Bool(CKA_TOKEN, true)
        .Bool(CKA_PRIVATE, true)
        .Bool(CKA_SENSITIVE, true)
        .Bool(CKA_EXTRACTABLE, false)
        .Bool(CKA_MODIFIABLE, false)
        .Bool(CKA_COPYABLE, false)
        .Bool(CKA_SIGN, true)
        .Bool(CKA_SIGN_RECOVER, false)
        .Bool(CKA_DECRYPT, false)
        .Bool(CKA_UNWRAP, false)
        .Bool(CKA_DERIVE, false)
        .String(CKA_LABEL, "known-signer")
        .String(CKA_ID, "known-signer")
        .Data(CKA_EC_PARAMS, p256)
        .Data(CKA_VALUE, scalar);
    p11::Template pubt;
    pubt.Ulong(CKA_CLASS, CKO_PUBLIC_KEY)
        .Ulong(CKA_KEY_TYPE, CKK_EC)
        .Bool(CKA_TOKEN, true)
        .Bool(CKA_VERIFY, true)
        .String(CKA_LABEL, "known-signer")
        .String(CKA_ID, "known-signer")
        .Data(CKA_EC_PARAMS, p256)
        .Data(CKA_EC_POINT, point);
    CK_OBJECT_HANDLE h;
    ASSERT_TRUE(
        P11_CALL(s, C_CreateObject, s.handle(), priv.data(), priv.size(), &h)
            .ok());
    ASSERT_TRUE(
        P11_CALL(s, C_CreateObject, s.handle(), pubt.data(), pubt.size(), &h)
            .ok());
  }
  const std::string out = Scratch() + "/known-signer.bundle";
  RunResult e = Cli({"export", Uri(kAesA, "known-signer"), "--id", PrintedId(p),
                     "--wrap-key", "pkcs11:object=transport", "--signer",
                     "pkcs11:object=known-signer", "--out", out});
  EXPECT_EQ(e.code, 1) << Describe(e);
  EXPECT_NE(e.err.find("is weaker than required: CKA_LOCAL is FALSE"),
            std::string::npos)
      << e.err;
  EXPECT_FALSE(std::filesystem::exists(out));
}

TEST_F(CliTest, SignerCeremonyMakesSignOnlyAndPinnedKeys) {
  const std::string pem = SetUpSigner(kSend, kRecv, "signer-attrs");
  p11::Session a = UserSession(kSend);
  p11::Template t;
  t.Ulong(CKA_CLASS, CKO_PRIVATE_KEY).String(CKA_LABEL, "signer-attrs");
  Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(a, t);
  ASSERT_TRUE(found.ok());
  ASSERT_EQ(found->size(), 1u);
  Result<std::vector<std::optional<bool>>> v = p11::ReadBools(
      a, (*found)[0],
      std::array{CKA_SIGN, CKA_DECRYPT, CKA_UNWRAP, CKA_DERIVE, CKA_SENSITIVE,
                 CKA_EXTRACTABLE, CKA_MODIFIABLE, CKA_COPYABLE, CKA_TOKEN});
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v,
            (std::vector<std::optional<bool>>{true, false, false, false, true,
                                              false, false, false, true}));
  p11::Session b = UserSession(kRecv);
  p11::Template pub;
  pub.Ulong(CKA_CLASS, CKO_PUBLIC_KEY).String(CKA_LABEL, "signer-attrs");
  Result<std::vector<CK_OBJECT_HANDLE>> pinned = p11::FindObjects(b, pub);
  ASSERT_TRUE(pinned.ok());
  ASSERT_EQ(pinned->size(), 1u);
  Result<std::vector<std::optional<bool>>> pv =
      p11::ReadBools(b, (*pinned)[0],
                     std::array{CKA_TRUSTED, CKA_VERIFY, CKA_ENCRYPT, CKA_WRAP,
                                CKA_MODIFIABLE, CKA_COPYABLE});
  ASSERT_TRUE(pv.ok());
  EXPECT_EQ(*pv, (std::vector<std::optional<bool>>{true, true, false, false,
                                                   false, false}));
  // Its CKA_ID is the fingerprint of the PEM.
  Result<EcPublicKey> key = EcPublicKeyFromPem(ReadAll(pem));
  ASSERT_TRUE(key.ok());
  EXPECT_EQ(*p11::ReadAttribute(b, (*pinned)[0], CKA_ID), *EcFingerprint(*key));
  // Pinning the same key twice, or as a user, is refused.
  RunResult twice =
      Cli({"signer", "trust", UriWithoutPin(kRecv, "signer-2"), "--in", pem,
           "--so-pin-source", "file:" + SoPinFile()});
  EXPECT_EQ(twice.code, 1);
  EXPECT_NE(twice.err.find("is already pinned"), std::string::npos)
      << twice.err;
  // An RSA key is not a signer.
  const std::string rsa = SetUpRsaTransport("wrap-not-signer");
  RunResult not_ec =
      Cli({"signer", "trust", UriWithoutPin(kRecv, "signer-3"), "--in", rsa,
           "--so-pin-source", "file:" + SoPinFile()});
  EXPECT_EQ(not_ec.code, 1);
  EXPECT_NE(not_ec.err.find("the public key is not an EC key on P-256"),
            std::string::npos)
      << not_ec.err;
}

// ---------------------------------------------------------------------------
// PIN hygiene

TEST_F(CliTest, PinFileOthersCanReadWarns) {
  const std::string pin = Scratch() + "/shared.pin";
  WriteAll(pin, std::string(kUserPin) + "\n");
  chmod(pin.c_str(), 0644);
  const std::string uri =
      UriWithoutPin(kMain, "pinmode", "&pin-source=file:" + pin);
  RunResult loose = Cli({"provision", uri});
  EXPECT_EQ(loose.code, 0) << Describe(loose);
  EXPECT_NE(loose.err.find("hsmstek: warning: PIN file " + pin +
                           " is readable by group or others (mode 0644)"),
            std::string::npos)
      << loose.err;
  chmod(pin.c_str(), 0600);
  RunResult tight = Cli({"status", uri});
  EXPECT_EQ(tight.code, 0) << Describe(tight);
  EXPECT_EQ(tight.err.find("warning"), std::string::npos) << tight.err;
}

TEST_F(CliTest, APinPastedAsPinSourceNeverReachesOutput) {
  for (const char *source : {"123456", "file:123456"}) {
    const std::string uri =
        UriWithoutPin(kMain, "pasted", std::string("&pin-source=") + source);
    for (const std::vector<std::string> &args :
         {std::vector<std::string>{"status", uri},
          std::vector<std::string>{"-v", "provision", uri},
          std::vector<std::string>{"export", uri, "--id", "zz", "--wrap-key",
                                   uri, "--signer", uri, "--out", "/x"}}) {
      RunResult r = Cli(args);
      EXPECT_NE(r.code, 0) << source;
      EXPECT_EQ(r.err.find("123456"), std::string::npos) << r.err;
      EXPECT_EQ(r.out.find("123456"), std::string::npos) << r.out;
    }
  }
}

TEST_F(CliTest, NoCoreDumpsWhileTheToolHoldsSecrets) {
  // import-legacy opens its key file before anything else: a FIFO holds it
  // there, with the tool running, until this test opens the other end.
  const std::string fifo = Scratch() + "/legacy.fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  std::vector<std::string> argv_strings = {
      HSMSTEK_CLI_PATH, "import-legacy", Uri(kMain, "nocore"),
      "--format",       "nginx",         fifo};
  std::vector<char *> argv;
  for (std::string &a : argv_strings) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
  pid_t pid = -1;
  ASSERT_EQ(posix_spawn(&pid, HSMSTEK_CLI_PATH, &actions, nullptr, argv.data(),
                        environ),
            0);
  posix_spawn_file_actions_destroy(&actions);
  const int writer = open(fifo.c_str(), O_WRONLY);  // waits for the tool
  ASSERT_GE(writer, 0);
  const std::string limits =
      ReadAll("/proc/" + std::to_string(pid) + "/limits");
  close(writer);  // an empty key file: the tool refuses it and exits
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  const size_t at = limits.find("Max core file size");
  ASSERT_NE(at, std::string::npos) << limits;
  std::istringstream line(limits.substr(at + 18));
  std::string soft, hard;
  line >> soft >> hard;
  EXPECT_EQ(soft, "0") << limits;
  EXPECT_EQ(hard, "0") << limits;
  EXPECT_EQ(WEXITSTATUS(status), 1);
}

// ---------------------------------------------------------------------------
// hsm/make-token.sh

TEST_F(CliTest, MakeTokenScriptGivesAWorkingUri) {
  const std::string dir = Scratch() + "/made";
  RunResult made = RunProgram(
      "/bin/sh", {HSMSTEK_SOURCE_DIR "/hsm/make-token.sh", dir, "scripted"});
  ASSERT_EQ(made.code, 0) << Describe(made);
  std::string conf, uri;
  std::istringstream lines(made.out);
  for (std::string line; std::getline(lines, line);) {
    const std::string conf_prefix = "export SOFTHSM2_CONF='";
    const std::string uri_prefix = "export HSMSTEK_URI='";
    if (line.rfind(conf_prefix, 0) == 0) {
      conf =
          line.substr(conf_prefix.size(), line.size() - conf_prefix.size() - 1);
    } else if (line.rfind(uri_prefix, 0) == 0) {
      uri = line.substr(uri_prefix.size(), line.size() - uri_prefix.size() - 1);
    }
  }
  ASSERT_EQ(conf, dir + "/softhsm2.conf") << made.out;
  ASSERT_EQ(uri.rfind("pkcs11:token=scripted;object=tickets?", 0), 0u) << uri;
  EXPECT_NE(ReadAll(conf).find("directories.tokendir = " + dir + "/tokens"),
            std::string::npos);
  struct stat st;
  ASSERT_EQ(stat((dir + "/scripted.pin").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  const std::vector<std::string> env = {"SOFTHSM2_CONF=" + conf};
  RunResult p = Cli({"provision", uri}, env);
  ASSERT_EQ(p.code, 0) << Describe(p);
  RunResult s = Cli({"status", "--json", uri}, env);
  ASSERT_EQ(s.code, 0) << Describe(s);
  Json j = Json::parse(s.out, nullptr, false);
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j["token"], "scripted");
  EXPECT_EQ(j["stores"][0]["id"], PrintedId(p));
  // The script refuses a second token of the same name.
  RunResult again = RunProgram(
      "/bin/sh", {HSMSTEK_SOURCE_DIR "/hsm/make-token.sh", dir, "scripted"});
  EXPECT_EQ(again.code, 1);
}

}  // namespace
}  // namespace hsmstek::keystore

// ---------------------------------------------------------------------------
// selftest

namespace hsmstek::keystore {
namespace {

TEST_F(CliTest, SelftestResumesBothProtocolVersionsThroughTheToken) {
  ASSERT_EQ(Cli({"provision", Uri(kMain, "selftest")}).code, 0);
  const size_t objects = CountTokenObjects(kMain);
  RunResult r = Cli({"selftest", Uri(kMain, "selftest"), "--rounds", "3"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  EXPECT_NE(r.out.find("TLS 1.2: 3/3 resumptions ok"), std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("TLS 1.3: 3/3 resumptions ok"), std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("token errors 0"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("seal (encrypt + HMAC in the token): p50"),
            std::string::npos);
  EXPECT_NE(r.out.find("self-test passed"), std::string::npos);
  // Provisions nothing.
  EXPECT_EQ(CountTokenObjects(kMain), objects);
}

TEST_F(CliTest, SelftestFailsClearlyWithoutAnActiveMaster) {
  RunResult r = Cli({"selftest", Uri(kMain, "nothing-here")});
  EXPECT_EQ(r.code, 1) << Describe(r);
  EXPECT_NE(r.err.find("store not usable"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("no active master"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace hsmstek::keystore

namespace hsmstek::keystore {
namespace {

TEST_F(CliTest, HostileLabelsAreEscapedInMessages) {
  // "%0A" is a newline in the label: printed raw it would start a forged
  // "hsmstek: ..." line of its own.
  const std::string uri = Uri(kMain, "evil%0Ahsmstek:%20ok");
  ASSERT_EQ(Cli({"provision", uri}).code, 0);
  RunResult again = Cli({"provision", uri});
  EXPECT_EQ(again.code, 1) << Describe(again);
  EXPECT_NE(again.err.find("\"evil\\x0ahsmstek: ok\""), std::string::npos)
      << again.err;
  EXPECT_EQ(again.err.find("\nhsmstek: ok"), std::string::npos) << again.err;
}

}  // namespace
}  // namespace hsmstek::keystore
