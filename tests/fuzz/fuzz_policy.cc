// Fuzz target: ParsePolicy (text read from the token, or from a bundle).
// Invariants: errors are kInvalidArgument with a message; an accepted
// policy is valid, and serialize -> parse returns it unchanged, with the
// canonical text a fixed point.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "keystore/policy.h"

namespace hsmstek::fuzz {
namespace {

void Check(bool ok, const char *what) {
  if (ok) return;
  std::fprintf(stderr, "fuzz_policy invariant failed: %s\n", what);
  std::abort();
}

}  // namespace

int FuzzPolicy(const uint8_t *data, size_t size) {
  using keystore::Policy;
  const std::string_view text(reinterpret_cast<const char *>(data), size);
  Result<Policy> p = keystore::ParsePolicy(text);
  if (!p.ok()) {
    Check(p.status().code() == ErrorCode::kInvalidArgument, "error code");
    Check(!p.status().message().empty(), "error message");
    Check(p.status().message().size() < 400, "message bounded");
    return 0;
  }
  Check(keystore::ValidatePolicy(*p).ok(), "accepted policy is valid");
  const std::string canonical = keystore::SerializePolicy(*p);
  Result<Policy> again = keystore::ParsePolicy(canonical);
  Check(again.ok(), "canonical text parses");
  Check(*again == *p, "round trip");
  Check(keystore::SerializePolicy(*again) == canonical, "fixed point");
  return 0;
}

}  // namespace hsmstek::fuzz

#ifdef HSMSTEK_LIBFUZZER
extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  return hsmstek::fuzz::FuzzPolicy(data, size);
}
#endif
