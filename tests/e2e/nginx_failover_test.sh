#!/bin/bash
# nginx_failover_test.sh: one hsmstek store on two SoftHSM tokens (fo-a
# preferred, fo-b) that hold the same master, replicated with the CLI
# ceremony of docs/CLI.md (as nginx_fleet_test.sh). nginx (2 workers) reaches
# both through the fault-injecting module (hsm/faulty/README.md), which
# removes fo-a while clients keep resuming: resumptions go on through fo-b
# (>= 95 %), no connection fails, the status page shows the failover, and
# after re-insertion the workers fail back; a ticket sealed on fo-b during
# the outage resumes afterwards. The error log gets a bounded number of
# hsmstek lines for the whole outage.
#
# Usage: nginx_failover_test.sh [BUILD_DIR]   (default /work/build-nginx)
# Prints "N passed, N failed"; exits non-zero on any failure.
set -u
build_dir=${1:-/work/build-nginx}
# shellcheck source=nginx_lib.sh
. "$(dirname "$0")/nginx_lib.sh"
faulty_so=${HSMSTEK_FAULTY_MODULE:-$build_dir/hsm/faulty/libhsmstek_faulty.so}
lib_init nginx_failover "$faulty_so"
workers=2

# --- two tokens in one SoftHSM directory, the master replicated ------------
new_token "$tmp/t" fo-a || exit 2
conf=$TOKEN_CONF a_uri=$TOKEN_URI pin=$TOKEN_PIN_FILE
new_token "$tmp/t" fo-b || exit 2
b_uri=$TOKEN_URI b_pin=$TOKEN_PIN_FILE

ceremony() {
  if ! "$@" >>"$tmp/ceremony.log" 2>&1; then
    cat "$tmp/ceremony.log" >&2
    echo "nginx_failover: replication step failed: ${*:2}" >&2
    exit 2
  fi
}
direct() { echo "pkcs11:token=$1;object=$2?module-path=$softhsm_so${3:+&pin-source=file:$3}"; }
ceremony env SOFTHSM2_CONF="$conf" "$cli" wrap-key generate \
  "$(direct fo-b fo-wrap "$b_pin")" --out "$tmp/b-wrap.pem"
ceremony env SOFTHSM2_CONF="$conf" "$cli" wrap-key trust \
  "$(direct fo-a fo-wrap)" --in "$tmp/b-wrap.pem" \
  --so-pin-source "file:$tmp/t/fo-a.so-pin"
ceremony env SOFTHSM2_CONF="$conf" "$cli" signer generate \
  "$(direct fo-a fo-signer "$pin")" --out "$tmp/a-signer.pem"
ceremony env SOFTHSM2_CONF="$conf" "$cli" signer trust \
  "$(direct fo-b fo-signer)" --in "$tmp/a-signer.pem" \
  --so-pin-source "file:$tmp/t/fo-b.so-pin"
id=$(provision "$conf" "$a_uri" --replicable) && [ -n "$id" ] || exit 2
ceremony env SOFTHSM2_CONF="$conf" "$cli" export "$a_uri" --id "$id" \
  --wrap-key 'pkcs11:object=fo-wrap' --signer 'pkcs11:object=fo-signer' \
  --out "$tmp/fo.bundle"
ceremony env SOFTHSM2_CONF="$conf" "$cli" import "$b_uri" \
  --unwrap-key 'pkcs11:object=fo-wrap' --in "$tmp/fo.bundle"

# --- nginx through the fault module ------------------------------------------
control=$tmp/control
: >"$control"
set_rules() { printf '%s' "$1" >"$control.tmp" && mv "$control.tmp" "$control"; }
via_faulty() { sed "s|module-path=[^&]*|module-path=$faulty_so|" <<<"$1"; }
port=$(free_port)
sport=$(free_port)
write_conf n "env SOFTHSM2_CONF=$conf;
env HSMSTEK_FAULTY_TARGET=$softhsm_so;
env HSMSTEK_FAULTY_CONTROL=$control;" "
    hsmstek_store fo \"$(via_faulty "$a_uri")\" \"$(via_faulty "$b_uri")\";
    server {
        listen 127.0.0.1:$port ssl;
        hsmstek_tickets fo;
        $page_location
    }
    server {
        listen 127.0.0.1:$sport;
        location = /metrics { hsmstek_status; }
    }"
if ! start_nginx n 'hsmstek: store "fo" is ready'; then
  fail "nginx did not start" n
  finish
  exit
fi

# resume_run N TAG: N resumptions, each offering the ticket of the last;
# counts into total/reused/broken.
total=0 reused=0 broken=0
resume_run() {
  local i
  for i in $(seq 1 "$1"); do
    tls "$port" 1.3 "$tmp/r" "$tmp/cur.pem"
    total=$((total + 1))
    if ! page "$tmp/r" >/dev/null; then
      broken=$((broken + 1))
      continue
    fi
    if resumed "$tmp/r"; then reused=$((reused + 1)); fi
    # The renewed ticket (or the one of a full handshake) is offered next.
    if [ -s "$tmp/r.pem" ]; then cp "$tmp/r.pem" "$tmp/cur.pem"; fi
    if [ -n "$2" ] && [ -s "$tmp/r.pem" ]; then cp "$tmp/r.pem" "$tmp/$2.pem"; fi
  done
}

tls "$port" 1.3 "$tmp/first"
check "issues_ticket_of_replicated_master" n fresh_ticket "$tmp/first" "$id"
cp "$tmp/first.pem" "$tmp/cur.pem"
resume_run 20 ""
check "resumes_before_outage ($reused/$total)" n test "$reused" -ge 19

lines_before=$(grep -c 'hsmstek' "$tmp/n/error.log")
set_rules "remove token fo-a
"
total=0 reused=0 broken=0
resume_run 80 during
echo "during the outage: $reused of $total resumed, $broken broken"
check "no_failed_connection_during_failover" n test "$broken" -eq 0
check "resumes_through_fo_b_(>=95%:$reused/$total)" n \
  test $((reused * 100)) -ge $((total * 95))
metrics=$(curl -s "http://127.0.0.1:$sport/metrics")
check "status_shows_fo_b_active" n \
  grep -q 'hsmstek_token_active{store="fo",token="2"} 1' <<<"$metrics"
check "status_counts_failover" n \
  grep -qE 'hsmstek_token_failovers_total\{store="fo",token="1"\} [1-9]' \
  <<<"$metrics"

set_rules "insert
"
sleep 1.5
total=0 reused=0 broken=0
resume_run 20 ""
check "resumes_after_failback ($reused/$total)" n test "$reused" -ge 19
tls "$port" 1.3 "$tmp/old" "$tmp/during.pem"
check "ticket_sealed_on_fo_b_resumes_after_failback" n resumed "$tmp/old"
# Failback: every worker that served a handshake since uses fo-a again.
for _ in 1 2 3 4 5 6; do tls "$port" 1.3 "$tmp/x"; done
# Each worker answers for itself: one that met a stale session of fo-a
# after re-insertion reconnects within a moment; failback waits until fo-a
# has been connected for 5 s and re-read (hold-down), and happens on a
# handshake: ask for up to 12 s, with handshakes.
back_on_a() {
  local _
  for _ in $(seq 1 40); do
    for _ in 1 2 3 4; do tls "$port" 1.3 "$tmp/x"; done
    metrics=$(curl -s "http://127.0.0.1:$sport/metrics")
    if grep -q 'hsmstek_token_up{store="fo",token="1"} 1' <<<"$metrics" &&
      grep -q 'hsmstek_token_active{store="fo",token="1"} 1' <<<"$metrics"; then
      return 0
    fi
    sleep 0.3
  done
  grep '^hsmstek_token_' <<<"$metrics" | sed 's/^/    metrics: /'
  return 1
}
check "status_shows_fo_a_up_and_active" n back_on_a

lines=$(($(grep -c 'hsmstek' "$tmp/n/error.log") - lines_before))
echo "hsmstek lines over the outage: $lines"
grep 'hsmstek' "$tmp/n/error.log" | tail -n "$lines" | sed 's/^/    log: /' | cut -c1-200
# Per worker, once per outage whatever its length: the fault, fail-soft,
# the first failed connect, failover, the maintenance and pre-arming
# threads (a line each, and their recovery), the reconnect, failback; 12
# leaves room for an outage start/end line of a worker that met the fault
# before it could fail over. Not one per handshake (80) or per probe.
check "bounded_error_log ($lines lines)" n test "$lines" -le $((workers * 12))

# A reload starts new workers that open both tokens again: no outage,
# failover or fault line (only the usual "ready" lines).
alarm='hsmstek: (store .*: (token outage|failover|failback)|token .*CKR_|.*fail-soft)'
alarms_before=$(grep -cE "$alarm" "$tmp/n/error.log")
ready_before=$(grep -c 'hsmstek: store "fo" is ready' "$tmp/n/error.log")
kill -HUP "$(master_pid n)"
for _ in $(seq 1 100); do
  [ "$(grep -c 'hsmstek: store "fo" is ready' "$tmp/n/error.log")" -ge \
    $((ready_before + workers)) ] && break
  sleep 0.1
done
for _ in 1 2 3 4; do tls "$port" 1.3 "$tmp/y" "$tmp/cur.pem"; done
check "reload_reopens_the_store" n test \
  "$(grep -c 'hsmstek: store "fo" is ready' "$tmp/n/error.log")" -ge \
  $((ready_before + workers))
check "reload_adds_no_outage_lines" n test \
  "$(grep -cE "$alarm" "$tmp/n/error.log")" -eq "$alarms_before"

stop_nginx n
finish
