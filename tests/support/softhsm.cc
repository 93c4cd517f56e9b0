#include "softhsm.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <vector>

#include "pkcs11/error.h"
#include "pkcs11/uri.h"

namespace hsmstek::testing {

namespace fs = std::filesystem;

static void Die(const std::string &what) {
  std::fprintf(stderr, "softhsm test harness: %s\n", what.c_str());
  std::abort();
}

const std::string &SoftHsmModulePath() {
  static const std::string path = [] {
    if (const char *p = std::getenv("HSMSTEK_TEST_MODULE"))
      return std::string(p);
    for (const char *p : {"/usr/lib/softhsm/libsofthsm2.so",
                          "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"}) {
      if (fs::exists(p)) return std::string(p);
    }
    Die("SoftHSM2 module not found; run scripts/install-deps.sh");
    return std::string();
  }();
  return path;
}

std::string MakeTempDir(const std::string &prefix) {
  const char *base = std::getenv("TMPDIR");
  std::string tmpl =
      std::string(base ? base : "/tmp") + "/" + prefix + "XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) Die("mkdtemp failed");
  return std::string(buf.data());
}

SoftHsm &SoftHsm::Get() {
  static SoftHsm *instance = new SoftHsm();
  return *instance;
}

SoftHsm::SoftHsm() {
  dir_ = MakeTempDir("hsmstek-softhsm-");
  fs::create_directories(dir_ + "/tokens");
  conf_ = dir_ + "/softhsm2.conf";
  std::ofstream(conf_) << "directories.tokendir = " << dir_ << "/tokens\n"
                       << "objectstore.backend = file\n"
                       << "log.level = ERROR\n"
                       << "slots.removable = false\n";
  pin_file_ = dir_ + "/user.pin";
  std::ofstream(pin_file_) << kUserPin << "\n";
  // As an operator should keep it (a looser mode makes hsmstek warn).
  fs::permissions(pin_file_, fs::perms::owner_read | fs::perms::owner_write);
  setenv("SOFTHSM2_CONF", conf_.c_str(), 1);
  // Tokens are throwaway: remove them when the test process exits normally
  // (forked children leave through _exit and keep them).
  static std::string cleanup_dir;
  cleanup_dir = dir_;
  if (std::getenv("HSMSTEK_KEEP_TOKENS") == nullptr) {
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(cleanup_dir, ec);
    });
  }
  // HSMSTEK_TEST_MODULE may point at the fault-injecting module, which
  // forwards to SoftHSM; it must see the same config.
  Result<std::shared_ptr<p11::Module>> m =
      p11::Module::FromPath(SoftHsmModulePath());
  if (!m.ok()) Die(m.status().message());
  module_ = *m;
  Status s = module_->EnsureInitialized();
  if (!s.ok()) Die(s.message());
}

void SoftHsm::CreateToken(const std::string &label) {
  CK_FUNCTION_LIST *f = module_->functions();
  CK_ULONG count = 0;
  if (f->C_GetSlotList(CK_FALSE, nullptr, &count) != CKR_OK) Die("slot list");
  std::vector<CK_SLOT_ID> slots(count);
  if (f->C_GetSlotList(CK_FALSE, slots.data(), &count) != CKR_OK) Die("slots");
  CK_SLOT_ID free_slot = 0;
  bool found = false;
  for (CK_ULONG i = 0; i < count && !found; ++i) {
    CK_TOKEN_INFO info;
    if (f->C_GetTokenInfo(slots[i], &info) != CKR_OK) continue;
    if (!(info.flags & CKF_TOKEN_INITIALIZED)) {
      free_slot = slots[i];
      found = true;
    }
  }
  if (!found) Die("no free SoftHSM slot");

  CK_UTF8CHAR padded[32];
  std::memset(padded, ' ', sizeof(padded));
  std::memcpy(padded, label.data(), std::min(label.size(), sizeof(padded)));
  auto so = reinterpret_cast<CK_UTF8CHAR_PTR>(const_cast<char *>(kSoPin));
  auto user = reinterpret_cast<CK_UTF8CHAR_PTR>(const_cast<char *>(kUserPin));
  CK_RV rv = f->C_InitToken(free_slot, so, std::strlen(kSoPin), padded);
  if (rv != CKR_OK) Die("C_InitToken: " + std::string(p11::CkrName(rv)));

  // The token now lives on a new slot id; find it by label.
  count = 0;
  f->C_GetSlotList(CK_TRUE, nullptr, &count);
  slots.resize(count);
  f->C_GetSlotList(CK_TRUE, slots.data(), &count);
  for (CK_ULONG i = 0; i < count; ++i) {
    CK_TOKEN_INFO info;
    if (f->C_GetTokenInfo(slots[i], &info) != CKR_OK) continue;
    if (p11::TrimPadded(info.label, sizeof(info.label)) != label) continue;
    if (info.flags & CKF_USER_PIN_INITIALIZED) continue;
    CK_SESSION_HANDLE s;
    rv = f->C_OpenSession(slots[i], CKF_SERIAL_SESSION | CKF_RW_SESSION,
                          nullptr, nullptr, &s);
    if (rv != CKR_OK) Die("C_OpenSession: " + std::string(p11::CkrName(rv)));
    rv = f->C_Login(s, CKU_SO, so, std::strlen(kSoPin));
    if (rv != CKR_OK) Die("C_Login(SO): " + std::string(p11::CkrName(rv)));
    rv = f->C_InitPIN(s, user, std::strlen(kUserPin));
    if (rv != CKR_OK) Die("C_InitPIN: " + std::string(p11::CkrName(rv)));
    f->C_Logout(s);
    f->C_CloseSession(s);
    return;
  }
  Die("initialised token not found: " + label);
}

std::string SoftHsm::Uri(const std::string &label,
                         const std::string &object) const {
  std::string uri = "pkcs11:token=" + label;
  if (!object.empty()) uri += ";object=" + object;
  uri +=
      "?module-path=" + SoftHsmModulePath() + "&pin-source=file:" + pin_file_;
  return uri;
}

}  // namespace hsmstek::testing
