// Object helpers: attribute templates, search, boolean read-back, and an
// owner that destroys an object unless released.
//
// By construction no helper here can read CKA_VALUE of a key: ReadAttribute
// refuses CKA_VALUE outright, and ReadDataValue reads it only after checking
// that the object is a CKO_DATA object (policy text, which is public).
#pragma once

#include <deque>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/bytes.h"
#include "common/status.h"
#include "pkcs11/ck.h"
#include "pkcs11/token.h"

namespace hsmstek::p11 {

// Builds a CK_ATTRIBUTE array whose values it owns.
class Template {
 public:
  Template &Bool(CK_ATTRIBUTE_TYPE type, bool value);
  Template &Ulong(CK_ATTRIBUTE_TYPE type, CK_ULONG value);
  Template &Data(CK_ATTRIBUTE_TYPE type, ByteSpan value);
  Template &String(CK_ATTRIBUTE_TYPE type, std::string_view value);

  CK_ATTRIBUTE *data() { return attrs_.data(); }
  CK_ULONG size() const { return static_cast<CK_ULONG>(attrs_.size()); }
  const std::vector<CK_ATTRIBUTE> &attributes() const { return attrs_; }

 private:
  std::vector<CK_ATTRIBUTE> attrs_;
  std::deque<Bytes> values_;  // stable addresses for pValue
};

// Returns every object matching `tmpl` (at most `limit`).
[[nodiscard]] Result<std::vector<CK_OBJECT_HANDLE>> FindObjects(
    Session &session, Template &tmpl, size_t limit = 1024);

// Reads boolean attributes; an attribute the object does not have is
// returned as nullopt. Order matches `types`.
[[nodiscard]] Result<std::vector<std::optional<bool>>> ReadBools(
    Session &session, CK_OBJECT_HANDLE object,
    std::span<const CK_ATTRIBUTE_TYPE> types);

// Reads one non-secret attribute (CKA_LABEL, CKA_ID, CKA_CLASS, ...).
// CKA_VALUE is refused with kInternal: use ReadDataValue for data objects.
[[nodiscard]] Result<Bytes> ReadAttribute(Session &session,
                                          CK_OBJECT_HANDLE object,
                                          CK_ATTRIBUTE_TYPE type);
[[nodiscard]] Result<CK_ULONG> ReadUlong(Session &session,
                                         CK_OBJECT_HANDLE object,
                                         CK_ATTRIBUTE_TYPE type);

// Reads CKA_VALUE of a CKO_DATA object; refuses any other class.
[[nodiscard]] Result<Bytes> ReadDataValue(Session &session,
                                          CK_OBJECT_HANDLE object);

// Destroys its object when it goes out of scope, unless Release()d. Used for
// objects that must not survive a failed multi-step operation.
class ScopedObject {
 public:
  ScopedObject(Session &session, CK_OBJECT_HANDLE object)
      : session_(&session), object_(object) {}
  ~ScopedObject();
  ScopedObject(const ScopedObject &) = delete;
  ScopedObject &operator=(const ScopedObject &) = delete;

  CK_OBJECT_HANDLE get() const { return object_; }
  CK_OBJECT_HANDLE Release() {
    CK_OBJECT_HANDLE h = object_;
    object_ = CK_INVALID_HANDLE;
    return h;
  }

 private:
  Session *session_;
  CK_OBJECT_HANDLE object_;
};

// Returns CKM name for messages ("CKM_AES_CBC_PAD", or "CKM_0x...").
std::string MechanismName(CK_MECHANISM_TYPE m);

}  // namespace hsmstek::p11
