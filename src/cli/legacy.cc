// `hsmstek import-legacy`: nginx / HAProxy session-ticket key files become
// decrypt-only token objects until they expire, so tickets issued before
// the migration keep resuming.
#include <iostream>
#include <memory>

#include "cli/common.h"
#include "keystore/duration.h"
#include "keystore/legacy_file.h"
#include "keystore/policy.h"
#include "keystore/provisioning.h"
#include "keystore/time_format.h"

namespace hsmstek::cli {
namespace {

struct LegacyArgs {
  std::string uri;
  std::string format;
  std::string expires_in = "24h";
  std::string file;
};

Status RunImportLegacy(const LegacyArgs &a) {
  Result<keystore::LegacyFormat> format = keystore::ParseLegacyFormat(a.format);
  if (!format.ok()) return format.status().WithContext("--format");
  Result<int64_t> expires_in = keystore::ParseDuration(a.expires_in);
  if (!expires_in.ok()) return expires_in.status().WithContext("--expires-in");
  // Legacy keys only bridge a migration; they never outlive a TLS 1.3
  // ticket lifetime (RFC 8446 §4.6.1).
  if (*expires_in > keystore::kMaxDecryptWindowSeconds) {
    return InvalidArgument(
        "--expires-in " + keystore::FormatDuration(*expires_in) +
        " is longer than the maximum " +
        keystore::FormatDuration(keystore::kMaxDecryptWindowSeconds));
  }
  // The file is parsed before the token is touched: a bad file changes
  // nothing.
  std::vector<keystore::LegacyKey> keys;
  {
    Result<SecretBuffer> contents =
        ReadSecretFile(a.file, keystore::kMaxLegacyKeyFileSize);
    if (!contents.ok()) return contents.status();
    Result<std::vector<keystore::LegacyKey>> parsed =
        keystore::ParseLegacyKeyFile(*format, contents->span());
    if (!parsed.ok()) return parsed.status().WithContext(a.file);
    keys = std::move(*parsed);
  }  // the file's bytes are wiped here

  Result<std::shared_ptr<keystore::KeyStore>> store = OpenStore(a.uri, true);
  if (!store.ok()) return store.status();
  Result<p11::Session> session = (*store)->token()->Acquire();
  if (!session.ok()) return session.status();
  const int64_t expires = SystemClock::Instance().NowUnix() + *expires_in;
  Status imported = keystore::ImportLegacyKeys(*session, (*store)->label(),
                                               keys, expires, *format);
  std::vector<std::string> names;
  for (const keystore::LegacyKey &k : keys) names.push_back(HexEncode(k.name));
  keys.clear();  // wipes the key bytes
  if (!imported.ok()) return imported;

  std::cout << "imported " << names.size() << " "
            << keystore::LegacyFormatName(*format) << " key"
            << (names.size() == 1 ? "" : "s") << " into store "
            << Quote((*store)->label()) << " of token "
            << Quote((*store)->token()->label()) << ", decrypt only, expiring "
            << keystore::FormatRfc3339(expires) << ":\n";
  for (const std::string &n : names) std::cout << "  " << n << "\n";
  std::cout << "The key file is no longer needed and holds the keys in "
               "clear: destroy it now, e.g. `shred -u "
            << a.file << "`.\n";
  return Status::Ok();
}

}  // namespace

void RegisterLegacy(CLI::App &app, std::vector<Command> &out) {
  auto a = std::make_shared<LegacyArgs>();
  CLI::App *sub = app.add_subcommand(
      "import-legacy",
      "Import an nginx or HAProxy ticket key file (decrypt only, expiring)");
  sub->add_option("uri", a->uri, "Store URI (object=<label>)")->required();
  sub->add_option("--format", a->format, "nginx or haproxy")->required();
  sub->add_option("--expires-in", a->expires_in,
                  "Keep the keys this long, at most 7d (default 24h)");
  sub->add_option("keyfile", a->file, "The key file (at most 64 KiB)")
      ->required();
  out.push_back({sub, [a] { return RunImportLegacy(*a); }});
}

}  // namespace hsmstek::cli
