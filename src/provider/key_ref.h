// How the ticket callback hands a token key to the hsmstek provider.
//
// The callback sets OSSL_PARAM kKeyRefParam on the cipher and MAC contexts:
// an octet string holding the bytes of a `const TokenKeyRef*`. The provider
// copies the TokenKeyRef (so the caller's object may die right after) and
// checks `magic`. No key bytes are ever involved: only a handle valid for
// one token generation.
#pragma once

#include <cstdint>
#include <memory>

#include "pkcs11/ck.h"
#include "pkcs11/token.h"

namespace hsmstek::provider {

// The provider's name, and the property query that routes to it.
inline constexpr char kProviderName[] = "hsmstek";
inline constexpr char kPreferProviderQuery[] = "?provider=hsmstek";
// Our cipher's name: deliberately not "AES-256-CBC" so TLS record ciphers
// never route to it. AES-CBC with PKCS#7 padding; the key size is the token
// key's (32 bytes for derived keys, 16 for 48-byte legacy keys).
inline constexpr char kCipherName[] = "HSMSTEK-AES-CBC-PAD";
inline constexpr char kMacName[] = "HMAC";
inline constexpr char kKeyRefParam[] = "hsmstek-key-ref";

class ArmedPool;
class ArmedOp;

// The token operations the provider reports to an observer.
enum class TokenOp : uint8_t { kEncrypt, kDecrypt, kSign };

// Told when a token operation finished, on the thread that ran it. Used by
// the TLS layer for latency and error counters. Must be thread-safe.
class TokenOpObserver {
 public:
  virtual ~TokenOpObserver() = default;
  virtual void OnTokenOp(TokenOp op, bool ok) = 0;
  // An exception was stopped at a barrier while working for this ref's
  // owner (also reported as a failed operation when one was running).
  virtual void OnException() noexcept {}
  // How many token calls `op` made on the calling (handshake) thread and
  // how long they took; `for_open` when it served a ticket being opened.
  virtual void OnTokenCalls(TokenOp /*op*/, bool /*for_open*/,
                            unsigned /*calls*/, uint64_t /*ns*/) {}
};

struct TokenKeyRef {
  static constexpr uint64_t kMagic = 0x6873746b6b657931;  // "hstkkey1"

  uint64_t magic = kMagic;
  std::shared_ptr<p11::Token> token;
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  // The token generation the handle belongs to; a mismatch means the
  // token reconnected and the handle is stale: the operation fails.
  uint64_t generation = 0;
  std::shared_ptr<TokenOpObserver> observer;  // may be null
  // Pre-armed operations for this key's epoch (armed_pool.h); null: every
  // operation is initialised on demand.
  std::shared_ptr<ArmedPool> pool;
  // Seal only: the armed encryption whose IV the callback gave libssl. The
  // cipher uses it if its IV is that one, else it is cancelled.
  std::shared_ptr<ArmedOp> armed_encrypt;
  bool for_open = false;  // reported to the observer
};

}  // namespace hsmstek::provider
