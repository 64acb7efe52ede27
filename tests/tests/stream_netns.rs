//! VM ports without root: a client speaking QEMU's stream netdev framing (4-byte big-endian
//! length before each frame) on switchyard's unix socket switches with a tap guest: ARP and
//! ping both ways, then it disconnects and a new connection works again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use switchyard_tests::*;

// QEMU's stream framing: ARP and ping with a tap guest, the guest pings back, and after a
// disconnect a new connection (the VM restarted) works the same.
#[test]
fn a_qemu_stream_client_switches_with_a_tap_guest_and_reconnects() {
    require(&["ip", "ping", "python3", "curl"]);
    let dir = TempDir::new("systrm");
    let (sw, g) = (Netns::new("s"), Netns::new("g"));
    let socket = dir.file("vm1.sock");
    let xml = dir.write(
        "net.xml",
        "<network><name>vms</name><ip address='192.168.122.1' prefix='24'/></network>",
    );
    let tap = g.tap_arg("eth0", "52:54:00:5e:00:0a");
    let mut sy = Switchyard::start_in(
        Some(&sw),
        &[
            "run",
            &xml,
            "--json",
            "--tap",
            &tap,
            "--stream",
            &socket,
            "--stream",
            "tcp:127.0.0.1:5555",
            "--metrics",
            "127.0.0.1:9108",
        ],
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
    // QEMU's older -netdev socket: the same framing over loopback TCP.
    let vm = sw.must(&[
        "timeout",
        "20",
        "python3",
        "-c",
        QEMU_LIKE_CLIENT,
        "tcp:127.0.0.1:5555",
        "192.168.122.10",
        "0",
        "192.168.122.21",
    ]);
    assert_eq!(vm.trim(), "52:54:00:5e:00:0a");
    // Prometheus metrics over HTTP on loopback, per port and engine-wide.
    let metrics = sw.must(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://127.0.0.1:9108/metrics",
    ]);
    assert!(
        metrics.contains("# TYPE switchyard_port_rx_packets_total counter")
            && metrics.contains("switchyard_port_rx_packets_total{network=\"vms\",port=\"eth0@")
            && metrics.contains("switchyard_gateway_arp_replies_total{network=\"vms\"}")
            && metrics.contains("switchyard_ports{network=\"vms\"} 3"),
        "{metrics}"
    );
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

/// Connects to the stream socket argv[1] and never reads: a stuck VM. Holds for argv[2] s.
const STUCK_VM: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.connect(sys.argv[1])
print("connected", flush=True)
time.sleep(float(sys.argv[2]))
"#;

// A VM that stops reading never blocks the engine: frames for it queue (bounded), then are
// dropped and counted, while the other ports carry on.
#[test]
fn a_stuck_vm_costs_drops_not_the_switch() {
    require(&["ip", "ping", "python3"]);
    let dir = TempDir::new("systk");
    let (sw, g) = (Netns::new("s"), Netns::new("g"));
    let socket = dir.file("stuck.sock");
    let xml = dir.write(
        "net.xml",
        "<network><name>vms</name><ip address='192.168.122.1' prefix='24'/></network>",
    );
    let tap = g.tap_arg("eth0", "52:54:00:5e:00:0b");
    let mut sy = Switchyard::start_in(
        Some(&sw),
        &["run", &xml, "--json", "--tap", &tap, "--stream", &socket],
    );
    g.set_static_address("eth0", "192.168.122.10/24", None);
    let _stuck = g.spawn(&["python3", "-c", STUCK_VM, &socket, "30"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    // 3000 broadcast datagrams of 1.4 KB (4 MB) are flooded to the stuck VM too.
    g.must(&[
        "python3",
        "-c",
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)\n\
         for _ in range(3000): s.sendto(b'x' * 1400, ('192.168.122.255', 9))",
    ]);
    // The switch still answers at once.
    g.must(&["ping", "-c", "3", "-i", "0.2", "-W", "1", "192.168.122.1"]);
    let stats = sy.stop_json();
    let ports = stats["ports"].as_array().unwrap();
    let stuck = ports
        .iter()
        .find(|p| p[1]["name"].as_str().unwrap().ends_with("(stream)"))
        .unwrap();
    assert!(
        stuck[1]["counters"]["drop_tx_error"].as_u64().unwrap() > 0,
        "{stats}"
    );
}
