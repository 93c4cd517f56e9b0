// Fuzz target: ParseBundle (files handed between operators and HSMs).
// Each input is parsed twice: as given (which exercises the size, byte,
// header, digest and signature-line checks and, for version 2, every field
// parser: the signature itself is verified in the token, not here), and
// with its trailer replaced by a correct version-1 sha256 line, so the
// fuzzer also reaches the version-1 field parsers behind the digest.
// Invariants: errors are kInvalidArgument; an accepted bundle serializes to
// text that parses back to the same bundle, and that text is a fixed
// point; an accepted version-2 bundle is exactly its canonical text (what
// its signature covers), with a 32-byte signer, a 64-byte signature, a
// non-empty recipient, and BundleSignedText a prefix of it.
#include <openssl/sha.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/bytes.h"
#include "keystore/bundle.h"

namespace hsmstek::fuzz {
namespace {

void Check(bool ok, const char *what) {
  if (ok) return;
  std::fprintf(stderr, "fuzz_bundle invariant failed: %s\n", what);
  std::abort();
}

void ParseAndCheck(std::string_view text) {
  Result<keystore::Bundle> b = keystore::ParseBundle(text);
  if (!b.ok()) {
    Check(b.status().code() == ErrorCode::kInvalidArgument, "error code");
    Check(!b.status().message().empty(), "error message");
    Check(b.status().message().size() < 600, "message bounded");
    return;
  }
  Check(!b->label.empty(), "label not empty");
  Check(
      !b->wrapped.empty() && b->wrapped.size() <= keystore::kMaxWrappedKeySize,
      "wrapped size");
  Check(keystore::ValidatePolicy(b->policy).ok(), "policy valid");
  Check(b->version == 1 || b->version == 2, "version");
  if (b->version == 2) {
    Check(keystore::SerializeBundle(*b) == text, "v2 is canonical");
    Check(b->signer.size() == keystore::kSignerIdSize, "signer size");
    Check(b->signature.size() == keystore::kBundleSignatureSize,
          "signature size");
    Check(!b->wrapping_key_id.empty(), "recipient present");
    const std::string signed_text = keystore::BundleSignedText(*b);
    Check(text.substr(0, signed_text.size()) == signed_text,
          "signed text is a prefix");
  }
  const std::string canonical = keystore::SerializeBundle(*b);
  Result<keystore::Bundle> again = keystore::ParseBundle(canonical);
  Check(again.ok(), "canonical text parses");
  Check(*again == *b, "round trip");
  Check(keystore::SerializeBundle(*again) == canonical, "fixed point");
}

// Returns `text` without its sha256 or signature line (if any) plus a
// correct sha256 line.
std::string Resign(std::string_view text) {
  size_t cut = text.rfind("sha256 ");
  if (cut == std::string_view::npos) cut = text.rfind("signature ");
  std::string body(text.substr(0, cut));
  if (!body.empty() && body.back() != '\n') body.push_back('\n');
  uint8_t md[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const uint8_t *>(body.data()), body.size(), md);
  return body + "sha256 " + HexEncode(md) + "\n";
}

}  // namespace

int FuzzBundle(const uint8_t *data, size_t size) {
  const std::string_view text(reinterpret_cast<const char *>(data), size);
  ParseAndCheck(text);
  ParseAndCheck(Resign(text));
  return 0;
}

}  // namespace hsmstek::fuzz

#ifdef HSMSTEK_LIBFUZZER
extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  return hsmstek::fuzz::FuzzBundle(data, size);
}
#endif
