#!/usr/bin/env bash
# Usage: tests/fuzz/run_fuzzers.sh BUILD_DIR SECONDS
# Runs every fuzz target of BUILD_DIR (configured with -DKVFLOW_FUZZ=ON, built with
# `--target kvflow_fuzz`) for SECONDS each over its committed corpus (corpus/<target>/), after
# replaying its regression inputs (regressions/<target>/, if any), and prints per target the
# executions and the coverage libFuzzer reached. Fails on any crash, sanitizer report, leak,
# timeout (10 s per input) or out-of-memory (2 GiB resident, or one allocation over 512 MiB:
# a length prefix claiming gigabytes). New inputs go to a scratch directory, not into the
# committed corpus; what a failing target leaves (its crashing input) is kept in
# BUILD_DIR/fuzz-artifacts/<target>/.
set -euo pipefail
build=${1:?usage: run_fuzzers.sh BUILD_DIR SECONDS}
seconds=${2:?usage: run_fuzzers.sh BUILD_DIR SECONDS}
here=$(cd "$(dirname "$0")" && pwd)
bin="$build/tests/fuzz"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
flags=(-rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 -print_final_stats=1)

targets=()
for exe in "$bin"/fuzz_*; do
  # (not the fuzz_*.dir CMake leaves beside the target whose precompiled header others reuse)
  [ -f "$exe" ] && [ -x "$exe" ] && targets+=("${exe##*/fuzz_}")
done
if ((${#targets[@]} == 0)); then
  echo "run_fuzzers.sh: no fuzz targets in $bin (build with --target kvflow_fuzz)" >&2
  exit 1
fi
for dir in "$here"/corpus/*/; do
  t=$(basename "$dir")
  [ -x "$bin/fuzz_$t" ] || { echo "run_fuzzers.sh: corpus/$t has no target fuzz_$t in $bin" >&2; exit 1; }
done

failed=()
skipped=()
printf '%-20s %10s %8s %6s %7s %6s  %s\n' target executions exec/s cov ft corpus result
# KVFLOW_FUZZ_SKIP: targets not run (space-separated), each named in the output.
skip=" ${KVFLOW_FUZZ_SKIP:-} "
for t in "${targets[@]}"; do
  exe="$bin/fuzz_$t"
  if [[ "$skip" == *" $t "* ]]; then
    printf '%-20s %10s %8s %6s %7s %6s  %s\n' "$t" - - - - - "skipped (KVFLOW_FUZZ_SKIP)"
    skipped+=("$t")
    continue
  fi
  corpus="$here/corpus/$t"
  artifacts="$build/fuzz-artifacts/$t/"
  log="$scratch/$t.log"
  mkdir -p "$scratch/$t" "$artifacts"
  result=ok
  if [ ! -d "$corpus" ]; then
    result="no corpus/$t"
  elif [ -d "$here/regressions/$t" ] &&
       ! "$exe" "${flags[@]}" -runs=0 -artifact_prefix="$artifacts" "$here/regressions/$t" >"$log" 2>&1; then
    result="regression input fails"
  elif ! "$exe" "${flags[@]}" -max_total_time="$seconds" -artifact_prefix="$artifacts" \
         "$scratch/$t" "$corpus" >"$log" 2>&1; then
    result=FAILED
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  read -r cov ft corp < <(sed -n -E 's/^#[0-9]+.*cov: ([0-9]+) ft: ([0-9]+) corp: ([0-9]+).*/\1 \2 \3/p' "$log" | tail -1;
                          echo) || true
  printf '%-20s %10s %8s %6s %7s %6s  %s\n' "$t" "${execs:--}" "${rate:--}" "${cov:--}" "${ft:--}" "${corp:--}" "$result"
  if [ "$result" != ok ]; then
    failed+=("$t")
    echo "---- $t: last lines of its log (inputs kept in $artifacts) ----"
    tail -40 "$log"
    echo "----"
  fi
done
if ((${#failed[@]})); then
  echo "run_fuzzers.sh: failed: ${failed[*]}" >&2
  exit 1
fi
echo "run_fuzzers.sh: $((${#targets[@]} - ${#skipped[@]})) targets, ${seconds} s each: no crash, leak, timeout or" \
     "out-of-memory${skipped[*]:+ (not run: ${skipped[*]})}"
