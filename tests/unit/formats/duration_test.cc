#include "keystore/duration.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>

#include "formats_test_util.h"

namespace hsmstek::keystore {
namespace {

using testing::IsInvalid;

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

TEST(ParseDuration, SingleUnits) {
  EXPECT_EQ(*ParseDuration("90s"), 90);
  EXPECT_EQ(*ParseDuration("15m"), 900);
  EXPECT_EQ(*ParseDuration("1h"), 3600);
  EXPECT_EQ(*ParseDuration("7d"), 604800);
  EXPECT_EQ(*ParseDuration("060s"), 60);  // leading zeros are harmless
}

TEST(ParseDuration, Combinations) {
  EXPECT_EQ(*ParseDuration("1h30m"), 5400);
  EXPECT_EQ(*ParseDuration("1d2h3m4s"), 86400 + 7200 + 180 + 4);
  EXPECT_EQ(*ParseDuration("1d30s"), 86430);
  EXPECT_EQ(*ParseDuration("0h1m"), 60);
}

TEST(ParseDuration, ZeroOnlyWhenAllowed) {
  EXPECT_TRUE(IsInvalid(ParseDuration("0s").status(),
                        "duration \"0s\" must be positive"));
  EXPECT_TRUE(IsInvalid(ParseDuration("0h0m").status(), "must be positive"));
  Result<int64_t> zero = ParseDuration("0s", ZeroDuration::kAllow);
  ASSERT_TRUE(zero.ok());
  EXPECT_EQ(*zero, 0);
}

TEST(ParseDuration, LargestValues) {
  EXPECT_EQ(*ParseDuration("9223372036854775807s"), kMax);
  EXPECT_EQ(*ParseDuration("106751991167300d15h30m7s"), kMax);
  EXPECT_TRUE(
      IsInvalid(ParseDuration("9223372036854775808s").status(), "overflows"));
  EXPECT_TRUE(
      IsInvalid(ParseDuration("106751991167301d").status(), "overflows"));
  EXPECT_TRUE(IsInvalid(ParseDuration("106751991167300d15h30m8s").status(),
                        "overflows"));
  EXPECT_TRUE(
      IsInvalid(ParseDuration("99999999999999999999999999999999h").status(),
                "overflows"));
}

TEST(ParseDuration, Errors) {
  EXPECT_TRUE(IsInvalid(ParseDuration("").status(), "empty duration"));
  EXPECT_TRUE(
      IsInvalid(ParseDuration(" 1h").status(), "\" 1h\" contains whitespace"));
  EXPECT_TRUE(IsInvalid(ParseDuration("1h ").status(), "contains whitespace"));
  EXPECT_TRUE(IsInvalid(ParseDuration("1 h").status(), "contains whitespace"));
  EXPECT_TRUE(IsInvalid(ParseDuration("1h\n").status(), "contains whitespace"));
  EXPECT_TRUE(IsInvalid(ParseDuration("-1h").status(), "\"-1h\" is negative"));
  EXPECT_TRUE(IsInvalid(ParseDuration("+1h").status(), "must not have a sign"));
  EXPECT_TRUE(IsInvalid(ParseDuration("3600").status(),
                        "\"3600\" lacks a unit (s, m, h or d)"));
  EXPECT_TRUE(IsInvalid(ParseDuration("1h30").status(), "lacks a unit"));
  EXPECT_TRUE(IsInvalid(ParseDuration("1x").status(),
                        "has unknown unit \"x\" (use s, m, h or d)"));
  EXPECT_TRUE(IsInvalid(ParseDuration("1H").status(), "unknown unit \"H\""));
  EXPECT_TRUE(IsInvalid(ParseDuration("1w").status(), "unknown unit \"w\""));
  EXPECT_TRUE(IsInvalid(ParseDuration("1h1h").status(),
                        "repeats or misorders unit 'h'"));
  EXPECT_TRUE(IsInvalid(ParseDuration("30m1h").status(),
                        "repeats or misorders unit 'h'"));
  EXPECT_TRUE(
      IsInvalid(ParseDuration("h").status(), "has no number before \"h\""));
  EXPECT_TRUE(
      IsInvalid(ParseDuration("1hm").status(), "has no number before \"m\""));
  EXPECT_TRUE(
      IsInvalid(ParseDuration("1.5h").status(), "has unknown unit \".\""));
}

TEST(ParseDuration, MessagesQuoteSafely) {
  Status s = ParseDuration(std::string("1\x01h", 3)).status();
  EXPECT_TRUE(IsInvalid(s, "\"1\\x01h\""));
  s = ParseDuration(std::string(100, '7')).status();
  EXPECT_TRUE(IsInvalid(s, "...\" lacks a unit"));
  EXPECT_LT(s.message().size(), 100u);
}

TEST(FormatDuration, Canonical) {
  EXPECT_EQ(FormatDuration(0), "0s");
  EXPECT_EQ(FormatDuration(1), "1s");
  EXPECT_EQ(FormatDuration(90), "1m30s");
  EXPECT_EQ(FormatDuration(3600), "1h");
  EXPECT_EQ(FormatDuration(5400), "1h30m");
  EXPECT_EQ(FormatDuration(93600), "1d2h");
  EXPECT_EQ(FormatDuration(604800), "7d");
  EXPECT_EQ(FormatDuration(86401), "1d1s");
  EXPECT_EQ(FormatDuration(-90), "-1m30s");
  EXPECT_EQ(FormatDuration(kMax), "106751991167300d15h30m7s");
  EXPECT_EQ(FormatDuration(std::numeric_limits<int64_t>::min()),
            "-106751991167300d15h30m8s");
}

TEST(FormatDuration, RoundTrips) {
  for (int64_t s :
       {int64_t{1}, int64_t{59}, int64_t{60}, int64_t{61}, int64_t{3599},
        int64_t{86399}, int64_t{86400}, int64_t{1234567}, kMax - 1, kMax}) {
    Result<int64_t> back = ParseDuration(FormatDuration(s));
    ASSERT_TRUE(back.ok()) << s << ": " << back.status().message();
    EXPECT_EQ(*back, s);
  }
  for (int64_t s = 1; s < 200000; s += 997) {
    EXPECT_EQ(*ParseDuration(FormatDuration(s)), s);
  }
}

}  // namespace
}  // namespace hsmstek::keystore
