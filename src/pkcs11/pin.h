// Where a token's user PIN comes from (docs/SECURITY.md §4): the URI's pin-value, the
// URI's pin-source file, or the HSMSTEK_PIN environment variable, in that
// order. The PIN is read at each login (so a PIN file that appears later is
// picked up) and never appears in messages.
#pragma once

#include <optional>
#include <string>

#include "common/bytes.h"
#include "common/status.h"
#include "pkcs11/uri.h"

namespace hsmstek::p11 {

inline constexpr char kPinEnvironmentVariable[] = "HSMSTEK_PIN";

// Reads the PIN for `uri`. pin-source accepts "file:/abs/path",
// "file:///abs/path" or a plain absolute path; one trailing "\n" or "\r\n" is
// trimmed. The file is read with open/read into a buffer that is wiped (no
// stdio). A file readable by group or others is read, with a warning in
// the log (PinFileModeWarning). A missing or unreadable file, or no source
// at all, is kPermissionDenied naming the file (never its contents); a
// pin-source that is not an absolute path is kInvalidArgument that does
// not repeat the value (it may be a PIN pasted in the wrong place).
Result<SecretBuffer> ReadPin(const TokenUri &uri);

// PinFileModeWarning returns the warning ReadPin logs when the pin-source
// file of `uri` is readable (or writable) by group or others, else nullopt
// (also for no file, or one that cannot be stat'ed). For the CLI, which
// shows it on stderr.
std::optional<std::string> PinFileModeWarning(const TokenUri &uri);

// PinSourceFingerprint identifies the current state of the PIN's source
// without deriving anything from the PIN: for a pin-source file its device,
// inode, size and modification time; "pin-value" or "environment" for
// sources that cannot change while the process runs. Used to avoid sending a
// PIN the token rejected again (tokens lock a PIN after a few failures).
std::string PinSourceFingerprint(const TokenUri &uri);

}  // namespace hsmstek::p11
