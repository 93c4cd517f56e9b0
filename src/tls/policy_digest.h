// The security policy of an SSL_CTX, as a digest that travels inside the
// tickets it issues (ticket app data), so that a ticket only resumes where a
// full handshake would admit the same clients (docs/SECURITY.md, "Tickets
// are bound to the issuing server's policy").
#pragma once

#include <openssl/ssl.h>

#include <array>
#include <cstdint>
#include <span>

namespace hsmstek::tls {

using PolicyDigest = std::array<uint8_t, 32>;

// ComputePolicyDigest hashes (SHA-256, software: public data only) what
// decides whether `ctx` admits a client: verify mode and depth, the verify
// parameters' flags and auth level, the security level, every certificate and
// CRL of its X509_STORE and of its verify store (order-independent), the client
// CA list (in order), and `declared` (application-defined bytes, e.g.
// authorisation rules OpenSSL does not see). Not thread-safe with respect to
// changes of `ctx`.
PolicyDigest ComputePolicyDigest(SSL_CTX *ctx,
                                 std::span<const uint8_t> declared);

// What changes when verification is reconfigured after install, cheap
// enough to compare on every handshake (no hashing, no locks).
struct PolicyFingerprint {
  int verify_mode = 0;
  int verify_depth = 0;
  const void *store = nullptr;
  const void *verify_store = nullptr;
  unsigned long param_flags = 0;
  int auth_level = 0;
  int security_level = 0;
  const void *client_cas = nullptr;
  int client_ca_count = 0;
  bool operator==(const PolicyFingerprint &) const = default;
};

PolicyFingerprint FingerprintOf(SSL_CTX *ctx);

// The ticket app data: a tag and the digest.
inline constexpr std::array<uint8_t, 4> kPolicyTag = {'h', 's', 'p', '1'};
inline constexpr size_t kPolicyAppDataLength = 4 + 32;

}  // namespace hsmstek::tls
