# Shared by launch_test.sh and fault_matrix.sh (sourced; they set kvflow and case_ first):
# running `kvflow launch` from outside, checks over its JSON report, and making sure no process
# it started is left behind.
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

# What every launch must show, however it was faulted (a fault may fail every request).
sound_run() {
  check "r['stalled'] == 0" "requests stalled"
  check "r['unexpected_failures'] == 0" "a request no fault touched failed"
  check "r['mismatched_pages'] == 0" "byte mismatch"
  check "r['leaked_pages'] == 0 and r['leaked_aux_slots'] == 0 and r.get('leaked_rooms', 0) == 0" "leak"
  check "r['succeeded'] + r['failed'] == r['requests'] == len(o)" "a request is not terminal"
  check "r['bytes_verified'] == r['bytes_expected']" "not every expected byte verified"
  check "r.get('problems', []) == []" "problems reported"
  # Every rank process reported the digest of each round it polled: the same record on every
  # rank of a group for every round, across processes.
  check "r['agreement_violations'] == 0 and r['agreement_rounds_checked'] > 0" "ranks of a group polled different rounds"
}

# A launch that moved bytes, faulted or not.
clean_run() {
  sound_run
  check "r['bytes_expected'] > 0" "no request was expected to succeed"
}

all_succeeded() {
  clean_run
  check "r['succeeded'] == r['requests'] > 0 and r['failed'] == 0" "not every request succeeded"
  check "all(x['state'] == 'Success' for x in o)" "an outcome is not Success"
}

