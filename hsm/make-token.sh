#!/bin/sh
# make-token.sh <workdir> <label> [so-pin] [user-pin]
#
# Creates an isolated SoftHSM2 token for hsmstek demos and tests: its own
# config (from hsm/softhsm2.conf.in) and token directory under <workdir>,
# never /etc/softhsm or /var/lib/softhsm. Several tokens may share one
# <workdir>. PINs that are not given are random; the user PIN is written to
# <workdir>/<label>.pin and the SO PIN to <workdir>/<label>.so-pin (mode
# 0600, no trailing newline issues: hsmstek trims one "\n").
#
# Prints, on stdout, two lines to eval:
#   export SOFTHSM2_CONF='<workdir>/softhsm2.conf'
#   export HSMSTEK_URI='pkcs11:token=<label>;object=tickets?module-path=...&pin-source=file:...'
# (object=tickets is the store label; use any label you like). Progress goes
# to stderr. Example:  eval "$(hsm/make-token.sh /tmp/hsm edge)"
#
# Note: softhsm2-util takes the PINs as arguments, so they are briefly
# visible in `ps` on this machine: fine for demo tokens, not for real ones.
set -eu

die() {
  echo "make-token.sh: $*" >&2
  exit 1
}

if [ $# -lt 2 ] || [ $# -gt 4 ]; then
  die "usage: make-token.sh <workdir> <label> [so-pin] [user-pin]"
fi
workdir=$1
label=$2
so_pin=${3:-}
user_pin=${4:-}

# Labels and paths end up in a PKCS#11 URI and in file names: keep them to
# characters that need no escaping anywhere.
printf '%s' "$label" | grep -Eq '^[A-Za-z0-9._-]{1,32}$' ||
  die "label must be 1-32 characters of A-Z a-z 0-9 . _ -"
command -v softhsm2-util >/dev/null 2>&1 ||
  die "softhsm2-util not found (install softhsm2)"

mkdir -p "$workdir"
workdir=$(cd "$workdir" && pwd -P)
printf '%s' "$workdir" | grep -Eq '^/[A-Za-z0-9._/-]*$' ||
  die "workdir path must consist of A-Z a-z 0-9 . _ - /: $workdir"
case "$workdir/" in
  /etc/softhsm/* | /var/lib/softhsm/*)
    die "refusing the system SoftHSM directory $workdir" ;;
esac

module=${HSMSTEK_SOFTHSM_MODULE:-}
if [ -z "$module" ]; then
  for m in /usr/lib/softhsm/libsofthsm2.so \
    /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
    /usr/local/lib/softhsm/libsofthsm2.so; do
    if [ -f "$m" ]; then
      module=$m
      break
    fi
  done
fi
if [ -z "$module" ] || [ ! -f "$module" ]; then
  die "libsofthsm2.so not found; set HSMSTEK_SOFTHSM_MODULE"
fi

conf=$workdir/softhsm2.conf
tokendir=$workdir/tokens
if [ ! -f "$conf" ]; then
  mkdir -p "$tokendir"
  template=$(dirname "$0")/softhsm2.conf.in
  [ -f "$template" ] || die "template $template not found"
  escaped=$(printf '%s' "$tokendir" | sed 's/[\\|&]/\\&/g')
  sed "s|@TOKEN_DIR@|$escaped|" "$template" >"$conf.tmp"
  mv "$conf.tmp" "$conf"
fi
export SOFTHSM2_CONF="$conf"

if softhsm2-util --show-slots 2>/dev/null |
  sed -n 's/^[[:space:]]*Label:[[:space:]]*//p' | sed 's/[[:space:]]*$//' |
  grep -Fxq -- "$label"; then
  die "a token labelled $label already exists in $tokendir"
fi

random_pin() {
  od -An -N8 -tx1 /dev/urandom | tr -d ' \n'
}
[ -n "$so_pin" ] || so_pin=$(random_pin)
[ -n "$user_pin" ] || user_pin=$(random_pin)

softhsm2-util --init-token --free --label "$label" \
  --so-pin "$so_pin" --pin "$user_pin" >&2 ||
  die "softhsm2-util could not initialise the token"

(
  umask 077
  printf '%s\n' "$user_pin" >"$workdir/$label.pin"
  printf '%s\n' "$so_pin" >"$workdir/$label.so-pin"
)
chmod 0600 "$workdir/$label.pin" "$workdir/$label.so-pin"

echo "make-token.sh: token $label ready in $tokendir; user PIN in" \
  "$workdir/$label.pin, SO PIN in $workdir/$label.so-pin" >&2
echo "export SOFTHSM2_CONF='$conf'"
echo "export HSMSTEK_URI='pkcs11:token=$label;object=tickets?module-path=$module&pin-source=file:$workdir/$label.pin'"
