#include "tls/session_hooks.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include <cstdint>
#include <cstring>
#include <memory>

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

// OpenSSL makes TLS 1.3 tickets stateful (in-memory, not sealed in the
// token) when early data is on with its anti-replay cache: never let it.
// Runs when the handshake starts (before OpenSSL picks stateful ticket
// lookup for the ClientHello) and again when a ticket is issued.
void GuardEarlyData(TicketContext &context, SSL *ssl) {
  if (SSL_get_max_early_data(ssl) == 0 ||
      (SSL_get_options(ssl) & SSL_OP_NO_ANTI_REPLAY) != 0) {
    return;
  }
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
bool Admissible(const SSL *ssl, SSL_SESSION *session) {
  CtxHooks *hooks = HooksOf(SSL_get_SSL_CTX(ssl));
  if (hooks == nullptr || !PolicyHolds(*hooks, ssl)) return false;
  void *data = nullptr;
  size_t len = 0;
  if (SSL_SESSION_get0_ticket_appdata(session, &data, &len) != 1 ||
      data == nullptr || len == 0) {
    return SSL_SESSION_get0_peer(session) == nullptr &&
           (SSL_get_verify_mode(ssl) & SSL_VERIFY_PEER) == 0;
  }
  return len == kPolicyAppDataLength &&
         std::memcmp(data, kPolicyTag.data(), kPolicyTag.size()) == 0 &&
         CRYPTO_memcmp(static_cast<const uint8_t *>(data) + kPolicyTag.size(),
                       hooks->policy.data(), hooks->policy.size()) == 0;
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
  if (!Admissible(ssl, session)) {
    context->stats->Reject(RejectReason::kPolicy);
    return SSL_TICKET_RETURN_IGNORE_RENEW;
  }
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
    fresh->previous_info_cb = SSL_CTX_get_info_callback(ctx);
    if (SSL_CTX_set_ex_data(ctx, index, fresh.get()) != 1) return false;
    hooks = fresh.release();
  }
  hooks->policy = ComputePolicyDigest(ctx, hooks->declared);
  hooks->fingerprint = FingerprintOf(ctx);
  hooks->drift_logged.store(false);
  SSL_CTX_set_info_callback(ctx, &InfoHook);
  return SSL_CTX_set_session_ticket_cb(ctx, &GenerateTicketHook,
                                       &DecryptTicketHook, nullptr) == 1;
}

}  // namespace hsmstek::tls
