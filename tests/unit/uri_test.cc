#include <gtest/gtest.h>

#include <cstring>

#include "pkcs11/error.h"
#include "pkcs11/uri.h"

namespace hsmstek::p11 {
namespace {

TEST(TokenUri, ParsesTokenObjectAndQueryAttributes) {
  Result<TokenUri> uri = ParseTokenUri(
      "pkcs11:token=tickets;manufacturer=SoftHSM%20project;serial=abc;"
      "model=SoftHSM%20v2;object=web;id=%01%02;type=secret-key"
      "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/pin");
  ASSERT_TRUE(uri.ok()) << uri.status().message();
  EXPECT_EQ(uri->token, "tickets");
  EXPECT_EQ(uri->manufacturer, "SoftHSM project");
  EXPECT_EQ(uri->serial, "abc");
  EXPECT_EQ(uri->model, "SoftHSM v2");
  EXPECT_EQ(uri->object, "web");
  EXPECT_EQ(uri->id, (Bytes{1, 2}));
  EXPECT_EQ(uri->type, static_cast<CK_OBJECT_CLASS>(CKO_SECRET_KEY));
  EXPECT_EQ(uri->module_path, "/usr/lib/softhsm/libsofthsm2.so");
  EXPECT_EQ(uri->pin_source, "file:/etc/pin");
  EXPECT_FALSE(uri->pin_value.has_value());
  EXPECT_FALSE(uri->slot_id.has_value());
}

TEST(TokenUri, ParsesSlotIdAndModuleName) {
  Result<TokenUri> uri =
      ParseTokenUri("pkcs11:slot-id=7;object=x?module-name=softhsm2");
  ASSERT_TRUE(uri.ok()) << uri.status().message();
  EXPECT_EQ(uri->slot_id, static_cast<CK_SLOT_ID>(7));
  EXPECT_EQ(uri->module_name, "softhsm2");
}

TEST(TokenUri, RejectsOtherSchemes) {
  Result<TokenUri> uri = ParseTokenUri("file:/etc/passwd");
  ASSERT_FALSE(uri.ok());
  EXPECT_EQ(uri.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(uri.status().message().find("must start with \"pkcs11:\""),
            std::string::npos);
}

TEST(TokenUri, RejectsBadEncoding) {
  Result<TokenUri> uri = ParseTokenUri("pkcs11:token=%zz");
  ASSERT_FALSE(uri.ok());
  EXPECT_EQ(uri.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(uri.status().message().find("bad PKCS#11 URI"), std::string::npos);
}

TEST(TokenUri, RejectsUnknownPathAttribute) {
  Result<TokenUri> uri = ParseTokenUri("pkcs11:token=t;colour=blue");
  ASSERT_FALSE(uri.ok());
  EXPECT_EQ(uri.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(uri.status().message().find("unknown attribute"),
            std::string::npos);
}

TEST(TokenUri, RejectsUnknownQueryAttribute) {
  Result<TokenUri> uri = ParseTokenUri("pkcs11:token=t?pin-sauce=file:/x");
  ASSERT_FALSE(uri.ok());
  EXPECT_EQ(uri.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(uri.status().message().find("\"pin-sauce\""), std::string::npos);
}

TEST(TokenUri, RedactsPinValueInMessagesAndText) {
  Result<TokenUri> ok = ParseTokenUri("pkcs11:token=t?pin-value=s3cret");
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok->pin_value, "s3cret");
  EXPECT_EQ(ok->text.find("s3cret"), std::string::npos);
  Result<TokenUri> bad =
      ParseTokenUri("pkcs11:token=t;colour=blue?pin-value=s3cret");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().message().find("s3cret"), std::string::npos);
}

// p11-kit keeps the last of repeated pin-values, and a query value runs to
// the next '&' (a ';' is part of it): every pin-value must go, whole.
TEST(TokenUri, RedactsEveryPinValueWhole) {
  struct Case {
    const char *uri;
    const char *pin;
    const char *text;
  };
  const Case cases[] = {
      {"pkcs11:token=t?pin-value=1111&pin-value=s3cret", "s3cret",
       "pkcs11:token=t?pin-value=***&pin-value=***"},
      {"pkcs11:token=t?pin-value=ab;s3cret", "ab;s3cret",
       "pkcs11:token=t?pin-value=***"},
      {"pkcs11:object=pin-value=x;token=t?pin-value=s3cret", "s3cret",
       "pkcs11:object=pin-value=***;token=t?pin-value=***"},
  };
  for (const Case &c : cases) {
    Result<TokenUri> uri = ParseTokenUri(c.uri);
    ASSERT_TRUE(uri.ok()) << c.uri << ": " << uri.status().message();
    EXPECT_EQ(uri->pin_value, c.pin) << c.uri;
    EXPECT_EQ(uri->text, c.text) << c.uri;
    EXPECT_EQ(RedactUri(c.uri), c.text) << c.uri;
  }
  Result<TokenUri> bad =
      ParseTokenUri("pkcs11:token=t?pin-value=1&pin-value=s3cret&colour=b");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message(),
            "PKCS#11 URI has an unknown query attribute \"colour\": "
            "pkcs11:token=t?pin-value=***&pin-value=***&colour=b");
  // A pin-value misplaced in the path is an error, and still redacted.
  EXPECT_EQ(RedactUri("pkcs11:token=t;pin-value=s3cret;object=o"),
            "pkcs11:token=t;pin-value=***;object=o");
}

TEST(TokenUri, RejectsAnEmbeddedNul) {
  // p11-kit would stop at the NUL and never see colour= or module-path=.
  const std::string text("pkcs11:token=a\0;colour=blue?module-path=/x.so", 46);
  Result<TokenUri> uri = ParseTokenUri(text);
  ASSERT_FALSE(uri.ok());
  EXPECT_EQ(uri.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(uri.status().message().find("contains a NUL byte"),
            std::string::npos);
}

TEST(TokenUri, MatchesTokenInfo) {
  Result<TokenUri> uri = ParseTokenUri("pkcs11:token=tickets;serial=42");
  ASSERT_TRUE(uri.ok());
  CK_TOKEN_INFO info{};
  std::memset(info.label, ' ', sizeof(info.label));
  std::memcpy(info.label, "tickets", 7);
  std::memset(info.serialNumber, ' ', sizeof(info.serialNumber));
  std::memcpy(info.serialNumber, "42", 2);
  EXPECT_TRUE(uri->MatchesToken(info, 3));
  std::memcpy(info.serialNumber, "43", 2);
  EXPECT_FALSE(uri->MatchesToken(info, 3));
}

TEST(CkrName, NamesKnownAndUnknownCodes) {
  EXPECT_EQ(CkrName(CKR_SESSION_HANDLE_INVALID), "CKR_SESSION_HANDLE_INVALID");
  EXPECT_EQ(CkrName(0x80001234), "CKR_0x80001234");
  Status s = CkError("C_Login", CKR_PIN_INCORRECT, "token \"t\"");
  EXPECT_EQ(s.code(), ErrorCode::kPermissionDenied);
  EXPECT_EQ(s.message(), "C_Login: CKR_PIN_INCORRECT (token \"t\")");
  EXPECT_EQ(CkError("C_Sign", CKR_DEVICE_REMOVED).code(),
            ErrorCode::kUnavailable);
}

}  // namespace
}  // namespace hsmstek::p11
