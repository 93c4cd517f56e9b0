#!/bin/bash
# nginx_migration_test.sh: moving an nginx server from a legacy
# `ssl_session_ticket_key` file (80 bytes: name16 || hmac32 || aes32) to
# tickets sealed in the token, without losing its clients' sessions.
#
#  1. nginx without hsmstek, with the key file, issues TLS 1.2 and TLS 1.3
#     tickets named by the file's key name. A second server uses another key
#     file that will NOT be imported (control).
#  2. nginx stops; `hsmstek import-legacy --format nginx` puts the file's
#     keys into the token (decrypt-only) next to a provisioned master; the
#     key file is deleted.
#  3. nginx starts again with hsmstek_tickets and no key file: the old
#     tickets resume, and each resumption is renewed with a ticket sealed
#     under the store's master. The control ticket does not resume.
#
# Usage: nginx_migration_test.sh [BUILD_DIR]   (default /work/build-nginx)
# Prints "N passed, N failed"; exits non-zero on any failure.
set -u
build_dir=${1:-/work/build-nginx}
# shellcheck source=nginx_lib.sh
. "$(dirname "$0")/nginx_lib.sh"
lib_init nginx_migration

# Key files with recognisable random names.
key_file=$tmp/ticket.key
other_key_file=$tmp/other-ticket.key
head -c 80 /dev/urandom >"$key_file"
head -c 80 /dev/urandom >"$other_key_file"
legacy_name=$(head -c 16 "$key_file" | od -An -tx1 | tr -d ' \n')
other_name=$(head -c 16 "$other_key_file" | od -An -tx1 | tr -d ' \n')
named() { [ "$(ticket_name "$1")" = "$2" ]; }

port=$(free_port)
other_port=$(free_port)
status_port=$(free_port)

# --- 1. before: nginx's own key files ---------------------------------------

write_conf old "" "
    server {
        listen 127.0.0.1:$port ssl;
        ssl_session_ticket_key $key_file;
        $page_location
    }
    server {
        listen 127.0.0.1:$other_port ssl;
        ssl_session_ticket_key $other_key_file;
        $page_location
    }"
if ! start_nginx old 'start worker process'; then
  fail "legacy nginx did not start" old
  finish
  exit
fi
for v in 1.2 1.3; do
  tls "$port" "$v" "$tmp/legacy$v"
  check "tls${v}_legacy_ticket_under_key_file" old named "$tmp/legacy$v" "$legacy_name"
  tls "$other_port" "$v" "$tmp/other$v"
  check "tls${v}_control_ticket_under_other_key_file" old named "$tmp/other$v" "$other_name"
done
stop_nginx old

# --- 2. import into the token ------------------------------------------------

new_token "$tmp/hsm" tickets || exit 2
store_id=$(provision "$TOKEN_CONF" "$TOKEN_URI") && [ -n "$store_id" ] || exit 2
if SOFTHSM2_CONF=$TOKEN_CONF "$cli" import-legacy "$TOKEN_URI" --format nginx \
  --expires-in 24h "$key_file" >"$tmp/import.out" 2>&1; then
  check import_legacy_names_the_key - grep -q "$legacy_name" "$tmp/import.out"
else
  fail "import-legacy failed: $(cat "$tmp/import.out")"
fi
rm -f "$key_file" "$other_key_file"

# --- 3. after: hsmstek ---------------------------------------------------------

write_conf new "env SOFTHSM2_CONF=$TOKEN_CONF;" "
    hsmstek_store web \"$TOKEN_URI\";
    hsmstek_tickets web;
    server {
        listen 127.0.0.1:$port ssl;
        $page_location
    }
    server {
        listen 127.0.0.1:$status_port;
        location = /hsmstek { hsmstek_status; }
    }"
if ! start_nginx new 'hsmstek: store "web" is ready'; then
  fail "nginx with hsmstek did not start" new
  finish
  exit
fi
for v in 1.2 1.3; do
  tls "$port" "$v" "$tmp/migrated$v" "$tmp/legacy$v.pem"
  check "tls${v}_legacy_ticket_resumes_after_migration" new resumed "$tmp/migrated$v"
  check "tls${v}_renewed_under_store_master" new ticket_of "$tmp/migrated$v" "$store_id"
  # The renewed ticket resumes too. (Only a TLS 1.3 client keeps it: OpenSSL
  # does not cache a resumed TLS 1.2 session, so s_client writes no file.)
  if [ "$v" = 1.3 ]; then
    tls "$port" "$v" "$tmp/again$v" "$tmp/migrated$v.pem"
    check "tls${v}_renewed_ticket_resumes" new resumed "$tmp/again$v"
  fi
  tls "$port" "$v" "$tmp/control$v" "$tmp/other$v.pem"
  check "tls${v}_not_imported_key_does_not_resume" new fresh_ticket "$tmp/control$v" "$store_id"
done
status=$(curl -s --max-time 20 "http://127.0.0.1:$status_port/hsmstek")
renewed=$(awk '$1 == "hsmstek_tickets_renewed_total{store=\"web\"}" { print $2 }' <<<"$status")
unknown=$(awk '$1 == "hsmstek_tickets_rejected_total{store=\"web\",reason=\"unknown_key\"}" { print $2 }' <<<"$status")
# Both legacy resumptions were renewed (as was the TLS 1.3 "again"); both
# control tickets were unknown keys.
check "status_counts_renewals_and_unknown_keys (renewed=$renewed unknown=$unknown)" new \
  test "${renewed:-0}" -ge 3 -a "${unknown:-0}" -eq 2
stop_nginx new
finish
