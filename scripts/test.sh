#!/usr/bin/env bash
# Installs what is missing, builds everything, and runs the whole test suite
# (unit, SoftHSM integration, TLS, fault injection, fuzz-corpus replay, CLI
# and nginx end-to-end tests) with ctest. Exits with ctest's status.
#
#   scripts/test.sh              # RelWithDebInfo build in ./build
#   BUILD_DIR=out scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

build=${BUILD_DIR:-build}
jobs=${JOBS:-$(nproc)}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build "$build" -j "$jobs"
# Each test runs in its own process with its own throwaway SoftHSM tokens.
ctest --test-dir "$build" -j "$jobs" --output-on-failure --timeout 600
