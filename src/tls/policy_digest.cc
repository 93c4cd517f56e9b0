#include "tls/policy_digest.h"

#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include <algorithm>
#include <memory>
#include <vector>

namespace hsmstek::tls {
namespace {

struct MdCtxFree {
  void operator()(EVP_MD_CTX *c) const { EVP_MD_CTX_free(c); }
};

void AddInt(EVP_MD_CTX *md, uint64_t v) {
  uint8_t b[8];
  for (int i = 0; i < 8; ++i) b[i] = static_cast<uint8_t>(v >> (56 - 8 * i));
  EVP_DigestUpdate(md, b, sizeof(b));
}

void AddBytes(EVP_MD_CTX *md, const uint8_t *p, size_t n) {
  AddInt(md, n);
  if (n > 0) EVP_DigestUpdate(md, p, n);
}

// SHA-256 of the DER of each certificate and CRL of `store`, sorted, so
// that the load order does not matter. A CApath lookup's certificates are
// loaded lazily and not seen here: declare them (docs/SECURITY.md).
std::vector<PolicyDigest> ObjectsOf(X509_STORE *store) {
  std::vector<PolicyDigest> out;
  if (store == nullptr) return out;
  if (X509_STORE_lock(store) != 1) return out;
  STACK_OF(X509_OBJECT) *objects = X509_STORE_get0_objects(store);
  for (int i = 0; i < sk_X509_OBJECT_num(objects); ++i) {
    X509_OBJECT *o = sk_X509_OBJECT_value(objects, i);
    unsigned char *der = nullptr;
    int len = -1;
    uint8_t type = 0;
    if (X509 *cert = X509_OBJECT_get0_X509(o)) {
      len = i2d_X509(cert, &der);
      type = 'C';
    } else if (X509_CRL *crl = X509_OBJECT_get0_X509_CRL(o)) {
      len = i2d_X509_CRL(crl, &der);
      type = 'R';
    }
    PolicyDigest d{};
    unsigned int dlen = 0;
    if (len > 0) {
      std::unique_ptr<EVP_MD_CTX, MdCtxFree> md(EVP_MD_CTX_new());
      if (md && EVP_DigestInit_ex(md.get(), EVP_sha256(), nullptr) == 1) {
        EVP_DigestUpdate(md.get(), &type, 1);
        EVP_DigestUpdate(md.get(), der, static_cast<size_t>(len));
        EVP_DigestFinal_ex(md.get(), d.data(), &dlen);
      }
    } else {
      d.fill(0xff);  // an object we cannot encode still counts
    }
    OPENSSL_free(der);
    out.push_back(d);
  }
  X509_STORE_unlock(store);
  std::sort(out.begin(), out.end());
  return out;
}

void AddStore(EVP_MD_CTX *md, X509_STORE *store) {
  std::vector<PolicyDigest> objects = ObjectsOf(store);
  AddInt(md, store == nullptr ? 0 : 1);
  AddInt(md, objects.size());
  for (const PolicyDigest &d : objects)
    EVP_DigestUpdate(md, d.data(), d.size());
}

void AddNames(EVP_MD_CTX *md, const STACK_OF(X509_NAME) * names) {
  AddInt(md, static_cast<uint64_t>(
                 sk_X509_NAME_num(names) < 0 ? 0 : sk_X509_NAME_num(names)));
  for (int i = 0; i < sk_X509_NAME_num(names); ++i) {
    unsigned char *der = nullptr;
    int len = i2d_X509_NAME(sk_X509_NAME_value(names, i), &der);
    AddBytes(md, der, len > 0 ? static_cast<size_t>(len) : 0);
    OPENSSL_free(der);
  }
}

}  // namespace

PolicyDigest ComputePolicyDigest(SSL_CTX *ctx,
                                 std::span<const uint8_t> declared) {
  PolicyDigest out{};
  std::unique_ptr<EVP_MD_CTX, MdCtxFree> md(EVP_MD_CTX_new());
  // On failure: a random digest, which matches no other context (its own
  // tickets then never resume: fail closed).
  auto random = [&out] {
    if (RAND_bytes(out.data(), static_cast<int>(out.size())) != 1) {
      out.fill(0);
    }
    return out;
  };
  if (!md || EVP_DigestInit_ex(md.get(), EVP_sha256(), nullptr) != 1) {
    return random();
  }
  static constexpr char kLabel[] = "hsmstek policy v2";
  EVP_DigestUpdate(md.get(), kLabel, sizeof(kLabel));
  AddInt(md.get(), static_cast<uint32_t>(SSL_CTX_get_verify_mode(ctx)));
  AddInt(md.get(), static_cast<uint32_t>(SSL_CTX_get_verify_depth(ctx)));
  X509_VERIFY_PARAM *param = SSL_CTX_get0_param(ctx);
  AddInt(md.get(), param == nullptr ? 0 : X509_VERIFY_PARAM_get_flags(param));
  AddInt(md.get(),
         param == nullptr
             ? 0
             : static_cast<uint32_t>(X509_VERIFY_PARAM_get_auth_level(param)));
  // Which keys and signatures a client certificate chain may use.
  AddInt(md.get(), static_cast<uint32_t>(SSL_CTX_get_security_level(ctx)));
  AddStore(md.get(), SSL_CTX_get_cert_store(ctx));
  X509_STORE *verify_store = nullptr;
  SSL_CTX_get0_verify_cert_store(ctx, &verify_store);
  AddStore(md.get(), verify_store);
  AddNames(md.get(), SSL_CTX_get_client_CA_list(ctx));
  AddBytes(md.get(), declared.data(), declared.size());
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(md.get(), out.data(), &len) != 1) return random();
  return out;
}

PolicyFingerprint FingerprintOf(SSL_CTX *ctx) {
  PolicyFingerprint f;
  f.verify_mode = SSL_CTX_get_verify_mode(ctx);
  f.verify_depth = SSL_CTX_get_verify_depth(ctx);
  f.store = SSL_CTX_get_cert_store(ctx);
  X509_STORE *verify_store = nullptr;
  SSL_CTX_get0_verify_cert_store(ctx, &verify_store);
  f.verify_store = verify_store;
  if (const X509_VERIFY_PARAM *param = SSL_CTX_get0_param(ctx)) {
    f.param_flags = X509_VERIFY_PARAM_get_flags(param);
    f.auth_level = X509_VERIFY_PARAM_get_auth_level(param);
  }
  f.security_level = SSL_CTX_get_security_level(ctx);
  STACK_OF(X509_NAME) *cas = SSL_CTX_get_client_CA_list(ctx);
  f.client_cas = cas;
  f.client_ca_count = sk_X509_NAME_num(cas);
  return f;
}

}  // namespace hsmstek::tls
