#include "audit.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <optional>
#include <vector>

namespace hsmstek::faulty {
namespace {

constexpr const char *kKindNames[] = {"read-value", "weak-key", "wrap",
                                      "derive-usage"};

const CK_ATTRIBUTE *FindAttr(const CK_ATTRIBUTE *tmpl, CK_ULONG count,
                             CK_ATTRIBUTE_TYPE type) {
  if (tmpl == nullptr) return nullptr;
  for (CK_ULONG i = 0; i < count; ++i) {
    if (tmpl[i].type == type) return &tmpl[i];
  }
  return nullptr;
}

std::optional<bool> TemplateBool(const CK_ATTRIBUTE *tmpl, CK_ULONG count,
                                 CK_ATTRIBUTE_TYPE type) {
  const CK_ATTRIBUTE *a = FindAttr(tmpl, count, type);
  if (a == nullptr || a->pValue == nullptr ||
      a->ulValueLen != sizeof(CK_BBOOL)) {
    return std::nullopt;
  }
  return *static_cast<const CK_BBOOL *>(a->pValue) != CK_FALSE;
}

std::optional<CK_ULONG> TemplateUlong(const CK_ATTRIBUTE *tmpl, CK_ULONG count,
                                      CK_ATTRIBUTE_TYPE type) {
  const CK_ATTRIBUTE *a = FindAttr(tmpl, count, type);
  if (a == nullptr || a->pValue == nullptr ||
      a->ulValueLen != sizeof(CK_ULONG)) {
    return std::nullopt;
  }
  return *static_cast<const CK_ULONG *>(a->pValue);
}

// The audit's own reads go straight to the target: they are not caller
// calls (no fault injection, no trace) and never ask for CKA_VALUE.
std::optional<bool> ReadBool(CK_FUNCTION_LIST *t, CK_SESSION_HANDLE s,
                             CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type) {
  CK_BBOOL v = CK_FALSE;
  CK_ATTRIBUTE a = {type, &v, sizeof(v)};
  if (t->C_GetAttributeValue(s, obj, &a, 1) != CKR_OK) return std::nullopt;
  return v != CK_FALSE;
}

std::optional<CK_ULONG> ReadUlong(CK_FUNCTION_LIST *t, CK_SESSION_HANDLE s,
                                  CK_OBJECT_HANDLE obj,
                                  CK_ATTRIBUTE_TYPE type) {
  CK_ULONG v = 0;
  CK_ATTRIBUTE a = {type, &v, sizeof(v)};
  if (t->C_GetAttributeValue(s, obj, &a, 1) != CKR_OK) return std::nullopt;
  return v;
}

// Quoted, with bytes outside printable ASCII (and quote, backslash) as \xNN
// so a hostile label cannot forge log lines.
std::string QuoteLabel(const std::string &raw) {
  std::string out = "\"";
  for (unsigned char c : raw) {
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    }
  }
  return out + "\"";
}

std::string ReadLabel(CK_FUNCTION_LIST *t, CK_SESSION_HANDLE s,
                      CK_OBJECT_HANDLE obj) {
  CK_ATTRIBUTE a = {CKA_LABEL, nullptr, 0};
  if (obj == CK_INVALID_HANDLE ||
      t->C_GetAttributeValue(s, obj, &a, 1) != CKR_OK || a.ulValueLen > 4096) {
    return "?";
  }
  std::vector<char> buf(a.ulValueLen);
  a.pValue = buf.data();
  if (t->C_GetAttributeValue(s, obj, &a, 1) != CKR_OK) return "?";
  return QuoteLabel(std::string(buf.data(), a.ulValueLen));
}

std::string TemplateLabel(const CK_ATTRIBUTE *tmpl, CK_ULONG count) {
  const CK_ATTRIBUTE *a = FindAttr(tmpl, count, CKA_LABEL);
  if (a == nullptr || a->pValue == nullptr || a->ulValueLen > 4096) {
    return "?";
  }
  return QuoteLabel(
      std::string(static_cast<const char *>(a->pValue), a->ulValueLen));
}

bool IsKeyClass(CK_OBJECT_CLASS c) {
  return c == CKO_SECRET_KEY || c == CKO_PRIVATE_KEY;
}

void Add(std::string *list, const std::string &item) {
  if (!list->empty()) *list += ",";
  *list += item;
}

// Checks of an existing key's current attributes, prefixed "object:".
void CheckObject(CK_FUNCTION_LIST *t, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE obj,
                 std::string *problems) {
  if (obj == CK_INVALID_HANDLE) return;
  std::optional<bool> sensitive = ReadBool(t, s, obj, CKA_SENSITIVE);
  std::optional<bool> extractable = ReadBool(t, s, obj, CKA_EXTRACTABLE);
  std::optional<bool> trusted = ReadBool(t, s, obj, CKA_WRAP_WITH_TRUSTED);
  if (!sensitive || !*sensitive) Add(problems, "object:sensitive-false");
  if ((!extractable || *extractable) && !(trusted && *trusted)) {
    Add(problems, "object:extractable-true");
  }
}

struct UsageFlag {
  CK_ATTRIBUTE_TYPE type;
  const char *name;
};

constexpr UsageFlag kUsageFlags[] = {
    {CKA_ENCRYPT, "encrypt"},
    {CKA_DECRYPT, "decrypt"},
    {CKA_SIGN, "sign"},
    {CKA_VERIFY, "verify"},
    {CKA_SIGN_RECOVER, "sign-recover"},
    {CKA_VERIFY_RECOVER, "verify-recover"},
    {CKA_WRAP, "wrap"},
    {CKA_UNWRAP, "unwrap"},
    {CKA_DERIVE, "derive"},
};

// The usage flags a derived key of `key_type` may have (docs/FORMAT.md).
bool UsageAllowed(CK_KEY_TYPE key_type, CK_ATTRIBUTE_TYPE flag) {
  switch (key_type) {
    case CKK_AES:
      return flag == CKA_ENCRYPT || flag == CKA_DECRYPT;
    case CKK_GENERIC_SECRET:
      return flag == CKA_SIGN || flag == CKA_VERIFY;
    default:
      return false;
  }
}

}  // namespace

bool Auditor::Open(const std::string &path) {
  Close();
  for (auto &c : counts_) c.store(0);
  if (path.empty()) return true;
  fd_ = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    std::fprintf(stderr,
                 "hsmstek-faulty: cannot open audit log %s; audit disabled\n",
                 path.c_str());
    return false;
  }
  return true;
}

void Auditor::Close() {
  if (fd_ < 0) return;
  std::uint64_t total = 0;
  for (const auto &c : counts_) total += c.load();
  if (total > 0) {
    std::string line = "summary pid=" + std::to_string(::getpid()) +
                       " violations=" + std::to_string(total);
    for (int k = 0; k < kKindCount; ++k) {
      line += std::string(" ") + kKindNames[k] + "=" +
              std::to_string(counts_[k].load());
    }
    line += "\n";
    // One write per line: O_APPEND keeps lines whole across processes.
    if (::write(fd_, line.data(), line.size()) < 0) {
      std::fprintf(stderr, "hsmstek-faulty: audit log write failed\n");
    }
  }
  ::close(fd_);
  fd_ = -1;
}

void Auditor::Record(Kind kind, Fn fn, const std::string &details) {
  if (fd_ < 0) return;
  counts_[kind].fetch_add(1);
  std::string line =
      std::string(kKindNames[kind]) + " " + std::string(FnName(fn)) +
      " pid=" + std::to_string(::getpid()) + " " + details + "\n";
  if (::write(fd_, line.data(), line.size()) < 0) {
    std::fprintf(stderr, "hsmstek-faulty: audit log write failed\n");
  }
}

void Auditor::GetAttributeValue(CK_FUNCTION_LIST *target,
                                CK_SESSION_HANDLE session,
                                CK_OBJECT_HANDLE object,
                                const CK_ATTRIBUTE *tmpl, CK_ULONG count) {
  if (fd_ < 0 || FindAttr(tmpl, count, CKA_VALUE) == nullptr) return;
  std::optional<CK_ULONG> cls = ReadUlong(target, session, object, CKA_CLASS);
  if (!cls || !IsKeyClass(*cls)) return;
  Record(kReadValue, Fn::C_GetAttributeValue,
         "class=" + ClassName(*cls) +
             " label=" + ReadLabel(target, session, object));
}

void Auditor::NewKey(Fn fn, CK_FUNCTION_LIST *target, CK_SESSION_HANDLE session,
                     CK_OBJECT_CLASS default_class, const CK_ATTRIBUTE *tmpl,
                     CK_ULONG count, CK_OBJECT_HANDLE created) {
  if (fd_ < 0) return;
  CK_OBJECT_CLASS cls =
      TemplateUlong(tmpl, count, CKA_CLASS).value_or(default_class);
  if (!IsKeyClass(cls)) return;
  std::string problems;
  std::optional<bool> sensitive = TemplateBool(tmpl, count, CKA_SENSITIVE);
  std::optional<bool> extractable = TemplateBool(tmpl, count, CKA_EXTRACTABLE);
  std::optional<bool> trusted =
      TemplateBool(tmpl, count, CKA_WRAP_WITH_TRUSTED);
  if (!sensitive) {
    Add(&problems, "template:sensitive-missing");
  } else if (!*sensitive) {
    Add(&problems, "template:sensitive-false");
  }
  if (!extractable) {
    Add(&problems, "template:extractable-missing");
  } else if (*extractable && !(trusted && *trusted)) {
    Add(&problems, "template:extractable-true");
  }
  CheckObject(target, session, created, &problems);
  if (problems.empty()) return;
  std::string label = TemplateLabel(tmpl, count);
  if (label == "?" && created != CK_INVALID_HANDLE) {
    label = ReadLabel(target, session, created);
  }
  Record(
      kWeakKey, fn,
      "class=" + ClassName(cls) + " label=" + label + " problems=" + problems);
}

void Auditor::ChangedKey(Fn fn, CK_FUNCTION_LIST *target,
                         CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object,
                         const CK_ATTRIBUTE *tmpl, CK_ULONG count,
                         CK_OBJECT_HANDLE created) {
  if (fd_ < 0) return;
  std::optional<CK_ULONG> cls = ReadUlong(target, session, object, CKA_CLASS);
  if (!cls || !IsKeyClass(*cls)) return;
  std::string problems;
  std::optional<bool> sensitive = TemplateBool(tmpl, count, CKA_SENSITIVE);
  std::optional<bool> extractable = TemplateBool(tmpl, count, CKA_EXTRACTABLE);
  std::optional<bool> trusted =
      TemplateBool(tmpl, count, CKA_WRAP_WITH_TRUSTED);
  if (sensitive && !*sensitive) Add(&problems, "template:sensitive-false");
  if (extractable && *extractable && !(trusted && *trusted)) {
    Add(&problems, "template:extractable-true");
  }
  CheckObject(target, session, created, &problems);
  if (problems.empty()) return;
  Record(kWeakKey, fn,
         "class=" + ClassName(*cls) + " label=" +
             ReadLabel(target, session, object) + " problems=" + problems);
}

void Auditor::Wrap(CK_FUNCTION_LIST *target, CK_SESSION_HANDLE session,
                   const CK_MECHANISM *mechanism, CK_OBJECT_HANDLE wrapping_key,
                   CK_OBJECT_HANDLE key, bool length_query) {
  if (fd_ < 0) return;
  std::string mech =
      mechanism == nullptr ? "?" : MechanismName(mechanism->mechanism);
  Record(kWrap, Fn::C_WrapKey,
         "label=" + ReadLabel(target, session, key) + " mechanism=" + mech +
             " wrapping_label=" + ReadLabel(target, session, wrapping_key) +
             (length_query ? " length-query" : ""));
}

// A ratchet step: CKM_AES_ECB_ENCRYPT_DATA over two "hstk" 'R' blocks.
bool IsRatchetStep(const CK_MECHANISM *mechanism) {
  if (mechanism == nullptr ||
      mechanism->mechanism != CKM_AES_ECB_ENCRYPT_DATA ||
      mechanism->pParameter == nullptr ||
      mechanism->ulParameterLen != sizeof(CK_KEY_DERIVATION_STRING_DATA)) {
    return false;
  }
  const auto *p =
      static_cast<const CK_KEY_DERIVATION_STRING_DATA *>(mechanism->pParameter);
  if (p->pData == nullptr || p->ulLen != 32) return false;
  for (int block = 0; block < 2; ++block) {
    const CK_BYTE *b = p->pData + 16 * block;
    if (b[0] != 'h' || b[1] != 's' || b[2] != 't' || b[3] != 'k' ||
        b[4] != 'R') {
      return false;
    }
  }
  return true;
}

void Auditor::Derive(CK_FUNCTION_LIST *target, CK_SESSION_HANDLE session,
                     const CK_MECHANISM *mechanism, const CK_ATTRIBUTE *tmpl,
                     CK_ULONG count, CK_OBJECT_HANDLE created) {
  if (fd_ < 0) return;
  const bool link = IsRatchetStep(mechanism);
  std::optional<CK_ULONG> key_type = TemplateUlong(tmpl, count, CKA_KEY_TYPE);
  if (!key_type && created != CK_INVALID_HANDLE) {
    key_type = ReadUlong(target, session, created, CKA_KEY_TYPE);
  }
  std::string problems;
  if (!key_type) {
    Add(&problems, "key-type-missing");
  } else if (*key_type != CKK_AES && *key_type != CKK_GENERIC_SECRET) {
    Add(&problems, "key-type-" + KeyTypeName(*key_type));
  }
  CK_KEY_TYPE kt = key_type.value_or(CKK_VENDOR_DEFINED);
  if (link && kt != CKK_AES) Add(&problems, "link-key-type");
  // A link derives and does nothing else; epoch keys never derive.
  auto allowed = [&](CK_ATTRIBUTE_TYPE type) {
    return link ? type == CKA_DERIVE : UsageAllowed(kt, type);
  };
  for (const UsageFlag &f : kUsageFlags) {
    std::optional<bool> v = TemplateBool(tmpl, count, f.type);
    if (v && *v && !allowed(f.type)) {
      Add(&problems, std::string("template:") + f.name);
    }
  }
  std::optional<bool> token = TemplateBool(tmpl, count, CKA_TOKEN);
  if (token && *token && !link) Add(&problems, "template:token");
  if (created != CK_INVALID_HANDLE) {
    for (const UsageFlag &f : kUsageFlags) {
      std::optional<bool> v = ReadBool(target, session, created, f.type);
      if (v && *v && !allowed(f.type)) {
        Add(&problems, std::string("object:") + f.name);
      }
    }
    std::optional<bool> obj_token =
        ReadBool(target, session, created, CKA_TOKEN);
    if (!link && (!obj_token || *obj_token)) Add(&problems, "object:token");
  }
  if (problems.empty()) return;
  std::string label = TemplateLabel(tmpl, count);
  Record(kDeriveUsage, Fn::C_DeriveKey,
         "key_type=" + (key_type ? KeyTypeName(*key_type) : std::string("?")) +
             " label=" + label + " problems=" + problems);
}

}  // namespace hsmstek::faulty
