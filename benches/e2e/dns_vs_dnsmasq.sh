#!/usr/bin/env bash
# DNS queries per second: switchyard's DNS (inside the engine, on the gateway address) versus
# dnsmasq as libvirt runs it, serving the same names, in one run, interleaved.
#
# Two topologies with the same addressing, each a guest (eth0 192.168.122.10/24, no route
# beyond its subnet), a server namespace and an "outside" namespace holding the upstream:
#   switchyard: guest eth0 --tap--> switchyard run (release build, ns sw, isolated network:
#               no <forward>; <dns><forwarder addr='203.0.113.1'/><host ip='192.168.122.7'>
#               printer), answering on 192.168.122.1:53; its upstream queries leave from a
#               host socket of ns sw, whose veth up0 (203.0.113.3/24) leads to ns so
#   dnsmasq:    guest eth0 --veth--> veth0 192.168.122.1/24 (ns dm), dnsmasq bound to veth0;
#               up0 203.0.113.3/24 --veth--> ns do
# (libvirt puts a bridge, virbr0, between guest and dnsmasq: left out here, one kernel hop
# less.) In both outside namespaces, 203.0.113.1 runs the same python3 stub DNS server: A
# 198.51.100.1 with TTL 3600 for every NAME.example.test, NODATA for other types there,
# NXDOMAIN for the rest; it logs each question it gets, so the script can tell whether a
# measurement really was answered from the cache.
#
# dnsmasq is started with libvirt's DNS options and nothing read from the system:
# --conf-file=/dev/null --no-resolv --no-hosts (no /etc/resolv.conf, no /etc/hosts),
# --strict-order --server=203.0.113.1, --bind-interfaces --interface=veth0
# --except-interface=lo, the <dns><host> in an --addn-hosts file as libvirt writes it, no
# DHCP, --cache-size=150 (dnsmasq's default, which libvirt leaves alone; switchyard's cache
# also holds 150 answers); local TTL 0 on both (dnsmasq's local-ttl default). switchyard runs
# with --resolv-conf /dev/null (the <forwarder> names the upstream anyway).
#
# Metrics, each measured with the load generator in the guest namespace against
# 192.168.122.1, UDP, one socket, OUTSTANDING queries in flight at most (each level of the
# list), SECS seconds:
#   local:  "printer A" over and over: a local name (<dns><host> / addn-hosts), never
#           forwarded;
#   cached: NAMES forwarded names n1..nNAMES.example.test (A), cycled; every one was asked
#           once before the rounds (warm-up, checked: a second pass sends nothing
#           upstream), so every measured query is a cache hit (NAMES is at most 100 so they
#           fit both caches of 150; the questions the stub got during the rounds are printed,
#           with a warning unless none, and the cached TTL is checked to count down).
# The load generator is dnsperf (installed from Debian if missing) with -c 1 -T 1 -q
# OUTSTANDING -l SECS -t 2; if dnsperf cannot be had (or LOADGEN=python) a python3 generator
# does the same (one non-blocking socket, OUTSTANDING in flight, SECS seconds, a query
# unanswered after 2 s is lost). The sequential level (1 in flight) always uses the python3
# generator: dnsperf -q 1 measures the hand-over between its own sending and receiving
# threads, not the server (measured here: 250-3000 queries/s at 40-75 us average latency, on
# either server, where the python3 loop does about 15000). The rate is completed queries per second as
# the generator reports it. A query lost or answered with another code than NOERROR counts as
# failed.
#
# Before measuring, answers are checked on both sides with dig: printer is 192.168.122.7,
# www.example.test is 198.51.100.1, and the two sides' answer sections (TTL left out) and
# header flags are compared (a difference in flags is printed, not fatal). The rounds
# alternate which side goes first. After them, switchyard's DNS counters (switchyard stats)
# and dnsmasq's (SIGUSR1: its cache and server statistics) are printed below the table.
# On 2 cores the load generator (dnsperf: a sending and a receiving thread) and the server
# (one thread each) share them; that is the same for both sides.
#
# For each of RUNS rounds, for each metric and level, it measures both sides, then prints the
# median and min-max and the ratio switchyard/dnsmasq of the medians (higher is better).
# All traffic stays inside namespaces this script creates; it removes them, its processes and
# its temporary files on exit, and exits 1 (keeping the logs) when answers are wrong or more
# than 1% of the queries of a measurement series failed.
# Usage: sudo [SY_ARGS="--busy-poll-us 50"] benches/e2e/dns_vs_dnsmasq.sh [RUNS] [SECS] [OUTSTANDING] [NAMES]
#   RUNS rounds (default 5) of SECS seconds (default 5) per side, metric and level;
#   OUTSTANDING: queries in flight, a comma-separated list of levels (default 1,16:
#   sequential, then 16 at once); NAMES forwarded names in the cached metric (default 100,
#   at most 100).
# Environment: ONLY=switchyard or ONLY=dnsmasq measures one side only (empty: both);
# ONLY=dnsmasq neither builds nor runs switchyard. SWITCHYARD=PATH runs that binary instead of
# building target/release/switchyard. LOADGEN=dnsperf (default; python3 when dnsperf cannot
# be installed) or LOADGEN=python.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/e2e/common.sh
. benches/e2e/common.sh
RUNS=${1:-5}
SECS=${2:-5}
OUTSTANDING=${3:-1,16}
NAMES=${4:-100}
ONLY=${ONLY:-}
LOADGEN=${LOADGEN:-dnsperf}
QTIMEOUT=2          # seconds before a query counts as lost
MAX_LOSS_PCT=1      # more failed queries than this, in any series, fails the run
usage="usage: $0 [RUNS] [SECS] [OUTSTANDING] [NAMES] (positive integers; OUTSTANDING a comma-separated list, each at most 1024; NAMES at most 100)"
for v in "$RUNS" "$SECS" "$NAMES"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "$usage" >&2; exit 2; }
done
[ "$NAMES" -le 100 ] || { echo "$usage" >&2; exit 2; }
IFS=, read -r -a levels <<<"$OUTSTANDING"
[ ${#levels[@]} -gt 0 ] || { echo "$usage" >&2; exit 2; }
for c in "${levels[@]}"; do
  if ! [[ $c =~ ^[1-9][0-9]*$ ]] || [ "$c" -gt 1024 ]; then echo "$usage" >&2; exit 2; fi
done
case "$ONLY" in
  "") do_sy=1; do_dm=1 ;;
  switchyard) do_sy=1; do_dm=0 ;;
  dnsmasq) do_sy=0; do_dm=1 ;;
  *) echo "ONLY must be switchyard, dnsmasq or empty" >&2; exit 2 ;;
esac
case "$LOADGEN" in dnsperf|python) ;; *) echo "LOADGEN must be dnsperf or python" >&2; exit 2 ;; esac
tests/setup.sh
apt_install() { # package: quietly, with an update of the lists only when needed
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "$1" >/dev/null 2>&1 || {
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$1" >/dev/null
  }
}
if [ "$do_dm" = 1 ] && ! command -v dnsmasq >/dev/null 2>&1; then
  echo "dns_vs_dnsmasq: installing dnsmasq-base" >&2
  apt_install dnsmasq-base
fi
if [ "$LOADGEN" = dnsperf ] && ! command -v dnsperf >/dev/null 2>&1; then
  echo "dns_vs_dnsmasq: installing dnsperf" >&2
  apt_install dnsperf 2>/dev/null || true
  if ! command -v dnsperf >/dev/null 2>&1; then
    echo "dns_vs_dnsmasq: dnsperf is not installable here: using the python3 load generator" >&2
    LOADGEN=python
  fi
fi
SY=${SWITCHYARD:-target/release/switchyard}
if [ "$do_sy" = 1 ]; then
  if [ -z "${SWITCHYARD:-}" ]; then cargo build --release --quiet -j 2 -p switchyard; fi
  [ -x "$SY" ] || { echo "dns_vs_dnsmasq: $SY is not an executable" >&2; exit 2; }
fi

tag="q$$"
SERVER=192.168.122.1
GUEST=192.168.122.10
UPSTREAM=203.0.113.1
LOCAL_NAME=printer
LOCAL_IP=192.168.122.7
FWD_IP=198.51.100.1
ns=()
[ "$do_sy" = 1 ] && ns+=("sg-$tag" "sw-$tag" "so-$tag")
[ "$do_dm" = 1 ] && ns+=("dg-$tag" "dm-$tag" "do-$tag")
pids=()             # the stubs, killed on exit
sy_pid=""
dm_pid=""
tmp=""
cleanup() {
  local rc=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -n "$sy_pid" ]; then kill "$sy_pid" 2>/dev/null || true; fi
  if [ -n "$dm_pid" ]; then kill "$dm_pid" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  for n in "${ns[@]}"; do ip netns del "$n" 2>/dev/null || true; done
  if [ -n "$tmp" ]; then
    if [ "$rc" -eq 0 ]; then rm -rf "$tmp"; else echo "dns_vs_dnsmasq: logs kept in $tmp" >&2; fi
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
die() { echo "dns_vs_dnsmasq: $*" >&2; exit 1; }
tmp=$(mktemp -d /tmp/switchyard-dnsbench-XXXXXX)
for n in "${ns[@]}"; do ip netns add "$n"; ip -n "$n" link set lo up; done

# The upstream: answers A 198.51.100.1 TTL 3600 for NAME.example.test, NODATA for other types
# there, NXDOMAIN for the rest; prints each question (flushed), so its log counts them.
stub_server='
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    q, peer = s.recvfrom(4096)
    if len(q) < 12:
        continue
    try:
        qid, flags, qd = struct.unpack("!HHH", q[:6])
        i, labels = 12, []
        while q[i]:
            labels.append(q[i + 1:i + 1 + q[i]].decode().lower())
            i += 1 + q[i]
        qtype = struct.unpack("!H", q[i + 1:i + 3])[0]
    except (IndexError, struct.error, UnicodeDecodeError):
        continue
    question = q[12:i + 5]
    name = ".".join(labels)
    print(name, qtype, flush=True)
    answers = b""
    rcode = 0
    if name.endswith(".example.test") and qtype == 1:
        answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 3600, 4) + bytes([198, 51, 100, 1])
    elif not name.endswith(".example.test"):
        rcode = 3
    an = 1 if answers else 0
    head = struct.pack("!HHHHHH", qid, 0x8180 | rcode, 1, an, 0, 0)
    s.sendto(head + question + answers, peer)
'

# The fallback load generator: queries from a dnsperf data file ("NAME TYPE" lines, A only
# here) to SERVER:53 over one UDP socket, CONC in flight, SECS seconds, a query lost after
# TIMEOUT s; prints "queries/s sent lost non-NOERROR average-latency-us"
py_loadgen='
import collections, random, select, socket, struct, sys, time
server, path, conc = sys.argv[1], sys.argv[2], int(sys.argv[3])
secs, timeout = float(sys.argv[4]), float(sys.argv[5])
def question(name):
    q = b""
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack("!HH", 1, 1)
head = struct.pack("!HHHHH", 0x0100, 1, 0, 0, 0)
wire = [head + question(l.split()[0]) for l in open(path) if l.strip()]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.connect((server, 53))
s.setblocking(False)
ids = list(range(65536))
random.shuffle(ids)
ids = collections.deque(ids)   # free IDs: taken from the left, given back on the right
inflight = {}   # id -> time sent, oldest first
sent = done = lost = bad = 0
lat = 0.0
i = 0
t0 = time.perf_counter()
end = t0 + secs
while True:
    now = time.perf_counter()
    while now < end and len(inflight) < conc:
        qid = ids.popleft()
        try:
            s.send(struct.pack("!H", qid) + wire[i % len(wire)])
        except BlockingIOError:
            ids.appendleft(qid)
            break
        inflight[qid] = now
        i += 1
        sent += 1
    while inflight:
        qid, t = next(iter(inflight.items()))
        if t + timeout > now:
            break
        del inflight[qid]
        ids.append(qid)
        lost += 1
    if not inflight and now >= end:
        break
    wake = [end] if now < end else []
    if inflight:
        wake.append(next(iter(inflight.values())) + timeout)
    wake = min(wake)
    if select.select([s], [], [], max(0.0, wake - now))[0]:
        now = time.perf_counter()
        while True:
            try:
                a = s.recv(4096)
            except (BlockingIOError, ConnectionRefusedError):
                break
            if len(a) < 12:
                continue
            qid = struct.unpack("!H", a[:2])[0]
            t = inflight.pop(qid, None)
            if t is None:
                continue
            ids.append(qid)
            done += 1
            lat += now - t
            if a[3] & 15:
                bad += 1
dt = time.perf_counter() - t0
print(f"{done / dt:.0f} {sent} {lost} {bad} {lat / max(done, 1) * 1e6:.0f}")
'

# waits (bounded) until something listens on UDP port 53 at address $2 in namespace $1
wait_dns_listen() {
  local l
  for _ in $(seq 100); do
    l=$(ip netns exec "$1" ss -Hlun "sport = :53")
    [[ $l == *"$2:53 "* ]] && return 0
    sleep 0.1
  done
  die "nothing listens on $2:53 in $1"
}
start_stub() { # outside-ns server-ns: the veth, the address and the stub
  ip -n "$2" link add up0 type veth peer name eth0 netns "$1"
  ip -n "$2" addr add 203.0.113.3/24 dev up0
  ip -n "$2" link set up0 up
  ip -n "$1" addr add "$UPSTREAM/24" dev eth0
  ip -n "$1" link set eth0 up
  ip netns exec "$1" python3 -u -c "$stub_server" "$UPSTREAM" >"$tmp/stub-$1.log" 2>&1 &
  pids+=($!)
  wait_dns_listen "$1" "$UPSTREAM"
}

# switchyard topology
if [ "$do_sy" = 1 ]; then
  start_stub "so-$tag" "sw-$tag"
  cat >"$tmp/dnsbench.xml" <<EOF
<network>
  <name>dnsbench</name>
  <dns>
    <forwarder addr='$UPSTREAM'/>
    <host ip='$LOCAL_IP'><hostname>$LOCAL_NAME</hostname></host>
  </dns>
  <ip address='$SERVER' netmask='255.255.255.0'/>
</network>
EOF
  # shellcheck disable=SC2086 # SY_ARGS is a list of extra options for `switchyard run`
  ip netns exec "sw-$tag" "$SY" run "$tmp/dnsbench.xml" ${SY_ARGS:-} --tap "eth0@sg-$tag=52:54:00:d5:00:01" \
    --control "$tmp/ctl.sock" --state-dir "$tmp/state" --resolv-conf /dev/null \
    2>"$tmp/switchyard.log" &
  sy_pid=$!
  wait_switchyard "$sy_pid" "$tmp/switchyard.log"
  grep -q "DNS on $SERVER:53" "$tmp/switchyard.log" || { cat "$tmp/switchyard.log" >&2; die "switchyard serves no DNS"; }
  guest_tap_up "sg-$tag"
  ip -n "sg-$tag" addr add "$GUEST/24" dev eth0
fi

# dnsmasq topology: libvirt's DNS options, nothing read from the system's configuration
if [ "$do_dm" = 1 ]; then
  start_stub "do-$tag" "dm-$tag"
  ip -n "dm-$tag" link add veth0 type veth peer name eth0 netns "dg-$tag"
  ip -n "dm-$tag" addr add "$SERVER/24" dev veth0
  ip -n "dm-$tag" link set veth0 up
  ip -n "dg-$tag" addr add "$GUEST/24" dev eth0
  ip -n "dg-$tag" link set eth0 up
  printf '%s\t%s\n' "$LOCAL_IP" "$LOCAL_NAME" >"$tmp/dnsmasq.addnhosts"
  # dnsmasq reads it (at start and on SIGHUP) as the unprivileged user it switches to
  chmod 711 "$tmp"
  chmod 644 "$tmp/dnsmasq.addnhosts"
  ip netns exec "dm-$tag" dnsmasq --keep-in-foreground --conf-file=/dev/null \
    --no-resolv --no-hosts --strict-order --server="$UPSTREAM" \
    --bind-interfaces --interface=veth0 --except-interface=lo \
    --addn-hosts="$tmp/dnsmasq.addnhosts" --cache-size=150 \
    --pid-file="$tmp/dnsmasq.pid" --log-facility="$tmp/dnsmasq.log" &
  dm_pid=$!
  for _ in $(seq 50); do
    [[ $(ip netns exec "dm-$tag" ss -Hlun "sport = :53") == *"$SERVER:53 "* ]] && break
    kill -0 "$dm_pid" 2>/dev/null || { cat "$tmp/dnsmasq.log" >&2; die "dnsmasq exited"; }
    sleep 0.1
  done
  wait_dns_listen "dm-$tag" "$SERVER"
fi

sides=()
[ "$do_sy" = 1 ] && sides+=(sy)
[ "$do_dm" = 1 ] && sides+=(dm)
guest_of() { if [ "$1" = sy ]; then echo "sg-$tag"; else echo "dg-$tag"; fi; }
outside_of() { if [ "$1" = sy ]; then echo "so-$tag"; else echo "do-$tag"; fi; }
name_of() { if [ "$1" = sy ]; then echo switchyard; else echo dnsmasq; fi; }
upstream_count() { wc -l <"$tmp/stub-$(outside_of "$1").log"; }
gdig() { # side dig-args...
  timeout 20 ip netns exec "$(guest_of "$1")" dig "@$SERVER" +time=2 +tries=2 "${@:2}"
}

# query files, dnsperf's format
echo "$LOCAL_NAME A" >"$tmp/q-local"
for i in $(seq "$NAMES"); do echo "n$i.example.test A"; done >"$tmp/q-cached"

# check the answers on each side, warm the caches, and compare the sides
for t in "${sides[@]}"; do
  got=$(gdig "$t" +short "$LOCAL_NAME" A) || die "$t: dig $LOCAL_NAME failed"
  [ "$got" = "$LOCAL_IP" ] || die "$(name_of "$t"): $LOCAL_NAME A is '$got', not $LOCAL_IP"
  got=$(gdig "$t" +short www.example.test A) || die "$t: dig www.example.test failed"
  [ "$got" = "$FWD_IP" ] || die "$(name_of "$t"): www.example.test A is '$got', not $FWD_IP"
  # warm-up: every name of the cached metric, once, from the upstream
  got=$(gdig "$t" +short -f "$tmp/q-cached" | sort | uniq -c | awk '{print $1, $2}')
  [ "$got" = "$NAMES $FWD_IP" ] || die "$(name_of "$t"): warm-up answers: $got"
  before=$(upstream_count "$t")
  got=$(gdig "$t" +short -f "$tmp/q-cached" | sort | uniq -c | awk '{print $1, $2}')
  [ "$got" = "$NAMES $FWD_IP" ] || die "$(name_of "$t"): cached answers: $got"
  [ "$(upstream_count "$t")" = "$before" ] ||
    die "$(name_of "$t"): a second pass over the warmed names went upstream ($before -> $(upstream_count "$t") questions)"
  # the same question twice: the second answer from the cache, its TTL counting down
  for q in "$LOCAL_NAME" www.example.test n1.example.test; do
    gdig "$t" +noall +comments +answer "$q" A >"$tmp/dig-$t-$q"
  done
done
if [ "$do_sy" = 1 ] && [ "$do_dm" = 1 ]; then
  for q in "$LOCAL_NAME" www.example.test n1.example.test; do
    for t in sy dm; do
      awk '/^;; ->>HEADER<<-/ {sub(/, id: [0-9]+/, ""); print} /^;; flags:|^; EDNS:/ {print}
           !/^;/ && NF >= 5 {$2 = "TTL"; print}' "$tmp/dig-$t-$q" >"$tmp/cmp-$t-$q"
    done
    if ! diff -q "$tmp/cmp-sy-$q" "$tmp/cmp-dm-$q" >/dev/null; then
      if diff <(grep -v '^;' "$tmp/cmp-sy-$q") <(grep -v '^;' "$tmp/cmp-dm-$q") >/dev/null; then
        echo "dns_vs_dnsmasq: note: $q: same answer, different header (switchyard < > dnsmasq):" >&2
        diff "$tmp/cmp-sy-$q" "$tmp/cmp-dm-$q" | grep '^[<>]' >&2 || true
      else
        diff "$tmp/cmp-sy-$q" "$tmp/cmp-dm-$q" >&2 || true
        die "$q: switchyard and dnsmasq answer differently"
      fi
    fi
  done
fi
declare -A upstream_before=()
for t in "${sides[@]}"; do upstream_before[$t]=$(upstream_count "$t"); done
warmed=$(date +%s)   # the cached names' TTLs count down from 3600 from about here

# one measurement: side metric level; prints "queries/s sent lost non-NOERROR latency-us"
measure() {
  local g out
  g=$(guest_of "$1")
  if [ "$LOADGEN" = dnsperf ] && [ "$3" -gt 1 ]; then
    out=$(timeout $((SECS + QTIMEOUT + 30)) ip netns exec "$g" dnsperf -s "$SERVER" -d "$tmp/q-$2" \
      -c 1 -T 1 -q "$3" -l "$SECS" -t "$QTIMEOUT" 2>&1) || { tail -n 20 <<<"$out" >&2; return 1; }
    awk '/Queries sent:/ {sent = $3} /Queries lost:/ {lost = $3}
      /Queries per second:/ {qps = $4} /Average Latency/ {lat = $4}
      /Response codes:/ {for (i = 3; i < NF; i += 3) {n = $(i + 1); if ($i != "NOERROR") bad += n}}
      END {if (qps == "") exit 1; printf "%.0f %d %d %d %.0f\n", qps, sent, lost, bad, lat * 1e6}' <<<"$out" ||
      { tail -n 20 <<<"$out" >&2; return 1; }
  else
    timeout $((SECS + QTIMEOUT + 30)) ip netns exec "$g" python3 -c "$py_loadgen" "$SERVER" "$tmp/q-$2" \
      "$3" "$SECS" "$QTIMEOUT"
  fi
}

metrics=(local cached)
declare -A res=() sent=() failed=()   # res: queries/s per round; sent, failed: totals
for r in $(seq "$RUNS"); do
  if [ $((r % 2)) = 1 ]; then order=("${sides[@]}"); else order=(); for t in "${sides[@]}"; do order=("$t" "${order[@]}"); done; fi
  line="round $r:"
  for m in "${metrics[@]}"; do
    for c in "${levels[@]}"; do
      for t in "${order[@]}"; do
        out=$(measure "$t" "$m" "$c") || die "$(name_of "$t"): load generator failed or timed out ($m, q=$c)"
        read -r qps s l b lat <<<"$out"
        res[$t,$m,$c]+="$qps "
        sent[$t,$m,$c]=$((${sent[$t,$m,$c]:-0} + s))
        failed[$t,$m,$c]=$((${failed[$t,$m,$c]:-0} + l + b))
        line+=" $t $m q=$c $qps/s (${lat}us, $l lost, $b not NOERROR);"
      done
    done
  done
  echo "$line" >&2
done

# the answers are still right, and the cached metric never went upstream
for t in "${sides[@]}"; do
  got=$(gdig "$t" +short "$LOCAL_NAME" A) || die "$t: dig $LOCAL_NAME failed after the rounds"
  [ "$got" = "$LOCAL_IP" ] || die "$(name_of "$t"): after the rounds $LOCAL_NAME A is '$got'"
  got=$(gdig "$t" +short n1.example.test A) || die "$t: dig n1.example.test failed after the rounds"
  [ "$got" = "$FWD_IP" ] || die "$(name_of "$t"): after the rounds n1.example.test A is '$got'"
done
# the cached answers' TTL counts down with the time since the warm-up (give or take 2 s)
ttl_line="TTL of n1.example.test after the rounds, $(($(date +%s) - warmed)) s after the warm-up:"
ttl_bad=""
for t in "${sides[@]}"; do
  ttl=$(gdig "$t" +noall +answer n1.example.test A | awk '{print $2; exit}')
  ttl_line+=" $(name_of "$t") $ttl,"
  elapsed=$(($(date +%s) - warmed))
  if ! [[ $ttl =~ ^[0-9]+$ ]] || [ "$ttl" -gt $((3600 - elapsed + 2)) ] || [ "$ttl" -lt $((3600 - elapsed - 3)) ]; then
    ttl_bad+=" $(name_of "$t")"
  fi
done
declare -A upstream_during=()
for t in "${sides[@]}"; do upstream_during[$t]=$(($(upstream_count "$t") - ${upstream_before[$t]})); done

row() { # label metric level
  local sm="" s="-" dm="" d="-" smin smax dmin dmax
  # shellcheck disable=SC2086 # the values are space-separated numbers
  if [ "$do_sy" = 1 ]; then read -r sm smin smax < <(stats ${res[sy,$2,$3]}); s="$sm ($smin-$smax)"; fi
  # shellcheck disable=SC2086
  if [ "$do_dm" = 1 ]; then read -r dm dmin dmax < <(stats ${res[dm,$2,$3]}); d="$dm ($dmin-$dmax)"; fi
  awk -v l="$1" -v s="$s" -v d="$d" -v a="$sm" -v b="$dm" \
    'BEGIN {ratio = (a != "" && b != "" && b > 0) ? sprintf("%.2f", a/b) : "-"; printf "| %s | %s | %s | %s |\n", l, s, d, ratio}'
}
bad_series=""
failures=""
for m in "${metrics[@]}"; do
  for c in "${levels[@]}"; do
    for t in "${sides[@]}"; do
      f=${failed[$t,$m,$c]}; s=${sent[$t,$m,$c]}
      failures+=" $t $m q=$c $f/$s,"
      if [ $((f * 100)) -gt $((s * MAX_LOSS_PCT)) ]; then bad_series+=" $t $m q=$c ($f of $s)"; fi
    done
  done
done
pygen="python3 $(python3 -c 'import platform; print(platform.python_version())') generator"
if [ "$LOADGEN" = dnsperf ]; then
  gen="dnsperf $(dnsperf -h 2>&1 | awk '/^Version/ {print $2}') (-c 1 -T 1 -t $QTIMEOUT) with queries in flight, $pygen sequentially"
else
  gen="$pygen (-t $QTIMEOUT)"
fi
tools=""
[ "$do_sy" = 1 ] && tools+="switchyard $(git rev-parse --short HEAD 2>/dev/null || echo '?'), "
[ "$do_dm" = 1 ] && tools+="$(dnsmasq --version | awk 'NR==1 {print "dnsmasq " $3}') --cache-size=150 (its default), "
echo
echo "$(date -u +%Y-%m-%d) $(nproc) cores, $(uname -r), ${tools}$gen, $RUNS runs x ${SECS}s per side, metric and level, interleaved (side order alternating), UDP, one client socket; cached: $NAMES names, all cache hits"
echo "| DNS queries/s | switchyard median (min-max) | dnsmasq median (min-max) | ratio |"
echo "|---|---|---|---|"
for m in "${metrics[@]}"; do
  for c in "${levels[@]}"; do
    if [ "$m" = local ]; then what="local name ($LOCAL_NAME A, <dns><host> / addn-hosts)"; else what="cached forwarded names ($NAMES x NAME.example.test A)"; fi
    if [ "$c" = 1 ]; then what+=", sequential (python3)"; else what+=", $c in flight (${LOADGEN/python/python3})"; fi
    row "$what" "$m" "$c"
  done
done
echo "Failed queries (lost or not NOERROR, all rounds):${failures%,}"
upline="Questions sent upstream during the rounds (the cached metric should send none):"
for t in "${sides[@]}"; do upline+=" $(name_of "$t") ${upstream_during[$t]},"; done
echo "${upline%,}"
echo "${ttl_line%,}"
if [ "$do_sy" = 1 ]; then
  "$SY" stats --socket "$tmp/ctl.sock" >"$tmp/switchyard-stats.json" 2>&1 || true
  python3 - "$tmp/switchyard-stats.json" <<'EOF' || true
import json, sys
d = json.load(open(sys.argv[1]))["engine"]["dns"]
keys = ["queries", "local_answers", "cache_hits", "cache_misses", "cache_inserts", "cache_evictions",
        "cache_expired", "forwarded", "coalesced", "client_retries", "upstream_timeouts", "refused",
        "servfail_sent", "formerr", "dropped_malformed"]
print("switchyard DNS counters: " + ", ".join(f"{k} {d[k]}" for k in keys if k in d)
      + "".join(f", {k} {v}" for k, v in d.items() if k not in keys and isinstance(v, int) and v))
EOF
fi
if [ "$do_dm" = 1 ]; then
  kill -USR1 "$dm_pid" 2>/dev/null || true
  sleep 0.3
  # its statistics dump: cache size and insertions, queries forwarded and answered locally
  grep -E 'cache size [0-9]+,|queries forwarded|server [0-9.#]+: queries sent' "$tmp/dnsmasq.log" |
    sed 's/^.*dnsmasq\[[0-9]*\]: //; s/^/dnsmasq statistics: /' || true
fi
if [ -n "$bad_series" ]; then
  die "more than $MAX_LOSS_PCT% of the queries failed in:$bad_series"
fi
[ -z "$ttl_bad" ] || echo "dns_vs_dnsmasq: warning: the cached TTL does not count down with the time since the warm-up on:$ttl_bad" >&2
for t in "${sides[@]}"; do
  [ "${upstream_during[$t]}" = 0 ] ||
    echo "dns_vs_dnsmasq: warning: $(name_of "$t") sent ${upstream_during[$t]} questions upstream during the rounds: not every cached query was a cache hit" >&2
done
