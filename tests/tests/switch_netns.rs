//! The switch end to end: guests in network namespaces, taps created by one running
//! `switchyard run`, real `ping` and `iperf3`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use switchyard_tests::{
    Netns, Switchyard, must, port_counters, require, run, switchyard_bin, unique_name,
};

const MACS: [&str; 3] = [
    "52:54:00:5e:00:01",
    "52:54:00:5e:00:02",
    "52:54:00:5e:00:03",
];

fn three_guests() -> ([Netns; 3], Switchyard) {
    let guests = [Netns::new("g"), Netns::new("g"), Netns::new("g")];
    let taps = switchyard_tests::tap_args(&guests, &MACS);
    let sy = Switchyard::start(&[
        "run", "--json", "--tap", &taps[0], "--tap", &taps[1], "--tap", &taps[2],
    ]);
    for (i, ns) in guests.iter().enumerate() {
        ns.must(&[
            "ip",
            "addr",
            "add",
            &format!("192.168.122.{}/24", 10 + i),
            "dev",
            "eth0",
        ]);
        let link = ns.must(&["ip", "-br", "link", "show", "dev", "eth0"]);
        assert!(
            link.contains(MACS[i]),
            "kernel-side MAC was not set: {link}"
        );
        assert!(link.contains("UP"), "tap not up: {link}");
    }
    (guests, sy)
}

/// Two guests, 192.168.122.10 and .11, on one `switchyard run` whose control socket is in
/// `dir`: the guests, the socket's path, the switch.
fn two_guests_with_control(dir: &switchyard_tests::TempDir) -> ([Netns; 2], String, Switchyard) {
    let guests = [Netns::new("g"), Netns::new("g")];
    let control = dir.file("ctl.sock");
    let taps = switchyard_tests::tap_args(&guests, &MACS[..2]);
    let sy = Switchyard::start(&[
        "run",
        "--json",
        "--control",
        &control,
        "--tap",
        &taps[0],
        "--tap",
        &taps[1],
    ]);
    for (ns, ip) in guests
        .iter()
        .zip(["192.168.122.10/24", "192.168.122.11/24"])
    {
        ns.set_static_address("eth0", ip, None);
    }
    (guests, control, sy)
}

#[test]
fn three_guests_ping_each_other_and_the_gateway_over_ipv4_and_ipv6_link_local() {
    require(&["ip", "ping"]);
    let (guests, mut sy) = three_guests();
    for (from, ns) in guests.iter().enumerate() {
        for to in 0..3 {
            if to != from {
                let dst = format!("192.168.122.{}", 10 + to);
                ns.must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", &dst]);
            }
        }
    }
    for ns in &guests {
        ns.must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", "192.168.122.1"]);
    }
    let link_locals: Vec<String> = guests.iter().map(|g| g.wait_link_local("eth0")).collect();
    for (from, ns) in guests.iter().enumerate() {
        for (to, ll) in link_locals.iter().enumerate() {
            if to != from {
                ns.must(&[
                    "ping",
                    "-6",
                    "-c",
                    "2",
                    "-i",
                    "0.2",
                    "-W",
                    "2",
                    &format!("{ll}%eth0"),
                ]);
            }
        }
    }
    let stats = sy.stop_json();
    assert_eq!(stats["fdb_entries"], 3, "{stats}");
    assert!(
        stats["engine"]["gateway"]["echo_replies"].as_u64().unwrap() >= 6,
        "{stats}"
    );
    assert!(
        stats["engine"]["gateway"]["arp_replies"].as_u64().unwrap() >= 3,
        "{stats}"
    );
    for i in 0..3 {
        let c = port_counters(&stats, i);
        assert!(c["rx_packets"].as_u64().unwrap() >= 8, "port {i}: {c}");
        assert_eq!(c["drop_runt"], 0);
    }
}

#[test]
fn learned_unicast_reaches_only_its_port_under_iperf3_load() {
    require(&["ip", "ping", "iperf3"]);
    let (guests, mut sy) = three_guests();
    let [a, b, c] = &guests;
    // Let the switch learn every MAC (ARP both ways), then measure what the third guest sees.
    a.must(&["ping", "-c", "1", "-W", "2", "192.168.122.11"]);
    c.must(&["ping", "-c", "1", "-W", "2", "192.168.122.10"]);
    c.must(&["ping", "-c", "1", "-W", "2", "192.168.122.11"]);
    let _server = b.spawn(&["iperf3", "-s", "-1"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (_, before) = c.rx_counters("eth0");
    let out = a.must(&["iperf3", "-c", "192.168.122.11", "-t", "2", "-J"]);
    let (_, after) = c.rx_counters("eth0");

    let report: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    let sent = report["end"]["sum_sent"]["bytes"]
        .as_u64()
        .expect("bytes sent");
    assert!(sent > 10_000_000, "iperf3 moved too little: {sent} bytes");
    // Only stray multicast (IPv6 neighbour discovery, MLD) may reach the third guest.
    let leaked = after - before;
    assert!(
        leaked < 64 * 1024,
        "third guest saw {leaked} bytes of a {sent}-byte flow"
    );

    let stats = sy.stop_json();
    let tx_c = port_counters(&stats, 2)["tx_bytes"].as_u64().unwrap();
    assert!(
        tx_c < sent / 100,
        "switch sent {tx_c} bytes to the third port"
    );
    assert!(
        stats["engine"]["forwarded"].as_u64().unwrap() > 1000,
        "{stats}"
    );
}

#[test]
fn stopping_removes_created_taps_and_keeps_attached_ones() {
    require(&["ip"]);
    let guest = Netns::new("g");
    let created_here = unique_name("syc");
    let persistent = unique_name("syp");
    must(&["ip", "tuntap", "add", "dev", &persistent, "mode", "tap"]);
    let in_ns = guest.tap_arg("eth0", MACS[0]);

    for signal in ["TERM", "INT"] {
        let mut sy = Switchyard::start(&[
            "run",
            "--tap",
            &in_ns,
            "--tap",
            &created_here,
            "--tap",
            &persistent,
        ]);
        assert!(guest.has_link("eth0"));
        assert!(
            run(&["ip", "link", "show", "dev", &created_here])
                .status
                .success()
        );
        let (ok, _, log) = sy.stop_with(signal);
        assert!(ok, "SIG{signal} is a clean stop:\n{log}");
        assert!(
            log.contains("(attached)") && log.contains("(created)"),
            "{log}"
        );
        assert!(
            !guest.has_link("eth0"),
            "tap in the namespace left behind after SIG{signal}"
        );
        assert!(
            !run(&["ip", "link", "show", "dev", &created_here])
                .status
                .success(),
            "created tap left behind after SIG{signal}"
        );
        assert!(
            run(&["ip", "link", "show", "dev", &persistent])
                .status
                .success(),
            "an attached persistent tap must survive"
        );
    }
    must(&["ip", "tuntap", "del", "dev", &persistent, "mode", "tap"]);
    let name = guest.name.clone();
    drop(guest);
    assert!(!must(&["ip", "netns", "list"]).contains(&name));
}

#[test]
fn a_missing_namespace_is_a_clear_error() {
    require(&["ip"]);
    let ns = unique_name("synone");
    let out = run(&[
        switchyard_tests::switchyard_bin().to_str().unwrap(),
        "run",
        "--tap",
        &format!("eth0@{ns}"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&ns), "{err}");
}

/// The README's main job: `switchyard demo` builds two guests and an outside host, gives the
/// guests addresses by DHCP, resolves one by name from the other, fetches a page from the
/// outside through NAT (with its conntrack entry and what the outside saw), measures between
/// the guests, and leaves nothing behind.
#[test]
fn the_demo_runs_end_to_end_and_leaves_nothing_behind() {
    require(&[
        "ip", "busybox", "ping", "iperf3", "curl", "tcpdump", "python3",
    ]);
    let out = run(&[switchyard_bin().to_str().unwrap(), "demo"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for needle in [
        "lease of 192.168.122.",
        "Name:\tvm2",
        "0% packet loss",
        "hello from the outside",
        "src=192.168.122.2 dst=203.0.113.1",
        "IP 203.0.113.2.",
        "== DHCP leases",
        "Removed the namespaces",
    ] {
        assert!(stdout.contains(needle), "{needle}: {stdout}");
    }
    // Its namespaces are sy-demo-PID-vmN.
    let at = stdout
        .find("sy-demo-")
        .expect("the demo names its namespaces");
    let tag: String = stdout[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let tag = tag.trim_end_matches(|c: char| c != '-');
    let left = must(&["ip", "netns", "list"]);
    assert!(!left.contains(tag), "{tag}: {left}");
}

/// USO between taps: the guests' eth0 take UDP segmentation offload (`tx-udp-segmentation:
/// on`), so a `UDP_SEGMENT` send of ten datagrams leaves the guest as ONE 12 042-byte frame
/// (the trace sees one frame, of GSO type UDP), crosses the switch untouched, and the other
/// guest's kernel hands its socket the ten 1200-byte datagrams, intact (RFC 768: boundaries
/// kept).
#[test]
fn a_uso_send_crosses_the_switch_as_one_frame_and_arrives_as_its_datagrams() {
    use switchyard_tests::{
        TempDir, Tracer, USO_SENDER, assert_one_uso_frame, uso_received_from, uso_receiver,
    };
    require(&["ip", "ping", "python3", "ethtool", "ss"]);
    let dir = TempDir::new("syuso");
    let ([a, b], control, mut sy) = two_guests_with_control(&dir);
    for ns in [&a, &b] {
        let features = ns.must(&["ethtool", "-k", "eth0"]);
        assert!(
            features.contains("tx-udp-segmentation: on"),
            "the tap did not take USO:\n{features}"
        );
    }
    a.must(&["ping", "-c", "1", "-W", "2", "192.168.122.11"]);

    let receiver = uso_receiver(&b, "192.168.122.11", 9000);
    let tracer = Tracer::uso(&control);
    a.must(&[
        "timeout",
        "10",
        "python3",
        "-c",
        USO_SENDER,
        "192.168.122.11",
        "9000",
        "40000",
    ]);
    let got = receiver.join().unwrap();
    assert_eq!(got.trim(), uso_received_from("192.168.122.10:40000"));
    assert_one_uso_frame(&tracer.output(), "verdict: forward to port 1");
    let stats = sy.stop_json();
    let (from, to) = (port_counters(&stats, 0), port_counters(&stats, 1));
    assert_eq!(from["drop_offload_unsupported"], 0, "{from}");
    assert_eq!(to["drop_tx_error"], 0, "{to}");
}

/// Opens `argv[2]` connections to the control socket `argv[1]` and as many to the metrics port
/// 127.0.0.1:9108 every 0.25 s for `argv[3]` seconds, and never sends a byte on them.
const IDLE_CLIENTS: &str = r#"
import socket, sys, time
path, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
held = []
end = time.time() + seconds
while time.time() < end:
    for _ in range(count):
        for family, addr in ((socket.AF_UNIX, path), (socket.AF_INET, ("127.0.0.1", 9108))):
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                s.connect(addr)
                held.append(s)
            except OSError:
                s.close()
    time.sleep(0.25)
"#;

/// The datapath's thread never waits on a control or metrics client. Clients that connect and
/// send nothing used to hold every port still for up to 200 ms each (ten of them stopped a
/// ping for two seconds); now a control thread of its own serves them, frames go on, and
/// other clients get their answers.
#[test]
fn idle_control_and_metrics_clients_hold_up_neither_frames_nor_other_requests() {
    require(&["ip", "ping", "python3"]);
    let sw = Netns::new("sw");
    let guests = [Netns::new("g"), Netns::new("g")];
    let dir = switchyard_tests::TempDir::new("idle");
    let control = dir.file("sy.sock");
    let taps = switchyard_tests::tap_args(&guests, &MACS[..2]);
    let mut sy = Switchyard::start_in(
        Some(&sw),
        &[
            "run",
            "--json",
            "--control",
            &control,
            "--metrics",
            "127.0.0.1:9108",
            "--tap",
            &taps[0],
            "--tap",
            &taps[1],
        ],
    );
    guests[0].set_static_address("eth0", "192.168.122.10/24", None);
    guests[1].set_static_address("eth0", "192.168.122.11/24", None);
    guests[0].must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", "192.168.122.11"]);

    let idle = sw.spawn(&["python3", "-c", IDLE_CLIENTS, &control, "10", "4"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let asked = std::time::Instant::now();
    let stats = switchyard_tests::stats_of(&control);
    let took = asked.elapsed();
    assert!(stats["ports"].is_array(), "{stats}");
    assert!(
        took.as_millis() < 1000,
        "stats took {took:?} among idle clients"
    );
    let out = guests[0].must(&[
        "ping",
        "-c",
        "200",
        "-i",
        "0.01",
        "-W",
        "1",
        "192.168.122.11",
    ]);
    drop(idle);
    assert!(out.contains(" 0% packet loss"), "{out}");
    let max_ms: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("rtt min/avg/max/mdev = "))
        .and_then(|l| l.split('/').nth(2))
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no round trip in {out}"));
    // Each idle client used to hold the datapath 200 ms; a loaded machine's own stalls are
    // shorter.
    assert!(
        max_ms < 150.0,
        "a ping waited {max_ms} ms behind idle clients:\n{out}"
    );
    // A scrape still gets its answer once the idle ones are gone.
    let scrape = sw.must(&[
        "python3",
        "-c",
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9108/metrics', timeout=5).read().decode())",
    ]);
    assert!(scrape.contains("switchyard_"), "{scrape}");
    let stats = sy.stop_json();
    assert_eq!(port_counters(&stats, 0)["drop_runt"], 0);
}

/// `stats` shows each tap's counters as its guest's kernel keeps them, read in the guest's
/// namespace: how many frames a guest sent were lost before switchyard read them (its tap's
/// queue full), which none of switchyard's own counters can see. A 64-byte UDP flood fills
/// the queue; the figures are the kernel's, as `ip -s link` in the guest shows them.
#[test]
fn stats_show_what_a_guests_tap_dropped_before_switchyard_read_it() {
    require(&["ip", "ping", "iperf3", "ss"]);
    let dir = switchyard_tests::TempDir::new("kstat");
    let ([a, b], control, mut sy) = two_guests_with_control(&dir);
    let (a, b) = (&a, &b);
    a.must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", "192.168.122.11"]);
    let _server = b.spawn(&["iperf3", "-s", "-1", "-p", "5501"]);
    b.wait_listening(5501);
    a.must(&[
        "timeout",
        "30",
        "iperf3",
        "-c",
        "192.168.122.11",
        "-p",
        "5501",
        "-u",
        "-l",
        "64",
        "-b",
        "0",
        "-t",
        "2",
    ]);
    let kernel = |ns: &Netns| -> (u64, u64) {
        let out = ns.must(&["ip", "-s", "-j", "link", "show", "dev", "eth0"]);
        let link: serde_json::Value = serde_json::from_str(&out).unwrap();
        let tx = &link[0]["stats64"]["tx"];
        (
            tx["packets"].as_u64().unwrap(),
            tx["dropped"].as_u64().unwrap(),
        )
    };
    // tun counts a frame in the guest's tx_packets when userspace reads it; once the queue
    // is drained, the counts stand still.
    let mut last = kernel(a);
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = kernel(a);
        if now == last {
            break;
        }
        last = now;
    }
    let (taken, dropped) = last;
    let stats = switchyard_tests::stats_of(&control);
    let ours = &stats["ports"][0][1];
    let k = &ours["kernel"];
    assert!(
        taken + dropped > 10_000,
        "the flood sent {} frames",
        taken + dropped
    );
    // Nothing is sent meanwhile but a stray IPv6 frame or two.
    let reported = k["guest_sent"].as_u64().unwrap();
    assert!(
        reported.abs_diff(taken + dropped) <= 10,
        "{reported} against {taken} + {dropped}: {k}"
    );
    assert_eq!(k["guest_sent_dropped"].as_u64().unwrap(), dropped, "{k}");
    // What switchyard read is what the tap gave it.
    let read = ours["counters"]["rx_packets"].as_u64().unwrap();
    assert!(
        read.abs_diff(taken) <= 10,
        "read {read}, the tap gave {taken}: {k}"
    );
    let at_exit = sy.stop_json();
    assert!(
        at_exit["ports"][1][1]["kernel"]["guest_sent"]
            .as_u64()
            .is_some(),
        "{at_exit}"
    );
}
