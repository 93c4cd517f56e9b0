// The control-file grammar of libhsmstek_faulty.so: valid forms and the
// exact error of each kind of bad line.

#include "rules.h"

#include <gtest/gtest.h>

#include "faulty/testing.h"

namespace hsmstek::faulty {
namespace {

TEST(FaultyRules, ParsesEveryDirective) {
  ParseResult r = ParseRules(
      "# comment\n"
      "\n"
      "  fail C_Sign after 3 times 2 with CKR_SESSION_HANDLE_INVALID\n"
      "fail * after 0 always with CKR_DEVICE_ERROR\n"
      "fail C_EncryptInit after 1 with 0x80000001\r\n"
      "delay C_Sign 5ms\n"
      "delay * 250us\n"
      "delay C_Login 1s\n"
      "refuse CKA_DERIVE_TEMPLATE\n"
      "remove\n"
      "remove slot 12345\n"
      "remove token my token  \n");
  ASSERT_TRUE(r.ok) << r.error;
  ASSERT_EQ(r.rules.fails.size(), 3u);
  EXPECT_EQ(r.rules.fails[0].fn, Fn::C_Sign);
  EXPECT_EQ(r.rules.fails[0].after, 3u);
  EXPECT_EQ(r.rules.fails[0].times, 2u);
  EXPECT_EQ(r.rules.fails[0].rv, CKR_SESSION_HANDLE_INVALID);
  EXPECT_FALSE(r.rules.fails[1].fn.has_value());
  EXPECT_EQ(r.rules.fails[1].times, 0u);  // always
  EXPECT_EQ(r.rules.fails[2].times, 0u);  // default: always
  EXPECT_EQ(r.rules.fails[2].rv, 0x80000001UL);
  ASSERT_EQ(r.rules.delays.size(), 3u);
  EXPECT_EQ(r.rules.delays[0].delay, std::chrono::milliseconds(5));
  EXPECT_EQ(r.rules.delays[1].delay, std::chrono::microseconds(250));
  EXPECT_EQ(r.rules.delays[2].delay, std::chrono::seconds(1));
  ASSERT_EQ(r.rules.refuses.size(), 1u);
  EXPECT_EQ(r.rules.refuses[0].attribute, CKA_DERIVE_TEMPLATE);
  ASSERT_EQ(r.rules.removes.size(), 3u);
  EXPECT_EQ(r.rules.removes[0].kind, RemoveRule::Kind::kAll);
  EXPECT_EQ(r.rules.removes[1].kind, RemoveRule::Kind::kSlot);
  EXPECT_EQ(r.rules.removes[1].slot, 12345u);
  EXPECT_EQ(r.rules.removes[2].kind, RemoveRule::Kind::kToken);
  EXPECT_EQ(r.rules.removes[2].label, "my token");
}

TEST(FaultyRules, EmptyFileAndInsertAreValid) {
  EXPECT_TRUE(ParseRules("").ok);
  ParseResult r = ParseRules("insert\n");
  ASSERT_TRUE(r.ok) << r.error;
  EXPECT_TRUE(r.rules.removes.empty());
}

struct BadCase {
  const char *text;
  const char *error;
};

class FaultyRulesBad : public ::testing::TestWithParam<BadCase> {};

TEST_P(FaultyRulesBad, RejectsWholeFileWithExactError) {
  ParseResult r = ParseRules(GetParam().text);
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.error, GetParam().error);
  EXPECT_TRUE(r.rules.fails.empty());
}

INSTANTIATE_TEST_SUITE_P(
    Grammar, FaultyRulesBad,
    ::testing::Values(
        BadCase{"fial C_Sign after 0 with CKR_DEVICE_ERROR",
                "line 1: unknown directive 'fial' (fail, delay, refuse, "
                "remove, insert or # comment)"},
        BadCase{"refuse CKA_DERIVE_TEMPLAT",
                "line 1: unknown attribute 'CKA_DERIVE_TEMPLAT' (use a CKA_* "
                "name)"},
        BadCase{"refuse", "line 1: expected 'refuse <CKA_NAME>'"},
        BadCase{"# ok\nfail C_Sing after 0 with CKR_DEVICE_ERROR",
                "line 2: unknown function 'C_Sing' (use a C_* name of "
                "PKCS#11 v2.40 or '*')"},
        BadCase{"fail C_Sign after -1 with CKR_DEVICE_ERROR",
                "line 1: bad count '-1' after 'after' (0 to 1000000000)"},
        BadCase{"fail C_Sign after 0 times 0 with CKR_DEVICE_ERROR",
                "line 1: bad count '0' after 'times' (1 to 1000000000)"},
        BadCase{"fail C_Sign after 0 with CKR_NOPE",
                "line 1: unknown return value 'CKR_NOPE' (use a CKR_* name "
                "or 0x<hex>)"},
        BadCase{"fail C_Sign after 0 with CKR_OK",
                "line 1: CKR_OK cannot be injected"},
        BadCase{"fail C_Sign 0 with CKR_DEVICE_ERROR",
                "line 1: expected 'fail <C_Function|*> after <N> [times "
                "<M>|always] with <CKR_NAME>'"},
        BadCase{"fail C_Sign after 0 sometimes with CKR_DEVICE_ERROR",
                "line 1: expected 'fail <C_Function|*> after <N> [times "
                "<M>|always] with <CKR_NAME>'"},
        BadCase{"fail C_Sign after 0 with CKR_DEVICE_ERROR # note",
                "line 1: expected 'fail <C_Function|*> after <N> [times "
                "<M>|always] with <CKR_NAME>'"},
        BadCase{"delay C_Sign 5",
                "line 1: bad duration '5' (use e.g. "
                "200us, 5ms, 1s)"},
        BadCase{"delay C_Sign 11s",
                "line 1: duration '11s' above the 10s "
                "limit"},
        BadCase{"delay C_Sign",
                "line 1: expected 'delay <C_Function|*> "
                "<N>(us|ms|s)'"},
        BadCase{"remove slot x", "line 1: bad slot id 'x' (decimal)"},
        BadCase{"remove everything",
                "line 1: expected 'remove', 'remove "
                "slot <id>' or 'remove token <label>'"},
        BadCase{"insert now", "line 1: 'insert' takes no arguments"},
        BadCase{"remove\ninsert", "'insert' and 'remove' in the same file"}));

TEST(FaultyRules, StarSkipsLifecycleFunctions) {
  EXPECT_TRUE(MatchesFunction(std::nullopt, Fn::C_Sign));
  EXPECT_FALSE(MatchesFunction(std::nullopt, Fn::C_Initialize));
  EXPECT_FALSE(MatchesFunction(std::nullopt, Fn::C_Finalize));
  EXPECT_FALSE(MatchesFunction(std::nullopt, Fn::C_GetFunctionList));
  EXPECT_TRUE(MatchesFunction(Fn::C_Finalize, Fn::C_Finalize));
  EXPECT_FALSE(MatchesFunction(Fn::C_Sign, Fn::C_Verify));
}

TEST(FaultyRules, NamesRoundTrip) {
  EXPECT_EQ(FnName(Fn::C_WaitForSlotEvent), "C_WaitForSlotEvent");
  EXPECT_EQ(FnFromName("C_DeriveKey"), Fn::C_DeriveKey);
  EXPECT_EQ(RvName(CKR_TOKEN_NOT_PRESENT), "CKR_TOKEN_NOT_PRESENT");
  EXPECT_EQ(RvName(0x80000001UL), "0x80000001");
  EXPECT_EQ(RvFromName("CKR_DEVICE_REMOVED"), CKR_DEVICE_REMOVED);
  EXPECT_FALSE(RvFromName("0x").has_value());
  EXPECT_FALSE(RvFromName("0xzz").has_value());
}

TEST(FaultyRules, WriteControlFileRefusesBadRules) {
  std::string path = ::testing::TempDir() + "/faulty-control-unused";
  EXPECT_EQ(WriteControlFile(path, "delay C_Sign 5"),
            "control file rules: line 1: bad duration '5' (use e.g. 200us, "
            "5ms, 1s)");
}

}  // namespace
}  // namespace hsmstek::faulty
