#!/bin/bash
# nginx_early_data_test.sh: TLS 1.3 early data (0-RTT) with
# "hsmstek_early_data on" (docs/NGINX.md). With the opt-in, tickets stay
# sealed in the token (key name = the store id, never nginx's in-memory
# session cache) and early data is accepted; and, as docs/SECURITY.md says,
# the same 0-RTT flight is accepted again, here by a second server{} of the
# same store: the replay risk the directive accepts. Without the directive
# nginx refuses the configuration (nginx_config_test.sh).
#
# The opt-in is per server{}: b.test, selected by SNI on the default
# server's port, has neither "ssl_early_data" nor "hsmstek_early_data". Its
# tickets must offer no early data, and no 0-RTT flight may be accepted
# there, not even with a ticket of the default server that offers it
# (OpenSSL keeps the default server's early-data limit on the connection
# after nginx switches SSL_CTX).
#
# Usage: nginx_early_data_test.sh [BUILD_DIR]   (default /work/build-nginx)
set -u
build_dir=${1:-/work/build-nginx}
# shellcheck source=nginx_lib.sh
. "$(dirname "$0")/nginx_lib.sh"
lib_init nginx_early_data

new_token "$tmp/hsm" tickets || { echo "token failed" >&2; exit 2; }
store_id=$(provision "$TOKEN_CONF" "$TOKEN_URI") && [ -n "$store_id" ] ||
  { echo "provision failed" >&2; exit 2; }

port=$(free_port)
port2=$(free_port)
page='location / { return 200 "protocol=$ssl_protocol reused=$ssl_session_reused worker=$pid early=$ssl_early_data\n"; }'
write_conf e "env SOFTHSM2_CONF=$TOKEN_CONF;" "
    hsmstek_store web \"$TOKEN_URI\";
    hsmstek_tickets web;
    ssl_early_data on;
    hsmstek_early_data on;
    server {
        listen 127.0.0.1:$port ssl;
        $page
        location = /hsmstek { hsmstek_status; }
    }
    server {
        listen 127.0.0.1:$port2 ssl;
        $page
    }
    server {
        listen 127.0.0.1:$port ssl;
        server_name b.test;
        ssl_early_data off;
        hsmstek_early_data off;
        $page
    }"
if ! start_nginx e 'hsmstek: store "web" is ready'; then
  fail "nginx did not start" e
  finish
  exit
fi

printf 'GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' \
  >"$tmp/early.txt"
# early PORT OUT SESS_IN: a resumption that sends the request as early data.
early() {
  timeout 20 openssl s_client -connect "127.0.0.1:$1" \
    -servername "${4:-localhost}" -tls1_3 -sess_in "$3" \
    -early_data "$tmp/early.txt" -ign_eof </dev/null >"$2.out" 2>&1
}
max_early() {
  openssl sess_id -in "$1.pem" -noout -text | sed -n 's/.*Max Early Data: //p'
}

tls "$port" 1.3 "$tmp/full"
check "full_handshake_gets_a_store_ticket" e fresh_ticket "$tmp/full" "$store_id"
check "ticket_allows_early_data" e \
  grep -qE 'Max Early Data: [1-9]' <(openssl sess_id -in "$tmp/full.pem" -noout -text)
early "$port" "$tmp/e1" "$tmp/full.pem"
# ($ssl_early_data is 1 only if nginx read the request before the handshake
# completed: a race, so not checked.)
check "early_data_accepted_on_resumption" e \
  eval 'grep -q "Early data was accepted" "$tmp/e1.out" && grep -q "^Reused, " "$tmp/e1.out"'
# The replay the opt-in accepts: the same ticket and early data, again, on
# another server of the store.
early "$port2" "$tmp/e2" "$tmp/full.pem"
check "the_same_0rtt_flight_is_accepted_by_another_server (documented risk)" e \
  grep -q "Early data was accepted" "$tmp/e2.out"
# b.test, by SNI on the same port, did not opt in.
timeout 20 openssl s_client -connect "127.0.0.1:$port" -servername b.test \
  -tls1_3 -sess_out "$tmp/b.pem" -ign_eof </dev/null >"$tmp/b.out" 2>&1
check "sni_server_without_opt_in_issues_tickets_without_early_data ($(max_early "$tmp/b"))" e \
  test "$(max_early "$tmp/b")" = 0
early "$port" "$tmp/b1" "$tmp/b.pem" b.test
early "$port" "$tmp/b2" "$tmp/b.pem" b.test
check "sni_server_without_opt_in_accepts_no_0rtt" e \
  eval '! grep -q "Early data was accepted" "$tmp/b1.out" "$tmp/b2.out"'
# The default server's ticket (offers early data) presented to b.test.
tls "$port" 1.3 "$tmp/full2"
early "$port" "$tmp/b3" "$tmp/full2.pem" b.test
check "default_servers_ticket_brings_no_0rtt_to_b" e \
  eval 'grep -q "^Protocol.*TLSv1.3\|^New, \|^Reused, " "$tmp/b3.out" && ! grep -q "Early data was accepted" "$tmp/b3.out"'
status=$(curl -sk "https://127.0.0.1:$port/hsmstek")
issued=$(sed -n 's/^hsmstek_tickets_issued_total{store="web"} //p' <<<"$status")
check "tickets_sealed_in_the_token ($issued)" e test "${issued:-0}" -ge 1
check "no_errors_logged" e not_in_log e '[alert]'
finish
