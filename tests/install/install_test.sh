#!/usr/bin/env bash
# Installs the build into a scratch DESTDIR and builds the example server
# against what was installed, once through pkg-config and once through
# find_package(hsmstek): the headers, library, CLI, hsmstek.pc and the CMake
# package must all be there and usable.
#
# Usage: install_test.sh <build-dir> <source-dir>
set -euo pipefail
build=$1
src=$2
dest=$(mktemp -d /tmp/hsmstek-install.XXXXXX)
trap 'rm -rf "$dest"' EXIT
passed=0
failed=0
check() {
  local what=$1
  shift
  if "$@" >"$dest/last.log" 2>&1; then
    passed=$((passed + 1)); echo "ok   - $what"
  else
    failed=$((failed + 1)); echo "FAIL - $what"; cat "$dest/last.log"
  fi
}

DESTDIR="$dest" cmake --install "$build" --prefix /usr/local >/dev/null
root="$dest/usr/local"
check "public header installed" test -f "$root/include/hsmstek/hsmstek.h"
check "C++ header installed" test -f "$root/include/hsmstek/hsmstek.hpp"
check "CLI installed" test -x "$root/bin/hsmstek"
check "shared library installed" test -e "$root/lib/libhsmstek.so"
check "only the C API is exported" \
  bash -c "! nm -D --defined-only '$root/lib/libhsmstek.so' | awk '\$2 ~ /[TDB]/ {print \$3}' | grep -v '^hsmstek_'"

# nginx modules (when built): installed with the installed libdir as their
# only library search path, never the build tree.
for module in ngx_http_hsmstek_module.so ngx_stream_hsmstek_module.so; do
  [ -e "$build/src/nginx/$module" ] || continue
  installed="$dest/usr/lib/nginx/modules/$module"
  check "$module installed" test -f "$installed"
  check "$module searches only /usr/local/lib for libhsmstek" \
    bash -c "readelf -d '$installed' | grep -E 'R(UN)?PATH' | grep -qF '[/usr/local/lib]'"
  check "the built $module still finds the build tree's library" \
    bash -c "readelf -d '$build/src/nginx/$module' | grep -E 'R(UN)?PATH' | grep -qF '$(cd "$build" && pwd)'"
done

export PKG_CONFIG_PATH="$root/lib/pkgconfig"
export PKG_CONFIG_SYSROOT_DIR="$dest"
check "pkg-config build of the example" \
  bash -c "cc -Wall -Werror -o '$dest/ex-pc' '$src/examples/tls_server.c' \
    \$(pkg-config --cflags --libs hsmstek) -Wl,-rpath,'$root/lib'"
check "the pkg-config build runs (usage)" \
  bash -c "'$dest/ex-pc' 2>&1 | grep -q usage"

mkdir -p "$dest/consumer"
cat >"$dest/consumer/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.25)
project(consumer C)
find_package(hsmstek REQUIRED)
add_executable(ex $src/examples/tls_server.c)
target_link_libraries(ex PRIVATE hsmstek::hsmstek)
CMAKE
check "find_package(hsmstek) build of the example" \
  bash -c "cmake -S '$dest/consumer' -B '$dest/consumer/b' -DCMAKE_PREFIX_PATH='$root' >/dev/null && cmake --build '$dest/consumer/b'"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
