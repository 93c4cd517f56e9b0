#!/bin/bash
# nginx_engine_key_test.sh: every TLS secret of the server in the token.
# The server's EC P-256 key pair is generated in the SoftHSM token
# (pkcs11-tool --keypairgen, sensitive, never extractable), its certificate
# is self-signed through libp11's pkcs11 engine, and nginx loads the key with
# `ssl_certificate_key engine:pkcs11:pkcs11:...` while the hsmstek module
# seals tickets with a master in the same token. This is the set-up of
# scripts/demo.sh.
#
# What it proves: the master initialises the PKCS#11 module (libp11 loads the
# key at configuration time) and both workers, forked afterwards, use the
# same module for the key (libp11) and the tickets (libhsmstek) side by
# side; verified full handshakes (signed in the token) and resumptions over
# TLS 1.2 and 1.3, also after `nginx -s reload`. As root, workers run as
# www-data with access to exactly the token directory and the PIN file.
#
# Usage: nginx_engine_key_test.sh [BUILD_DIR]   (default /work/build-nginx)
# Prints "N passed, N failed"; exits non-zero on any failure.
set -u
build_dir=${1:-/work/build-nginx}
# shellcheck source=nginx_lib.sh
. "$(dirname "$0")/nginx_lib.sh"
engine_dir=$(openssl version -e | sed -n 's/^ENGINESDIR: "\(.*\)"$/\1/p')
lib_init nginx_engine_key "$engine_dir/pkcs11.so"
command -v pkcs11-tool >/dev/null || { echo "no pkcs11-tool (opensc)" >&2; exit 2; }

hsm=$tmp/hsm
new_token "$hsm" web || exit 2
store_id=$(provision "$TOKEN_CONF" "$TOKEN_URI") && [ -n "$store_id" ] || exit 2
pin_file=$TOKEN_PIN_FILE
# libp11 0.4.12 reads a pin-source file whole, newline included.
printf '%s' "$(cat "$pin_file")" >"$pin_file.tmp" && mv "$pin_file.tmp" "$pin_file"
chmod 0600 "$pin_file"
export SOFTHSM2_CONF=$TOKEN_CONF
# nginx loads an engine key with ENGINE_by_id + ENGINE_load_private_key and
# never calls ENGINE_init: the engine must come initialised from OpenSSL's
# configuration (init = 1), which also names the PKCS#11 module.
cat >"$tmp/openssl.cnf" <<EOF
openssl_conf = hsmstek_openssl_init
[hsmstek_openssl_init]
engines = hsmstek_engines
[hsmstek_engines]
pkcs11 = hsmstek_pkcs11
[hsmstek_pkcs11]
engine_id = pkcs11
dynamic_path = $engine_dir/pkcs11.so
MODULE_PATH = $softhsm_so
init = 1
EOF

if ! HSMSTEK_TEST_PIN=$(cat "$pin_file") pkcs11-tool --module "$softhsm_so" \
  --token-label web --login --pin env:HSMSTEK_TEST_PIN --keypairgen \
  --key-type EC:prime256v1 --label server --id 5e01 --usage-sign \
  --sensitive >"$tmp/keygen.out" 2>&1; then
  cat "$tmp/keygen.out" >&2
  exit 2
fi
check server_key_generated_sensitive_never_extractable - \
  grep -q 'Access: *sensitive, always sensitive, never extractable, local' \
  "$tmp/keygen.out"
key_uri="pkcs11:token=web;object=server;type=private?pin-source=file:$pin_file"
if ! OPENSSL_CONF=$tmp/openssl.cnf openssl req -new -x509 -engine pkcs11 -keyform engine -key "$key_uri" \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost -days 2 \
  -out "$tmp/server.crt" >"$tmp/req.out" 2>&1; then
  cat "$tmp/req.out" >&2
  exit 2
fi

# As root: www-data workers get the token directory and the PIN file, and
# may only traverse the directories above them.
workers=2
user_line=
www=
if [ "$(id -u)" -eq 0 ] && getent passwd www-data >/dev/null; then
  www=1
  chmod 0711 "$tmp" "$hsm"
  chown -R www-data:www-data "$hsm/tokens"
  chown www-data:www-data "$pin_file"
  chmod 0400 "$pin_file"
  user_line="user www-data www-data;"
fi
ssl_defaults="ssl_certificate $tmp/server.crt; ssl_certificate_key \"engine:pkcs11:$key_uri\";"
rm -f "$tmp/key.pem" "$tmp/cert.pem" # no key file anywhere

port=$(free_port)
write_conf e "env SOFTHSM2_CONF;" "
    hsmstek_store web \"$TOKEN_URI\";
    server {
        listen 127.0.0.1:$port ssl;
        hsmstek_tickets web;
        $page_location
    }"
if ! OPENSSL_CONF=$tmp/openssl.cnf start_nginx e 'hsmstek: store "web" is ready'; then
  fail "nginx did not start" e
  finish
  exit
fi
if [ -n "$www" ]; then
  check workers_run_as_www_data e \
    test "$(ps -o user= -p "$(worker_pids e | tr '\n' ',' | sed 's/,$//')" | sort -u)" = www-data
fi

tls_extra=(-CAfile "$tmp/server.crt" -verify_return_error -verify_hostname localhost)
# round TAG: verified full handshakes with store tickets and resumptions,
# TLS 1.2 and 1.3. Sessions in $tmp/TAG-*.
round() {
  local v
  for v in 1.2 1.3; do
    tls "$port" "$v" "$tmp/$1-full$v"
    check "$1_tls${v}_verified_handshake_signed_in_token" e \
      grep -q 'Verify return code: 0 (ok)' "$tmp/$1-full$v.out"
    check "$1_tls${v}_ticket_from_store" e fresh_ticket "$tmp/$1-full$v" "$store_id"
    tls "$port" "$v" "$tmp/$1-res$v" "$tmp/$1-full$v.pem"
    check "$1_tls${v}_resumes" e resumed "$tmp/$1-res$v"
  done
}
round start

# Reload: the master loads the key through the engine again (its libp11
# context is already initialised) and forks new workers.
old_workers=$(worker_pids e)
kill -HUP "$(master_pid e)"
reloaded=
for _ in $(seq 1 200); do
  new_workers=$(worker_pids e | grep -vxF "$old_workers" | tr '\n' ' ')
  n_ready=0
  for w in $new_workers; do
    grep -q "\[info\] $w#.*hsmstek: store \"web\" is ready" "$tmp/e/error.log" &&
      n_ready=$((n_ready + 1))
  done
  if [ "$n_ready" -eq 2 ]; then
    reloaded=1
    break
  fi
  sleep 0.1
done
check reload_new_workers_ready e test -n "$reloaded"
for v in 1.2 1.3; do
  tls "$port" "$v" "$tmp/post-reload$v" "$tmp/start-full$v.pem"
  check "tls${v}_session_from_before_reload_resumes" e resumed "$tmp/post-reload$v"
done
round reloaded

check no_worker_crashed e not_in_log e 'exited on signal'
check no_engine_errors e not_in_log e 'PKCS11_'
check no_stale_openssl_errors e not_in_log e 'ignoring stale global SSL error'
check pin_not_in_log e not_in_log e "$(cat "$pin_file")"
stop_nginx e
finish
