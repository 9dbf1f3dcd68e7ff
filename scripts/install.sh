#!/usr/bin/env bash
# Installs every Debian package kvflow's build and tests need, then kvflow's own UCX (1.22 with
# CUDA, from PyPI: scripts/install_ucx.sh). Idempotent: installs only what is missing, and runs
# apt-get update only then. CUDA is optional (found at /usr/local/cuda).
# Extra packages (the benchmarks' own) may be named as arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
# python3-pip fetches UCX's wheel (install_ucx.sh); clang-14 with its runtimes builds the libFuzzer
# targets (tests/fuzz, KVFLOW_FUZZ=ON); nftables drops packets at random on the netns test's lossy
# link (this kernel has no netem).
packages=(g++ make cmake python3 python3-pip binutils libcaf-dev libspdlog-dev libfmt-dev
          doctest-dev libcli11-dev nlohmann-json3-dev iproute2 nftables pkg-config libssl-dev openssl
          clang-14 libclang-rt-14-dev libfuzzer-14-dev "$@")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "install.sh: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
scripts/install_ucx.sh
