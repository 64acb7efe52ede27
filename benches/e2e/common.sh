# shellcheck shell=bash
# Pieces the end-to-end benchmark scripts share; each script sources this file.

# values...: prints "median min max"
stats() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {m=(NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2; printf "%s %s %s\n", m, v[1], v[NR]}'; }

# A TCP server for connection-rate runs: accept, read one byte, close; runs until killed.
# python3 -c "$conn_server" ADDR PORT
conn_server='
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(128)
while True:
    c, _ = s.accept()
    try:
        c.settimeout(5)
        c.recv(1)
    except OSError:
        pass
    c.close()
'
# N sequential short connections, stopping early after BUDGET seconds; prints connections/s.
# python3 -c "$conn_client" HOST PORT N BUDGET
conn_client='
import socket, sys, time
host, port, n, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
done = 0
t0 = time.perf_counter()
for _ in range(n):
    if time.perf_counter() - t0 > budget:
        break
    c = socket.create_connection((host, port), timeout=5)
    c.sendall(b"x")
    while c.recv(4096):
        pass
    c.close()
    done += 1
dt = time.perf_counter() - t0
if done < n:
    print(f"warning: only {done}/{n} connections in {budget:.0f} s", file=sys.stderr)
print(f"{done / dt:.0f}")
'

# P values...: prints the P-th percentile (nearest rank: the ceil(P/100*N)-th smallest value).
pctl() {
  local p=$1
  shift
  printf '%s\n' "$@" | sort -g | awk -v p="$p" '{v[NR]=$1} END {
    if (NR == 0) exit 1
    i = int(p / 100 * NR); if (i < p / 100 * NR) i++; if (i < 1) i = 1
    print v[i] }'
}

# TOOL=PACKAGE...: installs with apt-get, quietly, the packages of the tools not on PATH (as root).
need_tools() {
  local pair missing=()
  for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null 2>&1 || missing+=("${pair#*=}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing ${missing[*]}; run as root so they can be installed" >&2
    return 1
  fi
  echo "installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}
