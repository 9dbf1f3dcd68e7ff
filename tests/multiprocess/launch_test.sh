#!/usr/bin/env bash
# `kvflow launch` from outside: the cluster as one OS process per rank (a `kvflow bootstrap`
# process and one `kvflow rank` process per rank, CAF middleman over TCP, KV bytes over UCX),
# every byte verified, faults applied to real processes (SIGKILL, SIGSTOP, a restarted bootstrap),
# and the wire-version refusal of a lone `kvflow rank`.
# Usage: launch_test.sh KVFLOW CASE
set -uo pipefail
kvflow=$1
case_=$2
tmp=$(mktemp -d)
# Every process this test starts carries this mark in its environment (the rank processes
# inherit it), so the test can tell that none is left behind, and kill any that is.
mark="launch-test-$$-$RANDOM"
pids=()

marked() {
  local f
  for f in /proc/[0-9]*/environ; do
    grep -qzx "KVFLOW_TEST_MARK=$mark" "$f" 2>/dev/null && { f=${f#/proc/}; echo "${f%/environ}"; }
  done
}
cleanup() {
  local p
  for p in "${pids[@]}" $(marked); do kill -KILL "$p" 2>/dev/null; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'echo "FAIL: $case_: interrupted"; exit 1' INT TERM

show() {
  echo "--- kvflow output (last 40 lines, without the ranks' shutdown notices) ---"
  grep -v 'exit_reason(user_shutdown)' "$tmp/out" 2>/dev/null | tail -n 40
  if [ -s "$tmp/r.json" ]; then
    echo "--- report (outcomes other than Success) ---"
    python3 - "$tmp/r.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({k: v for k, v in r.items() if k != 'outcomes'}, sort_keys=True))
for o in r.get('outcomes', []):
    if o.get('state') != 'Success':
        print(json.dumps(o, sort_keys=True))
EOF
  fi
}
fail() { echo "FAIL: $case_: $*"; show; exit 1; }
# One line per distinct failure reason, for the log of a passing run.
summary() {
  python3 - "$tmp/r.json" <<'EOF'
import collections, json, sys
r = json.load(open(sys.argv[1]))
print(f"requests {r['requests']}: succeeded {r['succeeded']}, failed {r['failed']}, "
      f"bytes verified {r['bytes_verified']}, faults {r['faults']}")
reasons = collections.Counter(o.get('reason', '') for o in r['outcomes'] if o['state'] != 'Success')
for why, n in reasons.items():
    print(f"  {n} x {why}")
EOF
}

# Runs `kvflow launch ARGS --report r.json` in the background (so a signal to this script still
# runs the trap), sets rc and secs.
launch() {
  local t0=$SECONDS
  env KVFLOW_TEST_MARK="$mark" "$kvflow" launch "$@" --report "$tmp/r.json" >"$tmp/out" 2>&1 &
  pids+=($!)
  wait $!
  rc=$?
  secs=$((SECONDS - t0))
  echo "kvflow launch $* -> exit $rc in ${secs}s"
}

# Checks on the report: each is a Python expression over r (the report) and o (its outcomes)
# and the message if it is false. verify() evaluates them all in one interpreter, then wants exit
# 0 and no process left behind.
checks=()
check() { checks+=("$1" "$2"); }
verify() {
  local got
  [ -s "$tmp/r.json" ] || fail "no report written (exit $rc)"
  got=$(python3 - "$tmp/r.json" "${checks[@]}" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
o = r['outcomes']
args = sys.argv[2:]
for expr, msg in zip(args[0::2], args[1::2]):
    try:
        ok = bool(eval(expr))
    except Exception as e:
        print(f"cannot evaluate {expr!r} on the report: {e!r}")
        sys.exit(1)
    if not ok:
        print(f"{msg} ({expr})")
        sys.exit(1)
EOF
  ) || fail "$got"
  [ $rc -eq 0 ] || fail "exit $rc, want 0"
  no_leftovers
}

# No rank process of the launch outlives it (the launcher stops them; a crashed launcher's
# children die with it).
no_leftovers() {
  local left i
  for i in $(seq 50); do
    left=$(marked)
    [ -z "$left" ] && return 0
    sleep 0.1
  done
  fail "processes left behind after the launch: $(for p in $left; do tr '\0' ' ' <"/proc/$p/cmdline"; echo; done)"
}

# What every launch must show, faulted or not.
clean_run() {
  check "r['stalled'] == 0" "requests stalled"
  check "r['unexpected_failures'] == 0" "a request no fault touched failed"
  check "r['mismatched_pages'] == 0" "byte mismatch"
  check "r['leaked_pages'] == 0 and r['leaked_aux_slots'] == 0 and r.get('leaked_rooms', 0) == 0" "leak"
  check "r['succeeded'] + r['failed'] == r['requests'] == len(o)" "a request is not terminal"
  check "r['bytes_verified'] == r['bytes_expected'] > 0" "not every expected byte verified"
  check "r.get('problems', []) == []" "problems reported"
  # Every rank process reported the digest of each round it polled: the same record on every
  # rank of a group for every round, across processes.
  check "r['agreement_violations'] == 0 and r['agreement_rounds_checked'] > 0" "ranks of a group polled different rounds"
}

all_succeeded() {
  clean_run
  check "r['succeeded'] == r['requests'] > 0 and r['failed'] == 0" "not every request succeeded"
  check "all(x['state'] == 'Success' for x in o)" "an outcome is not Success"
}

case "$case_" in
  seed)
    # The main job as processes: prefill CP8 (8 processes), decode DP8 (8), DeepSeek-V3.2 fp8.
    launch
    all_succeeded
    check "r['requests'] == 64" "default request count is not 64"
    check "r['topology']['prefill']['cp'] == 8 and r['topology']['decode']['dp'] == 8" "not CP8/DP8"
    check "r['topology']['model'] == 'dsv32' and r['topology']['dtype'] == 'fp8'" "not dsv32 fp8"
    check "r['faults'] == []" "faults applied to an unfaulted run"
    verify
    ;;
  pp)
    # Pipeline stages on both sides, CP-parallel sending: 8 prefill + 4 decode processes.
    launch --prefill tp=2,cp=2,pp=2 --decode tp=2,pp=2 --cp-send all --requests 12
    all_succeeded
    check "r['topology']['prefill']['pp'] == 2 and r['topology']['decode']['pp'] == 2" "not PP2/PP2"
    verify
    ;;
  pp_tree)
    # The same, every rank agreeing through the tree of supervisors by message (how ranks of
    # different hosts agree; ranks of one host use their group's shared memory by default).
    export KVFLOW_AGREEMENT_VIA=2
    launch --prefill tp=2,cp=2,pp=2 --decode tp=2,pp=2 --cp-send all --requests 12
    all_succeeded
    verify
    ;;
  mha)
    # Heterogeneous TP with MHA heads split across ranks: each decode rank reads 2 prefill ranks.
    launch --prefill tp=4 --decode tp=2 --model mha:8:8:128 --dtype bf16 --requests 12
    all_succeeded
    check "r['topology']['model'].startswith('mha') and r['topology']['dtype'] == 'bf16'" "not mha bf16"
    verify
    ;;
  kill_decode)
    # SIGKILL of decode rank 3 while its rooms are in flight, as request 11 (its second) starts:
    # it took part in request 3, so prefill rank 0 already talks to it and sees it go down. Its
    # rooms fail naming it; every other request succeeds.
    launch --requests 16 --fault kill:decode:3@12
    clean_run
    check "r['faults'] == ['kill:decode:3@12']" "fault not applied"
    check "r['failed'] >= 1" "no request failed"
    check "all(x['decode_dp'] == 3 and x['touched'] for x in o if x['state'] != 'Success')" \
      "a request of another decode rank failed"
    check "all(x['state'] == 'Success' for x in o if x['decode_dp'] != 3)" "an untouched request did not succeed"
    check "any('decode rank 3' in x.get('reason', '') and 'down' in x.get('reason', '') for x in o)" \
      "no failure names decode rank 3 down"
    verify
    ;;
  kill_decode_early)
    # SIGKILL of decode rank 3 as its first request starts: no prefill rank has talked to it yet.
    # Its rooms must still fail because it is down (the prefill rank watches it through the
    # registry), not by waiting out the bootstrap timeout (15 s here: deadline 60 / 4).
    launch --requests 16 --fault kill:decode:3@4
    clean_run
    check "r['faults'] == ['kill:decode:3@4']" "fault not applied"
    check "r['failed'] >= 1" "no request failed"
    check "all(x['decode_dp'] == 3 and x['touched'] for x in o if x['state'] != 'Success')" \
      "a request of another decode rank failed"
    check "all(x['state'] == 'Success' for x in o if x['decode_dp'] != 3)" "an untouched request did not succeed"
    check "all('decode rank 3' in x.get('reason', '') and 'down' in x.get('reason', '') for x in o if x['state'] != 'Success')" \
      "a failure of the dead rank's rooms does not say decode rank 3 is down"
    check "all(x['latency_ms'] < 10000 for x in o if x['state'] != 'Success')" \
      "the dead rank's rooms waited for the bootstrap timeout"
    verify
    ;;
  freeze_prefill)
    # SIGSTOP of prefill rank 3 (dp group 1, cp rank 1): the heartbeat (200 ms x 8) finds its
    # node silent, dp group 1 fails its rooms, dp group 0 (its own processes) is not affected.
    # (200 ms x 3 also cut healthy links here: eight processes starting at once on 2 cores under
    # ctest -j2 can leave a node's middleman unscheduled for 600 ms.)
    export KVFLOW_HEARTBEAT_INTERVAL_MS=200 KVFLOW_HEARTBEAT_MISSES=8
    launch --prefill tp=1,cp=2,dp=2 --decode dp=2 --requests 12 --fault freeze:prefill:3@3
    clean_run
    check "r['faults'] == ['freeze:prefill:3@3']" "fault not applied"
    check "all(x['state'] == 'Success' for x in o if x['prefill_dp'] == 0)" "a request of prefill dp 0 did not succeed"
    check "all(x['prefill_dp'] == 1 and x['touched'] for x in o if x['state'] != 'Success')" \
      "a request outside the frozen rank's dp group failed"
    # Requests started after the freeze (index >= 3) cannot succeed in the frozen group.
    check "all(x['state'] == 'Failed' and x.get('reason') for x in o if x['prefill_dp'] == 1 and x['index'] >= 3)" \
      "a request of the frozen rank's dp group started after the freeze did not fail (with a reason)"
    check "any(x['prefill_dp'] == 1 for x in o) and any(x['prefill_dp'] == 0 for x in o)" "the workload missed a dp group"
    # Found by the heartbeat, not by the waiting/bootstrap timeouts (15 s: deadline 60 / 4).
    check "all(x['latency_ms'] < 10000 for x in o if x['state'] != 'Success')" "the frozen group's rooms waited for a timeout"
    verify
    ;;
  restart_bootstrap)
    # The bootstrap process is SIGKILLed and started again on its port; the ranks register again
    # and rooms in flight do not need the registry: every request succeeds.
    launch --requests 16 --fault restart:bootstrap@6
    all_succeeded
    check "r['faults'] == ['restart:bootstrap@6']" "fault not applied"
    verify
    ;;
  wire_version)
    # A rank speaking an old wire version is refused by the registry: exit 2, one stderr line,
    # no crash, no hang.
    env KVFLOW_TEST_MARK="$mark" "$kvflow" bootstrap --listen 127.0.0.1:0 >"$tmp/bootstrap.out" 2>&1 &
    pids+=($!)
    disown $!  # killed by the trap; no job notice
    port=
    for i in $(seq 100); do
      port=$(sed -n 's/^kvflow bootstrap listening on .*:\([0-9][0-9]*\)$/\1/p' "$tmp/bootstrap.out")
      [ -n "$port" ] && break
      sleep 0.1
    done
    [ -n "$port" ] || { cp "$tmp/bootstrap.out" "$tmp/out"; fail "bootstrap printed no listening line"; }
    t0=$SECONDS
    env KVFLOW_TEST_MARK="$mark" timeout -s KILL 20 "$kvflow" rank --role decode --rank 0 \
      --bootstrap "127.0.0.1:$port" --pool-pages 8 --aux-slots 2 --wire-version 1 >"$tmp/out" 2>"$tmp/err" &
    pids+=($!)
    wait $!
    rc=$?
    echo "kvflow rank --wire-version 1 -> exit $rc in $((SECONDS - t0))s; stderr: $(cat "$tmp/err")"
    cat "$tmp/err" >>"$tmp/out"
    [ $rc -ne 137 ] || fail "kvflow rank did not exit within 20 s (killed; hung after the refusal?)"
    [ $rc -lt 128 ] || fail "kvflow rank died of signal $((rc - 128))"
    [ $rc -eq 2 ] || fail "kvflow rank exited $rc, want 2"
    [ "$(wc -l <"$tmp/err")" -eq 1 ] || fail "stderr is not one line"
    grep -qi "wire version" "$tmp/err" || fail "stderr does not mention the wire version"
    kill -0 "${pids[0]}" 2>/dev/null || fail "the bootstrap died"
    ;;
  *) fail "unknown case $case_" ;;
esac
[ -s "$tmp/r.json" ] && summary
echo "PASS: $case_"
