#!/bin/sh
# replicate-demo.sh [path/to/hsmstek] [workdir]
#
# The replication ceremony of docs/CLI.md end to end, on two throwaway
# SoftHSM tokens: create a sending and a receiving token, generate an
# unwrap-only RSA key pair on the receiver and install its public key on the
# sender as a trusted wrapping key (as the SO); generate a sign-only signing
# key on the sender and pin its public key on the receiver (as the SO);
# provision a --replicable master on the sender, export it (signed in the
# sender), import it on the receiver (signature verified there, check value
# confirmed with --expect-check), and compare the check values both tokens
# compute (`hsmstek status --json`).
#
# Exits 0 when the check values match, non-zero on any failure or
# mismatch. The hsmstek binary is the first argument, or is looked up in
# ./build. The work directory (default: a new one under /tmp, removed at
# the end unless HSMSTEK_KEEP_DEMO=1) must not already hold the demo tokens.
set -eu

die() {
  echo "replicate-demo.sh: $*" >&2
  exit 1
}
step() {
  echo >&2
  echo "== $*" >&2
}

here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-}
if [ -z "$bin" ]; then
  for candidate in ./build/src/cli/hsmstek ./build/hsmstek ./build/bin/hsmstek; do
    if [ -x "$candidate" ]; then
      bin=$candidate
      break
    fi
  done
fi
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  die "hsmstek binary not found: pass its path (e.g. build/src/cli/hsmstek)"
fi

if [ $# -ge 2 ]; then
  workdir=$2
  mkdir -p "$workdir"
else
  workdir=$(mktemp -d /tmp/hsmstek-demo-XXXXXX)
  if [ "${HSMSTEK_KEEP_DEMO:-0}" != 1 ]; then
    trap 'rm -rf "$workdir"' EXIT
  fi
fi

# Reads the check value of store id $2 from the `status --json` output $1.
check_of() {
  if command -v jq >/dev/null 2>&1; then
    printf '%s' "$1" | jq -r --arg id "$2" '.stores[] | select(.id == $id) | .check'
  elif command -v python3 >/dev/null 2>&1; then
    printf '%s' "$1" | python3 -c 'import json,sys
for s in json.load(sys.stdin)["stores"]:
    if s["id"] == sys.argv[1]: print(s["check"])' "$2"
  else
    die "need jq or python3 to read JSON"
  fi
}
first_id() {
  if command -v jq >/dev/null 2>&1; then
    printf '%s' "$1" | jq -r '.stores[0].id'
  else
    printf '%s' "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["stores"][0]["id"])'
  fi
}

step "1. two tokens in $workdir"
eval "$("$here/make-token.sh" "$workdir" demo-sender)"
sender=$HSMSTEK_URI
eval "$("$here/make-token.sh" "$workdir" demo-receiver)"
receiver=$HSMSTEK_URI
module=$(printf '%s' "$sender" | sed 's/.*module-path=\([^&]*\).*/\1/')

step "2. receiving token: an unwrap-only RSA key pair; its public key leaves as PEM"
"$bin" wrap-key generate \
  "pkcs11:token=demo-receiver;object=fleet-wrap?module-path=$module&pin-source=file:$workdir/demo-receiver.pin" \
  --out "$workdir/receiver-wrap.pem"

step "3. sending token, as the SO: install that public key as a trusted wrapping key"
"$bin" wrap-key trust "pkcs11:token=demo-sender;object=fleet-wrap?module-path=$module" \
  --in "$workdir/receiver-wrap.pem" --so-pin-source "file:$workdir/demo-sender.so-pin"

step "4. sending token: a sign-only signing key; its public key leaves as PEM"
"$bin" signer generate \
  "pkcs11:token=demo-sender;object=fleet-signer?module-path=$module&pin-source=file:$workdir/demo-sender.pin" \
  --out "$workdir/sender-signer.pem"

step "5. receiving token, as the SO: pin that public key as a bundle signer"
"$bin" signer trust "pkcs11:token=demo-receiver;object=fleet-signer?module-path=$module" \
  --in "$workdir/sender-signer.pem" --so-pin-source "file:$workdir/demo-receiver.so-pin"

step "6. sending token: a replicable master"
"$bin" provision "$sender" --replicable --period 1h --decrypt-window 1d
sender_json=$("$bin" status --json "$sender")
id=$(first_id "$sender_json")
[ -n "$id" ] || die "no store id in: $sender_json"

step "7. export master $id wrapped under the trusted key, signed in the sender"
"$bin" export "$sender" --id "$id" --wrap-key 'pkcs11:object=fleet-wrap' \
  --signer 'pkcs11:object=fleet-signer' --out "$workdir/tickets.bundle"

step "8. import it on the receiving token (signature checked against the pinned signer)"
"$bin" import "$receiver" --unwrap-key 'pkcs11:object=fleet-wrap' \
  --expect-check "$(check_of "$sender_json" "$id")" --in "$workdir/tickets.bundle"

step "9. compare check values"
receiver_json=$("$bin" status --json "$receiver")
sender_check=$(check_of "$sender_json" "$id")
receiver_check=$(check_of "$receiver_json" "$id")
echo "sender   $id check $sender_check" >&2
echo "receiver $id check $receiver_check" >&2
if [ -z "$sender_check" ] || [ "$sender_check" != "$receiver_check" ]; then
  die "check values differ: the receiving token does not hold the same master"
fi
echo "replicate-demo.sh: OK, both tokens hold master $id (check $sender_check)"
