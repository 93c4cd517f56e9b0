#include "provider/provider_context.h"

#include <cstdarg>
#include <string>

namespace hsmstek::provider::internal {
namespace {

// core_vset_error takes a va_list; this builds one.
void CallVsetError(OSSL_FUNC_core_vset_error_fn *vset_error,
                   const OSSL_CORE_HANDLE *handle, uint32_t reason,
                   const char *fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vset_error(handle, reason, fmt, args);
  va_end(args);
}

}  // namespace

ProviderContext::ProviderContext(const OSSL_CORE_HANDLE *handle,
                                 const OSSL_DISPATCH *in)
    : handle_(handle) {
  OSSL_FUNC_core_get_libctx_fn *get_libctx = nullptr;
  for (; in != nullptr && in->function_id != 0; ++in) {
    switch (in->function_id) {
      case OSSL_FUNC_CORE_GET_LIBCTX:
        get_libctx = OSSL_FUNC_core_get_libctx(in);
        break;
      case OSSL_FUNC_CORE_NEW_ERROR:
        new_error_ = OSSL_FUNC_core_new_error(in);
        break;
      case OSSL_FUNC_CORE_SET_ERROR_DEBUG:
        set_error_debug_ = OSSL_FUNC_core_set_error_debug(in);
        break;
      case OSSL_FUNC_CORE_VSET_ERROR:
        vset_error_ = OSSL_FUNC_core_vset_error(in);
        break;
      default:
        break;
    }
  }
  // A built-in provider shares libcrypto with the core, so the opaque core
  // context is the OSSL_LIB_CTX itself (OpenSSL's own built-ins rely on the
  // same fact).
  if (get_libctx != nullptr) {
    libctx_ = reinterpret_cast<OSSL_LIB_CTX *>(get_libctx(handle));
  }
}

ProviderContext::~ProviderContext() { EVP_MAC_free(delegate_hmac_.load()); }

EVP_MAC *ProviderContext::DelegateHmac() {
  EVP_MAC *mac = delegate_hmac_.load(std::memory_order_acquire);
  if (mac != nullptr) return mac;
  std::lock_guard<std::mutex> lock(delegate_mu_);
  mac = delegate_hmac_.load(std::memory_order_acquire);
  if (mac != nullptr) return mac;
  // An explicit "provider" clause overrides the default "?provider=hsmstek",
  // so this can never return our own HMAC (which would recurse).
  mac = EVP_MAC_fetch(libctx_, "HMAC", "provider!=hsmstek");
  if (mac == nullptr) {
    RaiseError(ProviderReason::kNoDelegate,
               "no provider other than hsmstek offers HMAC");
    return nullptr;
  }
  delegate_hmac_.store(mac, std::memory_order_release);
  return mac;
}

void ProviderContext::RaiseError(ProviderReason reason, std::string_view detail,
                                 const char *func, const char *file,
                                 int line) const {
  if (new_error_ == nullptr || vset_error_ == nullptr) return;
  new_error_(handle_);
  if (set_error_debug_ != nullptr) set_error_debug_(handle_, file, line, func);
  std::string text(detail);
  CallVsetError(vset_error_, handle_, static_cast<uint32_t>(reason), "%s",
                text.c_str());
}

}  // namespace hsmstek::provider::internal
