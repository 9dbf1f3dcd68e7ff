#!/usr/bin/env bash
# The installed kvflow, used as a project outside would: `cmake --install` of the build tree into
# a temporary prefix; what is installed (the public headers only, libkvflow.so exporting the API
# only, the CMake package, the pkg-config file, the command); a consumer project configured with
# find_package(kvflow) and kvflow::kvflow (a C++ and a C program), whose only include directory
# must be the prefix's; the C program again with `cc` and pkg-config; both programs run (one
# request from a prefill to a decode rank, bytes checked) and print OK.
# Usage: install_test.sh CMAKE BUILD_DIR CONSUMER_SOURCE_DIR CXX [SANITIZERS]
# Exit 77 (skipped) when cmake or pkg-config is missing.
set -uo pipefail
cmake=$1
build=$2
consumer=$3
cxx=$4
sanitize=${5:-}

command -v "$cmake" >/dev/null 2>&1 || { echo "SKIP: no cmake ($cmake)"; exit 77; }
command -v pkg-config >/dev/null 2>&1 || { echo "SKIP: no pkg-config"; exit 77; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tmp=$(realpath "$tmp")
prefix=$tmp/prefix
fail() { echo "FAIL: $*"; exit 1; }

# ---- install ----------------------------------------------------------------------------------
"$cmake" --install "$build" --prefix "$prefix" >"$tmp/install.log" 2>&1 ||
  { cat "$tmp/install.log"; fail "cmake --install $build --prefix $prefix"; }

so=$(find "$prefix" -name libkvflow.so | head -n 1)
[ -n "$so" ] || fail "no libkvflow.so under $prefix: $(cd "$prefix" && find . -type f -o -type l)"
libdir=$(dirname "$so")
librel=${libdir#"$prefix"/}
echo "installed (libdir $librel):"
(cd "$prefix" && find . \( -type f -o -type l \) | sort | sed 's/^/  /')

# Exactly what is meant to be there.
while read -r f; do
  case "$f" in
    bin/kvflow | include/kvflow/kvflow.hpp | include/kvflow/kvflow.h) ;;
    "$librel"/libkvflow.so | "$librel"/libkvflow.so.*) ;;
    "$librel"/cmake/kvflow/kvflow-config.cmake | "$librel"/cmake/kvflow/kvflow-config-version.cmake) ;;
    "$librel"/cmake/kvflow/kvflow-targets.cmake | "$librel"/cmake/kvflow/kvflow-targets-*.cmake) ;;
    "$librel"/pkgconfig/kvflow.pc) ;;
    "$librel"/kvflow/ucx/libucx/lib/libuc[pstm].so.0* | "$librel"/kvflow/ucx/libucx/lib/ucx/libuc*.so.0*) ;;
    "$librel"/kvflow/ucx/libucx_cu13.libs/libcudart-*) ;;
    *) fail "unexpected installed file: $f" ;;
  esac
done < <(cd "$prefix" && find . \( -type f -o -type l \) | sed 's|^\./||')
for f in bin/kvflow include/kvflow/kvflow.hpp include/kvflow/kvflow.h "$librel"/cmake/kvflow/kvflow-config.cmake \
         "$librel"/cmake/kvflow/kvflow-config-version.cmake "$librel"/cmake/kvflow/kvflow-targets.cmake \
         "$librel"/pkgconfig/kvflow.pc; do
  [ -e "$prefix/$f" ] || fail "not installed: $f"
done
[ -x "$prefix/bin/kvflow" ] || fail "bin/kvflow is not executable"
"$prefix/bin/kvflow" --help >/dev/null 2>&1 || fail "the installed kvflow --help failed"

# The public headers include nothing of kvflow's dependencies or internals.
bad=$(grep -nE '^[[:space:]]*#[[:space:]]*include' "$prefix"/include/kvflow/* |
      grep -E 'caf/|ucp/|ucs/|uct/|ucx|spdlog|fmt/|cuda|nlohmann|CLI/|config/|actors/|transport/|runtime/')
[ -z "$bad" ] || fail "a public header includes a private one: $bad"
quoted=$(grep -nE '^[[:space:]]*#[[:space:]]*include[[:space:]]*"' "$prefix"/include/kvflow/* | grep -vE '"kvflow/')
[ -z "$quoted" ] || fail "a public header includes a project header other than kvflow/: $quoted"

# libkvflow.so: its own dependencies, no RUNPATH into the build tree, only the API exported.
if command -v readelf >/dev/null 2>&1; then
  echo "libkvflow.so dynamic section:"
  readelf -d "$so" | grep -E 'NEEDED|RPATH|RUNPATH|SONAME' | sed 's/^/  /'
  readelf -d "$so" | grep -E 'RPATH|RUNPATH' | grep -qF "$build" && fail "libkvflow.so has a RUNPATH into the build tree"
  readelf -d "$so" | grep -q 'NEEDED.*libcaf_core' || fail "libkvflow.so does not depend on libcaf_core itself"
fi
if command -v nm >/dev/null 2>&1; then
  exported=$(nm -DC --defined-only "$so")
  for f in kvflow_api_version kvflow_node_start kvflow_prefill_poll kvflow_decode_send_destinations; do
    grep -qw "$f" <<<"$exported" || fail "libkvflow.so does not export $f"
  done
  grep -q 'kvflow::node::start' <<<"$exported" || fail "libkvflow.so does not export kvflow::node::start"
  leaked=$(grep -E '^[0-9a-f]* *[A-Za-z] ((typeinfo( name)?|vtable) for )?(caf|spdlog|fmt|nlohmann|CLI|kvflow::(actors|config|transport|runtime|cuda|msg|detail|pattern))::' \
           <<<"$exported" | head -n 5)
  [ -z "$leaked" ] || fail "libkvflow.so exports internals: $leaked"
  echo "libkvflow.so exports $(wc -l <<<"$exported") symbols"
fi

# ---- the consumer through find_package --------------------------------------------------------
flags=""
ldflags=""
if [ -n "$sanitize" ]; then  # a sanitized libkvflow.so needs the sanitizer's runtime loaded first
  flags="-fsanitize=$sanitize -fno-sanitize-recover=all -fno-omit-frame-pointer"
  ldflags="-fsanitize=$sanitize"
fi
env -u CMAKE_PREFIX_PATH -u CPATH -u CPLUS_INCLUDE_PATH -u C_INCLUDE_PATH \
  "$cmake" -S "$consumer" -B "$tmp/consumer" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_CXX_COMPILER="$cxx" \
  -DCMAKE_BUILD_TYPE=Debug -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_C_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$ldflags" >"$tmp/configure.log" 2>&1 ||
  { cat "$tmp/configure.log"; fail "configuring the consumer against $prefix"; }
"$cmake" --build "$tmp/consumer" >"$tmp/build.log" 2>&1 || { cat "$tmp/build.log"; fail "building the consumer"; }

# What find_package gave: this prefix's package, kvflow::kvflow with the prefix's include
# directory only and no link dependency of its own.
value() { sed -n "s/^$1=//p" "$tmp/consumer/kvflow_target.txt"; }
canon() { realpath -m "$1"; }
sed 's/^/  /' "$tmp/consumer/kvflow_target.txt"
[ "$(canon "$(value kvflow_DIR)")" = "$(canon "$libdir/cmake/kvflow")" ] ||
  fail "find_package(kvflow) found $(value kvflow_DIR), not $libdir/cmake/kvflow"
includes=$(value INTERFACE_INCLUDE_DIRECTORIES)
if [ -z "$includes" ] || [ "$includes" != "${includes%%;*}" ]; then
  fail "kvflow::kvflow include directories: '$includes' (want one)"
fi
[ "$(canon "$includes")" = "$prefix/include" ] || fail "kvflow::kvflow include directory: $includes, want $prefix/include"
links=$(value INTERFACE_LINK_LIBRARIES)
case "$links" in "" | *-NOTFOUND) ;; *) fail "kvflow::kvflow has link dependencies of its own: $links" ;; esac
for p in INTERFACE_COMPILE_DEFINITIONS INTERFACE_COMPILE_OPTIONS INTERFACE_LINK_OPTIONS; do
  v=$(value $p)
  case "$v" in "" | *-NOTFOUND) ;; *) fail "kvflow::kvflow has $p: $v" ;; esac
done

# The consumer's compile commands hold no include directory but the prefix's.
[ -f "$tmp/consumer/compile_commands.json" ] || fail "the consumer wrote no compile_commands.json"
ndirs=0
while read -r dir; do
  [ "$(canon "$dir")" = "$prefix/include" ] || fail "the consumer compiles with the include directory $dir"
  ndirs=$((ndirs + 1))
done < <(grep -oE '(-I|-isystem )[^ "]+' "$tmp/consumer/compile_commands.json" | sed -E 's/^(-I|-isystem )//')
[ "$ndirs" -ge 2 ] || fail "the consumer's compile commands name no include directory (found $ndirs)"

# ---- the C program through pkg-config ---------------------------------------------------------
export PKG_CONFIG_PATH=$libdir/pkgconfig
trim() { sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//'; }
pc_cflags=$(pkg-config --cflags kvflow | trim) || fail "pkg-config --cflags kvflow"
pc_libs=$(pkg-config --libs kvflow | trim) || fail "pkg-config --libs kvflow"
pc_libdir=$(pkg-config --variable=libdir kvflow)
echo "pkg-config: --cflags '$pc_cflags' --libs '$pc_libs'"
[ "$(canon "${pc_cflags#-I}")" = "$prefix/include" ] || fail "pkg-config --cflags kvflow: '$pc_cflags'"
[ "$(canon "$pc_libdir")" = "$libdir" ] || fail "pkg-config libdir $pc_libdir, want $libdir"
grep -qw -- -lkvflow <<<"$pc_libs" || fail "pkg-config --libs kvflow: '$pc_libs'"
# shellcheck disable=SC2086,SC2046  # the flags are lists of words
cc -std=c99 -Wall -Wextra -Werror -pedantic $flags -o "$tmp/consumer_c" "$consumer/../../../examples/embedded_loop.c" \
  $(pkg-config --cflags --libs kvflow) -Wl,-rpath,"$pc_libdir" $ldflags >"$tmp/cc.log" 2>&1 ||
  { cat "$tmp/cc.log"; fail "cc embedded_loop.c \$(pkg-config --cflags --libs kvflow)"; }

# ---- run both ---------------------------------------------------------------------------------
run() {
  local name=$1
  shift
  timeout 60 "$@" >"$tmp/$name.out" 2>"$tmp/$name.err"
  local rc=$?
  echo "--- $name (exit $rc)"
  cat "$tmp/$name.out" "$tmp/$name.err"
  [ $rc -eq 0 ] || fail "$name exited $rc"
  [ "$(tail -n 1 "$tmp/$name.out")" = "OK" ] || fail "$name did not print OK"
}
run consumer_cpp "$tmp/consumer/consumer_cpp"
run consumer_two_process "$tmp/consumer/consumer_two_process"
run consumer_c_cmake "$tmp/consumer/consumer_c"
run consumer_c_pkgconfig "$tmp/consumer_c"
echo PASS
