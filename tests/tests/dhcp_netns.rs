//! DHCP end to end with the clients people run: busybox `udhcpc`, ISC `dhclient` and
//! `dhcpcd`, each in a guest namespace on a tap of switchyard, which serves DHCP on the
//! gateway address inside the engine (RFC 2131). The clients' scripts only touch their own
//! namespace's interface (never the host's resolv.conf).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};
use switchyard_tests::*;

struct DhcpNet {
    // Field order is drop order: switchyard stops before its namespaces go.
    sy: Switchyard,
    guests: Vec<Netns>,
    _sw: Netns,
    dir: TempDir,
}

/// The MAC of guest `i` (from 1).
fn mac(i: usize) -> String {
    format!("52:54:00:d0:00:{i:02x}")
}

/// An isolated network 192.168.122.0/24 whose `<dhcp>` holds `dhcp_xml`, with one tap per
/// MAC of `macs`, and its lease file in `state` (the test's own directory when `None`).
fn dhcp_net(dhcp_xml: &str, macs: &[String]) -> DhcpNet {
    let dir = TempDir::new("sydhcp");
    let sw = Netns::new("s");
    let guests: Vec<Netns> = macs.iter().map(|_| Netns::new("g")).collect();
    let sy = start(&dir, &sw, &guests, macs, dhcp_xml);
    for g in &guests {
        g.must(&["ip", "link", "set", "eth0", "up"]);
    }
    write_scripts(&dir);
    DhcpNet {
        sy,
        guests,
        _sw: sw,
        dir,
    }
}

fn start(
    dir: &TempDir,
    sw: &Netns,
    guests: &[Netns],
    macs: &[String],
    dhcp_xml: &str,
) -> Switchyard {
    require(&["ip", "busybox", "dhclient", "dhcpcd", "python3"]);
    let xml = dir.0.join("net.xml");
    std::fs::write(
        &xml,
        format!(
            "<network>\n<name>dhcp</name>\n<domain name='lab'/>\n\
             <ip address='192.168.122.1' netmask='255.255.255.0'>\n<dhcp>\n{dhcp_xml}\n</dhcp>\n</ip>\n\
             </network>\n"
        ),
    )
    .unwrap();
    let mut args = vec![
        "run".to_string(),
        xml.display().to_string(),
        "--json".into(),
        "--control".into(),
        dir.file("ctl.sock"),
        "--state-dir".into(),
        dir.file("state"),
    ];
    for (g, m) in guests.iter().zip(macs) {
        args.push("--tap".into());
        args.push(g.tap_arg("eth0", m));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Switchyard::start_in(Some(sw), &args)
}

/// Client scripts that configure only `$interface` and log each event to `events-NAME`.
fn write_scripts(dir: &TempDir) {
    let udhcpc = format!(
        "#!/bin/sh\n\
         echo \"$1 $ip router=$router dns=$dns domain=$domain\" >> {events}\n\
         case \"$1\" in\n\
           bound|renew) ip -4 addr flush dev \"$interface\"; ip addr add \"$ip/$mask\" dev \"$interface\";\n\
             ip route replace default via \"$router\" ;;\n\
           deconfig) ip -4 addr flush dev \"$interface\" ;;\n\
         esac\n",
        events = dir.file("events-udhcpc")
    );
    let dhclient = format!(
        "#!/bin/sh\n\
         echo \"$reason $new_ip_address router=$new_routers dns=$new_domain_name_servers domain=$new_domain_name\" >> {events}\n\
         case \"$reason\" in\n\
           BOUND|RENEW|REBIND|REBOOT) ip -4 addr flush dev \"$interface\";\n\
             ip addr add \"$new_ip_address/24\" dev \"$interface\" ;;\n\
           RELEASE|EXPIRE|STOP) ip -4 addr flush dev \"$interface\" ;;\n\
         esac\n",
        events = dir.file("events-dhclient")
    );
    for (name, text) in [("udhcpc.sh", udhcpc), ("dhclient.sh", dhclient)] {
        let path = dir.0.join(name);
        std::fs::write(&path, text).unwrap();
        must(&["chmod", "+x", &path.display().to_string()]);
    }
}

/// Lines of the client's event log.
fn events(net: &DhcpNet, client: &str) -> Vec<String> {
    std::fs::read_to_string(net.dir.0.join(format!("events-{client}")))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits (bounded) until the client's event log has a line starting with `event`.
fn wait_event(net: &DhcpNet, client: &str, event: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(line) = events(net, client)
            .into_iter()
            .rev()
            .find(|l| l.starts_with(event))
        {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "{client}: no {event} event: {:?}",
            events(net, client)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `switchyard stats` of the running network.
fn ask_stats(net: &DhcpNet) -> String {
    let bin = switchyard_bin().display().to_string();
    must(&[&bin, "stats", "--socket", &net.dir.file("ctl.sock")])
}

/// `switchyard net-dhcp-leases` of the running network.
fn leases(net: &DhcpNet) -> String {
    let bin = switchyard_bin().display().to_string();
    must(&[
        &bin,
        "net-dhcp-leases",
        "--socket",
        &net.dir.file("ctl.sock"),
    ])
}

/// Runs busybox udhcpc once in `g` (exits when bound, or fails after `tries` discovers).
fn udhcpc_once(net: &DhcpNet, g: &Netns, extra: &[&str]) -> std::process::Output {
    let script = net.dir.file("udhcpc.sh");
    let mut argv = vec![
        "timeout", "30", "busybox", "udhcpc", "-f", "-q", "-n", "-t", "4", "-T", "1", "-i", "eth0",
        "-s", &script,
    ];
    argv.extend_from_slice(extra);
    g.run(&argv)
}

/// The IPv4 address of eth0 in `g`, if any.
fn address_of(g: &Netns) -> Option<String> {
    let out = g.must(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .map(|cidr| cidr.split('/').next().unwrap_or_default().to_string())
}

fn dhcp_stats(sy: &mut Switchyard) -> serde_json::Value {
    sy.stop_json()["engine"]["dhcp"].clone()
}

// RFC 2131 3.1 (DORA), 4.3.2 (renewing, init-reboot), 4.4.6 (release): each real client gets
// a lease with router, DNS server and domain, renews, releases, and a rebooted dhclient gets
// its address back; the lease table shows each with its host name.
#[test]
fn udhcpc_dhclient_and_dhcpcd_lease_renew_release_and_reboot() {
    let net = dhcp_net(
        "<range start='192.168.122.100' end='192.168.122.150'/>",
        &[mac(1), mac(2), mac(3)],
    );
    let (g1, g2, g3) = (&net.guests[0], &net.guests[1], &net.guests[2]);

    // busybox udhcpc, kept running: SIGUSR1 renews (unicast REQUEST), SIGUSR2 releases.
    let script = net.dir.file("udhcpc.sh");
    let pidfile = net.dir.file("udhcpc.pid");
    let _udhcpc = g1.spawn_udhcpc("eth0", &script, &pidfile, "alpha");
    let bound = wait_event(&net, "udhcpc", "bound");
    // An isolated network names no router (libvirt's dnsmasq: `dhcp-option=3`).
    assert!(
        bound.contains("router= dns=192.168.122.1 domain=lab"),
        "{bound}"
    );
    let ip1 = address_of(g1).expect("udhcpc configured eth0");
    g1.must(&["ping", "-c", "1", "-W", "2", "192.168.122.1"]);
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    must(&["kill", "-USR1", pid.trim()]);
    let renewed = wait_event(&net, "udhcpc", "renew");
    assert!(renewed.contains(&ip1), "{renewed}");

    // ISC dhclient: lease, stop keeping the lease (-x), then a reboot asks for it again.
    let conf = net.dir.0.join("dhclient.conf");
    std::fs::write(&conf, "send host-name \"beta\";\n").unwrap();
    let conf = conf.display().to_string();
    let (lf, pf, sf) = (
        net.dir.file("dhclient.leases"),
        net.dir.file("dhclient.pid"),
        net.dir.file("dhclient.sh"),
    );
    let dhclient = |flag: &str| {
        g2.must(&[
            "timeout", "30", "dhclient", "-4", flag, "-cf", &conf, "-lf", &lf, "-pf", &pf, "-sf",
            &sf, "eth0",
        ])
    };
    dhclient("-1");
    let bound = wait_event(&net, "dhclient", "BOUND");
    assert!(
        bound.contains("router= dns=192.168.122.1 domain=lab"),
        "{bound}"
    );
    let ip2 = address_of(g2).expect("dhclient configured eth0");
    assert_ne!(ip1, ip2);
    dhclient("-x");
    dhclient("-1");
    let reboot = wait_event(&net, "dhclient", "REBOOT");
    assert!(reboot.contains(&ip2), "same address after reboot: {reboot}");

    // dhcpcd, one shot, no hooks (it configures the address and routes itself).
    g3.must(&[
        "timeout",
        "30",
        "dhcpcd",
        "-f",
        "/dev/null",
        "-c",
        "/bin/true",
        "-4",
        "-1",
        "-B",
        "--noarp",
        "-t",
        "10",
        "-h",
        "gamma",
        "eth0",
    ]);
    let ip3 = address_of(g3).expect("dhcpcd configured eth0");
    // No default route from an isolated network: only the on-link subnet.
    let routes = g3.must(&["ip", "route"]);
    assert!(!routes.contains("default"), "{routes}");
    assert!(routes.contains("192.168.122.0/24"), "{routes}");

    let table = leases(&net);
    for (ip, name, m) in [
        (&ip1, "alpha", mac(1)),
        (&ip2, "beta", mac(2)),
        (&ip3, "gamma", mac(3)),
    ] {
        assert!(
            table
                .lines()
                .any(|l| l.contains(&format!("{ip}/24")) && l.contains(name) && l.contains(&m)),
            "{ip} {name}: {table}"
        );
    }

    // Releases: udhcpc on SIGUSR2, dhclient -r. Their leases leave the table. (The gateway's
    // ARP entry is refreshed first: each client unicasts its RELEASE and flushes its address
    // at once, and a RELEASE still waiting for ARP then never leaves; under load it did.)
    g1.must(&["ping", "-c", "1", "-W", "2", "192.168.122.1"]);
    must(&["kill", "-USR2", pid.trim()]);
    wait_event(&net, "udhcpc", "deconfig");
    g2.must(&["ping", "-c", "1", "-W", "2", "192.168.122.1"]);
    dhclient("-r");
    let deadline = Instant::now() + Duration::from_secs(5);
    while leases(&net).contains(&format!("{ip1}/24")) || leases(&net).contains(&format!("{ip2}/24"))
    {
        assert!(
            Instant::now() < deadline,
            "released leases stay: {}\nudhcpc: {:?}\ndhclient: {:?}\nstats: {}",
            leases(&net),
            events(&net, "udhcpc"),
            events(&net, "dhclient"),
            ask_stats(&net)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(leases(&net).contains("gamma"));

    let mut sy = net.sy;
    let dhcp = dhcp_stats(&mut sy);
    assert!(dhcp["releases"].as_u64().unwrap() >= 2, "{dhcp}");
    assert!(dhcp["acks"].as_u64().unwrap() >= 5, "{dhcp}");
}

// libvirt's <host>: a reserved MAC gets its address and name; with a two-address range, a
// third dynamic client gets no offer (and the pool_exhausted counter says why).
#[test]
fn a_reservation_wins_and_a_tiny_pool_runs_out() {
    let net = dhcp_net(
        "<range start='192.168.122.100' end='192.168.122.101'/>\n\
         <host mac='52:54:00:d0:00:09' name='fixed' ip='192.168.122.50'/>",
        &[mac(1), mac(2), mac(3), mac(9)],
    );
    let g = &net.guests;
    // The first exchange, traced: DISCOVER and REQUEST each answered by the gateway; the
    // DISCOVER's address is probed first (an ARP probe out of each of the four ports).
    let tracer = Tracer::start(
        "dhcp",
        &net.dir.file("ctl.sock"),
        &[
            "--count",
            "2",
            "--filter",
            "udp and port 67",
            "--duration",
            "10",
        ],
    );
    for guest in &g[..2] {
        let out = udhcpc_once(&net, guest, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let traced = tracer.output();
    for needle in [
        "IPv4 UDP 0.0.0.0:68 > 255.255.255.255:67 DHCP DISCOVER",
        "dhcp.discovers +1",
        "dhcp.offers +1",
        "dhcp_probes.sent +1",
        "engine queued 4 frame(s) of its own",
        "DHCP REQUEST",
        "dhcp.acks +1",
        "verdict: flood",
    ] {
        assert!(traced.contains(needle), "{needle}:\n{traced}");
    }
    let mut got = [address_of(&g[0]).unwrap(), address_of(&g[1]).unwrap()];
    got.sort();
    assert_eq!(got, ["192.168.122.100", "192.168.122.101"]);

    let third = udhcpc_once(&net, &g[2], &[]);
    assert!(
        !third.status.success(),
        "a third client got a lease from a pool of two"
    );
    assert_eq!(address_of(&g[2]), None);

    let reserved = udhcpc_once(&net, &g[3], &["-x", "hostname:whatever"]);
    assert!(
        reserved.status.success(),
        "{}",
        String::from_utf8_lossy(&reserved.stderr)
    );
    assert_eq!(address_of(&g[3]).as_deref(), Some("192.168.122.50"));
    let table = leases(&net);
    assert!(
        table
            .lines()
            .any(|l| l.contains("192.168.122.50/24") && l.contains("fixed")),
        "the reservation's name wins: {table}"
    );

    let mut sy = net.sy;
    let dhcp = dhcp_stats(&mut sy);
    assert!(dhcp["pool_exhausted"].as_u64().unwrap() >= 1, "{dhcp}");
}

// A lease is on disk before its ACK leaves: after `kill -9` and a restart on the same state
// directory, the lease is listed, its client gets its address back, and nobody else gets it.
#[test]
fn leases_survive_kill_9_and_a_restart() {
    let mut net = dhcp_net(
        "<range start='192.168.122.100' end='192.168.122.110'/>",
        &[mac(1), mac(2)],
    );
    let out = udhcpc_once(&net, &net.guests[0], &["-x", "hostname:keeper"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ip = address_of(&net.guests[0]).unwrap();

    let (ok, _, _) = net.sy.stop_with("KILL");
    assert!(!ok, "killed");
    let file = std::fs::read_to_string(net.dir.0.join("state/dhcp.leases")).unwrap();
    assert!(file.contains(&ip) && file.contains("keeper"), "{file}");

    // The taps went with the process; the restart makes them again.
    net.sy = start(
        &net.dir,
        &net._sw,
        &net.guests,
        &[mac(1), mac(2)],
        "<range start='192.168.122.100' end='192.168.122.110'/>",
    );
    for g in &net.guests {
        g.must(&["ip", "link", "set", "eth0", "up"]);
    }
    let table = leases(&net);
    assert!(
        table
            .lines()
            .any(|l| l.contains(&format!("{ip}/24")) && l.contains("keeper")),
        "{table}"
    );
    // Another client does not get the kept address...
    let other = udhcpc_once(&net, &net.guests[1], &[]);
    assert!(other.status.success());
    assert_ne!(address_of(&net.guests[1]).unwrap(), ip);
    // ... and its owner, rebooting with it (option 50), does.
    net.guests[0].must(&["ip", "addr", "flush", "dev", "eth0"]);
    let again = udhcpc_once(&net, &net.guests[0], &["-r", &ip]);
    assert!(again.status.success());
    assert_eq!(address_of(&net.guests[0]).unwrap(), ip);
}

/// Sends malformed DHCP requests out of eth0 as raw frames (broadcast, from 0.0.0.0:68):
/// truncated, bad option lengths, option overload pointing at garbage, a huge host name,
/// random bytes. Bounded: argv[1] rounds of each.
const GARBAGE_SENDER: &str = r#"
import os, random, socket, struct, sys, time
rounds = int(sys.argv[1])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
mac = bytes.fromhex("525400d000ee")
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16: t = (t & 0xffff) + (t >> 16)
    return ~t & 0xffff
def frame(payload):
    udp = struct.pack("!HHHH", 68, 67, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes(4), b"\xff" * 4)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return b"\xff" * 6 + mac + b"\x08\x00" + ip + udp
def bootp(options):
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, random.getrandbits(32), 0, 0x8000,
                       bytes(4), bytes(4), bytes(4), bytes(4), mac + bytes(10), b"\xee" * 64, b"\xdd" * 128)
    return head + b"\x63\x82\x53\x63" + options
kinds = [
    lambda: bootp(b"\x35\x01\x01\xff")[:40],                            # truncated header
    lambda: bootp(b"\x35\x01\x01\x0c\xc8abc"),                          # option 12 runs past the end
    lambda: bootp(b"\x35\x05\x01\xff"),                                 # option 53 length lies
    lambda: bootp(b"\x35\x01\x01\x34\x01\x03\xff"),                     # overload into garbage sname/file
    lambda: bootp(b"\x35\x01\x01" + (b"\x0c\xff" + b"h" * 255) * 4 + b"\xff"),  # 1 KB host name
    lambda: bootp(b""),                                                 # no cookie options at all
    lambda: os.urandom(random.randint(0, 600)),                         # noise
]
for _ in range(rounds):
    for k in kinds:
        s.send(frame(k()))
    # Paced, so a busy machine's tap queue does not drop what the count below expects.
    time.sleep(0.001)
print("sent", rounds * len(kinds))
"#;

// Bad input costs a counter, never a panic: a guest sprays malformed DHCP while another
// guest's real client gets its lease.
#[test]
fn malformed_dhcp_is_counted_while_a_real_client_gets_its_lease() {
    let net = dhcp_net(
        "<range start='192.168.122.100' end='192.168.122.150'/>",
        &[mac(1), mac(2)],
    );
    let sprayer = net.guests[0].spawn(&["timeout", "20", "python3", "-c", GARBAGE_SENDER, "300"]);
    let out = udhcpc_once(&net, &net.guests[1], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(address_of(&net.guests[1]).is_some());
    let mut sprayer = sprayer;
    let deadline = Instant::now() + Duration::from_secs(20);
    while sprayer.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the sprayer did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut sy = net.sy;
    let dhcp = dhcp_stats(&mut sy);
    let rejected = [
        "malformed",
        "not_boot_request",
        "bad_hardware",
        "no_message_type",
        "unknown_type",
    ]
    .iter()
    .map(|k| dhcp[k].as_u64().unwrap())
    .sum::<u64>();
    assert!(rejected >= 300 * 4, "{dhcp}");
    assert!(dhcp["acks"].as_u64().unwrap() >= 1, "{dhcp}");
}

// RFC 2131 3.1 step 2 / 4.4.1 (the server SHOULD probe before allocating) with RFC 5227 ARP
// probes: a guest configured by hand with the first address of the pool, silent so far (the
// switch has not seen it use the address), answers the gateway's probe; the next guest's
// udhcpc is offered another address, and the counters say why.
#[test]
fn an_address_configured_by_hand_is_never_offered() {
    let net = dhcp_net(
        "<range start='192.168.122.100' end='192.168.122.110'/>",
        &[mac(1), mac(2)],
    );
    let (squatter, client) = (&net.guests[0], &net.guests[1]);
    squatter.set_static_address("eth0", "192.168.122.100/24", None);
    let control = net.dir.file("ctl.sock");
    let before = stats_of(&control)["engine"].clone();
    assert_eq!(
        before["dhcp"]["in_use_noted"].as_u64(),
        Some(0),
        "the switch saw the address before the probe: {before}"
    );
    let out = udhcpc_once(&net, client, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = address_of(client).expect("a lease");
    assert_ne!(got, "192.168.122.100", "offered an address in use");
    assert_eq!(got, "192.168.122.101");
    // The squatter keeps its address, and it is not leased to anyone.
    assert_eq!(address_of(squatter).as_deref(), Some("192.168.122.100"));
    assert!(
        !leases(&net).contains("192.168.122.100/"),
        "{}",
        leases(&net)
    );
    let after = stats_of(&control)["engine"].clone();
    let probes = &after["dhcp_probes"];
    assert!(probes["conflicts"].as_u64().unwrap() >= 1, "{after}");
    assert!(probes["clear"].as_u64().unwrap() >= 1, "{after}");
    assert!(
        after["dhcp"]["in_use_noted"].as_u64().unwrap() >= 1,
        "{after}"
    );
}
