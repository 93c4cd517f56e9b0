#!/usr/bin/env bash
# Installs what is missing, builds everything, and runs the whole test suite
# (unit, SoftHSM integration, TLS, fault injection, fuzz-corpus replay, CLI
# and nginx end-to-end tests) with ctest, then the unit, integration, TLS and
# fault-matrix tests again under ASan + UBSan (scripts/sanitize.sh ci; sized
# for CI in docs/TESTING.md), then a 10-second libFuzzer run of every fuzz
# target (clang, ASan + UBSan; scripts/fuzz.sh). Exits non-zero at the first
# failure.
#
#   scripts/test.sh              # RelWithDebInfo build in ./build
#   BUILD_DIR=out scripts/test.sh
#   HSMSTEK_SKIP_SANITIZERS=1 scripts/test.sh   # local runs: plain suite only
#                                               # (no ASan build, no fuzzing)
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

build=${BUILD_DIR:-build}
jobs=${JOBS:-$(nproc)}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build "$build" -j "$jobs"
# Each test runs in its own process with its own throwaway SoftHSM tokens.
ctest --test-dir "$build" -j "$jobs" --output-on-failure --timeout 600

# ASan + UBSan of the unit, integration, TLS and fault tests, in a separate
# build directory (docs/TESTING.md has the timings behind this choice).
if [ "${HSMSTEK_SKIP_SANITIZERS:-0}" != 1 ]; then
  ASAN_BUILD_DIR="$build-asan" JOBS="$jobs" bash scripts/sanitize.sh ci
  # Fuzz smoke: every target (tickets through a real server SSL, URIs,
  # legacy key files, bundles, policies, durations) mutates its seed corpus
  # for 10 s; any crash, leak or sanitizer report fails the run.
  BUILD_DIR="$build-fuzz" JOBS="$jobs" bash scripts/fuzz.sh 10
fi
