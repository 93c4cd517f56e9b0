#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) and runs each one
# for a fixed time, then prints executions, new corpus units and crashes per
# target. Exits non-zero if any target crashed, leaked, timed out or failed
# to run. Long-running counterpart of the corpus replay that ctest runs
# (fuzz_corpus_replay).
#
#   scripts/fuzz.sh                 # every target, 60 s each
#   scripts/fuzz.sh 600             # every target, 10 min each
#   scripts/fuzz.sh 60 uri policy   # only these targets
#
# Targets are the directories of tests/fuzz/corpus (fuzz_<name> binaries).
# Environment:
#   BUILD_DIR   clang build directory (default: build-fuzz)
#   FUZZ_OUT    where scratch corpora, crash files and logs go
#               (default: $BUILD_DIR/fuzz-out); corpora grow across runs
#   FUZZ_ARGS   extra libFuzzer flags, e.g. "-jobs=2 -workers=2"
#   JOBS        build parallelism (default: nproc)
#
# A crash leaves its input in $FUZZ_OUT/<target>/artifacts/; reproduce it
# with $BUILD_DIR/tests/fuzz/fuzz_<target> <file>, fix it, then add the file
# to tests/fuzz/corpus/<target>/ so the replay test keeps it fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

seconds=${1:-60}
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [seconds-per-target] [target...]" >&2
  exit 2
fi
[ $# -gt 0 ] && shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for d in tests/fuzz/corpus/*/; do targets+=("$(basename "$d")"); done
fi

bash scripts/install-deps.sh

build=${BUILD_DIR:-build-fuzz}
case "$build" in /*) ;; *) build="$root/$build" ;; esac
out=${FUZZ_OUT:-$build/fuzz-out}
jobs=${JOBS:-$(nproc)}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DHSMSTEK_BUILD_FUZZERS=ON -DHSMSTEK_BUILD_NGINX=OFF \
  -DHSMSTEK_BUILD_BENCH=OFF >/dev/null
build_targets=()
for t in "${targets[@]}"; do build_targets+=("fuzz_$t"); done
cmake --build "$build" -j "$jobs" --target "${build_targets[@]}"

# Reads "stat::<name>: <value>" from a libFuzzer log (-print_final_stats).
fuzz_stat() { sed -n "s/^stat::$1: *//p" "$2" | tail -1; }

failed=0
rows=()
for t in "${targets[@]}"; do
  bin="$build/tests/fuzz/fuzz_$t"
  seeds="$root/tests/fuzz/corpus/$t"
  dir="$out/$t"
  mkdir -p "$dir/corpus" "$dir/artifacts" "$dir/tmp"
  log="$dir/fuzz.log"
  before=$(find "$dir/artifacts" -type f | wc -l)
  echo "fuzz: $t for ${seconds}s (log: $log)"
  rc=0
  # The scratch corpus comes first: libFuzzer writes new inputs (and the
  # ticket targets their live seeds) there, never into the repo's seeds.
  # TMPDIR keeps each run's SoftHSM token directory out of /tmp.
  # shellcheck disable=SC2086
  TMPDIR="$dir/tmp" "$bin" -max_total_time="$seconds" -timeout=25 \
    -print_final_stats=1 -artifact_prefix="$dir/artifacts/" \
    ${FUZZ_ARGS:-} "$dir/corpus" "$seeds" >"$log" 2>&1 || rc=$?
  rm -rf "$dir/tmp"
  after=$(find "$dir/artifacts" -type f | wc -l)
  crashes=$((after - before))
  execs=$(fuzz_stat number_of_executed_units "$log")
  rate=$(fuzz_stat average_exec_per_sec "$log")
  units=$(fuzz_stat new_units_added "$log")
  rss=$(fuzz_stat peak_rss_mb "$log")
  status=ok
  if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    status="FAILED (exit $rc)"
    failed=1
    grep -m 5 -E "ERROR|invariant failed|SUMMARY" "$log" >&2 || true
  fi
  rows+=("$(printf '%-14s %6ss %12s %8s %8s %7s %7s  %s' "$t" "$seconds" \
    "${execs:-?}" "${rate:-?}" "${units:-?}" "${rss:-?}" "$crashes" "$status")")
done

echo
printf '%-14s %7s %12s %8s %8s %7s %7s  %s\n' target time executions \
  exec/s new-units rss-mb crashes status
printf '%s\n' "${rows[@]}"
if [ "$failed" -ne 0 ]; then
  echo "fuzz: FAILED; crash inputs are in $out/<target>/artifacts/" >&2
  exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran ${seconds}s each without a crash"
