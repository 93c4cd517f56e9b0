// A deliberate key-custody offender, to prove that the audit runner
// (custody_audit.sh) sees each kind of violation and fails the run: it makes
// a readable, extractable AES key and asks for its CKA_VALUE, derives a key
// without explicit usage flags (SoftHSM then defaults WRAP/UNWRAP to TRUE)
// and wraps a key. Raw PKCS#11 on a throwaway SoftHSM token; exits 0 when
// every call did what it was told, so only the audit can fail the run.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "pkcs11/ck.h"
#include "pkcs11/error.h"
#include "pkcs11/uri.h"
#include "softhsm.h"

namespace {

using hsmstek::testing::kUserPin;
using hsmstek::testing::SoftHsm;

constexpr char kLabel[] = "audit-canary";

bool Ok(const char *what, CK_RV rv) {
  if (rv == CKR_OK) return true;
  std::fprintf(stderr, "audit_canary: %s: %s\n", what,
               std::string(hsmstek::p11::CkrName(rv)).c_str());
  return false;
}

// Finds the slot of the token labelled kLabel.
bool FindSlot(CK_FUNCTION_LIST *f, CK_SLOT_ID *slot) {
  CK_ULONG count = 0;
  if (!Ok("C_GetSlotList", f->C_GetSlotList(CK_TRUE, nullptr, &count))) {
    return false;
  }
  std::vector<CK_SLOT_ID> slots(count);
  if (!Ok("C_GetSlotList", f->C_GetSlotList(CK_TRUE, slots.data(), &count))) {
    return false;
  }
  for (CK_ULONG i = 0; i < count; ++i) {
    CK_TOKEN_INFO info;
    if (f->C_GetTokenInfo(slots[i], &info) != CKR_OK) continue;
    if (hsmstek::p11::TrimPadded(info.label, sizeof(info.label)) == kLabel) {
      *slot = slots[i];
      return true;
    }
  }
  std::fprintf(stderr, "audit_canary: token not found\n");
  return false;
}

}  // namespace

int main() {
  SoftHsm &hsm = SoftHsm::Get();
  hsm.CreateToken(kLabel);
  CK_FUNCTION_LIST *f = hsm.module()->functions();
  CK_SLOT_ID slot = 0;
  if (!FindSlot(f, &slot)) return 1;
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  if (!Ok("C_OpenSession",
          f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr,
                           nullptr, &s))) {
    return 1;
  }
  auto *pin = reinterpret_cast<CK_UTF8CHAR_PTR>(const_cast<char *>(kUserPin));
  if (!Ok("C_Login", f->C_Login(s, CKU_USER, pin, std::strlen(kUserPin)))) {
    return 1;
  }

  CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
  CK_KEY_TYPE aes = CKK_AES;
  CK_ULONG len = 32;
  CK_BBOOL yes = CK_TRUE, no = CK_FALSE;

  // weak-key: readable and extractable.
  CK_MECHANISM keygen{CKM_AES_KEY_GEN, nullptr, 0};
  CK_ATTRIBUTE weak[] = {{CKA_CLASS, &secret, sizeof(secret)},
                         {CKA_KEY_TYPE, &aes, sizeof(aes)},
                         {CKA_VALUE_LEN, &len, sizeof(len)},
                         {CKA_TOKEN, &no, sizeof(no)},
                         {CKA_SENSITIVE, &no, sizeof(no)},
                         {CKA_EXTRACTABLE, &yes, sizeof(yes)},
                         {CKA_DERIVE, &yes, sizeof(yes)}};
  CK_OBJECT_HANDLE weak_key = CK_INVALID_HANDLE;
  if (!Ok("C_GenerateKey", f->C_GenerateKey(s, &keygen, weak, 7, &weak_key))) {
    return 1;
  }

  // read-value: the length query is enough to be an attempt.
  CK_ATTRIBUTE value{CKA_VALUE, nullptr, 0};
  if (!Ok("C_GetAttributeValue",
          f->C_GetAttributeValue(s, weak_key, &value, 1))) {
    return 1;
  }

  // derive-usage: no usage flags in the template.
  unsigned char data[32] = {0};
  CK_KEY_DERIVATION_STRING_DATA params{data, sizeof(data)};
  CK_MECHANISM derive{CKM_AES_ECB_ENCRYPT_DATA, &params, sizeof(params)};
  CK_ATTRIBUTE derived[] = {
      {CKA_CLASS, &secret, sizeof(secret)}, {CKA_KEY_TYPE, &aes, sizeof(aes)},
      {CKA_VALUE_LEN, &len, sizeof(len)},   {CKA_TOKEN, &no, sizeof(no)},
      {CKA_SENSITIVE, &yes, sizeof(yes)},   {CKA_EXTRACTABLE, &no, sizeof(no)}};
  CK_OBJECT_HANDLE derived_key = CK_INVALID_HANDLE;
  if (!Ok("C_DeriveKey",
          f->C_DeriveKey(s, &derive, weak_key, derived, 6, &derived_key))) {
    return 1;
  }

  // wrap: any C_WrapKey (a length query here).
  CK_ATTRIBUTE wrapping[] = {
      {CKA_CLASS, &secret, sizeof(secret)}, {CKA_KEY_TYPE, &aes, sizeof(aes)},
      {CKA_VALUE_LEN, &len, sizeof(len)},   {CKA_TOKEN, &no, sizeof(no)},
      {CKA_SENSITIVE, &yes, sizeof(yes)},   {CKA_EXTRACTABLE, &no, sizeof(no)},
      {CKA_WRAP, &yes, sizeof(yes)}};
  CK_OBJECT_HANDLE wrapping_key = CK_INVALID_HANDLE;
  if (!Ok("C_GenerateKey",
          f->C_GenerateKey(s, &keygen, wrapping, 7, &wrapping_key))) {
    return 1;
  }
  CK_MECHANISM wrap{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
  CK_ULONG wrapped_len = 0;
  if (!Ok("C_WrapKey", f->C_WrapKey(s, &wrap, wrapping_key, weak_key, nullptr,
                                    &wrapped_len))) {
    return 1;
  }

  f->C_Logout(s);
  f->C_CloseSession(s);
  return 0;
}
