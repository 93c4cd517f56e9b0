#!/bin/bash
# nginx_tickets_test.sh: end-to-end tests of ngx_http_hsmstek_module and
# ngx_stream_hsmstek_module with the real libhsmstek, a real nginx and a
# throwaway SoftHSM2 token created here (never /etc/softhsm).
#
# Usage: nginx_tickets_test.sh [BUILD_DIR]   (default /work/build-nginx)
#   Modules from $HSMSTEK_NGINX_MODULE_DIR or BUILD_DIR/src/nginx; the CLI
#   (to create a master) from $HSMSTEK_CLI or BUILD_DIR/src/cli/hsmstek.
#   Cases that need a master are skipped when the CLI is missing.
#   Exits non-zero if any case fails; prints "N passed, N failed, N skipped".
#
# Every nginx started here listens on 127.0.0.1 only, runs from a temporary
# prefix with "daemon off" and is stopped by its pid.
set -u

build_dir=${1:-/work/build-nginx}
mod_dir=${HSMSTEK_NGINX_MODULE_DIR:-$build_dir/src/nginx}
cli=${HSMSTEK_CLI:-$build_dir/src/cli/hsmstek}
nginx_bin=${NGINX:-/usr/sbin/nginx}
stream_so=${NGINX_STREAM_MODULE:-/usr/lib/nginx/modules/ngx_stream_module.so}
softhsm_so=${SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}

for f in "$mod_dir/ngx_http_hsmstek_module.so" \
         "$mod_dir/ngx_stream_hsmstek_module.so" "$nginx_bin" "$stream_so" \
         "$softhsm_so"; do
  if [ ! -e "$f" ]; then
    echo "nginx_tickets_test: missing $f" >&2
    exit 2
  fi
done
command -v softhsm2-util >/dev/null || { echo "no softhsm2-util" >&2; exit 2; }

tmp=$(mktemp -d /tmp/hsmstek-nginx-e2e.XXXXXX)
ngx_pid=

# stop_nginx: graceful stop of the nginx started by start_nginx, by pid.
stop_nginx() {
  if [ -n "$ngx_pid" ]; then
    kill -QUIT "$ngx_pid" 2>/dev/null
    wait "$ngx_pid" 2>/dev/null
    ngx_pid=
  fi
}
trap 'stop_nginx; rm -rf "$tmp"' EXIT

passed=0
failed=0
skipped=0
pass() { passed=$((passed + 1)); echo "PASS: $1"; }
fail() {
  failed=$((failed + 1))
  echo "FAIL: $1"
  if [ -f "$tmp/error.log" ]; then
    tail -n 15 "$tmp/error.log" | sed 's/^/    log: /'
  fi
}
skip() { skipped=$((skipped + 1)); echo "SKIP: $1"; }

# --- token, PINs, certificate ----------------------------------------------

export SOFTHSM2_CONF="$tmp/softhsm2.conf"
# Five distinct free loopback ports (held open together while picked), so
# parallel tests and other local servers never collide with ours.
read -r port_main port_alt1 port_alt2 port_stream port_status < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
mkdir -p "$tmp/tokens"
cat >"$SOFTHSM2_CONF" <<EOF
directories.tokendir = $tmp/tokens
objectstore.backend = file
log.level = ERROR
EOF
user_pin=4711
softhsm2-util --init-token --free --label tickets --so-pin 12345678 \
  --pin "$user_pin" >/dev/null || { echo "token init failed" >&2; exit 2; }
printf '%s\n' "$user_pin" >"$tmp/pin"
printf '%s\n' 987654 >"$tmp/badpin"
chmod 600 "$tmp/pin" "$tmp/badpin"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$tmp/key.pem" -out "$tmp/cert.pem" -subj /CN=localhost -days 2 \
  >/dev/null 2>&1 || { echo "openssl req failed" >&2; exit 2; }
# An nginx ticket key file whose name we can recognise in tickets.
{ printf 'LEGACYKEYNAME16B'; head -c 64 /dev/urandom; } >"$tmp/ticket.key"
legacy_name=$(printf 'LEGACYKEYNAME16B' | od -An -tx1 | tr -d ' \n')

# uri LABEL PINFILE [MODULE]
uri() {
  echo "pkcs11:token=tickets;object=$1?module-path=${3:-$softhsm_so}&pin-source=file:$2"
}

# A PKCS#11 "module" that records the pid of every process that loads it
# and then refuses to work (C_GetFunctionList fails).
cat >"$tmp/mark.c" <<EOF
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void mark(void) {
  FILE *f = fopen("$tmp/marker", "a");
  if (f) { fprintf(f, "%d\n", (int)getpid()); fclose(f); }
}
int C_GetFunctionList(void **list) { *list = 0; return 5; }
EOF
cc -shared -fPIC -o "$tmp/mark.so" "$tmp/mark.c" ||
  { echo "cannot build the marker module" >&2; exit 2; }

# --- nginx ------------------------------------------------------------------

user_line=
if [ "$(id -u)" -eq 0 ]; then
  # Workers must reach the temporary token directory and PIN file.
  user_line="user root root;"
fi

# write_conf FILE HTTP_BODY STREAM_BODY
write_conf() {
  cat >"$1" <<EOF
load_module $stream_so;
load_module $mod_dir/ngx_http_hsmstek_module.so;
load_module $mod_dir/ngx_stream_hsmstek_module.so;
$user_line
daemon off;
worker_processes 1;
pid $tmp/nginx.pid;
error_log $tmp/error.log info;
env SOFTHSM2_CONF;
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
    ssl_protocols TLSv1.2 TLSv1.3;
$2
}
stream {
    ssl_protocols TLSv1.2 TLSv1.3;
$3
}
EOF
}

# start_nginx CONF [PATTERN]: runs nginx in the background and waits until
# the error log matches PATTERN (default: the worker finished init_process,
# which ends with the stores' state) or 20 s passed.
start_nginx() {
  local ready=${2:-"hsmstek: (store .* is (ready|not ready)|cannot open)"}
  : >"$tmp/error.log"
  rm -f "$tmp/marker"
  "$nginx_bin" -p "$tmp/" -c "$1" >>"$tmp/nginx.stderr" 2>&1 &
  ngx_pid=$!
  for _ in $(seq 1 200); do
    if grep -q "start worker process" "$tmp/error.log" 2>/dev/null &&
       grep -qE "$ready" "$tmp/error.log"; then
      return 0
    fi
    if ! kill -0 "$ngx_pid" 2>/dev/null; then
      echo "nginx exited during start-up" >&2
      ngx_pid=
      return 1
    fi
    sleep 0.1
  done
  return 0
}

# handshake PORT VERSION SESS_OUT [SESS_IN]: one TLS connection (SNI $sni,
# default localhost) that sends an HTTP request (so TLS 1.3 tickets arrive
# before the close); s_client's output in $tmp/sc.out.
handshake() {
  local args=(-connect "127.0.0.1:$1" -servername "${sni:-localhost}" "-$2"
              -sess_out "$3" -ign_eof)
  if [ $# -ge 4 ]; then args+=(-sess_in "$4"); fi
  rm -f "$3"
  printf 'GET / HTTP/1.0\r\n\r\n' |
    timeout 20 openssl s_client "${args[@]}" >"$tmp/sc.out" 2>&1
}

# ticket_name SESS: hex of the first 16 bytes of the session's ticket, or
# nothing if the session has no ticket.
ticket_name() {
  openssl sess_id -in "$1" -noout -text 2>/dev/null |
    awk '/TLS session ticket:/ { getline; print substr($0, 12, 47); exit }' |
    tr -d ' -'
}

has_ticket() { [ -n "$(ticket_name "$1")" ]; }
reused() { grep -q "^Reused," "$tmp/sc.out"; }
connected() { grep -q "Cipher is" "$tmp/sc.out" && ! grep -q "Cipher is (NONE)" "$tmp/sc.out"; }

status_page() {
  curl -s --max-time 20 "http://127.0.0.1:$1/hsmstek" 2>/dev/null
}

# --- control: the harness sees tickets ---------------------------------------
# Without hsmstek the same server issues tickets under its key file: proves
# that has_ticket/ticket_name detect a ticket and that the "no ticket"
# results below come from the module.

conf="$tmp/control.conf"
write_conf "$conf" "
    server {
        listen 127.0.0.1:${port_main} ssl;
        ssl_session_ticket_key $tmp/ticket.key;
    }" ""
if start_nginx "$conf" "start worker process"; then
  handshake ${port_main} tls1_2 "$tmp/s0"
  if [ "$(ticket_name "$tmp/s0")" = "$legacy_name" ]; then
    pass control_key_file_ticket
  else
    fail "control_key_file_ticket (name: $(ticket_name "$tmp/s0"))"
  fi
  stop_nginx
else
  fail "control (nginx did not start)"
fi

# --- fail closed: a store that cannot be opened ----------------------------
# The module refuses to load, so hsmstek_store_open fails in the worker.
# Even with ssl_session_ticket_key set, no ticket may be issued (no fallback
# to key-file or OpenSSL in-memory keys), handshakes still complete, the
# worker keeps running, and only the worker (never the master or nginx -t)
# ever loaded the PKCS#11 module.

conf="$tmp/open_fails.conf"
write_conf "$conf" "
    hsmstek_store web \"$(uri web "$tmp/pin" "$tmp/mark.so")\";
    server {
        listen 127.0.0.1:${port_main} ssl;
        ssl_session_ticket_key $tmp/ticket.key;
        hsmstek_tickets web;
    }
    server {
        listen 127.0.0.1:${port_status};
        location = /hsmstek { hsmstek_status; }
    }" ""
if start_nginx "$conf"; then
  worker=$(pgrep -P "$ngx_pid" | head -n 1)
  handshake ${port_main} tls1_2 "$tmp/s1"
  if connected && ! has_ticket "$tmp/s1"; then
    pass open_fails_no_ticket_tls12
  else
    fail "open_fails_no_ticket_tls12 (ticket: $(ticket_name "$tmp/s1"))"
  fi
  if grep -q 'hsmstek: cannot open http store "web" defined in' "$tmp/error.log"; then
    pass open_fails_logged
  else
    fail open_fails_logged
  fi
  if [ -s "$tmp/marker" ] && ! grep -qx "$ngx_pid" "$tmp/marker" &&
     grep -qx "$worker" "$tmp/marker"; then
    pass pkcs11_module_loaded_only_by_worker
  else
    fail "pkcs11_module_loaded_only_by_worker (master $ngx_pid, worker $worker, marker: $(tr '\n' ' ' <"$tmp/marker" 2>/dev/null))"
  fi
  page=$(status_page ${port_status})
  if grep -qx 'hsmstek_store_open{store="web"} 0' <<<"$page" &&
     ! grep -q 'hsmstek_tickets_issued_total{store="web"}' <<<"$page"; then
    pass status_shows_unopened_store
  else
    fail "status_shows_unopened_store: $page"
  fi
  if [ "$(pgrep -P "$ngx_pid" | head -n 1)" = "$worker" ] &&
     ! grep -q "exited on signal" "$tmp/error.log"; then
    pass worker_keeps_running
  else
    fail worker_keeps_running
  fi
  stop_nginx
else
  fail "open_fails (nginx did not start)"
fi

# --- fail closed: token reachable but no usable store ----------------------

# wrong_pin_value also checks that a pin-value in the URI never reaches the
# log (the library echoes URIs in its messages).
for case in no_master wrong_pin wrong_pin_value; do
  case "$case" in
    no_master) store_uri=$(uri nothing-here "$tmp/pin") ;;
    wrong_pin) store_uri=$(uri web "$tmp/badpin") ;;
    *) store_uri="pkcs11:token=tickets;object=web?module-path=$softhsm_so&pin-value=987654" ;;
  esac
  conf="$tmp/$case.conf"
  write_conf "$conf" "
    hsmstek_store web \"$store_uri\";
    server {
        listen 127.0.0.1:${port_main} ssl;
        hsmstek_tickets web;
    }
    server {
        listen 127.0.0.1:${port_status};
        location = /hsmstek { hsmstek_status; }
    }" "
    hsmstek_store tcp \"$store_uri\";
    server {
        listen 127.0.0.1:${port_stream} ssl;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        hsmstek_tickets tcp;
        return ok;
    }"
  if ! start_nginx "$conf"; then
    fail "$case (nginx did not start)"
    continue
  fi
  if grep -q "hsmstek: store \"web\" is not ready: " "$tmp/error.log"; then
    pass "${case}_warned"
  else
    fail "${case}_warned"
  fi
  handshake ${port_main} tls1_2 "$tmp/s1"
  if connected && ! has_ticket "$tmp/s1"; then
    pass "${case}_http_no_ticket"
  else
    fail "${case}_http_no_ticket (ticket: $(ticket_name "$tmp/s1"))"
  fi
  handshake ${port_stream} tls1_2 "$tmp/s2"
  if connected && ! has_ticket "$tmp/s2"; then
    pass "${case}_stream_no_ticket"
  else
    fail "${case}_stream_no_ticket (ticket: $(ticket_name "$tmp/s2"))"
  fi
  if grep -qx 'hsmstek_store_open{store="web"} 1' <<<"$(status_page ${port_status})"; then
    pass "${case}_status_store_open"
  else
    fail "${case}_status_store_open"
  fi
  if ! grep -q -e "$user_pin" -e 987654 "$tmp/error.log"; then
    pass "${case}_no_pin_in_log"
  else
    fail "${case}_no_pin_in_log"
  fi
  stop_nginx
done

# --- tickets from the token (needs a master: the CLI) ----------------------

positive_cases="tls12_ticket_from_token tls12_resume ticket_key_file_ignored
  tls13_ticket_from_token tls13_resume session_tickets_off sni_default_decides
  stream_ticket_from_token stream_resume status_counts status_shows_stream_stores
  status_shows_forward_secrecy resume_after_reload no_stale_openssl_errors"

provision() {
  "$cli" provision "$(uri "$1" "$tmp/pin")" --period 1h --decrypt-window 24h \
    >"$tmp/provision.out" 2>&1 &&
    awk '/store id:/ { print $3 }' "$tmp/provision.out"
}

# link_and_horizon STORE: "<current link> <horizon as Unix time>" of
# STORE's active master, from `hsmstek status --json`.
link_and_horizon() {
  "$cli" status --json "$(uri "$1" "$tmp/pin")" 2>/dev/null | python3 -c '
import datetime, json, sys
for s in json.load(sys.stdin)["stores"]:
    if s["state"] == "active":
        h = datetime.datetime.fromisoformat(
            s["forward_secrecy_horizon"].replace("Z", "+00:00"))
        print(s["current_link"], int(h.timestamp()))'
}

# name_now STORE: the current (opaque) key name of STORE's active master,
# from `hsmstek status --json`: names no longer start with the store id.
name_now() {
  "$cli" status --json "$(uri "$1" "$tmp/pin")" 2>/dev/null | python3 -c '
import json, sys
for s in json.load(sys.stdin)["stores"]:
    if s["state"] == "active":
        print(s["current_key_name"])'
}

if [ ! -x "$cli" ]; then
  for c in $positive_cases; do
    skip "$c (no hsmstek CLI at $cli to create a master)"
  done
elif ! web_id=$(provision web) || [ -z "$web_id" ] ||
     ! tcp_id=$(provision tcp) || [ -z "$tcp_id" ]; then
  cat "$tmp/provision.out"
  for c in $positive_cases; do fail "$c (provisioning failed)"; done
else
  conf="$tmp/tickets.conf"
  write_conf "$conf" "
    hsmstek_store web \"$(uri web "$tmp/pin")\";
    server {
        listen 127.0.0.1:${port_main} ssl;
        ssl_session_ticket_key $tmp/ticket.key;
        hsmstek_tickets web;
    }
    server {
        listen 127.0.0.1:${port_alt1} ssl;
        ssl_session_tickets off;
        hsmstek_tickets web;
    }
    server {
        listen 127.0.0.1:${port_alt2} ssl default_server;
        server_name a.test;
        hsmstek_tickets web;
    }
    server {
        listen 127.0.0.1:${port_alt2} ssl;
        server_name b.test;
        ssl_session_ticket_key $tmp/ticket.key;
    }
    server {
        listen 127.0.0.1:${port_status};
        location = /hsmstek { hsmstek_status; }
    }" "
    hsmstek_store tcp \"$(uri tcp "$tmp/pin")\";
    server {
        listen 127.0.0.1:${port_stream} ssl;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        hsmstek_tickets tcp;
        return ok;
    }"
  if ! start_nginx "$conf"; then
    for c in $positive_cases; do fail "$c (nginx did not start)"; done
  else
    # TLS 1.2: the key name is the store's opaque name of this epoch (not
    # the key file's name, and without the store id).
    web_name=$(name_now web)
    tcp_name=$(name_now tcp)
    handshake ${port_main} tls1_2 "$tmp/t12"
    name=$(ticket_name "$tmp/t12")
    if [ -n "$name" ] && [ "$name" = "$web_name" ] &&
       [ "${name#*"$web_id"}" = "$name" ]; then
      pass tls12_ticket_from_token
    else
      fail "tls12_ticket_from_token (name '$name', expected $web_name)"
    fi
    if [ -n "$name" ] && [ "$name" != "$legacy_name" ]; then
      pass ticket_key_file_ignored
    else
      fail "ticket_key_file_ignored (name '$name')"
    fi
    handshake ${port_main} tls1_2 "$tmp/t12b" "$tmp/t12"
    if reused; then pass tls12_resume; else fail tls12_resume; fi

    handshake ${port_main} tls1_3 "$tmp/t13"
    name=$(ticket_name "$tmp/t13")
    if [ -n "$name" ] && [ "$name" = "$web_name" ]; then
      pass tls13_ticket_from_token
    else
      fail "tls13_ticket_from_token (name '$name', store id $web_id)"
    fi
    handshake ${port_main} tls1_3 "$tmp/t13b" "$tmp/t13"
    if reused; then pass tls13_resume; else fail tls13_resume; fi

    handshake ${port_alt1} tls1_2 "$tmp/off"
    if connected && ! has_ticket "$tmp/off"; then
      pass session_tickets_off
    else
      fail "session_tickets_off (name '$(ticket_name "$tmp/off")')"
    fi

    # b.test has no hsmstek_tickets (and a key file), but OpenSSL keeps the
    # default server's ticket callback after the SNI switch.
    sni=b.test handshake ${port_alt2} tls1_2 "$tmp/sni"
    name=$(ticket_name "$tmp/sni")
    if [ -n "$name" ] && [ "$name" = "$web_name" ]; then
      pass sni_default_decides
    else
      fail "sni_default_decides (name '$name', store id $web_id)"
    fi

    handshake ${port_stream} tls1_2 "$tmp/st"
    name=$(ticket_name "$tmp/st")
    if [ -n "$name" ] && [ "$name" = "$tcp_name" ]; then
      pass stream_ticket_from_token
    else
      fail "stream_ticket_from_token (name '$name', store id $tcp_id)"
    fi
    handshake ${port_stream} tls1_2 "$tmp/stb" "$tmp/st"
    if reused; then pass stream_resume; else fail stream_resume; fi

    page=$(status_page ${port_status})
    metric() {
      awk -v m="$1" '$1 == m { print $2 }' <<<"$page"
    }
    issued=$(metric 'hsmstek_tickets_issued_total{store="web"}')
    resumed=$(metric 'hsmstek_tickets_resumed_total{store="web"}')
    renewed=$(metric 'hsmstek_tickets_renewed_total{store="web"}')
    if [ "${issued:-0}" -ge 3 ] &&
       [ $(( ${resumed:-0} + ${renewed:-0} )) -ge 2 ] &&
       grep -q '^hsmstek_seal_latency_seconds{store="web",quantile="0.5"} [0-9]*\.[0-9]\{9\}$' <<<"$page"; then
      pass status_counts
    else
      fail "status_counts (issued=$issued resumed=$resumed renewed=$renewed)"
      sed 's/^/    /' <<<"$page" | grep -v '^    #'
    fi
    # stream{} stores are on the same page, as "stream:<name>".
    s_issued=$(metric 'hsmstek_tickets_issued_total{store="stream:tcp"}')
    s_resumed=$(metric 'hsmstek_tickets_resumed_total{store="stream:tcp"}')
    if [ "$(metric 'hsmstek_store_open{store="stream:tcp"}')" = 1 ] &&
       [ "${s_issued:-0}" -ge 1 ] && [ "${s_resumed:-0}" -ge 1 ]; then
      pass status_shows_stream_stores
    else
      fail "status_shows_stream_stores (issued=$s_issued resumed=$s_resumed)"
      sed 's/^/    /' <<<"$page" | grep -v '^    #'
    fi
    # The ratchet gauges equal what `hsmstek status` computes in the token:
    # a fresh master serves link 0, its horizon is its activation epoch
    # (in the past, within the hour).
    link=$(metric 'hsmstek_ratchet_link{store="web"}')
    horizon=$(metric 'hsmstek_forward_secrecy_horizon_seconds{store="web"}')
    s_link=$(metric 'hsmstek_ratchet_link{store="stream:tcp"}')
    read -r cli_link cli_horizon <<<"$(link_and_horizon web)"
    now=$(date +%s)
    if grep -q '^# TYPE hsmstek_ratchet_link gauge$' <<<"$page" &&
       grep -q '^# TYPE hsmstek_forward_secrecy_horizon_seconds gauge$' <<<"$page" &&
       [ -n "$link" ] && [ "$link" = "${cli_link:-x}" ] && [ "$link" = 0 ] &&
       [ "$s_link" = 0 ] &&
       [ -n "$horizon" ] && [ "$horizon" = "${cli_horizon:-x}" ] &&
       [ "$horizon" -le "$now" ] && [ "$horizon" -gt $((now - 3600 - 60)) ]; then
      pass status_shows_forward_secrecy
    else
      fail "status_shows_forward_secrecy (link=$link horizon=$horizon, status: $cli_link $cli_horizon, now $now)"
      grep -E 'ratchet|horizon' <<<"$page" | sed 's/^/    /'
    fi

    # A reload starts new workers, which open the stores again and derive
    # the same keys: an old session resumes.
    handshake ${port_main} tls1_2 "$tmp/pre"
    old_worker=$(pgrep -P "$ngx_pid" | head -n 1)
    kill -HUP "$ngx_pid"
    new_worker=
    for _ in $(seq 1 200); do
      new_worker=$(pgrep -P "$ngx_pid" | grep -vx "$old_worker" | head -n 1)
      if [ -n "$new_worker" ] &&
         grep -q "^.*\[info\] $new_worker#.*hsmstek: store \"web\" is ready" \
           "$tmp/error.log"; then
        break
      fi
      sleep 0.1
    done
    handshake ${port_main} tls1_2 "$tmp/post" "$tmp/pre"
    if [ -n "$new_worker" ] && reused; then
      pass resume_after_reload
    else
      fail "resume_after_reload (new worker '$new_worker')"
    fi
    # Nothing the token's module left on OpenSSL's error queue may surface
    # in nginx's handshakes.
    if ! grep -q "ignoring stale global SSL error" "$tmp/error.log"; then
      pass no_stale_openssl_errors
    else
      fail no_stale_openssl_errors
    fi
    stop_nginx
  fi
fi

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
