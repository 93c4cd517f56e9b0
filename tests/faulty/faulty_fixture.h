// Test fixture for libhsmstek_faulty.so: one throwaway SoftHSM token per
// test, reached only through the faulty module with raw PKCS#11 calls.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "ck.h"

namespace hsmstek::faulty::test {

inline constexpr char kSoPin[] = "12345678";
inline constexpr char kUserPin[] = "1234";
inline constexpr char kTokenLabel[] = "faulty";

// Functions returns the faulty module's function list (module loaded once
// per process with dlopen).
CK_FUNCTION_LIST *Functions();

// Attrs: a template builder that owns its values.
class Attrs {
 public:
  Attrs &Bool(CK_ATTRIBUTE_TYPE type, bool v);
  Attrs &Ulong(CK_ATTRIBUTE_TYPE type, CK_ULONG v);
  Attrs &Bytes(CK_ATTRIBUTE_TYPE type, const std::string &v);
  // data: the template; valid until the next change to this object.
  CK_ATTRIBUTE *data();
  CK_ULONG size() const { return static_cast<CK_ULONG>(types_.size()); }

 private:
  void Add(CK_ATTRIBUTE_TYPE type, std::vector<unsigned char> value);
  std::vector<CK_ATTRIBUTE_TYPE> types_;
  std::vector<std::vector<unsigned char>> values_;
  std::vector<CK_ATTRIBUTE> attrs_;
};

// The §4 usage flags, all set to FALSE except those named TRUE.
Attrs SecretKeyTemplate(CK_KEY_TYPE key_type, const std::string &label,
                        bool token, std::vector<CK_ATTRIBUTE_TYPE> usage);

class FaultyTest : public ::testing::Test {
 protected:
  void SetUp() override;
  void TearDown() override;

  // Initialize / Finalize the module (SetUp/TearDown do it too).
  CK_RV Initialize();
  CK_RV Finalize();

  // InitToken initialises a token labelled `label` in the first free slot
  // with kSoPin/kUserPin and returns its slot id.
  CK_SLOT_ID InitToken(const std::string &label);
  // OpenUserSession opens a R/W session on `slot` and logs the user in.
  CK_SESSION_HANDLE OpenUserSession(CK_SLOT_ID slot);

  // SetRules replaces the control file (fails the test on a bad rule).
  void SetRules(const std::string &rules);

  CK_OBJECT_HANDLE GenerateAes(CK_SESSION_HANDLE s, const std::string &label,
                               bool token = false);
  CK_OBJECT_HANDLE GenerateHmac(CK_SESSION_HANDLE s, const std::string &label);
  // FindByLabel returns the handles of objects labelled `label`.
  std::vector<CK_OBJECT_HANDLE> FindByLabel(CK_SESSION_HANDLE s,
                                            const std::string &label);
  // EncryptDecrypt runs AES-CBC-PAD both ways on `key`; CKR_OK when the
  // plaintext comes back, else the first failing call's result.
  CK_RV EncryptDecrypt(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key);
  // SignOnce runs C_SignInit + C_Sign (HMAC-SHA256); returns C_Sign's result
  // (or C_SignInit's if that fails).
  CK_RV SignOnce(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key);

  std::string Path(const std::string &name) const { return dir_ + "/" + name; }
  std::string trace() const { return Path("trace"); }
  std::string audit() const { return Path("audit"); }
  std::string ReadFile(const std::string &path) const;

  CK_FUNCTION_LIST *f_ = nullptr;
  std::string dir_;
  bool initialized_ = false;
  CK_SLOT_ID slot_ = 0;
  CK_SESSION_HANDLE session_ = 0;
};

}  // namespace hsmstek::faulty::test
