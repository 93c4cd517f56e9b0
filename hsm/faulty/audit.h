// Key-custody audit of the fault-injecting PKCS#11 test module: records
// calls that break hsmstek's key rules (docs/SECURITY.md §4, docs/FORMAT.md) to a log file, one line
// per violation. Records only; never changes a call's result.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string>

#include "ck.h"
#include "names.h"

namespace hsmstek::faulty {

// Auditor: the audit log and its counters. The check functions query the
// target module with `target` on the caller's target session `session`
// (never CKA_VALUE) and may be called from any thread once Open returned;
// Open and Close must not race with them.
class Auditor {
 public:
  enum Kind { kReadValue, kWeakKey, kWrap, kDeriveUsage, kKindCount };

  // Open starts auditing to `path` (appended to, created 0644). An empty
  // path disables auditing. Returns false (and disables) if the file cannot
  // be opened.
  bool Open(const std::string &path);

  // Close appends the summary line when this process recorded violations
  // since Open, then closes the log.
  void Close();

  bool enabled() const { return fd_ >= 0; }

  // GetAttributeValue: rule (a), CKA_VALUE asked of a secret/private key.
  void GetAttributeValue(CK_FUNCTION_LIST *target, CK_SESSION_HANDLE session,
                         CK_OBJECT_HANDLE object, const CK_ATTRIBUTE *tmpl,
                         CK_ULONG count);

  // NewKey: rule (b) for a key created by `fn` (C_GenerateKey,
  // C_CreateObject, C_UnwrapKey, C_DeriveKey, C_GenerateKeyPair's private
  // key) from `tmpl`: SENSITIVE must be TRUE and EXTRACTABLE FALSE (or TRUE
  // with WRAP_WITH_TRUSTED TRUE), both given explicitly; `created` (0 if the
  // call failed) is read back and checked too. `default_class` applies when
  // the template has no CKA_CLASS. Only secret and private keys are checked.
  void NewKey(Fn fn, CK_FUNCTION_LIST *target, CK_SESSION_HANDLE session,
              CK_OBJECT_CLASS default_class, const CK_ATTRIBUTE *tmpl,
              CK_ULONG count, CK_OBJECT_HANDLE created);

  // ChangedKey: rule (b) for C_CopyObject / C_SetAttributeValue on the
  // existing key `object`: the template may not set SENSITIVE=FALSE nor
  // EXTRACTABLE=TRUE without WRAP_WITH_TRUSTED=TRUE; `created` (a copy, or
  // 0) is read back and checked too.
  void ChangedKey(Fn fn, CK_FUNCTION_LIST *target, CK_SESSION_HANDLE session,
                  CK_OBJECT_HANDLE object, const CK_ATTRIBUTE *tmpl,
                  CK_ULONG count, CK_OBJECT_HANDLE created);

  // Wrap: rule (c), every C_WrapKey call, including length queries
  // (`length_query`: no output buffer), which are marked as such.
  void Wrap(CK_FUNCTION_LIST *target, CK_SESSION_HANDLE session,
            const CK_MECHANISM *mechanism, CK_OBJECT_HANDLE wrapping_key,
            CK_OBJECT_HANDLE key, bool length_query);

  // Derive: rule (d), usage flags and CKA_TOKEN of a C_DeriveKey template
  // and of the derived key `created` (0 if the call failed). A ratchet
  // link (CKM_AES_ECB_ENCRYPT_DATA over "hstk" 'R' blocks) may be an AES
  // token key with CKA_DERIVE.
  void Derive(CK_FUNCTION_LIST *target, CK_SESSION_HANDLE session,
              const CK_MECHANISM *mechanism, const CK_ATTRIBUTE *tmpl,
              CK_ULONG count, CK_OBJECT_HANDLE created);

 private:
  void Record(Kind kind, Fn fn, const std::string &details);

  int fd_ = -1;
  std::array<std::atomic<std::uint64_t>, kKindCount> counts_{};
};

}  // namespace hsmstek::faulty
