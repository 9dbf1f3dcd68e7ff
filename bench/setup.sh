#!/usr/bin/env bash
# What the benchmarks need beyond the build and tests (kept out of the test path): Debian's
# python3-torch for the gloo all-reduce anchor of `kvflow bench control --processes`; then the
# usual set-up and build. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh python3-torch
./scripts/setup.sh
