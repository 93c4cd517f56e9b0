#include "keystore/key_attributes.h"

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "common/log.h"

namespace hsmstek::keystore {
namespace {

struct Flag {
  CK_ATTRIBUTE_TYPE type;
  const char *name;
};

#define HSMSTEK_FLAG(x) \
  Flag { x, #x }

// The table: one row per kind. Usage flags not in `on` are FALSE in the
// template and must not be TRUE when read back.
struct KindRule {
  CK_KEY_TYPE key_type;
  bool token;
  bool modifiable_false;     // template only: token keys are never changed
  CK_ULONG template_length;  // 0: the value or the wrapped key sets it
  std::vector<CK_ULONG> lengths;
  std::vector<Flag> on;
};

constexpr Flag kUsages[] = {
    HSMSTEK_FLAG(CKA_DERIVE),  HSMSTEK_FLAG(CKA_ENCRYPT),
    HSMSTEK_FLAG(CKA_DECRYPT), HSMSTEK_FLAG(CKA_SIGN),
    HSMSTEK_FLAG(CKA_VERIFY),  HSMSTEK_FLAG(CKA_WRAP),
    HSMSTEK_FLAG(CKA_UNWRAP)};

const KindRule &RuleOf(KeyKind kind) {
  static const KindRule kMaster{.key_type = CKK_AES,
                                .token = true,
                                .modifiable_false = true,
                                .template_length = 32,
                                .lengths = {32},
                                .on = {HSMSTEK_FLAG(CKA_DERIVE)}};
  static const KindRule kEpochAes{
      .key_type = CKK_AES,
      .token = false,
      .modifiable_false = false,
      .template_length = 32,
      .lengths = {32},
      .on = {HSMSTEK_FLAG(CKA_ENCRYPT), HSMSTEK_FLAG(CKA_DECRYPT)}};
  static const KindRule kEpochMac{
      .key_type = CKK_GENERIC_SECRET,
      .token = false,
      .modifiable_false = false,
      .template_length = 32,
      .lengths = {32},
      .on = {HSMSTEK_FLAG(CKA_SIGN), HSMSTEK_FLAG(CKA_VERIFY)}};
  static const KindRule kNameKey{.key_type = CKK_GENERIC_SECRET,
                                 .token = false,
                                 .modifiable_false = false,
                                 .template_length = 32,
                                 .lengths = {32},
                                 .on = {HSMSTEK_FLAG(CKA_SIGN)}};
  // Never encrypts: new tickets are sealed under epoch keys only.
  static const KindRule kLegacyAes{.key_type = CKK_AES,
                                   .token = true,
                                   .modifiable_false = true,
                                   .template_length = 0,
                                   .lengths = {16, 32},
                                   .on = {HSMSTEK_FLAG(CKA_DECRYPT)}};
  // HMAC keys shorter than 32 bytes are stored zero-padded (provisioning.cc).
  static const KindRule kLegacyMac{
      .key_type = CKK_GENERIC_SECRET,
      .token = true,
      .modifiable_false = true,
      .template_length = 0,
      .lengths = {32},
      .on = {HSMSTEK_FLAG(CKA_SIGN), HSMSTEK_FLAG(CKA_VERIFY)}};
  switch (kind) {
    case KeyKind::kMaster:
      return kMaster;
    case KeyKind::kEpochAes:
      return kEpochAes;
    case KeyKind::kEpochMac:
      return kEpochMac;
    case KeyKind::kLegacyAes:
      return kLegacyAes;
    case KeyKind::kNameKey:
      return kNameKey;
    case KeyKind::kLegacyMac:
    default:
      return kLegacyMac;
  }
}

bool IsOn(const KindRule &rule, CK_ATTRIBUTE_TYPE type) {
  return std::any_of(rule.on.begin(), rule.on.end(),
                     [type](const Flag &f) { return f.type == type; });
}

// What a master forces on keys derived from it (CKA_DERIVE_TEMPLATE). The
// arrays point into static storage, so copies of their bytes stay valid.
// A replicable master's links must stay wrappable (by a trusted key only),
// so its template forces that instead of CKA_EXTRACTABLE=FALSE; the epoch
// keys ask for CKA_EXTRACTABLE=FALSE in their own templates.
ByteSpan DeriveTemplateBytes(bool replicable) {
  static CK_BBOOL yes = CK_TRUE;
  static CK_BBOOL no = CK_FALSE;
  static CK_ATTRIBUTE derived[] = {{CKA_SENSITIVE, &yes, sizeof(yes)},
                                   {CKA_EXTRACTABLE, &no, sizeof(no)}};
  static CK_ATTRIBUTE replicable_derived[] = {
      {CKA_SENSITIVE, &yes, sizeof(yes)},
      {CKA_WRAP_WITH_TRUSTED, &yes, sizeof(yes)}};
  return replicable
             ? ByteSpan(reinterpret_cast<const uint8_t *>(replicable_derived),
                        sizeof(replicable_derived))
             : ByteSpan(reinterpret_cast<const uint8_t *>(derived),
                        sizeof(derived));
}

ByteSpan MechanismBytes(std::span<const CK_MECHANISM_TYPE> m) {
  return ByteSpan(reinterpret_cast<const uint8_t *>(m.data()), m.size_bytes());
}

bool RefusedTemplate(const Status &s) {
  return s.ckr() == CKR_ATTRIBUTE_TYPE_INVALID ||
         s.ckr() == CKR_ATTRIBUTE_READ_ONLY ||
         s.ckr() == CKR_ATTRIBUTE_VALUE_INVALID ||
         s.ckr() == CKR_TEMPLATE_INCONSISTENT;
}

constexpr unsigned kAllLockdown = kLockAllowedMechanisms | kLockDeriveTemplate |
                                  kLockNotModifiable | kLockNotCopyable;

const char *LockdownName(unsigned bit) {
  switch (bit) {
    case kLockDeriveTemplate:
      return "CKA_DERIVE_TEMPLATE";
    case kLockNotModifiable:
      return "CKA_MODIFIABLE=FALSE on derived ratchet links";
    case kLockNotCopyable:
      return "CKA_COPYABLE=FALSE on derived ratchet links";
    default:
      return "CKA_ALLOWED_MECHANISMS";
  }
}

// Logs, once per process and attribute, that the token refused it.
void LogRefusedOnce(unsigned bits) {
  static std::atomic<unsigned> logged{0};
  for (unsigned bit : {kLockAllowedMechanisms, kLockDeriveTemplate,
                       kLockNotModifiable, kLockNotCopyable}) {
    if ((bits & bit) == 0 || (logged.fetch_or(bit) & bit) != 0) continue;
    log::Warning(std::string("hsmstek: the token refuses ") +
                 LockdownName(bit) +
                 "; keys are created without it (their other attributes "
                 "are unchanged; `hsmstek status` shows each key's "
                 "protections)");
  }
}

// Reads an attribute the token may not know: nullopt when it does not
// (CKR_ATTRIBUTE_TYPE_INVALID, or unavailable).
Result<std::optional<Bytes>> ReadOptional(p11::Session &session,
                                          CK_OBJECT_HANDLE key,
                                          CK_ATTRIBUTE_TYPE type) {
  CK_ATTRIBUTE attr{type, nullptr, 0};
  CK_RV rv = session.fn()->C_GetAttributeValue(session.handle(), key, &attr, 1);
  if (rv == CKR_ATTRIBUTE_TYPE_INVALID ||
      (rv == CKR_OK && attr.ulValueLen == CK_UNAVAILABLE_INFORMATION)) {
    return std::optional<Bytes>();
  }
  Status s = session.Check("C_GetAttributeValue", rv);
  if (!s.ok()) return s;
  Bytes value(attr.ulValueLen);
  attr.pValue = value.data();
  if (value.empty()) return std::optional<Bytes>(value);
  s = P11_CALL(session, C_GetAttributeValue, session.handle(), key, &attr, 1);
  if (!s.ok()) return s;
  value.resize(attr.ulValueLen);
  return std::optional<Bytes>(value);
}

}  // namespace

std::span<const CK_MECHANISM_TYPE> AllowedMechanisms(KeyKind kind) {
  switch (kind) {
    case KeyKind::kMaster:
      return kMasterMechanisms;
    case KeyKind::kEpochAes:
    case KeyKind::kLegacyAes:
      return kTicketAesMechanisms;
    case KeyKind::kEpochMac:
    case KeyKind::kLegacyMac:
    case KeyKind::kNameKey:
    default:
      return kTicketMacMechanisms;
  }
}

unsigned WantedLockdown(KeyKind kind) {
  return kind == KeyKind::kMaster ? kLockAllowedMechanisms | kLockDeriveTemplate
                                  : kLockAllowedMechanisms;
}

unsigned WantedLockdown(const KeySpec &spec) {
  const bool link = spec.kind == KeyKind::kMaster && spec.for_derive;
  return WantedLockdown(spec.kind) |
         (link ? kLockNotModifiable | kLockNotCopyable : 0u);
}

std::string_view ProtectionName(Protection p) {
  switch (p) {
    case Protection::kApplied:
      return "applied";
    case Protection::kAbsent:
      return "absent";
    case Protection::kUnsupported:
      return "unsupported by the token";
    case Protection::kNotApplicable:
    default:
      return "n/a";
  }
}

p11::Template KeyTemplate(const KeySpec &spec, unsigned lockdown) {
  const KindRule &rule = RuleOf(spec.kind);
  const bool master = spec.kind == KeyKind::kMaster;
  p11::Template t;
  t.Ulong(CKA_CLASS, CKO_SECRET_KEY).Ulong(CKA_KEY_TYPE, rule.key_type);
  if (rule.template_length != 0 && !spec.for_unwrap) {
    t.Ulong(CKA_VALUE_LEN, rule.template_length);
  }
  t.Bool(CKA_TOKEN, rule.token)
      .Bool(CKA_PRIVATE, true)
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, master && spec.replicable);
  for (const Flag &f : kUsages) t.Bool(f.type, IsOn(rule, f.type));
  if (rule.modifiable_false && !spec.for_unwrap && !spec.for_derive) {
    t.Bool(CKA_MODIFIABLE, false);
  }
  if (!spec.label.empty()) t.String(CKA_LABEL, spec.label);
  if (!spec.id.empty()) t.Data(CKA_ID, spec.id);
  if (master && spec.replicable) t.Bool(CKA_WRAP_WITH_TRUSTED, true);
  if (lockdown & kLockAllowedMechanisms) {
    t.Data(CKA_ALLOWED_MECHANISMS,
           MechanismBytes(AllowedMechanisms(spec.kind)));
  }
  if (master && (lockdown & kLockDeriveTemplate)) {
    t.Data(CKA_DERIVE_TEMPLATE, DeriveTemplateBytes(spec.replicable));
  }
  if (lockdown & kLockNotModifiable) t.Bool(CKA_MODIFIABLE, false);
  if (lockdown & kLockNotCopyable) t.Bool(CKA_COPYABLE, false);
  return t;
}

p11::Template MasterUnwrapConstraints() {
  const KindRule &rule = RuleOf(KeyKind::kMaster);
  p11::Template t;
  t.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, rule.key_type)
      .Bool(CKA_PRIVATE, true)
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_WRAP_WITH_TRUSTED, true);
  for (const Flag &f : kUsages) t.Bool(f.type, IsOn(rule, f.type));
  return t;
}

Result<CreatedKey> CreateKey(
    const KeySpec &spec, const KeyFactory &factory,
    std::atomic<unsigned> *refused,
    const std::function<void(p11::Template &)> &extend) {
  const unsigned wanted = WantedLockdown(spec);
  // Strongest first: every subset of what was not refused before, the
  // largest first; among equals the one keeping the lowest bits
  // (CKA_ALLOWED_MECHANISMS first). Only the first key per token pays for
  // the refused attempts: `*refused` remembers them.
  const unsigned avail = wanted & ~refused->load();
  std::vector<unsigned> attempts;
  for (unsigned set = 0; set <= kAllLockdown; ++set) {
    if ((set & ~avail) == 0) attempts.push_back(set);
  }
  // Bit i weighs 2^(3-i): the lowest bits are kept longest.
  auto weight = [](unsigned set) {
    unsigned w = 0;
    for (unsigned i = 0; i < 4; ++i) {
      if (set & (1u << i)) w |= 1u << (3 - i);
    }
    return w;
  };
  std::sort(attempts.begin(), attempts.end(), [&](unsigned a, unsigned b) {
    const int pa = __builtin_popcount(a);
    const int pb = __builtin_popcount(b);
    return pa != pb ? pa > pb : weight(a) > weight(b);
  });
  Status last;
  for (unsigned set : attempts) {
    p11::Template t = KeyTemplate(spec, set);
    if (extend) extend(t);
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    last = factory(t, &h);
    if (last.ok()) {
      // Every better attempt was refused or skipped for an earlier refusal.
      const unsigned missing = wanted & ~set;
      if (missing != 0) {
        refused->fetch_or(missing);
        LogRefusedOnce(missing);
      }
      return CreatedKey{h, set};
    }
    if (!RefusedTemplate(last) || set == 0) return last;
  }
  return last;
}

Result<Protections> VerifyKey(p11::Session &session, CK_OBJECT_HANDLE key,
                              const KeySpec &spec, std::string_view what,
                              unsigned required) {
  const KindRule &rule = RuleOf(spec.kind);
  const bool master = spec.kind == KeyKind::kMaster;
  std::vector<Flag> flags = {HSMSTEK_FLAG(CKA_TOKEN), HSMSTEK_FLAG(CKA_PRIVATE),
                             HSMSTEK_FLAG(CKA_SENSITIVE),
                             HSMSTEK_FLAG(CKA_EXTRACTABLE),
                             HSMSTEK_FLAG(CKA_WRAP_WITH_TRUSTED)};
  flags.insert(flags.end(), std::begin(kUsages), std::end(kUsages));
  std::vector<CK_ATTRIBUTE_TYPE> types;
  for (const Flag &f : flags) types.push_back(f.type);
  Result<std::vector<std::optional<bool>>> values =
      p11::ReadBools(session, key, types);
  if (!values.ok()) return values.status();
  auto weak = [&](const Flag &f, const std::string &why) {
    return PermissionDenied(std::string(what) +
                            " is weaker than required: " + f.name + " " + why);
  };
  const auto &v = *values;
  if (v[0] != rule.token) {
    return weak(flags[0], rule.token ? "is not TRUE" : "is TRUE");
  }
  for (size_t i : {1u, 2u}) {
    if (v[i] != true) return weak(flags[i], "is not TRUE");
  }
  for (size_t i = 5; i < flags.size(); ++i) {
    const bool on = IsOn(rule, flags[i].type);
    if (on && v[i] != true) return weak(flags[i], "is not TRUE");
    // Absent counts as FALSE.
    if (!on && v[i] == true) return weak(flags[i], "is TRUE (not its use)");
  }
  if (v[3] == true) {
    if (!master || !spec.replicable) {
      return weak(flags[3], master ? "is TRUE but the store is not replicable"
                                   : "is TRUE");
    }
    if (v[4] != true) {
      return weak(flags[4],
                  "is not TRUE: a replicable master may only be wrapped by a "
                  "trusted key");
    }
  }

  Result<CK_ULONG> key_type = p11::ReadUlong(session, key, CKA_KEY_TYPE);
  if (!key_type.ok()) return key_type.status();
  Result<CK_ULONG> length = p11::ReadUlong(session, key, CKA_VALUE_LEN);
  if (!length.ok()) return length.status();
  bool length_ok = std::find(rule.lengths.begin(), rule.lengths.end(),
                             *length) != rule.lengths.end();
  std::optional<bool> local;
  if (master) {
    Result<std::vector<std::optional<bool>>> l =
        p11::ReadBools(session, key, std::array{CKA_LOCAL});
    if (!l.ok()) return l.status();
    local = (*l)[0];
  }
  // SoftHSM 2.6 records CKA_VALUE_LEN 0 for an unwrapped key and refuses the
  // attribute in an unwrap template; such a master (CKA_LOCAL FALSE) was
  // proved equal to the exporter's 32-byte master by its check value.
  if (master && *length == 0) length_ok = local == false;
  if (*key_type != rule.key_type || !length_ok) {
    return PermissionDenied(std::string(what) +
                            " is not a key of the expected type and length");
  }

  Protections out;
  out.generated_in_token = local;
  Result<std::optional<Bytes>> allowed =
      ReadOptional(session, key, CKA_ALLOWED_MECHANISMS);
  if (!allowed.ok()) return allowed.status();
  if (!*allowed) {
    out.allowed_mechanisms = Protection::kUnsupported;
  } else if ((*allowed)->empty()) {
    out.allowed_mechanisms = Protection::kAbsent;
  } else {
    const Bytes &raw = **allowed;
    std::span<const CK_MECHANISM_TYPE> ok = AllowedMechanisms(spec.kind);
    for (size_t off = 0; off + sizeof(CK_MECHANISM_TYPE) <= raw.size();
         off += sizeof(CK_MECHANISM_TYPE)) {
      CK_MECHANISM_TYPE m;
      std::memcpy(&m, raw.data() + off, sizeof(m));
      if (std::find(ok.begin(), ok.end(), m) == ok.end()) {
        return PermissionDenied(std::string(what) +
                                " is weaker than required: "
                                "CKA_ALLOWED_MECHANISMS allows " +
                                p11::MechanismName(m));
      }
    }
    out.allowed_mechanisms = Protection::kApplied;
  }
  if (master) {
    Result<std::optional<Bytes>> derive =
        ReadOptional(session, key, CKA_DERIVE_TEMPLATE);
    if (!derive.ok()) return derive.status();
    out.derive_template = !*derive             ? Protection::kUnsupported
                          : (*derive)->empty() ? Protection::kAbsent
                                               : Protection::kApplied;
  }
  if (master) {
    // A modifiable link could be given CKA_ENCRYPT; a copyable one copied
    // with other attributes where the token allows.
    for (auto [type, field] : {std::pair{CKA_MODIFIABLE, &out.not_modifiable},
                               std::pair{CKA_COPYABLE, &out.not_copyable}}) {
      Result<std::optional<Bytes>> v = ReadOptional(session, key, type);
      if (!v.ok()) return v.status();
      *field = !*v || (*v)->size() != sizeof(CK_BBOOL)
                   ? Protection::kUnsupported
               : (**v)[0] == CK_FALSE ? Protection::kApplied
                                      : Protection::kAbsent;
    }
  }
  for (auto [bit, got, name] :
       {std::tuple{kLockNotModifiable, out.not_modifiable, "CKA_MODIFIABLE"},
        std::tuple{kLockNotCopyable, out.not_copyable, "CKA_COPYABLE"}}) {
    if ((required & bit) && got != Protection::kApplied) {
      return PermissionDenied(std::string(what) + " is weaker than required: " +
                              name + " is not FALSE");
    }
  }
  if ((required & kLockAllowedMechanisms) &&
      out.allowed_mechanisms != Protection::kApplied) {
    return PermissionDenied(std::string(what) +
                            " is weaker than required: the token dropped "
                            "CKA_ALLOWED_MECHANISMS");
  }
  if ((required & kLockDeriveTemplate) &&
      out.derive_template != Protection::kApplied) {
    return PermissionDenied(std::string(what) +
                            " is weaker than required: the token dropped "
                            "CKA_DERIVE_TEMPLATE");
  }
  return out;
}

}  // namespace hsmstek::keystore
