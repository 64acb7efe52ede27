//! Socket NAT end to end: the default network's `<forward mode='nat'/>`, with no address of
//! its own, carries guests' TCP, UDP and ping through the host's sockets. switchyard runs in a
//! `host` namespace that has a veth to an `outside` namespace at 203.0.113.1 (and its own
//! loopback services); the outside has no route to 192.168.122.0/24, so whatever reaches it
//! came from the host's address 203.0.113.3.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};
use switchyard_tests::*;

const OUTSIDE: &str = "203.0.113.1";
const HOST: &str = "203.0.113.3";
const GUEST: &str = "192.168.122.10";

struct SocketNet {
    // Field order is drop order: switchyard stops before its namespaces go.
    _sy: Switchyard,
    guest: Netns,
    /// Further guests (`socket_net_guests`), at 192.168.122.11 and on.
    others: Vec<Netns>,
    host: Netns,
    outside: Netns,
    dir: TempDir,
}

impl SocketNet {
    fn control(&self) -> String {
        self.dir.file("ctl.sock")
    }

    fn stats(&self) -> serde_json::Value {
        stats_of(&self.control())
    }
}

/// A web root with one file, served by `python3 -m http.server` on `addr`:`port` in `ns`.
fn http_server(ns: &Netns, dir: &TempDir, addr: &str, port: &str) -> Background {
    std::fs::create_dir_all(dir.0.join("www")).unwrap();
    dir.write("www/hello.txt", "hello through the host's sockets\n");
    let root = dir.file("www");
    // socketserver rather than `python3 -m http.server`, which looks its address up in DNS.
    let script = format!(
        "import http.server, os, socketserver\n\
         os.chdir('{root}')\n\
         class Server(socketserver.ThreadingTCPServer):\n\
         \x20   allow_reuse_address = True\n\
         Server(('{addr}', {port}), http.server.SimpleHTTPRequestHandler).serve_forever()\n"
    );
    let server = ns.spawn(&["python3", "-c", &script]);
    wait_for_port(ns, addr, port);
    server
}

fn wait_for_port(ns: &Netns, addr: &str, port: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ns
        .run(&["nc", "-z", "-w", "1", addr, port])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "{addr}:{port} never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn socket_net(extra_xml: &str) -> SocketNet {
    socket_net_env(extra_xml, &[])
}

/// [`socket_net`] with `env` in switchyard's environment.
fn socket_net_env(extra_xml: &str, env: &[(&str, &str)]) -> SocketNet {
    socket_net_with(extra_xml, env, &[])
}

/// [`socket_net_env`] with `args` added to switchyard's `run`.
fn socket_net_with(extra_xml: &str, env: &[(&str, &str)], args: &[&str]) -> SocketNet {
    socket_net_guests(extra_xml, env, args, 0)
}

/// [`socket_net_with`] with `others` further guests.
fn socket_net_guests(
    extra_xml: &str,
    env: &[(&str, &str)],
    args: &[&str],
    others: usize,
) -> SocketNet {
    require(&["ip", "python3", "curl", "nc"]);
    let dir = TempDir::new("sysock");
    let outside = Netns::new("o");
    let host = Netns::new("h");
    host.veth_to("eth0", &outside, "eth0");
    host.set_static_address("eth0", &format!("{HOST}/24"), None);
    outside.set_static_address("eth0", &format!("{OUTSIDE}/24"), None);
    let xml = dir.write(
        "default.xml",
        &format!(
            "<network xmlns:sy='urn:switchyard:network:1'>\n\
             <name>default</name>\n\
             <forward mode='nat'/>\n\
             <ip address='192.168.122.1' netmask='255.255.255.0'/>\n\
             {extra_xml}\n\
             </network>\n"
        ),
    );
    let guest = Netns::new("g");
    let tap = guest.tap_arg("eth0", "52:54:00:c0:00:0a");
    let control = dir.file("ctl.sock");
    let others: Vec<Netns> = (0..others).map(|_| Netns::new("g")).collect();
    let other_taps: Vec<String> = (others.iter().enumerate())
        .map(|(i, ns)| ns.tap_arg("eth0", &format!("52:54:00:c0:00:{:02x}", 0x0b + i)))
        .collect();
    let mut argv = vec!["run", &xml, "--json", "--control", &control, "--tap", &tap];
    for tap in &other_taps {
        argv.extend_from_slice(&["--tap", tap]);
    }
    argv.extend_from_slice(args);
    let sy = Switchyard::start_in_env(Some(&host), &argv, env);
    guest.set_static_address("eth0", &format!("{GUEST}/24"), Some("192.168.122.1"));
    for (i, ns) in others.iter().enumerate() {
        let cidr = format!("192.168.122.{}/24", 11 + i);
        ns.set_static_address("eth0", &cidr, Some("192.168.122.1"));
    }
    SocketNet {
        _sy: sy,
        guest,
        others,
        host,
        outside,
        dir,
    }
}

#[test]
fn guests_reach_outside_over_tcp_with_the_hosts_address_and_get_a_reset_from_closed_ports() {
    let net = socket_net("");
    let _server = http_server(&net.outside, &net.dir, OUTSIDE, "8000");
    let body = net.guest.must(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        &format!("http://{OUTSIDE}:8000/hello.txt"),
    ]);
    assert_eq!(body, "hello through the host's sockets\n");

    // Nothing listens on port 9: the guest learns at once, from a RST, as from a real host.
    let started = Instant::now();
    let refused = net.guest.run(&["nc", "-z", "-w", "5", OUTSIDE, "9"]);
    assert!(
        !refused.status.success(),
        "connect to a closed port succeeded"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a refused connection took {:?}",
        started.elapsed()
    );

    let stats = net.stats();
    let counters = &stats["engine"]["socket_nat"];
    assert!(
        counters["tcp_established"].as_u64().unwrap() >= 1,
        "{counters}"
    );
    assert_eq!(counters["tcp_refused"].as_u64(), Some(1), "{counters}");
    assert!(
        counters["bytes_from_host"].as_u64().unwrap() > 30,
        "{counters}"
    );
}

#[test]
fn udp_flows_and_ping_go_through_host_sockets_and_conntrack_shows_them() {
    let net = socket_net("");
    // A UDP echo server outside.
    let _echo = net.outside.spawn(&[
        "python3",
        "-c",
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0', 5353))\n\
         while True:\n\
         \x20   data, peer = s.recvfrom(2048)\n\
         \x20   s.sendto(b'echo:' + data + (' from %s' % peer[0]).encode(), peer)\n",
    ]);
    std::thread::sleep(Duration::from_millis(300));
    let reply = net.guest.must(&[
        "python3",
        "-c",
        &format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.settimeout(5)\n\
             s.bind(('0.0.0.0', 40000))\n\
             s.sendto(b'hi', ('{OUTSIDE}', 5353))\n\
             print(s.recvfrom(2048)[0].decode())\n"
        ),
    ]);
    // The outside saw the host's address: the guest's never left the host.
    assert_eq!(reply.trim(), format!("echo:hi from {HOST}"));

    // Ping sockets are refused where ping_group_range excludes us: the guest is told.
    let denied = net.guest.run(&["ping", "-c", "1", "-W", "2", OUTSIDE]);
    assert!(!denied.status.success());
    let text = String::from_utf8_lossy(&denied.stdout);
    assert!(text.contains("Unreachable"), "{text}");
    let stats = net.stats();
    assert!(
        stats["engine"]["socket_nat"]["ping_denied"]
            .as_u64()
            .unwrap()
            >= 1
    );

    let conntrack = must(&[
        switchyard_bin().to_str().unwrap(),
        "conntrack",
        "--socket",
        &net.control(),
    ]);
    assert!(
        conntrack.contains("udp") && conntrack.contains("dport=5353"),
        "{conntrack}"
    );
}

#[test]
fn ping_works_where_ping_sockets_are_allowed() {
    let net = socket_net("");
    net.host
        .must(&["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"]);
    let out = net
        .guest
        .must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", OUTSIDE]);
    assert!(out.contains("2 received"), "{out}");
    let stats = net.stats();
    assert_eq!(stats["engine"]["socket_nat"]["pings_in"].as_u64(), Some(2));
}

#[test]
fn host_loopback_and_port_forwarding_reach_across_and_hairpin() {
    let net = socket_net(&format!(
        "<sy:host-loopback/>\n\
         <sy:forward proto='tcp' host='127.0.0.1:8080' guest='{GUEST}:80'/>"
    ));
    // A service on the host's loopback, reached from the guest at the gateway's address.
    let _host_web = http_server(&net.host, &net.dir, "127.0.0.1", "8001");
    let body = net.guest.must(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "http://192.168.122.1:8001/hello.txt",
    ]);
    assert_eq!(body, "hello through the host's sockets\n");

    // A service in the guest, reached from the host through the forwarded port ...
    let _guest_web = http_server(&net.guest, &net.dir, GUEST, "80");
    let body = net.host.must(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "http://127.0.0.1:8080/hello.txt",
    ]);
    assert_eq!(body, "hello through the host's sockets\n");
    // ... and from the guest itself, through the host and back (hairpin).
    let body = net.guest.must(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "http://192.168.122.1:8080/hello.txt",
    ]);
    assert_eq!(body, "hello through the host's sockets\n");

    // Live: a UDP port forwarded with the CLI; the guest's echo answers through it, from the
    // gateway's address.
    let sy = switchyard_bin();
    let sy = sy.to_str().unwrap();
    let control = net.control();
    let forward = |args: &[&str]| {
        let mut argv = vec![sy, "port-forward", "--socket", &control];
        argv.extend_from_slice(args);
        run(&argv)
    };
    let added = forward(&[
        "add",
        "--proto",
        "udp",
        "127.0.0.1:5400",
        &format!("{GUEST}:7000"),
    ]);
    assert!(added.status.success(), "{added:?}");
    let _echo = net.guest.spawn(&[
        "python3",
        "-c",
        &format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.bind(('{GUEST}', 7000))\n\
             while True:\n\
             \x20   data, peer = s.recvfrom(2048)\n\
             \x20   s.sendto(data + (' via %s' % peer[0]).encode(), peer)\n"
        ),
    ]);
    std::thread::sleep(Duration::from_millis(300));
    let reply = net.host.must(&[
        "python3",
        "-c",
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(5)\n\
         s.sendto(b'ping', ('127.0.0.1', 5400))\n\
         print(s.recvfrom(2048)[0].decode())\n",
    ]);
    assert_eq!(reply.trim(), "ping via 192.168.122.1");
    let list = String::from_utf8_lossy(&forward(&["list"]).stdout).into_owned();
    assert!(
        list.contains("tcp 127.0.0.1:8080 -> 192.168.122.10:80"),
        "{list}"
    );
    assert!(
        list.contains("udp 127.0.0.1:5400 -> 192.168.122.10:7000"),
        "{list}"
    );
    assert!(
        forward(&["remove", "--proto", "udp", "127.0.0.1:5400"])
            .status
            .success()
    );
    let again = forward(&["remove", "--proto", "udp", "127.0.0.1:5400"]);
    assert!(!again.status.success(), "removing twice must fail");
    let list = String::from_utf8_lossy(&forward(&["list"]).stdout).into_owned();
    assert!(!list.contains("udp"), "{list}");
}

#[test]
fn bulk_tcp_both_ways_through_socket_nat() {
    require(&["iperf3"]);
    let net = socket_net("");
    let _server = net
        .outside
        .spawn(&["iperf3", "-s", "-B", OUTSIDE, "-p", "5201"]);
    wait_for_port(&net.outside, OUTSIDE, "5201");
    for reverse in [false, true] {
        let mut args = vec!["iperf3", "-c", OUTSIDE, "-p", "5201", "-t", "2", "-J"];
        if reverse {
            args.push("-R");
        }
        let mut argv = vec!["timeout", "20"];
        argv.extend(args);
        let out = net.guest.must(&argv);
        let bps = iperf3_received_bps(&out);
        assert!(bps > 50e6, "reverse={reverse}: {bps} bit/s\n{out}");
    }
}

/// USO through socket NAT: a guest's `UDP_SEGMENT` send of ten datagrams reaches the engine
/// as one super-frame (the trace sees one frame) and leaves the host's UDP socket as the ten
/// datagrams it stands for (RFC 768: boundaries kept), not as one 12 000-byte datagram; the
/// outside receives them, intact, from the host's address.
#[test]
fn a_uso_send_leaves_the_host_socket_as_its_datagrams() {
    require(&["ss"]);
    let net = socket_net("");
    let tracer = Tracer::uso(&net.control());
    let receiver = uso_receiver(&net.outside, OUTSIDE, 9000);
    net.guest.must(&[
        "timeout", "10", "python3", "-c", USO_SENDER, OUTSIDE, "9000", "40000",
    ]);
    let got = receiver.join().unwrap();
    assert_eq!(got.trim(), uso_received_from(&format!("{HOST}:40000")));
    assert_one_uso_frame(&tracer.output(), "socket_nat.udp_super_frames_out +1");
    let counters = &net.stats()["engine"]["socket_nat"];
    assert_eq!(counters["udp_super_frames_out"], 1, "{counters}");
    assert_eq!(counters["udp_datagrams_out"], 10, "{counters}");
}

/// The reverse of the above: an outside sender's `UDP_SEGMENT` send of 10 x 1200 bytes to the
/// guest's mapping crosses the veth as one GSO packet, the host socket (UDP_GRO) reads it in
/// one call, and it reaches the guest as a UDP super-frame (GSO_UDP_L4) that the guest's kernel
/// cuts into the 10 intact datagrams its socket receives. How many super-frames the datagrams
/// make depends on how the kernel hands them over (one here, where the send stays one GSO
/// packet), so the test asks for fewer frames than datagrams, at least one super-frame.
#[test]
fn udp_from_outside_reaches_the_guest_as_a_super_frame() {
    require(&["ss"]);
    let net = socket_net("");
    let answerer = uso_answerer(&net.outside, OUTSIDE, 9000);
    let receiver = uso_receiver_asking(&net.guest, GUEST, 7000, (OUTSIDE, 9000));
    let answered = answerer.join().unwrap();
    let got = receiver.join().unwrap();
    assert_eq!(
        answered.trim(),
        format!("{HOST}:7000"),
        "the mapping's port"
    );
    assert_eq!(got.trim(), uso_received_from(&format!("{OUTSIDE}:9000")));
    let counters = &net.stats()["engine"]["socket_nat"];
    assert_eq!(counters["udp_datagrams_in"], 10, "{counters}");
    let super_frames = counters["udp_super_frames_in"].as_u64().unwrap();
    assert!((1..10).contains(&super_frames), "{counters}");
}

/// On kernels before 6.2 a tap takes no USO (simulated on this one with
/// `SWITCHYARD_TAP_NO_USO`, the environment switch that opens taps as there): the guest's
/// kernel cuts its own `UDP_SEGMENT` send, so the datagrams cross one by one, and what the
/// host socket reads coalesced (UDP_GRO) reaches the guest cut into its datagrams by
/// switchyard, never as a super-frame its tap would refuse. RFC 768: boundaries kept.
#[test]
fn without_uso_on_the_tap_datagrams_still_cross_both_ways_intact() {
    require(&["ss"]);
    let net = socket_net_env("", &[("SWITCHYARD_TAP_NO_USO", "1")]);
    let receiver = uso_receiver(&net.outside, OUTSIDE, 9000);
    net.guest.must(&[
        "timeout", "10", "python3", "-c", USO_SENDER, OUTSIDE, "9000", "40000",
    ]);
    let got = receiver.join().unwrap();
    assert_eq!(got.trim(), uso_received_from(&format!("{HOST}:40000")));
    let counters = &net.stats()["engine"]["socket_nat"];
    assert_eq!(counters["udp_super_frames_out"], 0, "{counters}");
    assert_eq!(counters["udp_datagrams_out"], 10, "{counters}");

    let answerer = uso_answerer(&net.outside, OUTSIDE, 9001);
    let receiver = uso_receiver_asking(&net.guest, GUEST, 7000, (OUTSIDE, 9001));
    answerer.join().unwrap();
    let got = receiver.join().unwrap();
    assert_eq!(got.trim(), uso_received_from(&format!("{OUTSIDE}:9001")));
    let counters = &net.stats()["engine"]["socket_nat"];
    assert_eq!(counters["udp_datagrams_in"], 10, "{counters}");
    // The host socket read them coalesced: switchyard, not the tap, cut them.
    assert!(
        counters["udp_super_frames_in"].as_u64().unwrap() >= 1,
        "{counters}"
    );
}

/// `--workers 2`: the worker's own socket NAT carries the TCP connections that open on its
/// tap queue, the engine's the others (and all UDP and ping); bytes arrive intact on either
/// thread, and `stats` and `conntrack` show both threads' connections.
#[test]
fn two_workers_each_carry_the_tcp_connections_that_open_on_their_queue() {
    require(&["iperf3", "sha256sum", "tcpdump"]);
    let net = socket_net_with("", &[], &["--workers", "2"]);
    let link = net.guest.must(&["ip", "-d", "link", "show", "eth0"]);
    assert!(link.contains("numqueues 2"), "{link}");
    let _http = http_server(&net.outside, &net.dir, OUTSIDE, "8080");
    let blob = net.dir.0.join("www/blob");
    must(&[
        "sh",
        "-c",
        &format!("head -c 3000000 /dev/urandom > {}", blob.display()),
    ]);
    let want = must(&["sha256sum", &blob.display().to_string()]);
    let want = want.split_whitespace().next().unwrap();
    for _ in 0..8 {
        let got = net.guest.must(&[
            "sh",
            "-c",
            "curl -sS --max-time 20 http://203.0.113.1:8080/blob | sha256sum",
        ]);
        assert_eq!(got.split_whitespace().next().unwrap(), want);
    }
    let _server = net
        .outside
        .spawn(&["iperf3", "-s", "-B", OUTSIDE, "-p", "5201"]);
    wait_for_port(&net.outside, OUTSIDE, "5201");
    for reverse in [false, true] {
        let mut argv = vec![
            "timeout", "30", "iperf3", "-c", OUTSIDE, "-p", "5201", "-t", "2", "-P", "8", "-J",
        ];
        if reverse {
            argv.push("-R");
        }
        let out = net.guest.must(&argv);
        let bps = iperf3_received_bps(&out);
        assert!(bps > 1e8, "reverse={reverse}: {bps} bit/s");
    }
    // While eight connections are open a capture starts: the worker's connections go on
    // (none is handed to the engine, whose stack would reset it), their frames are in the
    // capture, and conntrack lists the connections whichever thread holds them.
    let mut long = net.guest.spawn(&[
        "timeout", "30", "iperf3", "-c", OUTSIDE, "-p", "5201", "-t", "8", "-P", "8",
    ]);
    std::thread::sleep(Duration::from_millis(1000));
    let bin = switchyard_bin().display().to_string();
    let control = net.control();
    let pcap = net.dir.file("guest.pcap");
    let handed = |stats: serde_json::Value| stats["engine"]["worker_handed_over"].as_u64().unwrap();
    let handed_before = handed(net.stats());
    let mut capture = std::process::Command::new(&bin)
        .args(["capture", "default", "--socket", &control, "--port", "eth0"])
        .args(["-w", &pcap, "--count", "1000000", "--duration", "1"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let conntrack = must(&[&bin, "conntrack", "--socket", &control]);
    let open = conntrack
        .lines()
        .filter(|l| l.starts_with("tcp") && l.contains("dport=5201") && l.contains("ESTABLISHED"))
        .count();
    assert!(open >= 8, "{open} of 9 connections listed:\n{conntrack}");
    assert!(capture.wait().unwrap().success());
    // While a capture runs the worker hands the engine every frame but those of its own
    // connections (their copies aside): a few ARP and ACK frames, not the streams.
    let handed_during = handed(net.stats()) - handed_before;
    assert!(
        handed_during < 200,
        "{handed_during} frames handed to the engine"
    );
    assert!(
        long.0.wait().unwrap().success(),
        "the connections outlived the capture"
    );
    let captured = must(&["tcpdump", "-n", "-r", &pcap]);
    let (ours, theirs) = ("192.168.122.10.", "203.0.113.1.5201 > 192.168.122.10.");
    let out = captured
        .lines()
        .filter(|l| l.contains(ours) && l.contains("> 203.0.113.1.5201"))
        .count();
    let back = captured.lines().filter(|l| l.contains(theirs)).count();
    assert!(out > 0 && back > 0, "{out} out, {back} back:\n{captured}");
    let stats = net.stats();
    let sockets = &stats["engine"]["socket_nat"];
    let all = sockets["tcp_connects"].as_u64().unwrap();
    let on_worker = stats["engine"]["socket_nat_worker_connects"]
        .as_u64()
        .unwrap();
    assert!(all >= 8 + 2 * 9 + 9, "{stats}");
    assert!(
        on_worker > 0 && on_worker < all,
        "both threads opened connections: {on_worker} of {all} on the worker"
    );
}

/// `--workers 2`: a guest's tap goes away under connections both threads hold (its kernel
/// never closes them): every thread ends them and closes their host sockets at once (the
/// outside's server sees them end; none lingers in `conntrack` until its 2-hour timeout),
/// and another guest goes on through both threads.
#[test]
fn two_workers_end_a_removed_guests_connections_at_once() {
    require(&["iperf3", "ss"]);
    let net = socket_net_guests("", &[], &["--workers", "2"], 1);
    let control = net.control();
    let bin = switchyard_bin().display().to_string();
    let port_count = || net.stats()["ports"].as_array().unwrap().len();
    let other = &net.others[0];
    assert_eq!(port_count(), 2);
    let _server = net
        .outside
        .spawn(&["iperf3", "-s", "-B", OUTSIDE, "-p", "5201"]);
    wait_for_port(&net.outside, OUTSIDE, "5201");
    let _long = other.spawn(&[
        "timeout", "60", "iperf3", "-c", OUTSIDE, "-p", "5201", "-t", "30", "-P", "8",
    ]);
    let of_other = |conntrack: &str| {
        conntrack
            .lines()
            .filter(|l| l.starts_with("tcp") && l.contains("src=192.168.122.11 "))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let conntrack = must(&[&bin, "conntrack", "--socket", &control]);
        if of_other(&conntrack) >= 9 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never 9 connections:\n{conntrack}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        net.stats()["engine"]["socket_nat_worker_connects"]
            .as_u64()
            .unwrap()
            > 0,
        "the worker holds some of them"
    );
    // The tap goes; the guest's iperf3 still runs, its sockets still open.
    other.must(&["ip", "link", "del", "eth0"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let conntrack = must(&[&bin, "conntrack", "--socket", &control]);
        let established =
            net.outside
                .must(&["ss", "-Htn", "state", "established", "sport", "= :5201"]);
        if port_count() == 1 && of_other(&conntrack) == 0 && established.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the removed guest's connections linger:\n{conntrack}\n{established}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _http = http_server(&net.outside, &net.dir, OUTSIDE, "8080");
    for _ in 0..4 {
        let page = net.guest.must(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "http://203.0.113.1:8080/hello.txt",
        ]);
        assert_eq!(page, "hello through the host's sockets\n");
    }
}

/// Accepts connections on `argv[1]`:`argv[2]` and holds them open.
const HOLDING_SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(128)
held = []
while True:
    held.append(s.accept()[0])
"#;

/// Starts `argv[1]` connections to `argv[2]`:`argv[3]` at once, prints how many are
/// established 3 s later, and holds them open 30 s more.
const MANY_CONNECTIONS: &str = r#"
import socket, sys, time
n, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((host, port))
    socks.append(s)
time.sleep(3)
up = 0
for s in socks:
    try:
        s.getpeername()
        up += 1
    except OSError:
        pass
print(up, flush=True)
time.sleep(30)
"#;

/// `<sy:nat max-flows-per-guest>` is the network's cap whichever threads carry a guest's
/// connections: with two workers, a guest that opens 16 connections at once gets 6, not the
/// engine's 6 and the worker's share besides (as when each thread held a share).
#[test]
fn two_workers_hold_a_guest_to_its_per_guest_cap() {
    let net = socket_net_with(
        "<sy:nat max-flows-per-guest='6'/>",
        &[],
        &["--workers", "2"],
    );
    let _server = net
        .outside
        .spawn(&["python3", "-c", HOLDING_SERVER, OUTSIDE, "7000"]);
    wait_for_port(&net.outside, OUTSIDE, "7000");
    let mut client = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.guest.name,
            "python3",
            "-c",
            MANY_CONNECTIONS,
        ])
        .args(["16", OUTSIDE, "7000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut up = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(client.stdout.take().unwrap()),
        &mut up,
    )
    .unwrap();
    // The connections are still open while they are counted.
    let client = Background(client);
    let stats = net.stats();
    let sockets = &stats["engine"]["socket_nat"];
    let conntrack = must(&[
        switchyard_bin().to_str().unwrap(),
        "conntrack",
        "--socket",
        &net.control(),
    ]);
    let held = conntrack
        .lines()
        .filter(|l| l.starts_with("tcp") && l.contains("dport=7000"))
        .count();
    drop(client);
    assert_eq!(up.trim(), "6", "{stats}\n{conntrack}");
    assert_eq!(held, 6, "{conntrack}");
    assert!(sockets["guest_limit"].as_u64().unwrap() > 0, "{stats}");
}

/// A trace sees the segments a worker's socket NAT takes, though the engine never handles
/// them: each is recorded as it came in, with the worker that took it.
#[test]
fn a_trace_shows_the_segments_a_workers_socket_nat_takes() {
    let net = socket_net_with("", &[], &["--workers", "2"]);
    let _http = http_server(&net.outside, &net.dir, OUTSIDE, "8080");
    wait_for_port(&net.outside, OUTSIDE, "8080");
    let bin = switchyard_bin();
    let control = net.control();
    let trace = std::process::Command::new(&bin)
        .args(["trace", "default", "--socket", &control, "--port", "eth0"])
        .args([
            "--filter",
            "tcp and port 8080",
            "--count",
            "400",
            "--duration",
            "4",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..12 {
        net.guest.must(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "http://203.0.113.1:8080/hello.txt",
        ]);
    }
    let out = trace.wait_with_output().unwrap();
    let traced = String::from_utf8_lossy(&out.stdout);
    let on_worker = net.stats()["engine"]["socket_nat_worker_connects"]
        .as_u64()
        .unwrap();
    assert!(on_worker > 0, "no connection opened on the worker");
    assert!(
        traced.contains("verdict: taken by worker 1's socket NAT"),
        "{traced}"
    );
    assert!(traced.contains("192.168.122.10"), "{traced}");
}

// As packet NAT and Linux's early_drop: a guest at its cap of UDP flows that are not assured
// (a new source port per query, each answered once) makes room for the next from the oldest
// of them, rather than being refused everything for the 5 minutes they last; its TCP still
// connects.
#[test]
fn a_guest_querying_from_a_new_port_each_time_is_not_locked_out_by_its_cap() {
    let net = socket_net("<sy:nat max-flows-per-guest='8'/>");
    let _reflector = net.outside.spawn(&["python3", "-c", UDP_REFLECTOR, "7000"]);
    let _acceptor = net.outside.spawn(&["python3", "-c", TCP_ACCEPTOR, "7001"]);
    net.outside.wait_listening(7000);
    net.outside.wait_listening(7001);
    let out = net.guest.must(&[
        "timeout",
        "30",
        "python3",
        "-c",
        MANY_QUERIES,
        "7000",
        "40",
        "7001",
    ]);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["40", "tcp ok"], "{out}");
    let counters = &net.stats()["engine"]["socket_nat"];
    assert!(
        counters["flows_evicted"].as_u64().unwrap() >= 32,
        "each query past the cap took the oldest one's place: {counters}"
    );
    assert_eq!(counters["guest_limit"].as_u64(), Some(0), "{counters}");
}
