#include <gtest/gtest.h>

#include "common/bytes.h"
#include "common/log.h"
#include "common/status.h"

namespace hsmstek {
namespace {

TEST(Hex, RoundTrip) {
  Bytes data = {0x00, 0x01, 0xab, 0xff};
  EXPECT_EQ(HexEncode(data), "0001abff");
  Result<Bytes> back = HexDecode("0001ABff");
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, data);
}

TEST(Hex, RejectsOddLengthAndBadDigits) {
  Result<Bytes> odd = HexDecode("abc");
  ASSERT_FALSE(odd.ok());
  EXPECT_EQ(odd.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(odd.status().message().find("odd length"), std::string::npos);
  Result<Bytes> bad = HexDecode("zz");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("offset 0"), std::string::npos);
}

// A Result built from an OK Status is an error, never a value-less
// "success" whose status() says OK.
TEST(ResultTest, BuiltFromAnOkStatusIsAnInternalError) {
  Result<int> r = Status::Ok();
  EXPECT_FALSE(r.ok());
  EXPECT_FALSE(r.status().ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kInternal);
  Result<int> error = NotFound("x");
  EXPECT_EQ(error.status().code(), ErrorCode::kNotFound);
}

TEST(BigEndian, RoundTrip) {
  uint8_t buf[8];
  StoreBigEndian64(0x0102030405060708ull, buf);
  EXPECT_EQ(buf[0], 0x01);
  EXPECT_EQ(buf[7], 0x08);
  EXPECT_EQ(LoadBigEndian64(buf), 0x0102030405060708ull);
}

TEST(ConstantTimeEqual, ComparesContentAndLength) {
  Bytes a = {1, 2, 3}, b = {1, 2, 3}, c = {1, 2, 4}, d = {1, 2};
  EXPECT_TRUE(ConstantTimeEqual(a, b));
  EXPECT_FALSE(ConstantTimeEqual(a, c));
  EXPECT_FALSE(ConstantTimeEqual(a, d));
}

TEST(SecretBuffer, TruncateAndMove) {
  const uint8_t bytes[] = {'1', '2', '3', '4', '\n'};
  SecretBuffer s(bytes, sizeof(bytes));
  s.truncate(4);
  EXPECT_EQ(s.size(), 4u);
  SecretBuffer t = std::move(s);
  EXPECT_EQ(t.size(), 4u);
  EXPECT_TRUE(s.empty());  // NOLINT(bugprone-use-after-move): defined state
  t.clear();
  EXPECT_TRUE(t.empty());
}

TEST(Status, ContextKeepsCodeAndCkr) {
  Status s(ErrorCode::kUnavailable, "C_Sign: CKR_DEVICE_ERROR", 0x30);
  Status c = s.WithContext("sealing ticket");
  EXPECT_EQ(c.code(), ErrorCode::kUnavailable);
  EXPECT_EQ(c.ckr(), 0x30u);
  EXPECT_EQ(c.message(), "sealing ticket: C_Sign: CKR_DEVICE_ERROR");
}

void SinkA(int, const char *, void *) {}
void SinkB(int, const char *, void *) {}

// A host that sets its log callback again and again (per request, per
// reload: hsmstek_set_log_callback) must not grow the log path's memory:
// every set used to keep a new entry for the life of the process.
TEST(Log, SettingTheSameSinksAgainKeepsNoMoreEntries) {
  int a = 0, b = 0;
  log::SetSink(SinkA, &a);
  log::SetSink(SinkB, &b);
  const size_t kept = log::KeptSinkEntries();
  for (int i = 0; i < 10000; ++i) {
    log::SetSink(SinkA, &a);
    log::SetSink(SinkB, &b);
    log::SetSink(nullptr, nullptr);
  }
  EXPECT_EQ(log::KeptSinkEntries(), kept);
}

}  // namespace
}  // namespace hsmstek
