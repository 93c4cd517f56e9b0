#include "pkcs11/object.h"

#include <cstdio>
#include <cstring>

namespace hsmstek::p11 {

Template &Template::Bool(CK_ATTRIBUTE_TYPE type, bool value) {
  CK_BBOOL b = value ? CK_TRUE : CK_FALSE;
  return Data(type, ByteSpan(&b, sizeof(b)));
}

Template &Template::Ulong(CK_ATTRIBUTE_TYPE type, CK_ULONG value) {
  return Data(
      type, ByteSpan(reinterpret_cast<const uint8_t *>(&value), sizeof(value)));
}

Template &Template::Data(CK_ATTRIBUTE_TYPE type, ByteSpan value) {
  Bytes &stored = values_.emplace_back(value.begin(), value.end());
  attrs_.push_back(CK_ATTRIBUTE{type, stored.empty() ? nullptr : stored.data(),
                                static_cast<CK_ULONG>(stored.size())});
  return *this;
}

Template &Template::String(CK_ATTRIBUTE_TYPE type, std::string_view value) {
  return Data(type, ByteSpan(reinterpret_cast<const uint8_t *>(value.data()),
                             value.size()));
}

Result<std::vector<CK_OBJECT_HANDLE>> FindObjects(Session &session,
                                                  Template &tmpl,
                                                  size_t limit) {
  Status status = P11_CALL(session, C_FindObjectsInit, session.handle(),
                           tmpl.data(), tmpl.size());
  if (!status.ok()) return status;
  std::vector<CK_OBJECT_HANDLE> found;
  CK_OBJECT_HANDLE batch[64];
  while (found.size() < limit) {
    CK_ULONG n = 0;
    status = P11_CALL(session, C_FindObjects, session.handle(), batch, 64, &n);
    if (!status.ok()) break;
    if (n == 0) break;
    found.insert(found.end(), batch, batch + n);
  }
  // Always end the search so the session stays usable for the next user.
  Status final_status = P11_CALL(session, C_FindObjectsFinal, session.handle());
  if (!status.ok()) return status;
  if (!final_status.ok()) return final_status;
  if (found.size() > limit) found.resize(limit);
  return found;
}

Result<std::vector<std::optional<bool>>> ReadBools(
    Session &session, CK_OBJECT_HANDLE object,
    std::span<const CK_ATTRIBUTE_TYPE> types) {
  std::vector<CK_BBOOL> values(types.size(), CK_FALSE);
  std::vector<CK_ATTRIBUTE> attrs(types.size());
  for (size_t i = 0; i < types.size(); ++i) {
    attrs[i] = CK_ATTRIBUTE{types[i], &values[i], sizeof(CK_BBOOL)};
  }
  Status read = P11_CALL(session, C_GetAttributeValue, session.handle(), object,
                         attrs.data(), static_cast<CK_ULONG>(attrs.size()));
  // CKR_ATTRIBUTE_TYPE_INVALID still fills the attributes the object has.
  if (!read.ok() && read.ckr() != CKR_ATTRIBUTE_TYPE_INVALID) return read;
  std::vector<std::optional<bool>> out(types.size());
  for (size_t i = 0; i < types.size(); ++i) {
    if (attrs[i].ulValueLen == sizeof(CK_BBOOL)) out[i] = values[i] == CK_TRUE;
  }
  return out;
}

static Result<Bytes> ReadRaw(Session &session, CK_OBJECT_HANDLE object,
                             CK_ATTRIBUTE_TYPE type) {
  CK_ATTRIBUTE attr{type, nullptr, 0};
  Status status = P11_CALL(session, C_GetAttributeValue, session.handle(),
                           object, &attr, 1);
  if (!status.ok()) return status;
  if (attr.ulValueLen == CK_UNAVAILABLE_INFORMATION) {
    return NotFound("attribute not available");
  }
  Bytes value(attr.ulValueLen);
  attr.pValue = value.data();
  status = P11_CALL(session, C_GetAttributeValue, session.handle(), object,
                    &attr, 1);
  if (!status.ok()) return status;
  value.resize(attr.ulValueLen);
  return value;
}

Result<Bytes> ReadAttribute(Session &session, CK_OBJECT_HANDLE object,
                            CK_ATTRIBUTE_TYPE type) {
  if (type == CKA_VALUE) {
    return Internal("refusing to read CKA_VALUE through ReadAttribute");
  }
  return ReadRaw(session, object, type);
}

Result<CK_ULONG> ReadUlong(Session &session, CK_OBJECT_HANDLE object,
                           CK_ATTRIBUTE_TYPE type) {
  Result<Bytes> raw = ReadAttribute(session, object, type);
  if (!raw.ok()) return raw.status();
  if (raw->size() != sizeof(CK_ULONG)) {
    return Internal("attribute has unexpected size " +
                    std::to_string(raw->size()));
  }
  CK_ULONG v;
  std::memcpy(&v, raw->data(), sizeof(v));
  return v;
}

Result<Bytes> ReadDataValue(Session &session, CK_OBJECT_HANDLE object) {
  Result<CK_ULONG> cls = ReadUlong(session, object, CKA_CLASS);
  if (!cls.ok()) return cls.status();
  if (*cls != CKO_DATA) {
    return Internal("refusing to read CKA_VALUE of a non-data object");
  }
  return ReadRaw(session, object, CKA_VALUE);
}

ScopedObject::~ScopedObject() {
  if (object_ != CK_INVALID_HANDLE) {
    // Best effort: a failure here leaves an object the operator can destroy.
    (void)P11_CALL(*session_, C_DestroyObject, session_->handle(), object_);
  }
}

std::string MechanismName(CK_MECHANISM_TYPE m) {
  switch (m) {
    case CKM_AES_CBC_PAD:
      return "CKM_AES_CBC_PAD";
    case CKM_AES_ECB:
      return "CKM_AES_ECB";
    case CKM_SHA256_HMAC:
      return "CKM_SHA256_HMAC";
    case CKM_AES_ECB_ENCRYPT_DATA:
      return "CKM_AES_ECB_ENCRYPT_DATA";
    case CKM_AES_KEY_GEN:
      return "CKM_AES_KEY_GEN";
    case CKM_AES_KEY_WRAP_PAD:
      return "CKM_AES_KEY_WRAP_PAD";
    case CKM_RSA_PKCS_OAEP:
      return "CKM_RSA_PKCS_OAEP";
    default: {
      char buf[32];
      std::snprintf(buf, sizeof(buf), "CKM_0x%08lX",
                    static_cast<unsigned long>(m));
      return buf;
    }
  }
}

}  // namespace hsmstek::p11
