// HMAC with two modes in one implementation:
// - token mode (kKeyRefParam set): HMAC-SHA256 in the token on a key handle;
//   updates are buffered, final runs C_SignInit + C_Sign, or only C_Sign on
//   a pre-armed session (armed_pool.h);
// - raw-key mode (anything else): every call is forwarded unchanged to a
//   delegate context of another provider's HMAC, through that provider's
//   own functions (DelegateMac: no second EVP layer). Under the process-wide
//   preference every HMAC of the process takes this path, so it only adds a
//   few param lookups and an indirect call per call.
// The delegate is created lazily, on the first call that needs it: libssl
// creates a fresh HMAC context for every ticket and only ever uses it in
// token mode, so a ticket costs no delegate allocation (docs/BENCHMARKS.md).
// The delegate still sees every parameter it could act on: set_params calls
// made only of our own parameters (key-ref, fail-soft), which it would
// ignore anyway, are the only ones it may miss.
#include "provider/ticket_mac.h"

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include <array>
#include <cstring>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "pkcs11/token.h"
#include "provider/armed_pool.h"
#include "provider/key_ref.h"
#include "provider/provider.h"
#include "provider/provider_context.h"
#include "provider/token_op.h"

namespace hsmstek::provider::internal {
namespace {

constexpr size_t kSha256Size = 32;
constexpr size_t kSha256BlockSize = 64;

// Owns a context of the delegate provider's HMAC.
class DelegateCtx {
 public:
  DelegateCtx() = default;
  DelegateCtx(const DelegateMac *functions, void *ctx)
      : functions_(functions), ctx_(ctx) {}
  DelegateCtx(DelegateCtx &&other) noexcept
      : functions_(other.functions_), ctx_(other.ctx_) {
    other.ctx_ = nullptr;
  }
  DelegateCtx &operator=(DelegateCtx &&other) noexcept {
    std::swap(functions_, other.functions_);
    std::swap(ctx_, other.ctx_);
    return *this;
  }
  ~DelegateCtx() {
    if (ctx_ != nullptr) functions_->freectx(ctx_);
  }
  DelegateCtx(const DelegateCtx &) = delete;
  DelegateCtx &operator=(const DelegateCtx &) = delete;

  explicit operator bool() const { return ctx_ != nullptr; }
  const DelegateMac &functions() const { return *functions_; }
  void *get() const { return ctx_; }
  DelegateCtx Dup() const {
    return DelegateCtx(functions_, functions_->dupctx(ctx_));
  }

 private:
  const DelegateMac *functions_ = nullptr;
  void *ctx_ = nullptr;
};

struct MacCtx {
  explicit MacCtx(ProviderContext *p) : prov(p) {}

  ProviderContext *prov;
  DelegateCtx delegate;  // empty until first needed (EnsureDelegate)
  bool token_mode = false;
  TokenKeyRef ref;            // valid in token mode
  std::vector<uint8_t> data;  // token mode: input buffered until final
  // The last digest name set ("" = none, i.e. SHA-256). Checked only in
  // token mode, at final, so raw-key mode pays nothing but the copy.
  std::array<char, 64> digest{};
  bool digest_too_long = false;
  bool fail_soft = false;  // kFailSoftParam
  // An update could not buffer its input (an exception): final then fails
  // soft like a token error instead of failing libssl's connection.
  bool input_lost = false;
};

OSSL_FUNC_mac_newctx_fn MacNewCtx;
OSSL_FUNC_mac_dupctx_fn MacDupCtx;
OSSL_FUNC_mac_freectx_fn MacFreeCtx;
OSSL_FUNC_mac_init_fn MacInit;
OSSL_FUNC_mac_update_fn MacUpdate;
OSSL_FUNC_mac_final_fn MacFinal;
OSSL_FUNC_mac_get_ctx_params_fn MacGetCtxParams;
OSSL_FUNC_mac_gettable_ctx_params_fn MacGettableCtxParams;
OSSL_FUNC_mac_set_ctx_params_fn MacSetCtxParams;
OSSL_FUNC_mac_settable_ctx_params_fn MacSettableCtxParams;

void *MacNewCtx(void *provctx) {
  return new (std::nothrow) MacCtx(static_cast<ProviderContext *>(provctx));
}

// Creates the delegate context on first need. False if no other provider
// offers HMAC (DelegateHmac raised kNoDelegate) or allocation failed.
bool EnsureDelegate(MacCtx *ctx) {
  if (ctx->delegate) return true;
  const DelegateMac *functions = ctx->prov->DelegateHmac();
  if (functions == nullptr) return false;
  ctx->delegate = DelegateCtx(functions, functions->newctx(functions->provctx));
  return bool(ctx->delegate);
}

// True if `params` holds anything besides our own key-ref and fail-soft
// parameters, i.e. something the delegate must see.
bool HasDelegateParams(const OSSL_PARAM params[]) {
  for (const OSSL_PARAM *p = params; p->key != nullptr; ++p) {
    if (std::strcmp(p->key, kKeyRefParam) != 0 &&
        std::strcmp(p->key, kFailSoftParam) != 0) {
      return true;
    }
  }
  return false;
}

void MacFreeCtx(void *vctx) { delete static_cast<MacCtx *>(vctx); }

// Mandatory: libssl duplicates HMAC contexts (TLS 1.3 binders, TLS 1.2
// record MAC and PRF).
void *MacDupCtx(void *vsrc) {
  const auto *src = static_cast<const MacCtx *>(vsrc);
  DelegateCtx delegate;
  if (src->delegate) {
    delegate = src->delegate.Dup();
    if (!delegate) return nullptr;
  }
  auto *dst = new (std::nothrow) MacCtx(src->prov);
  if (dst == nullptr) return nullptr;
  dst->delegate = std::move(delegate);
  dst->token_mode = src->token_mode;
  dst->ref = src->ref;
  dst->data = src->data;
  dst->digest = src->digest;
  dst->digest_too_long = src->digest_too_long;
  dst->fail_soft = src->fail_soft;
  dst->input_lost = src->input_lost;
  return dst;
}

// Remembers the digest name for the token-mode check at final.
bool RecordDigest(MacCtx *ctx, const OSSL_PARAM &param) {
  const char *name = nullptr;
  if (!OSSL_PARAM_get_utf8_string_ptr(&param, &name)) return false;
  size_t len = std::strlen(name);
  ctx->digest_too_long = len >= ctx->digest.size();
  if (!ctx->digest_too_long) std::memcpy(ctx->digest.data(), name, len + 1);
  return true;
}

// Forwards `params` to the delegate (which ignores our key-ref param) and
// switches mode: a key-ref selects token mode, a raw key raw-key mode. Both
// restart the MAC, as a new key does in any HMAC.
int MacSetCtxParams(void *vctx, const OSSL_PARAM params[]) {
  auto *ctx = static_cast<MacCtx *>(vctx);
  if (params == nullptr) return 1;  // EVP_MAC_CTX_set_params(ctx, NULL)
  const OSSL_PARAM *ref_param = OSSL_PARAM_locate_const(params, kKeyRefParam);
  const OSSL_PARAM *key_param =
      OSSL_PARAM_locate_const(params, OSSL_MAC_PARAM_KEY);
  if (ref_param != nullptr && key_param != nullptr) {
    ctx->prov->RaiseError(
        ProviderReason::kConflictingKeys,
        "both a raw key and " + std::string(kKeyRefParam) + " given");
    return 0;
  }
  TokenKeyRef ref;
  if (ref_param != nullptr && !ParseKeyRef(*ctx->prov, *ref_param, &ref)) {
    return 0;
  }
  // A token-mode set-up (key-ref and fail-soft only) needs no delegate; once
  // one exists it sees every call, as before.
  if (ctx->delegate || HasDelegateParams(params)) {
    if (!EnsureDelegate(ctx) || !ctx->delegate.functions().set_ctx_params(
                                    ctx->delegate.get(), params)) {
      return 0;
    }
  }
  if (const OSSL_PARAM *p =
          OSSL_PARAM_locate_const(params, OSSL_MAC_PARAM_DIGEST)) {
    if (!RecordDigest(ctx, *p)) return 0;
  }
  if (const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, kFailSoftParam)) {
    if (!ParseFailSoft(*p, &ctx->fail_soft)) return 0;
  }
  if (ref_param != nullptr) {
    ctx->token_mode = true;
    ctx->ref = std::move(ref);
    ctx->data.clear();
    ctx->input_lost = false;
  } else if (key_param != nullptr) {
    ctx->token_mode = false;
    ctx->ref = TokenKeyRef();
    ctx->data.clear();
  }
  return 1;
}

int MacInit(void *vctx, const unsigned char *key, size_t keylen,
            const OSSL_PARAM params[]) {
  auto *ctx = static_cast<MacCtx *>(vctx);
  if (!MacSetCtxParams(ctx, params)) return 0;
  if (key != nullptr) {
    ctx->token_mode = false;
    ctx->ref = TokenKeyRef();
    ctx->data.clear();
    if (!EnsureDelegate(ctx)) return 0;
    return ctx->delegate.functions().init(ctx->delegate.get(), key, keylen,
                                          nullptr);
  }
  if (ctx->token_mode) {
    ctx->data.clear();
    ctx->input_lost = false;
    return 1;
  }
  if (!EnsureDelegate(ctx)) return 0;
  return ctx->delegate.functions().init(ctx->delegate.get(), nullptr, 0,
                                        nullptr);
}

int MacUpdate(void *vctx, const unsigned char *in, size_t inl) {
  auto *ctx = static_cast<MacCtx *>(vctx);
  if (!ctx->token_mode) {
    if (!EnsureDelegate(ctx)) return 0;
    return ctx->delegate.functions().update(ctx->delegate.get(), in, inl);
  }
  if (inl > kMaxTokenMacInput - ctx->data.size()) {
    ctx->prov->RaiseError(ProviderReason::kInvalidLength,
                          "token HMAC input exceeds " +
                              std::to_string(kMaxTokenMacInput) + " bytes");
    return 0;
  }
  try {
    seam::Hit(seam::Point::kTokenMacInput);
    ctx->data.insert(ctx->data.end(), in, in + inl);
  } catch (...) {
    // Failing here would make libssl end the connection; with fail-soft
    // the MAC is unusable instead (a full handshake), and counted.
    if (!ctx->fail_soft) throw;  // the dispatch barrier raises the error
    (void)CaughtAsStatus(ctx->ref, "MacUpdate");
    ctx->input_lost = true;
  }
  return 1;
}

// The token only does HMAC-SHA256; any other requested digest is an error,
// never silently replaced.
bool IsSha256(const ProviderContext &prov, const char *name) {
  // The names libssl and applications use, without a fetch per ticket.
  for (const char *common : {"SHA256", "SHA2-256", "SHA-256"}) {
    if (OPENSSL_strcasecmp(name, common) == 0) return true;
  }
  // Any other alias (e.g. the OID): ask OpenSSL; a failed fetch is only an
  // answer here, so its error is dropped.
  ERR_set_mark();
  EVP_MD *md = EVP_MD_fetch(prov.libctx(), name, "provider!=hsmstek");
  ERR_pop_to_mark();
  bool sha256 = md != nullptr && EVP_MD_is_a(md, "SHA2-256");
  EVP_MD_free(md);
  return sha256;
}

bool CheckTokenDigest(const MacCtx &ctx) {
  if (ctx.digest[0] == '\0' && !ctx.digest_too_long) return true;
  bool sha256 = !ctx.digest_too_long && IsSha256(*ctx.prov, ctx.digest.data());
  if (!sha256) {
    ctx.prov->RaiseError(
        ProviderReason::kUnsupportedDigest,
        "token HMAC supports only SHA-256, not " +
            std::string(ctx.digest_too_long ? "a digest with a long name"
                                            : ctx.digest.data()));
  }
  return sha256;
}

// C_Sign on a session whose C_SignInit already ran.
Status SignOnArmed(p11::Session &session, std::vector<uint8_t> &data,
                   unsigned char *out, CK_ULONG *out_len) {
  static unsigned char empty = 0;  // some modules reject a null pData
  return P11_CALL(session, C_Sign, session.handle(),
                  data.empty() ? &empty : data.data(),
                  static_cast<CK_ULONG>(data.size()), out, out_len);
}

Status TokenSign(p11::Session &session, const TokenKeyRef &ref,
                 std::vector<uint8_t> &data, unsigned char *out,
                 CK_ULONG *out_len) {
  CK_MECHANISM mechanism{CKM_SHA256_HMAC, nullptr, 0};
  Status status =
      P11_CALL(session, C_SignInit, session.handle(), &mechanism, ref.handle);
  if (!status.ok()) return status;
  return SignOnArmed(session, data, out, out_len);
}

int MacFinal(void *vctx, unsigned char *out, size_t *outl, size_t outsize) {
  auto *ctx = static_cast<MacCtx *>(vctx);
  if (!ctx->token_mode) {
    if (!EnsureDelegate(ctx)) return 0;
    return ctx->delegate.functions().final(ctx->delegate.get(), out, outl,
                                           outsize);
  }
  if (outsize < kSha256Size) {
    ctx->prov->RaiseError(
        ProviderReason::kInvalidLength,
        "MAC output buffer of " + std::to_string(outsize) + " bytes, need 32");
    return 0;
  }
  if (!CheckTokenDigest(*ctx)) return 0;
  CK_ULONG produced = kSha256Size;
  const FailureMode mode =
      ctx->fail_soft ? FailureMode::kSoft : FailureMode::kRaise;
  // A pre-armed C_SignInit on this key (the current epoch's) makes the MAC
  // one token call; other epochs initialise on demand.
  std::optional<ArmedOp> armed;
  if (ctx->ref.pool != nullptr) {
    armed = ctx->ref.pool->Take(ArmedKind::kSign, ctx->ref.handle,
                                ctx->ref.generation);
  }
  bool ok;
  if (ctx->input_lost) {
    ok = false;  // counted when the update failed; the armed op is cancelled
  } else if (armed) {
    ok = RunArmedTokenOp(*ctx->prov, ctx->ref, TokenOp::kSign, mode, *armed,
                         [&](p11::Session &session) {
                           return SignOnArmed(session, ctx->data, out,
                                              &produced);
                         });
    if (ok) armed->MarkClean();
  } else {
    ok = RunTokenOp(
        *ctx->prov, ctx->ref, TokenOp::kSign, mode, [&](p11::Session &session) {
          return TokenSign(session, ctx->ref, ctx->data, out, &produced);
        });
  }
  ctx->data.clear();  // the next update starts a new MAC under the same key
  ctx->input_lost = false;
  if (!ok) {
    // Fail-soft: a MAC that matches nothing (see provider.h).
    if (!ctx->fail_soft || !FillRandom(*ctx->prov, out, kSha256Size)) return 0;
    produced = kSha256Size;
  }
  *outl = produced;
  return 1;
}

int MacGetCtxParams(void *vctx, OSSL_PARAM params[]) {
  auto *ctx = static_cast<MacCtx *>(vctx);
  if (params == nullptr) return 1;
  if (!ctx->token_mode) {
    if (!EnsureDelegate(ctx)) return 0;
    return ctx->delegate.functions().get_ctx_params(ctx->delegate.get(),
                                                    params);
  }
  // Read before final (EVP_MAC_final sizes the output with it).
  OSSL_PARAM *p = OSSL_PARAM_locate(params, OSSL_MAC_PARAM_SIZE);
  if (p != nullptr && !OSSL_PARAM_set_size_t(p, kSha256Size)) return 0;
  p = OSSL_PARAM_locate(params, OSSL_MAC_PARAM_BLOCK_SIZE);
  if (p != nullptr && !OSSL_PARAM_set_size_t(p, kSha256BlockSize)) return 0;
  return 1;
}

const OSSL_PARAM *MacGettableCtxParams(void * /*ctx*/, void * /*provctx*/) {
  static const OSSL_PARAM kParams[] = {
      OSSL_PARAM_size_t(OSSL_MAC_PARAM_SIZE, nullptr),
      OSSL_PARAM_size_t(OSSL_MAC_PARAM_BLOCK_SIZE, nullptr), OSSL_PARAM_END};
  return kParams;
}

// Mirrors the default provider's HMAC (OpenSSL 3.0) plus our key-ref. Must
// answer for a null ctx: EVP_Q_mac looks for "digest" here.
const OSSL_PARAM *MacSettableCtxParams(void * /*ctx*/, void * /*provctx*/) {
  static const OSSL_PARAM kParams[] = {
      OSSL_PARAM_utf8_string(OSSL_MAC_PARAM_DIGEST, nullptr, 0),
      OSSL_PARAM_utf8_string(OSSL_MAC_PARAM_PROPERTIES, nullptr, 0),
      OSSL_PARAM_octet_string(OSSL_MAC_PARAM_KEY, nullptr, 0),
      OSSL_PARAM_int(OSSL_MAC_PARAM_DIGEST_NOINIT, nullptr),
      OSSL_PARAM_int(OSSL_MAC_PARAM_DIGEST_ONESHOT, nullptr),
      OSSL_PARAM_size_t(OSSL_MAC_PARAM_TLS_DATA_SIZE, nullptr),
      OSSL_PARAM_octet_string(kKeyRefParam, nullptr, 0),
      OSSL_PARAM_int(kFailSoftParam, nullptr),
      OSSL_PARAM_END};
  return kParams;
}

}  // namespace

const OSSL_DISPATCH *TicketMacFunctions() {
  static const OSSL_DISPATCH kFunctions[] = {
      DispatchEntry<OSSL_FUNC_mac_newctx_fn, MacNewCtx>(OSSL_FUNC_MAC_NEWCTX),
      DispatchEntry<OSSL_FUNC_mac_dupctx_fn, MacDupCtx>(OSSL_FUNC_MAC_DUPCTX),
      DispatchEntry<OSSL_FUNC_mac_freectx_fn, MacFreeCtx>(
          OSSL_FUNC_MAC_FREECTX),
      DispatchEntry<OSSL_FUNC_mac_init_fn, MacInit>(OSSL_FUNC_MAC_INIT),
      DispatchEntry<OSSL_FUNC_mac_update_fn, MacUpdate>(OSSL_FUNC_MAC_UPDATE),
      DispatchEntry<OSSL_FUNC_mac_final_fn, MacFinal>(OSSL_FUNC_MAC_FINAL),
      DispatchEntry<OSSL_FUNC_mac_get_ctx_params_fn, MacGetCtxParams>(
          OSSL_FUNC_MAC_GET_CTX_PARAMS),
      DispatchEntry<OSSL_FUNC_mac_gettable_ctx_params_fn, MacGettableCtxParams>(
          OSSL_FUNC_MAC_GETTABLE_CTX_PARAMS),
      DispatchEntry<OSSL_FUNC_mac_set_ctx_params_fn, MacSetCtxParams>(
          OSSL_FUNC_MAC_SET_CTX_PARAMS),
      DispatchEntry<OSSL_FUNC_mac_settable_ctx_params_fn, MacSettableCtxParams>(
          OSSL_FUNC_MAC_SETTABLE_CTX_PARAMS),
      OSSL_DISPATCH{0, nullptr}};
  return kFunctions;
}

}  // namespace hsmstek::provider::internal
