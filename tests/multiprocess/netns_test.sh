#!/usr/bin/env bash
# `kvflow launch` across two network namespaces joined by a veth pair: the launcher, the
# bootstrap and the prefill ranks run in namespace A, the decode ranks in namespace B
# (`--decode-exec "ip netns exec B"`). With UCX_TLS=tcp the KV bytes must cross the veth, which
# the test checks on the veth's byte counters (KVFLOW_UCX_TCP=2: UCX's tcp beyond loopback, the
# namespaces being the cluster's own network; without it, every request fails at once, saying so). Needs root and `ip`; otherwise skipped (77).
# The same launch then runs over a slow link (tc tbf), a lossy one (nftables) and, last, a delayed
# one: the veth replaced by two TAP devices joined by delay_link.py, which holds every frame
# DELAY_MS in each direction (this kernel has no netem).
# Usage: netns_test.sh KVFLOW
set -uo pipefail
kvflow=$1
skip() { echo "SKIP: $*"; exit 77; }
[ "$(id -u)" -eq 0 ] || skip "not root"
command -v ip >/dev/null || skip "no ip command"

tmp=$(mktemp -d)
A="kvflow-a-$$"
B="kvflow-b-$$"
X=$(( ($$ % 250) + 1 ))
ipa="10.211.$X.1"
ipb="10.211.$X.2"
made=()
launcher=
forwarder=
here=$(cd "$(dirname "$0")" && pwd)

cleanup() {
  local ns p
  [ -n "$launcher" ] && kill -KILL "$launcher" 2>/dev/null
  # The forwarder runs outside the namespaces; its TAP devices go with it.
  [ -n "$forwarder" ] && kill -TERM "$forwarder" 2>/dev/null && wait "$forwarder"
  for ns in "${made[@]}"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
  done
  for ns in "${made[@]}"; do
    for _ in 1 2 3 4 5; do
      [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break
      sleep 0.2
    done
    ip netns del "$ns" 2>/dev/null
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'echo "FAIL: interrupted"; exit 1' INT TERM
fail() {
  echo "FAIL: $*"
  echo "--- kvflow output (last 40 lines) ---"
  tail -n 40 "$tmp/out" 2>/dev/null
  [ -s "$tmp/dl.err" ] && { echo "--- delay_link.py ---"; tail -n 5 "$tmp/dl.err"; }
  [ -s "$tmp/r.json" ] && python3 -c "
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({k: v for k, v in r.items() if k != 'outcomes'}, sort_keys=True))
for o in r['outcomes']:
    if o['state'] != 'Success': print(json.dumps(o, sort_keys=True))" "$tmp/r.json"
  exit 1
}

ip netns add "$A" 2>"$tmp/err" || skip "ip netns add failed: $(cat "$tmp/err")"
made+=("$A")
ip netns add "$B" 2>"$tmp/err" || skip "ip netns add failed: $(cat "$tmp/err")"
made+=("$B")
# Interface names are per namespace: both ends can be short and fixed.
ip -n "$A" link add kva type veth peer name kvb netns "$B" || fail "cannot create the veth pair"
ip -n "$A" addr add "$ipa/24" dev kva || fail "cannot address kva"
ip -n "$B" addr add "$ipb/24" dev kvb || fail "cannot address kvb"
for ns in "$A" "$B"; do ip -n "$ns" link set lo up || fail "cannot bring lo up in $ns"; done
ip -n "$A" link set kva up || fail "cannot bring kva up"
ip -n "$B" link set kvb up || fail "cannot bring kvb up"
# A veth gets its carrier a moment after both ends are up; until then UCX does not list it as a
# device (it takes only running interfaces) and would find the peer unreachable.
for i in $(seq 50); do
  [ "$(ip netns exec "$A" cat /sys/class/net/kva/operstate)" = up ] &&
    [ "$(ip netns exec "$B" cat /sys/class/net/kvb/operstate)" = up ] && break
  [ "$i" -eq 50 ] && fail "the veth pair did not come up: $(ip -n "$A" link show kva) $(ip -n "$B" link show kvb)"
  sleep 0.1
done

# Byte counter of one end of the link (kva in A, kvb in B), read inside its namespace.
link=veth
counter() { ip netns exec "$1" cat "/sys/class/net/$2/statistics/$3"; }
json() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print($1)" "$tmp/r.json"; }

# Runs the launch across the namespaces (ARGS after the fixed ones) and checks its report and
# that the KV bytes crossed the link (the veth, or the TAP devices of the delayed link).
across() {
  local what=$1 a_tx0 b_rx0 a_tx1 b_rx1 t0 ms rc verified
  shift
  a_tx0=$(counter "$A" kva tx_bytes) && b_rx0=$(counter "$B" kvb rx_bytes) || fail "cannot read the $link counters"
  t0=$(date +%s%N)
  rm -f "$tmp/r.json"
  UCX_TLS=tcp KVFLOW_UCX_TCP=2 ip netns exec "$A" "$kvflow" launch --host "$ipa" --prefill-host "$ipa" --decode-host "$ipb" \
    --decode-exec "ip netns exec $B" --prefill tp=1,cp=2 --decode dp=2 --requests 8 "$@" \
    --report "$tmp/r.json" >"$tmp/out" 2>&1 &
  launcher=$!
  wait $launcher
  rc=$?
  launcher=
  ms=$((($(date +%s%N) - t0) / 1000000))
  echo "$what: kvflow launch across $A/$B ($ipa -> $ipb) $* -> exit $rc in $((ms / 1000)).$((ms % 1000 / 100))s"
  a_tx1=$(counter "$A" kva tx_bytes) && b_rx1=$(counter "$B" kvb rx_bytes) || fail "cannot read the $link counters"
  [ -s "$tmp/r.json" ] || fail "$what: no report written (exit $rc)"
  verified=$(json "r['bytes_verified']")
  echo "$what: bytes verified $verified; $link: $A kva tx +$((a_tx1 - a_tx0)), $B kvb rx +$((b_rx1 - b_rx0));" \
    "request latency p50 $(json "round(r['latency_ms']['p50'])") ms, max $(json "round(r['latency_ms']['max'])") ms"
  [ $rc -eq 0 ] || fail "$what: exit $rc, want 0"
  [ "$(json "r['succeeded'] == r['requests'] > 0")" = True ] || fail "$what: not every request succeeded"
  [ "$(json "r['bytes_verified'] == r['bytes_expected'] > 0")" = True ] || fail "$what: bytes not all verified"
  [ "$(json "r['stalled'] + r['unexpected_failures'] + r['mismatched_pages'] + r['leaked_pages'] + r['leaked_aux_slots']")" = 0 ] ||
    fail "$what: stalls, failures, mismatches or leaks"
  # The KV moves prefill (A) -> decode (B): both ends of the link counted at least that much.
  [ $((b_rx1 - b_rx0)) -ge "$verified" ] || fail "$what: $B received $((b_rx1 - b_rx0)) bytes on kvb, less than the $verified verified"
  [ $((a_tx1 - a_tx0)) -ge "$verified" ] || fail "$what: $A sent $((a_tx1 - a_tx0)) bytes on kva, less than the $verified verified"
}

# By default UCX's tcp listens on loopback only (anyone who reaches it could write into the
# process): across the namespaces the KV then has no lane, and each request fails at once with a
# reason that names KVFLOW_UCX_TCP=2. Nothing stalls, nothing leaks.
rm -f "$tmp/r.json"
UCX_TLS=tcp KVFLOW_UCX_TCP=1 ip netns exec "$A" "$kvflow" launch --host "$ipa" --prefill-host "$ipa" \
  --decode-host "$ipb" --decode-exec "ip netns exec $B" --prefill tp=1,cp=2 --decode dp=2 --requests 4 \
  --report "$tmp/r.json" >"$tmp/out" 2>&1 &
launcher=$!
wait $launcher
rc=$?
launcher=
echo "loopback only: kvflow launch across the namespaces without KVFLOW_UCX_TCP=2 -> exit $rc"
[ -s "$tmp/r.json" ] || fail "loopback only: no report written (exit $rc)"
[ $rc -ne 0 ] || fail "loopback only: exit 0, but no lane should reach the other namespace"
[ "$(json "r['failed'] == r['requests'] > 0 and r['stalled'] == 0")" = True ] ||
  fail "loopback only: want every request failed and none stalled"
[ "$(json "all('KVFLOW_UCX_TCP=2' in o['reason'] for o in r['outcomes'])")" = True ] ||
  fail "loopback only: a failed request's reason does not name KVFLOW_UCX_TCP=2"
[ "$(json "r['leaked_pages'] + r['leaked_aux_slots'] + r['leaked_rooms']")" = 0 ] || fail "loopback only: leaks"

across "fast link"
# A slow link: the KV direction shaped to 100 Mbit/s by a token bucket (this kernel has no netem
# for delay and loss). The shaper must have held packets back, and every request still succeeds.
if ip netns exec "$A" tc qdisc add dev kva root tbf rate 100mbit burst 64kb latency 200ms 2>"$tmp/err"; then
  across "slow link" --model mla:8:656 --prompt-tokens 256:2048
  overlimits=$(ip netns exec "$A" tc -s qdisc show dev kva | sed -n 's/.*overlimits \([0-9]*\).*/\1/p' | head -1)
  echo "slow link: the shaper held packets back $overlimits times"
  [ "${overlimits:-0}" -gt 0 ] || fail "slow link: the token bucket never held a packet back (not shaped?)"
else
  echo "slow link: not run (tc tbf: $(cat "$tmp/err"))"
fi
# A lossy link: each end drops 1 in 50 of the packets it sends on the veth at random (nftables'
# numgen; netem is not in this kernel). TCP retransmits them, so requests take longer, but each
# still succeeds and no node is taken for dead. The counters must show that packets were dropped.
ip netns exec "$A" tc qdisc del dev kva root 2>/dev/null
if command -v nft >/dev/null && ip netns exec "$A" nft add table inet kvflow_loss 2>"$tmp/err"; then
  for end in "$A kva" "$B kvb"; do
    set -- $end
    ip netns exec "$1" nft add table inet kvflow_loss
    ip netns exec "$1" nft add chain inet kvflow_loss out '{ type filter hook output priority 0; }' ||
      fail "cannot add an nftables chain in $1"
    ip netns exec "$1" nft add rule inet kvflow_loss out oifname "$2" numgen random mod 50 '<' 1 counter drop ||
      fail "cannot add the loss rule in $1"
  done
  across "lossy link"
  dropped=0
  for ns in "$A" "$B"; do
    n=$(ip netns exec "$ns" nft list chain inet kvflow_loss out | sed -n 's/.*counter packets \([0-9]*\).*/\1/p' | head -1)
    dropped=$((dropped + ${n:-0}))
  done
  echo "lossy link: $dropped packets dropped"
  [ "$dropped" -gt 0 ] || fail "lossy link: no packet was dropped (the rule did not match?)"
else
  echo "lossy link: not run (nft: $(cat "$tmp/err" 2>/dev/null || echo 'not installed'))"
fi
for ns in "$A" "$B"; do ip netns exec "$ns" nft delete table inet kvflow_loss 2>/dev/null; done

# A delayed link: the veth replaced by two TAP devices of the same names and addresses, one in
# each namespace, joined by delay_link.py, which forwards every frame after DELAY_MS in each
# direction (netem is not in this kernel). A TCP connect from A to B must take at least the round
# trip (2 x DELAY_MS), the forwarder must have held every frame at least DELAY_MS, and the launch
# must still succeed in full, its bytes crossing the TAP devices.
delay_ms=20
if [ ! -c /dev/net/tun ]; then
  echo "delayed link: not run (no /dev/net/tun)"
else
  ip -n "$A" link del kva || fail "cannot remove the veth pair"
  link=TAP
  python3 "$here/delay_link.py" --delay-ms $delay_ms --ns-a "$A" --name-a kva --ns-b "$B" --name-b kvb \
    --mtu 9000 --ready "$tmp/dl.ready" --stats "$tmp/dl.stats" 2>"$tmp/dl.err" &
  forwarder=$!
  while [ ! -e "$tmp/dl.ready" ] && kill -0 $forwarder 2>/dev/null; do sleep 0.05; done
  if [ ! -e "$tmp/dl.ready" ]; then
    wait $forwarder
    rc=$?
    forwarder=
    [ $rc -eq 3 ] || fail "delayed link: delay_link.py exit $rc: $(cat "$tmp/dl.err")"
    echo "delayed link: not run ($(sed -n 's/^delay_link: //p' "$tmp/dl.err" | head -1))"
  else
    ip -n "$A" addr add "$ipa/24" dev kva || fail "cannot address the TAP kva"
    ip -n "$B" addr add "$ipb/24" dev kvb || fail "cannot address the TAP kvb"
    # Three TCP connects from A to a listener in B, each timed from connect() to its return: the
    # SYN and the SYN-ACK each cross the forwarder once (the first also waits for ARP).
    rm -f "$tmp/listening"
    ip netns exec "$B" timeout 20 python3 -c "
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7411)); s.listen(8); open(sys.argv[2], 'w').close()
for _ in range(3): s.accept()[0].close()" "$ipb" "$tmp/listening" &
    listener=$!
    while [ ! -e "$tmp/listening" ] && kill -0 $listener 2>/dev/null; do sleep 0.05; done
    connects=$(ip netns exec "$A" timeout 20 python3 -c "
import socket, sys, time
ms = []
for _ in range(3):
    t = time.monotonic(); socket.create_connection((sys.argv[1], 7411), timeout=5).close()
    ms.append(str(round((time.monotonic() - t) * 1000, 1)))
print(' '.join(ms))" "$ipb") || fail "delayed link: cannot connect from $A to $B"
    wait $listener
    echo "delayed link: one-way delay $delay_ms ms; TCP connect $A -> $B took $connects ms"
    for ms in $connects; do
      python3 -c "import sys; sys.exit(not float(sys.argv[1]) >= 2 * float(sys.argv[2]))" "$ms" $delay_ms ||
        fail "delayed link: a connect took $ms ms, less than the round trip of $((2 * delay_ms)) ms (not delayed?)"
    done
    across "delayed link"
    kill -TERM $forwarder
    wait $forwarder
    rc=$?
    forwarder=
    [ $rc -eq 0 ] && [ -s "$tmp/dl.stats" ] || fail "delayed link: delay_link.py exit $rc, no counters: $(cat "$tmp/dl.err")"
    python3 -c "
import json, sys
s, d = json.load(open(sys.argv[1])), float(sys.argv[2])
ok = True
for k in ('a_to_b', 'b_to_a'):
    x = s[k]
    print('delayed link: forwarder %s: %d frames, %d bytes, %d dropped, each held %s-%s ms' %
          (k, x['frames'], x['bytes'], x['dropped'], x['min_hold_ms'], x['max_hold_ms']))
    ok = ok and x['frames'] > 0 and x['min_hold_ms'] >= d
sys.exit(not ok)" "$tmp/dl.stats" $delay_ms ||
      fail "delayed link: the forwarder forwarded nothing one way, or held a frame less than $delay_ms ms"
  fi
fi
echo "PASS: netns"
