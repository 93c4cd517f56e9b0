#!/usr/bin/env bash
# End-to-end: the example C server (examples/tls_server.c, linked against
# libhsmstek.so) with a store provisioned by the hsmstek tool in a fresh
# SoftHSM token, resumed by real clients: openssl s_client (TLS 1.2
# -reconnect, TLS 1.3 -sess_out/-sess_in) and gnutls-cli --resume.
#
# Usage: example_server_test.sh <hsmstek-cli> <tls_server>
# Prints "N passed, N failed"; exits non-zero on any failure.
set -u
cli=$1
server=$2
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)

work=$(mktemp -d /tmp/hsmstek-e2e-example.XXXXXX)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

passed=0
failed=0
check() {  # check <description> <command...>
  local what=$1
  shift
  if "$@"; then
    passed=$((passed + 1))
    echo "ok   - $what"
  else
    failed=$((failed + 1))
    echo "FAIL - $what"
  fi
}

eval "$(sh "$top/hsm/make-token.sh" "$work" e2e 2>"$work/make-token.log")" || {
  cat "$work/make-token.log"
  exit 1
}
"$cli" provision "$HSMSTEK_URI" --period 1h --decrypt-window 1d >"$work/provision.log" 2>&1 || {
  cat "$work/provision.log"
  exit 1
}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$work/key.pem" -out "$work/cert.pem" -subj /CN=localhost -days 1 \
  >/dev/null 2>&1

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$server" "$port" "$work/cert.pem" "$work/key.pem" "$HSMSTEK_URI" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 50); do
  grep -q listening "$work/server.log" && break
  sleep 0.1
done

# TLS 1.2: s_client reconnects five times with the ticket from the first.
reconnect=$(echo | timeout 30 openssl s_client -connect "127.0.0.1:$port" -tls1_2 -reconnect 2>/dev/null)
check "TLS 1.2 openssl s_client -reconnect resumes every reconnection" \
  test "$(grep -c '^Reused, TLSv1.2' <<<"$reconnect")" -eq 5

# TLS 1.3: tickets arrive after the handshake, so the first client waits.
(sleep 1) | timeout 10 openssl s_client -connect "127.0.0.1:$port" -tls1_3 \
  -sess_out "$work/s13.pem" -ign_eof >/dev/null 2>&1
resumed13=$( (sleep 1) | timeout 10 openssl s_client -connect "127.0.0.1:$port" -tls1_3 \
  -sess_in "$work/s13.pem" -ign_eof 2>/dev/null | grep -c '^Reused, TLSv1.3')
check "TLS 1.3 openssl s_client -sess_in resumes" test "$resumed13" -eq 1

gnutls=$(timeout 20 gnutls-cli --insecure --resume --port "$port" 127.0.0.1 </dev/null 2>&1)
check "gnutls-cli --resume resumes" grep -q "This is a resumed session" <<<"$gnutls"

kill "$server_pid"
wait "$server_pid" 2>/dev/null
server_pid=""
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
