#!/usr/bin/env bash
# DHCP: switchyard's server (inside the engine, on the gateway address) versus dnsmasq as
# libvirt runs it, in one run, interleaved, in three parts (PARTS, below):
#   transactions  DORA transactions per second from a python3 generator (below);
#   first         a fresh client's first lease: DISCOVER to ACK, timestamped by the generator,
#                 and busybox udhcpc from start to bound (a new MAC each time);
#   perfdhcp      perfdhcp (Debian package kea-admin, installed if missing) at offered rates
#                 (PERF_RATES, default 5000 and 10000 exchanges/s, PERF_SECS seconds each):
#                 exchanges/s and drops, against a freshly started server each time.
#
# Two topologies with the same addressing (10.200.0.0/16, server 10.200.0.1, pool
# 10.200.1.0-10.200.255.250, lease time 1 h), each a guest namespace with an eth0 that has no
# address:
#   switchyard: guest eth0 --tap--> switchyard run (release build, ns sw, <dhcp><range>)
#   dnsmasq:    guest eth0 --veth--> veth0 10.200.0.1/16 (ns dm), dnsmasq bound to veth0
#   dnsmasq-ping: the same in a third pair of namespaces (ns pm), without --no-ping: libvirt's
#               default, which pings an address before its first offer (parts first and
#               perfdhcp only: its 3 s wait would time out the transactions).
# (libvirt puts a bridge, virbr0, between the two: left out here, one kernel hop less.)
#
# The load generator is a python3 program on an AF_PACKET socket on the guest's eth0 (so it
# needs no address and no DHCP client state). One transaction: a fresh random locally
# administered chaddr (02:xx:..), DISCOVER with the broadcast flag (replies are broadcast: no
# ARP, no FDB state), the OFFER with that xid, REQUEST (50 = the offered address, 54 = the
# server id), the ACK; then a DHCPRELEASE unicast to the server, not waited for (it has no
# answer). Releasing keeps the lease table at CONCURRENCY leases or fewer, so every round
# sees the same server state and the pool never runs out, whatever TRANSACTIONS and RUNS.
# It costs both servers a second lease-file write per transaction. RELEASE=0 keeps the
# leases instead: the tables and lease files then grow through the run (both servers rewrite
# the whole file on each change, so later rounds are slower; dnsmasq slows down most), and
# RUNS x TRANSACTIONS x levels must fit the pool. A NAK restarts the transaction with a new
# DISCOVER, as a client does (RFC 2131 4.4.1; the restarts are counted and printed: dnsmasq
# does not hold an address it offers, so two transactions in flight can be offered the same
# one and the later REQUEST is NAKed); a step unanswered within 1 s, or a fourth NAK, counts
# as a failed transaction.
# With CONCURRENCY n, n transactions are kept in flight by the one process (non-blocking
# socket and select). Each measurement stops starting transactions after 60 s (a warning
# says so). The rate is completed transactions per second of wall time.
#
# Both servers write their lease file and fsync it before the ACK leaves (checked with
# strace): switchyard in a writer thread, a whole new file each time (write, fsync, rename,
# fsync of the directory), leases that change during a write committed together by the next
# one; dnsmasq in its single loop, the file truncated and rewritten in place, one fsync per
# lease-changing message. Both lease files are in one temporary directory (same filesystem).
# In the transactions part dnsmasq runs with --no-ping: by default (libvirt does not change
# it) dnsmasq pings an address before it first offers it and waits up to 3 s for an answer,
# deaf to other DHCP messages meanwhile (one OFFER every 3 s; after 6 pings in 30 s it stops
# pinging until the load passes), which would time out every transaction. switchyard checks
# too: an ARP probe of an address new to its client and a 30 ms wait before the OFFER (the
# addresses a released client had are new to the next one), so a sequential transaction
# costs it those 30 ms and 16 in flight about 16 per 30 ms. Both with --quiet-dhcp
# (libvirt's logs every message). switchyard's DHCP counters are saved with the logs when a
# transaction fails.
#
# The first lease: FIRST_RUNS rounds (default 7), each one fresh client per side: the
# generator's DORA (its time from sending the DISCOVER to receiving the ACK), then busybox
# udhcpc on the guest's eth0 given a new random MAC first (`udhcpc -f -q -n`, from its start
# to its exit once bound, a script that does nothing). With dnsmasq-ping measured, rounds
# start 16 s apart, so its pings stay under its 6 per 30 s (beyond, it would not ping).
#
# perfdhcp: PERF_RUNS rounds (default 3); in each, for each rate, each side's server is
# started afresh (no leases: perfdhcp's clients are all new, 100 M random MACs, and the
# leases are kept, so each measurement starts from the same state), perfdhcp runs in the
# guest namespace with eth0 10.200.0.2/16 (it acts as a relay: giaddr, replies unicast to its
# port 67) for PERF_SECS seconds at the rate, and waits 1 s more for late replies. Reported:
# exchanges/s = ACKs received / PERF_SECS (perfdhcp's own "Rate" divides by the wait too),
# drops = DISCOVERs sent without an ACK received, and how many of those the guest's kernel
# dropped because perfdhcp's socket buffer was full (the load generator, not the server,
# falling behind: on a small machine perfdhcp, the server and its lease writer share the
# cores). RATE x PERF_SECS must fit the pool.
#
# For each of RUNS rounds, for each concurrency level, it measures both sides, then prints
# median and min-max and the ratio switchyard/dnsmasq of the medians (higher is better).
# All traffic stays inside namespaces this script creates; it removes them on exit, and
# exits 1 (keeping the logs) when any transaction failed.
# Usage: sudo benches/e2e/dhcp_vs_dnsmasq.sh [RUNS] [TRANSACTIONS] [CONCURRENCY]
#   RUNS rounds (default 5) of TRANSACTIONS transactions (default 1000) per side and level;
#   CONCURRENCY: transactions in flight, a comma-separated list of levels (default 1,16:
#   sequential DORA, then 16 at once).
# Environment: ONLY=switchyard or ONLY=dnsmasq measures one side only (empty: both; dnsmasq
# is both of its kinds); ONLY=dnsmasq neither builds nor runs switchyard. SWITCHYARD=PATH runs
# that binary instead of building target/release/switchyard (e.g. while the tree does not
# build). RELEASE=0: above. PARTS: a comma-separated list of transactions, first, perfdhcp
# (default all three). FIRST_RUNS, PERF_RUNS, PERF_RATES (comma-separated), PERF_SECS: above.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/e2e/common.sh
. benches/e2e/common.sh
RUNS=${1:-5}
TRANSACTIONS=${2:-1000}
CONCURRENCY=${3:-1,16}
ONLY=${ONLY:-}
RELEASE=${RELEASE:-1}
PARTS=${PARTS:-transactions,first,perfdhcp}
FIRST_RUNS=${FIRST_RUNS:-7}
PERF_RUNS=${PERF_RUNS:-3}
PERF_RATES=${PERF_RATES:-5000,10000}
PERF_SECS=${PERF_SECS:-5}
BUDGET=60           # seconds per measurement, at most
usage="usage: $0 [RUNS] [TRANSACTIONS] [CONCURRENCY] (positive integers; CONCURRENCY a comma-separated list, each at most 1024)"
for v in "$RUNS" "$TRANSACTIONS"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "$usage" >&2; exit 2; }
done
IFS=, read -r -a levels <<<"$CONCURRENCY"
[ ${#levels[@]} -gt 0 ] || { echo "$usage" >&2; exit 2; }
for c in "${levels[@]}"; do
  if ! [[ $c =~ ^[1-9][0-9]*$ ]] || [ "$c" -gt 1024 ]; then echo "$usage" >&2; exit 2; fi
done
case "$RELEASE" in 0|1) ;; *) echo "RELEASE must be 0 or 1" >&2; exit 2 ;; esac
part() { [[ ",$PARTS," == *",$1,"* ]]; }
IFS=, read -r -a parts <<<"$PARTS"
for p in "${parts[@]}"; do
  case "$p" in transactions|first|perfdhcp) ;; *) echo "PARTS: unknown part '$p'" >&2; exit 2 ;; esac
done
IFS=, read -r -a rates <<<"$PERF_RATES"
for v in "$FIRST_RUNS" "$PERF_RUNS" "$PERF_SECS" "${rates[@]}"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "FIRST_RUNS, PERF_RUNS, PERF_SECS and PERF_RATES must be positive integers" >&2; exit 2; }
done
POOL_SIZE=65275     # 10.200.1.0-10.200.255.250, below
for r in "${rates[@]}"; do
  if [ $((r * PERF_SECS)) -gt "$POOL_SIZE" ]; then
    echo "perfdhcp: $r/s x $PERF_SECS s exceeds the pool of $POOL_SIZE" >&2
    exit 2
  fi
done
WARMUP=20           # transactions per side before the rounds
if [ "$RELEASE" = 0 ] && [ $((WARMUP + RUNS * TRANSACTIONS * ${#levels[@]})) -gt "$POOL_SIZE" ]; then
  echo "RELEASE=0: $RUNS x $TRANSACTIONS x ${#levels[@]} levels (+$WARMUP) leases exceed the pool of $POOL_SIZE" >&2
  exit 2
fi
case "$ONLY" in
  "") do_sy=1; do_dm=1 ;;
  switchyard) do_sy=1; do_dm=0 ;;
  dnsmasq) do_sy=0; do_dm=1 ;;
  *) echo "ONLY must be switchyard, dnsmasq or empty" >&2; exit 2 ;;
esac
tests/setup.sh
if part perfdhcp; then need_tools perfdhcp=kea-admin; fi
if [ "$do_dm" = 1 ] && ! command -v dnsmasq >/dev/null 2>&1; then
  echo "dhcp_vs_dnsmasq: installing dnsmasq-base" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends dnsmasq-base >/dev/null 2>&1 || {
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends dnsmasq-base >/dev/null
  }
fi
SY=${SWITCHYARD:-target/release/switchyard}
if [ "$do_sy" = 1 ]; then
  if [ -z "${SWITCHYARD:-}" ]; then cargo build --release --quiet -p switchyard; fi
  [ -x "$SY" ] || { echo "dhcp_vs_dnsmasq: $SY is not an executable" >&2; exit 2; }
fi

tag="d$$"
SERVER=10.200.0.1
POOL_START=10.200.1.0
POOL_END=10.200.255.250
# dnsmasq-ping (side dp) only where it can finish: the first lease and perfdhcp
do_dp=0
if [ "$do_dm" = 1 ] && { part first || part perfdhcp; }; then do_dp=1; fi
ns=()
[ "$do_sy" = 1 ] && ns+=("sg-$tag" "sw-$tag")
[ "$do_dm" = 1 ] && ns+=("dg-$tag" "dm-$tag")
[ "$do_dp" = 1 ] && ns+=("pg-$tag" "pm-$tag")
declare -A pid=()   # pid[side]: the running server
tmp=""
cleanup() {
  local rc=$? p
  for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for n in "${ns[@]}"; do ip netns del "$n" 2>/dev/null || true; done
  if [ -n "$tmp" ]; then
    if [ "$rc" -eq 0 ]; then rm -rf "$tmp"; else echo "dhcp_vs_dnsmasq: logs kept in $tmp" >&2; fi
  fi
}
trap cleanup EXIT
die() { echo "dhcp_vs_dnsmasq: $*" >&2; exit 1; }
tmp=$(mktemp -d /tmp/switchyard-dhcpbench-XXXXXX)
for n in "${ns[@]}"; do ip netns add "$n"; ip -n "$n" link set lo up; done

# N DHCP transactions (DORA, then RELEASE when RELEASE is 1) on interface IF, CONC in
# flight, stopping early after BUDGET seconds, a step unanswered after TIMEOUT seconds
# (default 1) failing; prints "transactions/s failed NAKs median-ms", the last the median time
# from a transaction's first DISCOVER to its ACK
dhcp_client='
import os, select, socket, struct, sys, time
ifname, n, conc, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
release = sys.argv[5] == "1"
TIMEOUT = float(sys.argv[6]) if len(sys.argv) > 6 else 1.0
DISCOVER, OFFER, REQUEST, ACK, NAK, RELEASE = 1, 2, 3, 5, 6, 7
ETH_P_IP = 0x0800
ZERO4, BCAST4 = bytes(4), b"\xff" * 4
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((ifname, ETH_P_IP))
s.setblocking(False)

def csum(b):
    if len(b) % 2:
        b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16:
        t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF

def frame(mac, xid, kind, extra=b"", to=None):
    # to: None = broadcast from 0.0.0.0 with the broadcast flag, else unicast
    # (server MAC, server IP, client IP)
    dmac, dst, src = to or (b"\xff" * 6, BCAST4, ZERO4)
    opts = bytes([53, 1, kind]) + extra
    if to is None:
        opts += bytes([55, 4, 1, 3, 6, 51])   # parameter request list, as clients send
    dhcp = struct.pack("!BBBBIHH4s4s4s4s16s64s128sI", 1, 1, 6, 0, xid, 0,
                       0x8000 if to is None else 0, src, ZERO4, ZERO4, ZERO4, mac,
                       b"", b"", 0x63825363) + opts + b"\xff"
    dhcp += bytes(max(0, 300 - len(dhcp)))   # the BOOTP minimum, as clients pad
    ulen = 8 + len(dhcp)
    udp = struct.pack("!HHHH", 68, 67, ulen, 0) + dhcp
    c = csum(src + dst + struct.pack("!BBH", 0, 17, ulen) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return dmac + mac + b"\x08\x00" + ip + udp

def parse(f):
    # a BOOTREPLY to UDP port 68: (xid, chaddr, type, yiaddr, server id, source MAC)
    if len(f) < 42 or f[12:14] != b"\x08\x00" or f[23] != 17:
        return None
    u = 14 + (f[14] & 15) * 4
    if f[u + 2:u + 4] != b"\x00\x44":
        return None
    d = f[u + 8:]
    if len(d) < 240 or d[0] != 2 or d[236:240] != b"\x63\x82\x53\x63":
        return None
    kind = sid = None
    i = 240
    while i + 1 < len(d) and d[i] != 255:
        if d[i] == 0:
            i += 1
            continue
        code, ln = d[i], d[i + 1]
        v = d[i + 2:i + 2 + ln]
        if code == 53 and ln == 1:
            kind = v[0]
        elif code == 54 and ln == 4:
            sid = v
        i += 2 + ln
    return struct.unpack("!I", d[4:8])[0], d[28:34], kind, d[16:20], sid, f[6:12]

inflight = {}   # xid -> [chaddr, the reply awaited (OFFER or ACK), deadline, NAKs, start]
started = done = failed = naks = 0
times = []

def discover(mac, nak_count, now, start=None):
    while True:
        xid = struct.unpack("!I", os.urandom(4))[0]
        if xid not in inflight:
            break
    s.send(frame(mac, xid, DISCOVER))
    inflight[xid] = [mac, OFFER, now + TIMEOUT, nak_count, now if start is None else start]

t0 = time.perf_counter()
while True:
    now = time.perf_counter()
    while started < n and len(inflight) < conc and now - t0 <= budget:
        discover(b"\x02" + os.urandom(5), 0, now)
        started += 1
    if not inflight:
        break
    wait = max(0.0, min(t[2] for t in inflight.values()) - now)
    if select.select([s], [], [], wait)[0]:
        while True:
            try:
                f = s.recv(2048)
            except BlockingIOError:
                break
            r = parse(f)
            if r is None:
                continue
            xid, chaddr, kind, yiaddr, sid, smac = r
            t = inflight.get(xid)
            if t is None or t[0] != chaddr:
                continue
            if t[1] == OFFER and kind == OFFER and sid is not None:
                s.send(frame(t[0], xid, REQUEST, bytes([50, 4]) + yiaddr + bytes([54, 4]) + sid))
                t[1], t[2] = ACK, time.perf_counter() + TIMEOUT
            elif t[1] == ACK and kind == ACK:
                del inflight[xid]
                done += 1
                times.append(time.perf_counter() - t[4])
                if release:
                    s.send(frame(t[0], xid, RELEASE, bytes([54, 4]) + (sid or BCAST4),
                                 (smac, sid or BCAST4, yiaddr)))
            elif t[1] == ACK and kind == NAK:
                del inflight[xid]
                naks += 1
                if t[3] < 3:
                    discover(t[0], t[3] + 1, time.perf_counter(), t[4])
                else:
                    failed += 1
    now = time.perf_counter()
    for xid in [x for x, t in inflight.items() if t[2] <= now]:
        del inflight[xid]
        failed += 1
dt = time.perf_counter() - t0
if started < n:
    print(f"warning: only {started}/{n} transactions started in {budget:.0f} s", file=sys.stderr)
times.sort()
median = times[len(times) // 2] * 1000 if times else 0.0
print(f"{done / dt:.0f} {failed} {naks} {median:.2f}")
'

# Servers, each started afresh by start_server SIDE (a new state directory or lease file):
# sy switchyard, dm dnsmasq --no-ping, dp dnsmasq with its ping check (libvirt's default).
cat >"$tmp/dhcpbench.xml" <<EOF
<network>
  <name>dhcpbench</name>
  <ip address='$SERVER' prefix='16'>
    <dhcp><range start='$POOL_START' end='$POOL_END'/></dhcp>
  </ip>
</network>
EOF
starts=0
guest_of() { case "$1" in sy) echo "sg-$tag" ;; dm) echo "dg-$tag" ;; dp) echo "pg-$tag" ;; esac; }
server_ns_of() { case "$1" in sy) echo "sw-$tag" ;; dm) echo "dm-$tag" ;; dp) echo "pm-$tag" ;; esac; }
stop_server() { # side
  local p=${pid[$1]:-}
  [ -n "$p" ] || return 0
  kill "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  unset "pid[$1]"
  if [ "$1" = sy ]; then # its tap goes with it
    for _ in $(seq 50); do ip -n "sg-$tag" link show eth0 >/dev/null 2>&1 || break; sleep 0.1; done
  fi
}
start_server() { # side
  local side=$1 n log
  stop_server "$side"
  starts=$((starts + 1))
  n=$starts
  if [ "$side" = sy ]; then
    log="$tmp/switchyard-$n.log"
    ip netns exec "sw-$tag" "$SY" run "$tmp/dhcpbench.xml" --tap "eth0@sg-$tag=52:54:00:d0:00:01" \
      --control "$tmp/ctl.sock" --state-dir "$tmp/state-$n" 2>"$log" &
    pid[sy]=$!
    wait_switchyard "${pid[sy]}" "$log"
    guest_tap_up "sg-$tag"
    return
  fi
  # dnsmasq: libvirt's DHCP options, nothing read from the system's configuration
  local ping=(--no-ping) sns
  [ "$side" = dp ] && ping=()
  sns=$(server_ns_of "$side")
  log="$tmp/dnsmasq-$side-$n.log"
  ip netns exec "$sns" dnsmasq --keep-in-foreground --conf-file=/dev/null --port=0 \
    --bind-interfaces --interface=veth0 --except-interface=lo \
    --dhcp-range="$POOL_START,$POOL_END,255.255.0.0,1h" --dhcp-lease-max=100000 \
    --dhcp-authoritative --dhcp-no-override "${ping[@]}" --quiet-dhcp \
    --dhcp-leasefile="$tmp/dnsmasq-$side-$n.leases" --pid-file="$tmp/dnsmasq-$side.pid" \
    --log-facility="$log" &
  pid[$side]=$!
  for _ in $(seq 50); do
    [ -n "$(ip netns exec "$sns" ss -Hlun "sport = :67")" ] && return
    kill -0 "${pid[$side]}" 2>/dev/null || { cat "$log" >&2; die "dnsmasq ($side) exited"; }
    sleep 0.1
  done
  die "dnsmasq ($side) does not listen on port 67"
}
for side in dm dp; do
  if [ "$side" = dm ] && [ "$do_dm" = 0 ]; then continue; fi
  if [ "$side" = dp ] && [ "$do_dp" = 0 ]; then continue; fi
  sns=$(server_ns_of "$side")
  g=$(guest_of "$side")
  ip -n "$sns" link add veth0 type veth peer name eth0 netns "$g"
  ip -n "$sns" addr add "$SERVER/16" dev veth0
  ip -n "$sns" link set veth0 up
  ip -n "$g" link set eth0 up
done

sides=()
[ "$do_sy" = 1 ] && sides+=(sy)
[ "$do_dm" = 1 ] && sides+=(dm)
all_sides=("${sides[@]}")
[ "$do_dp" = 1 ] && all_sides+=(dp)
declare -A label=([sy]=switchyard [dm]="dnsmasq --no-ping" [dp]="dnsmasq (ping)")
transact() { # side count concurrency [timeout]: prints "transactions/s failed NAKs median-ms"
  timeout $((BUDGET + 30)) ip netns exec "$(guest_of "$1")" python3 -c "$dhcp_client" eth0 "$2" "$3" "$BUDGET" "$RELEASE" "${4:-1}"
}
for t in "${all_sides[@]}"; do start_server "$t"; done
failed_total=0

header="$(date -u +%Y-%m-%d) $(nproc) cores, $(uname -r), $(dnsmasq --version 2>/dev/null | awk 'NR==1 {print "dnsmasq " $3}')"
out_file="$tmp/report.md"
: >"$out_file"

# ---- transactions ----
if part transactions; then
# warm up both, and check that every transaction completes
for t in "${sides[@]}"; do
  out=$(transact "$t" "$WARMUP" 1) || die "$t: load generator failed"
  read -r _ f _ _ <<<"$out"
  [ "$f" = 0 ] || die "$t: $f of $WARMUP warm-up transactions failed"
done

declare -A res=()   # res[side,level]: transactions/s per round; fail, nak: totals
declare -A fail=() nak=()
for r in $(seq "$RUNS"); do
  line="round $r:"
  for c in "${levels[@]}"; do
    for t in "${sides[@]}"; do
      out=$(transact "$t" "$TRANSACTIONS" "$c") || die "$t: load generator failed or timed out"
      read -r tps f k _ <<<"$out"
      res[$t,$c]+="$tps "
      fail[$t,$c]=$((${fail[$t,$c]:-0} + f))
      nak[$t,$c]=$((${nak[$t,$c]:-0} + k))
      line+=" $t c=$c $tps/s ($f failed, $k NAKs);"
    done
  done
  echo "$line" >&2
done

row() { # label level
  local sm="" s="-" dm="" d="-" smin smax dmin dmax
  # shellcheck disable=SC2086 # the values are space-separated numbers
  if [ "$do_sy" = 1 ]; then read -r sm smin smax < <(stats ${res[sy,$2]}); s="$sm ($smin-$smax)"; fi
  # shellcheck disable=SC2086
  if [ "$do_dm" = 1 ]; then read -r dm dmin dmax < <(stats ${res[dm,$2]}); d="$dm ($dmin-$dmax)"; fi
  awk -v l="$1" -v s="$s" -v d="$d" -v a="$sm" -v b="$dm" \
    'BEGIN {ratio = (a != "" && b != "" && b > 0) ? sprintf("%.2f", a/b) : "-"; printf "| %s | %s | %s | %s |\n", l, s, d, ratio}'
}
failures=""
naks=""
for c in "${levels[@]}"; do
  for t in "${sides[@]}"; do
    failed_total=$((failed_total + ${fail[$t,$c]}))
    failures+=" $t c=$c ${fail[$t,$c]},"
    naks+=" $t c=$c ${nak[$t,$c]},"
  done
done
fs=$(df -T "$tmp" | awk 'NR==2 {print $2}')
if [ "$RELEASE" = 1 ]; then what="DORA + RELEASE"; else what="DORA, leases kept: tables grow"; fi
{
  echo
  echo "$header, $RUNS runs x $TRANSACTIONS transactions ($what) per side and concurrency, interleaved; lease files on $fs, fsynced before the ACK by both; dnsmasq --no-ping --quiet-dhcp; switchyard probes each address new to its client (30 ms)"
  echo "| DHCP transactions/s | switchyard median (min-max) | dnsmasq --no-ping median (min-max) | ratio |"
  echo "|---|---|---|---|"
  for c in "${levels[@]}"; do
    if [ "$c" = 1 ]; then row "DORA, sequential (1 in flight)" 1; else row "DORA, $c in flight" "$c"; fi
  done
  echo "Failed transactions (all rounds):${failures%,}; NAKs, restarted with a DISCOVER:${naks%,}"
} >>"$out_file"
fi

# the cells of a row: "median (min-max)" of each side's values in the array named $1, keyed
# by side (and $2 when given)
cells() {
  local -n values=$1
  local t key m lo hi line=""
  for t in "${all_sides[@]}"; do
    key=$t${2:+,$2}
    if [ -z "${values[$key]:-}" ]; then line+=" - |"; continue; fi
    # shellcheck disable=SC2086 # space-separated numbers
    read -r m lo hi < <(stats ${values[$key]})
    line+=" $m ($lo-$hi) |"
  done
  echo "$line"
}
table_head() { # first column's title
  local t line="| $1 |" rule="|---|"
  for t in "${all_sides[@]}"; do line+=" ${label[$t]} median (min-max) |"; rule+="---|"; done
  echo "$line"
  echo "$rule"
}

# ---- a fresh client's first lease ----
if part first; then
  printf '#!/bin/sh\nexit 0\n' >"$tmp/noop.sh"
  chmod +x "$tmp/noop.sh"
  declare -A dora=() udhcpc=()
  for r in $(seq "$FIRST_RUNS"); do
    began=$(date +%s)
    line="first lease, round $r:"
    for t in "${all_sides[@]}"; do
      g=$(guest_of "$t")
      # the generator: one DORA with a new random chaddr, up to 5 s a step (dnsmasq's ping: 3 s)
      out=$(transact "$t" 1 1 5) || die "$t: load generator failed"
      read -r _ f _ ms <<<"$out"
      [ "$f" = 0 ] || die "$t: a fresh client got no lease"
      dora[$t]+="$ms "
      # udhcpc with a new MAC: a client the server has never seen
      mac=$(printf '02:%02x:%02x:%02x:%02x:%02x' $((RANDOM % 256)) $((RANDOM % 256)) $((RANDOM % 256)) $((RANDOM % 256)) $((RANDOM % 256)))
      ip -n "$g" link set eth0 address "$mac"
      t0=$(date +%s%N)
      timeout 30 ip netns exec "$g" busybox udhcpc -f -q -n -t 3 -T 5 -i eth0 -s "$tmp/noop.sh" \
        >/dev/null 2>&1 || die "$t: udhcpc got no lease"
      t1=$(date +%s%N)
      u=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", (b - a) / 1e6}')
      udhcpc[$t]+="$u "
      line+=" $t DORA $ms ms, udhcpc $u ms;"
    done
    echo "$line" >&2
    # dnsmasq pings at most 6 addresses per 30 s: two per round, 16 s apart, stay below
    if [ "$do_dp" = 1 ] && [ "$r" -lt "$FIRST_RUNS" ]; then
      left=$((began + 16 - $(date +%s)))
      if [ "$left" -gt 0 ]; then sleep "$left"; fi
    fi
  done
  {
    echo
    echo "$header, $FIRST_RUNS rounds, one new client per side each, interleaved; dnsmasq (ping) is libvirt's default, dnsmasq --no-ping does not check; switchyard probes with ARP and waits 30 ms"
    table_head "A fresh client's first lease (ms)"
    echo "| DORA, DISCOVER sent to ACK received (generator) |$(cells dora)"
    echo "| busybox udhcpc, start to bound (new MAC) |$(cells udhcpc)"
  } >>"$out_file"
fi

# ---- perfdhcp ----
if part perfdhcp; then
  udp_rcvbuf_errors() { # guest ns: UDP datagrams dropped for a full socket buffer so far
    ip netns exec "$1" awk '/^Udp:/ {n++; if (n == 1) {for (i = 1; i <= NF; i++) if ($i == "RcvbufErrors") c = i} else print $c}' /proc/net/snmp
  }
  tx_dropped() { # guest ns: frames eth0 could not hand to the server's side so far
    ip netns exec "$1" cat /sys/class/net/eth0/statistics/tx_dropped
  }
  declare -A xps=() dropped=() sockdrop=() txdrop=()
  sy_seen=
  for r in $(seq "$PERF_RUNS"); do
    line="perfdhcp, round $r:"
    for rate in "${rates[@]}"; do
      for t in "${all_sides[@]}"; do
        g=$(guest_of "$t")
        start_server "$t"
        ip -n "$g" addr replace 10.200.0.2/16 dev eth0
        sleep 0.5
        before=$(udp_rcvbuf_errors "$g")
        tx_before=$(tx_dropped "$g")
        pout="$tmp/perfdhcp-$t-$rate-$r.txt"
        timeout $((PERF_SECS + 30)) ip netns exec "$g" perfdhcp -4 -r "$rate" -R 100000000 \
          -p "$PERF_SECS" -W 1000000 -l eth0 "$SERVER" >"$pout" 2>&1 || true
        after=$(udp_rcvbuf_errors "$g")
        tx_after=$(tx_dropped "$g")
        # sent DISCOVERs, received ACKs (the second "received packets": REQUEST-ACK)
        read -r sent acks < <(awk '/^sent packets:/ && !s {s = $3} /^received packets:/ {r[++n] = $3} END {print s + 0, r[2] + 0}' "$pout")
        [ "$sent" -gt 0 ] || { cat "$pout" >&2; die "$t: perfdhcp sent nothing"; }
        x=$(awk -v a="$acks" -v p="$PERF_SECS" 'BEGIN {printf "%.0f", a / p}')
        d=$(awk -v s="$sent" -v a="$acks" 'BEGIN {printf "%.2f", (s - a) * 100 / s}')
        xps[$t,$rate]+="$x "
        dropped[$t,$rate]+="$d "
        sockdrop[$t,$rate]=$((${sockdrop[$t,$rate]:-0} + after - before))
        txdrop[$t,$rate]=$((${txdrop[$t,$rate]:-0} + tx_after - tx_before))
        line+=" $t $rate/s: $x/s, $d% dropped ($((after - before)) replies at perfdhcp's socket, $((tx_after - tx_before)) requests at the guest's eth0);"
        if [ "$t" = sy ]; then
          json="$tmp/switchyard-stats-$rate-$r.json"
          "$SY" stats --socket "$tmp/ctl.sock" --json >"$json" 2>&1 || true
          seen=$(python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))["engine"]["dhcp"]
print(d["discovers"], d["requests"], d["acks"])' "$json" 2>/dev/null || echo "? ? ?")
          read -r sd sr sa <<<"$seen"
          sy_seen+=" $rate/s round $r: $sd of $sent DISCOVERs received, $sr REQUESTs received, $sa ACKs sent;"
        fi
      done
    done
    echo "$line" >&2
  done
  {
    echo
    echo "$header, perfdhcp $(perfdhcp -v 2>&1 | awk 'NR==1 {print $NF}') in the guest namespace, $PERF_RUNS rounds x $PERF_SECS s per rate and side, interleaved, each server started afresh; every client new; exchanges/s = ACKs received / $PERF_SECS s"
    table_head "perfdhcp, offered rate"
    for rate in "${rates[@]}"; do
      echo "| $rate/s: exchanges/s |$(cells xps "$rate")"
      echo "| $rate/s: dropped % (no ACK) |$(cells dropped "$rate")"
    done
    socks=""
    for rate in "${rates[@]}"; do
      for t in "${all_sides[@]}"; do socks+=" $t $rate/s ${sockdrop[$t,$rate]},"; done
    done
    txs=""
    for rate in "${rates[@]}"; do
      for t in "${all_sides[@]}"; do txs+=" $t $rate/s ${txdrop[$t,$rate]},"; done
    done
    echo "Of the drops above (all rounds), replies dropped at perfdhcp's full socket buffer:${socks%,}; requests dropped at the guest's eth0 (the server side not reading fast enough):${txs%,}"
    if [ -n "$sy_seen" ]; then echo "switchyard's own counters:${sy_seen%;}"; fi
    if [ "$do_sy" = 1 ] && [ "$do_dm" = 1 ]; then
      for rate in "${rates[@]}"; do
        # shellcheck disable=SC2086
        read -r a _ _ < <(stats ${xps[sy,$rate]})
        # shellcheck disable=SC2086
        read -r b _ _ < <(stats ${xps[dm,$rate]})
        awk -v r="$rate" -v a="$a" -v b="$b" 'BEGIN {printf "Ratio switchyard / dnsmasq --no-ping at %s/s: %s\n", r, (b > 0) ? sprintf("%.1f", a / b) : "-"}'
      done
    fi
  } >>"$out_file"
fi

cat "$out_file"
if [ "$failed_total" -gt 0 ]; then
  if [ "$do_sy" = 1 ]; then "$SY" stats --socket "$tmp/ctl.sock" >"$tmp/switchyard-stats.json" 2>&1 || true; fi
  die "$failed_total transactions failed"
fi
