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
