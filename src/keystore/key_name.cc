#include "keystore/key_name.h"

#include <algorithm>
#include <limits>
#include <string>

namespace hsmstek::keystore {

KeyName MakeKeyName(const StoreId &store_id, uint64_t epoch) {
  KeyName name;
  std::copy(store_id.begin(), store_id.end(), name.bytes.begin());
  StoreBigEndian64(epoch, name.bytes.data() + store_id.size());
  return name;
}

Result<KeyName> KeyNameFromBytes(ByteSpan bytes) {
  if (bytes.size() != kKeyNameSize) {
    return InvalidArgument("key name must be 16 bytes, got " +
                           std::to_string(bytes.size()));
  }
  KeyName name;
  std::copy(bytes.begin(), bytes.end(), name.bytes.begin());
  return name;
}

StoreId KeyNameStoreId(const KeyName &name) {
  StoreId id;
  std::copy_n(name.bytes.begin(), id.size(), id.begin());
  return id;
}

uint64_t KeyNameEpoch(const KeyName &name) {
  return LoadBigEndian64(name.bytes.data() + sizeof(StoreId));
}

uint64_t EpochAt(int64_t unix_time, int64_t period_s) {
  if (unix_time < 0 || period_s <= 0) return 0;
  return static_cast<uint64_t>(unix_time / period_s);
}

int64_t EpochStart(uint64_t epoch, int64_t period_s) {
  if (period_s <= 0) return 0;
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  if (epoch > static_cast<uint64_t>(kMax / period_s)) return kMax;
  return static_cast<int64_t>(epoch) * period_s;
}

std::array<uint8_t, kNameInputSize> NameInput(uint64_t epoch) {
  std::array<uint8_t, kNameInputSize> out{};
  std::copy(kNameLabel, kNameLabel + kNameLabelSize, out.begin());
  StoreBigEndian64(epoch, out.data() + kNameLabelSize);
  return out;
}

LinkId MakeLinkId(const StoreId &store_id, uint64_t index) {
  LinkId id{};
  std::copy(store_id.begin(), store_id.end(), id.begin());
  StoreBigEndian64(index, id.data() + store_id.size());
  return id;
}

std::optional<uint64_t> LinkIndex(uint64_t epoch, uint64_t first_epoch,
                                  uint64_t ratchet_periods) {
  if (ratchet_periods == 0 || epoch < first_epoch) return std::nullopt;
  return (epoch - first_epoch) / ratchet_periods;
}

uint64_t LinkFirstEpoch(uint64_t index, uint64_t first_epoch,
                        uint64_t ratchet_periods) {
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  if (ratchet_periods != 0 && index > (kMax - first_epoch) / ratchet_periods) {
    return kMax;
  }
  return first_epoch + index * ratchet_periods;
}

std::array<uint8_t, kDerivationDataSize> DerivationData(char purpose,
                                                        uint64_t epoch) {
  std::array<uint8_t, kDerivationDataSize> data{};
  for (uint8_t i = 1; i <= 2; ++i) {
    uint8_t *block = data.data() + 16 * (i - 1);
    block[0] = 'h';
    block[1] = 's';
    block[2] = 't';
    block[3] = 'k';
    block[4] = static_cast<uint8_t>(purpose);
    block[5] = i;
    block[6] = 0x00;
    block[7] = 0x00;
    StoreBigEndian64(epoch, block + 8);
  }
  return data;
}

}  // namespace hsmstek::keystore
