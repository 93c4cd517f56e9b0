# Pure (no PKCS#11) formats of the key store: durations, RFC 3339 times,
# policy text, key names and derivation data, legacy key files, bundles.
# Included from src/keystore/CMakeLists.txt.
add_library(hsmstek_keystore_formats STATIC
  ${CMAKE_CURRENT_LIST_DIR}/bundle.cc
  ${CMAKE_CURRENT_LIST_DIR}/duration.cc
  ${CMAKE_CURRENT_LIST_DIR}/key_name.cc
  ${CMAKE_CURRENT_LIST_DIR}/legacy_file.cc
  ${CMAKE_CURRENT_LIST_DIR}/policy.cc
  ${CMAKE_CURRENT_LIST_DIR}/time_format.cc)
target_link_libraries(hsmstek_keystore_formats
  PUBLIC hsmstek_common OpenSSL::Crypto)
