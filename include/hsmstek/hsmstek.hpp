// C++ API: RAII owners over the C API in hsmstek.h. Header-only; no
// exceptions are thrown. Same thread-safety as the C functions.
#ifndef HSMSTEK_HSMSTEK_HPP
#define HSMSTEK_HSMSTEK_HPP

#include <hsmstek/hsmstek.h>

#include <memory>
#include <string>
#include <string_view>
#include <utility>

namespace hsmstek {

struct SslCtxDeleter {
  void operator()(SSL_CTX *ctx) const { SSL_CTX_free(ctx); }
};
// Owns an SSL_CTX.
using UniqueSslCtx = std::unique_ptr<SSL_CTX, SslCtxDeleter>;

// Store owns an hsmstek_store. Movable, not copyable. Every SSL_CTX made or
// installed through a Store keeps the underlying key store alive itself, so
// a Store may be destroyed before those contexts.
class Store {
 public:
  // Open opens the store named by `pkcs11_uri` (see hsmstek_store_open). On
  // failure returns an empty Store and, if `error` is not null, sets it to
  // the reason (never containing a PIN).
  static Store Open(std::string_view pkcs11_uri, std::string *error = nullptr) {
    std::string uri(pkcs11_uri);
    hsmstek_store *raw = nullptr;
    if (hsmstek_store_open(uri.c_str(), &raw) != HSMSTEK_OK) {
      if (error != nullptr) *error = hsmstek_last_error();
      return Store();
    }
    return Store(raw);
  }

  Store() = default;
  explicit operator bool() const { return store_ != nullptr; }
  hsmstek_store *get() const { return store_.get(); }

  // Check connects now and reports whether tickets can be issued.
  bool Check(std::string *error = nullptr) const {
    return Report(hsmstek_store_check(store_.get()), error);
  }

  // SetOption sets a store option (see enum hsmstek_option).
  bool SetOption(hsmstek_option option, long value,
                 std::string *error = nullptr) const {
    return Report(hsmstek_store_set_option(store_.get(), option, value), error);
  }

  // NewSslCtx returns a scoped-routing SSL_CTX (hsmstek_ssl_ctx_new), or null.
  UniqueSslCtx NewSslCtx(const SSL_METHOD *method,
                         std::string *error = nullptr) const {
    UniqueSslCtx ctx(hsmstek_ssl_ctx_new(store_.get(), method));
    if (!ctx && error != nullptr) *error = hsmstek_last_error();
    return ctx;
  }

  // Install installs the ticket callback on `ctx` (hsmstek_ssl_ctx_install).
  bool Install(SSL_CTX *ctx, std::string *error = nullptr) const {
    return Report(hsmstek_ssl_ctx_install(store_.get(), ctx), error);
  }

  // Stats returns the store's counters (zeros on an empty Store).
  hsmstek_stats Stats() const {
    hsmstek_stats out{};
    (void)hsmstek_store_stats(store_.get(), &out);
    return out;
  }

  // ResumptionStats returns what became of opened tickets (zeros on an
  // empty Store; hsmstek_store_resumption_stats).
  hsmstek_resumption_stats ResumptionStats() const {
    hsmstek_resumption_stats out{};
    (void)hsmstek_store_resumption_stats(store_.get(), &out, sizeof(out));
    return out;
  }

  // ForwardSecrecy fills `*out` with the active master's current link and
  // horizon (hsmstek_store_forward_secrecy); false, with `*error` set, when
  // the last maintenance pass saw no active master.
  bool ForwardSecrecy(hsmstek_forward_secrecy *out,
                      std::string *error = nullptr) const {
    return Report(
        hsmstek_store_forward_secrecy(store_.get(), out, sizeof(*out)), error);
  }

  // SetPolicy declares what else decides admission on `ctx`, which this or
  // another store was installed on (hsmstek_ssl_ctx_set_policy).
  static bool SetPolicy(SSL_CTX *ctx, const void *declared, size_t len,
                        std::string *error = nullptr) {
    return Report(hsmstek_ssl_ctx_set_policy(ctx, declared, len), error);
  }

 private:
  struct Closer {
    void operator()(hsmstek_store *s) const { hsmstek_store_close(s); }
  };
  explicit Store(hsmstek_store *raw) : store_(raw) {}
  static bool Report(int rc, std::string *error) {
    if (rc != HSMSTEK_OK && error != nullptr) *error = hsmstek_last_error();
    return rc == HSMSTEK_OK;
  }
  std::unique_ptr<hsmstek_store, Closer> store_;
};

}  // namespace hsmstek

#endif  // HSMSTEK_HSMSTEK_HPP
