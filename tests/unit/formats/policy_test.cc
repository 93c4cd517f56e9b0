#include "keystore/policy.h"

#include <gtest/gtest.h>

#include <string>

#include "formats_test_util.h"
#include "keystore/time_format.h"

namespace hsmstek::keystore {
namespace {

using testing::IsInvalid;

Policy Sample() {
  Policy p;
  p.period_s = 3600;
  p.decrypt_window_s = 86400;
  p.not_before = 1795773600;  // 2026-11-27T10:00:00Z
  p.created_at = 1795770000;  // 2026-11-27T09:00:00Z
  return p;
}

constexpr char kSampleText[] =
    "hsmstek-policy 1\n"
    "period 1h\n"
    "decrypt-window 1d\n"
    "not-before 2026-11-27T10:00:00Z\n"
    "retire-at -\n"
    "kdf hstk-aes-ecb-v1\n"
    "replicable no\n"
    "created 2026-11-27T09:00:00Z\n";

// Returns kSampleText with line `line` (1-based) replaced by `with` (which
// carries its own newline, or is empty to delete the line).
std::string ReplaceLine(int line, const std::string &with) {
  std::string text = kSampleText;
  size_t start = 0;
  for (int i = 1; i < line; ++i) start = text.find('\n', start) + 1;
  const size_t end = text.find('\n', start) + 1;
  return text.replace(start, end - start, with);
}

TEST(Policy, SerializeIsCanonical) {
  EXPECT_EQ(SerializePolicy(Sample()), kSampleText);
  Policy p = Sample();
  p.retire_at = 1796378400;  // 2026-12-04T10:00:00Z
  p.replicable = true;
  p.period_s = 90;
  p.decrypt_window_s = 900;
  EXPECT_EQ(SerializePolicy(p),
            "hsmstek-policy 1\n"
            "period 1m30s\n"
            "decrypt-window 15m\n"
            "not-before 2026-11-27T10:00:00Z\n"
            "retire-at 2026-12-04T10:00:00Z\n"
            "kdf hstk-aes-ecb-v1\n"
            "replicable yes\n"
            "created 2026-11-27T09:00:00Z\n");
}

TEST(Policy, ParseSample) {
  Result<Policy> p = ParsePolicy(kSampleText);
  ASSERT_TRUE(p.ok()) << p.status().message();
  EXPECT_EQ(*p, Sample());
  EXPECT_FALSE(p->retire_at.has_value());
  EXPECT_EQ(p->kdf, "hstk-aes-ecb-v1");
}

TEST(Policy, RoundTrips) {
  Policy p = Sample();
  for (int64_t period : {int64_t{60}, int64_t{3600}, int64_t{604800}}) {
    for (bool replicable : {false, true}) {
      for (bool retire : {false, true}) {
        p.period_s = period;
        p.decrypt_window_s = period;
        p.replicable = replicable;
        p.retire_at.reset();
        if (retire) p.retire_at = 1;
        ASSERT_TRUE(ValidatePolicy(p).ok());
        Result<Policy> back = ParsePolicy(SerializePolicy(p));
        ASSERT_TRUE(back.ok()) << back.status().message();
        EXPECT_EQ(*back, p);
      }
    }
  }
  p = Sample();
  p.not_before = 0;
  p.created_at = kMaxRfc3339Time;
  p.retire_at = kMaxRfc3339Time;
  EXPECT_EQ(*ParsePolicy(SerializePolicy(p)), p);
}

TEST(Policy, AcceptsNonCanonicalValues) {
  std::string text = ReplaceLine(2, "period 60m\n");
  text = text.replace(text.find("not-before 2026-11-27T10:00:00Z"), 31,
                      "not-before 2026-11-27T12:00:00.25+02:00");
  Result<Policy> p = ParsePolicy(text);
  ASSERT_TRUE(p.ok()) << p.status().message();
  EXPECT_EQ(*p, Sample());
}

TEST(Policy, SizeAndBytes) {
  EXPECT_TRUE(IsInvalid(ParsePolicy("").status(), "empty policy"));
  std::string big = std::string(kSampleText) + std::string(4097, 'x');
  EXPECT_TRUE(IsInvalid(ParsePolicy(big).status(), "more than 4096"));
  EXPECT_TRUE(
      IsInvalid(ParsePolicy(ReplaceLine(3, "decrypt-window 1d\r\n")).status(),
                "policy line 3: carriage return not allowed"));
  EXPECT_TRUE(IsInvalid(
      ParsePolicy(ReplaceLine(6, std::string("kdf hstk\0x\n", 11))).status(),
      "policy line 6: non-printable byte 0x00"));
  EXPECT_TRUE(IsInvalid(ParsePolicy(ReplaceLine(6, "kdf h\xc3\xa9\n")).status(),
                        "policy line 6: non-printable byte 0xc3"));
  std::string no_newline = kSampleText;
  no_newline.pop_back();
  EXPECT_TRUE(IsInvalid(ParsePolicy(no_newline).status(),
                        "policy line 8: missing newline at end of line"));
}

TEST(Policy, Header) {
  EXPECT_TRUE(
      IsInvalid(ParsePolicy(ReplaceLine(1, "hsmstek-policy 3\n")).status(),
                "policy line 1: unsupported policy version \"3\""));
  // Version 2 needs its ratchet line.
  EXPECT_TRUE(
      IsInvalid(ParsePolicy(ReplaceLine(1, "hsmstek-policy 2\n")).status(),
                "missing key \"ratchet\""));
  EXPECT_TRUE(IsInvalid(ParsePolicy(ReplaceLine(1, "hello\n")).status(),
                        "policy line 1: expected header \"hsmstek-policy 1\""));
  EXPECT_TRUE(IsInvalid(ParsePolicy(ReplaceLine(1, "")).status(),
                        "policy line 1: expected header"));
}

TEST(Policy, KeysAndOrder) {
  EXPECT_TRUE(IsInvalid(ParsePolicy(ReplaceLine(4, "color blue\n")).status(),
                        "policy line 4: unknown key \"color\""));
  EXPECT_TRUE(IsInvalid(ParsePolicy(ReplaceLine(3, "period 1h\n")).status(),
                        "policy line 3: duplicate key \"period\""));
  // kdf before retire-at.
  EXPECT_TRUE(IsInvalid(
      ParsePolicy(ReplaceLine(5, "kdf hstk-aes-ecb-v1\nretire-at -\n"))
          .status(),
      "policy line 5: key \"kdf\" out of order or missing key \"retire-at\""));
  // retire-at dropped entirely.
  EXPECT_TRUE(IsInvalid(ParsePolicy(ReplaceLine(5, "")).status(),
                        "policy line 5: key \"kdf\" out of order or missing "
                        "key \"retire-at\""));
  EXPECT_TRUE(IsInvalid(ParsePolicy(ReplaceLine(8, "")).status(),
                        "policy ends after line 7: missing key \"created\""));
  EXPECT_TRUE(IsInvalid(ParsePolicy("hsmstek-policy 1\n").status(),
                        "policy ends after line 1: missing key \"period\""));
  EXPECT_TRUE(IsInvalid(
      ParsePolicy(std::string(kSampleText) + "kdf hstk-aes-ecb-v1\n").status(),
      "policy line 9: duplicate key \"kdf\""));
  EXPECT_TRUE(
      IsInvalid(ParsePolicy(std::string(kSampleText) + "extra 1\n").status(),
                "policy line 9: unknown key \"extra\""));
  EXPECT_TRUE(IsInvalid(ParsePolicy(std::string(kSampleText) + "\n").status(),
                        "policy line 9: empty line"));
  EXPECT_TRUE(IsInvalid(ParsePolicy(ReplaceLine(3, "\n")).status(),
                        "policy line 3: empty line"));
}

TEST(Policy, LineShape) {
  EXPECT_TRUE(IsInvalid(ParsePolicy(ReplaceLine(2, "period\n")).status(),
                        "policy line 2: expected \"key value\""));
  EXPECT_TRUE(IsInvalid(ParsePolicy(ReplaceLine(2, "period \n")).status(),
                        "policy line 2 (period): empty value"));
  EXPECT_TRUE(IsInvalid(ParsePolicy(ReplaceLine(2, "period  1h\n")).status(),
                        "policy line 2 (period): value contains a space"));
  EXPECT_TRUE(IsInvalid(ParsePolicy(ReplaceLine(2, "period 1h \n")).status(),
                        "policy line 2 (period): value contains a space"));
  EXPECT_TRUE(IsInvalid(ParsePolicy(ReplaceLine(2, "period\t1h\n")).status(),
                        "policy line 2: non-printable byte 0x09"));
}

TEST(Policy, BadValues) {
  EXPECT_TRUE(IsInvalid(
      ParsePolicy(ReplaceLine(2, "period 1x\n")).status(),
      "policy line 2 (period): duration \"1x\" has unknown unit \"x\""));
  EXPECT_TRUE(IsInvalid(
      ParsePolicy(ReplaceLine(3, "decrypt-window -1d\n")).status(),
      "policy line 3 (decrypt-window): duration \"-1d\" is negative"));
  EXPECT_TRUE(IsInvalid(
      ParsePolicy(ReplaceLine(4, "not-before 2026-11-27\n")).status(),
      "policy line 4 (not-before): time \"2026-11-27\" is not RFC 3339"));
  EXPECT_TRUE(
      IsInvalid(ParsePolicy(ReplaceLine(5, "retire-at never\n")).status(),
                "policy line 5 (retire-at): time \"never\""));
  EXPECT_TRUE(
      IsInvalid(ParsePolicy(ReplaceLine(6, "kdf hkdf-sha256\n")).status(),
                "policy line 6 (kdf): unknown KDF \"hkdf-sha256\" (supported: "
                "hstk-aes-ecb-v1)"));
  EXPECT_TRUE(IsInvalid(
      ParsePolicy(ReplaceLine(7, "replicable true\n")).status(),
      "policy line 7 (replicable): expected \"yes\" or \"no\", got \"true\""));
  EXPECT_TRUE(IsInvalid(
      ParsePolicy(ReplaceLine(8, "created 2026-02-30T00:00:00Z\n")).status(),
      "policy line 8 (created): time \"2026-02-30T00:00:00Z\" has day out"));
}

TEST(Policy, ParseValidates) {
  EXPECT_TRUE(IsInvalid(
      ParsePolicy(ReplaceLine(3, "decrypt-window 90m\n")).status(),
      "invalid policy: decrypt-window 1h30m is not a multiple of period 1h"));
  EXPECT_TRUE(
      IsInvalid(ParsePolicy(ReplaceLine(2, "period 30s\n")).status(),
                "invalid policy: period 30s is shorter than the minimum 1m"));
  EXPECT_TRUE(IsInvalid(
      ParsePolicy(ReplaceLine(4, "not-before 1969-12-31T23:59:59Z\n")).status(),
      "invalid policy: not-before -1 is out of range"));
}

TEST(ValidatePolicy, Period) {
  Policy p = Sample();
  EXPECT_TRUE(ValidatePolicy(p).ok());
  p.period_s = 60;
  p.decrypt_window_s = 60;
  EXPECT_TRUE(ValidatePolicy(p).ok());
  p.period_s = 59;
  p.decrypt_window_s = 59;
  EXPECT_TRUE(IsInvalid(ValidatePolicy(p),
                        "period 59s is shorter than the minimum 1m"));
  p.period_s = 0;
  EXPECT_TRUE(IsInvalid(ValidatePolicy(p), "period 0s is shorter"));
  p.period_s = -3600;
  EXPECT_TRUE(IsInvalid(ValidatePolicy(p), "period -1h is shorter"));
  p.period_s = 8 * 86400;
  p.decrypt_window_s = 8 * 86400;
  EXPECT_TRUE(
      IsInvalid(ValidatePolicy(p), "period 8d is longer than the maximum 7d"));
}

TEST(ValidatePolicy, Window) {
  Policy p = Sample();
  p.decrypt_window_s = 604800;
  EXPECT_TRUE(ValidatePolicy(p).ok());
  p.decrypt_window_s = 3600;  // exactly one period
  EXPECT_TRUE(ValidatePolicy(p).ok());
  p.decrypt_window_s = 0;
  EXPECT_TRUE(
      IsInvalid(ValidatePolicy(p), "decrypt-window 0s must be positive"));
  p.decrypt_window_s = -3600;
  EXPECT_TRUE(IsInvalid(ValidatePolicy(p), "must be positive"));
  p.decrypt_window_s = 604800 + 3600;
  EXPECT_TRUE(IsInvalid(ValidatePolicy(p),
                        "decrypt-window 7d1h is longer than the maximum 7d"));
  p.decrypt_window_s = 5400;
  EXPECT_TRUE(IsInvalid(ValidatePolicy(p),
                        "decrypt-window 1h30m is not a multiple of period 1h"));
  p.period_s = 7 * 3600;  // 7h does not divide 1d
  p.decrypt_window_s = 86400;
  EXPECT_TRUE(IsInvalid(ValidatePolicy(p), "is not a multiple of period 7h"));
  // 168 epochs (7 days of hourly keys) is the most a window may span.
  p.period_s = 3600;
  p.decrypt_window_s = 168 * 3600;
  EXPECT_TRUE(ValidatePolicy(p).ok());
  p.period_s = 60;
  p.decrypt_window_s = 169 * 60;
  EXPECT_TRUE(IsInvalid(ValidatePolicy(p),
                        "decrypt-window 2h49m spans 169 periods; at most 168"));
}

TEST(ValidatePolicy, KdfAndTimes) {
  Policy p = Sample();
  p.kdf = "hstk-aes-ecb-v2";
  EXPECT_TRUE(IsInvalid(ValidatePolicy(p), "unknown KDF \"hstk-aes-ecb-v2\""));
  p = Sample();
  p.not_before = -1;
  EXPECT_TRUE(IsInvalid(ValidatePolicy(p), "not-before -1 is out of range"));
  p.not_before = kMaxRfc3339Time + 1;
  EXPECT_TRUE(IsInvalid(ValidatePolicy(p), "not-before"));
  p = Sample();
  p.retire_at = 0;
  EXPECT_TRUE(IsInvalid(ValidatePolicy(p), "retire-at 0 is out of range"));
  p.retire_at = kMaxRfc3339Time + 1;
  EXPECT_TRUE(IsInvalid(ValidatePolicy(p), "retire-at"));
  p.retire_at = 1;  // before not_before: a pending master retired early
  EXPECT_TRUE(ValidatePolicy(p).ok());
  p = Sample();
  p.created_at = -5;
  EXPECT_TRUE(IsInvalid(ValidatePolicy(p), "created -5 is out of range"));
  p.created_at = kMaxRfc3339Time;
  EXPECT_TRUE(ValidatePolicy(p).ok());
}

}  // namespace
}  // namespace hsmstek::keystore

namespace hsmstek::keystore {
namespace {

// Version 1 (written before the ratchet) reads as the default: one day's
// worth of periods; version 2 carries an explicit interval, round-trips,
// and is validated.
TEST(Policy, RatchetVersions) {
  Result<Policy> v1 = ParsePolicy(kSampleText);
  ASSERT_TRUE(v1.ok());
  EXPECT_EQ(v1->ratchet_s, 0);
  EXPECT_EQ(RatchetPeriods(*v1), static_cast<uint64_t>(86400 / v1->period_s));
  EXPECT_EQ(DefaultRatchetPeriods(3600), 24);
  EXPECT_EQ(DefaultRatchetPeriods(7 * 86400), 1);
  EXPECT_EQ(DefaultRatchetPeriods(5000), 17);

  Policy p = Sample();
  p.ratchet_s = 6 * p.period_s;
  const std::string text = SerializePolicy(p);
  EXPECT_EQ(text.substr(0, 17), "hsmstek-policy 2\n");
  EXPECT_NE(text.find("\nratchet "), std::string::npos) << text;
  Result<Policy> back = ParsePolicy(text);
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(*back, p);
  EXPECT_EQ(RatchetPeriods(*back), 6u);

  Policy bad = Sample();
  bad.ratchet_s = bad.period_s + 1;
  EXPECT_TRUE(IsInvalid(ValidatePolicy(bad), "is not a positive multiple"));
  bad.ratchet_s = 8 * 86400 - (8 * 86400) % bad.period_s;
  EXPECT_TRUE(IsInvalid(ValidatePolicy(bad), "longer than the maximum"));
  bad.ratchet_s = -bad.period_s;
  EXPECT_FALSE(ValidatePolicy(bad).ok());
  // An explicit zero is not the default: version 2 names a real interval.
  std::string zero = text;
  zero.replace(zero.find("\nratchet ") + 9, std::string::npos, "0s\n");
  EXPECT_TRUE(IsInvalid(ParsePolicy(zero).status(), "policy line 9 (ratchet)"));
}

}  // namespace
}  // namespace hsmstek::keystore
