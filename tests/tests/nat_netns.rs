//! Packet NAT end to end, in the topology of DESIGN.md: guests on taps, switchyard in its own
//! namespace with the uplink veth, and an `outside` namespace at 203.0.113.1 with the servers.
//! The outside has no route to 192.168.122.0/24, so anything that works went through the NAT.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};
use switchyard_tests::*;

const OUTSIDE: &str = "203.0.113.1";
const EXTERNAL: &str = "203.0.113.2";

struct NatNet {
    // Field order is drop order: switchyard stops before its namespaces go.
    sy: Switchyard,
    guests: Vec<Netns>,
    sw: Netns,
    outside: Netns,
    dir: TempDir,
}

fn nat_net(guests: usize, extra_xml: &str) -> NatNet {
    nat_net_with_mtu(guests, extra_xml, 1500)
}

/// The control socket of the topology's switchyard.
fn control(net: &NatNet) -> String {
    net.dir.0.join("ctl.sock").display().to_string()
}

fn nat_net_with_mtu(guests: usize, extra_xml: &str, uplink_mtu: u32) -> NatNet {
    nat_net_with(guests, extra_xml, uplink_mtu, "read")
}

/// `uplink_rx` is `<sy:uplink rx=...>`: `read` or `ring`.
fn nat_net_with(guests: usize, extra_xml: &str, uplink_mtu: u32, uplink_rx: &str) -> NatNet {
    nat_net_args(guests, extra_xml, uplink_mtu, uplink_rx, &[])
}

/// [`nat_net_with`], `switchyard run` getting `run_args` too.
fn nat_net_args(
    guests: usize,
    extra_xml: &str,
    uplink_mtu: u32,
    uplink_rx: &str,
    run_args: &[&str],
) -> NatNet {
    require(&["ip", "ping", "python3"]);
    let dir = TempDir::new("synat");
    let outside = Netns::new("o");
    let sw = Netns::new("s");
    sw.veth_to("up0", &outside, "eth0");
    let mtu = uplink_mtu.to_string();
    sw.must(&["ip", "link", "set", "up0", "mtu", &mtu, "up"]);
    outside.must(&["ip", "link", "set", "eth0", "mtu", &mtu]);
    // The host keeps an address of its own on the uplink; both must work.
    sw.must(&["ip", "addr", "add", "203.0.113.3/24", "dev", "up0"]);
    outside.must(&["ip", "link", "set", "eth0", "up"]);
    outside.must(&["ip", "addr", "add", "203.0.113.1/24", "dev", "eth0"]);

    let xml = dir.0.join("nat.xml");
    std::fs::write(
        &xml,
        format!(
            "<network xmlns:sy='urn:switchyard:network:1'>\n\
             <name>nat</name>\n\
             <forward mode='nat' dev='up0'>\n\
               <nat><address start='{EXTERNAL}' end='{EXTERNAL}'/><port start='1024' end='65535'/></nat>\n\
             </forward>\n\
             <ip address='192.168.122.1' netmask='255.255.255.0'/>\n\
             <sy:uplink prefix='24' gateway='{OUTSIDE}' rx='{uplink_rx}'/>\n\
             {extra_xml}\n\
             </network>\n"
        ),
    )
    .unwrap();
    let guests: Vec<Netns> = (0..guests).map(|_| Netns::new("g")).collect();
    let mut args = vec![
        "run".to_string(),
        xml.display().to_string(),
        "--json".to_string(),
        "--control".to_string(),
        dir.0.join("ctl.sock").display().to_string(),
    ];
    args.extend(run_args.iter().map(|a| a.to_string()));
    for (i, g) in guests.iter().enumerate() {
        args.push("--tap".into());
        args.push(g.tap_arg("eth0", &format!("52:54:00:c0:00:{:02x}", i + 1)));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sy = Switchyard::start_in(Some(&sw), &args);
    // Static addresses, as the seeds' ifcfg files give them: no DHCP involved.
    for (i, g) in guests.iter().enumerate() {
        let cidr = format!("192.168.122.{}/24", 10 + i);
        g.set_static_address("eth0", &cidr, Some("192.168.122.1"));
    }
    NatNet {
        sy,
        guests,
        sw,
        outside,
        dir,
    }
}

/// Runs a python3 program inside `ns` and returns its stdout; it must succeed.
fn python(ns: &Netns, program: &str, args: &[&str]) -> String {
    let mut argv = vec!["timeout", "20", "python3", "-c", program];
    argv.extend_from_slice(args);
    ns.must(&argv)
}

/// From source port argv[1], asks the reflector at argv[2] how it sees us.
const ASK_REFLECTOR: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(5)
s.sendto(b"who am i", ("203.0.113.1", int(sys.argv[2])))
print(s.recvfrom(100)[0].decode())
"#;

#[test]
fn ping_traceroute_fragments_and_port_unreachable_through_the_nat() {
    require(&["traceroute", "bash", "dig"]);
    let net = nat_net(1, "");
    let g = &net.guests[0];
    g.must(&["ping", "-c", "3", "-i", "0.2", "-W", "2", OUTSIDE]);
    // The external address answers ping itself, as the host owning it would.
    g.must(&["ping", "-c", "1", "-W", "2", EXTERNAL]);
    // The host's own address on the same NIC keeps working beside the engine's.
    net.sw
        .must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", OUTSIDE]);

    // TTL: the gateway is hop 1 (time exceeded from 192.168.122.1), the outside hop 2.
    let trace = g.must(&["traceroute", "-n", "-q", "1", "-w", "2", "-m", "5", OUTSIDE]);
    let hops: Vec<&str> = trace
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(hops, ["192.168.122.1", OUTSIDE], "{trace}");

    // A 4000-byte ping is fragmented by the guest and its reply by the outside: both cross.
    g.must(&[
        "ping", "-c", "2", "-i", "0.2", "-W", "2", "-s", "4000", OUTSIDE,
    ]);
    // RFC 5508: the outside's port unreachable reaches the guest's socket translated back.
    let probe = g.run(&[
        "bash",
        "-c",
        "exec 3<>/dev/udp/203.0.113.1/9; echo a >&3; sleep 0.5; echo b >&3",
    ]);
    let err = String::from_utf8_lossy(&probe.stderr);
    assert!(err.contains("Connection refused"), "{err}");
    // Not an open resolver: DNS is answered on guest ports only, never from the uplink side.
    let outside_query =
        net.outside
            .run(&["dig", "@203.0.113.2", "+time=1", "+tries=1", "printer.lab"]);
    assert!(
        !outside_query.status.success(),
        "the outside got a DNS answer"
    );

    let mut sy = net.sy;
    let stats = sy.stop_json();
    let nat = &stats["engine"]["nat"];
    assert!(nat["translated_out"].as_u64().unwrap() >= 5, "{stats}");
    assert!(
        nat["icmp_errors_translated"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    assert!(
        nat["fragments_translated"].as_u64().unwrap() >= 4,
        "{stats}"
    );
    assert!(
        stats["engine"]["icmp_errors_sent"].as_u64().unwrap() >= 1,
        "{stats}"
    );
}

// RFC 1812 4.2.2.5 / RFC 1191: the uplink's MTU is below the network's; a DF packet too big
// for it gets fragmentation-needed with the next-hop MTU, from the gateway.
#[test]
fn df_packets_too_big_for_the_uplink_get_fragmentation_needed() {
    let net = nat_net_with_mtu(1, "", 1400);
    let g = &net.guests[0];
    g.must(&[
        "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1372", OUTSIDE,
    ]);
    let big = g.run(&[
        "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1450", OUTSIDE,
    ]);
    let text = String::from_utf8_lossy(&big.stdout);
    assert!(!big.status.success());
    assert!(
        text.contains("192.168.122.1") && text.contains("mtu = 1400"),
        "{text}"
    );
    // The guest's kernel now knows the path MTU: the next DF ping fails locally.
    let again = g.run(&[
        "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1450", OUTSIDE,
    ]);
    assert!(!again.status.success());
}

/// A 3 MB file of random bytes served over HTTP by the outside at OUTSIDE:8080/blob: the
/// server, and the file's sha256.
fn serve_blob(net: &NatNet) -> (Background, String) {
    let www = net.dir.0.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let file = www.join("blob");
    must(&[
        "sh",
        "-c",
        &format!("head -c 3000000 /dev/urandom > {}", file.display()),
    ]);
    let want = must(&["sha256sum", &file.display().to_string()]);
    let want = want.split_whitespace().next().unwrap().to_string();
    let http = net.outside.spawn(&[
        "python3",
        "-m",
        "http.server",
        "--bind",
        OUTSIDE,
        "--directory",
        &www.display().to_string(),
        "8080",
    ]);
    net.outside.wait_listening(8080);
    (http, want)
}

#[test]
fn curl_and_iperf3_both_ways_and_the_outside_sees_only_the_external_address() {
    require(&["curl", "iperf3", "tcpdump", "sha256sum", "ss"]);
    let net = nat_net(1, "");
    let (g, outside) = (&net.guests[0], &net.outside);

    let (_http, want) = serve_blob(&net);
    let capture_file = net.dir.0.join("outside.txt");
    let _capture = outside.spawn(&[
        "sh",
        "-c",
        &format!(
            "exec tcpdump -i eth0 -n -l -q 'tcp port 8080' > {} 2>/dev/null",
            capture_file.display()
        ),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    let got = g.must(&[
        "sh",
        "-c",
        "curl -sS --max-time 20 http://203.0.113.1:8080/blob | sha256sum",
    ]);
    assert_eq!(got.split_whitespace().next().unwrap(), want);
    std::thread::sleep(Duration::from_millis(500));
    drop(_capture);
    let seen = std::fs::read_to_string(&capture_file).unwrap();
    let mut lines = 0;
    for line in seen.lines().filter(|l| l.contains(" IP ")) {
        lines += 1;
        // "... IP 203.0.113.2.40000 > 203.0.113.1.8080: tcp 0"
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "IP").unwrap();
        for end in [words[at + 1], words[at + 3].trim_end_matches(':')] {
            let (addr, port) = end.rsplit_once('.').unwrap();
            let port: u32 = port.parse().unwrap();
            match addr {
                OUTSIDE => assert_eq!(port, 8080),
                EXTERNAL => assert!((1024..=65535).contains(&port), "{line}"),
                other => panic!("the outside saw {other}: {line}"),
            }
        }
    }
    assert!(lines > 10, "tcpdump saw the transfer: {seen}");

    // `switchyard conntrack` reads the table from the running engine, conntrack -L style.
    let bin = switchyard_bin().display().to_string();
    let table = must(&[&bin, "conntrack", "--socket", &control(&net)]);
    assert!(
        table.lines().any(|l| l.starts_with("tcp")
            && l.contains("src=192.168.122.10 dst=203.0.113.1")
            && l.contains("dport=8080")
            && l.contains("src=203.0.113.1 dst=203.0.113.2 sport=8080")),
        "{table}"
    );
    assert!(table.contains("flow entries have been shown"), "{table}");

    for extra in [&[][..], &["-R"][..], &["-u", "-b", "200M"][..]] {
        let _server = outside.spawn(&["iperf3", "-s", "-1", "-B", OUTSIDE]);
        outside.wait_listening(5201);
        let mut argv = vec!["timeout", "30", "iperf3", "-c", OUTSIDE, "-t", "2", "-J"];
        argv.extend_from_slice(extra);
        let report = g.must(&argv);
        let json: serde_json::Value = serde_json::from_str(&report).unwrap();
        let end = &json["end"];
        let bps = end["sum_received"]["bits_per_second"]
            .as_f64()
            .or_else(|| end["sum"]["bits_per_second"].as_f64())
            .unwrap_or(0.0);
        assert!(bps > 1e6, "iperf3 {extra:?}: {bps} bit/s");
        if extra.first() == Some(&"-u") {
            let lost = end["sum"]["lost_percent"].as_f64().unwrap_or(100.0);
            assert!(lost < 5.0, "UDP loss {lost}%");
        }
    }
}

/// With `--workers 2`, the guest's tap has two queues and the uplink two sockets in one
/// fanout group: the worker translates the data packets of established connections itself,
/// both ways, and its counts reach `stats` and `conntrack` as if the engine had done it.
#[test]
fn two_workers_translate_established_connections_both_ways() {
    require(&["iperf3", "ss", "curl", "sha256sum"]);
    let net = nat_net_args(1, "", 1500, "read", &["--workers", "2"]);
    let (g, outside) = (&net.guests[0], &net.outside);
    assert!(
        g.must(&["ip", "-d", "link", "show", "eth0"])
            .contains("numqueues 2")
    );
    // Bytes arrive intact through either thread's checksums.
    let (_http, want) = serve_blob(&net);
    for _ in 0..4 {
        let got = g.must(&[
            "sh",
            "-c",
            "curl -sS --max-time 20 http://203.0.113.1:8080/blob | sha256sum",
        ]);
        assert_eq!(got.split_whitespace().next().unwrap(), want);
    }
    // Eight connections each way: some land on the worker's queue and fanout socket.
    for extra in [&[][..], &["-R"][..]] {
        let _server = outside.spawn(&["iperf3", "-s", "-1", "-B", OUTSIDE]);
        outside.wait_listening(5201);
        let mut argv = vec![
            "timeout", "30", "iperf3", "-c", OUTSIDE, "-t", "2", "-P", "8", "-J",
        ];
        argv.extend_from_slice(extra);
        let bps = iperf3_received_bps(&g.must(&argv));
        assert!(bps > 1e8, "iperf3 -P 8 {extra:?}: {bps} bit/s");
    }
    std::thread::sleep(Duration::from_millis(300));
    let bin = switchyard_bin().display().to_string();
    // The fanout group's hook ignores the sockets' PACKET_IGNORE_OUTGOING: the host's own
    // transmissions on the uplink must still not reach switchyard (30 pings from the host's
    // address: only their 30 replies, to the host's MAC, arrive, and are not for us).
    let uplink_rx = || -> u64 {
        let stats = must(&[&bin, "stats", "--socket", &control(&net)]);
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        let ports = stats["ports"].as_array().unwrap();
        let uplink = ports
            .iter()
            .find(|p| p[1]["name"].as_str().unwrap().ends_with("(uplink)"))
            .expect("the uplink's port");
        uplink[1]["counters"]["rx_packets"].as_u64().unwrap()
    };
    let before = uplink_rx();
    net.sw.must(&[
        "ping",
        "-c",
        "30",
        "-i",
        "0.02",
        "-q",
        "-I",
        "203.0.113.3",
        OUTSIDE,
    ]);
    let seen = uplink_rx() - before;
    assert!(
        (30..45).contains(&seen),
        "{seen} frames for 30 pings' replies"
    );
    let table = must(&[&bin, "conntrack", "--json", "--socket", &control(&net)]);
    let table: serde_json::Value = serde_json::from_str(&table).unwrap();
    let rows = table.as_array().expect("rows");
    let counted =
        |i: usize| -> u64 { rows.iter().map(|r| r["packets"][i].as_u64().unwrap()).sum() };
    let (conntrack_out, conntrack_in) = (counted(0), counted(1));
    let mut sy = net.sy;
    let stats = sy.stop_json();
    let engine = &stats["engine"];
    let by_worker = engine["worker_forwarded"].as_u64().unwrap();
    assert!(by_worker > 1000, "the worker translated: {stats}");
    let nat = &engine["nat"];
    eprintln!(
        "the worker forwarded {by_worker} packets; NAT translated {} out, {} in",
        nat["translated_out"], nat["translated_in"]
    );
    // Every translated packet is in both tallies, whichever thread translated it; a worker's
    // packet caught by a connection's close may miss the connection's count, no more.
    for (counted, stated) in [
        (conntrack_out, nat["translated_out"].as_u64().unwrap()),
        (conntrack_in, nat["translated_in"].as_u64().unwrap()),
    ] {
        assert!(
            counted <= stated && stated - counted <= 16,
            "conntrack {counted}, stats {stated}: {table} {stats}"
        );
    }
}

/// The sum of every `key` anywhere in `value`.
fn sum_of(value: &serde_json::Value, key: &str) -> u64 {
    match value {
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                if k == key {
                    v.as_u64().unwrap_or(0)
                } else {
                    sum_of(v, key)
                }
            })
            .sum(),
        serde_json::Value::Array(items) => items.iter().map(|v| sum_of(v, key)).sum(),
        _ => 0,
    }
}

/// The uplink with `<sy:uplink rx='ring'>`: frames from the outside arrive through a
/// TPACKET_V3 ring, 64 KB GRO frames included, and fragments and bulk TCP cross both ways.
#[test]
fn the_tpacket_v3_ring_uplink_carries_fragments_and_bulk_tcp() {
    require(&["iperf3", "ss"]);
    let net = nat_net_with(1, "", 1500, "ring");
    let (g, outside) = (&net.guests[0], &net.outside);
    g.must(&["ping", "-c", "3", "-i", "0.2", "-W", "2", OUTSIDE]);
    g.must(&[
        "ping", "-c", "2", "-i", "0.2", "-W", "2", "-s", "4000", OUTSIDE,
    ]);
    for extra in [&[][..], &["-R"][..]] {
        let _server = outside.spawn(&["iperf3", "-s", "-1", "-B", OUTSIDE]);
        outside.wait_listening(5201);
        let mut argv = vec!["timeout", "30", "iperf3", "-c", OUTSIDE, "-t", "2", "-J"];
        argv.extend_from_slice(extra);
        let bps = iperf3_received_bps(&g.must(&argv));
        assert!(bps > 1e8, "iperf3 {extra:?} over the ring: {bps} bit/s");
    }
    let mut sy = net.sy;
    let stats = sy.stop_json();
    assert!(
        stats["engine"]["nat"]["fragments_translated"]
            .as_u64()
            .unwrap()
            >= 4,
        "{stats}"
    );
    // No frame was cut to fit a ring block: 64 KB GRO frames fit.
    assert_eq!(sum_of(&stats, "drop_ring_truncated"), 0, "{stats}");
}

#[test]
fn two_guests_on_one_source_port_get_distinct_mappings() {
    require(&["ss"]);
    let net = nat_net(2, "");
    let _reflector = net.outside.spawn(&["python3", "-c", UDP_REFLECTOR, "7000"]);
    net.outside.wait_listening(7000);
    let a = python(&net.guests[0], ASK_REFLECTOR, &["5000", "7000"]);
    let b = python(&net.guests[1], ASK_REFLECTOR, &["5000", "7000"]);
    let (a, b) = (a.trim(), b.trim());
    assert_eq!(a, format!("{EXTERNAL}:5000"), "the first keeps its port");
    let (addr, port) = b.split_once(':').unwrap();
    assert_eq!(addr, EXTERNAL);
    let port: u32 = port.parse().unwrap();
    assert!(port != 5000 && (1024..=65535).contains(&port), "{b}");
}

/// Guest A learns its mapping from the reflector, then waits; guest B sends to A's mapping.
const HAIRPIN_LISTENER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 6000))
s.settimeout(10)
s.sendto(b"who am i", ("203.0.113.1", 7000))
print(s.recvfrom(100)[0].decode(), flush=True)
data, peer = s.recvfrom(100)
print("%s from %s:%d" % (data.decode(), peer[0], peer[1]), flush=True)
"#;

// RFC 4787 6 (REQ-9): a guest reaches another through the external address and its mapped
// port, and sees the sender's external address as the source.
#[test]
fn hairpinning_between_guests() {
    require(&["ss"]);
    let net = nat_net(2, "<sy:nat filtering='endpoint-independent'/>");
    let _reflector = net.outside.spawn(&["python3", "-c", UDP_REFLECTOR, "7000"]);
    net.outside.wait_listening(7000);
    let out = net.dir.0.join("listener.txt");
    let _listener = net.guests[0].spawn(&[
        "sh",
        "-c",
        &format!("python3 -c '{HAIRPIN_LISTENER}' > {}", out.display()),
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mapping = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if let Some(line) = text.lines().next() {
            break line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "listener never learned its mapping"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (_, port) = mapping.split_once(':').unwrap();
    // The hairpinned datagram, traced: out through NAT and straight back in to guest 0.
    let tracer = Tracer::start(
        "nat",
        &control(&net),
        &[
            "--count",
            "1",
            "--filter",
            "udp and port 6001",
            "--duration",
            "10",
        ],
    );
    python(
        &net.guests[1],
        "import socket, sys\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0', 6001))\n\
         s.sendto(b'hello', ('203.0.113.2', int(sys.argv[1])))\n",
        &[port],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if let Some(line) = text.lines().nth(1) {
            assert_eq!(line, format!("hello from {EXTERNAL}:6001"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hairpinned datagram never arrived"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let traced = tracer.output();
    for needle in [
        "IPv4 UDP 192.168.122.11:6001 > 203.0.113.2:",
        "nat.hairpinned +1",
        "> 52:54:00:c0:00:01, IPv4 UDP 203.0.113.2:6001 > 192.168.122.10:",
        "verdict: forward to port",
    ] {
        assert!(traced.contains(needle), "{needle}:\n{traced}");
    }
}

// `switchyard capture` writes pcap that tcpdump reads: on the guest's port the packets carry
// the guest's address, on the uplink the same pings carry the external one (after NAT).
#[test]
fn captures_show_packets_before_and_after_nat() {
    require(&["tcpdump"]);
    let net = nat_net(1, "");
    let g = &net.guests[0];
    g.must(&["ping", "-c", "1", "-W", "2", OUTSIDE]);
    let bin = switchyard_bin().display().to_string();
    let socket = control(&net);
    let mut captures = Vec::new();
    for (port, file) in [
        ("eth0", "guest.pcap"),
        ("up0(uplink)", "uplink.pcap"),
        ("gateway", "gateway.pcap"),
    ] {
        let path = net.dir.file(file);
        let child = std::process::Command::new(&bin)
            .args([
                "capture", "nat", "--socket", &socket, "--port", port, "-w", &path,
            ])
            .args(["--count", "4", "--duration", "10"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        captures.push((child, path));
    }
    std::thread::sleep(Duration::from_millis(500));
    g.must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", OUTSIDE]);
    g.must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", "192.168.122.1"]);
    let mut seen = Vec::new();
    for (mut child, path) in captures {
        assert!(child.wait().unwrap().success());
        seen.push(must(&["tcpdump", "-n", "-r", &path]));
    }
    assert!(
        seen[0].contains("192.168.122.10 > 203.0.113.1: ICMP echo request"),
        "{}",
        seen[0]
    );
    assert!(
        seen[1].contains("203.0.113.2 > 203.0.113.1: ICMP echo request")
            && seen[1].contains("203.0.113.1 > 203.0.113.2: ICMP echo reply"),
        "{}",
        seen[1]
    );
    // The gateway's own capture: the pings it answered, both ways.
    assert!(
        seen[2].contains("192.168.122.10 > 192.168.122.1: ICMP echo request")
            && seen[2].contains("192.168.122.1 > 192.168.122.10: ICMP echo reply"),
        "{}",
        seen[2]
    );
}

/// Sends one malformed frame out of argv[1]: its source MAC is a multicast address.
const SEND_MALFORMED: &str = r#"
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
s.send(b"\xff" * 6 + b"\x01\x00\x5e\x00\x00\x01" + b"\x08\x00" + bytes(46))
"#;

// `switchyard trace` tells each decision: ARP answered by the gateway, a TCP SYN NATed out
// (flow created, tuple rewritten) and its SYN-ACK translated back, a TTL running out with its
// ICMP error, a malformed frame dropped with its reason.
#[test]
fn traces_tell_each_decision() {
    require(&["traceroute"]);
    let net = nat_net(1, "");
    let (g, outside) = (&net.guests[0], &net.outside);
    let _server = outside.spawn(&[
        "python3", "-c",
        "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('203.0.113.1', 7070))\ns.listen(8)\nwhile True:\n    c, _ = s.accept()\n    c.close()",
    ]);
    outside.wait_listening(7070);
    g.must(&["ip", "neigh", "flush", "all"]);
    let bin = switchyard_bin().display().to_string();
    let tracer = Tracer::start("nat", &control(&net), &["--count", "40", "--duration", "5"]);
    g.must(&["ping", "-c", "1", "-W", "2", "192.168.122.1"]);
    g.must(&[
        "python3",
        "-c",
        "import socket\nsocket.create_connection(('203.0.113.1', 7070), timeout=3).close()",
    ]);
    g.run(&["traceroute", "-n", "-q", "1", "-w", "1", "-m", "1", OUTSIDE]);
    g.must(&["python3", "-c", SEND_MALFORMED, "eth0"]);
    let text = tracer.output();
    for needle in [
        "ARP who-has 192.168.122.1 tell 192.168.122.10",
        "gateway.arp_replies +1",
        "IPv4 TCP 192.168.122.10:",
        "nat.flows_created +1",
        "rewritten: ",
        "> 203.0.113.2:",
        "nat.translated_in +1",
        "icmp_errors_sent +1",
        "verdict: drop (ttl_exceeded)",
        "01:00:5e:00:00:01 > ff:ff:ff:ff:ff:ff",
        "verdict: drop (invalid_source_mac)",
        "verdict: forward to port",
    ] {
        assert!(text.contains(needle), "{needle}:\n{text}");
    }

    // --filter: only what matches (here the SYN and the rest of that connection).
    let filtered = Tracer::start(
        "nat",
        &control(&net),
        &[
            "--count",
            "2",
            "--filter",
            "tcp and port 7070",
            "--duration",
            "5",
        ],
    );
    g.must(&["ping", "-c", "1", "-W", "2", "192.168.122.1"]);
    g.must(&[
        "python3",
        "-c",
        "import socket\nsocket.create_connection(('203.0.113.1', 7070), timeout=3).close()",
    ]);
    let text = filtered.output();
    assert!(
        text.contains("frame 2:") && !text.contains("frame 3:"),
        "{text}"
    );
    assert!(!text.contains("ICMP") && text.contains(":7070"), "{text}");

    // --inject: an ARP request from a MAC no guest has, run through without being sent.
    let frame = net.dir.file("arp.hex");
    std::fs::write(
        &frame,
        "ffffffffffff 5254000000ee 0806 0001 0800 06 04 0001 5254000000ee c0a87a63 \
         000000000000 c0a87a01",
    )
    .unwrap();
    let injected = must(&[
        &bin,
        "trace",
        "nat",
        "--socket",
        &control(&net),
        "--port",
        "eth0",
        "--inject",
        &frame,
    ]);
    for needle in [
        "ARP who-has 192.168.122.1 tell 192.168.122.99",
        "fdb.learned +1",
        "gateway.arp_replies +1",
        "(injected: nothing was sent)",
    ] {
        assert!(injected.contains(needle), "{needle}:\n{injected}");
    }
}

// A fault on the host side: the uplink goes down (the guests' packets for the outside are
// dropped and counted, the gateway still answers them) and comes back up; NAT carries again
// without a restart.
#[test]
fn an_uplink_that_goes_down_and_up_carries_again() {
    let net = nat_net(1, "");
    let g = &net.guests[0];
    g.must(&["ping", "-c", "1", "-W", "2", OUTSIDE]);
    net.sw.must(&["ip", "link", "set", "up0", "down"]);
    let down = g.run(&["ping", "-c", "2", "-i", "0.2", "-W", "1", OUTSIDE]);
    assert!(
        !down.status.success(),
        "the outside answered over a downed link"
    );
    g.must(&["ping", "-c", "1", "-W", "2", "192.168.122.1"]);
    net.sw.must(&["ip", "link", "set", "up0", "up"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !g
        .run(&["ping", "-c", "1", "-W", "1", OUTSIDE])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "NAT never carried again");
    }
}

/// USO through packet NAT, both ways. A guest's `UDP_SEGMENT` send of ten datagrams reaches
/// the engine as one super-frame, is translated once (source address and checksum's partial
/// sum, RFC 1624) and leaves the uplink's packet socket still one frame, with its virtio-net
/// header: the outside's kernel hands its socket the ten datagrams, from the external address.
/// The outside answers the same way: its super-frame arrives whole through the uplink (read
/// and ring), is translated back once, and the guest's kernel splits it.
// RFC 1812 4.2.2.5 / RFC 1191, as Linux forwards a GSO packet: a USO send with DF whose
// datagrams (1400 + 28 bytes each) fit the guest's MTU but not the uplink's (1400) gets
// fragmentation-needed from the gateway, and the guest's kernel learns the path MTU.
#[test]
fn a_super_frame_too_big_for_the_uplink_gets_fragmentation_needed() {
    let net = nat_net_with_mtu(1, "", 1400);
    let g = &net.guests[0];
    g.must(&["ping", "-c", "1", "-W", "2", OUTSIDE]);
    // The socket stays open a moment: the guest's kernel takes the error to a live socket.
    let sender = format!("{USO_SENDER}\nimport time\ntime.sleep(1)\n");
    g.must(&[
        "timeout", "10", "python3", "-c", &sender, OUTSIDE, "9000", "40000", "1400", "df",
    ]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let route = g.must(&["ip", "route", "get", OUTSIDE]);
        if route.contains("mtu 1400") {
            break;
        }
        assert!(Instant::now() < deadline, "no path MTU learned: {route}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats = stats_of(&control(&net));
    assert!(sum_of(&stats, "drop_needs_fragmentation") >= 1, "{stats}");
}

#[test]
fn a_uso_send_crosses_the_nat_as_one_frame_each_way() {
    require(&["ss"]);
    for uplink_rx in ["read", "ring"] {
        let net = nat_net_with(1, "", 1500, uplink_rx);
        let (g, outside) = (&net.guests[0], &net.outside);
        g.must(&["ping", "-c", "1", "-W", "2", OUTSIDE]);
        let tracer = Tracer::start(
            "nat",
            &control(&net),
            &[
                "--count",
                "20",
                "--filter",
                "udp and port 9000",
                "--duration",
                "4",
            ],
        );
        let receiver = uso_receiver(outside, OUTSIDE, 9000);
        g.must(&[
            "timeout", "10", "python3", "-c", USO_SENDER, OUTSIDE, "9000", "40000",
        ]);
        let got = receiver.join().unwrap();
        assert_eq!(got.trim(), uso_received_from(&format!("{EXTERNAL}:40000")));

        let receiver = uso_receiver(g, "0.0.0.0", 40000);
        outside.must(&[
            "timeout", "10", "python3", "-c", USO_SENDER, EXTERNAL, "40000", "9000",
        ]);
        let got = receiver.join().unwrap();
        assert_eq!(
            got.trim(),
            uso_received_from(&format!("{OUTSIDE}:9000")),
            "rx={uplink_rx}"
        );

        let trace = tracer.output();
        assert!(
            trace.contains("frame 2:") && !trace.contains("frame 3:"),
            "one frame each way (rx={uplink_rx}):\n{trace}"
        );
        assert_eq!(
            trace
                .matches("[GSO UDP (type 5), segments of 1200], 12042 bytes")
                .count(),
            4,
            "each frame as it came and as rewritten (rx={uplink_rx}):\n{trace}"
        );
        for needle in [
            "192.168.122.10:40000 > 203.0.113.1:9000",
            "203.0.113.2:40000 > 203.0.113.1:9000",
            "203.0.113.1:9000 > 192.168.122.10:40000",
            "nat.translated_out +1",
            "nat.translated_in +1",
        ] {
            assert!(
                trace.contains(needle),
                "{needle} (rx={uplink_rx}):\n{trace}"
            );
        }
        let mut sy = net.sy;
        let stats = sy.stop_json();
        assert_eq!(sum_of(&stats, "drop_tx_error"), 0, "{stats}");
        assert_eq!(sum_of(&stats, "drop_ring_truncated"), 0, "{stats}");
    }
}

// RFC 5382 5 / Linux's early_drop: a guest at its cap of connections that are not assured (a
// UDP flow per query, each answered once) makes room for the next from the oldest of them,
// rather than being refused everything for the 5 minutes they last.
#[test]
fn a_guest_querying_from_a_new_port_each_time_is_not_locked_out_by_its_cap() {
    let net = nat_net(1, "<sy:nat max-flows-per-guest='8'/>");
    let _reflector = net.outside.spawn(&["python3", "-c", UDP_REFLECTOR, "7000"]);
    let _acceptor = net.outside.spawn(&["python3", "-c", TCP_ACCEPTOR, "7001"]);
    net.outside.wait_listening(7000);
    net.outside.wait_listening(7001);
    let out = python(&net.guests[0], MANY_QUERIES, &["7000", "40", "7001"]);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["40", "tcp ok"], "{out}");
    let mut sy = net.sy;
    let stats = sy.stop_json();
    let nat = &stats["engine"]["nat"];
    assert!(
        nat["flows_evicted"].as_u64().unwrap() >= 32,
        "each query past the cap took the oldest one's place: {nat}"
    );
    let count = |name: &str| nat[name].as_u64().unwrap();
    let held = count("flows_created") - count("flows_evicted") - count("flows_expired");
    assert!(held <= 8, "never more than the cap held: {nat}");
}
