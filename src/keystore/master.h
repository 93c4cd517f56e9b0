// Masters and legacy keys as they live in the token (docs/FORMAT.md), and the key
// states computed from their policies and the clock.
//
// States (closed set, Tink-style):
//   kPending      activation (not-before) is in the future;
//   kActive       the newest activated, unretired master: it encrypts;
//   kDecryptOnly  superseded by a newer active master less than one
//                 decrypt window ago: its tickets are still accepted;
//   kRetired      retired explicitly (retire-at passed) or superseded for a
//                 whole decrypt window: nothing under it is accepted.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "keystore/key_attributes.h"
#include "keystore/key_name.h"
#include "keystore/policy.h"
#include "pkcs11/token.h"

namespace hsmstek::keystore {

enum class KeyState : uint8_t { kPending, kActive, kDecryptOnly, kRetired };

// Returns "pending", "active", "decrypt-only" or "retired".
std::string_view KeyStateName(KeyState state);

inline constexpr char kPolicyApplication[] = "hsmstek";
inline constexpr char kLegacyApplication[] = "hsmstek-legacy";
// PKCS#11 gives CKO_DATA objects no CKA_ID (SoftHSM refuses it with
// CKR_ATTRIBUTE_TYPE_INVALID), so policy and legacy-info objects carry the
// store id / key name in CKA_OBJECT_ID, as opaque bytes. See docs/DESIGN.md.
inline constexpr CK_ATTRIBUTE_TYPE kDataIdAttribute = CKA_OBJECT_ID;

// One master generation of a store: its ratchet links, policy object and
// policy. Object handles are valid for one token generation only.
//
// The master is link 0 of a forward-secure chain (docs/DESIGN.md): link
// j+1 is derived from link j, epoch e uses link LinkIndex(e, first_epoch,
// RatchetPeriods(policy)), and links no acceptable epoch uses are
// destroyed — link 0 too. A master whose link 0 is gone is still a master:
// its policy object and its later links carry it.
struct Master {
  StoreId id{};
  Policy policy;
  // Link 0 (the CKA_ID = store id object), CK_INVALID_HANDLE once
  // destroyed by the ratchet.
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  // Every link present, by index (link 0 included while it exists).
  std::map<uint64_t, CK_OBJECT_HANDLE> links;
  // More objects with a link's id (concurrent servers deriving the same
  // link: same value); destroyed by maintenance.
  std::vector<std::pair<uint64_t, CK_OBJECT_HANDLE>> duplicate_links;
  CK_OBJECT_HANDLE policy_object = CK_INVALID_HANDLE;
  // More policy objects for this master (a policy update that failed
  // half-way): `policy` is the most restrictive of all; UpdatePolicy and
  // DestroyMaster remove these too.
  std::vector<CK_OBJECT_HANDLE> extra_policy_objects;
  bool extractable = false;
  Protections protections;

  // The activation epoch e0 of the chain.
  uint64_t first_epoch() const;
  // The link index of `epoch`, nullopt before activation.
  std::optional<uint64_t> LinkOf(uint64_t epoch) const;
  // The handle of the link `epoch` uses, CK_INVALID_HANDLE when absent.
  CK_OBJECT_HANDLE LinkFor(uint64_t epoch) const;
};

// An object of the store that could not be used, and why (shown by
// `hsmstek status`; the rest of the store keeps serving).
struct SkippedObject {
  std::string what;    // "master 0123456789abcdef", "legacy key ..."
  std::string reason;  // "no policy object", ...
};

// An imported legacy key pair (decrypt-only until `expires`).
struct LegacyKeyObjects {
  KeyName name;
  CK_OBJECT_HANDLE aes = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE hmac = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE info = CK_INVALID_HANDLE;
  int64_t expires = 0;
  std::string format;  // "nginx" or "haproxy"
  size_t aes_key_bytes = 0;
  Protections protections;  // of the AES key (the HMAC key is checked too)
};

struct MasterState {
  KeyState state;
  // When a newer master took over (not-before of the successor), if any.
  std::optional<int64_t> superseded_at;
};

// ComputeStates returns the state of each master in `masters` at `now`
// (same order). Pure.
std::vector<MasterState> ComputeStates(const std::vector<Master> &masters,
                                       int64_t now);

// LoadMasters finds every master of `label` with its policy. A master it
// cannot vouch for — no policy object, a policy it cannot read (e.g. a
// newer "hsmstek-policy 2"), read-back attributes weaker than docs/FORMAT.md —
// is left out and, when `skipped` is given, listed there with the reason;
// the other masters load. Several policy objects for one master resolve to
// the most restrictive (MostRestrictive). Errors are token trouble only.
[[nodiscard]] Result<std::vector<Master>> LoadMasters(
    p11::Session &session, std::string_view label,
    std::vector<SkippedObject> *skipped = nullptr);

// MostRestrictive merges several policies of one master field by field
// into the one that gives the least: the earliest retire-at (any before
// none), the shortest decrypt window, the latest activation, replicable
// only if all are. Policies that disagree on the period or the derivation
// cannot be merged (kFailedPrecondition: the master is left out).
// `policies` is not empty.
[[nodiscard]] Result<Policy> MostRestrictive(
    const std::vector<Policy> &policies);

// VerifyMasterAttributes is VerifyKey (key_attributes.h) for a master:
// refuses (kPermissionDenied) a key that is not sensitive, is extractable
// without being replicable under a trusted wrapping key, has any usage but
// CKA_DERIVE, or allows another mechanism than the derivation.
[[nodiscard]] Status VerifyMasterAttributes(p11::Session &session,
                                            CK_OBJECT_HANDLE key,
                                            bool replicable,
                                            std::string_view what);

// LoadLegacyKeys finds the imported legacy keys of `label`, read back and
// verified; an incomplete or weaker one is skipped like a master.
[[nodiscard]] Result<std::vector<LegacyKeyObjects>> LoadLegacyKeys(
    p11::Session &session, std::string_view label,
    std::vector<SkippedObject> *skipped = nullptr);

// Text of a legacy key's info object ("hsmstek-legacy 1", expires, format).
std::string SerializeLegacyInfo(int64_t expires, std::string_view format);
[[nodiscard]] Result<std::pair<int64_t, std::string>> ParseLegacyInfo(
    std::string_view text);

}  // namespace hsmstek::keystore
