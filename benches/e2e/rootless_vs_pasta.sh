#!/usr/bin/env bash
# switchyard's socket NAT versus pasta and slirp4netns: three user-mode NAT engines that give a
# network namespace internet-style access through the host's own sockets, in one run,
# interleaved.
#
# Topology, the same for the three engines:
#   "host" namespace (lo up; plus a veth pair ext0/ext0p with 192.0.2.2/24 and no default route,
#   only because pasta needs an interface to copy its configuration from; nothing is routed out
#   of it): the engines run here, so their host sockets live here, and so do the servers, on
#   127.0.0.1 (iperf3 -s, and an accept-and-close TCP server).
#   One "guest" namespace per engine, holding the engine's tap0 at 192.168.122.x/24:
#     switchyard  run XML --tap tap0@GUEST, <forward mode='nat'/> (socket NAT) with
#                 <sy:host-loopback/>; the guest sets 192.168.122.10/24, gateway .1
#     pasta       --config-net --netns /run/netns/GUEST: 192.168.122.10/24, gateway .1 (pasta
#                 maps connections to the gateway address to the host's loopback by default)
#     slirp4netns --configure --cidr=192.168.122.0/24: guest .100, gateway .2 (host loopback
#                 through the gateway is slirp4netns' default)
#   In every guest, GATEWAY:P reaches the host namespace's 127.0.0.1:P.
# For each MTU in MTUS (default 1500 and 65520, the same for all engines) the engines are
# started, and for each of ROUNDS rounds each engine in turn is measured: iperf3 TCP one stream
# guest->host and host->guest (-R), DURATION seconds, Gbps as the receiver counted it; and new
# TCP connections per second (CONNS sequential connect, send a byte, read until the server
# closes, close; bounded by count and by a 50 s budget), and the same with PAR parallel clients
# sharing PCONNS connections (PAR=8, PCONNS=8*CONNS by default; PAR=1 skips it; the
# accept-and-close server runs one process per core, so it is not what limits them). Then it
# prints median (min-max) per engine and the ratios switchyard/pasta and switchyard/slirp4netns
# of the medians.
# An engine that fails to start or to complete a measurement is reported (with its log) and
# dropped for that MTU; the others go on, and the script exits 1 at the end.
# All traffic stays on the loopback of a namespace this script creates and on the taps of the
# guest namespaces it creates; no engine is given a DNS upstream (switchyard --resolv-conf
# /dev/null, pasta -D none, slirp4netns --disable-dns); it removes everything on exit.
# Usage: sudo [ROUNDS=3] [DURATION=5] [CONNS=2000] [PAR=8] [PCONNS=8*CONNS] [MTUS="1500 65520"]
#             [ENGINES="switchyard pasta slirp4netns"] [SWITCHYARD=path] [SY_ARGS="--workers 2"]
#             benches/e2e/rootless_vs_pasta.sh
# SY_ARGS: options added to switchyard's `run`. STREAMS=N: iperf3 -P N (default 1).
# SWITCHYARD: the binary to measure; unset, the script builds target/release/switchyard
# (cargo build --release -p switchyard, honouring CARGO_TARGET_DIR).
# Runs as root (to create the namespaces); pasta is run with --runas 0 because, started as
# root, it would otherwise drop to nobody, which cannot join the guest namespace.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/e2e/common.sh
. benches/e2e/common.sh
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONNS=${CONNS:-2000}
PAR=${PAR:-8}
PCONNS=${PCONNS:-$((8 * CONNS))}
SY_ARGS=${SY_ARGS:-}
STREAMS=${STREAMS:-1}
MTUS=${MTUS:-1500 65520}
ENGINES=${ENGINES:-switchyard pasta slirp4netns}
die() { echo "rootless_vs_pasta: $*" >&2; exit 1; }
for v in "$ROUNDS" "$DURATION" "$CONNS" "$PAR" "$PCONNS" "$STREAMS"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || die "ROUNDS, DURATION, CONNS, PAR, PCONNS and STREAMS must be positive integers"
done
read -r -a mtus <<<"$MTUS"
for m in "${mtus[@]}"; do
  if ! [[ $m =~ ^[0-9]+$ ]] || [ "$m" -lt 1280 ] || [ "$m" -gt 65520 ]; then
    die "MTU $m: 1280 to 65520"
  fi
done
read -r -a engines <<<"$ENGINES"
[ ${#engines[@]} -gt 0 ] || die "ENGINES is empty"
for e in "${engines[@]}"; do
  case "$e" in switchyard|pasta|slirp4netns) ;; *) die "unknown engine $e" ;; esac
done
has_engine() { [[ " ${engines[*]} " == *" $1 "* ]]; }
[ "$(id -u)" -eq 0 ] || die "run as root (it creates network namespaces)"

# the tools, from Debian's packages when missing
declare -A package_of=([ip]=iproute2 [ss]=iproute2 [iperf3]=iperf3 [python3]=python3
  [timeout]=coreutils [awk]=gawk)
has_engine pasta && package_of[pasta]=passt
has_engine slirp4netns && package_of[slirp4netns]=slirp4netns
missing=()
for tool in "${!package_of[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${package_of[$tool]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "rootless_vs_pasta: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2046 # package names, deduplicated
  apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi

SY=""
if has_engine switchyard; then
  if [ -n "${SWITCHYARD:-}" ]; then
    SY=$SWITCHYARD
  else
    cargo build --release --quiet -p switchyard
    SY=${CARGO_TARGET_DIR:-target}/release/switchyard
  fi
  [ -x "$SY" ] || die "no switchyard binary at $SY"
  SY=$(realpath "$SY")
fi

tag="r$$"
HOST="rh-$tag"
CPORT=5300          # the accept-and-close server, on the host's 127.0.0.1
IPORT=5201          # iperf3
tmp=$(mktemp -d /tmp/rootless-vs-pasta-XXXXXX)
ns=()               # every namespace made, removed on exit
servers=()          # background servers, killed on exit
declare -A eng_pid=() gw=() guest=()
failed=0
cleanup() {
  local rc=$?
  for e in "${!eng_pid[@]}"; do kill "${eng_pid[$e]}" 2>/dev/null || true; done
  for p in "${servers[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for n in "${ns[@]}"; do ip netns del "$n" 2>/dev/null || true; done
  if [ "$rc" -eq 0 ] && [ "$failed" -eq 0 ]; then rm -rf "$tmp"; else echo "logs kept in $tmp" >&2; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$HOST"; ns+=("$HOST")
ip -n "$HOST" link set lo up
# pasta copies addresses and routes from a host interface and refuses to start with none but
# lo; this pair is all it gets (both ends here, no default route: nothing can leave)
ip -n "$HOST" link add ext0 type veth peer name ext0p
ip -n "$HOST" addr add 192.0.2.2/24 dev ext0
ip -n "$HOST" link set ext0 up
ip -n "$HOST" link set ext0p up

# waits (bounded) until something listens on TCP port $1 in the host namespace
wait_listen() {
  for _ in $(seq 50); do
    [ -n "$(ip netns exec "$HOST" ss -Hltn "sport = :$1")" ] && return 0
    sleep 0.1
  done
  die "no listener on port $1 in $HOST"
}

ip netns exec "$HOST" python3 -c "$conn_server" 127.0.0.1 "$CPORT" "$(nproc)" &
servers+=($!)
wait_listen "$CPORT"

short() { case "$1" in switchyard) echo sy ;; pasta) echo pa ;; slirp4netns) echo sl ;; esac; }

# waits (bounded, $3 tenths of a second) until engine $1's guest has a default route via $2
wait_guest_route() {
  local e=$1 g=${guest[$1]}
  for _ in $(seq "$3"); do
    ip -n "$g" -4 route show default 2>/dev/null | grep -q "via $2 " && return 0
    kill -0 "${eng_pid[$e]}" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# starts engine $1 at MTU $2 in a fresh guest namespace; returns non-zero (log printed) on failure
start_engine() {
  local e=$1 mtu=$2 s g log
  s=$(short "$e")
  g="rg-$s-$tag"
  log="$tmp/$e-$mtu.log"
  ip netns add "$g"; ns+=("$g")
  ip -n "$g" link set lo up
  guest[$e]=$g
  case "$e" in
    switchyard)
      gw[$e]=192.168.122.1
      cat >"$tmp/sy-$mtu.xml" <<EOF
<network xmlns:sy='urn:switchyard:network:1'>
  <name>bench</name>
  <forward mode='nat'/>
  <mtu size='$mtu'/>
  <ip address='192.168.122.1' netmask='255.255.255.0'/>
  <sy:host-loopback/>
</network>
EOF
      mkdir -p "$tmp/state"
      # shellcheck disable=SC2086 # SY_ARGS is a list of options
      ip netns exec "$HOST" "$SY" run "$tmp/sy-$mtu.xml" --tap "tap0@/run/netns/$g" \
        --control "$tmp/sy.sock" --state-dir "$tmp/state" --resolv-conf /dev/null $SY_ARGS 2>"$log" &
      eng_pid[$e]=$!
      local ok=0
      for _ in $(seq 100); do
        grep -q "running with" "$log" && { ok=1; break; }
        kill -0 "${eng_pid[$e]}" 2>/dev/null || break
        sleep 0.1
      done
      if [ "$ok" = 1 ]; then
        ok=0
        for _ in $(seq 50); do
          ip -n "$g" link show tap0 >/dev/null 2>&1 && { ok=1; break; }
          sleep 0.1
        done
      fi
      if [ "$ok" = 1 ]; then
        ip -n "$g" addr add 192.168.122.10/24 dev tap0
        ip -n "$g" link set tap0 up mtu "$mtu"
        ip -n "$g" route add default via "${gw[$e]}"
      fi
      ;;
    pasta)
      gw[$e]=192.168.122.1
      ip netns exec "$HOST" pasta --config-net -f -q -4 --runas 0 -D none \
        -t none -u none -T none -U none --mtu "$mtu" -i ext0 -I tap0 \
        -a 192.168.122.10 -n 24 -g "${gw[$e]}" --netns "/run/netns/$g" >"$log" 2>&1 &
      eng_pid[$e]=$!
      ;;
    slirp4netns)
      gw[$e]=192.168.122.2
      ip netns exec "$HOST" slirp4netns --configure --mtu="$mtu" --disable-dns \
        --cidr=192.168.122.0/24 --netns-type=path "/run/netns/$g" tap0 >"$log" 2>&1 &
      eng_pid[$e]=$!
      ;;
  esac
  if ! wait_guest_route "$e" "${gw[$e]}" 100; then
    echo "rootless_vs_pasta: $e (MTU $mtu) did not come up; its log ($log):" >&2
    grep -v 'Failed to send .* to syslog' "$log" | tail -20 >&2 || true
    return 1
  fi
  local got
  got=$(ip -n "$g" -o link show tap0 | awk '{for (i = 1; i < NF; i++) if ($i == "mtu") print $(i+1)}')
  [ "$got" = "$mtu" ] || { echo "rootless_vs_pasta: $e: tap0 has MTU $got, not $mtu" >&2; return 1; }
}

# stops engine $1 (TERM, then KILL after 5 s) and removes its guest namespace
stop_engine() {
  local e=$1 p=${eng_pid[$1]:-}
  if [ -n "$p" ]; then
    kill "$p" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
    unset "eng_pid[$e]"
  fi
  if [ -n "${guest[$e]:-}" ]; then ip netns del "${guest[$e]}" 2>/dev/null || true; unset "guest[$e]"; fi
}

gbps=""
iperf_gbps() { # engine [extra client args, e.g. -R]; sets gbps (the server is this shell's child)
  local e=$1 srv out rc=0
  ip netns exec "$HOST" iperf3 -s -1 -B 127.0.0.1 -p "$IPORT" >/dev/null 2>&1 &
  srv=$!
  servers+=("$srv")
  wait_listen "$IPORT"
  out=$(timeout $((DURATION + 30)) ip netns exec "${guest[$e]}" \
    iperf3 -c "${gw[$e]}" -p "$IPORT" -t "$DURATION" -P "$STREAMS" -J "${@:2}") || rc=$?
  if [ "$rc" -ne 0 ]; then
    kill "$srv" 2>/dev/null || true
    wait "$srv" 2>/dev/null || true
    [ "$rc" -eq 124 ] && echo "iperf3 timed out after $((DURATION + 30)) s" >&2
    echo "$out" | grep '"error"' >&2 || true
    return 1
  fi
  wait "$srv" 2>/dev/null || true
  local dir="guest->host"
  [ "${2:-}" = -R ] && dir="host->guest"
  gbps=$(python3 -c "$iperf_result" "$e, MTU $mtu, $dir" <<<"$out")
}
# iperf3 -J on stdin: prints the receiver's Gbps; warns on stderr about 1 s intervals that
# carried nothing (a stall)
iperf_result='
import json, sys
j = json.load(sys.stdin)
print("%.2f" % (j["end"]["sum_received"]["bits_per_second"] / 1e9))
iv = [i["sum"]["bytes"] for i in j.get("intervals", [])]
zero = sum(1 for b in iv if b == 0)
if zero:
    print("warning: %s: %d of %d iperf3 intervals carried nothing (stalled)" % (sys.argv[1], zero, len(iv)),
          file=sys.stderr)
'
conns_per_s() { # engine [count [parallel clients]]
  timeout 60 ip netns exec "${guest[$1]}" python3 -c "$conn_client" "${gw[$1]}" "$CPORT" "${2:-$CONNS}" 50 "${3:-1}"
}

declare -A res=() state=()   # res[mtu,engine,metric] = values per round; state[mtu,engine] = ok|failed
fail() { # engine mtu what
  echo "rootless_vs_pasta: $1 (MTU $2): $3" >&2
  state[$2,$1]=failed
  failed=1
  if [ "$3" != "did not start" ] && [ -n "${eng_pid[$1]:-}" ] && ! kill -0 "${eng_pid[$1]}" 2>/dev/null; then
    echo "rootless_vs_pasta: $1 has exited; its log ($tmp/$1-$2.log):" >&2
    grep -v 'Failed to send .* to syslog' "$tmp/$1-$2.log" | tail -20 >&2 || true
  fi
}
for mtu in "${mtus[@]}"; do
  live=()
  for e in "${engines[@]}"; do
    if start_engine "$e" "$mtu"; then
      # warm up, and check that the guest reaches the host's loopback through the gateway
      if conns_per_s "$e" 3 >/dev/null; then
        state[$mtu,$e]=ok; live+=("$e")
      else
        fail "$e" "$mtu" "the guest cannot reach ${gw[$e]}:$CPORT (the host's 127.0.0.1:$CPORT)"
      fi
    else
      fail "$e" "$mtu" "did not start"
    fi
  done
  for r in $(seq "$ROUNDS"); do
    line="MTU $mtu round $r:"
    for e in "${live[@]}"; do
      [ "${state[$mtu,$e]}" = ok ] || continue
      if ! iperf_gbps "$e"; then fail "$e" "$mtu" "iperf3 guest->host failed"; continue; fi
      up=$gbps
      if ! iperf_gbps "$e" -R; then fail "$e" "$mtu" "iperf3 host->guest failed"; continue; fi
      down=$gbps
      if ! cps=$(conns_per_s "$e"); then fail "$e" "$mtu" "connection test failed or timed out"; continue; fi
      pcps=""
      if [ "$PAR" -gt 1 ] && ! pcps=$(conns_per_s "$e" "$PCONNS" "$PAR"); then
        fail "$e" "$mtu" "parallel connection test failed or timed out"; continue
      fi
      res[$mtu,$e,up]+="$up "; res[$mtu,$e,down]+="$down "; res[$mtu,$e,cps]+="$cps "
      [ -n "$pcps" ] && res[$mtu,$e,pcps]+="$pcps "
      line+=" $e up $up Gbps, down $down Gbps, $cps conn/s, ${pcps:--} conn/s x$PAR;"
    done
    echo "$line" >&2
  done
  for e in "${engines[@]}"; do stop_engine "$e"; done
done

median() { # mtu engine metric: the median, or nothing
  # shellcheck disable=SC2086 # the values are space-separated numbers
  [ -n "${res[$1,$2,$3]:-}" ] && stats ${res[$1,$2,$3]} | awk '{print $1}'
  return 0
}
cell() { # mtu engine metric: "median (min-max)"
  local m lo hi
  if ! has_engine "$2"; then echo "-"; return; fi
  if [ -z "${res[$1,$2,$3]:-}" ]; then echo "failed"; return; fi
  # shellcheck disable=SC2086
  read -r m lo hi < <(stats ${res[$1,$2,$3]})
  if [ "${state[$1,$2]}" = ok ]; then echo "$m ($lo-$hi)"; else echo "$m ($lo-$hi), failed later"; fi
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {print (a != "" && b != "" && b > 0) ? sprintf("%.2f", a/b) : "-"}'; }
row() { # label metric mtu
  local s
  s=$(median "$3" switchyard "$2")
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$1" "$3" \
    "$(cell "$3" switchyard "$2")" "$(cell "$3" pasta "$2")" "$(cell "$3" slirp4netns "$2")" \
    "$(ratio "$s" "$(median "$3" pasta "$2")")" "$(ratio "$s" "$(median "$3" slirp4netns "$2")")"
}
ver() { dpkg-query -W -f '${Version}' "$1" 2>/dev/null || echo "?"; }
echo
vers=""
if has_engine switchyard; then
  if [ -n "${SWITCHYARD:-}" ]; then vers+=" switchyard $SY${SY_ARGS:+ $SY_ARGS},"
  else vers+=" switchyard $(git rev-parse --short HEAD 2>/dev/null || echo '?')${SY_ARGS:+ $SY_ARGS},"; fi
fi
has_engine pasta && vers+=" passt $(ver passt),"
has_engine slirp4netns && vers+=" slirp4netns $(ver slirp4netns),"
echo "$(date -u +%Y-%m-%d) $(nproc) cores, $(uname -r),$vers iperf3 $(iperf3 --version | awk 'NR==1{print $2}'), $ROUNDS rounds x ${DURATION}s, $STREAMS TCP stream(s), $CONNS conns, $PCONNS conns over $PAR clients, interleaved"
echo "| metric | MTU | switchyard median (min-max) | pasta median (min-max) | slirp4netns median (min-max) | switchyard/pasta | switchyard/slirp4netns |"
echo "|---|---|---|---|---|---|---|"
for mtu in "${mtus[@]}"; do
  row "TCP guest->host, Gbps" up "$mtu"
  row "TCP host->guest (-R), Gbps" down "$mtu"
  row "new TCP connections/s" cps "$mtu"
  [ "$PAR" -gt 1 ] && row "new TCP connections/s, $PAR parallel clients" pcps "$mtu"
done
[ "$failed" -eq 0 ] || exit 1
