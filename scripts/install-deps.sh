#!/usr/bin/env bash
# Installs every Debian bookworm package that the build, tests, demo and
# benchmarks need. Idempotent: packages already present are skipped, and
# nothing is fetched when everything is there.
set -euo pipefail

packages=(
  # build
  build-essential cmake ninja-build pkg-config git
  # crypto and PKCS#11
  libssl-dev openssl softhsm2 libsofthsm2-dev p11-kit libp11-kit-dev
  libp11-dev libengine-pkcs11-openssl opensc
  # libraries we build against
  libgtest-dev libgmock-dev libbenchmark-dev libcli11-dev nlohmann-json3-dev
  # fuzzing and sanitizers (clang's libFuzzer and runtimes)
  clang libclang-rt-14-dev
  # real TLS clients and the server for e2e tests and the demo
  gnutls-bin curl nginx nginx-dev libnginx-mod-stream
  # process helpers used by scripts
  procps psmisc python3
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
    missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages: ${missing[*]}" >&2
  echo "install-deps: run as root (or install them yourself)" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# nginx must not start a system instance on port 80 during the install.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get install -y -q --no-install-recommends "${missing[@]}"
