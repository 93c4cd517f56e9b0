// Replication (docs/SECURITY.md §5): wrap-key generate / trust, export, import.
#include <sys/stat.h>

#include <iostream>
#include <memory>

#include "cli/common.h"
#include "keystore/bundle.h"
#include "keystore/derivation.h"
#include "keystore/duration.h"
#include "keystore/replication.h"
#include "keystore/time_format.h"
#include "pkcs11/object.h"

namespace hsmstek::cli {
namespace {

struct ReplicateArgs {
  std::string uri;
  std::string id;
  std::string key_uri;
  std::string in;
  std::string out;
  std::string so_pin_source;
  std::string signer;
  std::string valid_for = "24h";
  std::string expect_check;
};

Status RunExport(const ReplicateArgs &a) {
  Result<keystore::StoreId> id = ParseStoreId(a.id);
  if (!id.ok()) return id.status();
  Result<p11::TokenUri> wrap_key = KeyUri(a.key_uri, "--wrap-key");
  if (!wrap_key.ok()) return wrap_key.status();
  keystore::ExportOptions options;
  Result<p11::TokenUri> signer = KeyUri(a.signer, "--signer");
  if (!signer.ok()) return signer.status();
  options.signer = std::move(*signer);
  Result<int64_t> valid_for = keystore::ParseDuration(a.valid_for);
  if (!valid_for.ok()) return valid_for.status().WithContext("--valid-for");
  if (*valid_for > keystore::kMaxBundleValidity) {
    return InvalidArgument("--valid-for " + a.valid_for + " is more than 7d");
  }
  options.valid_for_s = *valid_for;
  options.now = SystemClock::Instance().NowUnix();
  Status fresh = RefuseExisting(a.out);
  if (!fresh.ok()) return fresh;
  // Export writes nothing to the token: read-only sessions suffice.
  Result<std::shared_ptr<keystore::KeyStore>> store = OpenStore(a.uri, false);
  if (!store.ok()) return store.status();
  Result<p11::Session> session = (*store)->token()->Acquire();
  if (!session.ok()) return session.status();
  Result<keystore::Bundle> bundle = keystore::ExportMaster(
      *session, (*store)->label(), *id, *wrap_key, options);
  if (!bundle.ok()) return bundle.status();
  Status written =
      WriteNewFile(a.out, keystore::SerializeBundle(*bundle), 0644);
  if (!written.ok()) return written;
  std::cout << "exported master " << HexEncode(bundle->store_id) << " of store "
            << Quote(bundle->label) << " to " << a.out << "\n"
            << "  check value:      " << HexEncode(bundle->check) << "\n"
            << "  ratchet link:     " << bundle->link
            << " (the current epoch's; older links never leave)\n"
            << "  mechanism:        "
            << keystore::WrapMechanismName(bundle->mechanism) << "\n"
            << "  recipient:        " << HexEncode(bundle->wrapping_key_id)
            << "\n"
            << "  signer:           " << HexEncode(bundle->signer) << "\n"
            << "  valid until:      "
            << keystore::FormatRfc3339(bundle->not_after) << "\n"
            << "Import it on the receiving token with `hsmstek import "
               "--expect-check "
            << HexEncode(bundle->check)
            << "` (confirm the check value over another channel); its status "
               "must then show the same check value.\n";
  return Status::Ok();
}

Status RunImport(const ReplicateArgs &a) {
  Result<p11::TokenUri> unwrap_key = KeyUri(a.key_uri, "--unwrap-key");
  if (!unwrap_key.ok()) return unwrap_key.status();
  Result<p11::TokenUri> store_uri = p11::ParseTokenUri(a.uri);
  if (!store_uri.ok()) return store_uri.status();
  Result<std::string> label = RequireObjectLabel(*store_uri, "store");
  if (!label.ok()) return label.status();
  Result<std::string> text = ReadTextFile(a.in, keystore::kMaxBundleSize);
  if (!text.ok()) return text.status();
  keystore::ImportOptions options;
  if (!a.expect_check.empty()) {
    Result<Bytes> check = HexDecode(a.expect_check);
    if (!check.ok() || check->size() != keystore::kCheckValueSize) {
      return InvalidArgument("--expect-check " + Quote(a.expect_check) +
                             " is not a check value (16 hex digits)");
    }
    options.expect_check.emplace();
    std::copy(check->begin(), check->end(), options.expect_check->begin());
  }
  options.now = SystemClock::Instance().NowUnix();
  Result<keystore::Bundle> bundle = keystore::ParseBundle(*text);
  if (!bundle.ok()) return bundle.status().WithContext(a.in);
  // Checked before the token is touched.
  if (bundle->label != *label) {
    return InvalidArgument("bundle is for label " + Quote(bundle->label) +
                           ", not " + Quote(*label));
  }
  Result<std::shared_ptr<keystore::KeyStore>> store = OpenStore(a.uri, true);
  if (!store.ok()) return store.status();
  Result<p11::Session> session = (*store)->token()->Acquire();
  if (!session.ok()) return session.status();
  bool unchanged = false;
  Status imported = keystore::ImportMaster(*session, *label, *bundle,
                                           *unwrap_key, options, &unchanged);
  if (!imported.ok()) return imported;
  if (unchanged) {
    std::cout << "master " << HexEncode(bundle->store_id) << " of store "
              << Quote(*label) << " already holds ratchet link " << bundle->link
              << " with check value " << HexEncode(bundle->check)
              << ": nothing imported\n";
    return Status::Ok();
  }
  std::cout << "imported master " << HexEncode(bundle->store_id)
            << " into store " << Quote(*label) << " of token "
            << Quote((*store)->token()->label()) << "\n"
            << "  check value:  " << HexEncode(bundle->check)
            << " (recomputed in the token: matches the bundle"
            << (options.expect_check ? " and --expect-check" : "") << ")\n"
            << "  signed by:    " << HexEncode(bundle->signer)
            << " (pinned in this token)\n"
            << "Servers using this token pick it up at their next refresh "
               "(within 30 s by default).\n";
  return Status::Ok();
}

Status RunWrapKeyGenerate(const ReplicateArgs &a) {
  Result<p11::TokenUri> uri = p11::ParseTokenUri(a.uri);
  if (!uri.ok()) return uri.status();
  Result<std::string> label = RequireObjectLabel(*uri, "key pair");
  if (!label.ok()) return label.status();
  Status fresh = RefuseExisting(a.out);
  if (!fresh.ok()) return fresh;
  Result<std::shared_ptr<p11::Token>> token = OpenToken(*uri, CKU_USER);
  if (!token.ok()) return token.status();
  Result<p11::Session> session = (*token)->Acquire();
  if (!session.ok()) return session.status();
  Result<keystore::UnwrapKeyPair> pair =
      keystore::GenerateUnwrapKeyPair(*session, *label);
  if (!pair.ok()) return pair.status();
  Status written = WriteNewFile(a.out, pair->pem, 0644);
  if (!written.ok()) {
    // All or nothing: without its PEM the new key is useless.
    p11::Template t;
    t.Ulong(CKA_CLASS, CKO_PRIVATE_KEY)
        .String(CKA_LABEL, *label)
        .Data(CKA_ID, pair->id);
    Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(*session, t);
    if (found.ok()) {
      for (CK_OBJECT_HANDLE h : *found) p11::ScopedObject destroy(*session, h);
    }
    return written;
  }
  std::cout << "generated unwrap key " << Quote(*label) << " in token "
            << Quote((*token)->label()) << " (RSA-" << keystore::kUnwrapKeyBits
            << ", unwrap only, id " << HexEncode(pair->id) << ")\n"
            << "  public key:   " << a.out << "\n"
            << "  fingerprint:  " << HexEncode(pair->fingerprint) << "\n"
            << "Give the public key to the SO of the sending token. Before "
               "running `hsmstek wrap-key trust`, they must confirm this "
               "fingerprint with you over another channel (also: `openssl "
               "pkey -pubin -in "
            << a.out << " -outform DER | sha256sum`).\n";
  if (!pair->unwrap_template) {
    std::cout << "WARNING: this token does not support CKA_UNWRAP_TEMPLATE: "
                 "anyone with its user PIN could unwrap a bundle meant for "
                 "this key into a readable key. Guard the bundles.\n";
  }
  return Status::Ok();
}

Status RunWrapKeyTrust(const ReplicateArgs &a) {
  Result<p11::TokenUri> uri = p11::ParseTokenUri(a.uri);
  if (!uri.ok()) return uri.status();
  Result<std::string> label = RequireObjectLabel(*uri, "wrapping key");
  if (!label.ok()) return label.status();
  Result<std::string> pem = ReadTextFile(a.in, keystore::kMaxPemSize);
  if (!pem.ok()) return pem.status();
  Result<keystore::RsaPublicKey> key = keystore::RsaPublicKeyFromPem(*pem);
  if (!key.ok()) return key.status().WithContext(a.in);
  Result<std::shared_ptr<p11::Token>> token =
      OpenToken(*uri, CKU_SO, a.so_pin_source);
  if (!token.ok()) return token.status();
  Result<p11::Session> session = (*token)->Acquire();
  if (!session.ok()) return session.status();
  Result<Bytes> fingerprint =
      keystore::InstallTrustedWrapKey(*session, *label, *key);
  if (!fingerprint.ok()) return fingerprint.status();
  std::cout << "installed trusted wrapping key " << Quote(*label)
            << " in token " << Quote((*token)->label())
            << " (CKA_TRUSTED and CKA_WRAP set)\n"
            << "  fingerprint:  " << HexEncode(*fingerprint) << "\n"
            << "This must equal the fingerprint `hsmstek wrap-key generate` "
               "printed on the receiving token. Replicable masters can now "
               "be exported with --wrap-key 'pkcs11:object="
            << *label << "'.\n";
  return Status::Ok();
}

}  // namespace

void RegisterReplicate(CLI::App &app, std::vector<Command> &out) {
  {
    auto a = std::make_shared<ReplicateArgs>();
    CLI::App *sub = app.add_subcommand(
        "export", "Wrap a replicable master into a bundle for another token");
    sub->add_option("uri", a->uri, "Store URI (object=<label>)")->required();
    sub->add_option("--id", a->id, "Store id of the master (16 hex digits)")
        ->required();
    sub->add_option("--wrap-key", a->key_uri,
                    "URI of the wrapping key in the same token: a trusted RSA "
                    "public key or an AES transport key")
        ->required();
    sub->add_option("--signer", a->signer,
                    "URI of the signing key in the same token (`hsmstek "
                    "signer generate`)")
        ->required();
    sub->add_option("--valid-for", a->valid_for,
                    "How long the bundle may wait for import (default 24h, "
                    "at most 7d)");
    sub->add_option("--out", a->out, "Bundle file to create")->required();
    out.push_back({sub, [a] { return RunExport(*a); }});
  }
  {
    auto a = std::make_shared<ReplicateArgs>();
    CLI::App *sub =
        app.add_subcommand("import", "Unwrap a bundle into this token");
    sub->add_option("uri", a->uri, "Store URI (object=<label>)")->required();
    sub->add_option("--unwrap-key", a->key_uri,
                    "URI of the unwrapping key in the same token: the RSA "
                    "private key or the AES transport key")
        ->required();
    sub->add_option("--in", a->in, "Bundle file")->required();
    sub->add_option("--expect-check", a->expect_check,
                    "The check value confirmed with the sender out of band "
                    "(16 hex digits)");
    out.push_back({sub, [a] { return RunImport(*a); }});
  }
  CLI::App *wrap_key = app.add_subcommand(
      "wrap-key", "Manage the keys that carry masters between tokens");
  wrap_key->require_subcommand(1);
  {
    auto a = std::make_shared<ReplicateArgs>();
    CLI::App *sub = wrap_key->add_subcommand(
        "generate",
        "On the receiving token: an RSA-3072 unwrap-only key pair; writes "
        "the public key as PEM");
    sub->add_option("uri", a->uri, "Token URI with object=<key label>")
        ->required();
    sub->add_option("--out", a->out, "PEM file to create")->required();
    out.push_back({sub, [a] { return RunWrapKeyGenerate(*a); }});
  }
  {
    auto a = std::make_shared<ReplicateArgs>();
    CLI::App *sub = wrap_key->add_subcommand(
        "trust",
        "On the sending token, as SO: install a PEM public key as a trusted "
        "wrapping key");
    sub->add_option("uri", a->uri, "Token URI with object=<key label>")
        ->required();
    sub->add_option("--in", a->in, "PEM public key from `wrap-key generate`")
        ->required();
    sub->add_option("--so-pin-source", a->so_pin_source,
                    "file:/path with the SO PIN (else HSMSTEK_SO_PIN, else a "
                    "prompt)");
    out.push_back({sub, [a] { return RunWrapKeyTrust(*a); }});
  }
}

}  // namespace hsmstek::cli
