#!/usr/bin/env bash
# scripts/demo.sh: the README's first command. On a Debian bookworm machine,
# as root, it
#   1. installs what is missing (scripts/install-deps.sh) and builds the
#      hsmstek tool and the nginx modules into ./build (reused if present);
#   2. creates a SoftHSM2 token under a work directory (never /etc/softhsm or
#      /var/lib/softhsm), provisions a ticket store in it, and generates the
#      server's EC P-256 key pair IN the token, plus a self-signed
#      certificate signed by that key through libp11's pkcs11 engine;
#   3. starts Debian's nginx (127.0.0.1 only, TLS 1.2 and 1.3) with the
#      hsmstek modules: session tickets are sealed and opened in the token
#      and the TLS private key is used through the engine, so neither
#      long-term secret of the server (ticket keys, private key) is on disk
#      or in nginx's memory as bytes;
#   4. resumes sessions with openssl s_client, gnutls-cli and curl over both
#      protocol versions, prints a report and the hsmstek_status counters,
#      stops nginx (by its pid) and exits non-zero if a resumption failed.
#
# Usage: scripts/demo.sh [--keep-running] [--work DIR] [--port N]
#   --keep-running  leave nginx running and print how to try it and stop it
#   --work DIR      work directory (default /tmp/hsmstek-demo); re-running
#                   replaces the token and configuration made by a previous
#                   run there
#   --port N        TLS port on 127.0.0.1 (default 8443)
# Environment: BUILD_DIR (default ./build), JOBS (default: nproc).
#
# nginx's workers run as www-data (when run as root). They get exactly the
# access they need: the token directory and the PIN file are theirs; the
# work directory is only traversable; the SO PIN stays root's.
set -euo pipefail

work=/tmp/hsmstek-demo
port=8443
keep=0
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --keep-running) keep=1 ;;
    --work) work=${2:?--work needs a directory}; shift ;;
    --work=*) work=${1#--work=} ;;
    --port) port=${2:?--port needs a number}; shift ;;
    --port=*) port=${1#--port=} ;;
    -h | --help) usage; exit 0 ;;
    *) echo "demo.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done
if ! [[ "$port" =~ ^[0-9]+$ ]] || [ "$port" -lt 1024 ] || [ "$port" -gt 65535 ]; then
  echo "demo.sh: --port must be a number from 1024 to 65535" >&2
  exit 2
fi

case "$work" in /*) ;; *) work=$PWD/$work ;; esac
cd "$(dirname "$0")/.."
top=$(pwd)
build=${BUILD_DIR:-build}
case "$build" in /*) ;; *) build=$top/$build ;; esac
jobs=${JOBS:-$(nproc)}
softhsm=/usr/lib/softhsm/libsofthsm2.so
nginx_bin=/usr/sbin/nginx
stream_so=/usr/lib/nginx/modules/ngx_stream_module.so

say() { printf '%s\n' "$*"; }
step() { printf '\n== %s\n' "$*"; }
die() {
  printf 'demo.sh: %s\n' "$*" >&2
  exit 1
}
# quiet LOG CMD...: runs CMD with its output in LOG; shows the end of LOG if
# it fails.
quiet() {
  local log=$1
  shift
  if ! "$@" >"$log" 2>&1; then
    tail -n 25 "$log" | sed 's/^/    /' >&2
    die "failed: $* (full log: $log)"
  fi
}

# --- work directory (checked before anything is built) ----------------------

# The work directory must be ours: new, empty, or made by an earlier run
# (marker file). Only its hsm/, nginx/ and clients/ subdirectories are ever
# removed.
[[ "$work" =~ ^/[A-Za-z0-9._/-]+$ ]] ||
  die "--work must be a path of A-Z a-z 0-9 . _ - / characters"
marker=$work/.hsmstek-demo
if [ -L "$work" ]; then die "$work is a symbolic link"; fi
if [ -d "$work" ] && [ ! -f "$marker" ] && [ -n "$(ls -A "$work")" ]; then
  die "$work exists and was not made by demo.sh; choose another --work"
fi
if [ -d "$work" ] && [ "$(stat -c %u "$work")" != "$(id -u)" ]; then
  die "$work belongs to another user"
fi
mkdir -p "$work"
touch "$marker"
hsm=$work/hsm
ngx=$work/nginx

# A previous --keep-running demo in this directory: stop it by its pid.
if [ -f "$ngx/nginx.pid" ]; then
  old=$(cat "$ngx/nginx.pid")
  if [[ "$old" =~ ^[0-9]+$ ]] &&
    tr '\0' ' ' <"/proc/$old/cmdline" 2>/dev/null | grep -q "$ngx/nginx.conf"; then
    say "stopping the demo nginx left running before (pid $old)"
    kill -QUIT "$old"
    for _ in $(seq 1 100); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
  fi
fi
clients=$work/clients # the clients' sessions and outputs
rm -rf "$hsm" "$ngx" "$clients"
mkdir -p "$ngx"
mkdir -m 0700 "$clients"

# --- packages and build ----------------------------------------------------

step "1. packages and build"
bash scripts/install-deps.sh
mkdir -p "$build"
if [ -f "$build/CMakeCache.txt" ]; then
  quiet "$build/demo-configure.log" cmake -S "$top" -B "$build"
else
  quiet "$build/demo-configure.log" cmake -S "$top" -B "$build" -G Ninja \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo
fi
say "building hsmstek and the nginx modules in $build (log: $build/demo-build.log)"
quiet "$build/demo-build.log" cmake --build "$build" -j "$jobs" \
  --target hsmstek_cli nginx_modules
cli=$build/src/cli/hsmstek
mods=$build/src/nginx
for f in "$cli" "$mods/ngx_http_hsmstek_module.so" \
  "$mods/ngx_stream_hsmstek_module.so" "$nginx_bin" "$stream_so" "$softhsm"; do
  [ -e "$f" ] || die "missing $f"
done

ngx_pid=
stop_nginx() {
  if [ -n "$ngx_pid" ]; then
    kill -QUIT "$ngx_pid" 2>/dev/null || true
    wait "$ngx_pid" 2>/dev/null || true
    ngx_pid=
  fi
}
trap stop_nginx EXIT

# --- token, ticket store, server key ---------------------------------------

step "2. SoftHSM token, ticket store and server key (work directory $work)"
token_env=$(hsm/make-token.sh "$hsm" demo 2>"$work/make-token.log") ||
  die "hsm/make-token.sh failed: $(cat "$work/make-token.log")"
eval "$token_env" # SOFTHSM2_CONF and HSMSTEK_URI (store label "tickets")
pin_file=$hsm/demo.pin
# libp11 0.4.12 (bookworm) takes a pin-source file's whole content as the
# PIN, newline included; hsmstek accepts it either way.
printf '%s' "$(cat "$pin_file")" >"$pin_file.tmp"
chmod 0600 "$pin_file.tmp"
mv "$pin_file.tmp" "$pin_file"
export SOFTHSM2_CONF
say "token \"demo\": $hsm/tokens (config $SOFTHSM2_CONF)"
# OpenSSL configuration for `openssl req` and nginx: libp11's pkcs11 engine,
# initialised (nginx calls ENGINE_load_private_key but never ENGINE_init),
# on SoftHSM.
engine_dir=$(openssl version -e | sed -n 's/^ENGINESDIR: "\(.*\)"$/\1/p')
[ -f "$engine_dir/pkcs11.so" ] ||
  die "libp11's engine $engine_dir/pkcs11.so is missing (libengine-pkcs11-openssl)"
openssl_conf=$ngx/openssl.cnf
cat >"$openssl_conf" <<EOF
openssl_conf = hsmstek_demo
[hsmstek_demo]
engines = hsmstek_demo_engines
[hsmstek_demo_engines]
pkcs11 = hsmstek_demo_pkcs11
[hsmstek_demo_pkcs11]
engine_id = pkcs11
dynamic_path = $engine_dir/pkcs11.so
MODULE_PATH = $softhsm
init = 1
EOF

quiet "$work/provision.log" "$cli" provision "$HSMSTEK_URI" \
  --period 1h --decrypt-window 24h
store_id=$(awk '/store id:/ { print $3; exit }' "$work/provision.log")
[ -n "$store_id" ] || die "no store id in $work/provision.log"
say "ticket store \"tickets\": master key $store_id (derive-only AES-256, sensitive, never extractable)"

# The server's key pair, generated in the token. pkcs11-tool reads the PIN
# from the environment (env:NAME), so it is not on its command line.
DEMO_USER_PIN=$(cat "$pin_file") quiet "$work/keypairgen.log" \
  pkcs11-tool --module "$softhsm" --token-label demo --login \
  --pin env:DEMO_USER_PIN --keypairgen --key-type EC:prime256v1 \
  --label server --id 5e01 --usage-sign --sensitive
grep -q 'never extractable' "$work/keypairgen.log" ||
  die "the server key is extractable: $(cat "$work/keypairgen.log")"
key_uri="pkcs11:token=demo;object=server;type=private?pin-source=file:$pin_file"
# A self-signed certificate, signed in the token through libp11's engine.
OPENSSL_CONF=$openssl_conf quiet "$work/req.log" \
  openssl req -new -x509 -engine pkcs11 -keyform engine -key "$key_uri" -subj /CN=localhost -days 30 -sha256 \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -out "$ngx/server.crt"
say "server key: EC P-256 \"server\" in the token (sensitive, never extractable); certificate $ngx/server.crt"

# --- permissions for nginx's workers ---------------------------------------

user_line=
if [ "$(id -u)" -eq 0 ]; then
  # Workers (www-data) read and write the token directory and read the PIN
  # file; everything else in the work directory stays root's. The master
  # (root) also uses the token: it loads the server key at start.
  chmod 0711 "$work" "$hsm"
  chown -R www-data:www-data "$hsm/tokens"
  chown www-data:www-data "$pin_file"
  chmod 0400 "$pin_file"
  runuser -u www-data -- test -r "$pin_file" -a -w "$hsm/tokens" ||
    die "www-data cannot reach $hsm (is a parent of $work closed to other users?); use --work under /tmp or /srv"
  user_line="user www-data www-data;"
fi

# --- nginx -----------------------------------------------------------------

step "3. nginx on https://localhost:$port/ (127.0.0.1 only)"
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  die "127.0.0.1:$port is in use; choose another --port"
fi
conf=$ngx/nginx.conf
cat >"$conf" <<EOF
# Written by scripts/demo.sh.
load_module $stream_so;
load_module $mods/ngx_http_hsmstek_module.so;
load_module $mods/ngx_stream_hsmstek_module.so;
$user_line
daemon off;
worker_processes 1;
pid $ngx/nginx.pid;
error_log $ngx/error.log info;
# nginx clears its workers' environment: keep SoftHSM's configuration.
env SOFTHSM2_CONF;
events { worker_connections 64; }
http {
    access_log $ngx/access.log;
    client_body_temp_path $ngx/tmp-body;
    proxy_temp_path $ngx/tmp-proxy;
    fastcgi_temp_path $ngx/tmp-fastcgi;
    uwsgi_temp_path $ngx/tmp-uwsgi;
    scgi_temp_path $ngx/tmp-scgi;
    default_type text/plain;

    # The ticket store: master key "tickets" in token "demo".
    hsmstek_store demo "$HSMSTEK_URI";

    server {
        listen 127.0.0.1:$port ssl;
        server_name localhost;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate $ngx/server.crt;
        # The private key stays in the token: libp11's pkcs11 engine signs.
        ssl_certificate_key "engine:pkcs11:$key_uri";
        # Tickets sealed and opened in the token. (nginx's default
        # "ssl_session_cache none" keeps no sessions: every resumption is a
        # ticket.)
        hsmstek_tickets demo;

        location / {
            return 200 "protocol=\$ssl_protocol reused=\$ssl_session_reused worker=\$pid\n";
        }
        location = /hsmstek-status {
            hsmstek_status;
            allow 127.0.0.1;
            deny all;
        }
    }
}
EOF
OPENSSL_CONF=$openssl_conf quiet "$work/nginx-t.log" "$nginx_bin" -t -p "$ngx/" -c "$conf"
: >"$ngx/error.log"
if [ "$keep" = 1 ]; then
  # Its own session: it outlives this script and the terminal.
  OPENSSL_CONF=$openssl_conf setsid "$nginx_bin" -p "$ngx/" -c "$conf" \
    >>"$ngx/nginx.out" 2>&1 </dev/null &
else
  OPENSSL_CONF=$openssl_conf "$nginx_bin" -p "$ngx/" -c "$conf" \
    >>"$ngx/nginx.out" 2>&1 </dev/null &
fi
ngx_pid=$!
ready=
for _ in $(seq 1 200); do
  if grep -q 'hsmstek: store "demo" is ready' "$ngx/error.log"; then
    ready=1
    break
  fi
  if grep -qE 'hsmstek: (store "demo" is not ready|cannot open)' "$ngx/error.log" ||
    ! kill -0 "$ngx_pid" 2>/dev/null; then
    break
  fi
  sleep 0.1
done
if [ -z "$ready" ]; then
  tail -n 15 "$ngx/error.log" "$ngx/nginx.out" 2>/dev/null | sed 's/^/    /' >&2
  die "nginx did not become ready (log: $ngx/error.log)"
fi
say "nginx master pid $ngx_pid, worker $(pgrep -P "$ngx_pid" | tr '\n' ' ')(${user_line:+www-data})"

# --- clients ---------------------------------------------------------------

step "4. resuming sessions with real clients"
say "(each client: a full handshake, then a new connection presenting its ticket;"
say " \"resumed\" = the client says so and nginx's \$ssl_session_reused is \"r\")"
url=https://localhost:$port/
request=$'GET / HTTP/1.0\r\nHost: localhost\r\n\r\n'
rows=()
failures=0
# row CLIENT PROTOCOL OK DETAIL [NOT_EXPECTED_DETAIL]: OK is 1 if the
# session resumed. With NOT_EXPECTED_DETAIL, no resumption is expected (the
# client asks for no ticket) and not resuming is no failure.
row() {
  local verdict=yes detail=$4
  if [ "$3" != 1 ] && [ $# -ge 5 ]; then
    verdict=no
    detail=$5
  elif [ "$3" != 1 ]; then
    verdict=NO
    failures=$((failures + 1))
  fi
  rows+=("$(printf '%-20s %-9s %-8s %s' "$1" "$2" "$verdict" "$detail")")
}
# served PROTO REUSED FILE: the page nginx answered says protocol PROTO and
# $ssl_session_reused REUSED ("r" or ".").
served() { grep -qF "protocol=$1 reused=$2 " "$3"; }
# ticket_name SESSION_PEM: hex of the first 16 bytes of its ticket.
ticket_name() {
  openssl sess_id -in "$1" -noout -text 2>/dev/null |
    awk '/TLS session ticket:/ { getline; print substr($0, 12, 47); exit }' |
    tr -d ' -'
}

for v in 1.2 1.3; do
  proto=TLSv$v
  opt=-tls${v/./_}
  s1=$clients/s_client-$v.pem
  s2=$clients/s_client-$v-resumed.pem
  o1=$clients/s_client-$v.out
  o2=$clients/s_client-$v-resumed.out
  sc=(timeout 20 openssl s_client -connect "127.0.0.1:$port"
    -servername localhost -CAfile "$ngx/server.crt" -verify_return_error
    -verify_hostname localhost "$opt" -ign_eof)
  # -ign_eof reads until nginx closes (HTTP/1.0), so TLS 1.3 tickets, which
  # follow the handshake, have arrived before -sess_out writes the session.
  printf '%s' "$request" | "${sc[@]}" -sess_out "$s1" >"$o1" 2>&1 || true
  printf '%s' "$request" | "${sc[@]}" -sess_in "$s1" -sess_out "$s2" \
    >"$o2" 2>&1 || true
  name=$(ticket_name "$s1")
  ok=0
  if served "$proto" . "$o1" && [ "${name:0:16}" = "$store_id" ] &&
    grep -q "^Reused, $proto" "$o2" && served "$proto" r "$o2"; then
    ok=1
  fi
  epoch=
  [ ${#name} -eq 32 ] && epoch=$((16#${name:16}))
  row "openssl s_client" "$proto" "$ok" "ticket key name: store id ${name:0:16}, epoch ${epoch:-?}"
done

for v in 1.2 1.3; do
  proto=TLSv$v
  out=$clients/gnutls-$v.out
  # --resume: a full handshake, then a second connection resuming it, which
  # carries the request.
  printf '%s' "$request" | timeout 20 gnutls-cli --resume -p "$port" localhost \
    --x509cafile "$ngx/server.crt" \
    --priority "NORMAL:-VERS-ALL:+VERS-TLS$v" >"$out" 2>&1 || true
  ok=0
  if grep -q '^\*\*\* This is a resumed session' "$out" && served "$proto" r "$out"; then
    ok=1
  fi
  row "gnutls-cli --resume" "$proto" "$ok" "second connection resumed"
done

for v in 1.2 1.3; do
  proto=TLSv$v
  out=$clients/curl-$v.out
  # Two URLs in one run: "Connection: close" makes the second a new TLS
  # connection, which reuses the session curl cached from the first.
  timeout 30 curl -sS --cacert "$ngx/server.crt" \
    --resolve "localhost:$port:127.0.0.1" "--tlsv$v" --tls-max "$v" \
    -H 'Connection: close' -w 'new-connections=%{num_connects}\n' \
    "$url" "$url" >"$out" 2>&1 || true
  # Each transfer opened its own connection; the first was a full
  # handshake, the second resumed.
  mapfile -t pages < <(grep '^protocol=' "$out")
  ok=0
  if [ "$(grep -c '^new-connections=1$' "$out")" = 2 ] && [ ${#pages[@]} = 2 ] &&
    [[ "${pages[0]}" == "protocol=$proto reused=. "* ]] &&
    [[ "${pages[1]}" == "protocol=$proto reused=r "* ]]; then
    ok=1
  fi
  if [ "$v" = 1.2 ]; then
    # curl's OpenSSL back end sets SSL_OP_NO_TICKET: no TLS 1.2 tickets (it
    # resumes TLS 1.2 by session id, and nginx keeps no session cache here).
    row "curl (2 requests)" "$proto" "$ok" "second connection resumed" \
      "n/a: curl asks for no TLS 1.2 tickets (SSL_OP_NO_TICKET)"
  else
    row "curl (2 requests)" "$proto" "$ok" "second connection resumed"
  fi
done

# --- report ----------------------------------------------------------------

printf '\n%-20s %-9s %-8s %s\n' client protocol resumed detail
printf '%s\n' "${rows[@]}"

step "5. counters of the store (GET https://localhost:$port/hsmstek-status)"
status=$(curl -sS --max-time 20 --cacert "$ngx/server.crt" \
  --resolve "localhost:$port:127.0.0.1" "https://localhost:$port/hsmstek-status" 2>&1 || true)
# metric NAME [LABELS]: the value of NAME{store="demo"LABELS}; without
# LABELS, the sum over all of NAME's samples of the store.
metric() {
  awk -v m="$1" -v l="${2-}" -v all="${2+no}" '
    (all == "" && index($1, m "{store=\"demo\"") == 1) ||
    $1 == m "{store=\"demo\"" l "}" { v += $2; n++ }
    END { if (n) printf "%s", v; else printf "?" }' <<<"$status"
}
micros() {
  awk -v s="$(metric "$1" ',quantile="0.5"')" 'BEGIN { printf "%.0f", s * 1e6 }'
}
if grep -q '^hsmstek_store_open{store="demo"} 1$' <<<"$status"; then
  say "  tickets issued $(metric hsmstek_tickets_issued_total);" \
    "accepted: resumed $(metric hsmstek_tickets_resumed_total)," \
    "renewed $(metric hsmstek_tickets_renewed_total) (TLS 1.3: fresh ticket);" \
    "rejected $(metric hsmstek_tickets_rejected_total)"
  say "  token errors $(metric hsmstek_token_errors_total);" \
    "per-epoch keys derived in the token $(metric hsmstek_derivations_total);" \
    "seal p50 $(micros hsmstek_seal_latency_seconds) us," \
    "open p50 $(micros hsmstek_open_latency_seconds) us"
else
  say "  (no counters: $status)"
  failures=$((failures + 1))
fi

# --- stop or keep ----------------------------------------------------------

if [ "$keep" = 1 ]; then
  ngx_kept=$ngx_pid
  ngx_pid=
  trap - EXIT
  step "nginx keeps running (pid $ngx_kept)"
  cat <<EOF
try it:
  curl --cacert $ngx/server.crt https://localhost:$port/ https://localhost:$port/ -H 'Connection: close'
  printf 'GET / HTTP/1.0\\r\\n\\r\\n' | openssl s_client -connect 127.0.0.1:$port -CAfile $ngx/server.crt -ign_eof -sess_out /tmp/s.pem
  printf 'GET / HTTP/1.0\\r\\n\\r\\n' | openssl s_client -connect 127.0.0.1:$port -CAfile $ngx/server.crt -ign_eof -sess_in /tmp/s.pem | grep -E '^Reused|reused='
  curl --cacert $ngx/server.crt https://localhost:$port/hsmstek-status
  SOFTHSM2_CONF=$SOFTHSM2_CONF $cli status '$HSMSTEK_URI'
  (commands that add objects to the token, e.g. hsmstek rotate, run as root
  create files www-data cannot read: chown -R www-data:www-data $hsm/tokens)
logs: $ngx/error.log
stop it:
  kill -QUIT \$(cat $ngx/nginx.pid)
EOF
else
  stop_nginx
  say "nginx stopped"
fi

if [ "$failures" -ne 0 ]; then
  say "demo.sh: $failures expected resumption(s) failed; see $clients/*.out and $ngx/error.log" >&2
  exit 1
fi
say "demo.sh: OK, every expected resumption happened, with tickets sealed and opened in the token"
