// PIN sources (pkcs11/pin.h) and pin-source redaction (pkcs11/uri.h).
#include "pkcs11/pin.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/log.h"
#include "pkcs11/uri.h"

namespace hsmstek::p11 {
namespace {

std::vector<std::string> *captured = nullptr;

void Capture(int /*level*/, const char *msg, void * /*arg*/) {
  if (captured != nullptr) captured->push_back(msg);
}

class PinTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/hsmstek-pin-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    captured = &messages_;
    log::SetSink(&Capture, nullptr);
  }
  void TearDown() override {
    log::SetSink(nullptr, nullptr);
    captured = nullptr;
    std::filesystem::remove_all(dir_);
  }
  std::string PinFile(mode_t mode) {
    const std::string path = dir_ + "/pin" + std::to_string(mode);
    std::ofstream(path) << "246810\n";
    chmod(path.c_str(), mode);
    return path;
  }
  std::string dir_;
  std::vector<std::string> messages_;
};

TEST_F(PinTest, ReadsTheFileAndTrimsOneNewline) {
  TokenUri uri;
  uri.pin_source = "file:" + PinFile(0600);
  Result<SecretBuffer> pin = ReadPin(uri);
  ASSERT_TRUE(pin.ok()) << pin.status().message();
  EXPECT_EQ(
      std::string(reinterpret_cast<const char *>(pin->data()), pin->size()),
      "246810");
  EXPECT_TRUE(messages_.empty());
  EXPECT_FALSE(PinFileModeWarning(uri).has_value());
}

TEST_F(PinTest, AFileOthersCanReadWarns) {
  TokenUri uri;
  const std::string path = PinFile(0644);
  uri.pin_source = "file:" + path;
  Result<SecretBuffer> pin = ReadPin(uri);
  ASSERT_TRUE(pin.ok()) << pin.status().message();
  const std::string want = "PIN file " + path +
                           " is readable by group or others (mode 0644); "
                           "chmod 600 it";
  ASSERT_EQ(messages_.size(), 1u);
  EXPECT_EQ(messages_[0], want);
  EXPECT_EQ(PinFileModeWarning(uri), want);
  uri.pin_source = "file:" + PinFile(0640);
  EXPECT_TRUE(PinFileModeWarning(uri).has_value());
}

TEST_F(PinTest, APinPastedAsPinSourceIsNeverEchoed) {
  for (const char *source : {"123456", "file:123456", "file://h/123456"}) {
    TokenUri uri;
    uri.pin_source = source;
    Result<SecretBuffer> pin = ReadPin(uri);
    ASSERT_FALSE(pin.ok()) << source;
    EXPECT_EQ(pin.status().message().find("123456"), std::string::npos)
        << pin.status().message();
  }
  EXPECT_EQ(RedactUri("pkcs11:token=t?pin-source=123456&module-path=/m.so"),
            "pkcs11:token=t?pin-source=***&module-path=/m.so");
  EXPECT_EQ(RedactUri("pkcs11:token=t?pin-source=file:/etc/p.pin"),
            "pkcs11:token=t?pin-source=file:/etc/p.pin");
  EXPECT_EQ(RedactUri("pkcs11:token=t?pin-source=/etc/p.pin"),
            "pkcs11:token=t?pin-source=/etc/p.pin");
  Result<TokenUri> parsed =
      ParseTokenUri("pkcs11:token=t?pin-source=123456&colour=blue");
  ASSERT_FALSE(parsed.ok());
  EXPECT_EQ(parsed.status().message().find("123456"), std::string::npos)
      << parsed.status().message();
  Result<TokenUri> ok = ParseTokenUri("pkcs11:token=t?pin-source=123456");
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok->text.find("123456"), std::string::npos) << ok->text;
}

}  // namespace
}  // namespace hsmstek::p11
