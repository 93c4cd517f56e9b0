#include "keystore/key_name.h"

#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>

#include "common/bytes.h"
#include "formats_test_util.h"

#ifndef HSMSTEK_DERIVATION_VECTORS
#error "HSMSTEK_DERIVATION_VECTORS must name tests/vectors/derivation.json"
#endif

namespace hsmstek::keystore {
namespace {

using testing::IsInvalid;

// The known-answer vectors of docs/FORMAT.md, shared with the token tests.
class DerivationVectors : public ::testing::Test {
 protected:
  void SetUp() override {
    std::ifstream in(HSMSTEK_DERIVATION_VECTORS);
    ASSERT_TRUE(in) << "cannot open " << HSMSTEK_DERIVATION_VECTORS;
    v_ = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    ASSERT_TRUE(v_.is_object()) << "bad JSON in " << HSMSTEK_DERIVATION_VECTORS;
    Result<Bytes> id = HexDecode(v_.at("store_id_hex").get<std::string>());
    ASSERT_TRUE(id.ok());
    ASSERT_EQ(id->size(), store_id_.size());
    std::copy(id->begin(), id->end(), store_id_.begin());
  }

  std::string Hex(const char *field) const {
    return v_.at(field).get<std::string>();
  }

  nlohmann::json v_;
  StoreId store_id_{};
};

TEST_F(DerivationVectors, Epoch) {
  const int64_t unix_time = v_.at("unix_time").get<int64_t>();
  const int64_t period = v_.at("period_s").get<int64_t>();
  EXPECT_EQ(EpochAt(unix_time, period), v_.at("epoch").get<uint64_t>());
}

TEST_F(DerivationVectors, KeyName) {
  const uint64_t epoch = v_.at("epoch").get<uint64_t>();
  const KeyName name = MakeKeyName(store_id_, epoch);
  EXPECT_EQ(HexEncode(name.bytes), Hex("key_name_hex"));
  EXPECT_EQ(KeyNameStoreId(name), store_id_);
  EXPECT_EQ(KeyNameEpoch(name), epoch);
  // The ticket starts with the key name.
  EXPECT_EQ(Hex("ticket_hex").substr(0, 32), Hex("key_name_hex"));
}

TEST_F(DerivationVectors, DerivationData) {
  const uint64_t epoch = v_.at("epoch").get<uint64_t>();
  EXPECT_EQ(HexEncode(DerivationData(kPurposeEncrypt, epoch)),
            Hex("derive_data_E_hex"));
  EXPECT_EQ(HexEncode(DerivationData(kPurposeMac, epoch)),
            Hex("derive_data_M_hex"));
  EXPECT_EQ(HexEncode(DerivationData(kPurposeCheck, kCheckEpoch)),
            Hex("derive_data_C_hex"));
}

TEST(KeyName, Layout) {
  const StoreId id = {0xf0, 0xe1, 0xd2, 0xc3, 0xb4, 0xa5, 0x96, 0x87};
  const KeyName name = MakeKeyName(id, 0x0102030405060708ull);
  EXPECT_EQ(HexEncode(name.bytes), "f0e1d2c3b4a596870102030405060708");
  EXPECT_EQ(KeyNameEpoch(name), 0x0102030405060708ull);
  EXPECT_EQ(KeyNameStoreId(name), id);
  const KeyName max = MakeKeyName(id, std::numeric_limits<uint64_t>::max());
  EXPECT_EQ(HexEncode(max.bytes), "f0e1d2c3b4a59687ffffffffffffffff");
  EXPECT_EQ(KeyNameEpoch(max), std::numeric_limits<uint64_t>::max());
  EXPECT_NE(MakeKeyName(id, 1), MakeKeyName(id, 2));
}

TEST(KeyName, FromBytes) {
  const StoreId id = {1, 2, 3, 4, 5, 6, 7, 8};
  const KeyName name = MakeKeyName(id, 42);
  Result<KeyName> back = KeyNameFromBytes(name.bytes);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, name);
  EXPECT_TRUE(
      IsInvalid(KeyNameFromBytes(ByteSpan(name.bytes).first(15)).status(),
                "key name must be 16 bytes, got 15"));
  EXPECT_TRUE(IsInvalid(KeyNameFromBytes(ByteSpan()).status(), "got 0"));
}

TEST(EpochAt, Floor) {
  EXPECT_EQ(EpochAt(0, 3600), 0u);
  EXPECT_EQ(EpochAt(3599, 3600), 0u);
  EXPECT_EQ(EpochAt(3600, 3600), 1u);
  EXPECT_EQ(EpochAt(7199, 3600), 1u);
  EXPECT_EQ(EpochAt(std::numeric_limits<int64_t>::max(), 1),
            static_cast<uint64_t>(std::numeric_limits<int64_t>::max()));
}

TEST(EpochAt, DegenerateInputsGiveZero) {
  EXPECT_EQ(EpochAt(-1, 3600), 0u);
  EXPECT_EQ(EpochAt(std::numeric_limits<int64_t>::min(), 3600), 0u);
  EXPECT_EQ(EpochAt(1774800017, 0), 0u);
  EXPECT_EQ(EpochAt(1774800017, -3600), 0u);
}

TEST(EpochStart, InverseOfEpochAt) {
  EXPECT_EQ(EpochStart(493000, 3600), 1774800000);
  EXPECT_EQ(EpochAt(EpochStart(493000, 3600), 3600), 493000u);
  EXPECT_EQ(EpochAt(EpochStart(493000, 3600) - 1, 3600), 492999u);
  EXPECT_EQ(EpochStart(std::numeric_limits<uint64_t>::max(), 60),
            std::numeric_limits<int64_t>::max());
  EXPECT_EQ(EpochStart(5, 0), 0);
}

TEST(DerivationData, Layout) {
  const auto d = DerivationData(kPurposeMac, 0x1122334455667788ull);
  EXPECT_EQ(HexEncode(d),
            "6873746b"
            "4d"
            "01"
            "0000"
            "1122334455667788"
            "6873746b"
            "4d"
            "02"
            "0000"
            "1122334455667788");
  EXPECT_NE(DerivationData(kPurposeEncrypt, 7), DerivationData(kPurposeMac, 7));
  EXPECT_NE(DerivationData(kPurposeEncrypt, 7),
            DerivationData(kPurposeEncrypt, 8));
}

TEST(CheckMessage, IsThirteenAsciiBytes) {
  EXPECT_EQ(kCheckMessageSize, 13u);
  EXPECT_EQ(std::strlen(kCheckMessage), kCheckMessageSize);
  EXPECT_EQ(std::string(kCheckMessage), "hsmstek check");
}

}  // namespace
}  // namespace hsmstek::keystore
