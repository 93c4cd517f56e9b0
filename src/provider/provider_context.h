// ProviderContext: the state one loaded instance of the hsmstek provider
// shares between its algorithm contexts (the provider's "provctx"), and the
// dispatch-table helpers the operation files use. Internal to src/provider.
#pragma once

#include <openssl/core.h>
#include <openssl/core_dispatch.h>
#include <openssl/evp.h>

#include <atomic>
#include <mutex>
#include <string_view>

#include "provider/dispatch_guard.h"
#include "provider/errors.h"

namespace hsmstek::provider::internal {

// DispatchEntry builds an OSSL_DISPATCH entry for function `F`, whose type
// is checked against OpenSSL's typedef `Fn` (an OSSL_FUNC_*_fn), so a wrong
// signature is a compile error instead of a crash. The entry calls F
// through the exception barrier (dispatch_guard.h): no exception reaches
// OpenSSL.
template <typename Fn, Fn *F>
OSSL_DISPATCH DispatchEntry(int id) {
  Fn *guarded = &Guarded<Fn, F>::Call;
  return OSSL_DISPATCH{id, reinterpret_cast<void (*)(void)>(guarded)};
}

// The dispatch functions of another provider's HMAC with that provider's
// context. Our HMAC calls them directly in raw-key mode instead of through a
// second EVP_MAC_CTX: under process-wide routing every HMAC of the process
// goes through us, and the extra EVP layer (an allocation per context and
// dup, a size query per final) cost about 7 % of a TLS 1.2 resumption.
struct DelegateMac {
  void *provctx = nullptr;
  OSSL_FUNC_mac_newctx_fn *newctx = nullptr;
  OSSL_FUNC_mac_dupctx_fn *dupctx = nullptr;
  OSSL_FUNC_mac_freectx_fn *freectx = nullptr;
  OSSL_FUNC_mac_init_fn *init = nullptr;
  OSSL_FUNC_mac_update_fn *update = nullptr;
  OSSL_FUNC_mac_final_fn *final = nullptr;
  OSSL_FUNC_mac_get_ctx_params_fn *get_ctx_params = nullptr;
  OSSL_FUNC_mac_set_ctx_params_fn *set_ctx_params = nullptr;
};

class ProviderContext {
 public:
  // Takes the core's library context and error functions from `in`.
  ProviderContext(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in);
  ~ProviderContext();
  ProviderContext(const ProviderContext &) = delete;
  ProviderContext &operator=(const ProviderContext &) = delete;

  // libctx returns the library context that loaded this provider instance.
  OSSL_LIB_CTX *libctx() const { return libctx_; }

  // DelegateHmac returns the functions of another provider's HMAC
  // ("provider!=hsmstek") in libctx(), looked up on first use and kept
  // until teardown (with a reference that keeps that provider loaded); null
  // (and an error raised) if none is available — the next call tries again.
  // Thread-safe; lock-free after the first successful lookup.
  const DelegateMac *DelegateHmac();

  // RaiseError puts `reason` with `detail` as error data on the calling
  // thread's OpenSSL error stack, located at the caller (the defaults; the
  // strings must be static: OpenSSL keeps the pointers). Thread-safe.
  void RaiseError(ProviderReason reason, std::string_view detail,
                  const char *func = __builtin_FUNCTION(),
                  const char *file = __builtin_FILE(),
                  int line = __builtin_LINE()) const;

 private:
  const OSSL_CORE_HANDLE *handle_;
  OSSL_LIB_CTX *libctx_ = nullptr;
  OSSL_FUNC_core_new_error_fn *new_error_ = nullptr;
  OSSL_FUNC_core_set_error_debug_fn *set_error_debug_ = nullptr;
  OSSL_FUNC_core_vset_error_fn *vset_error_ = nullptr;

  std::mutex delegate_mu_;            // serialises the first lookup only
  EVP_MAC *delegate_hmac_ = nullptr;  // guarded by delegate_mu_
  DelegateMac delegate_functions_;    // written once, before delegate_
  std::atomic<const DelegateMac *> delegate_{nullptr};
};

}  // namespace hsmstek::provider::internal
