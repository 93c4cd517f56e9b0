#!/usr/bin/env bash
# Key-custody audit (docs/TESTING.md, docs/SECURITY.md, docs/FORMAT.md): runs a test command with every
# PKCS#11 call of it and of its subprocesses going through
# libhsmstek_faulty.so in audit mode (hsm/faulty/README.md, "Audit"), then
# fails if the audit log holds any violation that is not explicitly allowed:
#   read-value    C_GetAttributeValue asked for CKA_VALUE of a secret or
#                 private key
#   weak-key      a key created without CKA_SENSITIVE=TRUE and
#                 CKA_EXTRACTABLE=FALSE (except extractable only under
#                 CKA_WRAP_WITH_TRUSTED), or read back weaker
#   wrap          any C_WrapKey (allowed only where the command is an export)
#   derive-usage  a derived key with usage flags beyond docs/FORMAT.md, or on the
#                 token
#
# Usage:
#   custody_audit.sh --module <libhsmstek_faulty.so> [--allow ERE]...
#                    [--expect ERE]... -- <command> [args...]
#
#   --allow ERE   violation lines matching ERE do not fail the run
#   --expect ERE  at least one violation line must match ERE (a deliberate
#                 attempt the test makes); matching lines do not fail the run
#
# The command must succeed and must have made PKCS#11 calls through the
# module (an empty trace means nothing was audited: failure). The command
# reaches the module through HSMSTEK_TEST_MODULE (tests/support/softhsm.cc)
# and HSMSTEK_SOFTHSM_MODULE (hsm/make-token.sh); the module forwards to
# SoftHSM (HSMSTEK_FAULTY_TARGET, found here when unset). No fault rules are
# active. HSMSTEK_KEEP_AUDIT=1 keeps the audit and trace files.
set -euo pipefail

die() {
  echo "custody_audit: $*" >&2
  exit 2
}

module=
allow=()
expect=()
while [ $# -gt 0 ]; do
  case $1 in
    --module) module=${2:?}; shift 2 ;;
    --allow) allow+=("${2:?}"); shift 2 ;;
    --expect) expect+=("${2:?}"); shift 2 ;;
    --) shift; break ;;
    *) die "unknown argument $1 (usage: see the header of $0)" ;;
  esac
done
[ $# -gt 0 ] || die "no command given"
[ -f "$module" ] || die "faulty module not found: '$module'"

target=${HSMSTEK_FAULTY_TARGET:-}
if [ -z "$target" ]; then
  for m in /usr/lib/softhsm/libsofthsm2.so \
    /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so; do
    if [ -f "$m" ]; then target=$m; break; fi
  done
fi
[ -n "$target" ] || die "SoftHSM module not found; set HSMSTEK_FAULTY_TARGET"

work=$(mktemp -d "${TMPDIR:-/tmp}/hsmstek-audit-XXXXXX")
if [ -z "${HSMSTEK_KEEP_AUDIT:-}" ]; then
  trap 'rm -rf "$work"' EXIT
else
  echo "custody_audit: keeping $work" >&2
fi
audit=$work/audit
trace=$work/trace

rc=0
env -u HSMSTEK_FAULTY_CONTROL -u HSMSTEK_FAULTY_STATS \
  HSMSTEK_TEST_MODULE="$module" HSMSTEK_SOFTHSM_MODULE="$module" \
  HSMSTEK_FAULTY_TARGET="$target" HSMSTEK_FAULTY_AUDIT="$audit" \
  HSMSTEK_FAULTY_TRACE="$trace" "$@" || rc=$?

calls=0
processes=0
if [ -f "$trace" ]; then
  calls=$(wc -l <"$trace")
  processes=$(awk '{print $1}' "$trace" | sort -u | wc -l)
fi
count_fn() { [ -f "$trace" ] && awk -v f="$1" '$2 == f' "$trace" | wc -l || echo 0; }

violations=()
if [ -f "$audit" ]; then
  mapfile -t violations < <(grep -v '^summary ' "$audit" || true)
fi

failed=0
unexpected=0
allowed=0
expected_hits=0
for line in "${violations[@]}"; do
  [ -n "$line" ] || continue
  kind=unexpected
  for re in "${expect[@]}"; do
    if [[ $line =~ $re ]]; then kind=expected; break; fi
  done
  if [ $kind = unexpected ]; then
    for re in "${allow[@]}"; do
      if [[ $line =~ $re ]]; then kind=allowed; break; fi
    done
  fi
  case $kind in
    expected) expected_hits=$((expected_hits + 1)) ;;
    allowed) allowed=$((allowed + 1)) ;;
    *)
      echo "custody_audit: VIOLATION: $line" >&2
      unexpected=$((unexpected + 1))
      ;;
  esac
done
for re in "${expect[@]}"; do
  found=0
  for line in "${violations[@]}"; do
    if [[ $line =~ $re ]]; then found=1; break; fi
  done
  if [ $found = 0 ]; then
    echo "custody_audit: expected a violation matching '$re'; none recorded" >&2
    failed=1
  fi
done

echo "custody_audit: $calls PKCS#11 calls audited in $processes process(es)" \
  "(C_GetAttributeValue $(count_fn C_GetAttributeValue)," \
  "C_DeriveKey $(count_fn C_DeriveKey), C_CreateObject" \
  "$(count_fn C_CreateObject), C_GenerateKey $(count_fn C_GenerateKey)," \
  "C_UnwrapKey $(count_fn C_UnwrapKey), C_WrapKey $(count_fn C_WrapKey));" \
  "violations: $unexpected unexpected, $allowed allowed, $expected_hits expected"
if [ "$rc" != 0 ]; then
  echo "custody_audit: the command failed (exit $rc)" >&2
  failed=1
fi
if [ "$calls" = 0 ]; then
  echo "custody_audit: no PKCS#11 call went through $module: nothing audited" >&2
  failed=1
fi
[ "$unexpected" = 0 ] || failed=1
exit $failed
