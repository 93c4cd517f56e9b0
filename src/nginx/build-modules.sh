#!/bin/bash
# build-modules.sh: builds ngx_http_hsmstek_module.so and
# ngx_stream_hsmstek_module.so the way Debian builds third-party dynamic
# modules (debhelper's nginx_mod build system): nginx-dev's sources are
# configured with the flags the packaged nginx was built with (conf_flags)
# plus --with-compat, and only the dynamic modules are compiled.
#
# Differences from Debian's helper: nginx-dev's tree is copied into the build
# directory (configure writes a Makefile into the tree it runs in, and
# /usr/share/nginx/src is a system directory), and only our two .so targets
# are made, because --with-stream=dynamic (needed for the stream headers and
# NGX_STREAM_SSL) would also ask for ngx_stream_module.so, whose sources
# nginx-dev does not ship.
#
# Usage:
#   build-modules.sh configure ENV_FILE   # (re)create the tree + configure
#   build-modules.sh build ENV_FILE       # compile, copy the .so to OUT_DIR
# ENV_FILE sets NGINX_SRC, WORK_DIR, OUT_DIR, ADDON_DIR, HSMSTEK_INCLUDE_DIR,
# HSMSTEK_LIB_DIR and HSMSTEK_RPATH (colon-separated).
set -euo pipefail

step=${1:?usage: build-modules.sh configure|build ENV_FILE}
env_file=${2:?usage: build-modules.sh configure|build ENV_FILE}
# shellcheck disable=SC1090
. "$env_file"

tree="$WORK_DIR/nginx-src"
modules=(ngx_http_hsmstek_module ngx_stream_hsmstek_module)

case "$step" in
  configure)
    rm -rf "$tree"
    mkdir -p "$WORK_DIR"
    cp -a "$NGINX_SRC" "$tree"
    cd "$tree"
    # shellcheck disable=SC1091
    . ./conf_flags
    cflags="-g -O2 -fstack-protector-strong -Wformat -Werror=format-security"
    cppflags="-D_FORTIFY_SOURCE=2"
    ldflags="-Wl,-z,relro -Wl,-z,now"
    if command -v dpkg-buildflags >/dev/null; then
      cflags=$(cd "$ADDON_DIR" && dpkg-buildflags --get CFLAGS)
      cppflags=$(cd "$ADDON_DIR" && dpkg-buildflags --get CPPFLAGS)
      ldflags=$(cd "$ADDON_DIR" && dpkg-buildflags --get LDFLAGS)
    fi
    export HSMSTEK_NGX_INCLUDE_DIR="$HSMSTEK_INCLUDE_DIR"
    export HSMSTEK_NGX_LIBS="-L$HSMSTEK_LIB_DIR -lhsmstek -Wl,-rpath,$HSMSTEK_RPATH"
    ./configure \
      --with-cc-opt="$cflags -fPIC $cppflags" \
      --with-ld-opt="$ldflags -fPIC" \
      "${NGX_CONF_FLAGS[@]}" \
      --with-compat \
      --with-stream=dynamic --with-stream_ssl_module \
      --add-dynamic-module="$ADDON_DIR/http" \
      --add-dynamic-module="$ADDON_DIR/stream" \
      >"$WORK_DIR/configure.log" 2>&1 || {
        tail -n 30 "$WORK_DIR/configure.log" >&2
        echo "build-modules.sh: nginx configure failed, see" \
          "$WORK_DIR/configure.log" >&2
        exit 1
      }
    ;;
  build)
    cd "$tree"
    targets=()
    for m in "${modules[@]}"; do targets+=("objs/$m.so"); done
    # Our own make: not part of the outer build's jobserver.
    env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -f objs/Makefile "${targets[@]}"
    mkdir -p "$OUT_DIR"
    for m in "${modules[@]}"; do
      cp "objs/$m.so" "$OUT_DIR/$m.so.tmp"
      mv -f "$OUT_DIR/$m.so.tmp" "$OUT_DIR/$m.so"
    done
    ;;
  *)
    echo "build-modules.sh: unknown step '$step'" >&2
    exit 2
    ;;
esac
