#!/usr/bin/env bash
# DHCP transactions per second: switchyard's DHCP server (inside the engine, on the gateway
# address) versus dnsmasq as libvirt runs it, in one run, interleaved.
#
# Two topologies with the same addressing (10.200.0.0/16, server 10.200.0.1, pool
# 10.200.1.0-10.200.255.250, lease time 1 h), each a guest namespace with an eth0 that has no
# address:
#   switchyard: guest eth0 --tap--> switchyard run (release build, ns sw, <dhcp><range>)
#   dnsmasq:    guest eth0 --veth--> veth0 10.200.0.1/16 (ns dm), dnsmasq bound to veth0
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
# dnsmasq runs with --no-ping: by default (libvirt does not change it) dnsmasq pings an
# address before it first offers it and waits up to 3 s for an answer (measured here: one
# OFFER every 3 s), which would time out every transaction; switchyard does not ping (it
# notes addresses it sees in ARP). And with --quiet-dhcp (libvirt's logs every message).
# switchyard's DHCP counters are saved with the logs when a transaction fails.
#
# For each of RUNS rounds, for each concurrency level, it measures both sides, then prints
# median and min-max and the ratio switchyard/dnsmasq of the medians (higher is better).
# All traffic stays inside namespaces this script creates; it removes them on exit, and
# exits 1 (keeping the logs) when any transaction failed.
# Usage: sudo benches/e2e/dhcp_vs_dnsmasq.sh [RUNS] [TRANSACTIONS] [CONCURRENCY]
#   RUNS rounds (default 5) of TRANSACTIONS transactions (default 2000) per side and level;
#   CONCURRENCY: transactions in flight, a comma-separated list of levels (default 1,16:
#   sequential DORA, then 16 at once).
# Environment: ONLY=switchyard or ONLY=dnsmasq measures one side only (empty: both);
# ONLY=dnsmasq neither builds nor runs switchyard. SWITCHYARD=PATH runs that binary instead of
# building target/release/switchyard (e.g. while the tree does not build). RELEASE=0: above.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/e2e/common.sh
. benches/e2e/common.sh
RUNS=${1:-5}
TRANSACTIONS=${2:-2000}
CONCURRENCY=${3:-1,16}
ONLY=${ONLY:-}
RELEASE=${RELEASE:-1}
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
POOL_SIZE=65275     # 10.200.1.0-10.200.255.250, below
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
ns=()
[ "$do_sy" = 1 ] && ns+=("sg-$tag" "sw-$tag")
[ "$do_dm" = 1 ] && ns+=("dg-$tag" "dm-$tag")
sy_pid=""
dm_pid=""
tmp=""
cleanup() {
  local rc=$?
  if [ -n "$sy_pid" ]; then kill "$sy_pid" 2>/dev/null || true; fi
  if [ -n "$dm_pid" ]; then kill "$dm_pid" 2>/dev/null || true; fi
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
# flight, stopping early after BUDGET seconds; prints "transactions/s failed NAKs"
dhcp_client='
import os, select, socket, struct, sys, time
ifname, n, conc, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
release = sys.argv[5] == "1"
TIMEOUT = 1.0
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

inflight = {}   # xid -> [chaddr, the reply awaited (OFFER or ACK), deadline, NAKs]
started = done = failed = naks = 0

def discover(mac, nak_count, now):
    while True:
        xid = struct.unpack("!I", os.urandom(4))[0]
        if xid not in inflight:
            break
    s.send(frame(mac, xid, DISCOVER))
    inflight[xid] = [mac, OFFER, now + TIMEOUT, nak_count]

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
                if release:
                    s.send(frame(t[0], xid, RELEASE, bytes([54, 4]) + (sid or BCAST4),
                                 (smac, sid or BCAST4, yiaddr)))
            elif t[1] == ACK and kind == NAK:
                del inflight[xid]
                naks += 1
                if t[3] < 3:
                    discover(t[0], t[3] + 1, time.perf_counter())
                else:
                    failed += 1
    now = time.perf_counter()
    for xid in [x for x, t in inflight.items() if t[2] <= now]:
        del inflight[xid]
        failed += 1
dt = time.perf_counter() - t0
if started < n:
    print(f"warning: only {started}/{n} transactions started in {budget:.0f} s", file=sys.stderr)
print(f"{done / dt:.0f} {failed} {naks}")
'

# switchyard topology
if [ "$do_sy" = 1 ]; then
  cat >"$tmp/dhcpbench.xml" <<EOF
<network>
  <name>dhcpbench</name>
  <ip address='$SERVER' prefix='16'>
    <dhcp><range start='$POOL_START' end='$POOL_END'/></dhcp>
  </ip>
</network>
EOF
  ip netns exec "sw-$tag" "$SY" run "$tmp/dhcpbench.xml" --tap "eth0@sg-$tag=52:54:00:d0:00:01" \
    --control "$tmp/ctl.sock" --state-dir "$tmp/state" 2>"$tmp/switchyard.log" &
  sy_pid=$!
  for _ in $(seq 100); do
    grep -q " running with " "$tmp/switchyard.log" && break
    kill -0 "$sy_pid" 2>/dev/null || { cat "$tmp/switchyard.log" >&2; die "switchyard exited"; }
    sleep 0.1
  done
  grep -q " running with " "$tmp/switchyard.log" || { cat "$tmp/switchyard.log" >&2; die "switchyard did not start"; }
  for _ in $(seq 50); do ip -n "sg-$tag" link show eth0 >/dev/null 2>&1 && break; sleep 0.1; done
  ip -n "sg-$tag" link set eth0 up
fi

# dnsmasq topology: libvirt's DHCP options, nothing read from the system's configuration
if [ "$do_dm" = 1 ]; then
  ip -n "dm-$tag" link add veth0 type veth peer name eth0 netns "dg-$tag"
  ip -n "dm-$tag" addr add "$SERVER/16" dev veth0
  ip -n "dm-$tag" link set veth0 up
  ip -n "dg-$tag" link set eth0 up
  ip netns exec "dm-$tag" dnsmasq --keep-in-foreground --conf-file=/dev/null --port=0 \
    --bind-interfaces --interface=veth0 --except-interface=lo \
    --dhcp-range="$POOL_START,$POOL_END,255.255.0.0,1h" --dhcp-lease-max=100000 \
    --dhcp-authoritative --dhcp-no-override --no-ping --quiet-dhcp \
    --dhcp-leasefile="$tmp/dnsmasq.leases" --pid-file="$tmp/dnsmasq.pid" \
    --log-facility="$tmp/dnsmasq.log" &
  dm_pid=$!
  for _ in $(seq 50); do
    [ -n "$(ip netns exec "dm-$tag" ss -Hlun "sport = :67")" ] && break
    kill -0 "$dm_pid" 2>/dev/null || { cat "$tmp/dnsmasq.log" >&2; die "dnsmasq exited"; }
    sleep 0.1
  done
  [ -n "$(ip netns exec "dm-$tag" ss -Hlun "sport = :67")" ] || die "dnsmasq does not listen on port 67"
fi

sides=()
[ "$do_sy" = 1 ] && sides+=(sy)
[ "$do_dm" = 1 ] && sides+=(dm)
guest_of() { if [ "$1" = sy ]; then echo "sg-$tag"; else echo "dg-$tag"; fi; }
transact() { # side count concurrency: prints "transactions/s failed NAKs"
  timeout $((BUDGET + 30)) ip netns exec "$(guest_of "$1")" python3 -c "$dhcp_client" eth0 "$2" "$3" "$BUDGET" "$RELEASE"
}

# warm up both, and check that every transaction completes
for t in "${sides[@]}"; do
  out=$(transact "$t" "$WARMUP" 1) || die "$t: load generator failed"
  read -r _ f _ <<<"$out"
  [ "$f" = 0 ] || die "$t: $f of $WARMUP warm-up transactions failed"
done

declare -A res=()   # res[side,level]: transactions/s per round; fail, nak: totals
declare -A fail=() nak=()
for r in $(seq "$RUNS"); do
  line="round $r:"
  for c in "${levels[@]}"; do
    for t in "${sides[@]}"; do
      out=$(transact "$t" "$TRANSACTIONS" "$c") || die "$t: load generator failed or timed out"
      read -r tps f k <<<"$out"
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
failed_total=0
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
echo
echo "$(date -u +%Y-%m-%d) $(nproc) cores, $(uname -r), $(dnsmasq --version 2>/dev/null | awk 'NR==1 {print "dnsmasq " $3}'), $RUNS runs x $TRANSACTIONS transactions ($what) per side and concurrency, interleaved; lease files on $fs, fsynced before the ACK by both; dnsmasq --no-ping --quiet-dhcp"
echo "| DHCP transactions/s | switchyard median (min-max) | dnsmasq median (min-max) | ratio |"
echo "|---|---|---|---|"
for c in "${levels[@]}"; do
  if [ "$c" = 1 ]; then row "DORA, sequential (1 in flight)" 1; else row "DORA, $c in flight" "$c"; fi
done
echo "Failed transactions (all rounds):${failures%,}; NAKs, restarted with a DISCOVER:${naks%,}"
if [ "$failed_total" -gt 0 ]; then
  if [ "$do_sy" = 1 ]; then "$SY" stats --socket "$tmp/ctl.sock" >"$tmp/switchyard-stats.json" 2>&1 || true; fi
  die "$failed_total transactions failed"
fi
