#!/usr/bin/env bash
# `kvflow launch` from outside: the cluster as one OS process per rank (a `kvflow bootstrap`
# process and one `kvflow rank` process per rank, CAF middleman over TCP, KV bytes over UCX),
# every byte verified, faults applied to real processes (SIGKILL, SIGSTOP, a restarted bootstrap),
# and the wire-version refusal of a lone `kvflow rank`.
# Usage: launch_test.sh KVFLOW CASE
set -uo pipefail
kvflow=$1
case_=$2
source "$(dirname "$0")/launch_lib.sh"

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
