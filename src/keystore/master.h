// Masters and legacy keys as they live in the token (SPEC §4), and the key
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

#include <optional>
#include <string>
#include <string_view>
#include <vector>

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

// One master generation of a store: its key object, policy object and
// policy. Object handles are valid for one token generation only.
struct Master {
  StoreId id{};
  Policy policy;
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE policy_object = CK_INVALID_HANDLE;
  bool extractable = false;
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

// LoadMasters finds every master of `label` with its policy. A master
// without a policy, with an unreadable policy, or whose read-back
// attributes are weaker than SPEC §4 is an error naming its store id: the
// store refuses to run on a key it cannot vouch for.
[[nodiscard]] Result<std::vector<Master>> LoadMasters(p11::Session &session,
                                                      std::string_view label);

// VerifyMasterAttributes reads back the master's boolean attributes and
// refuses (kPermissionDenied) a key that is not sensitive, is extractable
// without being replicable under a trusted wrapping key, or has any usage
// but CKA_DERIVE.
[[nodiscard]] Status VerifyMasterAttributes(p11::Session &session,
                                            CK_OBJECT_HANDLE key,
                                            bool replicable,
                                            std::string_view what);

// LoadLegacyKeys finds the imported legacy keys of `label`.
[[nodiscard]] Result<std::vector<LegacyKeyObjects>> LoadLegacyKeys(
    p11::Session &session, std::string_view label);

// Text of a legacy key's info object ("hsmstek-legacy 1", expires, format).
std::string SerializeLegacyInfo(int64_t expires, std::string_view format);
[[nodiscard]] Result<std::pair<int64_t, std::string>> ParseLegacyInfo(
    std::string_view text);

}  // namespace hsmstek::keystore
