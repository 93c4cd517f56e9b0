// Key names and derivation data of docs/FORMAT.md (fixed byte layouts; every
// server of a fleet must agree byte for byte). Pure functions, thread-safe.
//
//   key name v2 (16)       = HMAC-SHA256(N key of the epoch's link,
//                            "hsmstek name" || epoch BE64)[0..16)
//                            (computed in the token: derivation.h)
//   key name v1 (no longer issued) = store_id (8) || epoch (uint64 BE)
//   ratchet link j+1       = C_DeriveKey(link j, B('R',1,j+1)||B('R',2,j+1))
//   epoch                  = floor(unix_time / period_seconds)
//   derivation data (32)   = B(p, 1) || B(p, 2)
//   B(p, i)                = "hstk" || p || i || 0x00 0x00 || epoch (8, BE)
//
// The per-epoch keys are C_DeriveKey(CKM_AES_ECB_ENCRYPT_DATA) of the master
// over that data, with p = 'E' (AES key) or 'M' (HMAC key). The check value
// is the first 8 bytes of C_Sign(HMAC key derived with p = 'C', epoch 0,
// "hsmstek check").
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>

#include "common/bytes.h"
#include "common/status.h"

namespace hsmstek::keystore {

// The CKA_ID of a master: 8 random bytes.
using StoreId = std::array<uint8_t, 8>;

inline constexpr size_t kKeyNameSize = 16;
inline constexpr size_t kDerivationDataSize = 32;
inline constexpr size_t kCheckValueSize = 8;

// Derivation purposes (the `p` byte of B(p, i)).
inline constexpr char kPurposeEncrypt = 'E';
inline constexpr char kPurposeMac = 'M';
inline constexpr char kPurposeCheck = 'C';
// The name key (version-2 key names) and the ratchet step.
inline constexpr char kPurposeName = 'N';
inline constexpr char kPurposeRatchet = 'R';
// The name key is derived for this epoch; a name is the first 16 bytes of
// HMAC-SHA256(name key, kNameLabel (12 ASCII bytes) || epoch (8, BE)).
inline constexpr uint64_t kNameKeyEpoch = 0;
inline constexpr char kNameLabel[] = "hsmstek name";
inline constexpr size_t kNameLabelSize = sizeof(kNameLabel) - 1;
inline constexpr size_t kNameInputSize = kNameLabelSize + 8;
// The check value is derived for this epoch and signs kCheckMessage (the
// 13 ASCII bytes, without the terminating NUL).
inline constexpr uint64_t kCheckEpoch = 0;
inline constexpr char kCheckMessage[] = "hsmstek check";
inline constexpr size_t kCheckMessageSize = sizeof(kCheckMessage) - 1;

struct KeyName {
  std::array<uint8_t, kKeyNameSize> bytes{};
  bool operator==(const KeyName &) const = default;
};

// MakeKeyName returns store_id || big-endian epoch: the version-1 name,
// no longer issued (it told every observer the store and the epoch). Kept
// for tests that build names of foreign or malformed tickets.
KeyName MakeKeyName(const StoreId &store_id, uint64_t epoch);

// KeyNameFromBytes returns the key name held in `bytes`, which must be
// exactly 16 bytes long (kInvalidArgument otherwise).
Result<KeyName> KeyNameFromBytes(ByteSpan bytes);

// KeyNameStoreId returns the first 8 bytes of `name`.
StoreId KeyNameStoreId(const KeyName &name);

// KeyNameEpoch returns the big-endian epoch in the last 8 bytes of `name`.
uint64_t KeyNameEpoch(const KeyName &name);

// EpochAt returns floor(unix_time / period_s). A time before 1970 yields
// epoch 0 (epochs are unsigned and no master exists before 1970), and so
// does a period_s <= 0, which ValidatePolicy never lets through.
uint64_t EpochAt(int64_t unix_time, int64_t period_s);

// EpochStart returns the first second of `epoch` (epoch * period_s),
// saturated at INT64_MAX; 0 when period_s <= 0.
int64_t EpochStart(uint64_t epoch, int64_t period_s);

// NameInput returns kNameLabel || big-endian epoch, the message whose
// HMAC under the name key is the version-2 key name of `epoch`.
std::array<uint8_t, kNameInputSize> NameInput(uint64_t epoch);

// The CKA_ID of ratchet link `index` of store `store_id`: store_id ||
// index (8, BE). Link 0 is the master itself (CKA_ID = the store id).
using LinkId = std::array<uint8_t, 16>;
LinkId MakeLinkId(const StoreId &store_id, uint64_t index);

// LinkIndex returns floor((epoch - first_epoch) / ratchet_periods), the
// ratchet link that epoch `epoch` derives from; nullopt for an epoch before
// `first_epoch` (the master's activation epoch) or ratchet_periods == 0.
std::optional<uint64_t> LinkIndex(uint64_t epoch, uint64_t first_epoch,
                                  uint64_t ratchet_periods);

// LinkFirstEpoch returns the first epoch of link `index` (saturated).
uint64_t LinkFirstEpoch(uint64_t index, uint64_t first_epoch,
                        uint64_t ratchet_periods);

// DerivationData returns B(purpose, 1) || B(purpose, 2) for `epoch`.
// `purpose` is kPurposeEncrypt, kPurposeMac, kPurposeCheck, kPurposeName or
// kPurposeRatchet (whose `epoch` is the new link's index) (other bytes
// are laid out the same way; the caller must not invent new purposes).
std::array<uint8_t, kDerivationDataSize> DerivationData(char purpose,
                                                        uint64_t epoch);

}  // namespace hsmstek::keystore
