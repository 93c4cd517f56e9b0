# nginx_lib.sh: helpers sourced by the nginx end-to-end tests
# (nginx_workers_test.sh, nginx_fleet_test.sh, nginx_pin_later_test.sh,
# nginx_migration_test.sh, nginx_engine_key_test.sh). Not a test itself.
#
# The sourcing script sets `build_dir` and calls `lib_init NAME`, which
# checks the prerequisites (exit 2 if one is missing), makes a temporary
# directory $tmp (removed at exit, after every nginx started here was
# stopped by its pid), and a throwaway certificate. Every nginx listens on
# 127.0.0.1 only, on a port the kernel picked as free, runs from its own
# prefix under $tmp with "daemon off", and is stopped by its pid.
# shellcheck shell=bash

lib_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$lib_here/../.." && pwd)
mod_dir=${HSMSTEK_NGINX_MODULE_DIR:-$build_dir/src/nginx}
cli=${HSMSTEK_CLI:-$build_dir/src/cli/hsmstek}
nginx_bin=${NGINX:-/usr/sbin/nginx}
stream_so=${NGINX_STREAM_MODULE:-/usr/lib/nginx/modules/ngx_stream_module.so}
softhsm_so=${SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}

declare -A ngx_pids=()
passed=0
failed=0
tmp=
test_name=

# lib_init NAME [EXTRA_REQUIRED_FILE...]
lib_init() {
  test_name=$1
  shift
  local f
  for f in "$mod_dir/ngx_http_hsmstek_module.so" \
    "$mod_dir/ngx_stream_hsmstek_module.so" "$nginx_bin" "$stream_so" \
    "$softhsm_so" "$cli" "$@"; do
    if [ ! -e "$f" ]; then
      echo "$test_name: missing $f" >&2
      exit 2
    fi
  done
  for f in softhsm2-util openssl python3 curl pgrep; do
    command -v "$f" >/dev/null || { echo "$test_name: no $f" >&2; exit 2; }
  done
  tmp=$(mktemp -d "/tmp/hsmstek-$test_name.XXXXXX")
  trap lib_cleanup EXIT
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$tmp/key.pem" -out "$tmp/cert.pem" -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost -days 2 >/dev/null 2>&1 ||
    { echo "$test_name: openssl req failed" >&2; exit 2; }
}

lib_cleanup() {
  local n
  for n in "${!ngx_pids[@]}"; do stop_nginx "$n"; done
  [ -n "$tmp" ] && [ -z "${KEEP_TMP:-}" ] && rm -rf "$tmp"
}

pass() { passed=$((passed + 1)); echo "PASS: $1"; }
# fail MESSAGE [INSTANCE]: also shows the end of that nginx's error log.
fail() {
  failed=$((failed + 1))
  echo "FAIL: $1"
  if [ $# -ge 2 ] && [ -f "$tmp/$2/error.log" ]; then
    tail -n 15 "$tmp/$2/error.log" | sed 's/^/    log: /'
  fi
}
# check NAME INSTANCE CMD...: pass if CMD succeeds.
check() {
  local name=$1 inst=$2
  shift 2
  if "$@"; then pass "$name"; else fail "$name" "$inst"; fi
}
finish() {
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}

# free_port: a TCP port on 127.0.0.1 that nothing listens on right now.
free_port() {
  python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# new_token DIR LABEL: a SoftHSM token in DIR (its own softhsm2.conf) made
# by hsm/make-token.sh. Sets TOKEN_CONF, TOKEN_URI (object=tickets, PIN from
# DIR/LABEL.pin) and TOKEN_PIN_FILE.
new_token() {
  local out
  out=$("$top/hsm/make-token.sh" "$1" "$2" 2>"$tmp/make-token.log") ||
    { cat "$tmp/make-token.log" >&2; return 1; }
  TOKEN_CONF=$(sed -n "s/^export SOFTHSM2_CONF='\(.*\)'$/\1/p" <<<"$out")
  TOKEN_URI=$(sed -n "s/^export HSMSTEK_URI='\(.*\)'$/\1/p" <<<"$out")
  TOKEN_PIN_FILE=$1/$2.pin
  [ -n "$TOKEN_CONF" ] && [ -n "$TOKEN_URI" ]
}

# provision CONF URI [ARGS...]: hsmstek provision; prints the store id.
provision() {
  local conf=$1 uri=$2
  shift 2
  SOFTHSM2_CONF=$conf "$cli" provision "$uri" --period 1h \
    --decrypt-window 24h "$@" >"$tmp/provision.out" 2>&1 ||
    { cat "$tmp/provision.out" >&2; return 1; }
  awk '/store id:/ { print $3; exit }' "$tmp/provision.out"
}

# Set before write_conf to change the defaults.
workers=1
user_line=
if [ "$(id -u)" -eq 0 ]; then
  user_line="user root root;" # workers reach the 0700 temporary directory
fi
ssl_defaults=

# write_conf NAME MAIN_EXTRA HTTP_BODY: $tmp/NAME/nginx.conf (prefix
# $tmp/NAME/). Servers answer "protocol=P reused=r|. worker=PID" on /.
write_conf() {
  local dir=$tmp/$1
  mkdir -p "$dir"
  cat >"$dir/nginx.conf" <<EOF
load_module $stream_so;
load_module $mod_dir/ngx_http_hsmstek_module.so;
load_module $mod_dir/ngx_stream_hsmstek_module.so;
$user_line
daemon off;
worker_processes $workers;
pid $dir/nginx.pid;
error_log $dir/error.log info;
$2
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    default_type text/plain;
    ssl_protocols TLSv1.2 TLSv1.3;
    ${ssl_defaults:-ssl_certificate $tmp/cert.pem; ssl_certificate_key $tmp/key.pem;}
$3
}
EOF
}

# The location every test server has.
page_location='location / { return 200 "protocol=$ssl_protocol reused=$ssl_session_reused worker=$pid\n"; }'

# start_nginx NAME [READY_REGEX]: starts nginx with $tmp/NAME/nginx.conf and
# waits (at most 20 s) until $workers worker(s) logged READY_REGEX (default:
# a worker finished opening its stores). Returns non-zero if nginx exited.
start_nginx() {
  local dir=$tmp/$1
  local ready=${2:-"hsmstek: (store .* is (ready|not ready)|cannot open)"}
  : >"$dir/error.log"
  "$nginx_bin" -p "$dir/" -c "$dir/nginx.conf" >>"$dir/nginx.out" 2>&1 </dev/null &
  ngx_pids[$1]=$!
  local _
  for _ in $(seq 1 200); do
    if [ "$(grep -cE "$ready" "$dir/error.log")" -ge "$workers" ]; then
      return 0
    fi
    if ! kill -0 "${ngx_pids[$1]}" 2>/dev/null; then
      echo "nginx $1 exited during start-up:" >&2
      tail -n 20 "$dir/nginx.out" "$dir/error.log" >&2
      unset "ngx_pids[$1]"
      return 1
    fi
    sleep 0.1
  done
  return 0
}

# stop_nginx NAME: graceful stop by pid.
stop_nginx() {
  local pid=${ngx_pids[$1]:-}
  if [ -n "$pid" ]; then
    kill -QUIT "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    unset "ngx_pids[$1]"
  fi
}

master_pid() { echo "${ngx_pids[$1]:-}"; }
worker_pids() { pgrep -P "${ngx_pids[$1]}" | sort; }

# tls PORT VERSION OUT [SESS_IN]: one openssl s_client connection (TLS
# VERSION 1.2 or 1.3, SNI localhost) that sends "GET /" and reads until the
# server closes, so TLS 1.3 tickets have arrived; the session goes to
# OUT.pem and s_client's output to OUT.out. Extra s_client arguments can be
# given in the array tls_extra.
tls_extra=()
tls() {
  local args=(-connect "127.0.0.1:$1" -servername localhost "-tls${2/./_}"
    -sess_out "$3.pem" -ign_eof "${tls_extra[@]}")
  if [ $# -ge 4 ]; then args+=(-sess_in "$4"); fi
  rm -f "$3.pem"
  printf 'GET / HTTP/1.0\r\nHost: localhost\r\n\r\n' |
    timeout 20 openssl s_client "${args[@]}" >"$3.out" 2>&1
}

# Reading the result of tls OUT.
page() { grep -m1 '^protocol=' "$1.out"; }
worker_of() { page "$1" | sed -n 's/.* worker=\([0-9]*\)$/\1/p'; }
# resumed OUT: s_client reports a resumption and nginx's
# $ssl_session_reused agrees.
resumed() { grep -q '^Reused, ' "$1.out" && page "$1" | grep -q ' reused=r '; }
# full OUT: a completed full handshake (the page was served, not resumed).
full() { grep -q '^New, ' "$1.out" && page "$1" | grep -q ' reused=\. '; }
# ticket_name OUT: hex of the first 16 bytes of the session's ticket, or
# nothing if it has no ticket. From OUT.pem; if s_client wrote none (a
# TLS 1.2 client does not cache a resumed session, not even when the server
# renewed its ticket), from the last session s_client printed in OUT.out.
ticket_name() {
  local text
  if [ -s "$1.pem" ]; then
    text=$(openssl sess_id -in "$1.pem" -noout -text 2>/dev/null)
  else
    text=$(cat "$1.out" 2>/dev/null)
  fi
  awk '/TLS session ticket:/ { getline; name = substr($0, 12, 47) }
       END { print name }' <<<"$text" | tr -d ' -'
}
# key_name_now STORE_ID [CONF URI]: the current (opaque, version 2) key
# name of master STORE_ID, from `hsmstek status --json` (default token:
# TOKEN_CONF / TOKEN_URI).
key_name_now() {
  SOFTHSM2_CONF=${2:-${TOKEN_CONF:-}} "$cli" status --json "${3:-${TOKEN_URI:-}}" \
    2>/dev/null | python3 -c 'import json, sys
for s in json.load(sys.stdin)["stores"]:
    if s["id"] == sys.argv[1]:
        print(s["current_key_name"])' "$1"
}
# ticket_of OUT STORE_ID [CONF URI]: the session holds a ticket sealed under
# that master now (names are opaque: compared with the name status shows).
ticket_of() {
  local n
  n=$(ticket_name "$1")
  [ -n "$n" ] && [ "$n" = "$(key_name_now "$2" "${3:-}" "${4:-}")" ]
}
# fresh_ticket OUT STORE_ID [CONF URI]: a full handshake that got a ticket
# of that master.
fresh_ticket() { full "$1" && ticket_of "$@"; }
# full_no_ticket OUT: a full handshake that got no ticket at all.
full_no_ticket() { full "$1" && [ -z "$(ticket_name "$1")" ]; }
# not_in_log NAME TEXT: nginx NAME's error log does not contain TEXT.
not_in_log() { ! grep -qF -- "$2" "$tmp/$1/error.log"; }
