// Fuzz target: ParseBundle (files handed between operators and HSMs).
// Each input is parsed twice: as given (which exercises the size, byte,
// header and digest checks), and with its sha256 line replaced by the
// correct digest, so the fuzzer also reaches the field parsers behind the
// digest. Invariants: errors are kInvalidArgument; an accepted bundle
// serializes to text that parses back to the same bundle, and that text is
// a fixed point.
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
  const std::string canonical = keystore::SerializeBundle(*b);
  Result<keystore::Bundle> again = keystore::ParseBundle(canonical);
  Check(again.ok(), "canonical text parses");
  Check(*again == *b, "round trip");
  Check(keystore::SerializeBundle(*again) == canonical, "fixed point");
}

// Returns `text` without its sha256 line (if any) plus a correct one.
std::string Resign(std::string_view text) {
  std::string body(text.substr(0, text.rfind("sha256 ")));
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
