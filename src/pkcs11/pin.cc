#include "pkcs11/pin.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/log.h"

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
    // Never echo the value: a PIN pasted here must not reach a log.
    return InvalidArgument(
        "pin-source must be an absolute file path (file:/path); its value is "
        "not shown");
  }
  return std::string(s);
}

// Owns a file descriptor.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  Fd(const Fd &) = delete;
  Fd &operator=(const Fd &) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

std::string ModeWarning(const std::string &path, mode_t mode) {
  char octal[8];
  std::snprintf(octal, sizeof(octal), "%04o", static_cast<unsigned>(mode));
  return "PIN file " + path + " is readable by group or others (mode " + octal +
         "); chmod 600 it";
}

// open/read straight into a buffer that is wiped when it dies: no stdio
// buffer holds the PIN.
Result<SecretBuffer> ReadPinFile(const std::string &path) {
  Fd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY));
  if (fd.get() < 0) {
    return PermissionDenied("cannot read PIN file " + path + ": " +
                            std::strerror(errno));
  }
  struct stat st;
  if (fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode)) {
    return PermissionDenied("PIN file " + path + " is not a regular file");
  }
  if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    log::Warning(ModeWarning(path, st.st_mode & 07777));
  }
  SecretBuffer pin(kMaxPinLength + 1);
  size_t n = 0;
  while (n < pin.size()) {
    ssize_t r = read(fd.get(), pin.data() + n, pin.size() - n);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return PermissionDenied("cannot read PIN file " + path);
    if (r == 0) break;
    n += static_cast<size_t>(r);
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

std::optional<std::string> PinFileModeWarning(const TokenUri &uri) {
  if (uri.pin_value || !uri.pin_source) return std::nullopt;
  Result<std::string> path = PinFilePath(*uri.pin_source);
  struct stat st;
  if (!path.ok() || stat(path->c_str(), &st) != 0) return std::nullopt;
  if ((st.st_mode & (S_IRWXG | S_IRWXO)) == 0) return std::nullopt;
  return ModeWarning(*path, st.st_mode & 07777);
}

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
