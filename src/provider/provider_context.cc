#include "provider/provider_context.h"

#include <openssl/crypto.h>
#include <openssl/provider.h>

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

ProviderContext::~ProviderContext() { EVP_MAC_free(delegate_hmac_); }

namespace {

// True if `names` (an OSSL_ALGORITHM's "NAME1:NAME2:...") contains `name`.
bool HasName(const char *names, std::string_view name) {
  std::string_view rest(names);
  while (!rest.empty()) {
    size_t end = rest.find(':');
    std::string_view one = rest.substr(0, end);
    if (one.size() == name.size() &&
        OPENSSL_strncasecmp(one.data(), name.data(), name.size()) == 0) {
      return true;
    }
    if (end == std::string_view::npos) break;
    rest.remove_prefix(end + 1);
  }
  return false;
}

// Fills `out` from the HMAC entry of `provider`'s MAC algorithms; false if
// it has none or it lacks a function we call.
bool LookUpHmacFunctions(const OSSL_PROVIDER *provider, DelegateMac *out) {
  int no_cache = 0;
  const OSSL_ALGORITHM *algorithms =
      OSSL_PROVIDER_query_operation(provider, OSSL_OP_MAC, &no_cache);
  const OSSL_DISPATCH *functions = nullptr;
  for (const OSSL_ALGORITHM *a = algorithms;
       a != nullptr && a->algorithm_names != nullptr; ++a) {
    if (HasName(a->algorithm_names, "HMAC")) {
      functions = a->implementation;
      break;
    }
  }
  for (; functions != nullptr && functions->function_id != 0; ++functions) {
    switch (functions->function_id) {
      case OSSL_FUNC_MAC_NEWCTX:
        out->newctx = OSSL_FUNC_mac_newctx(functions);
        break;
      case OSSL_FUNC_MAC_DUPCTX:
        out->dupctx = OSSL_FUNC_mac_dupctx(functions);
        break;
      case OSSL_FUNC_MAC_FREECTX:
        out->freectx = OSSL_FUNC_mac_freectx(functions);
        break;
      case OSSL_FUNC_MAC_INIT:
        out->init = OSSL_FUNC_mac_init(functions);
        break;
      case OSSL_FUNC_MAC_UPDATE:
        out->update = OSSL_FUNC_mac_update(functions);
        break;
      case OSSL_FUNC_MAC_FINAL:
        out->final = OSSL_FUNC_mac_final(functions);
        break;
      case OSSL_FUNC_MAC_GET_CTX_PARAMS:
        out->get_ctx_params = OSSL_FUNC_mac_get_ctx_params(functions);
        break;
      case OSSL_FUNC_MAC_SET_CTX_PARAMS:
        out->set_ctx_params = OSSL_FUNC_mac_set_ctx_params(functions);
        break;
      default:
        break;
    }
  }
  OSSL_PROVIDER_unquery_operation(provider, OSSL_OP_MAC, algorithms);
  out->provctx = OSSL_PROVIDER_get0_provider_ctx(provider);
  return out->newctx != nullptr && out->dupctx != nullptr &&
         out->freectx != nullptr && out->init != nullptr &&
         out->update != nullptr && out->final != nullptr &&
         out->get_ctx_params != nullptr && out->set_ctx_params != nullptr;
}

}  // namespace

const DelegateMac *ProviderContext::DelegateHmac() {
  const DelegateMac *found = delegate_.load(std::memory_order_acquire);
  if (found != nullptr) return found;
  std::lock_guard<std::mutex> lock(delegate_mu_);
  found = delegate_.load(std::memory_order_acquire);
  if (found != nullptr) return found;
  // An explicit "provider" clause overrides the default "?provider=hsmstek",
  // so this can never return our own HMAC (which would recurse).
  EVP_MAC *mac = EVP_MAC_fetch(libctx_, "HMAC", "provider!=hsmstek");
  if (mac == nullptr) {
    RaiseError(ProviderReason::kNoDelegate,
               "no provider other than hsmstek offers HMAC");
    return nullptr;
  }
  DelegateMac functions;
  const OSSL_PROVIDER *provider = EVP_MAC_get0_provider(mac);
  if (!LookUpHmacFunctions(provider, &functions)) {
    RaiseError(ProviderReason::kNoDelegate,
               "the HMAC of provider " +
                   std::string(OSSL_PROVIDER_get0_name(provider)) +
                   " lacks a function hsmstek forwards to");
    EVP_MAC_free(mac);
    return nullptr;
  }
  delegate_hmac_ = mac;  // keeps the provider (and its functions) loaded
  delegate_functions_ = functions;
  delegate_.store(&delegate_functions_, std::memory_order_release);
  return &delegate_functions_;
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
