#!/usr/bin/env bash
# The fault matrix over `kvflow launch` (issue 9): each fault kind on each kind of process,
# before, during and after the transfers, on one topology. Every run must end with nothing
# stalled, no failure its fault does not explain, nothing leaked, every rank of a group having
# polled the same rounds, exit 0 and no process left behind.
#   before: at request 1, before any KV moved; during: at the middle request, with transfers in
#   flight; after: at the last request, when most requests' KV has arrived.
# Usage: fault_matrix.sh KVFLOW seed|pp
set -uo pipefail
kvflow=$1
case_=$2
source "$(dirname "$0")/launch_lib.sh"

# A frozen process is found by missed heartbeats (200 ms x 8).
export KVFLOW_HEARTBEAT_INTERVAL_MS=200 KVFLOW_HEARTBEAT_MISSES=8
case "$case_" in
  # Prefill CP8 (one dp group: a prefill fault touches every request), decode DP8.
  seed) topology=(); requests=16; p=3; d=3 ;;
  # P tp2 cp2 pp2 (8 processes), D tp2 pp2 (4): a fault in any rank touches every request.
  pp) topology=(--prefill tp=2,cp=2,pp=2 --decode tp=2,pp=2 --cp-send all); requests=12; p=5; d=2 ;;
  *) fail "unknown topology $case_" ;;
esac

runs=0
applied=0
retried=""
for when in before during after; do
  case $when in
    before) n=1 ;;
    during) n=$((requests / 2)) ;;
    after) n=$requests ;;
  esac
  # An abort storm: six requests in a row aborted by a decode rank as they start.
  first=$((n + 6 > requests ? requests - 5 : n))
  storm=""
  for i in $(seq "$first" $((first + 5))); do storm="$storm --fault abort:decode@$i"; done
  for faults in "--fault kill:prefill:$p@$n" "--fault kill:decode:$d@$n" "--fault freeze:prefill:$p@$n" \
                "--fault freeze:decode:$d@$n" "$storm" "--fault restart:bootstrap@$n" \
                "--fault kill:bootstrap@$n" "--fault freeze:bootstrap@$n"; do
    want=$(echo "$faults" | grep -o -- '--fault' | wc -l)
    # A cell that fails is run once more, and both outcomes are printed: a failure that does not
    # come back is still a defect to find (docs/reliability.md lists those seen), but it does
    # not fail CI; one that comes back does.
    for attempt in 1 2; do
      checks=()
      # shellcheck disable=SC2086 # $faults is a list of flags
      launch "${topology[@]}" --requests "$requests" $faults
      sound_run
      check "len(r['faults']) == $want" "not every fault was applied"
      (verify) && break
      [ "$attempt" -eq 2 ] && fail "the cell failed twice"
      echo "RETRY: $case_: $faults failed once (above); running it again"
      for left in $(marked); do kill -KILL "$left" 2>/dev/null; done
      retried="$retried [$faults]"
    done
    summary
    runs=$((runs + 1))
    applied=$((applied + want))
  done
done
echo "PASS: fault matrix on $case_: $runs runs, $applied faults, 0 stalls, 0 unexpected failures, 0 leaks${retried:+; failed once, passed on the retry:$retried}"
