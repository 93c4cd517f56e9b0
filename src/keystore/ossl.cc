#include "keystore/ossl.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

namespace hsmstek::keystore {

Result<std::string> PublicKeyPem(EVP_PKEY *pkey) {
  OsslPtr<BIO> bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_PUBKEY(bio.get(), pkey) != 1) {
    ERR_clear_error();
    return Internal("cannot write the PEM public key");
  }
  char *data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  if (len <= 0 || data == nullptr) return Internal("empty PEM output");
  return std::string(data, static_cast<size_t>(len));
}

Result<OsslPtr<EVP_PKEY>> PublicKeyFromPem(std::string_view pem, size_t max) {
  if (pem.size() > max) {
    return InvalidArgument("public key file is larger than " +
                           std::to_string(max) + " bytes");
  }
  OsslPtr<BIO> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio) return Internal("BIO_new_mem_buf failed");
  OsslPtr<EVP_PKEY> pkey(
      PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr));
  ERR_clear_error();
  if (!pkey) {
    return InvalidArgument(
        "not a PEM public key (expected \"-----BEGIN PUBLIC KEY-----\")");
  }
  return pkey;
}

Result<Bytes> PublicKeyFingerprint(EVP_PKEY *pkey) {
  int len = i2d_PUBKEY(pkey, nullptr);
  if (len <= 0) {
    ERR_clear_error();
    return Internal("cannot encode the public key");
  }
  Bytes der(static_cast<size_t>(len));
  unsigned char *p = der.data();
  if (i2d_PUBKEY(pkey, &p) != len) {
    ERR_clear_error();
    return Internal("cannot encode the public key");
  }
  Bytes digest(EVP_MAX_MD_SIZE);
  unsigned int digest_len = 0;
  if (EVP_Digest(der.data(), der.size(), digest.data(), &digest_len,
                 EVP_sha256(), nullptr) != 1) {
    ERR_clear_error();
    return Internal("SHA-256 failed");
  }
  digest.resize(digest_len);
  return digest;
}

}  // namespace hsmstek::keystore
