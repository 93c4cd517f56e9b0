#!/usr/bin/env bash
# Instructions per operation under valgrind --tool=callgrind: a deterministic
# cross-check of scripts/bench.sh's timings on a noisy machine (instruction
# counts do not see cache misses, syscalls or lock waits, so they are not a
# substitute for the timings; they show where the work is).
#
#   bench/callgrind.sh [BUILD_DIR]     # default build-bench; needs hsmstek_bench
#
# Each measurement runs one benchmark for a fixed number of iterations
# (hsmstek_bench --iterations=N) and collects only inside the per-operation
# function (--toggle-collect), so set-up is excluded. Takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bench=${1:-build-bench}/bench/hsmstek_bench
[ -x "$bench" ] || { echo "no $bench; run scripts/bench.sh first" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind not installed" >&2; exit 2; }
n_ticket=${N_TICKET:-300}
n_handshake=${N_HANDSHAKE:-60}

# ir FILTER FUNCTION N EXTRA_CALLS [FLAGS...]: instructions per call.
ir() {
  local filter=$1 func=$2 n=$3 extra=$4
  shift 4
  local total
  total=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null \
            --toggle-collect="*$func*" "$bench" "$@" --iterations="$n" \
            --benchmark_filter="$filter" 2>&1 |
          awk '/Collected :/ { print $NF }')
  echo $(( total / (n + extra) ))
}

declare -A r
# Seal benchmarks call their function once more during set-up.
r[floor_seal]=$(ir '^floor/seal/.*threads:1$' FloorSeal "$n_ticket" 1)
r[floor_open]=$(ir '^floor/open/.*threads:1$' FloorOpen "$n_ticket" 0)
r[evp_seal]=$(ir '^evp/seal/hsmstek/.*threads:1$' LibsslSeal "$n_ticket" 1)
r[evp_open]=$(ir '^evp/open/hsmstek/.*threads:1$' LibsslOpen "$n_ticket" 0)
r[sw_seal]=$(ir '^evp/seal/nginx_style/.*threads:1$' LibsslSeal "$n_ticket" 1)
r[sw_open]=$(ir '^evp/open/nginx_style/.*threads:1$' LibsslOpen "$n_ticket" 0)
for tls in tls13 tls12; do
  for v in builtin nginx_style hsmstek; do
    r[resume_${tls}_$v]=$(ir "^resume/$tls/$v/.*threads:1\$" ResumeOnce "$n_handshake" 0)
  done
  r[resume_${tls}_builtin_scoped]=$(ir "^resume/$tls/builtin_scoped/.*threads:1$" \
    ResumeOnce "$n_handshake" 0)
  r[full_${tls}]=$(ir "^full/$tls/builtin/" FullOnce "$n_handshake" 0)
  r[full_${tls}_pw]=$(ir "^full/$tls/builtin/" FullOnce "$n_handshake" 0 --process-wide)
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
echo "instructions per operation (callgrind; $n_ticket tickets, $n_handshake handshakes)"
printf '  %-34s %12s %12s %8s\n' "" floor hsmstek ratio
printf '  %-34s %12s %12s %8s\n' "seal (one ticket)" "${r[floor_seal]}" "${r[evp_seal]}" \
  "$(ratio "${r[evp_seal]}" "${r[floor_seal]}")"
printf '  %-34s %12s %12s %8s\n' "open (one ticket)" "${r[floor_open]}" "${r[evp_open]}" \
  "$(ratio "${r[evp_open]}" "${r[floor_open]}")"
printf '  %-34s %12s %12s\n' "nginx-style seal / open (software)" "${r[sw_seal]}" "${r[sw_open]}"
printf '  %-34s %12s %12s %12s %8s %15s\n' "resumption handshake" builtin nginx-style \
  hsmstek "b/h" "builtin scoped"
for tls in tls13 tls12; do
  printf '  %-34s %12s %12s %12s %8s %15s\n' "$tls (client + server)" \
    "${r[resume_${tls}_builtin]}" "${r[resume_${tls}_nginx_style]}" \
    "${r[resume_${tls}_hsmstek]}" \
    "$(ratio "${r[resume_${tls}_builtin]}" "${r[resume_${tls}_hsmstek]}")" \
    "${r[resume_${tls}_builtin_scoped]}"
done
printf '  %-34s %12s %12s %8s\n' "full handshake (builtin tickets)" plain process-wide "p/pw"
for tls in tls13 tls12; do
  printf '  %-34s %12s %12s %8s\n' "$tls" "${r[full_${tls}]}" "${r[full_${tls}_pw]}" \
    "$(ratio "${r[full_${tls}]}" "${r[full_${tls}_pw]}")"
done
