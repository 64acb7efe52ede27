//! The seeds' other two kinds of network: bridge mode (guests on the host NIC's LAN, served
//! by the LAN's own DHCP server) and isolated (guests, gateway, DHCP and DNS; nothing leaves).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;
use switchyard_tests::*;

// <forward mode='bridge' dev='IF'/>: the NIC is a switch port; a guest on a tap takes its
// address from the LAN's dnsmasq and pings a LAN host, and the engine serves no DHCP of its
// own (the only DHCP answers the guest sees come from the LAN's server). A VM on a stream
// socket, the tap guest and the LAN host all switch to each other by MAC.
#[test]
fn bridge_mode_puts_guests_on_the_lan_of_the_host_nic() {
    require(&["ip", "busybox", "dnsmasq", "tcpdump", "ping", "python3"]);
    let dir = TempDir::new("sybr");
    let (lan, sw, g) = (Netns::new("l"), Netns::new("s"), Netns::new("g"));
    sw.must(&[
        "ip", "link", "add", "eth1", "type", "veth", "peer", "name", "lan0", "netns", &lan.name,
    ]);
    sw.must(&["ip", "link", "set", "eth1", "up"]);
    lan.must(&["ip", "addr", "add", "10.99.0.1/24", "dev", "lan0"]);
    lan.must(&["ip", "link", "set", "lan0", "up"]);
    let _dnsmasq = lan.spawn(&[
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--port=0",
        "--bind-interfaces",
        "--interface=lan0",
        "--except-interface=lo",
        "--dhcp-range=10.99.0.100,10.99.0.150,1h",
        "--no-ping",
        &format!("--dhcp-leasefile={}", dir.file("lan.leases")),
        &format!("--pid-file={}", dir.file("dnsmasq.pid")),
    ]);
    let xml = dir.write(
        "br.xml",
        "<network><name>lanbr</name><forward mode='bridge' dev='eth1'/></network>",
    );
    let tap = g.tap_arg("eth0", "52:54:00:b0:00:01");
    let socket = dir.file("vm.sock");
    let mut sy = Switchyard::start_in(
        Some(&sw),
        &["run", &xml, "--json", "--tap", &tap, "--stream", &socket],
    );
    g.must(&["ip", "link", "set", "eth0", "up"]);
    let capture = dir.file("dhcp.txt");
    let _tcpdump = g.spawn(&[
        "sh",
        "-c",
        &format!("exec tcpdump -i eth0 -n -l 'udp port 67 or udp port 68' > {capture} 2>/dev/null"),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    let script = udhcpc_script(&dir);
    g.udhcpc("eth0", &script, &[]);
    let lease = std::fs::read_to_string(format!("{script}.lease")).unwrap();
    assert!(lease.starts_with("10.99.0.1"), "a LAN address: {lease}");
    assert!(
        lease.trim().ends_with("10.99.0.1"),
        "from the LAN's server: {lease}"
    );
    g.must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.99.0.1"]);
    std::thread::sleep(Duration::from_millis(300));
    let seen = std::fs::read_to_string(&capture).unwrap();
    let replies: Vec<&str> = seen.lines().filter(|l| l.contains(".67 > ")).collect();
    assert!(!replies.is_empty(), "{seen}");
    assert!(
        replies.iter().all(|l| l.contains("10.99.0.1.67 >")),
        "only the LAN's server answers: {seen}"
    );
    // Across port kinds: the VM (stream) reaches the LAN host (NIC) and the tap guest.
    let guest_ip = lease.split_whitespace().next().unwrap();
    for (target, linger) in [("10.99.0.1", "0"), (guest_ip, "1.5")] {
        let vm = std::thread::spawn({
            let (socket, target) = (socket.clone(), target.to_string());
            let linger = linger.to_string();
            move || {
                must(&[
                    "timeout",
                    "20",
                    "python3",
                    "-c",
                    QEMU_LIKE_CLIENT,
                    &socket,
                    &target,
                    &linger,
                    "10.99.0.20",
                ])
            }
        });
        if linger != "0" {
            std::thread::sleep(Duration::from_millis(500));
            // ... and the tap guest reaches the VM.
            g.must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.99.0.20"]);
        }
        assert!(vm.join().unwrap().trim().starts_with("52:54:00:") || target == "10.99.0.1");
    }
    let stats = sy.stop_json();
    assert_eq!(stats["engine"]["dhcp"]["discovers"], 0, "{stats}");
}

// No <forward>: guests reach each other and the gateway (with DHCP), nothing else.
#[test]
fn isolated_networks_keep_everything_inside() {
    require(&["ip", "busybox", "ping"]);
    let dir = TempDir::new("syiso");
    let sw = Netns::new("s");
    let (g1, g2) = (Netns::new("g"), Netns::new("g"));
    // A veth with the host's address: the engine must not send anything out of it.
    let outside = Netns::new("o");
    sw.veth_to("up0", &outside, "eth0");
    // Quiet links: no IPv6 chatter of the kernels' own, so any frame would be the engine's.
    sw.must(&["sysctl", "-qw", "net.ipv6.conf.up0.disable_ipv6=1"]);
    outside.must(&["sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1"]);
    sw.must(&["ip", "addr", "add", "203.0.113.3/24", "dev", "up0"]);
    sw.must(&["ip", "link", "set", "up0", "up"]);
    outside.must(&["ip", "addr", "add", "203.0.113.1/24", "dev", "eth0"]);
    outside.must(&["ip", "link", "set", "eth0", "up"]);
    let xml = dir.write(
        "iso.xml",
        "<network><name>iso</name><ip address='192.168.150.1' netmask='255.255.255.0'>\
         <dhcp><range start='192.168.150.10' end='192.168.150.20'/></dhcp></ip></network>",
    );
    let (t1, t2) = (
        g1.tap_arg("eth0", "52:54:00:c1:00:01"),
        g2.tap_arg("eth0", "52:54:00:c1:00:02"),
    );
    let mut sy = Switchyard::start_in(
        Some(&sw),
        &["run", &xml, "--json", "--tap", &t1, "--tap", &t2],
    );
    let script = udhcpc_script(&dir);
    let mut addrs = Vec::new();
    for g in [&g1, &g2] {
        g.must(&["ip", "link", "set", "eth0", "up"]);
        g.udhcpc("eth0", &script, &[]);
        let lease = std::fs::read_to_string(format!("{script}.lease")).unwrap();
        addrs.push(lease.split_whitespace().next().unwrap().to_string());
        g.must(&["ip", "route", "add", "default", "via", "192.168.150.1"]);
    }
    g1.must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", &addrs[1]]);
    g2.must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", "192.168.150.1"]);
    let out = g1.run(&["ping", "-c", "1", "-W", "1", "203.0.113.1"]);
    assert!(!out.status.success(), "nothing leaves an isolated network");
    let stats = sy.stop_json();
    assert!(
        stats["ports"].as_array().unwrap().len() == 2,
        "two taps, no uplink: {stats}"
    );
    assert_eq!(outside.rx_counters("eth0").0, 0, "the outside saw nothing");
}
