#!/usr/bin/env bash
# Builds and runs the GPU suite (ctest -L gpu) and `kvflow bench gpu` on a machine with a GPU.
# On a machine that lacks kvflow's Debian packages (the lent GPU machines), carry them as .debs
# (../shared/tools/device-debs.sh .debs libcli11-dev nlohmann-json3-dev libssl-dev) and kvflow's
# UCX prefix (.deps/ucx, from scripts/install_ucx.sh): they are unpacked into /opt/deps.
# Usage: scripts/gpu_suite.sh [BUILD_DIR [OUT_DIR [WHAT]]]   (OUT_DIR receives the logs; WHAT is
# all, the default, or bench: `kvflow bench gpu` for a 32k-token request only)
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-gpu}
out=${2:-$build}
what=${3:-all}
mkdir -p "$out"
prefix=()
if compgen -G ".debs/*.deb" >/dev/null; then
  mkdir -p /opt/deps
  # Debian's UCX 1.13 (device-debs.sh brings it) would shadow kvflow's 1.22 on LD_LIBRARY_PATH.
  for f in .debs/*.deb; do
    case "$(basename "$f")" in libucx*|ucx-utils*) continue ;; esac
    dpkg -x "$f" /opt/deps
  done
  export LD_LIBRARY_PATH=/opt/deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export CPATH=/opt/deps/usr/include
  # CAF 0.17's headers lean on <cstdint> arriving transitively, which g++ 13 no longer does.
  prefix=(-DCMAKE_PREFIX_PATH=/opt/deps/usr "-DCMAKE_CXX_FLAGS=-include cstdint")
fi
[ -f .deps/ucx/libucx/lib/libucp.so.0 ] || scripts/install_ucx.sh || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release "${prefix[@]}" >"$out/configure.log" 2>&1 ||
  { tail -n 30 "$out/configure.log"; exit 1; }
cmake --build "$build" -j"$(nproc)" --target kvflow_gpu_tests kvflow >"$out/build.log" 2>&1 ||
  { grep -E 'error|Error' "$out/build.log" | head -n 30; exit 1; }
rc=0
if [ "$what" = bench ]; then
  "$build"/runtime/kvflow bench gpu --tokens 32768 2>&1 | tee "$out/bench_gpu.log" || rc=1
  exit $rc
fi
ctest --test-dir "$build" -L gpu --output-on-failure 2>&1 | tee "$out/gpu_tests.log" || rc=1
"$build"/runtime/kvflow bench gpu --tokens 4096 --tokens 32768 2>&1 | tee "$out/bench_gpu.log" || rc=1
exit $rc
