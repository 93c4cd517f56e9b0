#include "faulty_fixture.h"

#include <dlfcn.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "faulty/testing.h"
#include "names.h"

namespace hsmstek::faulty::test {

CK_FUNCTION_LIST *Functions() {
  static CK_FUNCTION_LIST *list = [] {
    void *dl = dlopen(HSMSTEK_FAULTY_MODULE, RTLD_NOW | RTLD_LOCAL);
    if (dl == nullptr) {
      ADD_FAILURE() << "dlopen " << HSMSTEK_FAULTY_MODULE << ": " << dlerror();
      return static_cast<CK_FUNCTION_LIST *>(nullptr);
    }
    auto get =
        reinterpret_cast<CK_C_GetFunctionList>(dlsym(dl, "C_GetFunctionList"));
    CK_FUNCTION_LIST *fl = nullptr;
    if (get == nullptr || get(&fl) != CKR_OK) {
      ADD_FAILURE() << "C_GetFunctionList failed";
      return static_cast<CK_FUNCTION_LIST *>(nullptr);
    }
    return fl;
  }();
  return list;
}

Attrs &Attrs::Bool(CK_ATTRIBUTE_TYPE type, bool v) {
  Add(type, {static_cast<unsigned char>(v ? CK_TRUE : CK_FALSE)});
  return *this;
}

Attrs &Attrs::Ulong(CK_ATTRIBUTE_TYPE type, CK_ULONG v) {
  std::vector<unsigned char> bytes(sizeof(v));
  std::memcpy(bytes.data(), &v, sizeof(v));
  Add(type, std::move(bytes));
  return *this;
}

Attrs &Attrs::Bytes(CK_ATTRIBUTE_TYPE type, const std::string &v) {
  Add(type, std::vector<unsigned char>(v.begin(), v.end()));
  return *this;
}

void Attrs::Add(CK_ATTRIBUTE_TYPE type, std::vector<unsigned char> value) {
  types_.push_back(type);
  values_.push_back(std::move(value));
}

CK_ATTRIBUTE *Attrs::data() {
  attrs_.clear();
  for (std::size_t i = 0; i < types_.size(); ++i) {
    attrs_.push_back({types_[i], values_[i].data(),
                      static_cast<CK_ULONG>(values_[i].size())});
  }
  return attrs_.data();
}

Attrs SecretKeyTemplate(CK_KEY_TYPE key_type, const std::string &label,
                        bool token, std::vector<CK_ATTRIBUTE_TYPE> usage) {
  Attrs a;
  a.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, key_type)
      .Bytes(CKA_LABEL, label)
      .Bool(CKA_TOKEN, token)
      .Bool(CKA_PRIVATE, true)
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, false);
  for (CK_ATTRIBUTE_TYPE flag : {CKA_ENCRYPT, CKA_DECRYPT, CKA_SIGN, CKA_VERIFY,
                                 CKA_WRAP, CKA_UNWRAP, CKA_DERIVE}) {
    bool on = false;
    for (CK_ATTRIBUTE_TYPE u : usage) on = on || u == flag;
    a.Bool(flag, on);
  }
  return a;
}

void FaultyTest::SetUp() {
  f_ = Functions();
  ASSERT_NE(f_, nullptr);
  std::string tmpl =
      (std::filesystem::temp_directory_path() / "faulty-XXXXXX").string();
  ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
  dir_ = tmpl;
  std::filesystem::create_directory(Path("tokens"));
  {
    std::ofstream conf(Path("softhsm2.conf"));
    conf << "directories.tokendir = " << Path("tokens") << "\n"
         << "objectstore.backend = file\n"
         << "log.level = ERROR\n";
  }
  setenv("SOFTHSM2_CONF", Path("softhsm2.conf").c_str(), 1);
  setenv("HSMSTEK_FAULTY_CONTROL", Path("control").c_str(), 1);
  setenv("HSMSTEK_FAULTY_TRACE", trace().c_str(), 1);
  setenv("HSMSTEK_FAULTY_AUDIT", audit().c_str(), 1);
  setenv("HSMSTEK_FAULTY_STATS", Path("stats").c_str(), 1);
  ASSERT_EQ(Initialize(), CKR_OK);
  slot_ = InitToken(kTokenLabel);
  session_ = OpenUserSession(slot_);
}

void FaultyTest::TearDown() {
  if (initialized_) {
    EXPECT_EQ(Finalize(), CKR_OK);
  }
  if (!dir_.empty()) std::filesystem::remove_all(dir_);
}

CK_RV FaultyTest::Initialize() {
  CK_C_INITIALIZE_ARGS args = {};
  args.flags = CKF_OS_LOCKING_OK;
  CK_RV rv = f_->C_Initialize(&args);
  if (rv == CKR_OK) initialized_ = true;
  return rv;
}

CK_RV FaultyTest::Finalize() {
  CK_RV rv = f_->C_Finalize(nullptr);
  if (rv == CKR_OK) initialized_ = false;
  return rv;
}

CK_SLOT_ID FaultyTest::InitToken(const std::string &label) {
  CK_ULONG n = 0;
  EXPECT_EQ(f_->C_GetSlotList(CK_FALSE, nullptr, &n), CKR_OK);
  std::vector<CK_SLOT_ID> slots(n);
  EXPECT_EQ(f_->C_GetSlotList(CK_FALSE, slots.data(), &n), CKR_OK);
  CK_SLOT_ID free_slot = 0;
  bool found = false;
  for (CK_ULONG i = 0; i < n && !found; ++i) {
    CK_TOKEN_INFO info;
    if (f_->C_GetTokenInfo(slots[i], &info) == CKR_OK &&
        (info.flags & CKF_TOKEN_INITIALIZED) == 0) {
      free_slot = slots[i];
      found = true;
    }
  }
  EXPECT_TRUE(found) << "no free slot";
  unsigned char padded[32];
  std::memset(padded, ' ', sizeof(padded));
  std::memcpy(padded, label.data(), std::min(label.size(), sizeof(padded)));
  EXPECT_EQ(f_->C_InitToken(
                free_slot,
                reinterpret_cast<CK_UTF8CHAR *>(const_cast<char *>(kSoPin)),
                std::strlen(kSoPin), padded),
            CKR_OK);
  // SoftHSM gives an initialised token a new slot id: find it by label.
  n = 0;
  EXPECT_EQ(f_->C_GetSlotList(CK_TRUE, nullptr, &n), CKR_OK);
  slots.resize(n);
  EXPECT_EQ(f_->C_GetSlotList(CK_TRUE, slots.data(), &n), CKR_OK);
  CK_SLOT_ID slot = 0;
  for (CK_ULONG i = 0; i < n; ++i) {
    CK_TOKEN_INFO info;
    if (f_->C_GetTokenInfo(slots[i], &info) == CKR_OK &&
        std::memcmp(info.label, padded, sizeof(padded)) == 0) {
      slot = slots[i];
    }
  }
  CK_SESSION_HANDLE s = 0;
  EXPECT_EQ(f_->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION,
                              nullptr, nullptr, &s),
            CKR_OK);
  EXPECT_EQ(
      f_->C_Login(s, CKU_SO,
                  reinterpret_cast<CK_UTF8CHAR *>(const_cast<char *>(kSoPin)),
                  std::strlen(kSoPin)),
      CKR_OK);
  EXPECT_EQ(
      f_->C_InitPIN(
          s, reinterpret_cast<CK_UTF8CHAR *>(const_cast<char *>(kUserPin)),
          std::strlen(kUserPin)),
      CKR_OK);
  EXPECT_EQ(f_->C_Logout(s), CKR_OK);
  EXPECT_EQ(f_->C_CloseSession(s), CKR_OK);
  return slot;
}

CK_SESSION_HANDLE FaultyTest::OpenUserSession(CK_SLOT_ID slot) {
  CK_SESSION_HANDLE s = 0;
  EXPECT_EQ(f_->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION,
                              nullptr, nullptr, &s),
            CKR_OK);
  CK_RV rv =
      f_->C_Login(s, CKU_USER,
                  reinterpret_cast<CK_UTF8CHAR *>(const_cast<char *>(kUserPin)),
                  std::strlen(kUserPin));
  // Login state is per token: a second session finds the user logged in.
  EXPECT_TRUE(rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN) << RvName(rv);
  return s;
}

void FaultyTest::SetRules(const std::string &rules) {
  ASSERT_EQ(WriteControlFile(Path("control"), rules), "");
}

CK_OBJECT_HANDLE FaultyTest::GenerateAes(CK_SESSION_HANDLE s,
                                         const std::string &label, bool token) {
  Attrs a =
      SecretKeyTemplate(CKK_AES, label, token, {CKA_ENCRYPT, CKA_DECRYPT});
  a.Ulong(CKA_VALUE_LEN, 32);
  CK_MECHANISM mech = {CKM_AES_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  EXPECT_EQ(f_->C_GenerateKey(s, &mech, a.data(), a.size(), &key), CKR_OK);
  return key;
}

CK_OBJECT_HANDLE FaultyTest::GenerateHmac(CK_SESSION_HANDLE s,
                                          const std::string &label) {
  Attrs a = SecretKeyTemplate(CKK_GENERIC_SECRET, label, false,
                              {CKA_SIGN, CKA_VERIFY});
  a.Ulong(CKA_VALUE_LEN, 32);
  CK_MECHANISM mech = {CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  EXPECT_EQ(f_->C_GenerateKey(s, &mech, a.data(), a.size(), &key), CKR_OK);
  return key;
}

std::vector<CK_OBJECT_HANDLE> FaultyTest::FindByLabel(
    CK_SESSION_HANDLE s, const std::string &label) {
  Attrs a;
  a.Bytes(CKA_LABEL, label);
  std::vector<CK_OBJECT_HANDLE> found;
  EXPECT_EQ(f_->C_FindObjectsInit(s, a.data(), a.size()), CKR_OK);
  CK_OBJECT_HANDLE buf[16];
  CK_ULONG n = 0;
  EXPECT_EQ(f_->C_FindObjects(s, buf, 16, &n), CKR_OK);
  found.assign(buf, buf + n);
  EXPECT_EQ(f_->C_FindObjectsFinal(s), CKR_OK);
  return found;
}

CK_RV FaultyTest::EncryptDecrypt(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key) {
  unsigned char iv[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  CK_MECHANISM mech = {CKM_AES_CBC_PAD, iv, sizeof(iv)};
  std::string plain = "a session ticket payload";
  unsigned char ct[64];
  CK_ULONG ct_len = sizeof(ct);
  CK_RV rv = f_->C_EncryptInit(s, &mech, key);
  if (rv != CKR_OK) return rv;
  rv = f_->C_Encrypt(s, reinterpret_cast<CK_BYTE *>(plain.data()), plain.size(),
                     ct, &ct_len);
  if (rv != CKR_OK) return rv;
  rv = f_->C_DecryptInit(s, &mech, key);
  if (rv != CKR_OK) return rv;
  unsigned char pt[64];
  CK_ULONG pt_len = sizeof(pt);
  rv = f_->C_Decrypt(s, ct, ct_len, pt, &pt_len);
  if (rv != CKR_OK) return rv;
  if (std::string(reinterpret_cast<char *>(pt), pt_len) != plain) {
    return CKR_GENERAL_ERROR;
  }
  return CKR_OK;
}

CK_RV FaultyTest::SignOnce(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key) {
  CK_MECHANISM mech = {CKM_SHA256_HMAC, nullptr, 0};
  CK_RV rv = f_->C_SignInit(s, &mech, key);
  if (rv != CKR_OK) return rv;
  unsigned char data[] = "hsmstek check";
  unsigned char mac[32];
  CK_ULONG mac_len = sizeof(mac);
  return f_->C_Sign(s, data, sizeof(data) - 1, mac, &mac_len);
}

std::string FaultyTest::ReadFile(const std::string &path) const {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace hsmstek::faulty::test
