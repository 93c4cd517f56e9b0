#include "tls/session_hooks.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/x509_vfy.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <new>

#include "common/log.h"

namespace hsmstek::tls {
namespace {

// Per-connection: we accepted a ticket in this handshake (1: resume,
// 2: renew). A value in the pointer, no allocation.
int MarkIndex() {
  static const int index =
      SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}

void SetMark(SSL *ssl, uintptr_t mark) {
  int index = MarkIndex();
  if (index >= 0) {
    SSL_set_ex_data(ssl, index, reinterpret_cast<void *>(mark));
  }
}

uintptr_t TakeMark(const SSL *ssl) {
  int index = MarkIndex();
  if (index < 0) return 0;
  auto mark = reinterpret_cast<uintptr_t>(SSL_get_ex_data(ssl, index));
  // ex_data of a const SSL: the setter takes a non-const pointer.
  if (mark != 0) SSL_set_ex_data(const_cast<SSL *>(ssl), index, nullptr);
  return mark;
}

// Per-connection: the policy digest a ticket was admitted under (fix for
// an application switching SSL_CTX after the ticket was opened). Owned by
// the SSL, freed with it.
void FreeChecked(void * /*parent*/, void *ptr, CRYPTO_EX_DATA * /*ad*/,
                 int /*idx*/, long /*argl*/, void * /*argp*/) {
  delete static_cast<PolicyDigest *>(ptr);
}

int CheckedIndex() {
  static const int index =
      SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, FreeChecked);
  return index;
}

// Records `digest` as the one `ssl`'s resumed session was admitted under.
void SetChecked(SSL *ssl, const PolicyDigest &digest) {
  int index = CheckedIndex();
  if (index < 0) return;
  auto *held = static_cast<PolicyDigest *>(SSL_get_ex_data(ssl, index));
  if (held == nullptr) {
    held = new (std::nothrow) PolicyDigest(digest);
    if (held == nullptr || SSL_set_ex_data(ssl, index, held) != 1) {
      delete held;
      return;
    }
  }
  *held = digest;
}

const PolicyDigest *CheckedOf(const SSL *ssl) {
  int index = CheckedIndex();
  return index < 0
             ? nullptr
             : static_cast<const PolicyDigest *>(SSL_get_ex_data(ssl, index));
}

void FreeHooks(void * /*parent*/, void *ptr, CRYPTO_EX_DATA * /*ad*/,
               int /*idx*/, long /*argl*/, void * /*argp*/) {
  delete static_cast<CtxHooks *>(ptr);
}

int HooksIndex() {
  static const int index =
      SSL_CTX_get_ex_new_index(0, nullptr, nullptr, nullptr, FreeHooks);
  return index;
}

// The policy of `ssl`'s SSL_CTX still is what the digest was computed
// from (cheap check: verify mode, depth, store and CA list objects). A
// drift fails closed: no ticket resumes and issued tickets match nothing.
bool PolicyHolds(CtxHooks &hooks, const SSL *ssl) {
  if (FingerprintOf(SSL_get_SSL_CTX(ssl)) == hooks.fingerprint) return true;
  if (!hooks.drift_logged.exchange(true)) {
    log::Error(
        "hsmstek: the verification settings of an SSL_CTX changed after "
        "hsmstek was installed on it; its session tickets no longer resume "
        "(full handshakes) until hsmstek_ssl_ctx_set_policy() or "
        "hsmstek_ssl_ctx_install() is called again");
  }
  return false;
}

// Early data only where the current SSL_CTX opted in: otherwise a recorded
// 0-RTT flight replays on every server sharing the store (with
// SSL_OP_NO_ANTI_REPLAY, which nginx always sets), or OpenSSL makes TLS 1.3
// tickets in-memory ones (without it). The SSL's max_early_data is copied
// from the SSL_CTX it was created with and SSL_set_SSL_CTX keeps it, so a
// server picked by SNI inherits the default server's. Runs when the
// handshake starts, when a ticket is opened (before OpenSSL decides on the
// early data) and when one is issued.
void GuardEarlyData(TicketContext &context, SSL *ssl) {
  if (SSL_get_max_early_data(ssl) == 0) return;
  if (context.options.allow_early_data) {
    SSL_set_options(ssl, SSL_OP_NO_ANTI_REPLAY);
    return;
  }
  SSL_set_max_early_data(ssl, 0);
  if (SSL_SESSION *session = SSL_get_session(ssl)) {
    SSL_SESSION_set_max_early_data(session, 0);
  }
  context.stats->EarlyDataRefused();
  if (!context.early_data_logged.exchange(true)) {
    log::Error(
        "hsmstek: early data (0-RTT) was enabled on an SSL_CTX after hsmstek "
        "was installed, without the early-data option; its tickets carry no "
        "early data (replays would reach every server sharing the store)");
  }
}

// A ticket may resume on `ssl` if it was issued under the same policy. A
// ticket without policy (a legacy key's, or issued before policy binding)
// may resume only where it cannot carry a client-certificate verdict: the
// session has no peer certificate and `ssl` verifies none.
// The connection verifies as its SSL_CTX does: an application may tighten
// one connection (SSL_set_verify, SSL_set_verify_depth,
// SSL_set1_verify_cert_store, SSL_get0_param), which the SSL_CTX's digest
// does not describe. Such a connection resumes nothing (full handshake).
bool VerifiesAsItsCtx(const SSL *ssl) {
  SSL_CTX *ctx = SSL_get_SSL_CTX(ssl);
  SSL *s = const_cast<SSL *>(ssl);  // getters below take a non-const SSL
  X509_STORE *ssl_store = nullptr, *ctx_store = nullptr;
  SSL_get0_verify_cert_store(s, &ssl_store);
  SSL_CTX_get0_verify_cert_store(ctx, &ctx_store);
  const X509_VERIFY_PARAM *sp = SSL_get0_param(s);
  const X509_VERIFY_PARAM *cp = SSL_CTX_get0_param(ctx);
  return SSL_get_verify_mode(ssl) == SSL_CTX_get_verify_mode(ctx) &&
         SSL_get_verify_depth(ssl) == SSL_CTX_get_verify_depth(ctx) &&
         SSL_get_verify_callback(ssl) == SSL_CTX_get_verify_callback(ctx) &&
         ssl_store == ctx_store && sp != nullptr && cp != nullptr &&
         X509_VERIFY_PARAM_get_flags(sp) == X509_VERIFY_PARAM_get_flags(cp) &&
         X509_VERIFY_PARAM_get_auth_level(sp) ==
             X509_VERIFY_PARAM_get_auth_level(cp) &&
         SSL_get_security_level(ssl) == SSL_CTX_get_security_level(ctx);
}

bool Admissible(const SSL *ssl, SSL_SESSION *session, bool *legacy) {
  CtxHooks *hooks = HooksOf(SSL_get_SSL_CTX(ssl));
  if (hooks == nullptr || !PolicyHolds(*hooks, ssl)) return false;
  if (!VerifiesAsItsCtx(ssl)) return false;
  void *data = nullptr;
  size_t len = 0;
  if (SSL_SESSION_get0_ticket_appdata(session, &data, &len) != 1 ||
      data == nullptr || len == 0) {
    *legacy = true;
    return SSL_SESSION_get0_peer(session) == nullptr &&
           (SSL_get_verify_mode(ssl) & SSL_VERIFY_PEER) == 0;
  }
  return len == kPolicyAppDataLength &&
         std::memcmp(data, kPolicyTag.data(), kPolicyTag.size()) == 0 &&
         CRYPTO_memcmp(static_cast<const uint8_t *>(data) + kPolicyTag.size(),
                       hooks->policy.data(), hooks->policy.size()) == 0;
}

// The application switched SSL_CTX (e.g. in its servername callback, which
// OpenSSL runs after the ticket was opened and admitted): a resumed
// session's client verdict must hold under the policy now in force. If not,
// the handshake can no longer become a full one: the verification result
// is set to failed, which applications (nginx) check before trusting a
// client certificate.
bool StillAdmitted(TicketContext &context, SSL *ssl) {
  const PolicyDigest *checked = CheckedOf(ssl);
  CtxHooks *now = HooksOf(SSL_get_SSL_CTX(ssl));
  if (checked != nullptr && now != nullptr && PolicyHolds(*now, ssl) &&
      CRYPTO_memcmp(checked->data(), now->policy.data(), checked->size()) ==
          0) {
    return true;
  }
  SSL_set_verify_result(ssl, X509_V_ERR_APPLICATION_VERIFICATION);
  context.stats->Reject(RejectReason::kPolicy);
  if (!context.switch_logged.exchange(true)) {
    log::Error(
        "hsmstek: a session resumed from a ticket admitted under one "
        "SSL_CTX's policy, then the application switched to an SSL_CTX with "
        "another policy (servername callback?); its client certificate "
        "verification result was set to failed (docs/SECURITY.md)");
  }
  return false;
}

}  // namespace

int GenerateTicketHook(SSL *ssl, void * /*arg*/) noexcept {
  TicketContext *context = TicketContextOf(ssl);
  if (context == nullptr) return 1;
  GuardEarlyData(*context, ssl);
  SSL_SESSION *session = SSL_get_session(ssl);
  if (session == nullptr) return 1;
  uint8_t data[kPolicyAppDataLength];
  std::memcpy(data, kPolicyTag.data(), kPolicyTag.size());
  CtxHooks *hooks = HooksOf(SSL_get_SSL_CTX(ssl));
  if (hooks != nullptr && PolicyHolds(*hooks, ssl)) {
    std::memcpy(data + kPolicyTag.size(), hooks->policy.data(), 32);
  } else if (RAND_bytes(data + kPolicyTag.size(), 32) != 1) {
    std::memset(data + kPolicyTag.size(), 0, 32);
  }
  // Without app data the ticket matches no policy: a full handshake later.
  // Returning 0 would end this handshake.
  (void)SSL_SESSION_set1_ticket_appdata(session, data, sizeof(data));
  return 1;
}

SSL_TICKET_RETURN DecryptTicketHook(SSL *ssl, SSL_SESSION *session,
                                    const unsigned char * /*key_name*/,
                                    size_t /*key_name_len*/,
                                    SSL_TICKET_STATUS status,
                                    void * /*arg*/) noexcept {
  if (TicketContext *context = TicketContextOf(ssl)) {
    GuardEarlyData(*context, ssl);
  }
  switch (status) {
    case SSL_TICKET_SUCCESS:
    case SSL_TICKET_SUCCESS_RENEW:
      break;
    case SSL_TICKET_EMPTY:
    case SSL_TICKET_NO_DECRYPT:
    default:
      // OpenSSL's own behaviour without this hook.
      return SSL_TICKET_RETURN_IGNORE_RENEW;
  }
  const bool renew = status == SSL_TICKET_SUCCESS_RENEW;
  TicketContext *context = TicketContextOf(ssl);
  if (context == nullptr || session == nullptr) {
    return SSL_TICKET_RETURN_IGNORE_RENEW;
  }
  bool legacy = false;
  if (!Admissible(ssl, session, &legacy)) {
    context->stats->Reject(RejectReason::kPolicy);
    return SSL_TICKET_RETURN_IGNORE_RENEW;
  }
  // Admissible() found hooks on this SSL_CTX.
  CtxHooks *hooks = HooksOf(SSL_get_SSL_CTX(ssl));
  if (legacy) {
    // Sealed before install changed the session id context (an imported
    // nginx key's ticket, or an older hsmstek's): it carries the old one,
    // which OpenSSL would refuse. Admissible() has vetted it (no client
    // verdict in it or wanted here); give it ours.
    (void)SSL_SESSION_set1_id_context(session, hooks->sid_ctx.data(),
                                      hooks->sid_ctx_length);
  }
  SetChecked(ssl, hooks->policy);
  SetMark(ssl, renew ? 2 : 1);
  return renew ? SSL_TICKET_RETURN_USE_RENEW : SSL_TICKET_RETURN_USE;
}

void InfoHook(const SSL *ssl, int where, int ret) noexcept {
  if (TicketContext *context = TicketContextOf(ssl)) {
    if ((where & SSL_CB_HANDSHAKE_START) != 0) {
      (void)TakeMark(ssl);
      // The SSL is ours to adjust here; the callback's type is const.
      if (SSL_is_server(ssl)) GuardEarlyData(*context, const_cast<SSL *>(ssl));
    }
    if ((where & SSL_CB_HANDSHAKE_DONE) != 0) {
      uintptr_t mark = TakeMark(ssl);
      if (mark != 0 && SSL_session_reused(ssl) == 1 &&
          !StillAdmitted(*context, const_cast<SSL *>(ssl))) {
        mark = 0;
      }
      if (mark != 0) {
        context->stats->HandshakeDone(SSL_session_reused(ssl) == 1, mark == 2);
      }
    }
  }
  CtxHooks *hooks = HooksOf(SSL_get_SSL_CTX(ssl));
  if (hooks != nullptr && hooks->previous_info_cb != nullptr) {
    hooks->previous_info_cb(ssl, where, ret);
  }
}

namespace {

// SHA-256 of the policy digest and the DER of every server certificate of
// `ctx`: nginx's own session id context hashes the certificates too, so
// servers with other certificates still keep their sessions apart.
bool BindSessionIdContext(SSL_CTX *ctx, CtxHooks &hooks) {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> md(EVP_MD_CTX_new(),
                                                             &EVP_MD_CTX_free);
  if (!md || EVP_DigestInit_ex(md.get(), EVP_sha256(), nullptr) != 1) {
    return false;
  }
  static constexpr char kLabel[] = "hsmstek sid ctx v1";
  EVP_DigestUpdate(md.get(), kLabel, sizeof(kLabel));
  EVP_DigestUpdate(md.get(), hooks.policy.data(), hooks.policy.size());
  X509 *current = SSL_CTX_get0_certificate(ctx);
  for (long more = SSL_CTX_set_current_cert(ctx, SSL_CERT_SET_FIRST); more == 1;
       more = SSL_CTX_set_current_cert(ctx, SSL_CERT_SET_NEXT)) {
    unsigned char *der = nullptr;
    int len = i2d_X509(SSL_CTX_get0_certificate(ctx), &der);
    if (len > 0) EVP_DigestUpdate(md.get(), der, static_cast<size_t>(len));
    OPENSSL_free(der);
  }
  // Leave the "current" certificate where it was.
  for (long more = SSL_CTX_set_current_cert(ctx, SSL_CERT_SET_FIRST);
       more == 1 && SSL_CTX_get0_certificate(ctx) != current;
       more = SSL_CTX_set_current_cert(ctx, SSL_CERT_SET_NEXT)) {
  }
  unsigned char sid[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(md.get(), sid, &len) != 1 ||
      len > hooks.sid_ctx.size()) {
    return false;
  }
  std::memcpy(hooks.sid_ctx.data(), sid, len);
  hooks.sid_ctx_length = len;
  return SSL_CTX_set_session_id_context(ctx, sid, len) == 1;
}

}  // namespace

CtxHooks *HooksOf(SSL_CTX *ctx) {
  int index = HooksIndex();
  if (ctx == nullptr || index < 0) return nullptr;
  return static_cast<CtxHooks *>(SSL_CTX_get_ex_data(ctx, index));
}

bool InstallSessionHooks(SSL_CTX *ctx) {
  int index = HooksIndex();
  if (index < 0) return false;
  CtxHooks *hooks = HooksOf(ctx);
  if (hooks == nullptr) {
    auto fresh = std::make_unique<CtxHooks>();
    if (SSL_CTX_set_ex_data(ctx, index, fresh.get()) != 1) return false;
    hooks = fresh.release();
  }
  hooks->policy = ComputePolicyDigest(ctx, hooks->declared);
  hooks->fingerprint = FingerprintOf(ctx);
  hooks->drift_logged.store(false);
  // OpenSSL refuses a session (id or ticket, TLS 1.2 and 1.3) whose id
  // context differs: a shared session cache cannot carry a session across
  // policies either. SSL_set_SSL_CTX copies the new SSL_CTX's id context.
  if (!BindSessionIdContext(ctx, *hooks)) return false;
  // A callback set after our previous install is the application's: chain
  // to it (never to ourselves).
  void (*current)(const SSL *, int, int) = SSL_CTX_get_info_callback(ctx);
  if (current != &InfoHook) hooks->previous_info_cb = current;
  SSL_CTX_set_info_callback(ctx, &InfoHook);
  return SSL_CTX_set_session_ticket_cb(ctx, &GenerateTicketHook,
                                       &DecryptTicketHook, nullptr) == 1;
}

}  // namespace hsmstek::tls
