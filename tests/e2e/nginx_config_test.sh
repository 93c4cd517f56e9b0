#!/bin/bash
# nginx_config_test.sh: configuration checks of ngx_http_hsmstek_module and
# ngx_stream_hsmstek_module with `nginx -t`. Needs no token: configuration
# must never make a PKCS#11 call, and one case proves it with a PKCS#11
# "module" that records being loaded.
#
# Usage: nginx_config_test.sh [BUILD_DIR]   (default /work/build-nginx)
#   The modules are taken from $HSMSTEK_NGINX_MODULE_DIR if set, else from
#   BUILD_DIR/src/nginx. Exits non-zero if any case fails; prints
#   "N passed, N failed".
set -u

build_dir=${1:-/work/build-nginx}
mod_dir=${HSMSTEK_NGINX_MODULE_DIR:-$build_dir/src/nginx}
nginx_bin=${NGINX:-/usr/sbin/nginx}
stream_so=${NGINX_STREAM_MODULE:-/usr/lib/nginx/modules/ngx_stream_module.so}

for f in "$mod_dir/ngx_http_hsmstek_module.so" \
         "$mod_dir/ngx_stream_hsmstek_module.so" "$nginx_bin" "$stream_so"; do
  if [ ! -e "$f" ]; then
    echo "nginx_config_test: missing $f" >&2
    exit 2
  fi
done

tmp=$(mktemp -d /tmp/hsmstek-nginx-conf.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

passed=0
failed=0

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$tmp/key.pem" -out "$tmp/cert.pem" -subj /CN=localhost -days 2 \
  >/dev/null 2>&1 || { echo "nginx_config_test: openssl req failed" >&2; exit 2; }

head -c 80 /dev/urandom >"$tmp/ticket.key"

# A PKCS#11 "module" that leaves a mark when anything loads it.
marker="$tmp/pkcs11-module-loaded"
cat >"$tmp/mark.c" <<EOF
#include <stdio.h>
__attribute__((constructor)) static void mark(void) {
  FILE *f = fopen("$marker", "a");
  if (f) { fputs("loaded\n", f); fclose(f); }
}
int C_GetFunctionList(void **list) { mark(); *list = 0; return 5; }
EOF
have_marker=0
if cc -shared -fPIC -o "$tmp/mark.so" "$tmp/mark.c" 2>/dev/null; then
  have_marker=1
fi

uri="pkcs11:token=tickets;object=web?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:$tmp/no-such-pin"

# write_conf FILE HTTP_BODY STREAM_BODY: a complete nginx.conf in $tmp that
# listens on 127.0.0.1 only and keeps every path inside $tmp.
write_conf() {
  cat >"$1" <<EOF
load_module $stream_so;
load_module $mod_dir/ngx_http_hsmstek_module.so;
load_module $mod_dir/ngx_stream_hsmstek_module.so;
pid $tmp/nginx.pid;
error_log $tmp/error.log;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $tmp/body;
    proxy_temp_path $tmp/proxy;
    fastcgi_temp_path $tmp/fastcgi;
    uwsgi_temp_path $tmp/uwsgi;
    scgi_temp_path $tmp/scgi;
    ssl_certificate $tmp/cert.pem;
    ssl_certificate_key $tmp/key.pem;
$2
}
stream {
$3
}
EOF
}

# line_of FILE: the line number of the line marked "#@".
line_of() { grep -n '#@' "$1" | head -n 1 | cut -d: -f1; }

# run_t FILE: nginx -t on FILE; output in $tmp/out, status in $rc.
run_t() {
  "$nginx_bin" -t -p "$tmp/" -c "$1" >"$tmp/out" 2>&1
  rc=$?
}

pass() { passed=$((passed + 1)); echo "PASS: $1"; }
fail() {
  failed=$((failed + 1))
  echo "FAIL: $1"
  sed 's/^/    /' "$tmp/out"
}

# expect_ok NAME HTTP STREAM
expect_ok() {
  local conf="$tmp/$1.conf"
  write_conf "$conf" "$2" "$3"
  run_t "$conf"
  if [ "$rc" -eq 0 ] && grep -q "test is successful" "$tmp/out" &&
     ! grep -q "\[emerg\]" "$tmp/out"; then
    pass "$1"
  else
    fail "$1 (expected success, rc=$rc)"
  fi
}

# expect_fail NAME HTTP STREAM MESSAGE: nginx -t must fail and print
# "[emerg] MESSAGE in FILE:LINE" with LINE = the line marked "#@".
expect_fail() {
  local conf="$tmp/$1.conf"
  write_conf "$conf" "$2" "$3"
  local line
  line=$(line_of "$conf")
  run_t "$conf"
  local want="[emerg] ...: $4 ... in $conf:$line"
  if [ "$rc" -ne 0 ] && grep -F "[emerg]" "$tmp/out" | grep -F -- "$4" |
       grep -qF " in $conf:$line" && grep -q "test failed" "$tmp/out"; then
    pass "$1"
  else
    fail "$1 (expected rc!=0 and: $want; rc=$rc)"
  fi
}

http_server='
    server {
        listen 127.0.0.1:18443 ssl;
        server_name a.test;
        hsmstek_tickets web;
        location = /hsmstek { hsmstek_status; }
    }'

# --- valid configurations -------------------------------------------------

expect_ok valid_http_and_stream "
    hsmstek_store web \"$uri\";
    hsmstek_store api \"$uri\" clock_skew=30s tls13_renew=off;
    hsmstek_tickets api;
$http_server
    server {
        listen 127.0.0.1:18444 ssl;
        server_name b.test;
    }
    server {
        listen 127.0.0.1:18445 ssl;
        hsmstek_tickets off;
        ssl_session_ticket_key $tmp/ticket.key;
    }
    server {
        listen 127.0.0.1:18446 ssl;
        ssl_session_tickets off;
        hsmstek_tickets web;
    }
    server {
        listen 127.0.0.1:18080;
        location = /metrics { hsmstek_status; }
    }" "
    hsmstek_store tcp \"$uri\";
    hsmstek_store other \"$uri\";
    server {
        listen 127.0.0.1:18543 ssl;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        hsmstek_tickets tcp;
        return ok;
    }
    server {
        listen 127.0.0.1:18544 ssl;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        hsmstek_tickets off;
        return ok;
    }"

# Store declared after the servers that use it (resolved at merge).
expect_ok valid_store_after_server "
$http_server
    hsmstek_store web \"$uri\";" ""

expect_ok valid_no_stores "
    server { listen 127.0.0.1:18080; location / { hsmstek_status; } }" ""

# hsmstek_tickets in a server without ssl is accepted and unused.
expect_ok valid_tickets_without_ssl "
    hsmstek_store web \"$uri\";
    server { listen 127.0.0.1:18080; hsmstek_tickets web; }" ""

expect_ok valid_pin_value_warns "
    hsmstek_store web \"pkcs11:token=t;object=web?pin-value=1234\";
$http_server" ""
if grep -q "\[warn\].*carries a \"pin-value\"" "$tmp/out" &&
   ! grep -q "1234" "$tmp/out"; then
  pass pin_value_warning_without_pin
else
  fail "pin_value_warning_without_pin (warning expected, PIN must not appear)"
fi

# Name-based virtual servers that differ from their address's default
# server: a different store, or "off".
expect_ok valid_sni_mismatch_warns "
    hsmstek_store web \"$uri\";
    hsmstek_store api \"$uri\";
    server { listen 127.0.0.1:18443 ssl default_server; server_name a.test;
             hsmstek_tickets web; }
    server { listen 127.0.0.1:18443 ssl; server_name b.test;
             hsmstek_tickets api; }
    server { listen 127.0.0.1:18443 ssl; server_name c.test;
             hsmstek_tickets off; }
    server { listen 127.0.0.1:18443 ssl; server_name d.test; }" ""
sni_conf="$tmp/valid_sni_mismatch_warns.conf"
warn_re="\\[warn\\] [0-9#]*: hsmstek: the server in $sni_conf"
if grep -q "$warn_re:[0-9]* uses store \"api\", but on 127.0.0.1:18443 its default server in $sni_conf:[0-9]* uses store \"web\"" "$tmp/out" &&
   grep -q "$warn_re:[0-9]* has \"hsmstek_tickets off\", but on 127.0.0.1:18443 its default server in $sni_conf:[0-9]* uses store \"web\": connections that reach it by SNI get no session tickets" "$tmp/out" &&
   [ "$(grep -c "\[warn\].*hsmstek: the server in" "$tmp/out")" -eq 2 ]; then
  pass sni_mismatch_warnings
else
  fail "sni_mismatch_warnings (two warnings expected, none for d.test)"
fi
# d.test has no hsmstek_tickets: it adopts the default server's store.
if grep -q "hsmstek: the server in $sni_conf:[0-9]* has no \"hsmstek_tickets\"; on 127.0.0.1:18443 it uses store \"web\" of the default server" "$tmp/out"; then
  pass sni_virtual_server_adopts_default_store
else
  fail sni_virtual_server_adopts_default_store
fi

# --- errors ---------------------------------------------------------------

# A virtual server with a store whose default server has none would get
# tickets under nginx's own keys (OpenSSL runs the default server's ticket
# keys): nginx -t fails, naming both servers and the fix.
sni_conf="$tmp/http_sni_default_without_store.conf"
write_conf "$sni_conf" "
    hsmstek_store web \"$uri\";
    server { listen 127.0.0.1:18444 ssl default_server; server_name e.test; }
    server { listen 127.0.0.1:18444 ssl; server_name f.test;
             hsmstek_tickets web; }" ""
run_t "$sni_conf"
if [ "$rc" -ne 0 ] && grep -q "test failed" "$tmp/out" &&
   grep -F "[emerg]" "$tmp/out" | grep -q "hsmstek: the server in $sni_conf:[0-9]* uses store \"web\", but on 127.0.0.1:18444 its default server in $sni_conf:[0-9]* has none: connections that reach it by SNI would get session tickets under nginx's own keys; set \"hsmstek_tickets web\" on the default server in $sni_conf:[0-9]*, or \"ssl_session_tickets off\" on the server in $sni_conf:[0-9]*"; then
  pass http_sni_default_without_store
else
  fail "http_sni_default_without_store (nginx -t must fail naming both servers; rc=$rc)"
fi

# TLS 1.3 early data with a store: replayable on every server sharing the
# store, so only with an explicit opt-in (docs/SECURITY.md).
expect_fail http_early_data_without_opt_in "
    hsmstek_store web \"$uri\";
    server { #@
        listen 127.0.0.1:18443 ssl;
        ssl_early_data on;
        hsmstek_tickets web;
    }" "" \
  'has "ssl_early_data on" and uses store "web"'

expect_fail http_early_data_inherited_store_without_opt_in "
    hsmstek_store web \"$uri\";
    hsmstek_tickets web;
    server {
        listen 127.0.0.1:18443 ssl;
        hsmstek_early_data on;
    }
    server { #@
        listen 127.0.0.1:18444 ssl;
        ssl_early_data on;
    }" "" \
  'has "ssl_early_data on" and uses store "web"'

expect_ok valid_early_data_opt_in "
    hsmstek_store web \"$uri\";
    server {
        listen 127.0.0.1:18443 ssl;
        ssl_early_data on;
        hsmstek_tickets web;
        hsmstek_early_data on;
    }" ""

expect_ok valid_early_data_opt_in_inherited "
    hsmstek_store web \"$uri\";
    hsmstek_tickets web;
    ssl_early_data on;
    hsmstek_early_data on;
    server { listen 127.0.0.1:18443 ssl; }" ""

expect_ok valid_early_data_without_store "
    hsmstek_store web \"$uri\";
    server {
        listen 127.0.0.1:18443 ssl;
        ssl_early_data on;
        hsmstek_tickets off;
    }" ""

expect_fail http_unknown_store "
    hsmstek_store web \"$uri\";
    server {
        listen 127.0.0.1:18443 ssl;
        hsmstek_tickets nope; #@
    }" "" \
  'unknown hsmstek store "nope" in "hsmstek_tickets" directive'

expect_fail http_unknown_store_inherited "
    hsmstek_store web \"$uri\";
    hsmstek_tickets nope; #@
    server { listen 127.0.0.1:18443 ssl; }" "" \
  'unknown hsmstek store "nope" in "hsmstek_tickets" directive'

expect_fail http_duplicate_store "
    hsmstek_store web \"$uri\";
    hsmstek_store web \"$uri\"; #@" "" \
  "duplicate hsmstek store \"web\" in \"hsmstek_store\" directive (first defined in $tmp/http_duplicate_store.conf:"

expect_fail http_uri_not_pkcs11 "
    hsmstek_store web \"file:/etc/keys?object=web\"; #@" "" \
  'invalid PKCS#11 URI of hsmstek store "web" in "hsmstek_store" directive: it does not start with "pkcs11:"'

expect_fail http_uri_without_object "
    hsmstek_store web \"pkcs11:token=tickets?object=web\"; #@" "" \
  'invalid PKCS#11 URI of hsmstek store "web" in "hsmstek_store" directive: it has no "object=" path attribute'

expect_fail http_uri_empty_object "
    hsmstek_store web \"pkcs11:token=tickets;object=\"; #@" "" \
  'it has no "object=" path attribute'

expect_fail http_bad_store_name "
    hsmstek_store \"we b\" \"$uri\"; #@" "" \
  'invalid store name "we b" in "hsmstek_store" directive'

expect_fail http_store_named_off "
    hsmstek_store off \"$uri\"; #@" "" \
  'invalid store name "off" in "hsmstek_store" directive'

expect_fail http_bad_clock_skew "
    hsmstek_store web \"$uri\" clock_skew=2h; #@" "" \
  'invalid "clock_skew" value "2h" of hsmstek store "web"'

expect_fail http_bad_option "
    hsmstek_store web \"$uri\" rotate=1d; #@" "" \
  'invalid parameter "rotate=1d" of hsmstek store "web"'

# Review finding 8: an argument that may carry a PIN is never echoed,
# whatever the case of its scheme or wherever it stands.
expect_ok http_uri_scheme_any_case "
    hsmstek_store web \"PKCS11:token=tickets;object=web?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:$tmp/no-such-pin\";" ""
expect_no_pin() {
  local conf="$tmp/$1.conf"
  write_conf "$conf" "$2" ""
  run_t "$conf"
  if [ "$rc" -ne 0 ] && grep -qF "$3" "$tmp/out" &&
     ! grep -q "s3cret" "$tmp/out"; then
    pass "$1"
  else
    fail "$1 (expected rc!=0, \"$3\" and no PIN; rc=$rc)"
  fi
}
expect_no_pin http_uri_after_option_not_echoed "
    hsmstek_store web \"$uri\" clock_skew=1s \"pkcs11:token=b;object=web?pin-value=s3cret\";" \
  'invalid parameter #4 of hsmstek store "web" (not shown'
expect_no_pin http_uri_as_option_value_not_echoed "
    hsmstek_store web \"$uri\" \"clock_skew=pkcs11:token=b;object=web?pin-value=s3cret\";" \
  'invalid parameter #3 of hsmstek store "web" (not shown'
expect_no_pin http_pin_option_not_echoed "
    hsmstek_store web \"$uri\" \"pin-value=s3cret\";" \
  'invalid parameter #3 of hsmstek store "web" (not shown'

expect_fail http_store_missing_uri "
    hsmstek_store web; #@" "" \
  'invalid number of arguments in "hsmstek_store" directive'

expect_fail http_store_in_server "
    server {
        listen 127.0.0.1:18443 ssl;
        hsmstek_store web \"$uri\"; #@
    }" "" \
  '"hsmstek_store" directive is not allowed here'

expect_fail http_tickets_in_location "
    hsmstek_store web \"$uri\";
    server {
        listen 127.0.0.1:18443 ssl;
        location / {
            hsmstek_tickets web; #@
        }
    }" "" \
  '"hsmstek_tickets" directive is not allowed here'

expect_fail http_tickets_duplicate "
    hsmstek_store web \"$uri\";
    server {
        listen 127.0.0.1:18443 ssl;
        hsmstek_tickets web;
        hsmstek_tickets off; #@
    }" "" \
  '"hsmstek_tickets" directive is duplicate'

expect_fail http_status_in_server "
    server {
        listen 127.0.0.1:18080;
        hsmstek_status; #@
    }" "" \
  '"hsmstek_status" directive is not allowed here'

expect_fail http_status_with_argument "
    server {
        listen 127.0.0.1:18080;
        location / { hsmstek_status on; } #@
    }" "" \
  'invalid number of arguments in "hsmstek_status" directive'

expect_fail stream_unknown_store "" "
    hsmstek_store tcp \"$uri\";
    server {
        listen 127.0.0.1:18543 ssl;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        hsmstek_tickets web; #@
        return ok;
    }" \
  'unknown hsmstek store "web" in "hsmstek_tickets" directive'

expect_fail stream_http_store_not_visible "
    hsmstek_store web \"$uri\";" "
    server {
        listen 127.0.0.1:18543 ssl;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        hsmstek_tickets web; #@
        return ok;
    }" \
  'unknown hsmstek store "web" in "hsmstek_tickets" directive'

expect_fail stream_duplicate_store "" "
    hsmstek_store tcp \"$uri\";
    hsmstek_store tcp \"$uri\"; #@" \
  'duplicate hsmstek store "tcp" in "hsmstek_store" directive'

expect_fail stream_bad_uri "" "
    hsmstek_store tcp \"pkcs11:token=x\"; #@" \
  'invalid PKCS#11 URI of hsmstek store "tcp" in "hsmstek_store" directive'

expect_fail stream_tickets_in_main "" "
    hsmstek_store tcp \"$uri\";
    hsmstek_tickets tcp; #@" \
  '"hsmstek_tickets" directive is not allowed here'

expect_fail stream_status_not_allowed "" "
    server {
        listen 127.0.0.1:18543;
        hsmstek_status; #@
    }" \
  '"hsmstek_status" directive is not allowed here'

# --- no PKCS#11 call at configuration time --------------------------------

if [ "$have_marker" -eq 1 ]; then
  mark_uri="pkcs11:token=tickets;object=web?module-path=$tmp/mark.so"
  conf="$tmp/marker.conf"
  write_conf "$conf" "
    hsmstek_store web \"$mark_uri\";
$http_server" "
    hsmstek_store tcp \"$mark_uri\";
    server {
        listen 127.0.0.1:18543 ssl;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        hsmstek_tickets tcp;
        return ok;
    }"
  run_t "$conf"
  if [ "$rc" -eq 0 ] && [ ! -e "$marker" ]; then
    pass no_pkcs11_module_loaded_by_nginx_t
  else
    fail "no_pkcs11_module_loaded_by_nginx_t (rc=$rc, marker: $(cat "$marker" 2>/dev/null))"
  fi
  # The -s signaller parses the configuration too; with no master running
  # it then fails to read the pid file, but must not have loaded the module.
  "$nginx_bin" -s reload -p "$tmp/" -c "$conf" >"$tmp/out" 2>&1
  if grep -q "nginx.pid" "$tmp/out" && [ ! -e "$marker" ]; then
    pass no_pkcs11_module_loaded_by_signaller
  else
    fail "no_pkcs11_module_loaded_by_signaller (marker: $(cat "$marker" 2>/dev/null))"
  fi
else
  echo "SKIP: no C compiler for the marker PKCS#11 module"
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
