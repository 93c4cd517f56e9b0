#include "tls/ticket_callback.h"

#include <openssl/core_names.h>

#include <cstring>
#include <optional>

#include "common/barrier.h"
#include "common/log.h"
#include "common/log_limit.h"
#include "provider/provider.h"
#include "tls/iv_pool.h"
#include "tls/session_hooks.h"

namespace hsmstek::tls {
namespace {

constexpr long kOneWeekSeconds = 7 * 24 * 3600;
constexpr int kTicketOk = 1;
constexpr int kTicketRenew = 2;
constexpr int kNoTicket = 0;

void FreeContext(void * /*parent*/, void *ptr, CRYPTO_EX_DATA * /*ad*/,
                 int /*idx*/, long /*argl*/, void * /*argp*/) {
  delete static_cast<std::shared_ptr<TicketContext> *>(ptr);
}

int ContextIndex() {
  static const int index =
      SSL_CTX_get_ex_new_index(0, nullptr, nullptr, nullptr, FreeContext);
  return index;
}

TicketContext *ContextOf(SSL *ssl) { return TicketContextOf(ssl); }

// Logs the routing error at most once a minute per context.
void ReportNotRouted(TicketContext &context) {
  context.stats->Reject(RejectReason::kNotRouted);
  int64_t now = context.store->clock().NowUnix();
  int64_t next = context.next_routing_log.load();
  if (now < next ||
      !context.next_routing_log.compare_exchange_strong(next, now + 60)) {
    return;
  }
  log::Error(
      "hsmstek: the ticket HMAC of this SSL_CTX does not come from the "
      "hsmstek provider, so no session tickets are issued or accepted; create "
      "the SSL_CTX with hsmstek_ssl_ctx_new() or call "
      "hsmstek_enable_process_wide() before creating it");
}

// Hands the token key handles to the provider's cipher and HMAC.
// `armed_encrypt` (seal, may be null) is the pre-armed encryption whose IV
// is `iv`.
bool SetUpCipherAndMac(TicketContext &context, const keystore::KeyStore &store,
                       const keystore::TicketKeys &keys,
                       const unsigned char iv[16], EVP_CIPHER_CTX *cipher_ctx,
                       EVP_MAC_CTX *mac_ctx, bool encrypt,
                       std::shared_ptr<provider::ArmedOp> armed_encrypt) {
  Result<const EVP_CIPHER *> cipher = provider::TicketCipher();
  if (!cipher.ok()) {
    log::Error("hsmstek: " + cipher.status().message());
    return false;
  }
  // The handles belong to the token of the member that produced them.
  const std::shared_ptr<p11::Token> &token = store.token();
  provider::TokenKeyRef aes{provider::TokenKeyRef::kMagic,
                            token,
                            keys.aes,
                            keys.generation,
                            context.stats,
                            context.armed,
                            std::move(armed_encrypt),
                            !encrypt};
  provider::TokenKeyRef hmac{provider::TokenKeyRef::kMagic,
                             token,
                             keys.hmac,
                             keys.generation,
                             context.stats,
                             context.armed,
                             nullptr,
                             !encrypt};
  const provider::TokenKeyRef *aes_ptr = &aes;
  const provider::TokenKeyRef *hmac_ptr = &hmac;
  // libssl treats a cipher or HMAC failure after this callback as fatal to
  // the handshake. Fail-soft turns a token fault there into an unusable
  // ticket (random bytes, never plaintext) or an undecryptable one: a full
  // handshake instead of an aborted connection.
  int fail_soft = 1;
  OSSL_PARAM cipher_params[] = {
      provider::KeyRefParam(&aes_ptr),
      OSSL_PARAM_construct_int(provider::kFailSoftParam, &fail_soft),
      OSSL_PARAM_construct_end()};
  OSSL_PARAM mac_params[] = {
      provider::KeyRefParam(&hmac_ptr),
      OSSL_PARAM_construct_int(provider::kFailSoftParam, &fail_soft),
      OSSL_PARAM_construct_end()};
  int ok = encrypt ? EVP_EncryptInit_ex2(cipher_ctx, *cipher, nullptr, iv,
                                         cipher_params)
                   : EVP_DecryptInit_ex2(cipher_ctx, *cipher, nullptr, iv,
                                         cipher_params);
  if (ok != 1 || EVP_MAC_CTX_set_params(mac_ctx, mac_params) != 1) {
    log::Error("hsmstek: setting up the ticket cipher or HMAC failed");
    return false;
  }
  return true;
}

// Caps the lifetime the server advertises for this ticket: the decrypt
// window of the issuing master, and 7 days (RFC 8446 §4.6.1).
void CapLifetime(SSL *ssl, int64_t decrypt_window_s) {
  SSL_SESSION *session = SSL_get0_session(ssl);
  if (session == nullptr) return;
  long cap = kOneWeekSeconds;
  if (decrypt_window_s > 0 && decrypt_window_s < cap) cap = decrypt_window_s;
  if (SSL_SESSION_get_timeout(session) > cap) {
    SSL_SESSION_set_timeout(session, cap);
  }
}

int Seal(SSL *ssl, TicketContext &context, unsigned char key_name[16],
         unsigned char iv[16], EVP_CIPHER_CTX *cipher_ctx,
         EVP_MAC_CTX *mac_ctx) {
  const std::shared_ptr<keystore::KeyStore> store = context.stores->Active();
  Result<keystore::TicketKeys> keys = store->KeysForEncrypt();
  if (!keys.ok()) {
    // Token trouble is every failure that came from the token (any CKR,
    // e.g. CKR_FUNCTION_FAILED from C_DeriveKey, maps to kInternal), not
    // only connection faults; "no active master" is not.
    // A token that cannot be found or logged into is token trouble too.
    const ErrorCode code = keys.status().code();
    if (code == ErrorCode::kUnavailable || code == ErrorCode::kNotFound ||
        code == ErrorCode::kPermissionDenied || keys.status().ckr() != 0) {
      context.stats->TokenError();
      // Logged as an outage (start, once a minute, end), not per handshake.
      context.stores->Served(*store, /*token_trouble=*/true,
                             keys.status().message());
      return kNoTicket;
    }
    // Remote clients drive this path: one message per cause a minute.
    log::EmitLimited(log::Level::kWarning,
                     "seal " + log::CauseOf(keys.status()),
                     "hsmstek: no ticket issued: " + keys.status().message(),
                     store->clock().NowUnix());
    return kNoTicket;
  }
  context.stores->Served(*store, /*token_trouble=*/false, {});
  // A pre-armed encryption brings its own IV (drawn when it was armed, used
  // for this ticket only); without one the IV is drawn now. The pool works
  // on the preferred member's token only.
  std::shared_ptr<provider::ArmedOp> armed;
  if (context.armed != nullptr && store == context.store) {
    context.armed->SetCurrent(keys->aes, keys->hmac, keys->generation);
    std::optional<provider::ArmedOp> op = context.armed->Take(
        provider::ArmedKind::kEncrypt, keys->aes, keys->generation);
    if (op) armed = std::make_shared<provider::ArmedOp>(std::move(*op));
  }
  if (armed != nullptr) {
    std::memcpy(iv, armed->iv().data(), kTicketIvLength);
  } else if (!NextTicketIv(iv)) {
    return kNoTicket;
  }
  std::memcpy(key_name, keys->name.bytes.data(), 16);
  context.stats->BeginSeal();
  if (!SetUpCipherAndMac(context, *store, *keys, iv, cipher_ctx, mac_ctx, true,
                         std::move(armed))) {
    return kNoTicket;
  }
  CapLifetime(ssl, keys->decrypt_window_s);
  return kTicketOk;
}

int Open(SSL *ssl, TicketContext &context, const unsigned char key_name[16],
         const unsigned char iv[16], EVP_CIPHER_CTX *cipher_ctx,
         EVP_MAC_CTX *mac_ctx) {
  keystore::KeyName name;
  std::memcpy(name.bytes.data(), key_name, 16);
  const std::shared_ptr<keystore::KeyStore> store = context.stores->Active();
  keystore::DecryptLookup lookup = store->KeysForDecrypt(name);
  int result;
  switch (lookup.verdict) {
    case keystore::DecryptVerdict::kCurrent:
      result = SSL_version(ssl) == TLS1_3_VERSION && context.options.tls13_renew
                   ? kTicketRenew
                   : kTicketOk;
      break;
    case keystore::DecryptVerdict::kOld:
      result = kTicketRenew;
      break;
    case keystore::DecryptVerdict::kUnknownKey:
      context.stats->Reject(RejectReason::kUnknownKey);
      return kNoTicket;
    case keystore::DecryptVerdict::kExpired:
      context.stats->Reject(RejectReason::kExpired);
      return kNoTicket;
    case keystore::DecryptVerdict::kFuture:
      context.stats->Reject(RejectReason::kFuture);
      return kNoTicket;
    case keystore::DecryptVerdict::kDeclined:
      // Not token trouble: no token error, no outage, no failover.
      context.stats->Reject(RejectReason::kBudget);
      log::EmitLimited(log::Level::kWarning, "open budget " + store->label(),
                       "hsmstek: ticket declined: " + lookup.error.message(),
                       store->clock().NowUnix());
      return kNoTicket;
    case keystore::DecryptVerdict::kUnavailable:
    default:
      context.stats->TokenError();
      // Logged as an outage (start, once a minute, end), not per handshake.
      context.stores->Served(*store, /*token_trouble=*/true,
                             lookup.error.message(), /*seal=*/false);
      return kNoTicket;
  }
  context.stores->Served(*store, /*token_trouble=*/false, {});
  if (context.armed != nullptr && store == context.store &&
      lookup.verdict == keystore::DecryptVerdict::kCurrent) {
    // Keeps the pool on the current epoch with opens only (TLS 1.2
    // resumptions seal nothing).
    context.armed->SetCurrent(lookup.keys.aes, lookup.keys.hmac,
                              lookup.keys.generation);
  }
  context.stats->BeginOpen(result == kTicketRenew);
  if (!SetUpCipherAndMac(context, *store, lookup.keys, iv, cipher_ctx, mac_ctx,
                         false, nullptr)) {
    return kNoTicket;
  }
  return result;
}

}  // namespace

TicketContext *TicketContextOf(SSL_CTX *ctx) {
  if (ctx == nullptr) return nullptr;
  auto *holder = static_cast<std::shared_ptr<TicketContext> *>(
      SSL_CTX_get_ex_data(ctx, ContextIndex()));
  return holder == nullptr ? nullptr : holder->get();
}

TicketContext *TicketContextOf(const SSL *ssl) {
  return TicketContextOf(SSL_get_SSL_CTX(ssl));
}

int TicketKeyCallback(SSL *ssl, unsigned char key_name[16],
                      unsigned char iv[16], EVP_CIPHER_CTX *cipher_ctx,
                      EVP_MAC_CTX *mac_ctx, int encrypt) {
  TicketContext *context = ContextOf(ssl);
  if (context == nullptr) return kNoTicket;
  if (!provider::IsProviderMac(mac_ctx)) {
    ReportNotRouted(*context);
    return kNoTicket;
  }
  return encrypt ? Seal(ssl, *context, key_name, iv, cipher_ctx, mac_ctx)
                 : Open(ssl, *context, key_name, iv, cipher_ctx, mac_ctx);
}

int GuardedTicketKeyCallback(SSL *ssl, unsigned char key_name[16],
                             unsigned char iv[16], EVP_CIPHER_CTX *cipher_ctx,
                             EVP_MAC_CTX *mac_ctx, int encrypt) noexcept {
  try {
    return TicketKeyCallback(ssl, key_name, iv, cipher_ctx, mac_ctx, encrypt);
  } catch (...) {
    // The same outcome as a token error: no ticket issued or accepted, a
    // full handshake. libssl sees no error (it would end the connection).
    barrier::ReportCaught("ticket callback");
    if (TicketContext *context = ContextOf(ssl)) {
      context->stats->TokenError();
      context->stats->OnException();
    }
    return kNoTicket;
  }
}

Status InstallTicketCallback(SSL_CTX *ctx,
                             std::shared_ptr<TicketContext> context) {
  if (ctx == nullptr || !context || !context->stats ||
      (!context->store && !context->stores)) {
    return InvalidArgument("InstallTicketCallback: null argument");
  }
  if (!context->store) context->store = context->stores->primary();
  if (!context->stores) {
    Result<std::shared_ptr<keystore::StoreSet>> one =
        keystore::StoreSet::Of({context->store});
    if (!one.ok()) return one.status();
    context->stores = std::move(*one);
  }
  if (context->options.prearm && context->armed == nullptr) {
    context->armed =
        std::make_shared<provider::ArmedPool>(context->store->token());
  }
  if (SSL_CTX_get_max_early_data(ctx) > 0 &&
      !context->options.allow_early_data) {
    return FailedPrecondition(
        "hsmstek: this SSL_CTX accepts TLS 1.3 early data (0-RTT, "
        "SSL_CTX_set_max_early_data > 0): session tickets sealed in the "
        "token are stateless, so a recorded 0-RTT flight could be replayed "
        "on every server sharing the store; turn early data off or accept "
        "the risk with HSMSTEK_OPT_EARLY_DATA=1 (docs/SECURITY.md)");
  }
  Status registered = provider::RegisterProvider();
  if (!registered.ok()) return registered;
  int index = ContextIndex();
  if (index < 0) return Internal("SSL_CTX_get_ex_new_index failed");
  // Bound to the policy as configured now (nginx installs in its workers,
  // after every server's verification is set up).
  if (!InstallSessionHooks(ctx)) {
    return Internal("SSL_CTX_set_session_ticket_cb failed");
  }
  auto *previous = static_cast<std::shared_ptr<TicketContext> *>(
      SSL_CTX_get_ex_data(ctx, index));
  auto *holder = new std::shared_ptr<TicketContext>(std::move(context));
  if (SSL_CTX_set_ex_data(ctx, index, holder) != 1) {
    delete holder;
    return Internal("SSL_CTX_set_ex_data failed");
  }
  delete previous;
  if ((*holder)->options.allow_early_data) {
    // Keeps TLS 1.3 tickets stateless (sealed in the token) with early
    // data on: OpenSSL's anti-replay cache would make them in-memory ones.
    SSL_CTX_set_options(ctx, SSL_OP_NO_ANTI_REPLAY);
  }
  if (SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, GuardedTicketKeyCallback) !=
      1) {
    return Internal("SSL_CTX_set_tlsext_ticket_key_evp_cb failed");
  }
  if (SSL_CTX_get_timeout(ctx) > kOneWeekSeconds) {
    SSL_CTX_set_timeout(ctx, kOneWeekSeconds);
  }
  return Status::Ok();
}

Status SetDeclaredPolicy(SSL_CTX *ctx, std::span<const uint8_t> declared) {
  CtxHooks *hooks = HooksOf(ctx);
  if (hooks == nullptr || TicketContextOf(ctx) == nullptr) {
    return FailedPrecondition(
        "hsmstek_ssl_ctx_set_policy: no hsmstek store is installed on this "
        "SSL_CTX");
  }
  hooks->declared.assign(declared.begin(), declared.end());
  if (!InstallSessionHooks(ctx)) {
    return Internal("SSL_CTX_set_session_ticket_cb failed");
  }
  return Status::Ok();
}

Result<SSL_CTX *> NewScopedSslCtx(const SSL_METHOD *method,
                                  std::shared_ptr<TicketContext> context) {
  Status registered = provider::RegisterProvider();
  if (!registered.ok()) return registered;
  SSL_CTX *ctx =
      SSL_CTX_new_ex(nullptr, provider::kPreferProviderQuery, method);
  if (ctx == nullptr) return Internal("SSL_CTX_new_ex failed");
  Status installed = InstallTicketCallback(ctx, std::move(context));
  if (!installed.ok()) {
    SSL_CTX_free(ctx);
    return installed;
  }
  return ctx;
}

}  // namespace hsmstek::tls
