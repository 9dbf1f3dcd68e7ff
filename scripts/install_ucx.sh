#!/usr/bin/env bash
# Installs kvflow's own UCX: 1.22 with CUDA from PyPI's libucx-cu13 wheel (Debian's 1.13 has no
# CUDA), unpacked into a project-local prefix (default .deps/ucx; CMake finds it there), with the
# wheel's layout kept: PREFIX/libucx/{bin,include,lib,lib/ucx} and PREFIX/libucx_cu13.libs (the
# bundled cudart and libgomp its binaries reach through RPATH). Debug info and static archives
# are stripped (about 13 MB instead of 80: small enough to carry to the GPU machine).
# Idempotent: nothing is downloaded when PREFIX already holds that version.
# A site UCX (InfiniBand, GPUDirect RDMA) is used instead with cmake -DKVFLOW_UCX_ROOT=PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${1:-.deps/ucx}
version=${KVFLOW_UCX_WHEEL_VERSION:-1.22.0}
stamp=$prefix/libucx/UCX_WHEEL_VERSION.txt
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$version" ] && [ -f "$prefix/libucx/lib/libucp.so.0" ]; then
  exit 0
fi
python3 -m pip --version >/dev/null 2>&1 || { echo "install_ucx.sh: python3 has no pip"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "install_ucx.sh: UCX $version (PyPI libucx-cu13) into $prefix"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "libucx-cu13==$version"
python3 -m zipfile -e "$tmp"/libucx_cu13-*.whl "$tmp/wheel"
rm -rf "$prefix.new" && mkdir -p "$prefix.new"
mv "$tmp/wheel/libucx" "$tmp/wheel/libucx_cu13.libs" "$prefix.new/"
find "$prefix.new" \( -name '*.a' -o -name '*.la' -o -name '*.pyc' \) -delete
rm -rf "$prefix.new/libucx/share" "$prefix.new/libucx/bin/io_demo"
# The wheel holds lib.so, lib.so.0 and lib.so.0.0.0 as three copies: keep one, link the others.
while IFS= read -r f; do
  ln -sf "$(basename "$f")" "${f%.0.0}"
  ln -sf "$(basename "$f")" "${f%.0.0.0}"
done < <(find "$prefix.new" -name '*.so.0.0.0')
chmod +x "$prefix.new"/libucx/bin/*
find "$prefix.new" -type f \( -name '*.so*' -o -path '*/bin/*' \) -exec strip --strip-debug {} + 2>/dev/null || true
rm -rf "$prefix" && mv "$prefix.new" "$prefix"
[ -f "$stamp" ] || echo "$version" >"$stamp"
du -sh "$prefix"
