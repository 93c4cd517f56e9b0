#!/bin/bash
# nginx_workers_test.sh: session tickets resume across nginx worker
# processes. nginx runs `worker_processes 2` with `listen ... reuseport`, so
# the kernel spreads connections over both workers; each worker opens the
# store in its own process (own PKCS#11 sessions, own derived key handles)
# and both derive the same per-epoch keys from the master in the token.
# Fresh handshakes are made until both workers issued a ticket; then each
# ticket is presented again until the *other* worker served it: every
# attempt must resume, and for each worker at least one of its tickets must
# resume on the other. TLS 1.2 and TLS 1.3.
#
# Usage: nginx_workers_test.sh [BUILD_DIR]   (default /work/build-nginx)
# Prints "N passed, N failed"; exits non-zero on any failure.
set -u
build_dir=${1:-/work/build-nginx}
# shellcheck source=nginx_lib.sh
. "$(dirname "$0")/nginx_lib.sh"
lib_init nginx_workers

new_token "$tmp/hsm" tickets || { echo "token failed" >&2; exit 2; }
store_id=$(provision "$TOKEN_CONF" "$TOKEN_URI") && [ -n "$store_id" ] ||
  { echo "provision failed" >&2; exit 2; }

port=$(free_port)
workers=2
write_conf w "env SOFTHSM2_CONF=$TOKEN_CONF;" "
    hsmstek_store web \"$TOKEN_URI\";
    server {
        listen 127.0.0.1:$port ssl reuseport;
        hsmstek_tickets web;
        $page_location
    }"
if ! start_nginx w 'hsmstek: store "web" is ready'; then
  fail "nginx did not start" w
  finish
  exit
fi
mapfile -t wpids < <(worker_pids w)
# Both workers must reach the token. SoftHSM 2.6 can fail to open a token in
# a process whose C_Initialize reads token.object while another process's
# C_Login rewrites it; the library then re-initialises the module on its
# next attempt (background retries with back-off), so allow a bounded wait.
ready_workers() {
  grep -E 'hsmstek: (store "web" is ready|connected to token)' "$tmp/w/error.log" |
    sed -E 's/.* ([0-9]+)#[0-9]+: .*/\1/' | sort -u | wc -l
}
for _ in $(seq 150); do
  [ "$(ready_workers)" -ge 2 ] && break
  sleep 0.2
done
if [ "${#wpids[@]}" -ne 2 ] || [ "$(ready_workers)" -lt 2 ]; then
  fail "two_workers_ready: $(grep 'is not ready' "$tmp/w/error.log" | head -n 2)"
  finish
  exit
fi
pass two_workers_ready

for v in 1.2 1.3; do
  # 1. Fresh handshakes until each worker issued a ticket (at most 40: the
  #    chance that reuseport sends 40 connections to one worker is 2^-39).
  declare -A sess=()
  bad_fresh=0
  for i in $(seq 1 40); do
    tls "$port" "$v" "$tmp/f$i"
    w=$(worker_of "$tmp/f$i")
    if ! full "$tmp/f$i" || ! ticket_of "$tmp/f$i" "$store_id" || [ -z "$w" ]; then
      bad_fresh=$((bad_fresh + 1))
      continue
    fi
    [ -n "${sess[$w]:-}" ] || sess[$w]=$tmp/f$i.pem
    [ "${#sess[@]}" -ge 2 ] && break
  done
  check "tls${v}_fresh_handshakes_issue_store_tickets" w test "$bad_fresh" -eq 0
  if [ "${#sess[@]}" -lt 2 ]; then
    fail "tls${v}_both_workers_issue_tickets (only worker(s) ${!sess[*]} served)" w
    unset sess
    continue
  fi
  pass "tls${v}_both_workers_issue_tickets"

  # 2. Each worker's ticket, presented until the other worker served it.
  for origin in "${!sess[@]}"; do
    not_resumed=0
    crossed=0
    attempts=0
    for j in $(seq 1 40); do
      attempts=$j
      tls "$port" "$v" "$tmp/r$j" "${sess[$origin]}"
      if ! resumed "$tmp/r$j"; then
        not_resumed=$((not_resumed + 1))
        continue
      fi
      if [ "$(worker_of "$tmp/r$j")" != "$origin" ]; then
        crossed=1
        break
      fi
    done
    if [ "$not_resumed" -eq 0 ] && [ "$crossed" -eq 1 ]; then
      pass "tls${v}_ticket_of_worker_resumes_on_the_other ($origin, $attempts attempt(s))"
    else
      fail "tls${v}_ticket_of_worker_resumes_on_the_other (worker $origin: $not_resumed of $attempts attempts not resumed, crossed=$crossed)" w
    fi
  done
  unset sess
done

check no_worker_crashed w not_in_log w 'exited on signal'
check no_stale_openssl_errors w not_in_log w 'ignoring stale global SSL error'
stop_nginx w
finish
