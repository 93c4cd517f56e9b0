// The one owner of what each kind of key hsmstek keeps in a token must be
// (docs/SECURITY.md §4, docs/FORMAT.md; docs/SECURITY.md "Key attributes"): the
// template used to create or unwrap it, and the read-back that refuses a weaker
// key.
//
// Two attributes lock a key down further where the token knows them:
// CKA_ALLOWED_MECHANISMS (every key: only what the ticket path runs) and
// CKA_DERIVE_TEMPLATE (masters: whatever is derived is sensitive and never
// extractable). A token that refuses one (SoftHSM 2.6 refuses
// CKA_DERIVE_TEMPLATE) gets the key without it: CreateKey says so once in
// the log and reports it, and `hsmstek status` shows it per key.
//
// Thread-safety: pure functions, except CreateKey's once-per-process log.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "common/bytes.h"
#include "common/status.h"
#include "pkcs11/object.h"
#include "pkcs11/token.h"

namespace hsmstek::keystore {

enum class KeyKind : uint8_t {
  kMaster,     // derive-only token key (docs/FORMAT.md)
  kEpochAes,   // derived 'E' key: the ticket cipher
  kEpochMac,   // derived 'M' (and 'C' check) key: the ticket HMAC
  kLegacyAes,  // imported legacy AES key: decrypt only
  kLegacyMac,  // imported legacy HMAC key
  kNameKey,    // derived 'N' key: signs key names only
};

// The mechanisms each kind may run (CKA_ALLOWED_MECHANISMS). The AES list
// holds ECB as well: opening a ticket by ECB block decryption with the CBC
// chaining in memory is on its way (docs/DESIGN.md, "Pre-armed operations");
// CBC-PAD seals.
inline constexpr CK_MECHANISM_TYPE kTicketAesMechanisms[] = {CKM_AES_CBC_PAD,
                                                             CKM_AES_ECB};
inline constexpr CK_MECHANISM_TYPE kTicketMacMechanisms[] = {CKM_SHA256_HMAC};
inline constexpr CK_MECHANISM_TYPE kMasterMechanisms[] = {
    CKM_AES_ECB_ENCRYPT_DATA};

std::span<const CK_MECHANISM_TYPE> AllowedMechanisms(KeyKind kind);

// The optional lock-down attributes, as a bit set.
enum Lockdown : unsigned {
  kLockAllowedMechanisms = 1u << 0,
  kLockDeriveTemplate = 1u << 1,
  // Ratchet links (derived masters): CKA_MODIFIABLE=FALSE and
  // CKA_COPYABLE=FALSE in the C_DeriveKey template. SoftHSM 2.6 refuses
  // CKA_MODIFIABLE there (CKR_ATTRIBUTE_READ_ONLY); generated and imported
  // masters get CKA_MODIFIABLE=FALSE in their template or copy instead.
  kLockNotModifiable = 1u << 2,
  kLockNotCopyable = 1u << 3,
};
// The lock-down attributes `spec` gets where the token allows.
unsigned WantedLockdown(KeyKind kind);

// What a key carries, as read back.
enum class Protection : uint8_t {
  kApplied,      // present and no weaker than required
  kAbsent,       // the token knows the attribute; the key lacks it (older key)
  kUnsupported,  // the token does not know the attribute
  kNotApplicable,
};
// "applied", "absent", "unsupported by the token", "n/a".
std::string_view ProtectionName(Protection p);

struct Protections {
  Protection allowed_mechanisms = Protection::kNotApplicable;
  Protection derive_template = Protection::kNotApplicable;
  // Masters and links: CKA_MODIFIABLE / CKA_COPYABLE read back FALSE
  // (kApplied), TRUE (kAbsent) or unknown to the token (kUnsupported).
  Protection not_modifiable = Protection::kNotApplicable;
  Protection not_copyable = Protection::kNotApplicable;
  // Masters: CKA_LOCAL, i.e. generated in this token (TRUE) or brought in
  // from outside (FALSE: imported, or created of known bytes by anyone
  // with the user PIN; attributes cannot tell these two apart).
  std::optional<bool> generated_in_token;
};

// The per-call part of a key's template. Ratchet links are kMaster keys
// (same template; CKA_ID = store id || link index).
struct KeySpec {
  KeyKind kind = KeyKind::kMaster;
  std::string_view label;   // masters and legacy keys
  ByteSpan id;              // CKA_ID: store id, or a legacy key's name
  bool replicable = false;  // masters: extractable under a trusted key only
  // C_UnwrapKey takes the length from the wrapped value and (SoftHSM)
  // refuses CKA_MODIFIABLE: leave both out.
  bool for_unwrap = false;
  // SoftHSM refuses CKA_MODIFIABLE in a C_DeriveKey template
  // (CKR_ATTRIBUTE_READ_ONLY): ratchet links leave it out.
  bool for_derive = false;
};

// WantedLockdown(spec.kind), plus kLockNotModifiable and kLockNotCopyable
// for ratchet links (masters made by C_DeriveKey).
unsigned WantedLockdown(const KeySpec &spec);

// KeyTemplate returns the template of `spec` with the lock-down attributes
// in `lockdown` (a subset of WantedLockdown). Legacy keys get no CKA_VALUE:
// the caller appends it.
p11::Template KeyTemplate(const KeySpec &spec, unsigned lockdown);

// MasterUnwrapConstraints returns what an unwrapping key forces on every
// key it unwraps (its CKA_UNWRAP_TEMPLATE): a master's class, type and
// usage, sensitive, wrappable only by a trusted key. CKA_TOKEN and
// CKA_EXTRACTABLE stay free (import unwraps into a session object first;
// replicable masters are extractable).
p11::Template MasterUnwrapConstraints();

// A key made by CreateKey, with the lock-down attributes it got.
struct CreatedKey {
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  unsigned lockdown = 0;
};

// Makes the key with `tmpl` (C_GenerateKey, C_DeriveKey, C_UnwrapKey or
// C_CreateObject); returns the PKCS#11 status.
using KeyFactory =
    std::function<Status(p11::Template &tmpl, CK_OBJECT_HANDLE *out)>;

// CreateKey calls `factory` with the template of `spec` and every wanted
// lock-down attribute not in `*refused`; where the token refuses the
// template (CKR_ATTRIBUTE_TYPE_INVALID, CKR_ATTRIBUTE_VALUE_INVALID,
// CKR_TEMPLATE_INCONSISTENT, CKR_ATTRIBUTE_READ_ONLY), it retries with
// fewer (every subset, largest first, CKA_ALLOWED_MECHANISMS kept longest),
// records what the token refused in `*refused` (callers keep it per token,
// so later keys skip the refused attempt) and logs once per process and
// attribute. `extend` appends call-specific attributes (a legacy key's
// value) to each template.
[[nodiscard]] Result<CreatedKey> CreateKey(
    const KeySpec &spec, const KeyFactory &factory,
    std::atomic<unsigned> *refused,
    const std::function<void(p11::Template &)> &extend = nullptr);

// VerifyKey reads `key` back and refuses (kPermissionDenied, naming `what`
// and the attribute) a key weaker than `spec` requires: a required TRUE
// flag not TRUE, a forbidden usage TRUE, extractable without being a
// replicable master wrappable only by a trusted key, another key type or
// length, allowed mechanisms beyond the kind's list, or a lock-down
// attribute in `required` (what creation applied) missing. Keys found
// without lock-down attributes (made before they existed) are accepted and
// reported as kAbsent.
[[nodiscard]] Result<Protections> VerifyKey(p11::Session &session,
                                            CK_OBJECT_HANDLE key,
                                            const KeySpec &spec,
                                            std::string_view what,
                                            unsigned required = 0);

}  // namespace hsmstek::keystore
