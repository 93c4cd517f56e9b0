// The built-in OpenSSL 3 provider "hsmstek" (docs/DESIGN.md).
//
// libssl creates the ticket HMAC context itself, before the ticket callback
// runs, with EVP_MAC_fetch(libctx, "HMAC", propq). The only way to make that
// HMAC run in the token is a provider whose "HMAC" wins the fetch. This
// provider offers two algorithms, both with the property "provider=hsmstek"
// (OpenSSL 3.0 does not add it implicitly):
//
//   HSMSTEK-AES-CBC-PAD (cipher, ticket_cipher.cc)
//     AES-CBC with PKCS#7 padding (CKM_AES_CBC_PAD) on a token key handle.
//     The key arrives as the kKeyRefParam OSSL_PARAM (see key_ref.h); raw
//     key bytes are refused. One-shot per init: the first non-empty update
//     runs C_EncryptInit + C_Encrypt (or C_DecryptInit + C_Decrypt) on the
//     whole input; a second update fails. That is exactly libssl's ticket
//     pattern and costs 2 PKCS#11 calls per ticket instead of 3-4 for a
//     streamed operation. The session is leased only inside that one call,
//     so no token operation ever spans two EVP calls and a context freed at
//     any point leaves nothing half-done on a pooled session.
//     Output shapes follow libssl's buffers: encrypt update writes the whole
//     ciphertext but reports all but the last block, which final reports
//     (16 bytes, at the same place) — libssl's ticket writer cannot take a
//     0-byte final (WPACKET_allocate_bytes asserts len != 0). Decrypt update
//     returns all plaintext (never more than the ciphertext length: libssl's
//     buffer is exactly that long) and final returns 0 bytes.
//
//   HMAC (MAC, ticket_mac.cc)
//     Token mode, when kKeyRefParam is set: HMAC-SHA256 in the token
//     (CKM_SHA256_HMAC). Updates are buffered (at most kMaxTokenMacInput
//     bytes) and final runs C_SignInit + C_Sign. Works with set_params alone
//     (libssl never calls EVP_MAC_init on the ticket HMAC).
//     Raw-key mode, otherwise: every call and parameter is forwarded
//     unchanged to another provider's HMAC, fetched once per provider
//     instance with "provider!=hsmstek" (never ourselves, so no recursion
//     under the process-wide preference; also keeps a FIPS provider's HMAC
//     when that is what the configuration loads). The delegate context is
//     created on first raw-key use, so token-mode contexts (one per ticket)
//     never allocate one. dupctx is supported in both modes.
//
// Fail-soft (opt-in, kFailSoftParam = 1 on the cipher and MAC contexts):
// libssl treats a failing ticket cipher or MAC as fatal for the handshake,
// but a token can fail after the ticket callback returned 1 (token ops run
// lazily, in update/final). With fail-soft, a failed token operation is
// logged and counted (observer) but not raised, and the operation "succeeds"
// with output that carries no data: random bytes for encryption and for the
// MAC (the ticket is unusable: it fails the MAC check later, i.e. a full
// handshake), and for decryption an empty update followed by a final that
// returns 0 (libssl: ticket not decryptable, full handshake). The session
// plaintext never leaves unprotected. Errors that are the caller's (missing
// key-ref, bad lengths, wrong digest) are raised regardless.
//
// Key references: the TokenKeyRef is copied, its magic checked when it is
// set, and its generation compared with the token's (and the leased
// session's) right before the operation: a stale handle fails the operation,
// it is never used.
//
// Errors: every failure (except those fail-soft hides) is raised on the
// OpenSSL error stack through the core's error functions: library
// "hsmstek", reason codes in errors.h, the failing provider function as the
// function name, and for token failures the Status message (PKCS#11
// function and CKR) as data. ERR_print_errors shows e.g.
//   error:40800001:hsmstek:RunOneShot:token operation failed:
//   .../ticket_cipher.cc:259:C_EncryptInit: CKR_KEY_FUNCTION_NOT_PERMITTED
// After every token operation (success or failure) the ref's observer, if
// any, is told.
//
// Routing: scoped with SSL_CTX_new_ex(NULL, kPreferProviderQuery, method),
// or process-wide with EnableProcessWide(). Both need RegisterProvider().
// The provider is registered in the default library context only.
#pragma once

#include <openssl/core.h>
#include <openssl/evp.h>

#include <cstddef>

#include "common/status.h"
#include "provider/key_ref.h"

namespace hsmstek::provider {

// The opt-in fail-soft switch (an int; see above), settable on the cipher
// and the MAC context together with kKeyRefParam.
inline constexpr char kFailSoftParam[] = "hsmstek-fail-soft";

// Largest input the token-mode HMAC buffers (a ticket is far smaller).
inline constexpr size_t kMaxTokenMacInput = 64 * 1024;

// RegisterProvider adds "hsmstek" as a built-in provider of the default
// library context and loads it. Before that it lets OpenSSL activate its
// configured (or fallback "default") providers, since explicitly loading any
// provider disables the implicit fallback; if afterwards no other provider
// offers HMAC, it loads "default" so raw-key HMAC keeps working. Providers
// stay loaded for the life of the process. Idempotent and thread-safe; a
// failed attempt is retried by the next call. Errors: kInternal naming the
// OpenSSL call that failed.
[[nodiscard]] Status RegisterProvider();

// EnableProcessWide registers the provider (see RegisterProvider) and sets
// "?provider=hsmstek" as the default property query of the default library
// context, so every SSL_CTX of the process routes its ticket HMAC to the
// provider. OpenSSL 3.0 cannot read back the current default properties, so
// any other default property set before is replaced.
// WARNING: if "fips=yes" is a default property, nothing is changed and
// kFailedPrecondition is returned: the provider is not FIPS validated, so
// "fips=yes" would exclude it and routing could never work. Idempotent;
// thread-safe with respect to itself.
[[nodiscard]] Status EnableProcessWide();

// IsProviderMac returns true iff `ctx` is an HMAC context implemented by the
// "hsmstek" provider (false for a null ctx). The ticket callback uses it to
// fail closed when routing did not happen. Thread-safe.
bool IsProviderMac(const EVP_MAC_CTX *ctx);

// IsProviderCipher returns true iff `cipher` is implemented by the "hsmstek"
// provider. Thread-safe.
bool IsProviderCipher(const EVP_CIPHER *cipher);

// TicketCipher returns the provider's HSMSTEK-AES-CBC-PAD cipher of the
// default library context, fetched on first success and kept for the life
// of the process (the caller does not own it; do not free). Registers the
// provider if needed. Errors: kFailedPrecondition while "fips=yes" is a
// default property (it excludes this provider), kInternal otherwise.
// Thread-safe.
[[nodiscard]] Result<const EVP_CIPHER *> TicketCipher();

// KeyRefParam returns the OSSL_PARAM that hands `*ref_ptr` to the provider's
// cipher or MAC (an octet string holding the pointer's bytes). The param
// points at `ref_ptr`, which must stay valid until the params are passed to
// OpenSSL; the TokenKeyRef itself is copied by the provider and may die right
// after. Example:
//   const TokenKeyRef* p = &ref;
//   OSSL_PARAM params[] = {KeyRefParam(&p), OSSL_PARAM_construct_end()};
OSSL_PARAM KeyRefParam(const TokenKeyRef *const *ref_ptr);

}  // namespace hsmstek::provider
