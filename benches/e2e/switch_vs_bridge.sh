#!/usr/bin/env bash
# Guest-to-guest through switchyard versus the kernel bridge, in one run, interleaved.
#
# Two topologies, each two "guest" namespaces:
#   switchyard: guest --tap--> switchyard (release build) --tap--> guest
#   kernel:     guest --veth--> bridge (in its own namespace) --veth--> guest
# For each of RUNS rounds it measures iperf3 TCP (one stream, SECS seconds) and ping RTT
# (COUNT pings) on both, then prints median and min-max and the ratio switchyard/kernel.
# All traffic stays inside namespaces this script creates; it removes them on exit.
# Usage: sudo benches/e2e/switch_vs_bridge.sh [RUNS] [SECS]
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/e2e/common.sh
. benches/e2e/common.sh
RUNS=${1:-3}
SECS=${2:-5}
COUNT=50
tests/setup.sh
cargo build --release --quiet -p switchyard
SY=target/release/switchyard

tag="b$$"
ns=(sy1-$tag sy2-$tag k1-$tag k2-$tag kb-$tag)
sy_pid=""
cleanup() {
  [ -n "$sy_pid" ] && kill "$sy_pid" 2>/dev/null && wait "$sy_pid" 2>/dev/null
  for n in "${ns[@]}"; do ip netns del "$n" 2>/dev/null || true; done
}
trap cleanup EXIT
for n in "${ns[@]}"; do ip netns add "$n"; ip -n "$n" link set lo up; done

# switchyard topology
"$SY" run --tap "eth0@sy1-$tag=52:54:00:b0:00:01" --tap "eth0@sy2-$tag=52:54:00:b0:00:02" \
  2>/tmp/switchyard-bench-$tag.log &
sy_pid=$!
for _ in $(seq 100); do grep -q " running with " /tmp/switchyard-bench-$tag.log && break; sleep 0.1; done
ip -n "sy1-$tag" addr add 10.200.0.1/24 dev eth0
ip -n "sy2-$tag" addr add 10.200.0.2/24 dev eth0

# kernel bridge topology
ip -n "kb-$tag" link add br0 type bridge
ip -n "kb-$tag" link set br0 up
for i in 1 2; do
  ip link add "v$i-$tag" netns "k$i-$tag" type veth peer name "p$i" netns "kb-$tag"
  ip -n "k$i-$tag" link set "v$i-$tag" name eth0
  ip -n "k$i-$tag" link set eth0 up
  ip -n "kb-$tag" link set "p$i" master br0 up
done
ip -n "k1-$tag" addr add 10.200.0.1/24 dev eth0
ip -n "k2-$tag" addr add 10.200.0.2/24 dev eth0

iperf_gbps() { # client-ns server-ns
  ip netns exec "$2" iperf3 -s -1 >/dev/null 2>&1 &
  local srv=$!
  sleep 0.3
  ip netns exec "$1" iperf3 -c 10.200.0.2 -t "$SECS" -J |
    awk -F'[:,]' '/"sum_received"/ {r=1} r && /"bits_per_second"/ {printf "%.2f\n", $2/1e9; exit}'
  wait "$srv" 2>/dev/null || true
}
rtt_us() { # client-ns
  ip netns exec "$1" ping -c "$COUNT" -i 0.02 -q 10.200.0.2 |
    awk -F'/' '/^rtt/ {printf "%.0f\n", $5*1000}'
}
# warm up ARP and learning on both
ip netns exec "sy1-$tag" ping -c 2 -i 0.1 -q 10.200.0.2 >/dev/null
ip netns exec "k1-$tag" ping -c 2 -i 0.1 -q 10.200.0.2 >/dev/null

sy_tcp=(); k_tcp=(); sy_rtt=(); k_rtt=()
for r in $(seq "$RUNS"); do
  sy_tcp+=("$(iperf_gbps "sy1-$tag" "sy2-$tag")")
  k_tcp+=("$(iperf_gbps "k1-$tag" "k2-$tag")")
  sy_rtt+=("$(rtt_us "sy1-$tag")")
  k_rtt+=("$(rtt_us "k1-$tag")")
  echo "round $r: tcp switchyard ${sy_tcp[-1]} Gbps, kernel ${k_tcp[-1]} Gbps; rtt switchyard ${sy_rtt[-1]} us, kernel ${k_rtt[-1]} us" >&2
done

read -r sm smin smax < <(stats "${sy_tcp[@]}")
read -r km kmin kmax < <(stats "${k_tcp[@]}")
read -r srm srmin srmax < <(stats "${sy_rtt[@]}")
read -r krm krmin krmax < <(stats "${k_rtt[@]}")
echo
echo "$(date -u +%Y-%m-%d) $(nproc) cores, $(uname -r), iperf3 $(iperf3 --version | awk 'NR==1{print $2}'), $RUNS runs x ${SECS}s, interleaved"
echo "| path | switchyard median (min-max) | kernel bridge median (min-max) | ratio |"
echo "|---|---|---|---|"
awk -v a="$sm" -v b="$km" -v s="$smin-$smax" -v k="$kmin-$kmax" 'BEGIN {printf "| TCP 1 stream, Gbps | %s (%s) | %s (%s) | %.2f |\n", a, s, b, k, a/b}'
awk -v a="$srm" -v b="$krm" -v s="$srmin-$srmax" -v k="$krmin-$krmax" 'BEGIN {printf "| ping RTT, us | %s (%s) | %s (%s) | %.2f |\n", a, s, b, k, a/b}'
