// Fuzz target: ParseLegacyKeyFile (operator-supplied nginx / HAProxy key
// files). The first input byte picks the format (even: nginx, odd:
// haproxy); the rest is the file. Invariants: accepted keys satisfy every
// documented rule, an nginx file is exactly its one key's bytes, and
// HAProxy keys re-encoded as a file parse back to the same keys.
#include <openssl/crypto.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/bytes.h"
#include "keystore/bundle.h"
#include "keystore/legacy_file.h"

namespace hsmstek::fuzz {
namespace {

void Check(bool ok, const char *what) {
  if (ok) return;
  std::fprintf(stderr, "fuzz_legacy_file invariant failed: %s\n", what);
  std::abort();
}

bool AllSame(ByteSpan b) {
  for (uint8_t x : b) {
    if (x != b[0]) return false;
  }
  return true;
}

}  // namespace

int FuzzLegacyFile(const uint8_t *data, size_t size) {
  using keystore::LegacyFormat;
  using keystore::LegacyKey;
  if (size == 0) return 0;
  const LegacyFormat format =
      data[0] % 2 == 0 ? LegacyFormat::kNginx : LegacyFormat::kHaproxy;
  const ByteSpan file(data + 1, size - 1);
  Result<std::vector<LegacyKey>> keys =
      keystore::ParseLegacyKeyFile(format, file);
  if (!keys.ok()) {
    Check(keys.status().code() == ErrorCode::kInvalidArgument, "error code");
    Check(!keys.status().message().empty(), "error message");
    Check(keys.status().message().size() < 200, "message bounded");
    return 0;
  }
  Check(!keys->empty(), "at least one key");
  for (size_t i = 0; i < keys->size(); ++i) {
    const LegacyKey &k = (*keys)[i];
    const size_t n = k.aes_key.size();
    Check(n == 16 || n == 32, "AES key size");
    Check(k.hmac_key.size() == n, "HMAC key size");
    Check(!AllSame(k.name) || k.name[0] != 0, "name not zero");
    Check(!AllSame(k.aes_key.span()), "AES key not repeated");
    Check(!AllSame(k.hmac_key.span()), "HMAC key not repeated");
    Check(CRYPTO_memcmp(k.aes_key.data(), k.hmac_key.data(), n) != 0,
          "AES != HMAC");
    for (size_t j = 0; j < i; ++j) {
      Check((*keys)[j].name != k.name, "names unique");
    }
  }

  if (format == LegacyFormat::kNginx) {
    Check(keys->size() == 1, "nginx: one key");
    const LegacyKey &k = (*keys)[0];
    const bool large = k.aes_key.size() == 32;
    SecretBuffer rebuilt(16 + 2 * k.aes_key.size());
    std::copy(k.name.begin(), k.name.end(), rebuilt.data());
    const SecretBuffer &first = large ? k.hmac_key : k.aes_key;
    const SecretBuffer &second = large ? k.aes_key : k.hmac_key;
    std::copy(first.data(), first.data() + first.size(), rebuilt.data() + 16);
    std::copy(second.data(), second.data() + second.size(),
              rebuilt.data() + 16 + first.size());
    Check(rebuilt.size() == file.size() &&
              CRYPTO_memcmp(rebuilt.data(), file.data(), file.size()) == 0,
          "nginx: file is name||key||key");
    return 0;
  }

  // Lines joined by '\n' without a final one: never longer than the input,
  // so never over kMaxLegacyKeyFileSize.
  std::string text;
  for (const LegacyKey &k : *keys) {
    if (!text.empty()) text.push_back('\n');
    SecretBuffer record(16 + 2 * k.aes_key.size());
    std::copy(k.name.begin(), k.name.end(), record.data());
    std::copy(k.aes_key.data(), k.aes_key.data() + k.aes_key.size(),
              record.data() + 16);
    std::copy(k.hmac_key.data(), k.hmac_key.data() + k.hmac_key.size(),
              record.data() + 16 + k.aes_key.size());
    text += keystore::Base64Encode(record.span());
  }
  Result<std::vector<LegacyKey>> again = keystore::ParseLegacyKeyFile(
      format,
      ByteSpan(reinterpret_cast<const uint8_t *>(text.data()), text.size()));
  Check(again.ok() && again->size() == keys->size(), "haproxy: re-parse");
  for (size_t i = 0; i < keys->size(); ++i) {
    const LegacyKey &a = (*keys)[i];
    const LegacyKey &b = (*again)[i];
    Check(a.name == b.name &&
              ConstantTimeEqual(a.aes_key.span(), b.aes_key.span()) &&
              ConstantTimeEqual(a.hmac_key.span(), b.hmac_key.span()),
          "haproxy: same keys");
  }
  OPENSSL_cleanse(text.data(), text.size());
  return 0;
}

}  // namespace hsmstek::fuzz

#ifdef HSMSTEK_LIBFUZZER
extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  return hsmstek::fuzz::FuzzLegacyFile(data, size);
}
#endif
