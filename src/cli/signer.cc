// Bundle signers (docs/SECURITY.md §5): `signer generate` on the sending token,
// `signer trust` (as the SO) on the receiving one. Same ceremony shape as
// `wrap-key generate` / `wrap-key trust`, in the other direction.
#include <iostream>
#include <memory>

#include "cli/common.h"
#include "keystore/replication.h"
#include "keystore/signing.h"
#include "pkcs11/object.h"

namespace hsmstek::cli {
namespace {

struct SignerArgs {
  std::string uri;
  std::string in;
  std::string out;
  std::string so_pin_source;
};

// Destroys both halves of the key pair `id` labelled `label` (best effort).
void DestroyKeyPair(p11::Session &session, const std::string &label,
                    const Bytes &id) {
  for (CK_OBJECT_CLASS cls : {CKO_PRIVATE_KEY, CKO_PUBLIC_KEY}) {
    p11::Template t;
    t.Ulong(CKA_CLASS, cls).String(CKA_LABEL, label).Data(CKA_ID, id);
    Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(session, t);
    if (!found.ok()) continue;
    for (CK_OBJECT_HANDLE h : *found) p11::ScopedObject destroy(session, h);
  }
}

Status RunSignerGenerate(const SignerArgs &a) {
  Result<p11::TokenUri> uri = p11::ParseTokenUri(a.uri);
  if (!uri.ok()) return uri.status();
  Result<std::string> label = RequireObjectLabel(*uri, "signing key");
  if (!label.ok()) return label.status();
  Status fresh = RefuseExisting(a.out);
  if (!fresh.ok()) return fresh;
  Result<std::shared_ptr<p11::Token>> token = OpenToken(*uri, CKU_USER);
  if (!token.ok()) return token.status();
  Result<p11::Session> session = (*token)->Acquire();
  if (!session.ok()) return session.status();
  Result<keystore::SigningKeyPair> pair =
      keystore::GenerateSigningKeyPair(*session, *label);
  if (!pair.ok()) return pair.status();
  Status written = WriteNewFile(a.out, pair->pem, 0644);
  if (!written.ok()) {
    // All or nothing: without its PEM nobody can pin the new key.
    DestroyKeyPair(*session, *label, pair->id);
    return written;
  }
  std::cout << "generated signing key " << Quote(*label) << " in token "
            << Quote((*token)->label())
            << " (ECDSA P-256, sign only, never extractable)\n"
            << "  public key:   " << a.out << "\n"
            << "  fingerprint:  " << HexEncode(pair->fingerprint) << "\n"
            << "Give the public key to the SO of each receiving token. Before "
               "running `hsmstek signer trust`, they must confirm this "
               "fingerprint with you over another channel (also: `openssl "
               "pkey -pubin -in "
            << a.out << " -outform DER | sha256sum`).\n";
  return Status::Ok();
}

Status RunSignerTrust(const SignerArgs &a) {
  Result<p11::TokenUri> uri = p11::ParseTokenUri(a.uri);
  if (!uri.ok()) return uri.status();
  Result<std::string> label = RequireObjectLabel(*uri, "signer");
  if (!label.ok()) return label.status();
  Result<std::string> pem = ReadTextFile(a.in, keystore::kMaxPemSize);
  if (!pem.ok()) return pem.status();
  Result<keystore::EcPublicKey> key = keystore::EcPublicKeyFromPem(*pem);
  if (!key.ok()) return key.status().WithContext(a.in);
  Result<std::shared_ptr<p11::Token>> token =
      OpenToken(*uri, CKU_SO, a.so_pin_source);
  if (!token.ok()) return token.status();
  Result<p11::Session> session = (*token)->Acquire();
  if (!session.ok()) return session.status();
  Result<Bytes> fingerprint =
      keystore::InstallTrustedSigner(*session, *label, *key);
  if (!fingerprint.ok()) return fingerprint.status();
  std::cout << "pinned signer " << Quote(*label) << " in token "
            << Quote((*token)->label()) << " (CKA_TRUSTED and CKA_VERIFY set)\n"
            << "  fingerprint:  " << HexEncode(*fingerprint) << "\n"
            << "This must equal the fingerprint `hsmstek signer generate` "
               "printed on the sending token. `hsmstek import` into this "
               "token now accepts bundles that key signed.\n";
  return Status::Ok();
}

}  // namespace

void RegisterSigner(CLI::App &app, std::vector<Command> &out) {
  CLI::App *signer = app.add_subcommand(
      "signer", "Manage the keys that sign and authenticate bundles");
  signer->require_subcommand(1);
  {
    auto a = std::make_shared<SignerArgs>();
    CLI::App *sub = signer->add_subcommand(
        "generate",
        "On the sending token: a P-256 sign-only key pair; writes the public "
        "key as PEM");
    sub->add_option("uri", a->uri, "Token URI with object=<key label>")
        ->required();
    sub->add_option("--out", a->out, "PEM file to create")->required();
    out.push_back({sub, [a] { return RunSignerGenerate(*a); }});
  }
  {
    auto a = std::make_shared<SignerArgs>();
    CLI::App *sub = signer->add_subcommand(
        "trust",
        "On the receiving token, as SO: pin a PEM public key as a bundle "
        "signer");
    sub->add_option("uri", a->uri, "Token URI with object=<key label>")
        ->required();
    sub->add_option("--in", a->in, "PEM public key from `signer generate`")
        ->required();
    sub->add_option("--so-pin-source", a->so_pin_source,
                    "file:/path with the SO PIN (else HSMSTEK_SO_PIN, else a "
                    "prompt)");
    out.push_back({sub, [a] { return RunSignerTrust(*a); }});
  }
}

}  // namespace hsmstek::cli
