# Export/import of masters between tokens (docs/SECURITY.md §5). Included from
# src/keystore/CMakeLists.txt; owned by the CLI work.
target_sources(hsmstek_keystore PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/key_lookup.cc
  ${CMAKE_CURRENT_LIST_DIR}/ossl.cc
  ${CMAKE_CURRENT_LIST_DIR}/replication.cc
  ${CMAKE_CURRENT_LIST_DIR}/signing.cc)
