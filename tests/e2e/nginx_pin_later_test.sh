#!/bin/bash
# nginx_pin_later_test.sh: nginx starts while its store's token is not
# usable (the pin-source file does not exist yet). The worker logs a warning
# and serves full handshakes without tickets (TLS 1.2 and 1.3). Once the PIN
# file appears, the library's reconnect (back-off from 200 ms, doubling, at
# most 30 s) logs in and tickets are issued and resume, without a restart or
# reload: the same master and worker processes serve throughout.
#
# The wait is a bounded poll (a handshake every 0.5 s, at most 60 s), not a
# fixed sleep.
#
# Usage: nginx_pin_later_test.sh [BUILD_DIR]   (default /work/build-nginx)
# Prints "N passed, N failed"; exits non-zero on any failure.
set -u
build_dir=${1:-/work/build-nginx}
# shellcheck source=nginx_lib.sh
. "$(dirname "$0")/nginx_lib.sh"
lib_init nginx_pin_later

new_token "$tmp/hsm" tickets || exit 2
store_id=$(provision "$TOKEN_CONF" "$TOKEN_URI") && [ -n "$store_id" ] || exit 2
late_pin=$tmp/late.pin
late_uri="pkcs11:token=tickets;object=tickets?module-path=$softhsm_so&pin-source=file:$late_pin"

port=$(free_port)
status_port=$(free_port)
write_conf n "env SOFTHSM2_CONF=$TOKEN_CONF;" "
    hsmstek_store web \"$late_uri\";
    server {
        listen 127.0.0.1:$port ssl;
        hsmstek_tickets web;
        $page_location
    }
    server {
        listen 127.0.0.1:$status_port;
        location = /hsmstek { hsmstek_status; }
    }"
if ! start_nginx n; then
  fail "nginx did not start" n
  finish
  exit
fi
master=$(master_pid n)
worker=$(worker_pids n)
metric() {
  curl -s --max-time 20 "http://127.0.0.1:$status_port/hsmstek" |
    awk -v m="$1" '$1 == m { print $2 }'
}

check warned_not_ready n grep -q 'hsmstek: store "web" is not ready: ' "$tmp/n/error.log"
for v in 1.2 1.3; do
  tls "$port" "$v" "$tmp/before$v"
  check "tls${v}_full_handshake_without_ticket" n full_no_ticket "$tmp/before$v"
done
check no_ticket_issued_yet n test "$(metric 'hsmstek_tickets_issued_total{store="web"}')" = 0

# The PIN file appears (atomically, as an operator's deployment would).
cp "$TOKEN_PIN_FILE" "$late_pin.tmp"
mv "$late_pin.tmp" "$late_pin"

got=
deadline=$((SECONDS + 60))
while [ "$SECONDS" -lt "$deadline" ]; do
  tls "$port" 1.2 "$tmp/poll"
  if ticket_of "$tmp/poll" "$store_id"; then
    got=1
    break
  fi
  sleep 0.5
done
check "ticket_issued_after_pin_appears (within $((60 - deadline + SECONDS)) s)" n test -n "$got"

for v in 1.2 1.3; do
  tls "$port" "$v" "$tmp/t$v"
  check "tls${v}_ticket_from_store" n fresh_ticket "$tmp/t$v" "$store_id"
  tls "$port" "$v" "$tmp/r$v" "$tmp/t$v.pem"
  check "tls${v}_resumes_without_restart" n resumed "$tmp/r$v"
done
check same_master_and_worker n \
  test "$(master_pid n)" = "$master" -a "$(worker_pids n)" = "$worker" -a \
  "$(worker_of "$tmp/r1.3")" = "$worker"
check no_reload_happened n not_in_log n 'reconfiguring'
check no_worker_crashed n not_in_log n 'exited on signal'
check pin_not_in_log n not_in_log n "$(cat "$TOKEN_PIN_FILE")"
stop_nginx n
finish
