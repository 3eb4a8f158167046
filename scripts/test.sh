#!/usr/bin/env bash
# The whole test suite, from a fresh Debian/Ubuntu machine: installs what the tests need when it
# is missing (redis-server and redis-cli, faketime for the clock-skew test; nginx and hypercorn
# as real origins for the evasion tests; chromium for the dashboard test; test certificates are made in process with rcgen; the
# tests start their own servers on free loopback ports and never use a system service), then
# runs every test target.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v faketime >/dev/null 2>&1 || need+=(faketime)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
# A real headless browser for the dashboard test (driven over its DevTools protocol).
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  # Packages with a service (nginx) must not start it: the tests run their own on loopback.
  printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
  $sudo chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
  $sudo rm -f /usr/sbin/policy-rc.d
fi
if ! python3 -c 'import hypercorn' >/dev/null 2>&1; then
  echo "installing: hypercorn (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check hypercorn
fi

cargo test --locked --all-targets "$@"
