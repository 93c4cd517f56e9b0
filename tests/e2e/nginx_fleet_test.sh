#!/bin/bash
# nginx_fleet_test.sh: a fleet of two nginx servers whose separate SoftHSM
# tokens hold the same master, replicated the way docs/CLI.md describes
# (hsmstek wrap-key generate on B, wrap-key trust on A as the SO; signer
# generate on A, signer trust on B as the SO; provision --replicable +
# export --signer on A, import --expect-check on B: the bundle is signed in
# A and verified against the signer B's SO pinned). A session ticket
# issued by A resumes on B and one issued by B resumes on A, over TLS 1.2 and
# TLS 1.3. Control: a third server C whose token has its own master under
# the same label accepts neither (full handshake), so the resumptions on B
# come from the replicated master and nothing else. Then, for a second
# store with a one-minute ratchet, tickets issued before a ratchet step
# resume on both servers after it (about a minute of waiting).
#
# Each token lives in its own directory with its own softhsm2.conf; each
# nginx names its own with `env SOFTHSM2_CONF=...;`.
#
# Usage: nginx_fleet_test.sh [BUILD_DIR]   (default /work/build-nginx)
# Prints "N passed, N failed"; exits non-zero on any failure.
set -u
build_dir=${1:-/work/build-nginx}
# shellcheck source=nginx_lib.sh
. "$(dirname "$0")/nginx_lib.sh"
lib_init nginx_fleet

# status_field CONF URI ID FIELD: a field of store ID in `status --json`.
status_field() {
  SOFTHSM2_CONF=$1 "$cli" status --json "$2" 2>/dev/null |
    python3 -c 'import json, sys
for s in json.load(sys.stdin)["stores"]:
    if s["id"] == sys.argv[1]:
        print(s[sys.argv[2]])' "$3" "$4"
}

# --- the replication ceremony -------------------------------------------------

new_token "$tmp/a" fleet-a || exit 2
a_conf=$TOKEN_CONF a_uri=$TOKEN_URI
new_token "$tmp/b" fleet-b || exit 2
b_conf=$TOKEN_CONF b_uri=$TOKEN_URI
new_token "$tmp/c" fleet-c || exit 2
c_conf=$TOKEN_CONF c_uri=$TOKEN_URI

# ceremony: one step of it; its output goes to $tmp/ceremony.log.
ceremony() {
  if ! "$@" >>"$tmp/ceremony.log" 2>&1; then
    cat "$tmp/ceremony.log" >&2
    echo "nginx_fleet: replication step failed: ${*:2}" >&2
    exit 2
  fi
}
ceremony env SOFTHSM2_CONF="$b_conf" "$cli" wrap-key generate \
  "pkcs11:token=fleet-b;object=fleet-wrap?module-path=$softhsm_so&pin-source=file:$tmp/b/fleet-b.pin" \
  --out "$tmp/b-wrap.pem"
ceremony env SOFTHSM2_CONF="$a_conf" "$cli" wrap-key trust \
  "pkcs11:token=fleet-a;object=fleet-wrap?module-path=$softhsm_so" \
  --in "$tmp/b-wrap.pem" --so-pin-source "file:$tmp/a/fleet-a.so-pin"
ceremony env SOFTHSM2_CONF="$a_conf" "$cli" signer generate \
  "pkcs11:token=fleet-a;object=fleet-signer?module-path=$softhsm_so&pin-source=file:$tmp/a/fleet-a.pin" \
  --out "$tmp/a-signer.pem"
ceremony env SOFTHSM2_CONF="$b_conf" "$cli" signer trust \
  "pkcs11:token=fleet-b;object=fleet-signer?module-path=$softhsm_so" \
  --in "$tmp/a-signer.pem" --so-pin-source "file:$tmp/b/fleet-b.so-pin"
id=$(provision "$a_conf" "$a_uri" --replicable) && [ -n "$id" ] || exit 2
ceremony env SOFTHSM2_CONF="$a_conf" "$cli" export "$a_uri" --id "$id" \
  --wrap-key 'pkcs11:object=fleet-wrap' --signer 'pkcs11:object=fleet-signer' \
  --out "$tmp/tickets.bundle"
ceremony env SOFTHSM2_CONF="$b_conf" "$cli" import "$b_uri" \
  --unwrap-key 'pkcs11:object=fleet-wrap' --in "$tmp/tickets.bundle" \
  --expect-check "$(status_field "$a_conf" "$a_uri" "$id" check)"
c_id=$(provision "$c_conf" "$c_uri") && [ -n "$c_id" ] || exit 2

a_check=$(status_field "$a_conf" "$a_uri" "$id" check)
b_check=$(status_field "$b_conf" "$b_uri" "$id" check)
check "replicated_master_same_check_value ($a_check)" - \
  test -n "$a_check" -a "$a_check" = "$b_check"
check "token_b_master_is_active" - \
  test "$(status_field "$b_conf" "$b_uri" "$id" state)" = active

# --- three nginx servers --------------------------------------------------------

declare -A port=()
for n in a b c; do
  port[$n]=$(free_port)
  conf_var=${n}_conf uri_var=${n}_uri
  write_conf "$n" "env SOFTHSM2_CONF=${!conf_var};" "
    hsmstek_store fleet \"${!uri_var}\";
    server {
        listen 127.0.0.1:${port[$n]} ssl;
        hsmstek_tickets fleet;
        $page_location
    }"
  if ! start_nginx "$n" 'hsmstek: store "fleet" is ready'; then
    fail "nginx $n did not start" "$n"
    finish
    exit
  fi
done

for v in 1.2 1.3; do
  tls "${port[a]}" "$v" "$tmp/a$v"
  check "tls${v}_a_issues_ticket_under_replicated_master" a \
    fresh_ticket "$tmp/a$v" "$id" "$a_conf" "$a_uri"
  tls "${port[b]}" "$v" "$tmp/ab$v" "$tmp/a$v.pem"
  check "tls${v}_ticket_from_a_resumes_on_b" b resumed "$tmp/ab$v"

  tls "${port[b]}" "$v" "$tmp/b$v"
  check "tls${v}_b_issues_ticket_under_replicated_master" b \
    fresh_ticket "$tmp/b$v" "$id" "$b_conf" "$b_uri"
  tls "${port[a]}" "$v" "$tmp/ba$v" "$tmp/b$v.pem"
  check "tls${v}_ticket_from_b_resumes_on_a" a resumed "$tmp/ba$v"

  # Control: C's own master (same label, other key) cannot open A's ticket.
  tls "${port[c]}" "$v" "$tmp/ac$v" "$tmp/a$v.pem"
  check "tls${v}_ticket_from_a_not_resumed_by_other_master" c \
    fresh_ticket "$tmp/ac$v" "$c_id" "$c_conf" "$c_uri"
done

for n in a b c; do stop_nginx "$n"; done

# --- across a ratchet step ------------------------------------------------------
# A second store "step" with the shortest policy allowed (period 1m, ratchet
# 1m, window 5m), replicated A -> B the same way. Tickets issued by A and B
# before a ratchet step resume on both after it (their link is kept for the
# decrypt window), and both servers' status pages show the link advanced.
# Waits at most ~80 s for the step.
a_step_uri=${a_uri/object=tickets/object=step}
b_step_uri=${b_uri/object=tickets/object=step}
step_id=$(SOFTHSM2_CONF=$a_conf "$cli" provision "$a_step_uri" --period 1m \
  --decrypt-window 5m --ratchet 1m --replicable 2>>"$tmp/ceremony.log" |
  awk '/store id:/ { print $3; exit }')
[ -n "$step_id" ] || { cat "$tmp/ceremony.log" >&2; exit 2; }
ceremony env SOFTHSM2_CONF="$a_conf" "$cli" export "$a_step_uri" \
  --id "$step_id" --wrap-key 'pkcs11:object=fleet-wrap' \
  --signer 'pkcs11:object=fleet-signer' --out "$tmp/step.bundle"
ceremony env SOFTHSM2_CONF="$b_conf" "$cli" import "$b_step_uri" \
  --unwrap-key 'pkcs11:object=fleet-wrap' --in "$tmp/step.bundle" \
  --expect-check "$(status_field "$a_conf" "$a_step_uri" "$step_id" check)"

declare -A status_port=()
for n in a b; do
  port[$n]=$(free_port)
  status_port[$n]=$(free_port)
  conf_var=${n}_conf uri_var=${n}_step_uri
  write_conf "step-$n" "env SOFTHSM2_CONF=${!conf_var};" "
    hsmstek_store step \"${!uri_var}\";
    server {
        listen 127.0.0.1:${port[$n]} ssl;
        hsmstek_tickets step;
        $page_location
    }
    server {
        listen 127.0.0.1:${status_port[$n]};
        location = /hsmstek { hsmstek_status; }
    }"
  if ! start_nginx "step-$n" 'hsmstek: store "step" is ready'; then
    fail "nginx step-$n did not start" "step-$n"
    finish
    exit
  fi
done

# ratchet_link NAME: hsmstek_ratchet_link of store "step" on NAME's page.
ratchet_link() {
  curl -s --max-time 10 "http://127.0.0.1:${status_port[$1]}/hsmstek" |
    awk '$1 == "hsmstek_ratchet_link{store=\"step\"}" { print $2 }'
}

# Issue early in a minute: the step must come after every ticket.
while [ $(( $(date +%s) % 60 )) -gt 40 ]; do sleep 1; done
for n in a b; do
  for v in 1.2 1.3; do
    conf_var=${n}_conf uri_var=${n}_step_uri
    tls "${port[$n]}" "$v" "$tmp/step-$n$v"
    check "step_tls${v}_${n}_issues_ticket" "step-$n" \
      fresh_ticket "$tmp/step-$n$v" "$step_id" "${!conf_var}" "${!uri_var}"
  done
done
link_a=$(ratchet_link a)
link_b=$(ratchet_link b)
check "step_both_serve_the_same_link ($link_a, $link_b)" - \
  test -n "$link_a" -a "$link_a" = "$link_b"
after_a=$link_a after_b=$link_b
for _ in $(seq 1 90); do
  after_a=$(ratchet_link a)
  after_b=$(ratchet_link b)
  if [ -n "$link_a" ] && [ "${after_a:-0}" -gt "$link_a" ] &&
     [ "${after_b:-0}" -gt "$link_a" ]; then
    break
  fi
  sleep 1
done
check "step_ratchet_link_advanced ($link_a -> $after_a on a, $after_b on b)" - \
  test -n "$link_a" -a "${after_a:-0}" -gt "${link_a:-0}" \
  -a "${after_b:-0}" -gt "${link_a:-0}"
for n in a b; do
  for v in 1.2 1.3; do
    for m in a b; do
      tls "${port[$m]}" "$v" "$tmp/step-$n$v-on-$m" "$tmp/step-$n$v.pem"
      check "step_tls${v}_ticket_from_${n}_resumes_on_${m}_after_the_step" \
        "step-$m" resumed "$tmp/step-$n$v-on-$m"
    done
  done
done
for n in a b; do stop_nginx "step-$n"; done
finish
