#include "keystore/time_format.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <ctime>
#include <limits>
#include <string>

#include "formats_test_util.h"

namespace hsmstek::keystore {
namespace {

using testing::IsInvalid;

int64_t Parse(std::string_view text) {
  Result<int64_t> t = ParseRfc3339(text);
  EXPECT_TRUE(t.ok()) << text << ": " << t.status().message();
  return t.ok() ? *t : std::numeric_limits<int64_t>::min();
}

TEST(ParseRfc3339, Utc) {
  EXPECT_EQ(Parse("1970-01-01T00:00:00Z"), 0);
  EXPECT_EQ(Parse("1969-12-31T23:59:59Z"), -1);
  EXPECT_EQ(Parse("2026-11-27T10:00:00Z"), 1795773600);
  EXPECT_EQ(Parse("2026-03-29T16:00:17Z"), 1774800017);
  EXPECT_EQ(Parse("2000-02-29T12:34:56Z"), 951827696);
  EXPECT_EQ(Parse("2026-11-27t10:00:00z"), 1795773600);
}

TEST(ParseRfc3339, Offsets) {
  EXPECT_EQ(Parse("2026-11-27T12:00:00+02:00"), 1795773600);
  EXPECT_EQ(Parse("2026-11-27T04:30:00-05:30"), 1795773600);
  EXPECT_EQ(Parse("2026-11-27T10:00:00-00:00"), 1795773600);
  EXPECT_EQ(Parse("2026-11-28T09:59:00+23:59"), 1795773600);
  EXPECT_EQ(Parse("1970-01-01T00:00:00+00:01"), -60);
}

TEST(ParseRfc3339, FractionIsDropped) {
  EXPECT_EQ(Parse("2026-11-27T10:00:00.5Z"), 1795773600);
  EXPECT_EQ(Parse("2026-11-27T10:00:00.999999999Z"), 1795773600);
  EXPECT_EQ(Parse("2026-11-27T12:00:00.0+02:00"), 1795773600);
  EXPECT_TRUE(IsInvalid(ParseRfc3339("2026-11-27T10:00:00.Z").status(),
                        "has a fraction of 0 digits (1 to 9 allowed)"));
  EXPECT_TRUE(
      IsInvalid(ParseRfc3339("2026-11-27T10:00:00.1234567890Z").status(),
                "fraction of 10 digits"));
}

TEST(ParseRfc3339, CalendarLimits) {
  EXPECT_EQ(Parse("0000-01-01T00:00:00Z"), kMinRfc3339Time);
  EXPECT_EQ(Parse("9999-12-31T23:59:59Z"), kMaxRfc3339Time);
  EXPECT_EQ(Parse("2024-02-29T00:00:00Z"), 1709164800);
  EXPECT_EQ(Parse("2000-02-29T00:00:00Z"), 951782400);
  EXPECT_TRUE(IsInvalid(ParseRfc3339("2100-02-29T00:00:00Z").status(),
                        "has day out of range for its month"));
  EXPECT_TRUE(IsInvalid(ParseRfc3339("1900-02-29T00:00:00Z").status(),
                        "day out of range"));
  EXPECT_TRUE(IsInvalid(ParseRfc3339("2026-02-29T00:00:00Z").status(),
                        "day out of range"));
  EXPECT_TRUE(IsInvalid(ParseRfc3339("2026-04-31T00:00:00Z").status(),
                        "day out of range"));
  EXPECT_TRUE(IsInvalid(ParseRfc3339("2026-01-00T00:00:00Z").status(),
                        "day out of range"));
  EXPECT_TRUE(IsInvalid(ParseRfc3339("2026-13-01T00:00:00Z").status(),
                        "\"2026-13-01T00:00:00Z\" has month out of range"));
  EXPECT_TRUE(IsInvalid(ParseRfc3339("2026-00-01T00:00:00Z").status(),
                        "month out of range"));
  EXPECT_TRUE(IsInvalid(ParseRfc3339("2026-01-01T24:00:00Z").status(),
                        "has hour out of range"));
  EXPECT_TRUE(IsInvalid(ParseRfc3339("2026-01-01T10:60:00Z").status(),
                        "has minute out of range"));
  EXPECT_TRUE(IsInvalid(ParseRfc3339("2016-12-31T23:59:60Z").status(),
                        "is a leap second (not representable)"));
  EXPECT_TRUE(IsInvalid(ParseRfc3339("2026-01-01T10:00:61Z").status(),
                        "has second out of range"));
  EXPECT_TRUE(IsInvalid(ParseRfc3339("2026-01-01T10:00:00+24:00").status(),
                        "has an out-of-range UTC offset"));
  EXPECT_TRUE(IsInvalid(ParseRfc3339("2026-01-01T10:00:00+02:60").status(),
                        "out-of-range UTC offset"));
}

TEST(ParseRfc3339, Shape) {
  EXPECT_TRUE(IsInvalid(ParseRfc3339("").status(), "empty time"));
  for (const char *bad : {
           "2026-11-27",                // date only
           "2026-11-27T10:00:00",       // no offset
           "2026-11-27 10:00:00Z",      // space separator
           "2026-11-27T10:00Z",         // no seconds
           "2026-11-27T10:00:00+0200",  // offset without colon
           "2026-11-27T10:00:00+02",    // short offset
           "2026-11-27T10:00:00Zx",     // trailing garbage
           "2026-11-27T10:00:00Z ",     // trailing space
           " 2026-11-27T10:00:00Z",     // leading space
           "+2026-11-27T10:00:00Z",     // signed year
           "12026-11-27T10:00:00Z",     // five-digit year
           "2026-1-27T10:00:00Z",       // one-digit month
           "2026/11/27T10:00:00Z",      // wrong separators
           "2026-11-27T10:00:00UTC",    // named zone
           "1795773600",                // Unix time
       }) {
    EXPECT_TRUE(IsInvalid(ParseRfc3339(bad).status(),
                          "is not RFC 3339 (YYYY-MM-DDTHH:MM:SSZ or "
                          "...+HH:MM)"))
        << bad;
  }
}

TEST(FormatRfc3339, Values) {
  EXPECT_EQ(FormatRfc3339(0), "1970-01-01T00:00:00Z");
  EXPECT_EQ(FormatRfc3339(-1), "1969-12-31T23:59:59Z");
  EXPECT_EQ(FormatRfc3339(1795773600), "2026-11-27T10:00:00Z");
  EXPECT_EQ(FormatRfc3339(1774800017), "2026-03-29T16:00:17Z");
  EXPECT_EQ(FormatRfc3339(kMinRfc3339Time), "0000-01-01T00:00:00Z");
  EXPECT_EQ(FormatRfc3339(kMaxRfc3339Time), "9999-12-31T23:59:59Z");
}

TEST(FormatRfc3339, ClampsOutOfRange) {
  EXPECT_EQ(FormatRfc3339(std::numeric_limits<int64_t>::min()),
            "0000-01-01T00:00:00Z");
  EXPECT_EQ(FormatRfc3339(kMinRfc3339Time - 1), "0000-01-01T00:00:00Z");
  EXPECT_EQ(FormatRfc3339(kMaxRfc3339Time + 1), "9999-12-31T23:59:59Z");
  EXPECT_EQ(FormatRfc3339(std::numeric_limits<int64_t>::max()),
            "9999-12-31T23:59:59Z");
}

// The C library's gmtime_r is an independent oracle for the civil-date
// arithmetic (the library itself must not depend on it).
TEST(FormatRfc3339, MatchesGmtimeAndRoundTrips) {
  // A stride that is coprime to 86400 visits many times of day.
  constexpr int64_t kStride = 86400 * 7 + 3607;
  for (int64_t t = -2208988800;  // 1900-01-01
       t < 13569465600;          // 2400-01-01
       t += kStride) {
    const std::time_t tt = static_cast<std::time_t>(t);
    std::tm tm{};
    ASSERT_NE(gmtime_r(&tt, &tm), nullptr);
    char want[32];
    std::strftime(want, sizeof(want), "%Y-%m-%dT%H:%M:%SZ", &tm);
    ASSERT_EQ(FormatRfc3339(t), want) << t;
    ASSERT_EQ(Parse(want), t);
  }
}

TEST(FormatRfc3339, RoundTripsWholeRange) {
  constexpr int64_t kStride = 1000000007;  // ~31.7 years, prime
  for (int64_t t = kMinRfc3339Time; t <= kMaxRfc3339Time; t += kStride) {
    ASSERT_EQ(Parse(FormatRfc3339(t)), t) << t;
  }
}

}  // namespace
}  // namespace hsmstek::keystore
