//! The whole engine (switch, gateway, NAT, uplink, DHCP) against any sequence of frames on
//! any of its ports, with virtual time: it never panics, every FDB entry points to a live
//! switch port, NAT's table stays within its caps and lists what it holds, NAT publishes to
//! workers only connections that are established (TCP) or answered (UDP), and the DHCP
//! server's leases stay in its range. The first byte picks packet NAT, or socket NAT (its
//! host sockets simulated: connects succeed or are refused, hosts send bytes back) with the
//! guard's clean-traffic and rate caps on; a frame "on port 255" removes a guest's port
//! instead, and a new one takes its id (socket NAT ends that port's guests' connections).
//! With socket NAT, what a worker's socket NAT would claim of each frame is asked too.
#![no_main]

use datapath::dhcp::DhcpService;
use datapath::engine::{Config, Engine};
use datapath::gateway::GatewayConfig;
use datapath::guard::GuardConfig;
use datapath::nat::{Dir, NatConfig};
use datapath::socket_nat::{Action, Peer, SocketNatConfig};
use datapath::uplink::UplinkConfig;
use datapath::wire::{MacAddr, VnetHdr};
use dhcp_dns::dhcp::{DhcpConfig, DhcpServer};
use libfuzzer_sys::fuzz_target;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let sockets = mode & 1 == 1;
    let gw = Ipv4Addr::new(192, 168, 122, 1);
    let mut nat = NatConfig::new(gw, 24, Ipv4Addr::new(203, 0, 113, 2));
    nat.max_flows = 64;
    nat.max_flows_per_guest = 16;
    let mut engine = Engine::new(&Config {
        gateway: Some(GatewayConfig {
            mac: MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]),
            ip: gw,
            prefix: 24,
        }),
        nat: Some((
            nat,
            UplinkConfig {
                mac: MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xdd]),
                ip: Ipv4Addr::new(203, 0, 113, 2),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(203, 0, 113, 1)),
                mtu: 1500,
            },
        )),
        fdb_capacity: 32,
        ..Config::default()
    });
    let mut engine = if sockets {
        let mut socket_nat = SocketNatConfig::new(gw, 24);
        socket_nat.max_flows = 64;
        socket_nat.max_flows_per_guest = 16;
        socket_nat.host_loopback = mode & 2 == 2;
        Engine::new(&Config {
            gateway: Some(GatewayConfig {
                mac: MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]),
                ip: gw,
                prefix: 24,
            }),
            socket_nat: Some(socket_nat),
            guard: GuardConfig {
                clean_traffic: mode & 4 == 4,
                dhcp_per_second: 20,
                dns_per_second: 20,
                broadcast_per_second: 50,
            },
            fdb_capacity: 32,
            ..Config::default()
        })
    } else {
        engine
    };
    let mut opened = 0u32;
    let start = Instant::now();
    let dhcp = DhcpConfig::new(
        gw,
        24,
        (
            Ipv4Addr::new(192, 168, 122, 10),
            Ipv4Addr::new(192, 168, 122, 20),
        ),
    );
    let server = DhcpServer::new(dhcp, Vec::new(), 1_800_000_000);
    engine.enable_dhcp(DhcpService::new(
        server,
        MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]),
        false,
        (start, 1_800_000_000),
    ));
    // What fast-path workers would read: it must never name a port the table does not.
    let mirror = engine.mirror();
    let mut ports = vec![
        engine.add_port("a"),
        engine.add_port("b"),
        engine.add_port("c"),
    ];
    let uplink = engine.add_uplink("up0");
    ports.extend(uplink);
    // What NAT's fast path would read (packet NAT): it publishes only established or answered
    // connections, and takes them back as they start to close.
    let nat_fast = engine.nat_mirror();
    let mut now = start;
    // Each frame: [port][flags: bit 0 GSO, bit 1 partial checksum, bits 2.. time step][len][bytes]
    let mut rest = data;
    let mut buf = vec![0u8; 2048];
    while let [port, flags, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (frame, next) = tail.split_at(len);
        rest = next;
        now += Duration::from_millis(u64::from(flags >> 2) * 50);
        if *port == 255 {
            engine.remove_port(ports[2]);
            ports[2] = engine.add_port("c");
            continue;
        }
        let ingress = ports[usize::from(*port) % ports.len()];
        let vnet = VnetHdr {
            gso_type: if flags & 1 == 1 { 1 } else { 0 },
            gso_size: if flags & 1 == 1 { 1448 } else { 0 },
            flags: (flags & 2) >> 1,
            csum_start: 34,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        buf[..frame.len()].copy_from_slice(frame);
        let macs: Vec<MacAddr> = frame
            .chunks_exact(6)
            .take(2)
            .map(|m| MacAddr(m.try_into().unwrap_or_default()))
            .collect();
        if let (Some(nat), Some(packet), Some(&src)) =
            (engine.socket_nat(), frame.get(14..), macs.get(1))
            && let Ok(ip) = datapath::wire::ipv4::Ipv4Packet::new_checked(packet)
        {
            let from = Peer {
                port: ingress,
                mac: src,
            };
            let _ = nat.claim(&packet[..ip.total_len()], from);
        }
        let _ = engine.handle_frame(now, ingress, &vnet, &mut buf[..frame.len()]);
        if engine.poll_timeout().is_some_and(|t| t <= now) {
            engine.handle_timeout(now);
        }
        if let Some(nat) = engine.socket_nat_mut() {
            // The host side, simulated: every third connect is refused, hosts answer a
            // little, then would block; UDP hosts echo what they were sent, in one read
            // coalesced at the guest's datagram size, as UDP GRO hands a train over.
            while let Some(action) = nat.poll_action() {
                match action {
                    Action::Open(id, _) => {
                        opened += 1;
                        let result = if opened % 3 == 0 {
                            Err(std::io::ErrorKind::ConnectionRefused)
                        } else {
                            Ok(std::net::SocketAddrV4::new(
                                Ipv4Addr::new(203, 0, 113, 3),
                                40000,
                            ))
                        };
                        nat.handle_opened(now, id, result);
                    }
                    Action::SendTo(id, to, datagrams) => {
                        let segment = (datagrams.count() > 1).then_some(datagrams.segment);
                        nat.handle_datagrams(now, id, to, &datagrams.data, segment);
                        nat.recycle(datagrams.data);
                    }
                    _ => {}
                }
            }
            nat.poll_stack(now);
            while let Some(id) = nat.poll_ready() {
                nat.to_host(id, |data| Ok(data.len()));
                let mut answered = false;
                nat.from_host(now, id, |room| {
                    if answered || room.is_empty() {
                        return Err(std::io::ErrorKind::WouldBlock.into());
                    }
                    answered = true;
                    room[0] = b'x';
                    Ok(1)
                });
            }
            nat.poll_stack(now);
        }
        while engine.poll_transmit().is_some() {}
        while engine.poll_notice().is_some() {}
        for mac in macs {
            if let Some(port) = mirror.lookup(mac) {
                assert_eq!(
                    engine.fdb().lookup(now, mac, 0),
                    Some(port),
                    "the mirror names a port the table does not for {mac}"
                );
            }
        }
        for (index, _) in ports.iter().enumerate() {
            let port = datapath::port::PortId(index as u16);
            if mirror.fast_ingress(port) {
                assert!(
                    engine.port(port).is_some() && engine.is_switch_port(port),
                    "fast path allowed from {port}, not a live switch port"
                );
            }
        }
        if let Some(fast) = &nat_fast {
            for row in engine.conntrack(now) {
                if fast.mirror.lookup(Dir::Out, &row.original).is_some()
                    || fast.mirror.lookup(Dir::In, &row.reply).is_some()
                {
                    let answered = row.proto == "udp" && row.replied;
                    assert!(
                        answered || row.state == "ESTABLISHED",
                        "published while not established: {row:?}"
                    );
                }
            }
        }
        for row in engine.fdb_rows(now) {
            assert!(
                engine.port(row.port).is_some(),
                "FDB entry for a dead port: {row:?}"
            );
            assert!(
                engine.is_switch_port(row.port),
                "FDB entry on the uplink: {row:?}"
            );
        }
        let stats = engine.stats();
        assert!(
            stats.nat_flows <= 64,
            "NAT above its cap: {}",
            stats.nat_flows
        );
        if !sockets {
            assert_eq!(engine.conntrack(now).len() <= stats.nat_flows, true);
        }
        if let Some(dhcp) = engine.dhcp() {
            for lease in dhcp.leases() {
                let n = lease.ip.octets()[3];
                assert!((10..=20).contains(&n), "lease outside the range: {lease:?}");
            }
        }
    }
});
