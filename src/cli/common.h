// Shared pieces of the `hsmstek` operator tool: opening a store or a token
// with the right PIN source, files that are read with a size limit and
// written all-or-nothing, and message hygiene.
//
// No function here throws; errors are Status values that main() prints as
// "hsmstek: <message>" (exit 1). Single-threaded use.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/bytes.h"
#include "common/status.h"
#include "keystore/key_name.h"
#include "keystore/store.h"
#include "pkcs11/token.h"
#include "pkcs11/uri.h"

namespace hsmstek::cli {

// Environment variable with the SO PIN for `wrap-key trust`.
inline constexpr char kSoPinEnvironmentVariable[] = "HSMSTEK_SO_PIN";

// A command: its CLI11 subcommand and what runs when it was chosen.
struct Command {
  CLI::App *app = nullptr;
  std::function<Status()> run;
};

// Register* add one command group to `app` and append what they added to
// `out`. Defined in provision.cc, status.cc, legacy.cc, replicate.cc,
// signer.cc, selftest.cc.
void RegisterProvision(CLI::App &app, std::vector<Command> &out);
void RegisterStatus(CLI::App &app, std::vector<Command> &out);
void RegisterLegacy(CLI::App &app, std::vector<Command> &out);
void RegisterReplicate(CLI::App &app, std::vector<Command> &out);
void RegisterSigner(CLI::App &app, std::vector<Command> &out);
void RegisterSelfTest(CLI::App &app, std::vector<Command> &out);

// OpenStore opens the store `uri` names (object= is the label) with
// background maintenance off and, when `read_write`, read/write sessions.
// The PIN comes from the URI's pin-value / pin-source, else HSMSTEK_PIN,
// else an echo-less prompt when stdin is a terminal. Connects (and logs in)
// now, so a wrong PIN or token surfaces here; masters are read on demand.
[[nodiscard]] Result<std::shared_ptr<keystore::KeyStore>> OpenStore(
    const std::string &uri, bool read_write);

// OpenToken connects to the token `uri` names, logging in as `user`
// (CKU_USER with the PIN sources above, or CKU_SO with `so_pin_source`:
// "file:/path", else HSMSTEK_SO_PIN, else a prompt on a terminal).
[[nodiscard]] Result<std::shared_ptr<p11::Token>> OpenToken(
    const p11::TokenUri &uri, CK_USER_TYPE user,
    const std::string &so_pin_source = "");

// ParseStoreId parses the 16 hex digits of a store id.
[[nodiscard]] Result<keystore::StoreId> ParseStoreId(std::string_view hex);

// ParseActivation returns the activation time: now + `activate_in` (a
// duration, "0s" allowed) or `activate_at` (RFC 3339); at most one is
// non-empty; neither gives now + `default_delay`.
[[nodiscard]] Result<int64_t> ParseActivation(const std::string &activate_in,
                                              const std::string &activate_at,
                                              int64_t now,
                                              int64_t default_delay);

// ReadSecretFile reads a regular file of at most `max` bytes into a
// buffer that is wiped when it dies. Larger files are kInvalidArgument.
[[nodiscard]] Result<SecretBuffer> ReadSecretFile(const std::string &path,
                                                  size_t max);
// ReadTextFile is ReadSecretFile for public text.
[[nodiscard]] Result<std::string> ReadTextFile(const std::string &path,
                                               size_t max);

// WriteNewFile writes `data` to `path`, which must not exist, with `mode`:
// into a temporary file of the same directory first, then linked into
// place, so `path` either appears complete or not at all.
[[nodiscard]] Status WriteNewFile(const std::string &path,
                                  std::string_view data, unsigned mode);

// DisableCoreDumps sets RLIMIT_CORE to 0 and PR_SET_DUMPABLE to 0 for the
// rest of the process: the tool holds PINs and legacy key bytes, which a
// core file or a ptrace of the same user would reveal. Call it first.
[[nodiscard]] Status DisableCoreDumps();

// RefuseExisting is kAlreadyExists when `path` exists (checked before a
// ceremony touches the token; WriteNewFile checks again).
[[nodiscard]] Status RefuseExisting(const std::string &path);

// RequireObjectLabel returns the URI's object= label, or kInvalidArgument
// naming `what` ("key pair") when it has none.
[[nodiscard]] Result<std::string> RequireObjectLabel(const p11::TokenUri &uri,
                                                     const char *what);

// KeyUri parses the URI given to `option` (--wrap-key, --signer, ...).
[[nodiscard]] Result<p11::TokenUri> KeyUri(const std::string &text,
                                           const char *option);

// Redact returns `text` with the value of every "pin-value=" replaced as
// p11::RedactUri does, in each blank- or quote-delimited word (CLI11 usage
// errors may quote arguments).
std::string Redact(std::string_view text);

// Quote returns `s` quoted for a message (common/bytes.h QuoteForMessage:
// escaped, at most 40 bytes).
std::string Quote(std::string_view s);

}  // namespace hsmstek::cli
