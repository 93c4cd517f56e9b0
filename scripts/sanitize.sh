#!/usr/bin/env bash
# Sanitizer runs (results, timings and the CI decision are in
# docs/TESTING.md):
#
#   asan  ASan + UBSan (-DHSMSTEK_SANITIZE=address,undefined; every report
#         fatal; LeakSanitizer on) build of everything except the nginx
#         modules and the benchmarks, then the whole ctest suite (but
#         install_and_consume, see run_asan).
#   tsan  TSan (-DHSMSTEK_SANITIZE=thread) build of the test binaries with
#         concurrency, each run whole in one process: the 8-thread tests of
#         the PKCS#11 layer (pkcs11_test), the provider (provider_test), the
#         TLS path (ticket_test, iv_pool_test, fork_test), the
#         fault-injecting module's concurrent counters (faulty_test), the
#         fault tests under load and forks mid-derivation (fault_test:
#         token removal mid-load, slow token with 8 threads, and the whole
#         fault matrix), the key store and the C API (whose stores run their
#         background maintenance thread next to the handshakes).
#   ci    ASan + UBSan of the unit and integration tests (unit_test,
#         formats_test, pkcs11_test, keystore_test) and of the TLS path
#         under faults (provider_test, iv_pool_test, ticket_test with the
#         exception barriers, fork_test, c_api_test, fault_test), each
#         binary run whole: the subset sized for CI
#         (docs/TESTING.md). scripts/test.sh runs it after the plain suite.
#
#   scripts/sanitize.sh            # asan, then tsan
#   scripts/sanitize.sh asan       # or tsan, or ci
#   ASAN_BUILD_DIR=... TSAN_BUILD_DIR=... JOBS=2 scripts/sanitize.sh
#
# SoftHSM, OpenSSL and libstdc++ are not instrumented: ASan, UBSan and TSan
# check our code (and the fault-injecting module); LeakSanitizer sees every
# allocation. Suppression files, each entry explained, are in
# scripts/sanitizers/ (empty today: both runs are clean without any).
# nginx is left out: its binary is not instrumented, so an instrumented
# dynamic module cannot be loaded into it.
#
# Prints the wall and CPU time of each step; stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

what=${1:-all}
case $what in all | asan | tsan | ci) ;; *)
  echo "usage: $0 [all|asan|tsan|ci]" >&2
  exit 2
  ;;
esac
jobs=${JOBS:-$(nproc)}
asan_dir=${ASAN_BUILD_DIR:-build-asan}
tsan_dir=${TSAN_BUILD_DIR:-build-tsan}
supp=$root/scripts/sanitizers

common=(-G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHSMSTEK_BUILD_NGINX=OFF
  -DHSMSTEK_BUILD_BENCH=OFF -DHSMSTEK_BUILD_FUZZERS=OFF)

export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1"
export LSAN_OPTIONS="suppressions=$supp/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# die_after_fork=0: the fork tests' children start their store's maintenance
# thread after a multi-threaded fork, which is what servers do (TSan's
# default kills such a child).
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:die_after_fork=0:suppressions=$supp/tsan.supp"

summary=$(mktemp)
trap 'rm -f "$summary"' EXIT

# timed <label> <command...>: runs the command and records its wall and CPU
# time (user + sys of the command and its children).
timed() {
  local label=$1 rc=0
  shift
  local TIMEFORMAT="sanitize.sh: $(printf '%-30s' "$label") %0R s wall, %0U s user, %0S s sys"
  { time "$@" 2>&3; } 3>&2 2>>"$summary" || rc=$?
  tail -n 1 "$summary"
  if [ "$rc" != 0 ]; then
    echo "sanitize.sh: $label failed (exit $rc)" | tee -a "$summary"
  fi
  return "$rc"
}

# run_whole <path>: runs a test binary whole. LeakSanitizer's stop-the-world
# tracer itself sometimes dies at exit on shared CI machines ("Tracer caught
# signal 11", google/sanitizers#1353), after every test passed and before any
# leak is reported: only that signature, with no failed test, earns one rerun.
run_whole() {
  local log rc=0
  log=$(mktemp)
  "$1" --gtest_brief=1 2>&1 | tee "$log" || rc=$?
  if [ "$rc" != 0 ] && grep -q '^Tracer caught signal' "$log" &&
    grep -q 'LeakSanitizer has encountered a fatal error' "$log" &&
    ! grep -q '^\[  FAILED  \]' "$log"; then
    echo "sanitize.sh: LeakSanitizer's tracer crashed at exit; running $1 again"
    rc=0
    "$1" --gtest_brief=1 || rc=$?
  fi
  rm -f "$log"
  return "$rc"
}

# run_binaries <dir> <label> <path...>: runs each test binary whole.
run_binaries() {
  local dir=$1 label=$2 path
  shift 2
  for path in "$@"; do
    timed "$label: $(basename "$path")" run_whole "$dir/$path"
  done
}

# build <dir> <cmake --build args...>: the build lists the tests of each
# binary by running it (gtest_discover_tests); a listing is not a test run,
# so it runs without LeakSanitizer, whose tracer can crash (see run_whole).
build() {
  local dir=$1
  shift
  ASAN_OPTIONS="$ASAN_OPTIONS:detect_leaks=0" cmake --build "$dir" "$@"
}

run_asan() {
  timed "asan: configure" cmake -S . -B "$asan_dir" "${common[@]}" \
    -DHSMSTEK_SANITIZE=address,undefined
  timed "asan: build" build "$asan_dir" -j "$jobs"
  # Not install_and_consume: it builds a consumer with plain compiler flags
  # against the installed (here instrumented) libhsmstek.so, and an
  # uninstrumented program cannot load an ASan library (the ASan runtime
  # must come first in the initial library list).
  timed "asan: ctest (whole suite)" \
    ctest --test-dir "$asan_dir" -j "$jobs" --output-on-failure --timeout 1200 \
    -E '^install_and_consume$'
}

ci_targets=(unit_test formats_test pkcs11_test keystore_test provider_test
  iv_pool_test ticket_test fork_test c_api_test fault_test)
ci_binaries=(tests/unit/unit_test tests/unit/formats/formats_test
  tests/integration/pkcs11_test tests/integration/keystore_test
  tests/provider/provider_test tests/tls/iv_pool_test tests/tls/ticket_test
  tests/tls/fork_test tests/api/c_api_test tests/faults/fault_test)

run_ci() {
  timed "ci: configure" cmake -S . -B "$asan_dir" "${common[@]}" \
    -DHSMSTEK_SANITIZE=address,undefined
  timed "ci: build" build "$asan_dir" -j "$jobs" \
    --target "${ci_targets[@]}"
  run_binaries "$asan_dir" "ci" "${ci_binaries[@]}"
}

tsan_targets=(hsmstek_faulty faulty_test pkcs11_test keystore_test
  provider_test iv_pool_test ticket_test fork_test c_api_test fault_test)
tsan_binaries=(tests/faulty/faulty_test tests/integration/pkcs11_test
  tests/integration/keystore_test tests/provider/provider_test
  tests/tls/iv_pool_test tests/tls/ticket_test tests/tls/fork_test
  tests/api/c_api_test tests/faults/fault_test)

run_tsan() {
  timed "tsan: configure" cmake -S . -B "$tsan_dir" "${common[@]}" \
    -DHSMSTEK_SANITIZE=thread
  timed "tsan: build" build "$tsan_dir" -j "$jobs" \
    --target "${tsan_targets[@]}"
  run_binaries "$tsan_dir" "tsan" "${tsan_binaries[@]}"
}

bash scripts/install-deps.sh
case $what in
  asan) run_asan ;;
  tsan) run_tsan ;;
  ci) run_ci ;;
  all)
    run_asan
    run_tsan
    ;;
esac
echo "sanitize.sh: clean"
cat "$summary"
