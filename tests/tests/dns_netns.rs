//! DNS end to end: `dig` and busybox `nslookup` in guest namespaces ask the gateway
//! (192.168.122.1), which answers local names itself and forwards the rest, from a host
//! socket of switchyard's namespace, to stub DNS servers in an `outside` namespace the test
//! creates (never the machine's resolvers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};
use switchyard_tests::*;

const STUB1: &str = "203.0.113.1";
const STUB2: &str = "203.0.113.4";

struct DnsNet {
    // Field order is drop order: switchyard stops before its namespaces go.
    sy: Switchyard,
    guests: Vec<Netns>,
    _sw: Netns,
    outside: Netns,
    dir: TempDir,
}

/// An isolated network with DHCP and DNS; upstreams are the two stubs, in this order.
fn dns_net(guests: usize) -> DnsNet {
    let forwarders = format!("<forwarder addr='{STUB1}'/>\n<forwarder addr='{STUB2}'/>");
    dns_net_with(guests, &forwarders, None)
}

/// `forwarders` is the <forwarder> elements; without them, upstreams come from the
/// resolv.conf `resolv_conf` (a file of the test's). The network is isolated, but for a
/// resolv.conf: libvirt gives isolated networks' dnsmasq `no-resolv`, so only a NAT network
/// forwards to the host's resolvers.
fn dns_net_with(guests: usize, forwarders: &str, resolv_conf: Option<&str>) -> DnsNet {
    require(&["ip", "busybox", "dig", "python3"]);
    let dir = TempDir::new("sydns");
    let outside = Netns::new("o");
    let sw = Netns::new("s");
    sw.veth_to("up0", &outside, "eth0");
    sw.must(&["ip", "addr", "add", "203.0.113.3/24", "dev", "up0"]);
    sw.must(&["ip", "link", "set", "up0", "up"]);
    outside.must(&["ip", "addr", "add", "203.0.113.1/24", "dev", "eth0"]);
    outside.must(&["ip", "addr", "add", "203.0.113.4/24", "dev", "eth0"]);
    outside.must(&["ip", "link", "set", "eth0", "up"]);
    let xml = dir.0.join("net.xml");
    let forward = if resolv_conf.is_some() {
        "<forward mode='nat'/>"
    } else {
        ""
    };
    std::fs::write(
        &xml,
        format!(
            "<network>\n<name>dns</name>\n{forward}\n<domain name='lab' localOnly='yes'/>\n\
             <dns>\n\
               {forwarders}\n\
               <host ip='192.168.122.7'><hostname>printer</hostname><hostname>lpr</hostname></host>\n\
               <txt name='motd.lab' value='hello from the gateway'/>\n\
               <srv service='ldap' protocol='tcp' domain='lab' target='printer.lab' port='389' priority='1' weight='5'/>\n\
             </dns>\n\
             <ip address='192.168.122.1' netmask='255.255.255.0'>\n<dhcp>\n\
               <range start='192.168.122.100' end='192.168.122.150'/>\n\
               <host mac='52:54:00:e0:00:99' name='fixed' ip='192.168.122.50'/>\n\
             </dhcp>\n</ip>\n</network>\n"
        ),
    )
    .unwrap();
    let guests: Vec<Netns> = (0..guests).map(|_| Netns::new("g")).collect();
    let mut args = vec![
        "run".to_string(),
        xml.display().to_string(),
        "--json".into(),
        "--control".into(),
        dir.file("ctl.sock"),
    ];
    if let Some(path) = resolv_conf {
        args.push("--resolv-conf".into());
        args.push(path.into());
    }
    for (i, g) in guests.iter().enumerate() {
        args.push("--tap".into());
        args.push(g.tap_arg("eth0", &format!("52:54:00:e0:00:{:02x}", i + 1)));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sy = Switchyard::start_in(Some(&sw), &args);
    let script = dir.0.join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\ncase \"$1\" in\n  bound|renew) ip -4 addr flush dev \"$interface\"; \
         ip addr add \"$ip/$mask\" dev \"$interface\" ;;\nesac\n",
    )
    .unwrap();
    must(&["chmod", "+x", &script.display().to_string()]);
    for (i, g) in guests.iter().enumerate() {
        g.must(&["ip", "link", "set", "eth0", "up"]);
        let hostname = format!("hostname:guest{}", i + 1);
        g.udhcpc("eth0", &script.display().to_string(), &["-x", &hostname]);
    }
    DnsNet {
        sy,
        guests,
        _sw: sw,
        outside,
        dir,
    }
}

fn dig(g: &Netns, args: &[&str]) -> String {
    let mut argv = vec!["dig", "@192.168.122.1", "+time=3", "+tries=1"];
    argv.extend_from_slice(args);
    g.must(&argv)
}

fn short(g: &Netns, args: &[&str]) -> String {
    let mut argv = vec!["+short"];
    argv.extend_from_slice(args);
    dig(g, &argv).trim().to_string()
}

fn status(g: &Netns, args: &[&str]) -> String {
    let out = dig(g, args);
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("no status: {out}"))
        .to_string()
}

fn start_stub(net: &DnsNet, addr: &str, tag: &str) -> Background {
    let stub = net
        .outside
        .spawn(&["python3", "-c", STUB_DNS_SERVER, addr, tag]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !net
        .outside
        .must(&["ss", "-lnu"])
        .contains(&format!("{addr}:53 "))
    {
        assert!(Instant::now() < deadline, "stub {addr} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    stub
}

// Local data, as libvirt's dnsmasq serves it: each guest's lease name (plain and under the
// domain) with its PTR, another guest's name, a <dhcp><host> and a <dns><host> with two names,
// TXT and SRV (RFC 2782), NXDOMAIN for an unknown name under the domain, NODATA for a type a
// local name lacks (the domain is localOnly, so unknown names under it are not forwarded);
// busybox nslookup sees the same.
#[test]
fn local_names_from_leases_hosts_and_records() {
    let net = dns_net(2);
    let (g1, g2) = (&net.guests[0], &net.guests[1]);
    let ip1 = short(g1, &["guest1.lab"]);
    assert!(ip1.starts_with("192.168.122.1"), "{ip1}");
    assert_eq!(short(g1, &["guest1"]), ip1);
    assert_eq!(short(g1, &["-x", &ip1]), "guest1.lab.");
    let ip2 = short(g1, &["guest2.lab"]);
    assert!(ip2.starts_with("192.168.122.1") && ip2 != ip1, "{ip2}");
    assert_eq!(short(g2, &["guest1.lab"]), ip1);
    assert_eq!(short(g1, &["fixed.lab"]), "192.168.122.50");
    assert_eq!(short(g1, &["printer.lab"]), "192.168.122.7");
    assert_eq!(short(g1, &["lpr"]), "192.168.122.7");
    assert_eq!(short(g1, &["-x", "192.168.122.7"]), "printer.lab.");
    assert_eq!(
        short(g1, &["motd.lab", "TXT"]),
        "\"hello from the gateway\""
    );
    assert_eq!(
        short(g1, &["_ldap._tcp.lab", "SRV"]),
        "1 5 389 printer.lab."
    );
    assert_eq!(status(g1, &["nosuchhost.lab"]), "NXDOMAIN");
    assert_eq!(status(g1, &["-x", "192.168.122.222"]), "NXDOMAIN");
    let nodata = dig(g1, &["guest1.lab", "AAAA"]);
    assert!(
        nodata.contains("status: NOERROR") && nodata.contains("ANSWER: 0"),
        "{nodata}"
    );
    let nslookup = g2.must(&["busybox", "nslookup", "guest1.lab", "192.168.122.1"]);
    assert!(nslookup.contains(&ip1), "{nslookup}");

    // A released lease takes its name with it: a running udhcpc releases on SIGUSR2.
    let script = net.dir.file("udhcpc.sh");
    let pidfile = net.dir.file("udhcpc2.pid");
    let acks = || -> u64 {
        let bin = switchyard_bin().display().to_string();
        let stats = must(&[&bin, "stats", "--socket", &net.dir.file("ctl.sock")]);
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        stats["engine"]["dhcp"]["acks"].as_u64().unwrap()
    };
    let before = acks();
    let _udhcpc = g2.spawn_udhcpc("eth0", &script, &pidfile, "guest2");
    // Bound (acknowledged) before it is asked to release.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&pidfile).is_err() || acks() == before {
        assert!(
            Instant::now() < deadline,
            "udhcpc did not get guest2's lease again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(short(g1, &["guest2.lab"]), ip2);
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    must(&["kill", "-USR2", pid.trim()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(g1, &["guest2.lab"]) != "NXDOMAIN" {
        assert!(Instant::now() < deadline, "guest2.lab outlived its lease");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status(g1, &["guest2.lab"]), "NXDOMAIN");
    assert_eq!(status(g1, &["-x", &ip2]), "NXDOMAIN");
}

// Forwarding (strict-order), the cache, and failover: a forwarded name comes from the first
// stub; once it is stopped the cached answer still comes back (TTL counting down), and a new
// name is answered by the second stub after the first times out.
#[test]
fn forwarding_cache_and_strict_order_failover() {
    let net = dns_net(1);
    let g = &net.guests[0];
    let stub1 = start_stub(&net, STUB1, "1");
    let _stub2 = start_stub(&net, STUB2, "2");
    assert_eq!(short(g, &["www.example.test"]), "198.51.100.1");
    assert_eq!(status(g, &["nothing.invalid"]), "NXDOMAIN");
    drop(stub1);
    std::thread::sleep(Duration::from_millis(1100));
    let cached = dig(g, &["www.example.test"]);
    assert!(cached.contains("198.51.100.1"), "{cached}");
    let ttl: u32 = cached
        .lines()
        .find(|l| l.starts_with("www.example.test."))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|t| t.parse().ok())
        .unwrap();
    assert!(ttl < 300, "TTL counts down in the cache: {ttl}");
    let mut argv = vec!["dig", "@192.168.122.1", "+time=8", "+tries=1", "+short"];
    argv.push("other.example.test");
    assert_eq!(
        g.must(&argv).trim(),
        "198.51.100.2",
        "failed over to the second stub"
    );

    // Every upstream unreachable (issue 11's faults): a forwarded name fails as SERVFAIL once
    // the forwarder gives up, and local names are still answered.
    drop(_stub2);
    assert_eq!(
        status(g, &["+time=12", "+tries=1", "gone.example.test"]),
        "SERVFAIL"
    );
    assert_eq!(short(g, &["printer.lab"]), "192.168.122.7");

    let mut sy = net.sy;
    let dns = &sy.stop_json()["engine"]["dns"];
    assert!(dns["cache_hits"].as_u64().unwrap() >= 1, "{dns}");
    assert!(dns["upstream_timeouts"].as_u64().unwrap() >= 1, "{dns}");
}

// RFC 6891 / RFC 1035 4.2.1: an answer larger than the client's UDP size comes back
// truncated (TC) without EDNS0, and whole with a large enough EDNS0 buffer; RFC 7766: the
// client's retry over TCP gets it whole, and `dig +tcp` asks over TCP from the start, for
// local and forwarded names, several queries on one connection too.
#[test]
fn large_answers_are_truncated_for_small_udp_buffers_and_whole_over_tcp() {
    let net = dns_net(1);
    let g = &net.guests[0];
    let _stub1 = start_stub(&net, STUB1, "1");
    let small = dig(g, &["+noedns", "+ignore", "big.example.test", "TXT"]);
    assert!(small.contains(" tc") || small.contains("tc "), "{small}");
    let big = dig(g, &["+bufsize=1232", "big.example.test", "TXT"]);
    assert!(
        big.contains("ANSWER: 1") && big.contains("MSG SIZE"),
        "{big}"
    );
    let size: usize = big
        .split("MSG SIZE  rcvd: ")
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .unwrap();
    assert!(size > 512, "{size}");

    // Without +ignore, dig retries a truncated answer over TCP.
    let retried = dig(g, &["+noedns", "big.example.test", "TXT"]);
    assert!(
        retried.contains("ANSWER: 1") && retried.contains("(TCP)"),
        "{retried}"
    );
    assert_eq!(short(g, &["+tcp", "www.example.test"]), "198.51.100.1");
    let ip1 = short(g, &["guest1.lab"]);
    let several = short(
        g,
        &[
            "+tcp",
            "+keepopen",
            "guest1.lab",
            "printer.lab",
            "fixed.lab",
        ],
    );
    assert_eq!(
        several.lines().collect::<Vec<_>>(),
        [ip1.as_str(), "192.168.122.7", "192.168.122.50"]
    );
    for _ in 0..40 {
        assert_eq!(short(g, &["+tcp", "printer.lab"]), "192.168.122.7");
    }
}

// Without <forwarder>, the upstreams are the nameservers of resolv.conf, re-read when it
// changes (as dnsmasq does); here a resolv.conf of the test's, naming the stubs.
#[test]
fn upstreams_follow_resolv_conf() {
    let dir = TempDir::new("syrc");
    let resolv = dir.file("resolv.conf");
    std::fs::write(&resolv, format!("# test\nnameserver {STUB1}\n")).unwrap();
    let net = dns_net_with(1, "", Some(&resolv));
    let g = &net.guests[0];
    let _stub1 = start_stub(&net, STUB1, "1");
    let _stub2 = start_stub(&net, STUB2, "2");
    assert_eq!(short(g, &["one.example.test"]), "198.51.100.1");
    std::fs::write(&resolv, format!("nameserver {STUB2}\noptions edns0\n")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        n += 1;
        let name = format!("fresh{n}.example.test");
        if short(g, &[&name]) == "198.51.100.2" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "resolv.conf change not picked up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends malformed DNS queries to the gateway from UDP port argv[1]: truncated headers,
/// compression loops, huge counts, a response instead of a query, random bytes. Bounded.
const GARBAGE_QUERIES: &str = r#"
import os, random, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.01)
random.seed(7)
kinds = [
    lambda: b"\x12",
    lambda: struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01",
    lambda: struct.pack("!HHHHHH", 2, 0x0100, 0xffff, 0xffff, 0xffff, 0xffff) + b"\x01a\x00\x00\x01\x00\x01",
    lambda: struct.pack("!HHHHHH", 3, 0x8180, 1, 0, 0, 0) + b"\x01a\x00\x00\x01\x00\x01",
    lambda: struct.pack("!HHHHHH", 4, 0x0100, 1, 0, 0, 0) + b"\x3fabc",
    lambda: os.urandom(random.randint(0, 300)),
]
for _ in range(int(sys.argv[1])):
    for k in kinds:
        s.sendto(k(), ("192.168.122.1", 53))
        try:
            s.recv(4096)
        except OSError:
            pass
print("done")
"#;

// Bad input costs a counter, never a panic: one guest sends malformed queries while another
// keeps resolving.
#[test]
fn malformed_queries_are_dropped_or_formerr_while_another_client_resolves() {
    let net = dns_net(2);
    let (bad, good) = (&net.guests[0], &net.guests[1]);
    let sprayer = bad.spawn(&["timeout", "30", "python3", "-c", GARBAGE_QUERIES, "200"]);
    for _ in 0..20 {
        assert!(short(good, &["guest1.lab"]).starts_with("192.168.122."));
    }
    let mut sprayer = sprayer;
    let deadline = Instant::now() + Duration::from_secs(30);
    while sprayer.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the sprayer did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut sy = net.sy;
    let stats = sy.stop_json();
    let dns = &stats["engine"]["dns"];
    let rejected =
        dns["formerr"].as_u64().unwrap_or(0) + dns["dropped_malformed"].as_u64().unwrap_or(0);
    assert!(rejected >= 200 * 3, "{dns}");
    let _ = net.dir;
}
