#!/usr/bin/env bash
# Install wrk (Debian's package) for the benchmarks. Run by benchmarks/asgi_stack.py
# only -- deliberately not named ensure-*.sh, so scripts/bootstrap.sh never runs it.
# Without root or apt the benchmark falls back to its aiohttp load generator.
set -euo pipefail
command -v wrk >/dev/null 2>&1 && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 && SUDO="sudo -n" || { echo "wrk missing and not root" >&2; exit 1; }
fi
command -v apt-get >/dev/null 2>&1 || { echo "wrk missing and no apt-get" >&2; exit 1; }
$SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq wrk >/dev/null
command -v wrk >/dev/null 2>&1
