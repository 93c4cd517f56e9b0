#include "pkcs11/pin.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace hsmstek::p11 {
namespace {

constexpr size_t kMaxPinLength = 256;

void TrimNewline(SecretBuffer &pin) {
  size_t n = pin.size();
  if (n > 0 && pin.data()[n - 1] == '\n') --n;
  if (n > 0 && pin.data()[n - 1] == '\r') --n;
  pin.truncate(n);
}

Result<std::string> PinFilePath(const std::string &source) {
  std::string_view s = source;
  if (s.substr(0, 8) == "file:///") {
    s.remove_prefix(7);  // keep the leading '/'
  } else if (s.substr(0, 7) == "file://") {
    return InvalidArgument(
        "pin-source with a host is not supported (use file:/path)");
  } else if (s.substr(0, 5) == "file:") {
    s.remove_prefix(5);
  }
  if (s.empty() || s[0] != '/') {
    return InvalidArgument("pin-source must be an absolute file path: " +
                           source);
  }
  return std::string(s);
}

Result<SecretBuffer> ReadPinFile(const std::string &path) {
  struct FileCloser {
    void operator()(FILE *f) const { std::fclose(f); }
  };
  std::unique_ptr<FILE, FileCloser> f(std::fopen(path.c_str(), "rb"));
  if (!f) {
    return PermissionDenied("cannot read PIN file " + path + ": " +
                            std::strerror(errno));
  }
  SecretBuffer pin(kMaxPinLength + 1);
  size_t n = std::fread(pin.data(), 1, pin.size(), f.get());
  if (std::ferror(f.get())) {
    return PermissionDenied("cannot read PIN file " + path);
  }
  if (n > kMaxPinLength) {
    return PermissionDenied("PIN file " + path + " is longer than " +
                            std::to_string(kMaxPinLength) + " bytes");
  }
  pin.truncate(n);
  TrimNewline(pin);
  if (pin.empty()) return PermissionDenied("PIN file " + path + " is empty");
  return pin;
}

}  // namespace

std::string PinSourceFingerprint(const TokenUri &uri) {
  if (uri.pin_value) return "pin-value";
  if (uri.pin_source) {
    Result<std::string> path = PinFilePath(*uri.pin_source);
    struct stat st;
    if (!path.ok() || stat(path->c_str(), &st) != 0) return "file:missing";
    return "file:" + std::to_string(st.st_dev) + ":" +
           std::to_string(st.st_ino) + ":" + std::to_string(st.st_size) + ":" +
           std::to_string(st.st_mtim.tv_sec) + "." +
           std::to_string(st.st_mtim.tv_nsec) + ":" +
           std::to_string(st.st_ctim.tv_nsec);
  }
  return "environment";
}

Result<SecretBuffer> ReadPin(const TokenUri &uri) {
  if (uri.pin_value) {
    const std::string &v = *uri.pin_value;
    return SecretBuffer(reinterpret_cast<const uint8_t *>(v.data()), v.size());
  }
  if (uri.pin_source) {
    Result<std::string> path = PinFilePath(*uri.pin_source);
    if (!path.ok()) return path.status();
    return ReadPinFile(*path);
  }
  if (const char *env = std::getenv(kPinEnvironmentVariable)) {
    return SecretBuffer(reinterpret_cast<const uint8_t *>(env),
                        std::strlen(env));
  }
  return PermissionDenied(
      "no PIN: add pin-source=file:/path to the URI or set HSMSTEK_PIN");
}

}  // namespace hsmstek::p11
