// HSMSTEK-AES-CBC-PAD: AES-CBC(-PAD) in the token on a key handle, one-shot
// per init (the first non-empty update runs the whole single-part token
// operation; encrypt final reports the last block). See provider.h. With a
// pre-armed operation (armed_pool.h) the update is one token call: the
// encryption's C_Encrypt, or the decryption's ECB C_DecryptUpdate with the
// CBC chaining and unpadding done here on the public ciphertext.
#include "provider/ticket_cipher.h"

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include "pkcs11/token.h"
#include "provider/armed_pool.h"
#include "provider/key_ref.h"
#include "provider/provider.h"
#include "provider/provider_context.h"
#include "provider/token_op.h"

namespace hsmstek::provider::internal {
namespace {

constexpr size_t kBlockSize = 16;
constexpr size_t kIvLength = 16;
constexpr size_t kKeyLength = 32;

enum class CipherState : uint8_t {
  kUninitialized,  // no init yet
  kReady,          // initialised; the token operation has not run
  kDone,           // the one-shot operation ran; final emits `held`
  kFailed,         // an operation failed; re-init to use again
  kSoftFailed,     // fail-soft decryption failed: final fails silently
};

struct CipherCtx {
  explicit CipherCtx(ProviderContext *p) : prov(p) {}

  ProviderContext *prov;
  TokenKeyRef ref;
  bool has_ref = false;
  std::array<uint8_t, kIvLength> iv{};
  std::array<uint8_t, kIvLength> updated_iv{};
  // Encryption: the last ciphertext block, reported by final rather than by
  // update (libssl's ticket code cannot take a 0-byte final).
  std::array<uint8_t, kBlockSize> held{};
  size_t held_len = 0;
  bool has_iv = false;
  bool encrypt = true;
  bool padding = true;
  bool fail_soft = false;  // kFailSoftParam
  CipherState state = CipherState::kUninitialized;
};

OSSL_FUNC_cipher_newctx_fn CipherNewCtx;
OSSL_FUNC_cipher_freectx_fn CipherFreeCtx;
OSSL_FUNC_cipher_dupctx_fn CipherDupCtx;
OSSL_FUNC_cipher_encrypt_init_fn CipherEncryptInit;
OSSL_FUNC_cipher_decrypt_init_fn CipherDecryptInit;
OSSL_FUNC_cipher_update_fn CipherUpdate;
OSSL_FUNC_cipher_final_fn CipherFinal;
OSSL_FUNC_cipher_get_params_fn CipherGetParams;
OSSL_FUNC_cipher_gettable_params_fn CipherGettableParams;
OSSL_FUNC_cipher_get_ctx_params_fn CipherGetCtxParams;
OSSL_FUNC_cipher_gettable_ctx_params_fn CipherGettableCtxParams;
OSSL_FUNC_cipher_set_ctx_params_fn CipherSetCtxParams;
OSSL_FUNC_cipher_settable_ctx_params_fn CipherSettableCtxParams;

void *CipherNewCtx(void *provctx) {
  return new (std::nothrow) CipherCtx(static_cast<ProviderContext *>(provctx));
}

void CipherFreeCtx(void *vctx) {
  // Nothing is pending in the token: sessions are leased only inside update
  // and final.
  delete static_cast<CipherCtx *>(vctx);
}

void *CipherDupCtx(void *vctx) {
  return new (std::nothrow) CipherCtx(*static_cast<CipherCtx *>(vctx));
}

// Applies the settable context params: key reference, padding, fail-soft.
int CipherSetCtxParams(void *vctx, const OSSL_PARAM params[]) {
  auto *ctx = static_cast<CipherCtx *>(vctx);
  if (params == nullptr) return 1;
  if (const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, kKeyRefParam)) {
    if (!ParseKeyRef(*ctx->prov, *p, &ctx->ref)) return 0;
    ctx->has_ref = true;
  }
  if (const OSSL_PARAM *p =
          OSSL_PARAM_locate_const(params, OSSL_CIPHER_PARAM_PADDING)) {
    unsigned int padding = 0;
    if (!OSSL_PARAM_get_uint(p, &padding)) return 0;
    ctx->padding = padding != 0;
  }
  if (const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, kFailSoftParam)) {
    if (!ParseFailSoft(*p, &ctx->fail_soft)) return 0;
  }
  return 1;
}

int CipherInit(CipherCtx *ctx, bool encrypt, const unsigned char *key,
               const unsigned char *iv, size_t ivlen,
               const OSSL_PARAM params[]) {
  ctx->state = CipherState::kUninitialized;
  ctx->held_len = 0;
  if (key != nullptr) {
    // Ticket keys never leave the token; there is no software path.
    ctx->prov->RaiseError(
        ProviderReason::kRawKeyRefused,
        "raw keys are not accepted; pass " + std::string(kKeyRefParam));
    return 0;
  }
  if (iv != nullptr) {
    if (ivlen != kIvLength) {
      ctx->prov->RaiseError(
          ProviderReason::kInvalidLength,
          "IV must be 16 bytes, got " + std::to_string(ivlen));
      return 0;
    }
    std::memcpy(ctx->iv.data(), iv, kIvLength);
    ctx->updated_iv = ctx->iv;
    ctx->has_iv = true;
  }
  if (!CipherSetCtxParams(ctx, params)) return 0;
  ctx->encrypt = encrypt;
  ctx->state = CipherState::kReady;
  return 1;
}

int CipherEncryptInit(void *vctx, const unsigned char *key, size_t /*keylen*/,
                      const unsigned char *iv, size_t ivlen,
                      const OSSL_PARAM params[]) {
  return CipherInit(static_cast<CipherCtx *>(vctx), true, key, iv, ivlen,
                    params);
}

int CipherDecryptInit(void *vctx, const unsigned char *key, size_t /*keylen*/,
                      const unsigned char *iv, size_t ivlen,
                      const OSSL_PARAM params[]) {
  return CipherInit(static_cast<CipherCtx *>(vctx), false, key, iv, ivlen,
                    params);
}

// Sets `*capacity` to how many bytes the operation may write for `inl`
// input bytes into an `outsize`-byte buffer; false after raising an error.
// Decrypt never writes more than the ciphertext length: libssl's buffer is
// that long even though EVP announces inl + 16.
bool OutputCapacity(const CipherCtx &ctx, size_t inl, size_t outsize,
                    size_t *capacity) {
  if (ctx.encrypt) {
    if (!ctx.padding && inl % kBlockSize != 0) {
      ctx.prov->RaiseError(ProviderReason::kInvalidLength,
                           "without padding the input must be a multiple of "
                           "16 bytes, got " +
                               std::to_string(inl));
      return false;
    }
    *capacity = ctx.padding ? (inl / kBlockSize + 1) * kBlockSize : inl;
  } else {
    if (inl == 0 || inl % kBlockSize != 0) {
      ctx.prov->RaiseError(ProviderReason::kInvalidLength,
                           "ciphertext must be a non-empty multiple of 16 "
                           "bytes, got " +
                               std::to_string(inl));
      return false;
    }
    *capacity = inl;
  }
  if (outsize < *capacity) {
    ctx.prov->RaiseError(ProviderReason::kInvalidLength,
                         "output buffer of " + std::to_string(outsize) +
                             " bytes, need " + std::to_string(*capacity));
    return false;
  }
  return true;
}

// Runs C_{En,De}cryptInit + C_{En,De}crypt on the whole input.
Status RunSinglePart(p11::Session &session, const CipherCtx &ctx,
                     const unsigned char *in, size_t inl, unsigned char *out,
                     CK_ULONG *out_len) {
  std::array<uint8_t, kIvLength> iv = ctx.iv;  // C_*Init wants non-const
  CK_MECHANISM mechanism{ctx.padding ? CKM_AES_CBC_PAD : CKM_AES_CBC, iv.data(),
                         static_cast<CK_ULONG>(iv.size())};
  // Some modules reject a null pData even for zero bytes.
  static unsigned char empty = 0;
  auto *data = const_cast<unsigned char *>(inl == 0 ? &empty : in);
  if (ctx.encrypt) {
    Status status = P11_CALL(session, C_EncryptInit, session.handle(),
                             &mechanism, ctx.ref.handle);
    if (!status.ok()) return status;
    return P11_CALL(session, C_Encrypt, session.handle(), data,
                    static_cast<CK_ULONG>(inl), out, out_len);
  }
  Status status = P11_CALL(session, C_DecryptInit, session.handle(), &mechanism,
                           ctx.ref.handle);
  if (!status.ok()) return status;
  return P11_CALL(session, C_Decrypt, session.handle(), data,
                  static_cast<CK_ULONG>(inl), out, out_len);
}

// Records a finished one-shot operation: the CBC chaining value (the last
// ciphertext block; both lengths are non-zero multiples of 16 here) and the
// output length.
int RecordOutput(CipherCtx *ctx, const unsigned char *in, size_t inl,
                 const unsigned char *out, size_t produced, size_t *outl) {
  const unsigned char *ciphertext_end =
      ctx->encrypt ? out + produced : in + inl;
  std::memcpy(ctx->updated_iv.data(), ciphertext_end - kBlockSize, kBlockSize);
  *outl = produced;
  ctx->state = CipherState::kDone;
  return 1;
}

// After a failed token operation: fail, or with fail-soft (provider.h)
// stand in with random ciphertext (encrypt) or with nothing and a final that
// fails silently (decrypt).
int FailOneShot(CipherCtx *ctx, const unsigned char *in, size_t inl,
                unsigned char *out, size_t capacity, size_t *outl) {
  if (!ctx->fail_soft) return 0;
  if (!ctx->encrypt) {
    *outl = 0;
    ctx->state = CipherState::kSoftFailed;
    return 1;
  }
  if (!FillRandom(*ctx->prov, out, capacity)) return 0;
  return RecordOutput(ctx, in, inl, out, capacity, outl);
}

// CBC decryption of `inl` ciphertext bytes from ECB block decryptions:
// P_i = D(C_i) XOR C_(i-1), C_0 = the IV. `out` holds D(C_1..C_n) on entry
// and the plaintext on return; `ct` is the ciphertext (not aliasing out).
void ChainInMemory(const uint8_t *iv, const unsigned char *ct, size_t inl,
                   unsigned char *out) {
  for (size_t i = 0; i < inl; ++i) {
    out[i] ^= i < kBlockSize ? iv[i] : ct[i - kBlockSize];
  }
}

// The PKCS#7 pad length of the last block of `pt` (len >= 16, a multiple of
// 16), or 0 if the padding is malformed. Every byte of the last block is
// looked at whatever the pad value, so the time does not depend on it.
size_t PadLength(const unsigned char *pt, size_t len) {
  const uint32_t pad = pt[len - 1];
  // bad != 0 iff pad == 0 or pad > 16.
  uint32_t bad = ((pad - 1) >> 8) | ((16 - pad) >> 8);
  for (uint32_t i = 1; i <= kBlockSize; ++i) {
    const uint32_t in_pad = 0u - ((i - pad - 1) >> 31);  // all ones if i <= pad
    bad |= in_pad & (pt[len - i] ^ pad);
  }
  // 0 when bad, pad otherwise, without a branch on either.
  const uint32_t ok_mask = ((bad | (0u - bad)) >> 31) - 1u;
  return pad & ok_mask;
}

// The decryption of an open on an armed ECB operation: one C_DecryptUpdate
// over the whole (public) ciphertext, then chaining and unpadding in memory.
// Returns 1 and sets *produced; 0 after a token failure (the operation is
// cancelled); -1 for a malformed padding (the operation stays armed).
int DecryptOnArmedEcb(CipherCtx *ctx, ArmedOp &armed, const unsigned char *in,
                      size_t inl, unsigned char *out, size_t *produced) {
  // The ciphertext must survive the token writing `out`: copy it if they
  // overlap (EVP allows in-place operation).
  std::vector<unsigned char> copy;
  const unsigned char *ct = in;
  if (out < in + inl && in < out + inl) {
    copy.assign(in, in + inl);
    ct = copy.data();
  }
  const FailureMode mode =
      ctx->fail_soft ? FailureMode::kSoft : FailureMode::kRaise;
  bool ok = RunArmedTokenOp(
      *ctx->prov, ctx->ref, TokenOp::kDecrypt, mode, armed,
      [&](p11::Session &session) {
        CK_ULONG out_len = static_cast<CK_ULONG>(inl);
        Status status = P11_CALL(session, C_DecryptUpdate, session.handle(),
                                 const_cast<unsigned char *>(ct),
                                 static_cast<CK_ULONG>(inl), out, &out_len);
        if (status.ok() && out_len != inl) {
          // The module kept blocks back: the operation is not the stateless
          // ECB we rely on; it is cancelled with the session.
          return Internal("C_DecryptUpdate (CKM_AES_ECB) returned " +
                          std::to_string(out_len) + " of " +
                          std::to_string(inl) + " bytes");
        }
        return status;
      });
  if (!ok) return 0;
  ChainInMemory(ctx->iv.data(), ct, inl, out);
  std::memcpy(ctx->updated_iv.data(), ct + inl - kBlockSize, kBlockSize);
  if (!ctx->padding) {
    *produced = inl;
    return 1;
  }
  const size_t pad = PadLength(out, inl);
  if (pad == 0) {
    OPENSSL_cleanse(out, inl);
    return -1;
  }
  *produced = inl - pad;
  return 1;
}

// Tries the pre-armed path for this operation. Returns true if it ran (then
// *result is the update's return value), false if the caller should run the
// on-demand path.
bool TryArmed(CipherCtx *ctx, const unsigned char *in, size_t inl,
              unsigned char *out, size_t capacity, size_t *outl, int *result) {
  const FailureMode mode =
      ctx->fail_soft ? FailureMode::kSoft : FailureMode::kRaise;
  if (ctx->encrypt) {
    std::shared_ptr<ArmedOp> holder = std::move(ctx->ref.armed_encrypt);
    if (!holder || !*holder || !ctx->padding || inl == 0 ||
        std::memcmp(holder->iv().data(), ctx->iv.data(), kIvLength) != 0) {
      return false;  // an unusable armed operation is cancelled with holder
    }
    ArmedOp armed = std::move(*holder);
    CK_ULONG produced = static_cast<CK_ULONG>(capacity);
    bool ok = RunArmedTokenOp(*ctx->prov, ctx->ref, TokenOp::kEncrypt, mode,
                              armed, [&](p11::Session &session) {
                                return P11_CALL(
                                    session, C_Encrypt, session.handle(),
                                    const_cast<unsigned char *>(in),
                                    static_cast<CK_ULONG>(inl), out, &produced);
                              });
    if (ok) armed.MarkClean();
    *result = ok ? RecordOutput(ctx, in, inl, out, produced, outl)
                 : FailOneShot(ctx, in, inl, out, capacity, outl);
    return true;
  }
  if (ctx->ref.pool == nullptr) return false;
  std::optional<ArmedOp> armed = ctx->ref.pool->Take(
      ArmedKind::kDecryptEcb, ctx->ref.handle, ctx->ref.generation);
  if (!armed) return false;
  size_t produced = 0;
  int decrypted = DecryptOnArmedEcb(ctx, *armed, in, inl, out, &produced);
  if (decrypted == 0) {
    armed.reset();  // cancels the operation: its session is closed
    ctx->ref.pool->Lost(ArmedKind::kDecryptEcb);
    *result = FailOneShot(ctx, in, inl, out, capacity, outl);
    return true;
  }
  ctx->ref.pool->Return(std::move(*armed));  // still armed
  if (decrypted < 0) {
    // Cannot happen for a ticket whose MAC matched; treated like a token
    // decryption failure: no ticket (fail-soft) or an error.
    if (!ctx->fail_soft) {
      ctx->prov->RaiseError(ProviderReason::kTokenOperationFailed,
                            "bad padding after decryption");
    }
    *result = FailOneShot(ctx, in, inl, out, capacity, outl);
    return true;
  }
  *outl = produced;
  ctx->state = CipherState::kDone;
  *result = 1;
  return true;
}

// The one-shot operation over `in`, writing at most `outsize` bytes.
int RunOneShot(CipherCtx *ctx, const unsigned char *in, size_t inl,
               unsigned char *out, size_t *outl, size_t outsize) {
  ctx->state = CipherState::kFailed;  // until it succeeds
  if (!ctx->has_ref) {
    ctx->prov->RaiseError(ProviderReason::kNoKeyRef,
                          "no " + std::string(kKeyRefParam) + " set");
    return 0;
  }
  if (!ctx->has_iv) {
    ctx->prov->RaiseError(ProviderReason::kInvalidLength, "no IV set");
    return 0;
  }
  size_t capacity = 0;
  if (!OutputCapacity(*ctx, inl, outsize, &capacity)) return 0;
  if (capacity == 0) {  // unpadded encryption of nothing
    *outl = 0;
    ctx->state = CipherState::kDone;
    return 1;
  }
  int armed_result = 0;
  if (TryArmed(ctx, in, inl, out, capacity, outl, &armed_result)) {
    return armed_result;
  }
  CK_ULONG produced = static_cast<CK_ULONG>(capacity);
  const TokenOp op = ctx->encrypt ? TokenOp::kEncrypt : TokenOp::kDecrypt;
  const FailureMode mode =
      ctx->fail_soft ? FailureMode::kSoft : FailureMode::kRaise;
  bool ok =
      RunTokenOp(*ctx->prov, ctx->ref, op, mode, [&](p11::Session &session) {
        return RunSinglePart(session, *ctx, in, inl, out, &produced);
      });
  if (!ok) return FailOneShot(ctx, in, inl, out, capacity, outl);
  return RecordOutput(ctx, in, inl, out, produced, outl);
}

bool CheckInitialized(const CipherCtx &ctx) {
  if (ctx.state != CipherState::kUninitialized) return true;
  ctx.prov->RaiseError(ProviderReason::kNotInitialized,
                       "cipher used before init");
  return false;
}

int CipherUpdate(void *vctx, unsigned char *out, size_t *outl, size_t outsize,
                 const unsigned char *in, size_t inl) {
  auto *ctx = static_cast<CipherCtx *>(vctx);
  *outl = 0;
  if (!CheckInitialized(*ctx)) return 0;
  if (inl == 0) return 1;
  if (ctx->state != CipherState::kReady) {
    ctx->state = CipherState::kFailed;
    ctx->prov->RaiseError(ProviderReason::kOperationFinished,
                          "one-shot cipher: the operation already ran or "
                          "failed since init");
    return 0;
  }
  size_t produced = 0;
  if (!RunOneShot(ctx, in, inl, out, &produced, outsize)) return 0;
  if (ctx->encrypt && produced >= kBlockSize) {
    // The whole ciphertext is in `out` already; final reports the last
    // block again at the same place, as a streaming CBC-PAD would.
    ctx->held_len = kBlockSize;
    std::memcpy(ctx->held.data(), out + produced - kBlockSize, kBlockSize);
    produced -= kBlockSize;
  }
  *outl = produced;
  return 1;
}

int CipherFinal(void *vctx, unsigned char *out, size_t *outl, size_t outsize) {
  auto *ctx = static_cast<CipherCtx *>(vctx);
  *outl = 0;
  if (!CheckInitialized(*ctx)) return 0;
  switch (ctx->state) {
    case CipherState::kDone:
      if (outsize < ctx->held_len) {
        ctx->prov->RaiseError(ProviderReason::kInvalidLength,
                              "final output buffer of " +
                                  std::to_string(outsize) + " bytes, need 16");
        return 0;
      }
      std::memcpy(out, ctx->held.data(), ctx->held_len);
      *outl = ctx->held_len;
      ctx->held_len = 0;
      return 1;
    case CipherState::kReady:
      if (ctx->encrypt) {
        // No update carried data: the output is one block of padding.
        return RunOneShot(ctx, nullptr, 0, out, outl, outsize);
      }
      ctx->state = CipherState::kFailed;
      ctx->prov->RaiseError(ProviderReason::kInvalidLength,
                            "no ciphertext to decrypt");
      return 0;
    case CipherState::kSoftFailed:
      return 0;  // fail-soft: nothing raised (see provider.h)
    case CipherState::kFailed:
    default:
      ctx->prov->RaiseError(ProviderReason::kOperationFinished,
                            "the operation failed since init");
      return 0;
  }
}

// Sets `p` (if present) and reports whether that worked.
bool SetSize(OSSL_PARAM params[], const char *key, size_t value) {
  OSSL_PARAM *p = OSSL_PARAM_locate(params, key);
  return p == nullptr || OSSL_PARAM_set_size_t(p, value);
}
bool SetInt(OSSL_PARAM params[], const char *key, int value) {
  OSSL_PARAM *p = OSSL_PARAM_locate(params, key);
  return p == nullptr || OSSL_PARAM_set_int(p, value);
}
bool SetUint(OSSL_PARAM params[], const char *key, unsigned int value) {
  OSSL_PARAM *p = OSSL_PARAM_locate(params, key);
  return p == nullptr || OSSL_PARAM_set_uint(p, value);
}
bool SetOctets(OSSL_PARAM params[], const char *key, const void *data,
               size_t size) {
  OSSL_PARAM *p = OSSL_PARAM_locate(params, key);
  return p == nullptr || OSSL_PARAM_set_octet_string(p, data, size) ||
         OSSL_PARAM_set_octet_ptr(p, data, size);
}

// What EVP_CIPHER_fetch caches; EVP_EncryptInit_ex2 also needs ivlen.
int CipherGetParams(OSSL_PARAM params[]) {
  return SetUint(params, OSSL_CIPHER_PARAM_MODE, EVP_CIPH_CBC_MODE) &&
         SetSize(params, OSSL_CIPHER_PARAM_BLOCK_SIZE, kBlockSize) &&
         SetSize(params, OSSL_CIPHER_PARAM_IVLEN, kIvLength) &&
         SetSize(params, OSSL_CIPHER_PARAM_KEYLEN, kKeyLength) &&
         SetInt(params, OSSL_CIPHER_PARAM_AEAD, 0) &&
         SetInt(params, OSSL_CIPHER_PARAM_CUSTOM_IV, 0) &&
         SetInt(params, OSSL_CIPHER_PARAM_CTS, 0) &&
         SetInt(params, OSSL_CIPHER_PARAM_TLS1_MULTIBLOCK, 0) &&
         SetInt(params, OSSL_CIPHER_PARAM_HAS_RAND_KEY, 0);
}

const OSSL_PARAM *CipherGettableParams(void * /*provctx*/) {
  static const OSSL_PARAM kParams[] = {
      OSSL_PARAM_uint(OSSL_CIPHER_PARAM_MODE, nullptr),
      OSSL_PARAM_size_t(OSSL_CIPHER_PARAM_KEYLEN, nullptr),
      OSSL_PARAM_size_t(OSSL_CIPHER_PARAM_IVLEN, nullptr),
      OSSL_PARAM_size_t(OSSL_CIPHER_PARAM_BLOCK_SIZE, nullptr),
      OSSL_PARAM_int(OSSL_CIPHER_PARAM_AEAD, nullptr),
      OSSL_PARAM_int(OSSL_CIPHER_PARAM_CUSTOM_IV, nullptr),
      OSSL_PARAM_int(OSSL_CIPHER_PARAM_CTS, nullptr),
      OSSL_PARAM_int(OSSL_CIPHER_PARAM_TLS1_MULTIBLOCK, nullptr),
      OSSL_PARAM_int(OSSL_CIPHER_PARAM_HAS_RAND_KEY, nullptr),
      OSSL_PARAM_END};
  return kParams;
}

// Answers from an uninitialised context too: EVP_EncryptInit_ex2 asks the
// IV length before our init runs.
int CipherGetCtxParams(void *vctx, OSSL_PARAM params[]) {
  const auto *ctx = static_cast<const CipherCtx *>(vctx);
  if (params == nullptr) return 1;
  return SetSize(params, OSSL_CIPHER_PARAM_IVLEN, kIvLength) &&
         SetSize(params, OSSL_CIPHER_PARAM_KEYLEN, kKeyLength) &&
         SetSize(params, OSSL_CIPHER_PARAM_BLOCK_SIZE, kBlockSize) &&
         SetUint(params, OSSL_CIPHER_PARAM_PADDING, ctx->padding ? 1 : 0) &&
         SetOctets(params, OSSL_CIPHER_PARAM_IV, ctx->iv.data(),
                   ctx->iv.size()) &&
         SetOctets(params, OSSL_CIPHER_PARAM_UPDATED_IV, ctx->updated_iv.data(),
                   ctx->updated_iv.size());
}

const OSSL_PARAM *CipherGettableCtxParams(void * /*cctx*/, void * /*provctx*/) {
  static const OSSL_PARAM kParams[] = {
      OSSL_PARAM_size_t(OSSL_CIPHER_PARAM_IVLEN, nullptr),
      OSSL_PARAM_size_t(OSSL_CIPHER_PARAM_KEYLEN, nullptr),
      OSSL_PARAM_size_t(OSSL_CIPHER_PARAM_BLOCK_SIZE, nullptr),
      OSSL_PARAM_uint(OSSL_CIPHER_PARAM_PADDING, nullptr),
      OSSL_PARAM_octet_string(OSSL_CIPHER_PARAM_IV, nullptr, 0),
      OSSL_PARAM_octet_string(OSSL_CIPHER_PARAM_UPDATED_IV, nullptr, 0),
      OSSL_PARAM_END};
  return kParams;
}

const OSSL_PARAM *CipherSettableCtxParams(void * /*cctx*/, void * /*provctx*/) {
  static const OSSL_PARAM kParams[] = {
      OSSL_PARAM_octet_string(kKeyRefParam, nullptr, 0),
      OSSL_PARAM_uint(OSSL_CIPHER_PARAM_PADDING, nullptr),
      OSSL_PARAM_int(kFailSoftParam, nullptr), OSSL_PARAM_END};
  return kParams;
}

}  // namespace

const OSSL_DISPATCH *TicketCipherFunctions() {
  static const OSSL_DISPATCH kFunctions[] = {
      DispatchEntry<OSSL_FUNC_cipher_newctx_fn, CipherNewCtx>(
          OSSL_FUNC_CIPHER_NEWCTX),
      DispatchEntry<OSSL_FUNC_cipher_freectx_fn, CipherFreeCtx>(
          OSSL_FUNC_CIPHER_FREECTX),
      DispatchEntry<OSSL_FUNC_cipher_dupctx_fn, CipherDupCtx>(
          OSSL_FUNC_CIPHER_DUPCTX),
      DispatchEntry<OSSL_FUNC_cipher_encrypt_init_fn, CipherEncryptInit>(
          OSSL_FUNC_CIPHER_ENCRYPT_INIT),
      DispatchEntry<OSSL_FUNC_cipher_decrypt_init_fn, CipherDecryptInit>(
          OSSL_FUNC_CIPHER_DECRYPT_INIT),
      DispatchEntry<OSSL_FUNC_cipher_update_fn, CipherUpdate>(
          OSSL_FUNC_CIPHER_UPDATE),
      DispatchEntry<OSSL_FUNC_cipher_final_fn, CipherFinal>(
          OSSL_FUNC_CIPHER_FINAL),
      DispatchEntry<OSSL_FUNC_cipher_get_params_fn, CipherGetParams>(
          OSSL_FUNC_CIPHER_GET_PARAMS),
      DispatchEntry<OSSL_FUNC_cipher_gettable_params_fn, CipherGettableParams>(
          OSSL_FUNC_CIPHER_GETTABLE_PARAMS),
      DispatchEntry<OSSL_FUNC_cipher_get_ctx_params_fn, CipherGetCtxParams>(
          OSSL_FUNC_CIPHER_GET_CTX_PARAMS),
      DispatchEntry<OSSL_FUNC_cipher_gettable_ctx_params_fn,
                    CipherGettableCtxParams>(
          OSSL_FUNC_CIPHER_GETTABLE_CTX_PARAMS),
      DispatchEntry<OSSL_FUNC_cipher_set_ctx_params_fn, CipherSetCtxParams>(
          OSSL_FUNC_CIPHER_SET_CTX_PARAMS),
      DispatchEntry<OSSL_FUNC_cipher_settable_ctx_params_fn,
                    CipherSettableCtxParams>(
          OSSL_FUNC_CIPHER_SETTABLE_CTX_PARAMS),
      OSSL_DISPATCH{0, nullptr}};
  return kFunctions;
}

}  // namespace hsmstek::provider::internal
