#include "cli/common.h"

#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>

#include "common/bytes.h"
#include "keystore/duration.h"
#include "keystore/time_format.h"
#include "pkcs11/pin.h"
#include "pkcs11/uri.h"

namespace hsmstek::cli {
namespace {

constexpr size_t kMaxPinLength = 256;

// Reads one line from the terminal on stdin with echo off. The bytes only
// ever live in the returned SecretBuffer.
Result<SecretBuffer> PromptPin(const std::string &prompt) {
  const int fd = STDIN_FILENO;
  termios saved;
  if (tcgetattr(fd, &saved) != 0) {
    return PermissionDenied("cannot read a PIN: stdin is not a terminal");
  }
  termios quiet = saved;
  quiet.c_lflag &= ~static_cast<tcflag_t>(ECHO);
  quiet.c_lflag |= ECHONL;
  std::fputs(prompt.c_str(), stderr);
  std::fflush(stderr);
  if (tcsetattr(fd, TCSAFLUSH, &quiet) != 0) {
    return PermissionDenied("cannot turn off echo on the terminal");
  }
  SecretBuffer pin(kMaxPinLength + 1);
  size_t n = 0;
  bool too_long = false;
  for (;;) {
    char c;
    ssize_t r = read(fd, &c, 1);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0 || c == '\n') break;
    if (n < pin.size()) {
      pin.data()[n++] = static_cast<uint8_t>(c);
    } else {
      too_long = true;
    }
    c = 0;
  }
  tcsetattr(fd, TCSAFLUSH, &saved);
  if (n > 0 && pin.data()[n - 1] == '\r') --n;
  pin.truncate(n);
  if (too_long || n > kMaxPinLength) {
    return PermissionDenied("the PIN is longer than " +
                            std::to_string(kMaxPinLength) + " bytes");
  }
  if (pin.empty()) return PermissionDenied("empty PIN");
  return pin;
}

// Shows on stderr the warning the library logs (only with -v here) for a
// PIN file others can read.
void WarnAboutPinFile(const p11::TokenUri &uri) {
  if (std::optional<std::string> w = p11::PinFileModeWarning(uri)) {
    std::fprintf(stderr, "hsmstek: warning: %s\n", w->c_str());
  }
}

bool HasUserPinSource(const p11::TokenUri &uri) {
  return uri.pin_value || uri.pin_source ||
         std::getenv(p11::kPinEnvironmentVariable) != nullptr;
}

std::string TokenName(const p11::TokenUri &uri) {
  return uri.token ? "token " + Quote(*uri.token) : std::string("the token");
}

// The PIN provider for `user` on `uri`, or an empty function when the
// token's own sources (URI, HSMSTEK_PIN) apply.
std::function<Result<SecretBuffer>()> PinProvider(
    const p11::TokenUri &uri, CK_USER_TYPE user,
    const std::string &so_pin_source) {
  if (user == CKU_SO) {
    const std::string name = TokenName(uri);
    return [so_pin_source, name]() -> Result<SecretBuffer> {
      if (!so_pin_source.empty()) {
        p11::TokenUri source;
        source.pin_source = so_pin_source;
        WarnAboutPinFile(source);
        Result<SecretBuffer> pin = p11::ReadPin(source);
        if (!pin.ok()) return pin.status().WithContext("--so-pin-source");
        return pin;
      }
      if (const char *env = std::getenv(kSoPinEnvironmentVariable)) {
        return SecretBuffer(reinterpret_cast<const uint8_t *>(env),
                            std::strlen(env));
      }
      if (isatty(STDIN_FILENO)) return PromptPin("SO PIN for " + name + ": ");
      return PermissionDenied(
          "no SO PIN: pass --so-pin-source file:/path, set " +
          std::string(kSoPinEnvironmentVariable) + " or run on a terminal");
    };
  }
  if (HasUserPinSource(uri) || !isatty(STDIN_FILENO)) return {};
  const std::string name = TokenName(uri);
  return [name]() { return PromptPin("User PIN for " + name + ": "); };
}

Result<std::string> ReadFileLimited(const std::string &path, size_t max,
                                    SecretBuffer *secret) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return NotFound("cannot open " + path + ": " + std::strerror(errno));
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return InvalidArgument(path + " is not a regular file");
  }
  SecretBuffer buf(max + 1);
  size_t n = 0;
  while (n < buf.size()) {
    ssize_t r = read(fd, buf.data() + n, buf.size() - n);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      int err = errno;
      close(fd);
      return InvalidArgument("cannot read " + path + ": " + std::strerror(err));
    }
    if (r == 0) break;
    n += static_cast<size_t>(r);
  }
  close(fd);
  if (n > max) {
    return InvalidArgument(path + " is larger than " + std::to_string(max) +
                           " bytes");
  }
  buf.truncate(n);
  if (secret != nullptr) {
    *secret = std::move(buf);
    return std::string();
  }
  return std::string(reinterpret_cast<const char *>(buf.data()), buf.size());
}

}  // namespace

// Labels come from URIs and bundle files: escaped like every other
// outside value in messages, so a hostile label cannot forge output lines.
std::string Quote(std::string_view s) { return QuoteForMessage(s); }

std::string Redact(std::string_view text) {
  // Free text (CLI11 messages quote arguments): a URI ends at a blank or a
  // quote; inside one, p11::RedactUri applies the same rule as everywhere.
  static constexpr std::string_view kDelimiters = " \t\n'\"";
  std::string out;
  size_t i = 0;
  while (i <= text.size()) {
    size_t end = text.find_first_of(kDelimiters, i);
    if (end == std::string_view::npos) end = text.size();
    out.append(p11::RedactUri(text.substr(i, end - i)));
    if (end < text.size()) out.push_back(text[end]);
    i = end + 1;
  }
  return out;
}

Status DisableCoreDumps() {
  const rlimit none{0, 0};
  if (setrlimit(RLIMIT_CORE, &none) != 0) {
    return Internal(std::string("setrlimit(RLIMIT_CORE): ") +
                    std::strerror(errno));
  }
  if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) {
    return Internal(std::string("prctl(PR_SET_DUMPABLE): ") +
                    std::strerror(errno));
  }
  return Status::Ok();
}

Status RefuseExisting(const std::string &path) {
  struct stat st;
  if (lstat(path.c_str(), &st) == 0) {
    return AlreadyExists("refusing to overwrite " + path);
  }
  return Status::Ok();
}

Result<std::string> RequireObjectLabel(const p11::TokenUri &uri,
                                       const char *what) {
  if (!uri.object || uri.object->empty()) {
    return InvalidArgument(std::string("the URI must name the ") + what +
                           " with object=<label>: " + uri.text);
  }
  return *uri.object;
}

Result<p11::TokenUri> KeyUri(const std::string &text, const char *option) {
  Result<p11::TokenUri> uri = p11::ParseTokenUri(text);
  if (!uri.ok()) return uri.status().WithContext(option);
  return uri;
}

Result<std::shared_ptr<keystore::KeyStore>> OpenStore(const std::string &uri,
                                                      bool read_write) {
  Result<p11::TokenUri> parsed = p11::ParseTokenUri(uri);
  if (!parsed.ok()) return parsed.status();
  WarnAboutPinFile(*parsed);
  keystore::StoreOptions options;
  options.background_maintenance = false;
  options.token.read_write = read_write;
  options.token.pin_provider = PinProvider(*parsed, CKU_USER, "");
  Result<std::shared_ptr<keystore::KeyStore>> store =
      keystore::KeyStore::Open(uri, options);
  if (!store.ok()) return store.status();
  Status connected = (*store)->token()->Connect();
  if (!connected.ok()) return connected;
  return store;
}

Result<std::shared_ptr<p11::Token>> OpenToken(
    const p11::TokenUri &uri, CK_USER_TYPE user,
    const std::string &so_pin_source) {
  if (user == CKU_USER) WarnAboutPinFile(uri);
  p11::TokenOptions options;
  options.read_write = true;
  options.login_as = user;
  options.pin_provider = PinProvider(uri, user, so_pin_source);
  Result<std::shared_ptr<p11::Token>> token = p11::Token::Create(uri, options);
  if (!token.ok()) return token.status();
  Status connected = (*token)->Connect();
  if (!connected.ok()) return connected;
  return token;
}

Result<keystore::StoreId> ParseStoreId(std::string_view hex) {
  Result<Bytes> bytes = HexDecode(hex);
  if (!bytes.ok() || bytes->size() != sizeof(keystore::StoreId)) {
    return InvalidArgument("--id " + Quote(hex) +
                           " is not a store id (16 hex digits)");
  }
  keystore::StoreId id;
  std::copy(bytes->begin(), bytes->end(), id.begin());
  return id;
}

Result<int64_t> ParseActivation(const std::string &activate_in,
                                const std::string &activate_at, int64_t now,
                                int64_t default_delay) {
  if (!activate_at.empty()) {
    Result<int64_t> at = keystore::ParseRfc3339(activate_at);
    if (!at.ok()) return at.status().WithContext("--activate-at");
    return *at;
  }
  if (activate_in.empty()) return now + default_delay;
  Result<int64_t> in =
      keystore::ParseDuration(activate_in, keystore::ZeroDuration::kAllow);
  if (!in.ok()) return in.status().WithContext("--activate-in");
  if (*in > keystore::kMaxRfc3339Time - now) {
    return InvalidArgument("--activate-in " + activate_in + " is too far away");
  }
  return now + *in;
}

Result<SecretBuffer> ReadSecretFile(const std::string &path, size_t max) {
  SecretBuffer out;
  Result<std::string> r = ReadFileLimited(path, max, &out);
  if (!r.ok()) return r.status();
  return out;
}

Result<std::string> ReadTextFile(const std::string &path, size_t max) {
  return ReadFileLimited(path, max, nullptr);
}

Status WriteNewFile(const std::string &path, std::string_view data,
                    unsigned mode) {
  struct stat st;
  if (lstat(path.c_str(), &st) == 0) {
    return AlreadyExists("refusing to overwrite " + path);
  }
  std::string dir = std::filesystem::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  std::string tmp = dir + "/.hsmstek-XXXXXX";
  int fd = mkstemp(tmp.data());
  if (fd < 0) {
    return InvalidArgument("cannot create a file in " + dir + ": " +
                           std::strerror(errno));
  }
  auto fail = [&](const std::string &what) {
    int err = errno;
    close(fd);
    unlink(tmp.c_str());
    return InvalidArgument(what + " " + path + ": " + std::strerror(err));
  };
  if (fchmod(fd, static_cast<mode_t>(mode)) != 0) {
    return fail("cannot set the mode of");
  }
  size_t written = 0;
  while (written < data.size()) {
    ssize_t w = write(fd, data.data() + written, data.size() - written);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return fail("cannot write");
    written += static_cast<size_t>(w);
  }
  if (fsync(fd) != 0) return fail("cannot write");
  if (close(fd) != 0) {
    int err = errno;
    unlink(tmp.c_str());
    return InvalidArgument("cannot write " + path + ": " + std::strerror(err));
  }
  // link() never replaces an existing file, unlike rename().
  if (link(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    unlink(tmp.c_str());
    if (err == EEXIST) return AlreadyExists("refusing to overwrite " + path);
    return InvalidArgument("cannot create " + path + ": " + std::strerror(err));
  }
  unlink(tmp.c_str());
  return Status::Ok();
}

}  // namespace hsmstek::cli
