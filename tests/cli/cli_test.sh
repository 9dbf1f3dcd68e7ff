#!/usr/bin/env bash
# The `kvflow` command's contract (architecture.md), driven from outside as other tests do:
# exit codes, the one-line usage errors, and the JSON report of the default (seed) run.
# Usage: cli_test.sh KVFLOW CASE
set -uo pipefail
kvflow=$1
case_=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

# Runs kvflow, expects exit code $1 and, for 2, exactly one stderr line containing $2.
expect_usage_error() {
  local want_field=$1
  shift
  "$kvflow" "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  [ $rc -eq 2 ] || fail "kvflow $* exited $rc, want 2"
  [ "$(wc -l <"$tmp/err")" -eq 1 ] || fail "kvflow $*: stderr is not one line: $(cat "$tmp/err")"
  grep -q -- "$want_field" "$tmp/err" || fail "kvflow $*: '$(cat "$tmp/err")' does not name $want_field"
}

json() { python3 -c "import json,sys; r=json.load(open('$tmp/r.json')); print($1)"; }

case "$case_" in
  invalid_topology)
    expect_usage_error "decode.tp" simulate --prefill tp=4 --decode tp=3
    expect_usage_error "decode.pp" simulate --prefill pp=2 --decode pp=3
    expect_usage_error "prefill.cp" simulate --prefill cp=0
    expect_usage_error "prefill.xx" simulate --prefill xx=2
    expect_usage_error "decode.cp" simulate --decode cp=2
    expect_usage_error "page-size\|page_size" simulate --page-size 0
    expect_usage_error "model" simulate --model mha:4:8
    expect_usage_error "model.kv_heads" simulate --model mha:4:6:64 --prefill tp=4
    expect_usage_error "dtype" simulate --dtype fp4
    expect_usage_error "fault" simulate --fault kill:prefill:99@1
    expect_usage_error "prompt-tokens" simulate --prompt-tokens 9:3
    expect_usage_error "transport" simulate --transport carrier-pigeon
    expect_usage_error "concurrency" simulate --concurrency 100000 --requests 100000 --prompt-tokens 1000000
    expect_usage_error "unknown\|extra\|not expected\|requires\|--bogus" simulate --bogus
    ;;
  seed_default)
    # The README's main job: no options = prefill CP8, decode DP8, DeepSeek-V3.2 fp8.
    "$kvflow" simulate --report "$tmp/r.json" || fail "default simulate exited $?"
    [ "$(json "r['topology']['prefill']['cp']")" = 8 ] || fail "prefill cp is not 8"
    [ "$(json "r['topology']['decode']['dp']")" = 8 ] || fail "decode dp is not 8"
    [ "$(json "r['topology']['model']")" = dsv32 ] || fail "model is not dsv32"
    [ "$(json "r['succeeded'] == r['requests'] > 0")" = True ] || fail "not every request succeeded"
    [ "$(json "r['bytes_verified'] == r['bytes_expected'] > 0")" = True ] || fail "bytes not all verified"
    [ "$(json "r['stalled'] + r['unexpected_failures'] + r['leaked_pages'] + r['leaked_aux_slots']")" = 0 ] ||
      fail "stalls, failures or leaks"
    [ "$(json "r['peak_rss_bytes'] < 2 * 1024**3")" = True ] || fail "peak RSS over 2 GiB"
    for k in requests succeeded failed stalled unexpected_failures bytes_expected bytes_verified \
             mismatched_pages leaked_pages leaked_aux_slots transfer latency_ms faults outcomes; do
      [ "$(json "'$k' in r")" = True ] || fail "report lacks $k"
    done
    [ "$(json "{'decode_dp','prefill_dp','room','state'} <= set(r['outcomes'][0])")" = True ] ||
      fail "outcome lacks fields"
    ;;
  corrupt_exit_1)
    "$kvflow" simulate --requests 4 --prompt-tokens 256 --fault corrupt@2 --report "$tmp/r.json" >/dev/null 2>&1
    rc=$?
    [ $rc -eq 1 ] || fail "a corrupted byte gave exit $rc, want 1"
    [ "$(json "r['mismatched_pages'] >= 1")" = True ] || fail "mismatch not reported"
    ;;
  faults_exit_0)
    "$kvflow" simulate --prefill tp=2,dp=2 --decode tp=2,dp=2 --requests 16 --prompt-tokens 64:512 \
      --fault kill:prefill:1@3 --fault kill:decode:3@6 --fault abort:decode@2 --fault drop-dst-info@9 \
      --deadline 8 --report "$tmp/r.json" >/dev/null 2>&1 || fail "faulted run exited $?"
    [ "$(json "r['stalled'] == 0 and r['unexpected_failures'] == 0 and r['succeeded'] > 0")" = True ] ||
      fail "faulted run stalled or failed untouched requests"
    [ "$(json "len(r['faults'])")" = 4 ] || fail "faults not all applied"
    ;;
  simulate_ucx)
    # The same cluster in one process, bytes through UCX (every rank's transport is one worker).
    "$kvflow" simulate --transport ucx --prefill tp=2,cp=2 --decode tp=2,dp=2 --requests 16 \
      --fault kill:decode:1@5 --report "$tmp/r.json" >/dev/null 2>&1 || fail "ucx simulate exited $?"
    [ "$(json "r['bytes_verified'] == r['bytes_expected'] > 0 and r['transfer']['bytes'] > 0")" = True ] ||
      fail "bytes not verified through ucx"
    [ "$(json "r['stalled'] + r['unexpected_failures'] + r['leaked_pages']")" = 0 ] || fail "stalls, failures or leaks"
    ;;
  process_usage)
    # Rank processes refuse what cannot run, with one line naming the field.
    expect_usage_error "transport" launch --fault freeze:decode:0@1 --transport ucx
    expect_usage_error "fault" simulate --fault freeze:decode:0@1
    expect_usage_error "fault" simulate --fault restart:bootstrap@2
    expect_usage_error "interleave\|fault" launch --fault kill:decode:9@1
    expect_usage_error "rank" rank --role decode --rank 8 --bootstrap 127.0.0.1:1 --pool-pages 4 --aux-slots 1
    expect_usage_error "role" rank --role middle --rank 0 --bootstrap 127.0.0.1:1 --pool-pages 4
    expect_usage_error "bootstrap" rank --role decode --rank 0 --bootstrap nowhere --pool-pages 4 --aux-slots 1
    expect_usage_error "listen" bootstrap --listen 127.0.0.1:99999
    ;;
  help)
    "$kvflow" --help >"$tmp/out" || fail "--help exited $?"
    grep -q KVFLOW_BOOTSTRAP_TIMEOUT_MS "$tmp/out" || fail "--help does not list the tunables"
    ;;
  *) fail "unknown case $case_" ;;
esac
echo "PASS: $case_"
