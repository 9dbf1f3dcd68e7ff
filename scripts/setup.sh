#!/usr/bin/env bash
# Installs what is missing, configures and builds kvflow into build/ (Release with debug info).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)"
