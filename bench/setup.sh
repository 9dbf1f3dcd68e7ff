#!/usr/bin/env bash
# What the benchmarks need beyond the build and tests (kept out of the test path): Debian's
# python3-torch for the gloo all-reduce anchor of `kvflow bench control --processes`, and
# ucx_perftest (ucx-utils) for `kvflow bench transfer`. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
packages=(python3-torch ucx-utils)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "bench/setup.sh: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
