# shellcheck shell=bash
# Pieces the end-to-end benchmark scripts share; each script sources this file.

# values...: prints "median min max"
stats() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {m=(NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2; printf "%s %s %s\n", m, v[1], v[NR]}'; }

# A TCP server for connection-rate runs: accept, read one byte, close; runs until killed.
# With WORKERS > 1 (default 1) that many processes accept on the one listening socket, so the
# server is not what limits parallel clients; the first process forwards SIGTERM to the others,
# and each dies with it (PR_SET_PDEATHSIG) even if it is killed outright.
# python3 -c "$conn_server" ADDR PORT [WORKERS]
conn_server='
import ctypes, os, signal, socket, sys
workers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1024)
children = []
for _ in range(workers - 1):
    pid = os.fork()
    if pid == 0:
        children = []
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(0)
        break
    children.append(pid)
def stop(*_):
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    c, _ = s.accept()
    try:
        c.settimeout(5)
        c.recv(1)
    except OSError:
        pass
    c.close()
'
# N short connections (connect, send a byte, read until close, close), stopping early after
# BUDGET seconds; prints connections/s. With PAR > 1 (default 1) PAR processes share the N,
# started together after all are forked: the rate is all their connections over the time from
# the start to the last one's end.
# python3 -c "$conn_client" HOST PORT N BUDGET [PAR]
conn_client='
import os, socket, sys, time
host, port, n, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
par = int(sys.argv[5]) if len(sys.argv) > 5 else 1
def run(count, t0):
    done = 0
    for _ in range(count):
        if time.perf_counter() - t0 > budget:
            break
        c = socket.create_connection((host, port), timeout=5)
        c.sendall(b"x")
        while c.recv(4096):
            pass
        c.close()
        done += 1
    return done, time.perf_counter()
if par <= 1:
    t0 = time.perf_counter()
    done, t1 = run(n, t0)
else:
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pids = []
    for i in range(par):
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.close(res_r)
            os.read(go_r, 1)
            t0 = time.perf_counter()
            code = 0
            try:
                done, t1 = run(n // par + (i < n % par), t0)
            except OSError as e:
                print(f"worker {i}: {e}", file=sys.stderr)
                done, t1, code = 0, time.perf_counter(), 1
            os.write(res_w, f"{done} {t1!r}\n".encode())
            os._exit(code)
        pids.append(pid)
    os.close(go_r)
    os.close(res_w)
    t0 = time.perf_counter()
    os.write(go_w, b"g" * par)
    os.close(go_w)
    failed = sum(os.waitpid(pid, 0)[1] != 0 for pid in pids)
    rows = [line.split() for line in os.read(res_r, 1 << 16).decode().splitlines()]
    if failed or len(rows) != par:
        sys.exit(f"{failed} of {par} clients failed")
    done = sum(int(r[0]) for r in rows)
    t1 = max(float(r[1]) for r in rows)
dt = t1 - t0
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

# wait_switchyard PID LOG: waits (up to 10 s) until the `switchyard run` with that PID, writing
# its stderr to LOG, says it is running; if it exits or never says so, prints LOG and fails.
wait_switchyard() {
  local pid=$1 log=$2
  for _ in $(seq 100); do
    grep -q " running with " "$log" && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  cat "$log" >&2
  echo "switchyard did not start (log above)" >&2
  exit 1
}

# guest_tap_up NS: waits until switchyard's tap eth0 is in namespace NS, and brings it up.
guest_tap_up() {
  for _ in $(seq 50); do ip -n "$1" link show eth0 >/dev/null 2>&1 && break; sleep 0.1; done
  ip -n "$1" link set eth0 up
}
