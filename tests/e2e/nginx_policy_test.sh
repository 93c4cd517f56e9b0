#!/bin/bash
# nginx_policy_test.sh: session tickets are bound to the security policy of
# the server{} that issued them (docs/NGINX.md, "One store per fleet,
# policies bound per server").
#
# One store and one certificate for three server{} blocks:
#   f.test (default of port P): ssl_verify_client optional, trusts CA X and
#          CA Y (Y only through ssl_trusted_certificate, so nginx's session
#          id context, which hashes certificates and client-CA names, is the
#          same as g's);
#   g.test (on P by SNI, and alone on port G): ssl_verify_client on, trusts
#          CA X only;
#   f.test again, alone on port H: the same policy as the first f.test (a
#          second server of the fleet).
#
# The attack: a client with a CA-Y certificate, refused by g.test on a full
# handshake, presents its f.test ticket to g.test: by SNI on P, and on G with
# SNI f.test (the session's own name, so nginx's TLS 1.3 SNI-vs-session check
# does not apply: only the policy binding stops it). It must get a full
# handshake and be refused (no "Reused", no verify=SUCCESS), over TLS 1.2 and
# 1.3. Control: the same ticket resumes on H (identical policy) and on f.test,
# and a CA-X client's g.test ticket resumes on g.test. The same with a shared
# session cache and session ids instead of tickets (TLS 1.2).
#
# Usage: nginx_policy_test.sh [BUILD_DIR]   (default /work/build-nginx)
set -u
build_dir=${1:-/work/build-nginx}
# shellcheck source=nginx_lib.sh
. "$(dirname "$0")/nginx_lib.sh"
lib_init nginx_policy

# --- CAs and client certificates ----------------------------------------------

# ca NAME: a self-signed CA in $tmp/NAME.{pem,key}.
ca() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$tmp/$1.key" -out "$tmp/$1.pem" -subj "/CN=$1" -days 2 \
    -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign >/dev/null 2>&1
}
# client NAME CA: a client certificate for CN=NAME issued by CA.
client() {
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$tmp/$1.key" -out "$tmp/$1.csr" -subj "/CN=$1" >/dev/null 2>&1 &&
    openssl x509 -req -in "$tmp/$1.csr" -CA "$tmp/$2.pem" -CAkey "$tmp/$2.key" \
      -CAcreateserial -out "$tmp/$1.pem" -days 2 >/dev/null 2>&1
}
{ ca caX && ca caY && client clientX caX && client clientY caY; } ||
  { echo "nginx_policy: certificates failed" >&2; exit 2; }

new_token "$tmp/hsm" tickets || { echo "token failed" >&2; exit 2; }
store_id=$(provision "$TOKEN_CONF" "$TOKEN_URI") && [ -n "$store_id" ] ||
  { echo "provision failed" >&2; exit 2; }

port=$(free_port)
gport=$(free_port)
hport=$(free_port)
page='location / { return 200 "protocol=$ssl_protocol reused=$ssl_session_reused worker=$pid host=$host verify=$ssl_client_verify dn=$ssl_client_s_dn\n"; }'
write_conf p "env SOFTHSM2_CONF=$TOKEN_CONF;" "
    hsmstek_store web \"$TOKEN_URI\";
    hsmstek_tickets web;
    ssl_session_cache shared:SSL:1m;
    server {
        listen 127.0.0.1:$port ssl default_server;
        server_name f.test;
        ssl_verify_client optional;
        ssl_client_certificate $tmp/caX.pem;
        ssl_trusted_certificate $tmp/caY.pem;
        $page
    }
    server {
        listen 127.0.0.1:$port ssl;
        listen 127.0.0.1:$gport ssl;
        server_name g.test;
        ssl_verify_client on;
        ssl_client_certificate $tmp/caX.pem;
        $page
    }
    server {
        listen 127.0.0.1:$hport ssl;
        server_name f.test;
        ssl_verify_client optional;
        ssl_client_certificate $tmp/caX.pem;
        ssl_trusted_certificate $tmp/caY.pem;
        $page
        location = /hsmstek { hsmstek_status; }
    }"
if ! start_nginx p 'hsmstek: store "web" is ready'; then
  fail "nginx did not start" p
  finish
  exit
fi

# conn PORT VERSION HOST CLIENT OUT [SESS_IN]: one s_client connection to
# HOST (SNI and Host header) with CLIENT's certificate.
conn() {
  local args=(-connect "127.0.0.1:$1" -servername "$3" "-tls${2/./_}"
    -cert "$tmp/$4.pem" -key "$tmp/$4.key" -sess_out "$5.pem" -ign_eof
    "${tls_extra[@]}")
  if [ $# -ge 6 ]; then args+=(-sess_in "$6"); fi
  rm -f "$5.pem"
  printf 'GET / HTTP/1.0\r\nHost: %s\r\n\r\n' "$3" |
    timeout 20 openssl s_client "${args[@]}" >"$5.out" 2>&1
}
# refused OUT: a full handshake after which nginx refused the certificate.
refused() {
  grep -q '^New, ' "$1.out" && ! grep -q '^Reused, ' "$1.out" &&
    grep -q '400 Bad Request' "$1.out" && ! grep -q 'verify=SUCCESS' "$1.out"
}
admitted_as() {
  grep -q "verify=SUCCESS dn=CN=$2" "$1.out"
}

for v in 1.2 1.3; do
  d=$tmp/v$v
  mkdir -p "$d"
  conn "$port" "$v" f.test clientY "$d/f"
  check "tls${v}_f_admits_clientY_and_issues_a_ticket" p \
    eval 'fresh_ticket "$d/f" "$store_id" && admitted_as "$d/f" clientY'
  conn "$port" "$v" g.test clientY "$d/g_direct"
  check "tls${v}_g_refuses_clientY_on_a_full_handshake" p refused "$d/g_direct"

  # The attack, by SNI on the shared port and on g's own port.
  conn "$port" "$v" g.test clientY "$d/g_sni" "$d/f.pem"
  check "tls${v}_f_ticket_on_g_by_sni_is_a_full_handshake_and_refused" p \
    refused "$d/g_sni"
  conn "$gport" "$v" f.test clientY "$d/g_port" "$d/f.pem"
  check "tls${v}_f_ticket_on_g_own_port_is_a_full_handshake_and_refused" p \
    refused "$d/g_port"

  # Identical policies: the ticket moves freely.
  conn "$port" "$v" f.test clientY "$d/f2"
  conn "$hport" "$v" f.test clientY "$d/h" "$d/f2.pem"
  check "tls${v}_f_ticket_resumes_on_another_server_with_the_same_policy" p \
    eval 'resumed "$d/h" && admitted_as "$d/h" clientY'
  conn "$port" "$v" f.test clientY "$d/f3"
  conn "$port" "$v" f.test clientY "$d/f_again" "$d/f3.pem"
  check "tls${v}_f_ticket_resumes_on_f" p resumed "$d/f_again"
  # g's own tickets resume on g for a client it trusts.
  conn "$port" "$v" g.test clientX "$d/gx"
  conn "$port" "$v" g.test clientX "$d/gx_again" "$d/gx.pem"
  check "tls${v}_g_ticket_resumes_on_g_for_clientX" p \
    eval 'resumed "$d/gx_again" && admitted_as "$d/gx_again" clientX'
done

# A shared session cache (TLS 1.2 session ids, client without tickets)
# never reaches the ticket hooks: libhsmstek's session id context, derived
# from each server's policy, keeps f's session off g.
d=$tmp/cache
mkdir -p "$d"
tls_extra=(-no_ticket)
conn "$port" 1.2 f.test clientY "$d/f"
check "cache_f_admits_clientY_without_a_ticket" p \
  eval 'full_no_ticket "$d/f" && admitted_as "$d/f" clientY'
conn "$port" 1.2 g.test clientY "$d/g_sni" "$d/f.pem"
check "cache_f_session_id_on_g_by_sni_is_a_full_handshake_and_refused" p \
  refused "$d/g_sni"
conn "$gport" 1.2 f.test clientY "$d/g_port" "$d/f.pem"
check "cache_f_session_id_on_g_own_port_is_a_full_handshake_and_refused" p \
  refused "$d/g_port"
conn "$port" 1.2 f.test clientY "$d/f_again" "$d/f.pem"
check "cache_f_session_id_resumes_on_f" p \
  eval 'grep -q "^Reused, " "$d/f_again.out" && admitted_as "$d/f_again" clientY'
tls_extra=()

# The refusals are counted as policy rejections, not resumptions.
status=$(curl -sk --resolve "f.test:$hport:127.0.0.1" "https://f.test:$hport/hsmstek")
policy=$(sed -n 's/^hsmstek_tickets_rejected_total{store="web",reason="policy"} //p' <<<"$status")
check "status_counts_policy_rejections ($policy)" p test "${policy:-0}" -ge 4
check "status_has_not_resumed_counter" p \
  grep -q '^hsmstek_tickets_not_resumed_total{store="web"} ' <<<"$status"
# Resumption counters match the resumptions clients saw (one worker): the
# refused tickets were opened by the token but are not counted as resumed.
metric() { sed -n "s/^$1{store=\"web\"} //p" <<<"$status"; }
counted=$(($(metric hsmstek_tickets_resumed_total) + $(metric hsmstek_tickets_renewed_total)))
seen=$(cat "$tmp"/v*/*.out | grep -c '^Reused, ')
check "status_counts_the_resumptions_clients_saw ($counted counted, $seen seen)" p \
  test "$counted" -eq "$seen"
check "no_errors_logged" p not_in_log p '[alert]'

finish
