// Names of PKCS#11 functions, return values and a few constants, for the
// fault-injecting test module (hsm/faulty) and its control-file parser.
// Self-contained: no dependency on hsmstek's libraries.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

#include "ck.h"

namespace hsmstek::faulty {

// Every function of CK_FUNCTION_LIST (v2.40), in the list's order.
// clang-format off
#define HSMSTEK_FAULTY_FUNCTIONS(X) \
  X(C_Initialize) \
  X(C_Finalize) \
  X(C_GetInfo) \
  X(C_GetFunctionList) \
  X(C_GetSlotList) \
  X(C_GetSlotInfo) \
  X(C_GetTokenInfo) \
  X(C_GetMechanismList) \
  X(C_GetMechanismInfo) \
  X(C_InitToken) \
  X(C_InitPIN) \
  X(C_SetPIN) \
  X(C_OpenSession) \
  X(C_CloseSession) \
  X(C_CloseAllSessions) \
  X(C_GetSessionInfo) \
  X(C_GetOperationState) \
  X(C_SetOperationState) \
  X(C_Login) \
  X(C_Logout) \
  X(C_CreateObject) \
  X(C_CopyObject) \
  X(C_DestroyObject) \
  X(C_GetObjectSize) \
  X(C_GetAttributeValue) \
  X(C_SetAttributeValue) \
  X(C_FindObjectsInit) \
  X(C_FindObjects) \
  X(C_FindObjectsFinal) \
  X(C_EncryptInit) \
  X(C_Encrypt) \
  X(C_EncryptUpdate) \
  X(C_EncryptFinal) \
  X(C_DecryptInit) \
  X(C_Decrypt) \
  X(C_DecryptUpdate) \
  X(C_DecryptFinal) \
  X(C_DigestInit) \
  X(C_Digest) \
  X(C_DigestUpdate) \
  X(C_DigestKey) \
  X(C_DigestFinal) \
  X(C_SignInit) \
  X(C_Sign) \
  X(C_SignUpdate) \
  X(C_SignFinal) \
  X(C_SignRecoverInit) \
  X(C_SignRecover) \
  X(C_VerifyInit) \
  X(C_Verify) \
  X(C_VerifyUpdate) \
  X(C_VerifyFinal) \
  X(C_VerifyRecoverInit) \
  X(C_VerifyRecover) \
  X(C_DigestEncryptUpdate) \
  X(C_DecryptDigestUpdate) \
  X(C_SignEncryptUpdate) \
  X(C_DecryptVerifyUpdate) \
  X(C_GenerateKey) \
  X(C_GenerateKeyPair) \
  X(C_WrapKey) \
  X(C_UnwrapKey) \
  X(C_DeriveKey) \
  X(C_SeedRandom) \
  X(C_GenerateRandom) \
  X(C_GetFunctionStatus) \
  X(C_CancelFunction) \
  X(C_WaitForSlotEvent)
// clang-format on

// Fn: one enumerator per PKCS#11 function, e.g. Fn::C_Sign.
enum class Fn : int {
#define HSMSTEK_FAULTY_ENUM(name) name,
  HSMSTEK_FAULTY_FUNCTIONS(HSMSTEK_FAULTY_ENUM)
#undef HSMSTEK_FAULTY_ENUM
};

inline constexpr std::size_t kFnCount =
    static_cast<std::size_t>(Fn::C_WaitForSlotEvent) + 1;

// FnName returns "C_Sign" for Fn::C_Sign. The view is static.
std::string_view FnName(Fn fn);

// FnFromName returns the function called `name` ("C_Sign"), or nullopt.
std::optional<Fn> FnFromName(std::string_view name);

// RvName returns "CKR_DEVICE_ERROR" for CKR_DEVICE_ERROR, and "0x%lx" for
// values that have no name in the v2.40 header.
std::string RvName(CK_RV rv);

// RvFromName parses a CKR_* name of the v2.40 header or a hexadecimal value
// "0x..."; nullopt when neither.
std::optional<CK_RV> RvFromName(std::string_view name);

// ClassName, KeyTypeName, MechanismName: "CKO_SECRET_KEY", "CKK_AES",
// "CKM_AES_KEY_WRAP_PAD" for the values hsmstek uses, "0x%lx" otherwise.
std::string ClassName(CK_OBJECT_CLASS c);
std::string KeyTypeName(CK_KEY_TYPE k);
std::string MechanismName(CK_MECHANISM_TYPE m);

// AttributeName: "CKA_DERIVE_TEMPLATE" for the attributes key templates
// use, "0x%lx" otherwise; AttributeFromName is its inverse (names only).
std::string AttributeName(CK_ATTRIBUTE_TYPE a);
std::optional<CK_ATTRIBUTE_TYPE> AttributeFromName(std::string_view name);

}  // namespace hsmstek::faulty
