//! Hostile guests, end to end: clean-traffic (spoofed addresses, a rogue DHCP server) and the
//! per-port rate caps (a broadcast storm, a DNS flood), with real clients in namespaces.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;
use switchyard_tests::*;

struct GuardNet {
    // Field order is drop order: switchyard stops before its namespaces go.
    sy: Switchyard,
    guests: Vec<Netns>,
    _sw: Netns,
    dir: TempDir,
}

impl GuardNet {
    fn stats(&self) -> serde_json::Value {
        stats_of(&self.dir.file("ctl.sock"))
    }

    fn drops(&self, port: usize, reason: &str) -> u64 {
        port_counters(&self.stats(), port)[format!("drop_{reason}")]
            .as_u64()
            .unwrap_or(0)
    }
}

fn guard_net(guard: &str) -> GuardNet {
    guard_net_with(guard, ["", ""])
}

/// `port_options` are appended to each guest's `--tap` (`,filter=...`).
fn guard_net_with(guard: &str, port_options: [&str; 2]) -> GuardNet {
    require(&["ip", "busybox", "python3", "ping"]);
    let dir = TempDir::new("syguard");
    let sw = Netns::new("s");
    let xml = dir.write(
        "guard.xml",
        &format!(
            "<network xmlns:sy='urn:switchyard:network:1'>\n\
             <name>guard</name>\n\
             <domain name='lab'/>\n\
             <ip address='192.168.122.1' netmask='255.255.255.0'>\n\
               <dhcp><range start='192.168.122.100' end='192.168.122.150'/></dhcp>\n\
             </ip>\n\
             {guard}\n\
             </network>\n"
        ),
    );
    let guests: Vec<Netns> = (0..2).map(|_| Netns::new("g")).collect();
    let control = dir.file("ctl.sock");
    let mut args = vec![
        "run".to_string(),
        xml,
        "--json".into(),
        "--control".into(),
        control,
    ];
    for (i, g) in guests.iter().enumerate() {
        args.push("--tap".into());
        let mac = format!("52:54:00:9a:00:{:02x}", i + 1);
        args.push(format!("{}{}", g.tap_arg("eth0", &mac), port_options[i]));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sy = Switchyard::start_in(Some(&sw), &args);
    GuardNet {
        sy,
        guests,
        _sw: sw,
        dir,
    }
}

fn lease(net: &GuardNet, guest: usize) -> (String, String) {
    let script = udhcpc_script(&net.dir);
    net.guests[guest].udhcpc("eth0", &script, &[]);
    let lease = std::fs::read_to_string(format!("{script}.lease")).unwrap();
    let mut words = lease.split_whitespace().map(str::to_string);
    (words.next().unwrap(), words.next().unwrap())
}

// libvirt's clean-traffic: no-mac-spoofing, no-ip-spoofing, no-arp-spoofing, and no DHCP
// server on a guest (libvirt's no-other-l2-traffic aside).
#[test]
fn clean_traffic_stops_spoofed_addresses_and_a_rogue_dhcp_server() {
    let mut net = guard_net("<sy:guard clean-traffic='yes'/>");
    let (ip1, server) = lease(&net, 0);
    assert_eq!(server, "192.168.122.1");
    let g1 = &net.guests[0];
    g1.must(&["ping", "-c", "1", "-W", "2", "192.168.122.1"]);

    // An address DHCP did not lease: nothing from it gets through.
    assert!(
        !spoofed_ping_answered(&net, 0),
        "a spoofed source got an answer"
    );
    assert!(net.drops(0, "spoofed_ip") >= 1);

    // Another MAC on the same port: dropped.
    g1.must(&["ip", "link", "set", "eth0", "address", "52:54:00:9a:00:66"]);
    let moved = g1.run(&["ping", "-c", "1", "-W", "1", "192.168.122.1"]);
    assert!(!moved.status.success(), "a spoofed MAC got an answer");
    assert!(net.drops(0, "spoofed_mac") >= 1);
    g1.must(&["ip", "link", "set", "eth0", "address", "52:54:00:9a:00:01"]);
    g1.must(&["ip", "neigh", "flush", "dev", "eth0"]);
    g1.must(&["ping", "-c", "1", "-W", "2", "192.168.122.1"]);

    // A rogue DHCP server on the first guest: the second guest never hears it.
    let conf = net.dir.write(
        "udhcpd.conf",
        &format!(
            "start 192.168.122.200\nend 192.168.122.210\ninterface eth0\n\
             lease_file {}\nopt router 192.168.122.66\n",
            net.dir.file("udhcpd.leases")
        ),
    );
    std::fs::write(net.dir.file("udhcpd.leases"), b"").unwrap();
    let _rogue = g1.spawn(&["busybox", "udhcpd", "-f", &conf]);
    std::thread::sleep(Duration::from_millis(300));
    let (ip2, server2) = lease(&net, 1);
    assert_eq!(server2, "192.168.122.1", "the rogue server answered");
    assert_ne!(ip1, ip2);
    // udhcpd probes the address by ARP before it offers: its offer comes a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while net.drops(0, "rogue_server") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the rogue offer was never seen"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, _, log) = net.sy.stop_with("TERM");
    assert!(log.contains("clean-traffic is dropping frames"), "{log}");
}

/// A spoofed source from `guest`: whether the gateway answered its ping.
fn spoofed_ping_answered(net: &GuardNet, guest: usize) -> bool {
    let g = &net.guests[guest];
    g.must(&["ip", "addr", "add", "192.168.122.99/24", "dev", "eth0"]);
    let out = g.run(&[
        "ping",
        "-c",
        "1",
        "-W",
        "1",
        "-I",
        "192.168.122.99",
        "192.168.122.1",
    ]);
    g.must(&["ip", "addr", "del", "192.168.122.99/24", "dev", "eth0"]);
    out.status.success()
}

// libvirt puts `<filterref filter='clean-traffic'/>` on one interface: so does
// `--tap NAME,filter=clean-traffic` (and `attach-interface --filter`), and `filter=none` lifts
// the network's filter from one port.
#[test]
fn clean_traffic_per_port() {
    let net = guard_net_with("", [",filter=clean-traffic", ""]);
    lease(&net, 0);
    lease(&net, 1);
    assert!(!spoofed_ping_answered(&net, 0), "port 0 is filtered");
    assert!(net.drops(0, "spoofed_ip") >= 1);
    assert!(spoofed_ping_answered(&net, 1), "port 1 is not filtered");
    drop(net);
    let net = guard_net_with("<sy:guard clean-traffic='yes'/>", ["", ",filter=none"]);
    lease(&net, 0);
    lease(&net, 1);
    assert!(
        !spoofed_ping_answered(&net, 0),
        "the network filters port 0"
    );
    assert!(spoofed_ping_answered(&net, 1), "port 1 is exempt");
    assert_eq!(net.drops(1, "spoofed_ip"), 0);
}

#[test]
fn storm_control_and_the_dns_rate_cap_hold_one_guest_to_its_share() {
    let net = guard_net(
        "<sy:guard broadcast-per-second='50' dns-per-second='20'/>\n\
         <dns><host ip='192.168.122.7'><hostname>printer</hostname></host></dns>",
    );
    let (ip1, _) = lease(&net, 0);
    lease(&net, 1);
    // The second guest counts the broadcasts that reach it.
    let listener = net.guests[1].spawn(&[
        "python3",
        "-c",
        &format!(
            "import socket, time\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)\n\
             s.bind(('0.0.0.0', 9999))\n\
             s.settimeout(0.5)\n\
             n = 0\n\
             end = time.time() + 4\n\
             while time.time() < end:\n\
             \x20   try:\n\
             \x20       s.recv(64); n += 1\n\
             \x20   except socket.timeout:\n\
             \x20       pass\n\
             open('{}', 'w').write(str(n))\n",
            net.dir.file("received")
        ),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    // The first guest floods: 2000 broadcasts as fast as it can (bounded).
    net.guests[0].must(&[
        "python3",
        "-c",
        &format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)\n\
             s.bind(('{ip1}', 0))\n\
             for i in range(2000):\n\
             \x20   s.sendto(b'storm', ('255.255.255.255', 9999))\n"
        ),
    ]);
    // ... and 400 DNS queries as fast as it can, counting the answers.
    let answered = net.guests[0].must(&[
        "python3",
        "-c",
        "import socket, struct\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(1)\n\
         q = lambda i: struct.pack('!HHHHHH', i, 0x0100, 1, 0, 0, 0) + b'\\x07printer\\x00\\x00\\x01\\x00\\x01'\n\
         for i in range(400):\n\
         \x20   s.sendto(q(i), ('192.168.122.1', 53))\n\
         n = 0\n\
         try:\n\
         \x20   while True:\n\
         \x20       s.recv(512); n += 1\n\
         except socket.timeout:\n\
         \x20   pass\n\
         print(n)\n",
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while !std::path::Path::new(&net.dir.file("received")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the listener never finished"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(listener);
    let received: u64 = std::fs::read_to_string(net.dir.file("received"))
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0);
    // One second's burst plus the rate for however long the storm lasted.
    assert!(
        (20..400).contains(&received),
        "{received} broadcasts reached the other guest"
    );
    assert!(net.drops(0, "storm_control") >= 1500);
    let answered: u64 = answered.trim().parse().unwrap();
    assert!(
        (15..100).contains(&answered),
        "{answered} of 400 queries answered"
    );
    assert!(net.drops(0, "dns_rate_limited") >= 300);
    // The other guest still resolves and leases: the caps are per port.
    assert_eq!(net.drops(1, "storm_control"), 0);
}
