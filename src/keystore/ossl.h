// OpenSSL owners and public-key helpers shared by replication.cc and
// signing.cc. Public keys only: nothing here handles secret key bytes.
#pragma once

#include <openssl/bn.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>

#include <memory>
#include <string>
#include <string_view>

#include "common/bytes.h"
#include "common/status.h"

namespace hsmstek::keystore {

// Owners of the OpenSSL objects used to build and parse public keys.
struct OpenSslFree {
  void operator()(EVP_PKEY *p) const { EVP_PKEY_free(p); }
  void operator()(EVP_PKEY_CTX *p) const { EVP_PKEY_CTX_free(p); }
  void operator()(BIO *p) const { BIO_free(p); }
  void operator()(BIGNUM *p) const { BN_free(p); }
  void operator()(OSSL_PARAM_BLD *p) const { OSSL_PARAM_BLD_free(p); }
  void operator()(OSSL_PARAM *p) const { OSSL_PARAM_free(p); }
};
template <typename T>
using OsslPtr = std::unique_ptr<T, OpenSslFree>;

// PublicKeyPem returns `pkey` as a PEM "PUBLIC KEY" (SubjectPublicKeyInfo).
[[nodiscard]] Result<std::string> PublicKeyPem(EVP_PKEY *pkey);

// PublicKeyFromPem parses a PEM "PUBLIC KEY" of at most `max` bytes;
// kInvalidArgument when there is none.
[[nodiscard]] Result<OsslPtr<EVP_PKEY>> PublicKeyFromPem(std::string_view pem,
                                                         size_t max);

// PublicKeyFingerprint returns SHA-256 of the SubjectPublicKeyInfo DER
// (32 bytes): what `openssl pkey -pubin -outform DER | sha256sum` prints.
[[nodiscard]] Result<Bytes> PublicKeyFingerprint(EVP_PKEY *pkey);

}  // namespace hsmstek::keystore
