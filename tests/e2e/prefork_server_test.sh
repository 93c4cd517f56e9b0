#!/usr/bin/env bash
# End-to-end: the pre-forking example server (examples/prefork_server.c:
# open the store, check it, bind, fork 4 workers that accept) with a store
# provisioned by the hsmstek tool in a fresh SoftHSM token, under real
# clients: openssl s_client -sess_out/-sess_in (TLS 1.3 and TLS 1.2) and
# gnutls-cli --resume. Every client's second connection must resume, on
# whichever worker it lands, including a worker's very first connection
# (the workers take turns at accept(), so the first connections meet fresh
# workers). The workers' counters must show no token error.
#
# Usage: prefork_server_test.sh <hsmstek-cli> <prefork_server>
# Prints "N passed, N failed"; exits non-zero on any failure.
set -u
cli=$1
server=$2
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
workers=4
pairs=8  # per protocol version, s_client

work=$(mktemp -d /tmp/hsmstek-e2e-prefork.XXXXXX)
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

eval "$(sh "$top/hsm/make-token.sh" "$work" prefork 2>"$work/make-token.log")" || {
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
"$server" "$port" "$work/cert.pem" "$work/key.pem" "$HSMSTEK_URI" "$workers" \
  >"$work/server.log" 2>"$work/server.err" &
server_pid=$!
for _ in $(seq 100); do
  grep -q listening "$work/server.log" && break
  sleep 0.1
done
check "the server started $workers workers" grep -q "with $workers workers" "$work/server.log"

# One client = a full handshake that stores its session, then a second
# connection offering it. -ign_eof: read until the server closes, so the
# TLS 1.3 tickets (sent after the handshake) have arrived.
total=0
resumed=0
for version in 1_3 1_2; do
  label="TLSv1.${version#1_}"
  for i in $(seq "$pairs"); do
    sess="$work/s$version-$i.pem"
    echo | timeout 10 openssl s_client -connect "127.0.0.1:$port" "-tls$version" \
      -sess_out "$sess" -ign_eof >/dev/null 2>&1
    out=$(echo | timeout 10 openssl s_client -connect "127.0.0.1:$port" "-tls$version" \
      -sess_in "$sess" -ign_eof 2>/dev/null)
    total=$((total + 1))
    if grep -q "^Reused, $label" <<<"$out"; then
      resumed=$((resumed + 1))
    else
      echo "  not resumed: openssl s_client $label client $i"
    fi
  done
done
for i in 1 2 3 4; do
  out=$(timeout 20 gnutls-cli --insecure --resume --port "$port" 127.0.0.1 </dev/null 2>&1)
  total=$((total + 1))
  if grep -q "This is a resumed session" <<<"$out"; then
    resumed=$((resumed + 1))
  else
    echo "  not resumed: gnutls-cli --resume run $i"
  fi
done
echo "  second connections resumed: $resumed of $total"
check "100 % of second connections resumed" test "$resumed" -eq "$total"

kill "$server_pid"
wait "$server_pid" 2>/dev/null
server_pid=""
sed 's/^/  /' "$work/server.log"
busy=$(grep -E '^worker' "$work/server.log" | grep -vc 'issued=0 resumed=0 renewed=0')
check "several workers served tickets ($busy of $workers)" test "$busy" -ge 2
check "no worker saw a token error" \
  test "$(grep -E '^worker' "$work/server.log" | grep -vc 'token_errors=0$')" -eq 0
if [ "$failed" -ne 0 ]; then
  echo "  server stderr:"
  sed 's/^/  /' "$work/server.err" | head -20
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
