#!/usr/bin/env bash
# Guest-to-guest switching: switchyard versus the kernel bridge, Open vSwitch (userspace
# datapath, userspace TSO on) and vde_switch, in one run, interleaved.
#
# Four topologies, each two "guest" namespaces with eth0 = 10.200.0.1 and 10.200.0.2:
#   switchyard: guest --tap--> switchyard (release build) --tap--> guest
#   kernel:     guest --veth--> bridge br0 (in a namespace of its own) --veth--> guest
#   ovs:        guest --tap--> ovs-vswitchd, bridge datapath_type=netdev,
#               other_config:userspace-tso-enable=true --tap--> guest
#               (ovsdb-server and ovs-vswitchd run in a namespace of their own, from a private
#               database and run dir under /tmp; their taps are created there and moved into
#               the guests)
#   vde:        guest --tap (vde_plug2tap, run inside the guest)--> vde_switch --tap--> guest
# Each of RUNS rounds runs every topology (the order rotates from round to round) for:
#   iperf3 TCP, 1 stream and 4 streams (-P 4), SECS seconds each, Gbps received;
#   iperf3 UDP, 64-byte payloads at -b 0 (as fast as the sender can), SECS seconds:
#     packets/s received and loss %;
#   ping RTT: PINGS pings at -i 0.01, median and p99 of the per-packet times, microseconds.
# Then it prints, per metric, median (min-max) over the rounds for each topology and the
# ratio switchyard/peer.
# All traffic stays inside namespaces this script creates; on exit (also on failure or ^C)
# it stops every process it started and removes its namespaces, taps and temporary files.
# It never uses the system's Open vSwitch database (/etc/openvswitch) or service.
#
# Usage: sudo [CARGO_TARGET_DIR=DIR] [SKIP_BUILD=1] [SY_ARGS="--busy-poll-us 50"] [SY2_ARGS="--workers 2"] benches/e2e/switch_vs_peers.sh [RUNS] [SECS]
#   SY2_ARGS adds a second switchyard topology with those options (an A/B of an option, run
#   interleaved with the others in the same rounds).
#   RUNS rounds (default 3), SECS seconds per iperf3 run (default 2): the defaults take
#   about two minutes. SKIP_BUILD=1 uses ${CARGO_TARGET_DIR:-target}/release/switchyard as
#   it is instead of running cargo build first.
set -Eeuo pipefail
trap 'echo "$0: line $LINENO: $BASH_COMMAND: failed" >&2' ERR
cd "$(dirname "$0")/../.."
# shellcheck source=benches/e2e/common.sh
. benches/e2e/common.sh
RUNS=${1:-3}
SECS=${2:-2}
PINGS=200
case "$RUNS$SECS" in *[!0-9]*) echo "usage: $0 [RUNS] [SECS]" >&2; exit 2 ;; esac
if [ "$RUNS" -lt 1 ] || [ "$SECS" -lt 1 ]; then echo "usage: $0 [RUNS] [SECS]" >&2; exit 2; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "run as root (network namespaces, taps)" >&2
  exit 1
fi
need_tools ip=iproute2 ping=iputils-ping iperf3=iperf3 ethtool=ethtool python3=python3 \
  ss=iproute2 timeout=coreutils ovs-vswitchd=openvswitch-switch ovsdb-server=openvswitch-common \
  vde_switch=vde2 vde_plug2tap=vde2
SY="${CARGO_TARGET_DIR:-target}/release/switchyard"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cargo build --release --quiet -p switchyard
fi
[ -x "$SY" ] || { echo "no switchyard binary at $SY" >&2; exit 1; }

load0=$(cut -d' ' -f1 /proc/loadavg) # a busy machine skews everything: shown with the results
tag="p$$"
peers=(sy kb ovs vde)
declare -A label=([sy]="switchyard" [kb]="kernel bridge" [ovs]="OVS netdev+TSO" [vde]="vde_switch")
if [ -n "${SY2_ARGS:-}" ]; then
  peers=(sy sy2 kb ovs vde)
  label[sy]="switchyard ${SY_ARGS:-}"
  label[sy2]="switchyard $SY2_ARGS"
fi
ns=()
for p in "${peers[@]}"; do ns+=("$p-g1-$tag" "$p-g2-$tag"); done
ns+=("kb-br-$tag" "ovs-sw-$tag")
dir=$(mktemp -d /tmp/switch-vs-peers.XXXXXX)
sy_pid=""
sy2_pid=""
measure_pid=""

# PIDFILE COMM: stops the process a pidfile names if it still is COMM; waits (bounded) for it.
stop_pidfile() {
  local pid i
  [ -s "$1" ] || return 0
  pid=$(cat "$1")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 0
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 50); do
    # gone, or a zombie waiting for init to reap it
    [ -e "/proc/$pid" ] && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 0
    [ "$i" -eq 30 ] && kill -KILL "$pid" 2>/dev/null
    sleep 0.1
  done
  echo "warning: $2 (pid $pid) did not stop" >&2
}
cleanup() {
  local n pids sig
  set +e
  trap - ERR
  if [ -n "$measure_pid" ]; then kill "$measure_pid" 2>/dev/null; wait "$measure_pid" 2>/dev/null; fi
  if [ -n "$sy_pid" ]; then kill "$sy_pid" 2>/dev/null; wait "$sy_pid" 2>/dev/null; fi
  if [ -n "$sy2_pid" ]; then kill "$sy2_pid" 2>/dev/null; wait "$sy2_pid" 2>/dev/null; fi
  if [ -S "$dir/ovs-vswitchd.ctl" ]; then
    timeout 5 ovs-appctl -t "$dir/ovs-vswitchd.ctl" exit --cleanup >/dev/null 2>&1
  fi
  stop_pidfile "$dir/ovs-vswitchd.pid" ovs-vswitchd
  stop_pidfile "$dir/ovsdb-server.pid" ovsdb-server
  stop_pidfile "$dir/plug1.pid" vde_plug2tap
  stop_pidfile "$dir/plug2.pid" vde_plug2tap
  stop_pidfile "$dir/vde_switch.pid" vde_switch
  # whatever still runs inside our namespaces (iperf3 or ping of an interrupted round)
  for sig in TERM KILL; do
    for n in "${ns[@]}"; do
      pids=$(ip netns pids "$n" 2>/dev/null)
      # shellcheck disable=SC2086 # a list of pids
      [ -n "$pids" ] && kill -"$sig" $pids 2>/dev/null && sleep 0.3
    done
  done
  for n in "${ns[@]}"; do ip netns del "$n" 2>/dev/null; done
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
for n in "${ns[@]}"; do ip netns add "$n"; ip -n "$n" link set lo up; done

guest_addrs() { # peer: addresses both guests' eth0 and brings it up
  local i
  for i in 1 2; do
    ip -n "$1-g$i-$tag" link set eth0 up
    ip -n "$1-g$i-$tag" addr add "10.200.0.$i/24" dev eth0
  done
}

# switchyard: its control socket and lease dir in the private dir, not /run or /var/lib
start_switchyard() { # peer options: sets started_pid
  mkdir -p "$dir/$1"
  # shellcheck disable=SC2086 # the options are a list
  "$SY" run --control "$dir/$1/switchyard.sock" --state-dir "$dir/$1" --resolv-conf /dev/null $2 \
    --tap "eth0@$1-g1-$tag=52:54:00:b1:00:01" --tap "eth0@$1-g2-$tag=52:54:00:b1:00:02" \
    2>"$dir/$1/switchyard.log" &
  started_pid=$!
  wait_switchyard "$started_pid" "$dir/$1/switchyard.log"
  ip -n "$1-g1-$tag" addr add 10.200.0.1/24 dev eth0
  ip -n "$1-g2-$tag" addr add 10.200.0.2/24 dev eth0
}
start_switchyard sy "${SY_ARGS:-}"
sy_pid=$started_pid
if [ -n "${SY2_ARGS:-}" ]; then
  start_switchyard sy2 "$SY2_ARGS"
  sy2_pid=$started_pid
fi

# kernel bridge
ip -n "kb-br-$tag" link add br0 type bridge
ip -n "kb-br-$tag" link set br0 up
for i in 1 2; do
  ip link add "kv$i-$tag" netns "kb-g$i-$tag" type veth peer name "p$i" netns "kb-br-$tag"
  ip -n "kb-g$i-$tag" link set "kv$i-$tag" name eth0
  ip -n "kb-br-$tag" link set "p$i" master br0 up
done
guest_addrs kb

# Open vSwitch, userspace datapath. Everything under $dir: database, sockets, pidfiles, logs.
# Both daemons run inside ovs-sw-$tag, so the bridge's own taps (ovs-netdev, br0) are created
# there and not in the host's namespace, and a vswitchd that enumerates kernel datapaths
# (there are none here: --disable-system) could never see the host's.
export OVS_RUNDIR="$dir" OVS_DBDIR="$dir" OVS_LOGDIR="$dir" OVS_SYSCONFDIR="$dir"
vsctl() { ovs-vsctl --db="unix:$dir/db.sock" --timeout=10 "$@"; }
ovsdb-tool create "$dir/conf.db" /usr/share/openvswitch/vswitch.ovsschema
ip netns exec "ovs-sw-$tag" ovsdb-server "$dir/conf.db" --remote="punix:$dir/db.sock" \
  --pidfile="$dir/ovsdb-server.pid" --unixctl="$dir/ovsdb-server.ctl" \
  --log-file="$dir/ovsdb-server.log" -vconsole:off --no-chdir --detach 2>"$dir/ovsdb-server.err" ||
  { cat "$dir/ovsdb-server.err" >&2; exit 1; }
vsctl --no-wait init
vsctl --no-wait set Open_vSwitch . other_config:userspace-tso-enable=true
ip netns exec "ovs-sw-$tag" ovs-vswitchd "unix:$dir/db.sock" --disable-system \
  --disable-system-route --pidfile="$dir/ovs-vswitchd.pid" --unixctl="$dir/ovs-vswitchd.ctl" \
  --log-file="$dir/ovs-vswitchd.log" -vconsole:off --no-chdir --detach 2>"$dir/ovs-vswitchd.err" ||
  { cat "$dir/ovs-vswitchd.err" >&2; exit 1; }
vsctl add-br br0 -- set bridge br0 datapath_type=netdev fail-mode=standalone
for i in 1 2; do
  vsctl add-port br0 "ot$i" -- set interface "ot$i" type=tap
  ip -n "ovs-sw-$tag" link set "ot$i" netns "ovs-g$i-$tag"
  ip -n "ovs-g$i-$tag" link set "ot$i" name eth0
done
guest_addrs ovs
ovs_tso=$(vsctl get Open_vSwitch . other_config:userspace-tso-enable | tr -d '"')

# vde_switch, with its sockets in $dir; each guest's vde_plug2tap runs inside the guest, so
# its tap is created there
vde_switch --daemon --sock "$dir/vde.ctl" --mgmt "$dir/vde.mgmt" --rcfile /dev/null \
  --pidfile "$dir/vde_switch.pid"
for i in 1 2; do
  ip netns exec "vde-g$i-$tag" vde_plug2tap --daemon --sock "$dir/vde.ctl" \
    --pidfile "$dir/plug$i.pid" eth0
done
for _ in $(seq 50); do
  ip -n vde-g1-"$tag" link show eth0 >/dev/null 2>&1 &&
    ip -n vde-g2-"$tag" link show eth0 >/dev/null 2>&1 && break
  sleep 0.1
done
guest_addrs vde

# warm up ARP and MAC learning everywhere; a topology that does not forward stops the run
for p in "${peers[@]}"; do
  ip netns exec "$p-g1-$tag" ping -n -c 3 -i 0.2 -w 5 -q 10.200.0.2 >/dev/null || {
    echo "${label[$p]}: guest 1 cannot reach guest 2" >&2
    exit 1
  }
done

# The offloads the guests' eth0 got (what the kernel may hand each switch).
offloads() { # ns
  ip netns exec "$1" ethtool -k eth0 |
    awk -F': ' '/^tcp-segmentation-offload:/ {t=$2} /^tx-checksumming:/ {c=$2}
      END {printf "tso %s, tx-csum %s", t, c}'
}

wait_listen() { # ns: until iperf3 listens (bounded)
  for _ in $(seq 50); do
    [ -n "$(ip netns exec "$1" ss -Hltn 'sport = :5201')" ] && return 0
    sleep 0.05
  done
}
# peer iperf3-client-args... : runs one iperf3 client in guest 1 against guest 2; prints JSON
iperf_json() {
  local p=$1 srv
  shift
  timeout $((SECS + 20)) ip netns exec "$p-g2-$tag" iperf3 -s -1 >/dev/null 2>&1 &
  srv=$!
  wait_listen "$p-g2-$tag"
  timeout $((SECS + 15)) ip netns exec "$p-g1-$tag" iperf3 -c 10.200.0.2 -t "$SECS" -J "$@" ||
    echo "iperf3 $* failed on ${label[$p]}" >&2
  wait "$srv" 2>/dev/null || true
}
tcp_gbps() { # peer streams
  iperf_json "$1" -P "$2" | python3 -c '
import json, sys
try:
    print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9))
except Exception:
    print("nan")'
}
tx_dropped() { # namespace: frames its eth0 dropped on the way out (a tap's queue full)
  ip -n "$1" -s -j link show eth0 | python3 -c '
import json, sys
print(json.load(sys.stdin)[0]["stats64"]["tx"]["dropped"])'
}
rcvbuf_errors() { # namespace: UDP datagrams its sockets had no room for
  # shellcheck disable=SC2016 # awk's own $i
  ip netns exec "$1" awk '/^Udp:/ { if (!seen) { for (i = 1; i <= NF; i++) k[i] = $i; seen = 1 }
    else for (i = 1; i <= NF; i++) if (k[i] == "RcvbufErrors") print $i }' /proc/net/snmp
}
udp_pps_loss() { # peer: prints "pps loss% sender-queue% receiver-socket%"
  local q0 s0 out
  q0=$(tx_dropped "$1-g1-$tag")
  s0=$(rcvbuf_errors "$1-g2-$tag")
  out=$(iperf_json "$1" -u -l 64 -b 0)
  python3 -c '
import json, sys
q, s = int(sys.argv[1]), int(sys.argv[2])
try:
    r = json.loads(sys.argv[3])["end"]["sum_received"]
    sent = max(r["packets"], 1)
    print("%.0f %.2f %.2f %.2f" % ((r["packets"] - r["lost_packets"]) / r["seconds"],
        r["lost_percent"], 100.0 * q / sent, 100.0 * s / sent))
except Exception:
    print("nan nan nan nan")' "$(($(tx_dropped "$1-g1-$tag") - q0))" \
    "$(($(rcvbuf_errors "$1-g2-$tag") - s0))" "$out"
}
rtt_us() { # peer: prints "median p99" of the per-packet RTTs, in microseconds
  local t
  mapfile -t t < <(ip netns exec "$1-g1-$tag" ping -n -c "$PINGS" -i 0.01 -w $((PINGS / 50 + 5)) \
    10.200.0.2 | awk -F'time=' 'NF > 1 {split($2, a, " "); printf "%.0f\n", a[1] * 1000}')
  if [ ${#t[@]} -eq 0 ]; then echo "nan nan"; return; fi
  [ ${#t[@]} -lt "$PINGS" ] && echo "warning: ${label[$1]}: ${#t[@]}/$PINGS pings answered" >&2
  echo "$(pctl 50 "${t[@]}") $(pctl 99 "${t[@]}")"
}
# How big the frames OVS switched were during one TCP run: above 1514 bytes on average means
# TSO super-frames went through the userspace datapath unsegmented.
ovs_frames() {
  ovs-appctl -t "$dir/ovs-vswitchd.ctl" dpctl/show 2>/dev/null |
    awk '/lookups:/ {for (i = 1; i <= NF; i++) if ($i ~ /^(hit|missed):/) {split($i, a, ":"); n += a[2]}} END {print n + 0}'
}
ovs_check() {
  local f0 f1 bytes
  f0=$(ovs_frames)
  bytes=$(iperf_json ovs -P 1 | python3 -c '
import json, sys
try:
    print(int(json.load(sys.stdin)["end"]["sum_received"]["bytes"]))
except Exception:
    print(0)')
  f1=$(ovs_frames)
  awk -v b="$bytes" -v f=$((f1 - f0)) 'BEGIN {
    if (f > 0) printf "%d frames (both directions) for %.2f GB of TCP payload, %.0f bytes/frame\n", f, b / 1e9, b / f
    else print "no frames counted" }'
}

# The rounds run in the background while the script waits for them, so that ^C or a TERM
# stops them at once (bash runs a trap only after a foreground command ends) and cleanup
# follows. Each value goes to $dir/res as "metric peer value".
measure() {
  local r p pps loss qloss sloss med p99 order line
  declare -A res=()
  add() { res[$1:$2]+="$3 "; echo "$1 $2 $3" >>"$dir/res"; } # metric peer value
  for r in $(seq "$RUNS"); do
    # rotate the order each round so no topology always runs first
    order=("${peers[@]:$(((r - 1) % ${#peers[@]}))}" "${peers[@]:0:$(((r - 1) % ${#peers[@]}))}")
    for p in "${order[@]}"; do add tcp1 "$p" "$(tcp_gbps "$p" 1)"; done
    for p in "${order[@]}"; do add tcp4 "$p" "$(tcp_gbps "$p" 4)"; done
    for p in "${order[@]}"; do
      read -r pps loss qloss sloss < <(udp_pps_loss "$p")
      add udp "$p" "$pps"
      add loss "$p" "$loss"
      add qloss "$p" "$qloss"
      add sloss "$p" "$sloss"
    done
    for p in "${order[@]}"; do
      read -r med p99 < <(rtt_us "$p")
      add rtt50 "$p" "$med"
      add rtt99 "$p" "$p99"
    done
    line="round $r:"
    for p in "${peers[@]}"; do
      line+=" | ${label[$p]}: tcp1 $(echo "${res[tcp1:$p]}" | awk '{print $NF}')"
      line+=" tcp4 $(echo "${res[tcp4:$p]}" | awk '{print $NF}')"
      line+=" udp $(echo "${res[udp:$p]}" | awk '{print $NF}') pps"
      line+=" ($(echo "${res[loss:$p]}" | awk '{print $NF}')% lost)"
      line+=" rtt $(echo "${res[rtt50:$p]}" | awk '{print $NF}')/$(echo "${res[rtt99:$p]}" | awk '{print $NF}') us"
    done
    echo "$line" >&2
  done
  ovs_check >"$dir/ovs_seen"
}
: >"$dir/res"
measure &
measure_pid=$!
wait "$measure_pid"
measure_pid=""
declare -A res=()
while read -r m p v; do res[$m:$p]+="$v "; done <"$dir/res"
ovs_seen=$(cat "$dir/ovs_seen")
case "$ovs_seen" in
  *bytes/frame*) [ "$(echo "$ovs_seen" | awk '{print ($(NF-1) > 1514)}')" = 1 ] ||
    label[ovs]="OVS netdev (TSO not effective)" ;;
esac

echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC') $(nproc) cores, $(uname -r), iperf3 $(iperf3 --version | awk 'NR==1{print $2}')," \
  "OVS $(ovs-vswitchd --version | awk 'NR==1{print $NF}'), vde2 $(dpkg-query -W -f '${Version}' vde2 2>/dev/null)," \
  "switchyard $(git describe --always --dirty 2>/dev/null || echo '?'); $RUNS rounds x ${SECS}s," \
  "interleaved; load average before start $load0"
for p in "${peers[@]}"; do
  echo "guest eth0 offloads, ${label[$p]}: $(offloads "$p-g1-$tag")"
done
echo "OVS other_config:userspace-tso-enable=$ovs_tso; one extra TCP run through OVS: $ovs_seen"
echo
hdr="| metric |"
sep="|---|"
for p in "${peers[@]}"; do hdr+=" ${label[$p]} median (min-max) |"; sep+="---|"; done
for p in "${peers[@]:1}"; do hdr+=" switchyard/${label[$p]} |"; sep+="---|"; done
echo "$hdr"
echo "$sep"
row() { # metric title printf-format
  local p m lo hi out="| $2 |" ms=()
  for p in "${peers[@]}"; do
    # shellcheck disable=SC2086 # the values are space-separated numbers
    read -r m lo hi < <(stats ${res[$1:$p]})
    ms+=("$m")
    # shellcheck disable=SC2059 # the format is the caller's
    out+=" $(printf "$3 ($3-$3)" "$m" "$lo" "$hi") |"
  done
  for m in "${ms[@]:1}"; do
    out+=" $(awk -v a="${ms[0]}" -v b="$m" 'BEGIN {if (b + 0 == 0) print "-"; else printf "%.2f", a / b}') |"
  done
  echo "$out"
}
row tcp1 "TCP 1 stream, Gbps" %.2f
row tcp4 "TCP 4 streams, Gbps" %.2f
row udp "UDP 64 B, received pps" %.0f
row loss "UDP 64 B, loss %" %.1f
row qloss "UDP 64 B, of the sent: dropped at the sender's eth0 queue, %" %.1f
row sloss "UDP 64 B, of the sent: dropped at the receiving socket, %" %.1f
row rtt50 "ping RTT median, us" %.0f
row rtt99 "ping RTT p99, us" %.0f
echo
echo "ratio = switchyard/peer: above 1 is better for switchyard in Gbps and pps, below 1 in loss and RTT."
echo "UDP is sent at -b 0 (as fast as one iperf3 sender can): loss is what the path and the receiving socket dropped."
echo "Where: the sender's eth0 queue (ip -s link tx dropped: a tap whose reader fell behind) and the receiver's UdpRcvbufErrors."
