#!/usr/bin/env bash
# Bounded soak of the ticket path: loopback only, stops by itself, exits
# non-zero on any failed handshake, a resumption rate below expectation,
# growing memory or (in-process) derived keys piling up in the token.
#
#   scripts/soak.sh                  # in-process, 3 minutes
#   scripts/soak.sh --minutes 10
#   scripts/soak.sh --nginx          # nginx + modules, reload every few s
#   scripts/soak.sh --both           # one after the other
#
# In-process (tests/soak/soak_driver.cc): TLS 1.2 and 1.3 handshakes with
# resumption chains against one server SSL_CTX using the library, a
# SoftHSM token of its own, a store clock running 10x (an epoch change
# every 6 s with the 60 s minimum period), a master generation added every
# 5 s that activates 3 s later (pending -> active -> decrypt-only ->
# retired -> destroyed), expired-ticket probes, RSS and token objects
# sampled every 5 s.
#
# nginx: Debian's nginx with ngx_http_hsmstek_module (1 worker;
# SOAK_NGINX_WORKERS=N for more, see docs/SECURITY.md for why 1) on
# 127.0.0.1, a throwaway SoftHSM token, `hsmstek rotate --activate-in 40s`
# every ~4 s (so a master activates every few seconds, each one staged
# longer than the workers' 30 s refresh: a worker that has not loaded a new
# master yet would refuse its tickets) and retired masters destroyed (real
# clock, period 60 s, window 2 min), each followed by `nginx -s reload`
# (SOAK_NGINX_OVERLAP=1: rotate every 5 s and reload every 7 s
# independently), and the same driver making TCP
# connections (one HTTP/1.0 request each). Tickets must resume across
# reloads (the keys live in the token, not in the workers). RSS of the
# master and the mean of the workers are sampled every 5 s.
#
# Environment: BUILD_DIR (default build-soak; Release, gcc), JOBS,
# SOAK_THREADS (default 4), SOAK_ARGS (extra driver flags).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

minutes=3
mode=inprocess
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes=${2:?}; shift 2 ;;
    --nginx) mode=nginx; shift ;;
    --both) mode=both; shift ;;
    -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
    *) echo "usage: $0 [--minutes N] [--nginx | --both]" >&2; exit 2 ;;
  esac
done
if ! [[ "$minutes" =~ ^[1-9][0-9]*$ ]]; then
  echo "soak: --minutes wants a positive integer" >&2
  exit 2
fi
seconds=$((minutes * 60))
# RSS baseline: after a third of the run (at most 2 minutes), once the
# masters, caches and allocator arenas have reached their steady state.
warmup=$((seconds / 3 < 120 ? seconds / 3 : 120))
threads=${SOAK_THREADS:-4}

bash scripts/install-deps.sh

build=${BUILD_DIR:-build-soak}
case "$build" in /*) ;; *) build="$root/$build" ;; esac
jobs=${JOBS:-$(nproc)}
nginx_flag=OFF
targets=(hsmstek_soak)
if [ "$mode" != inprocess ]; then
  nginx_flag=ON
  targets+=(nginx_modules hsmstek_cli)
fi
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DHSMSTEK_BUILD_NGINX="$nginx_flag" -DHSMSTEK_BUILD_BENCH=OFF >/dev/null
cmake --build "$build" -j "$jobs" --target "${targets[@]}"
driver="$build/tests/soak/hsmstek_soak"

# What run_nginx starts; stopped by pid on return or on any exit.
tmp=""
ngx_pid=""
loops=()
cleanup_nginx() {
  for p in "${loops[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${loops[@]}"; do wait "$p" 2>/dev/null || true; done
  loops=()
  if [ -n "$ngx_pid" ]; then
    kill -QUIT "$ngx_pid" 2>/dev/null || true
    wait "$ngx_pid" 2>/dev/null || true
    ngx_pid=""
  fi
  if [ -n "$tmp" ]; then rm -rf "$tmp"; fi
  tmp=""
}
trap cleanup_nginx EXIT

run_inprocess() {
  echo "=== soak (in-process): ${minutes} min"
  local scratch
  scratch=$(mktemp -d /tmp/hsmstek-soak.XXXXXX)
  local rc=0
  # shellcheck disable=SC2086
  TMPDIR="$scratch" "$driver" --seconds "$seconds" --threads "$threads" \
    --warmup "$warmup" ${SOAK_ARGS:-} || rc=$?
  rm -rf "$scratch"
  return $rc
}

run_nginx() {
  echo "=== soak (nginx): ${minutes} min"
  local mods="$build/src/nginx" cli="$build/src/cli/hsmstek"
  local nginx_bin=${NGINX:-/usr/sbin/nginx}
  local stream_so=/usr/lib/nginx/modules/ngx_stream_module.so
  local softhsm_so=/usr/lib/softhsm/libsofthsm2.so
  for f in "$mods/ngx_http_hsmstek_module.so" "$cli" "$nginx_bin" \
           "$softhsm_so"; do
    [ -e "$f" ] || { echo "soak: missing $f" >&2; return 2; }
  done
  tmp=$(mktemp -d /tmp/hsmstek-soak-nginx.XXXXXX)

  export SOFTHSM2_CONF="$tmp/softhsm2.conf"
  mkdir -p "$tmp/tokens" "$tmp/html"
  printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' \
    "$tmp" >"$SOFTHSM2_CONF"
  softhsm2-util --init-token --free --label soak --so-pin 12345678 \
    --pin 4711 >/dev/null
  printf '4711\n' >"$tmp/pin"
  chmod 600 "$tmp/pin"
  local uri="pkcs11:token=soak;object=web?module-path=$softhsm_so&pin-source=file:$tmp/pin"
  "$cli" provision "$uri" --period 60s --decrypt-window 2m >/dev/null
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$tmp/key.pem" -out "$tmp/cert.pem" -subj /CN=localhost \
    -days 2 >/dev/null 2>&1
  echo ok >"$tmp/html/index.html"
  local port status_port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  status_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  local user_line=""
  [ "$(id -u)" -eq 0 ] && user_line="user root root;"
  local conf="$tmp/nginx.conf"
  local workers=${SOAK_NGINX_WORKERS:-1}
  local stream_line=""
  [ -e "$stream_so" ] && stream_line="load_module $stream_so;"
  cat >"$conf" <<EOF
$stream_line
load_module $mods/ngx_http_hsmstek_module.so;
$user_line
daemon off;
worker_processes $workers;
pid $tmp/nginx.pid;
error_log $tmp/error.log info;
env SOFTHSM2_CONF;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $tmp/body;
    proxy_temp_path $tmp/proxy;
    fastcgi_temp_path $tmp/fastcgi;
    uwsgi_temp_path $tmp/uwsgi;
    scgi_temp_path $tmp/scgi;
    hsmstek_store web "$uri";
    server {
        listen 127.0.0.1:$port ssl;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        hsmstek_tickets web;
        root $tmp/html;
    }
    server {
        listen 127.0.0.1:$status_port;
        location = /hsmstek { hsmstek_status; }
    }
}
EOF
  "$nginx_bin" -p "$tmp/" -c "$conf" >"$tmp/nginx.stderr" 2>&1 &
  ngx_pid=$!
  for _ in $(seq 1 100); do
    [ -s "$tmp/nginx.pid" ] && curl -s -o /dev/null "http://127.0.0.1:$status_port/hsmstek" && break
    sleep 0.1
  done
  if ! kill -0 "$ngx_pid" 2>/dev/null; then
    echo "soak: nginx did not start:" >&2
    cat "$tmp/nginx.stderr" "$tmp/error.log" >&2 2>/dev/null || true
    return 2
  fi

  # One operator step: a new generation staged 40 s, retired masters
  # destroyed.
  rotate_step() {
    "$cli" rotate "$uri" --activate-in 40s >/dev/null 2>>"$tmp/rotate.err" ||
      echo "rotate failed" >>"$tmp/loop-errors"
    "$cli" status "$uri" --json 2>/dev/null |
      python3 -c 'import json,sys
for m in json.load(sys.stdin).get("stores", []):
    if m.get("state") == "retired": print(m["id"])' |
      while read -r id; do
        "$cli" destroy "$uri" --id "$id" --yes >/dev/null 2>>"$tmp/rotate.err" ||
          echo "destroy failed" >>"$tmp/loop-errors"
        echo "$id" >>"$tmp/destroyed"
      done
    echo x >>"$tmp/rotations"
  }
  reload_step() {
    "$nginx_bin" -p "$tmp/" -c "$conf" -s reload 2>>"$tmp/reload.err" ||
      echo "reload failed" >>"$tmp/loop-errors"
    echo x >>"$tmp/reloads"
  }
  # Workers that reported their store's state (ready or not) so far.
  workers_started() { grep -cE 'hsmstek: store "web" is (ready|not ready)' "$tmp/error.log" || true; }
  if [ "${SOAK_NGINX_OVERLAP:-0}" = 1 ]; then
    # Independent loops: a worker may start while the CLI writes the token
    # files; SoftHSM then misses the token for that worker's whole life.
    ( set +e; while sleep 5; do rotate_step; done ) &
    loops+=($!)
    ( set +e; while sleep 7; do reload_step; done ) &
    loops+=($!)
  else
    # Rotate, then reload once the CLI is done, then wait for the new
    # workers: a process that initialises SoftHSM while another one uses
    # the token can miss it for good (docs/SECURITY.md §9, finding 5).
    (
      set +e
      while sleep 3; do
        rotate_step
        before=$(workers_started)
        reload_step
        for _ in $(seq 1 50); do
          [ "$(workers_started)" -ge $((before + workers)) ] && break
          sleep 0.1
        done
      done
    ) &
    loops+=($!)
  fi

  local rc=0
  # shellcheck disable=SC2086
  "$driver" --connect "$port" --nginx-pidfile "$tmp/nginx.pid" \
    --seconds "$seconds" --threads "$threads" --warmup "$warmup" \
    ${SOAK_ARGS:-} || rc=$?

  count() { if [ -f "$1" ]; then wc -l <"$1"; else echo 0; fi; }
  echo "  reloads            $(count "$tmp/reloads")"
  echo "  rotations          $(count "$tmp/rotations") (masters destroyed: $(count "$tmp/destroyed"))"
  echo "  nginx counters (current workers):"
  curl -s "http://127.0.0.1:$status_port/hsmstek" | grep -v '^#' | sed 's/^/    /'
  local bad
  bad=$(grep -cE '\[(alert|crit|emerg)\]|hsmstek: .*(error|fail)' "$tmp/error.log" || true)
  echo "  nginx error log    $bad alert/crit/emerg or hsmstek error lines"
  local not_ready
  not_ready=$(grep -c 'hsmstek: store "web" is not ready' "$tmp/error.log" || true)
  echo "  workers started    $(workers_started), of which $not_ready without their store"
  if [ "$not_ready" -ne 0 ]; then
    grep -m 1 'hsmstek: store "web" is not ready' "$tmp/error.log" | sed 's/^/    /'
    rc=1
  fi
  if [ "$bad" -ne 0 ]; then
    grep -E '\[(alert|crit|emerg)\]|hsmstek: .*(error|fail)' "$tmp/error.log" | head -5 | sed 's/^/    /'
    rc=1
  fi
  if [ -s "$tmp/loop-errors" ]; then
    echo "  operator errors    $(sort "$tmp/loop-errors" | uniq -c | tr '\n' ' ')"
    head -3 "$tmp/rotate.err" "$tmp/reload.err" 2>/dev/null | sed 's/^/    /'
    rc=1
  fi
  cp "$tmp/error.log" "$build/soak-nginx-error.log" 2>/dev/null || true
  echo "  nginx error log kept in $build/soak-nginx-error.log"
  cleanup_nginx
  if [ "$rc" -eq 0 ]; then echo "soak (nginx): PASS"; else echo "soak (nginx): FAIL"; fi
  return $rc
}

rc=0
case "$mode" in
  inprocess) run_inprocess || rc=$? ;;
  nginx) run_nginx || rc=$? ;;
  both)
    run_inprocess || rc=$?
    run_nginx || rc=$?
    ;;
esac
exit $rc
