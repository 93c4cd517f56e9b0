// Registration of the hsmstek provider and the public helpers of provider.h.
#include "provider/provider.h"

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/params.h>
#include <openssl/provider.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <new>
#include <string>

#include "provider/errors.h"
#include "provider/provider_context.h"
#include "provider/ticket_cipher.h"
#include "provider/ticket_mac.h"

namespace hsmstek::provider {
namespace internal {
namespace {

constexpr char kAlgorithmProperties[] = "provider=hsmstek";

OSSL_FUNC_provider_teardown_fn ProviderTeardown;
OSSL_FUNC_provider_gettable_params_fn ProviderGettableParams;
OSSL_FUNC_provider_get_params_fn ProviderGetParams;
OSSL_FUNC_provider_query_operation_fn ProviderQueryOperation;
OSSL_FUNC_provider_get_reason_strings_fn ProviderReasonStrings;

void ProviderTeardown(void *provctx) {
  delete static_cast<ProviderContext *>(provctx);
}

const OSSL_PARAM *ProviderGettableParams(void * /*provctx*/) {
  static const OSSL_PARAM kParams[] = {
      OSSL_PARAM_utf8_ptr(OSSL_PROV_PARAM_NAME, nullptr, 0),
      OSSL_PARAM_utf8_ptr(OSSL_PROV_PARAM_VERSION, nullptr, 0),
      OSSL_PARAM_utf8_ptr(OSSL_PROV_PARAM_BUILDINFO, nullptr, 0),
      OSSL_PARAM_int(OSSL_PROV_PARAM_STATUS, nullptr), OSSL_PARAM_END};
  return kParams;
}

int ProviderGetParams(void * /*provctx*/, OSSL_PARAM params[]) {
  OSSL_PARAM *p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_NAME);
  if (p != nullptr &&
      !OSSL_PARAM_set_utf8_ptr(p, "hsmstek ticket-key provider"))
    return 0;
  p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_VERSION);
  if (p != nullptr && !OSSL_PARAM_set_utf8_ptr(p, "0.1.0")) return 0;
  p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_BUILDINFO);
  if (p != nullptr && !OSSL_PARAM_set_utf8_ptr(p, "built-in")) return 0;
  p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_STATUS);
  if (p != nullptr && !OSSL_PARAM_set_int(p, 1)) return 0;
  return 1;
}

const OSSL_ALGORITHM *ProviderQueryOperation(void * /*provctx*/,
                                             int operation_id, int *no_cache) {
  // Every property string names the provider: OpenSSL 3.0 does not add
  // "provider=..." implicitly, and "?provider=hsmstek" needs it.
  static const OSSL_ALGORITHM kCiphers[] = {
      {kCipherName, kAlgorithmProperties, TicketCipherFunctions(),
       "AES-CBC-PAD in a PKCS#11 token on a key handle"},
      {nullptr, nullptr, nullptr, nullptr}};
  static const OSSL_ALGORITHM kMacs[] = {
      {kMacName, kAlgorithmProperties, TicketMacFunctions(),
       "HMAC-SHA256 in a PKCS#11 token on a key handle; raw keys delegated"},
      {nullptr, nullptr, nullptr, nullptr}};
  *no_cache = 0;
  switch (operation_id) {
    case OSSL_OP_CIPHER:
      return kCiphers;
    case OSSL_OP_MAC:
      return kMacs;
    default:
      return nullptr;
  }
}

const OSSL_ITEM *ProviderReasonStrings(void * /*provctx*/) {
  auto item = [](ProviderReason reason, const char *text) {
    return OSSL_ITEM{static_cast<unsigned int>(reason),
                     const_cast<char *>(text)};
  };
  static const OSSL_ITEM kReasons[] = {
      item(ProviderReason::kTokenOperationFailed, "token operation failed"),
      item(ProviderReason::kStaleKeyHandle, "stale key handle"),
      item(ProviderReason::kInvalidKeyRef, "invalid key reference"),
      item(ProviderReason::kRawKeyRefused, "raw keys are not accepted"),
      item(ProviderReason::kNoKeyRef, "no key reference"),
      item(ProviderReason::kOperationFinished, "operation already finished"),
      item(ProviderReason::kInvalidLength, "invalid length"),
      item(ProviderReason::kNoDelegate, "no HMAC to delegate to"),
      item(ProviderReason::kUnsupportedDigest, "unsupported digest"),
      item(ProviderReason::kNotInitialized, "not initialized"),
      item(ProviderReason::kConflictingKeys, "conflicting keys"),
      OSSL_ITEM{0, nullptr}};
  return kReasons;
}

const OSSL_DISPATCH *ProviderFunctions() {
  static const OSSL_DISPATCH kFunctions[] = {
      DispatchEntry<OSSL_FUNC_provider_teardown_fn, ProviderTeardown>(
          OSSL_FUNC_PROVIDER_TEARDOWN),
      DispatchEntry<OSSL_FUNC_provider_gettable_params_fn,
                    ProviderGettableParams>(OSSL_FUNC_PROVIDER_GETTABLE_PARAMS),
      DispatchEntry<OSSL_FUNC_provider_get_params_fn, ProviderGetParams>(
          OSSL_FUNC_PROVIDER_GET_PARAMS),
      DispatchEntry<OSSL_FUNC_provider_query_operation_fn,
                    ProviderQueryOperation>(OSSL_FUNC_PROVIDER_QUERY_OPERATION),
      DispatchEntry<OSSL_FUNC_provider_get_reason_strings_fn,
                    ProviderReasonStrings>(
          OSSL_FUNC_PROVIDER_GET_REASON_STRINGS),
      OSSL_DISPATCH{0, nullptr}};
  return kFunctions;
}

int ProviderInit(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
                 const OSSL_DISPATCH **out, void **provctx) {
  auto *ctx = new (std::nothrow) ProviderContext(handle, in);
  if (ctx == nullptr) return 0;
  *out = ProviderFunctions();
  *provctx = ctx;
  return 1;
}

// Compile-time check of the init function's signature.
[[maybe_unused]] constexpr OSSL_provider_init_fn *kInitSignatureCheck =
    ProviderInit;

// Process-lifetime registration state, guarded by RegistrationMutex().
struct Registration {
  bool registered = false;
  // The references OSSL_PROVIDER_load gave us, held (never unloaded) for
  // the life of the process. Kept here so they stay owned: dropped, the
  // providers leak at OpenSSL's exit-time cleanup (LeakSanitizer reports
  // them when no fetched algorithm still points at them).
  OSSL_PROVIDER *hsmstek_provider = nullptr;
  OSSL_PROVIDER *default_provider = nullptr;
};

// The ticket cipher, fetched once (under RegistrationMutex), never freed,
// and read without a lock by TicketCipher() on every ticket.
std::atomic<const EVP_CIPHER *> g_ticket_cipher{nullptr};

std::mutex &RegistrationMutex() {
  static std::mutex mu;
  return mu;
}
Registration &GetRegistration() {
  static Registration registration;
  return registration;
}

// Reads and clears the OpenSSL error queue into one line for a Status.
std::string DrainOpenSslErrors() {
  std::string text;
  unsigned long e;
  char buf[256];
  while ((e = ERR_get_error()) != 0) {
    ERR_error_string_n(e, buf, sizeof(buf));
    if (!text.empty()) text += "; ";
    text += buf;
  }
  return text.empty() ? std::string("no OpenSSL error") : text;
}

int CountProvider(OSSL_PROVIDER * /*provider*/, void *count) {
  ++*static_cast<int *>(count);
  return 1;
}

bool OtherHmacAvailable() {
  ERR_set_mark();
  EVP_MAC *mac = EVP_MAC_fetch(nullptr, "HMAC", "provider!=hsmstek");
  ERR_pop_to_mark();
  EVP_MAC_free(mac);
  return mac != nullptr;
}

Status RegisterLocked(Registration &reg) {
  // Let OpenSSL activate what the configuration loads, or its fallback
  // "default" provider, before ours: explicitly loading any provider turns
  // the fallback off. Enumerating providers triggers that activation.
  int count = 0;
  OSSL_PROVIDER_do_all(nullptr, CountProvider, &count);
  // Registered through the exception barrier like every dispatch entry.
  if (!OSSL_PROVIDER_add_builtin(
          nullptr, kProviderName,
          &Guarded<OSSL_provider_init_fn, ProviderInit>::Call)) {
    return Internal("OSSL_PROVIDER_add_builtin(hsmstek) failed: " +
                    DrainOpenSslErrors());
  }
  if (reg.hsmstek_provider == nullptr) {
    reg.hsmstek_provider = OSSL_PROVIDER_load(nullptr, kProviderName);
  }
  if (reg.hsmstek_provider == nullptr) {
    return Internal("OSSL_PROVIDER_load(hsmstek) failed: " +
                    DrainOpenSslErrors());
  }
  // Raw-key HMAC needs another provider's HMAC; keep "default" loaded when
  // nothing else offers one.
  if (reg.default_provider == nullptr && !OtherHmacAvailable()) {
    reg.default_provider = OSSL_PROVIDER_load(nullptr, "default");
    if (reg.default_provider == nullptr) {
      return Internal("OSSL_PROVIDER_load(default) failed: " +
                      DrainOpenSslErrors());
    }
  }
  reg.registered = true;
  return Status::Ok();
}

bool IsOurProvider(const OSSL_PROVIDER *provider) {
  if (provider == nullptr) return false;
  const char *name = OSSL_PROVIDER_get0_name(provider);
  return name != nullptr && std::strcmp(name, kProviderName) == 0;
}

}  // namespace
}  // namespace internal

Status RegisterProvider() {
  std::lock_guard<std::mutex> lock(internal::RegistrationMutex());
  internal::Registration &reg = internal::GetRegistration();
  if (reg.registered) return Status::Ok();
  return internal::RegisterLocked(reg);
}

Status EnableProcessWide() {
  Status registered = RegisterProvider();
  if (!registered.ok()) return registered;
  if (EVP_default_properties_is_fips_enabled(nullptr)) {
    return FailedPrecondition(
        "default properties require fips=yes; the hsmstek provider is not "
        "FIPS validated, so process-wide routing cannot work");
  }
  if (!EVP_set_default_properties(nullptr, kPreferProviderQuery)) {
    return Internal(std::string("EVP_set_default_properties(") +
                    kPreferProviderQuery +
                    ") failed: " + internal::DrainOpenSslErrors());
  }
  return Status::Ok();
}

bool IsProviderMac(const EVP_MAC_CTX *ctx) {
  if (ctx == nullptr) return false;
  // EVP_MAC_CTX_get0_mac takes a non-const pointer in 3.0 but only reads.
  const EVP_MAC *mac = EVP_MAC_CTX_get0_mac(const_cast<EVP_MAC_CTX *>(ctx));
  return mac != nullptr && internal::IsOurProvider(EVP_MAC_get0_provider(mac));
}

bool IsProviderCipher(const EVP_CIPHER *cipher) {
  return cipher != nullptr &&
         internal::IsOurProvider(EVP_CIPHER_get0_provider(cipher));
}

Result<const EVP_CIPHER *> TicketCipher() {
  if (const EVP_CIPHER *cipher =
          internal::g_ticket_cipher.load(std::memory_order_acquire)) {
    return cipher;
  }
  Status registered = RegisterProvider();
  if (!registered.ok()) return registered;
  std::lock_guard<std::mutex> lock(internal::RegistrationMutex());
  if (const EVP_CIPHER *cipher = internal::g_ticket_cipher.load()) {
    return cipher;  // fetched by another thread meanwhile
  }
  const EVP_CIPHER *cipher =
      EVP_CIPHER_fetch(nullptr, kCipherName, internal::kAlgorithmProperties);
  if (cipher == nullptr) {
    std::string why = internal::DrainOpenSslErrors();
    if (EVP_default_properties_is_fips_enabled(nullptr)) {
      return FailedPrecondition(
          "the default property fips=yes excludes the hsmstek provider: " +
          why);
    }
    return Internal(std::string("EVP_CIPHER_fetch(") + kCipherName +
                    ") failed: " + why);
  }
  internal::g_ticket_cipher.store(cipher, std::memory_order_release);
  return cipher;
}

OSSL_PARAM KeyRefParam(const TokenKeyRef *const *ref_ptr) {
  // OSSL_PARAM has no const data; OpenSSL only reads a param it is given.
  return OSSL_PARAM_construct_octet_string(
      kKeyRefParam, const_cast<void *>(static_cast<const void *>(ref_ptr)),
      sizeof(*ref_ptr));
}

}  // namespace hsmstek::provider
