//! VM ports without root: a client speaking QEMU's stream netdev framing (4-byte big-endian
//! length before each frame) on switchyard's unix socket switches with a tap guest: ARP and
//! ping both ways, then it disconnects and a new connection works again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use switchyard_tests::*;

/// A minimal VM at 52:54:00:5e:00:01 / 192.168.122.20 on the stream socket argv[1]: resolves
/// argv[2] by ARP, pings it (ICMP echo, checks the reply), answers ARP and echo for itself
/// meanwhile, and prints the peer's MAC. Exits 1 on a timeout (bounded: 5 s).
const QEMU_LIKE_CLIENT: &str = r#"
import socket, struct, sys, time
path, target = sys.argv[1], socket.inet_aton(sys.argv[2])
me_mac, me_ip = bytes.fromhex("5254005e0001"), socket.inet_aton("192.168.122.20")
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
s.settimeout(0.2)
buf = b""
def send(frame):
    s.sendall(struct.pack("!I", len(frame)) + frame)
def frames():
    global buf
    try:
        data = s.recv(65536)
        if not data:
            sys.exit("closed")
        buf += data
    except socket.timeout:
        pass
    while len(buf) >= 4:
        n = struct.unpack("!I", buf[:4])[0]
        if len(buf) < 4 + n:
            break
        yield buf[4:4 + n]
        buf = buf[4 + n:]
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16: t = (t & 0xffff) + (t >> 16)
    return ~t & 0xffff
def arp(op, dst_mac, tha, tpa):
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, me_mac, me_ip, tha, tpa)
    return dst_mac + me_mac + b"\x08\x06" + body
def ipv4(dst_mac, dst_ip, proto, payload):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0, me_ip, dst_ip)
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return dst_mac + me_mac + b"\x08\x00" + h + payload
def icmp(kind, ident, seq, data):
    m = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data
    return m[:2] + struct.pack("!H", csum(m)) + m[4:]
def answer(f):
    # Be a good neighbour: answer ARP and ping for ourselves.
    if f[12:14] == b"\x08\x06" and f[38:42] == me_ip and f[20:22] == b"\x00\x01":
        send(arp(2, f[6:12], f[22:28], f[28:32]))
    elif f[12:14] == b"\x08\x00" and f[30:34] == me_ip and f[23] == 1 and f[34] == 8:
        send(ipv4(f[6:12], f[26:30], 1, icmp(0, *struct.unpack("!HH", f[38:42]), f[42:])))
deadline = time.time() + 5
peer = None
send(arp(1, b"\xff" * 6, bytes(6), target))
while peer is None:
    if time.time() > deadline: sys.exit("no ARP reply")
    for f in frames():
        if f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02" and f[28:32] == target:
            peer = f[22:28]
        else:
            answer(f)
send(ipv4(peer, target, 1, icmp(8, 0x77, 1, b"switchyard")))
while True:
    if time.time() > deadline: sys.exit("no echo reply")
    got = False
    for f in frames():
        if f[12:14] == b"\x08\x00" and f[26:30] == target and f[23] == 1 and f[34] == 0:
            got = True
        else:
            answer(f)
    if got: break
# Stay a moment so the other side can ping us, answering.
if len(sys.argv) > 3:
    end = time.time() + float(sys.argv[3])
    while time.time() < end:
        for f in frames():
            answer(f)
print(peer.hex(":"))
"#;

// QEMU's stream framing: ARP and ping with a tap guest, the guest pings back, and after a
// disconnect a new connection (the VM restarted) works the same.
#[test]
fn a_qemu_stream_client_switches_with_a_tap_guest_and_reconnects() {
    require(&["ip", "ping", "python3"]);
    let dir = TempDir::new("systrm");
    let (sw, g) = (Netns::new("s"), Netns::new("g"));
    let socket = dir.file("vm1.sock");
    let xml = dir.0.join("net.xml");
    std::fs::write(
        &xml,
        "<network><name>vms</name><ip address='192.168.122.1' prefix='24'/></network>",
    )
    .unwrap();
    let tap = g.tap_arg("eth0", "52:54:00:5e:00:0a");
    let xml = xml.display().to_string();
    let mut sy = Switchyard::start_in(
        Some(&sw),
        &["run", &xml, "--json", "--tap", &tap, "--stream", &socket],
    );
    g.set_static_address("eth0", "192.168.122.10/24", None);

    for round in 0..2 {
        // The guest pings the VM while the VM is connected (it answers for 1.5 s).
        let client = std::thread::spawn({
            let socket = socket.clone();
            move || {
                must(&[
                    "timeout",
                    "20",
                    "python3",
                    "-c",
                    QEMU_LIKE_CLIENT,
                    &socket,
                    "192.168.122.10",
                    "1.5",
                ])
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(500));
        g.must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", "192.168.122.20"]);
        let peer = client.join().unwrap();
        assert_eq!(peer.trim(), "52:54:00:5e:00:0a", "round {round}");
        // The gateway answers the VM too.
        let gw = must(&[
            "timeout",
            "20",
            "python3",
            "-c",
            QEMU_LIKE_CLIENT,
            &socket,
            "192.168.122.1",
        ]);
        assert!(gw.trim().starts_with("52:54:00:"), "{gw}");
    }
    let stats = sy.stop_json();
    let rx: u64 = (0..2)
        .map(|i| port_counters(&stats, i)["rx_packets"].as_u64().unwrap())
        .sum();
    assert!(rx > 10, "{stats}");
    assert!(
        !std::path::Path::new(&socket).exists(),
        "the socket goes with the port"
    );
}
