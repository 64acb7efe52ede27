#!/usr/bin/env bash
# A guest behind switchyard's NAT versus a guest behind libvirt's kernel NAT (bridge + iptables
# MASQUERADE), in one run, interleaved.
#
# Two topologies, each a guest, a NAT box and an "outside" host, in namespaces built side by side:
#   switchyard: guest --tap--> switchyard (release build, ns sw, packet NAT to 203.0.113.2)
#               --veth up0 (AF_PACKET)--> outside 203.0.113.1
#   kernel:     guest --veth--> virbr0 192.168.122.1 + ip_forward + libvirt's MASQUERADE rules
#               (ns kr, up0 203.0.113.2) --veth--> outside 203.0.113.1
# The outside namespaces have no route back to 192.168.122.0/24: traffic only works through NAT.
# For each of RUNS rounds it measures on both: iperf3 TCP guest->outside and outside->guest (-R),
# one stream, SECS seconds; new TCP connections per second (CONNS sequential connect, send a
# byte, read until close, close; bounded by count and by a 60 s timeout); the same with PAR
# parallel clients sharing PCONNS connections (PAR=8, PCONNS=8*CONNS by default; PAR=1 skips it);
# and the round-trip time of 50 pings 10 ms apart. Then it prints median and min-max and the
# ratio switchyard/kernel of the medians. The accept-and-close server runs as one process per
# core, so it is not what limits the parallel clients.
# All traffic stays inside namespaces this script creates; it removes them on exit.
# Usage: sudo benches/e2e/nat_vs_masquerade.sh [RUNS] [SECS] [CONNS] [PCONNS]
# Environment: ONLY=kernel or ONLY=switchyard measures one topology only (empty: both);
# ONLY=kernel neither builds nor runs switchyard. RX=read (default, as the daemon) or RX=ring picks how
# switchyard's uplink receives (<sy:uplink rx=...>). PAR: parallel clients (default 8; 1 skips the
# parallel metric). switchyard is built into and run from $CARGO_TARGET_DIR (default target),
# or SWITCHYARD=PATH runs that binary as it is (to compare builds); SY_ARGS adds options to its
# `run` (e.g. "--busy-poll-us 50"). SY_NICE=N runs it at that nice
# value (default 0; the kernel forwards in softirq context, ahead of every process, where
# switchyard's thread competes with the clients for the CPUs). RPS=MASK: see below.
# STREAMS=N: iperf3 -P N (default 1), to see NAT spread over --workers.
# NAT_XML_EXTRA: extra elements for switchyard's network XML (e.g. a <sy:nat .../> to compare).
# PROFILE=FILE: `perf record -g` of the switchyard process during its connection metrics, into
# FILE.rN for round N (read with `perf report -i FILE.r1 --no-children`); PERF_ARGS replaces
# "record -q -g" (e.g. "trace -s" for system calls, "stat -e task-clock,context-switches").
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/e2e/common.sh
. benches/e2e/common.sh
RUNS=${1:-3}
SECS=${2:-5}
CONNS=${3:-500}
PCONNS=${4:-$((8 * CONNS))}
PAR=${PAR:-8}
NAT_XML_EXTRA=${NAT_XML_EXTRA:-}
PROFILE=${PROFILE:-}
PERF_ARGS=${PERF_ARGS:-record -q -g}
ONLY=${ONLY:-}
RX=${RX:-read}
case "$RX" in ring|read) ;; *) echo "RX must be ring or read" >&2; exit 2 ;; esac
for v in "$RUNS" "$SECS" "$CONNS" "$PCONNS" "$PAR"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [RUNS] [SECS] [CONNS] [PCONNS] (positive integers; PAR too)" >&2; exit 2; }
done
case "$ONLY" in
  "") do_sy=1; do_k=1 ;;
  switchyard) do_sy=1; do_k=0 ;;
  kernel) do_sy=0; do_k=1 ;;
  *) echo "ONLY must be kernel, switchyard or empty" >&2; exit 2 ;;
esac
tests/setup.sh
if [ -n "${SWITCHYARD:-}" ]; then
  SY=$SWITCHYARD
else
  SY=${CARGO_TARGET_DIR:-target}/release/switchyard
  [ "$do_sy" = 1 ] && cargo build --release --quiet -p switchyard
fi

tag="n$$"
OUT=203.0.113.1     # the outside server, in both topologies
CPORT=5300          # the accept-and-close server
ns=()
[ "$do_sy" = 1 ] && ns+=("sg-$tag" "sw-$tag" "so-$tag")
[ "$do_k" = 1 ] && ns+=("kg-$tag" "kr-$tag" "ko-$tag")
pids=()             # background servers, killed on exit
sy_pid=""
xml=""
log=""
state=""           # switchyard's control socket and lease file, private to this run
cleanup() {
  local rc=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -n "$sy_pid" ]; then kill "$sy_pid" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  for n in "${ns[@]}"; do ip netns del "$n" 2>/dev/null || true; done
  [ -n "$xml" ] && rm -f "$xml"
  [ -n "$state" ] && rm -rf "$state"
  if [ -n "$log" ]; then
    if [ "$rc" -eq 0 ]; then rm -f "$log"; else echo "switchyard log kept: $log" >&2; fi
  fi
}
trap cleanup EXIT
die() { echo "nat_vs_masquerade: $*" >&2; exit 1; }
for n in "${ns[@]}"; do ip netns add "$n"; ip -n "$n" link set lo up; done

# waits (bounded) until something listens on TCP port $2 in namespace $1
wait_listen() {
  for _ in $(seq 50); do
    [ -n "$(ip netns exec "$1" ss -Hltn "sport = :$2")" ] && return 0
    sleep 0.1
  done
  die "no listener on port $2 in $1"
}

start_outside_servers() { # outside-ns
  ip netns exec "$1" python3 -c "$conn_server" "$OUT" "$CPORT" "$(nproc)" &
  pids+=($!)
  wait_listen "$1" "$CPORT"
}

# switchyard topology
if [ "$do_sy" = 1 ]; then
  ip -n "sw-$tag" link add up0 type veth peer name eth0 netns "so-$tag"
  ip -n "sw-$tag" addr add 203.0.113.3/24 dev up0   # the host's own address coexists
  ip -n "sw-$tag" link set up0 up
  ip -n "so-$tag" addr add "$OUT/24" dev eth0
  ip -n "so-$tag" link set eth0 up
  xml=$(mktemp /tmp/switchyard-natbench-XXXXXX.xml)
  log=$(mktemp /tmp/switchyard-natbench-XXXXXX.log)
  state=$(mktemp -d /tmp/switchyard-natbench-XXXXXX)
  cat >"$xml" <<EOF
<network xmlns:sy='urn:switchyard:network:1'>
  <name>natbench</name>
  <forward mode='nat' dev='up0'>
    <nat><address start='203.0.113.2' end='203.0.113.2'/><port start='1024' end='65535'/></nat>
  </forward>
  <ip address='192.168.122.1' netmask='255.255.255.0'/>
  <sy:uplink prefix='24' gateway='203.0.113.1' rx='$RX'/>
  $NAT_XML_EXTRA
</network>
EOF
  # shellcheck disable=SC2086 # SY_ARGS is a list of extra options
  ip netns exec "sw-$tag" nice -n "${SY_NICE:-0}" "$SY" run "$xml" --tap "eth0@sg-$tag=52:54:00:c0:00:01" \
    --control "$state/ctl.sock" --state-dir "$state" ${SY_ARGS:-} 2>"$log" &
  sy_pid=$!
  wait_switchyard "$sy_pid" "$log"
  guest_tap_up "sg-$tag"
  ip -n "sg-$tag" addr add 192.168.122.10/24 dev eth0
  ip -n "sg-$tag" route add default via 192.168.122.1
  start_outside_servers "so-$tag"
fi

# kernel topology: what libvirt's default network sets up
if [ "$do_k" = 1 ]; then
  ip -n "kr-$tag" link add virbr0 type bridge
  ip -n "kr-$tag" addr add 192.168.122.1/24 dev virbr0
  ip -n "kr-$tag" link set virbr0 up
  ip -n "kg-$tag" link add eth0 type veth peer name vnet0 netns "kr-$tag"
  ip -n "kr-$tag" link set vnet0 master virbr0 up
  ip -n "kg-$tag" addr add 192.168.122.10/24 dev eth0
  ip -n "kg-$tag" link set eth0 up
  ip -n "kg-$tag" route add default via 192.168.122.1
  ip -n "kr-$tag" link add up0 type veth peer name eth0 netns "ko-$tag"
  ip -n "kr-$tag" addr add 203.0.113.2/24 dev up0
  ip -n "kr-$tag" link set up0 up
  ip -n "ko-$tag" addr add "$OUT/24" dev eth0
  ip -n "ko-$tag" link set eth0 up
  ip netns exec "kr-$tag" sysctl -qw net.ipv4.ip_forward=1
  ipt() { ip netns exec "kr-$tag" iptables -t nat -A POSTROUTING "$@"; }
  ipt -s 192.168.122.0/24 -d 224.0.0.0/24 -j RETURN
  ipt -s 192.168.122.0/24 -d 255.255.255.255/32 -j RETURN
  ipt -s 192.168.122.0/24 ! -d 192.168.122.0/24 -p tcp -j MASQUERADE --to-ports 1024-65535
  ipt -s 192.168.122.0/24 ! -d 192.168.122.0/24 -p udp -j MASQUERADE --to-ports 1024-65535
  ipt -s 192.168.122.0/24 ! -d 192.168.122.0/24 -j MASQUERADE
  start_outside_servers "ko-$tag"
fi

STREAMS=${STREAMS:-1}
iperf_gbps() { # guest-ns outside-ns [extra client args, e.g. -R]
  ip netns exec "$2" iperf3 -s -1 -B "$OUT" >/dev/null 2>&1 &
  local srv=$! out
  wait_listen "$2" 5201
  out=$(timeout $((SECS + 30)) ip netns exec "$1" iperf3 -c "$OUT" -t "$SECS" -J "${@:3}") || {
    kill "$srv" 2>/dev/null || true
    echo "$out" | grep '"error"' >&2 || true
    return 1
  }
  wait "$srv" 2>/dev/null || true
  awk -F'[:,]' '/"sum_received"/ {r=1} r && /"bits_per_second"/ {printf "%.2f\n", $2/1e9; found=1; exit}
    END {exit !found}' <<<"$out"
}
ping_rtt_us() { # guest-ns: average round trip of 50 pings, microseconds
  ip netns exec "$1" ping -c 50 -i 0.01 -W 1 -q "$OUT" |
    awk -F'[/ ]+' '/^rtt|^round-trip/ {printf "%.0f\n", $8 * 1000; found=1} END {exit !found}'
}
# switchyard's NAT table and drops so far, one line (printed after each round: a stall in the
# connection metrics shows here as a drop reason)
sy_counters() {
  "$SY" stats --socket "$state/ctl.sock" 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
nat = s["engine"]["nat"]
drops = {}
for _, port in s["ports"]:
    for key, n in port["counters"].items():
        if key.startswith("drop_") and n:
            drops[key[5:]] = drops.get(key[5:], 0) + n
flows, created = s["nat_flows"], nat["flows_created"]
evicted, expired = nat.get("flows_evicted", "-"), nat["flows_expired"]
dropped = " ".join(f"{k}={v}" for k, v in sorted(drops.items()) if v) or "none"
print(f"nat_flows {flows}, created {created}, evicted {evicted}, expired {expired}; drops {dropped}")
' || echo "(no counters)"
}
conns_per_s() { # guest-ns [count [parallel clients]]
  timeout 60 ip netns exec "$1" python3 -c "$conn_client" "$OUT" "$CPORT" "${2:-$CONNS}" 50 "${3:-1}"
}

# RPS=MASK: receive packet steering on the guests' and the outside hosts' eth0 in both topologies,
# so their TCP receive work may run on another CPU than the one that forwarded the frame
if [ -n "${RPS:-}" ]; then
  for n in "${ns[@]}"; do
    case "$n" in sg-*|so-*|kg-*|ko-*)
      ip netns exec "$n" sh -c "echo $RPS > /sys/class/net/eth0/queues/rx-0/rps_cpus" ;;
    esac
  done
fi

# warm up ARP and NAT on both, and check that the guest reaches the outside only through NAT
topos=()
[ "$do_sy" = 1 ] && topos+=(sy)
[ "$do_k" = 1 ] && topos+=(k)
guest_of() { if [ "$1" = sy ]; then echo "sg-$tag"; else echo "kg-$tag"; fi; }
outside_of() { if [ "$1" = sy ]; then echo "so-$tag"; else echo "ko-$tag"; fi; }
for t in "${topos[@]}"; do
  ip netns exec "$(guest_of "$t")" ping -c 2 -i 0.2 -W 1 -q "$OUT" >/dev/null 2>&1 || true
  conns_per_s "$(guest_of "$t")" 3 >/dev/null || die "$t: guest cannot reach $OUT:$CPORT through NAT"
done

declare -A res=()   # res[topo,metric] = space-separated values per round
for r in $(seq "$RUNS"); do
  line="round $r:"
  for t in "${topos[@]}"; do
    g=$(guest_of "$t"); o=$(outside_of "$t")
    up=$(iperf_gbps "$g" "$o" -P "$STREAMS") || die "$t: iperf3 guest->outside failed"
    down=$(iperf_gbps "$g" "$o" -P "$STREAMS" -R) || die "$t: iperf3 outside->guest failed"
    perf_pid=""
    if [ -n "$PROFILE" ] && [ "$t" = sy ]; then
      # shellcheck disable=SC2086 # PERF_ARGS is a list of words
      timeout -s INT 120 perf $PERF_ARGS -p "$sy_pid" -o "$PROFILE.r$r" 2>/dev/null &
      perf_pid=$!
      pids+=("$perf_pid")
      sleep 0.5
    fi
    cps=$(conns_per_s "$g") || die "$t: connection test failed or timed out"
    pcps=-
    if [ "$PAR" -gt 1 ]; then
      pcps=$(conns_per_s "$g" "$PCONNS" "$PAR") || die "$t: parallel connection test failed or timed out"
      res[$t,pcps]+="$pcps "
    fi
    if [ -n "$perf_pid" ]; then kill -INT "$perf_pid" 2>/dev/null || true; wait "$perf_pid" || true; fi
    rtt=$(ping_rtt_us "$g") || die "$t: ping failed"
    res[$t,up]+="$up "; res[$t,down]+="$down "; res[$t,cps]+="$cps "; res[$t,rtt]+="$rtt "
    line+=" $t up $up Gbps, down $down Gbps, $cps conn/s, $pcps conn/s x$PAR, rtt $rtt us;"
  done
  echo "$line" >&2
  [ "$do_sy" = 1 ] && echo "  switchyard: $(sy_counters)" >&2
done

row() { # label metric
  local sm="" s="-" km="" k="-" smin smax kmin kmax
  # shellcheck disable=SC2086 # the values are space-separated numbers
  if [ "$do_sy" = 1 ]; then read -r sm smin smax < <(stats ${res[sy,$2]}); s="$sm ($smin-$smax)"; fi
  # shellcheck disable=SC2086
  if [ "$do_k" = 1 ]; then read -r km kmin kmax < <(stats ${res[k,$2]}); k="$km ($kmin-$kmax)"; fi
  awk -v l="$1" -v s="$s" -v k="$k" -v a="$sm" -v b="$km" \
    'BEGIN {ratio = (a != "" && b != "" && b > 0) ? sprintf("%.2f", a/b) : "-"; printf "| %s | %s | %s | %s |\n", l, s, k, ratio}'
}
echo
echo "$(date -u +%Y-%m-%d) $(nproc) cores, $(uname -r), iperf3 $(iperf3 --version | awk 'NR==1{print $2}'), $RUNS runs x ${SECS}s, $STREAMS TCP stream(s), $CONNS conns, $PCONNS conns over $PAR clients, interleaved, uplink rx=$RX"
echo "| path | switchyard NAT median (min-max) | kernel MASQUERADE median (min-max) | ratio |"
echo "|---|---|---|---|"
row "TCP guest->outside, Gbps" up
row "TCP outside->guest (-R), Gbps" down
row "new TCP connections/s" cps
[ "$PAR" -gt 1 ] && row "new TCP connections/s, $PAR parallel clients" pcps
row "ping round trip, us (lower is better)" rtt
