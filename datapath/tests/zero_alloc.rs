//! DESIGN.md principle 2: once flows are established, forwarding a frame allocates nothing,
//! neither in the engine nor in the poll loop that reads, decides and writes it.
//!
//! Ports here are datagram socket pairs (one frame per message, like a tap), so the test runs
//! without privileges; the loop code is the same one that serves taps.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use datapath::io::{Datapath, PortCaps};
use datapath::wire::checksum::{accumulate, fold, pseudo_header_v4};
use datapath::wire::vnet::{self, VnetHdr, gso};
use datapath::{Config, Engine, MacAddr, Verdict};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

const A: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0xa]);
const B: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0xb]);
const C: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0xc]);
const SRC_IP: [u8; 4] = [192, 168, 122, 10];
const DST_IP: [u8; 4] = [192, 168, 122, 11];

/// An Ethernet frame from `src` to `dst` with an IPv4 header (TTL 64, protocol `proto`,
/// SRC_IP to DST_IP) before `l4_len` zero bytes.
fn ipv4_frame(dst: MacAddr, src: MacAddr, proto: u8, l4_len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 34 + l4_len];
    f[0..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    f[22] = 64;
    f[23] = proto;
    f[26..30].copy_from_slice(&SRC_IP);
    f[30..34].copy_from_slice(&DST_IP);
    f
}

/// An Ethernet/IPv4/TCP frame from `src` to `dst` carrying `payload` bytes, with the TCP
/// checksum field holding the pseudo-header sum as the kernel leaves it for NEEDS_CSUM.
fn tcp_frame(dst: MacAddr, src: MacAddr, payload: usize) -> Vec<u8> {
    let mut f = ipv4_frame(dst, src, 6, 20 + payload);
    f[46] = 5 << 4;
    f[47] = 0x10;
    let pseudo = pseudo_header_v4(SRC_IP, DST_IP, 6, (20 + payload) as u16);
    f[50..52].copy_from_slice(&fold(pseudo).to_be_bytes());
    f
}

/// An Ethernet/IPv4/UDP frame from `src` to `dst` carrying `payload` bytes, with the UDP
/// checksum field holding the pseudo-header sum (NEEDS_CSUM), as a `UDP_SEGMENT` send leaves
/// a Linux guest.
fn udp_frame(dst: MacAddr, src: MacAddr, payload: usize) -> Vec<u8> {
    let mut f = ipv4_frame(dst, src, 17, 8 + payload);
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&4433u16.to_be_bytes());
    f[38..40].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    let pseudo = pseudo_header_v4(SRC_IP, DST_IP, 17, (8 + payload) as u16);
    f[40..42].copy_from_slice(&fold(pseudo).to_be_bytes());
    for (i, b) in f[42..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

/// A `UDP_SEGMENT` send's header: 1200-byte datagrams, the UDP checksum left to the device.
const USO_1200: VnetHdr = VnetHdr {
    flags: vnet::F_NEEDS_CSUM,
    gso_type: gso::UDP_L4,
    hdr_len: 42,
    gso_size: 1200,
    csum_start: 34,
    csum_offset: 6,
};

fn with_vnet(hdr: VnetHdr, frame: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; vnet::LEN];
    hdr.emit(&mut buf);
    buf.extend_from_slice(frame);
    buf
}

struct Peer {
    sock: UnixDatagram,
}

impl Peer {
    fn attach(dp: &mut Datapath, name: &str, vnet_hdr: bool) -> Peer {
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        ours.set_nonblocking(true).unwrap();
        let file = File::from(OwnedFd::from(theirs));
        dp.add_fd_port(
            name.into(),
            file,
            PortCaps {
                vnet_hdr,
                uso: vnet_hdr,
            },
        )
        .unwrap();
        Peer { sock: ours }
    }

    fn recv_all(&self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while let Ok(n) = self.sock.recv(&mut buf) {
            frames.push(buf[..n].to_vec());
        }
        frames
    }
}

#[test]
fn engine_forwards_learned_unicast_without_allocating() {
    let mut engine = Engine::new(&Config::default());
    let pa = engine.add_port("a");
    let pb = engine.add_port("b");
    let now = Instant::now();
    let mut ab = tcp_frame(B, A, 1400);
    let mut ba = tcp_frame(A, B, 0);
    let hdr = VnetHdr::default();
    engine.handle_frame(now, pa, &hdr, &mut ab);
    engine.handle_frame(now, pb, &hdr, &mut ba);
    let info = allocation_counter::measure(|| {
        for i in 0..10_000u64 {
            let t = now + Duration::from_micros(i);
            assert_eq!(
                engine.handle_frame(t, pa, &hdr, &mut ab),
                Verdict::Forward(pb)
            );
            assert_eq!(
                engine.handle_frame(t, pb, &hdr, &mut ba),
                Verdict::Forward(pa)
            );
        }
    });
    assert_eq!(info.count_total, 0, "{info:?}");
}

#[test]
fn poll_loop_forwards_floods_and_completes_offloads_without_allocating() {
    let mut dp = Datapath::new(Engine::new(&Config::default())).unwrap();
    let a = Peer::attach(&mut dp, "a", true);
    let b = Peer::attach(&mut dp, "b", true);
    let c = Peer::attach(&mut dp, "c", false);
    let plain = VnetHdr::default();

    // Learn all three MACs (each frame floods once), then drain.
    a.sock
        .send(&with_vnet(plain, &tcp_frame(MacAddr::BROADCAST, A, 0)))
        .unwrap();
    b.sock
        .send(&with_vnet(plain, &tcp_frame(MacAddr::BROADCAST, B, 0)))
        .unwrap();
    c.sock.send(&tcp_frame(MacAddr::BROADCAST, C, 0)).unwrap();
    for _ in 0..5 {
        dp.turn(Some(Duration::from_millis(5))).unwrap();
    }
    a.recv_all();
    b.recv_all();
    c.recv_all();

    let ab = with_vnet(plain, &tcp_frame(B, A, 1400));
    let flood = with_vnet(plain, &tcp_frame(MacAddr::BROADCAST, A, 100));
    let csum = VnetHdr {
        flags: vnet::F_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..Default::default()
    };
    let a_to_c_partial = with_vnet(csum, &tcp_frame(C, A, 1000));
    let tso = VnetHdr {
        flags: vnet::F_NEEDS_CSUM,
        gso_type: gso::TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
    };
    let a_to_c_tso = with_vnet(tso, &tcp_frame(C, A, 60_000));
    let uso = USO_1200;
    let a_to_b_uso = with_vnet(uso, &udp_frame(B, A, 12_000));
    let a_to_c_uso = with_vnet(uso, &udp_frame(C, A, 12_000));

    let rounds = 200u64;
    let mut allocations = 0;
    for _ in 0..rounds {
        for frame in [
            &ab,
            &flood,
            &a_to_c_partial,
            &a_to_c_tso,
            &a_to_b_uso,
            &a_to_c_uso,
        ] {
            a.sock.send(frame).unwrap();
        }
        allocations += allocation_counter::measure(|| {
            for _ in 0..6 {
                dp.turn(Some(Duration::ZERO)).unwrap();
            }
        })
        .count_total;
        let at_b = b.recv_all();
        let at_c = c.recv_all();
        assert_eq!(at_b.len(), 3, "unicast + flood + USO reach b");
        assert_eq!(at_b[0], ab, "vnet to vnet: written exactly as read");
        assert_eq!(at_b[2], a_to_b_uso, "a USO super-frame too");
        // c has no vnet header: the flood arrives plain, the partial checksum completed, the
        // 60 000-byte TSO frame cut into ceil(60000 / 1448) = 42 segments, and the USO frame
        // into its 10 datagrams of 1200 bytes, each with a checksum that verifies (RFC 768).
        assert_eq!(at_c.len(), 1 + 1 + 42 + 10);
        for datagram in &at_c[44..] {
            assert_eq!(datagram.len(), 42 + 1200);
            let pseudo = pseudo_header_v4(SRC_IP, DST_IP, 17, 8 + 1200);
            assert_eq!(fold(accumulate(pseudo, &datagram[34..])), 0xffff);
        }
        let partial = &at_c[1];
        let pseudo = pseudo_header_v4(SRC_IP, DST_IP, 6, (partial.len() - 34) as u16);
        assert_eq!(
            fold(accumulate(pseudo, &partial[34..])),
            0xffff,
            "checksum completed"
        );
        assert!(at_c[2..].iter().all(|s| s.len() <= 54 + 1448));
    }
    assert_eq!(
        allocations, 0,
        "allocations in {rounds} rounds of the poll loop"
    );
    let stats = dp.engine().stats();
    let c_counters = &stats.ports[2].1.counters;
    assert_eq!(c_counters.tx_packets, 2 + rounds * 54, "{c_counters:?}");
}

/// An Ethernet/IPv4/TCP ACK with `payload` bytes and a partial (NEEDS_CSUM) checksum.
fn routed_tcp(dst: MacAddr, src: MacAddr, from: ([u8; 4], u16), to: ([u8; 4], u16)) -> Vec<u8> {
    let mut f = vec![0u8; 54 + 1000];
    f[0..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&1040u16.to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&from.0);
    f[30..34].copy_from_slice(&to.0);
    let c = !fold(accumulate(0, &f[14..34]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f[34..36].copy_from_slice(&from.1.to_be_bytes());
    f[36..38].copy_from_slice(&to.1.to_be_bytes());
    f[46] = 5 << 4;
    f[47] = 0x10;
    let pseudo = pseudo_header_v4(from.0, to.0, 6, 1020);
    f[50..52].copy_from_slice(&fold(pseudo).to_be_bytes());
    f
}

/// A guest's USO super-frame to the outside through the gateway: [`udp_frame`] re-addressed,
/// its header checksum and partial UDP checksum made to match.
fn routed_uso(dst: MacAddr, src: MacAddr, to: [u8; 4]) -> Vec<u8> {
    let mut f = udp_frame(dst, src, 12_000);
    f[30..34].copy_from_slice(&to);
    let c = !fold(accumulate(0, &f[14..34]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let pseudo = pseudo_header_v4(SRC_IP, to, 17, 8 + 12_000);
    f[40..42].copy_from_slice(&fold(pseudo).to_be_bytes());
    f
}

// DESIGN.md principle 2 for NAT: an established connection is translated both ways with no
// allocation (the frame is reset from its template each time: the TTL goes down per pass).
#[test]
fn engine_translates_established_nat_flows_without_allocating() {
    use datapath::gateway::GatewayConfig;
    use datapath::nat::NatConfig;
    use datapath::uplink::UplinkConfig;
    use std::net::Ipv4Addr;
    const GW: MacAddr = MacAddr([0x52, 0x54, 0, 0xaa, 0, 1]);
    const UP: MacAddr = MacAddr([0x52, 0x54, 0, 0xee, 0, 2]);
    const ROUTER: MacAddr = MacAddr([0x52, 0x54, 0, 0xee, 0, 1]);
    let mut engine = Engine::new(&Config {
        gateway: Some(GatewayConfig {
            mac: GW,
            ip: Ipv4Addr::new(192, 168, 122, 1),
            prefix: 24,
        }),
        nat: Some((
            NatConfig::new(
                Ipv4Addr::new(192, 168, 122, 1),
                24,
                Ipv4Addr::new(203, 0, 113, 2),
            ),
            UplinkConfig {
                mac: UP,
                ip: Ipv4Addr::new(203, 0, 113, 2),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(203, 0, 113, 1)),
                mtu: 1500,
            },
        )),
        ..Config::default()
    });
    let guest = engine.add_port("guest");
    let uplink = engine.add_uplink("up0").unwrap();
    let now = Instant::now();
    let hdr = VnetHdr {
        flags: vnet::F_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..Default::default()
    };
    // The next hop announces itself; the guest opens the connection with a SYN.
    let mut arp = datapath::wire::arp::request_frame(
        ROUTER,
        Ipv4Addr::new(203, 0, 113, 1),
        Ipv4Addr::new(203, 0, 113, 2),
    );
    assert_eq!(
        engine.handle_frame(now, uplink, &hdr, &mut arp),
        Verdict::Reply
    );
    let out_template = routed_tcp(GW, A, (SRC_IP, 40000), ([203, 0, 113, 1], 80));
    let in_template = routed_tcp(
        UP,
        ROUTER,
        ([203, 0, 113, 1], 80),
        ([203, 0, 113, 2], 40000),
    );
    let mut syn = out_template.clone();
    syn[47] = 0x02;
    assert_eq!(
        engine.handle_frame(now, guest, &hdr, &mut syn),
        Verdict::Forward(uplink)
    );
    // A UDP flow whose guest sends USO super-frames (translated once each, never cut).
    let uso = USO_1200;
    let uso_template = routed_uso(GW, A, [203, 0, 113, 1]);
    let mut uso_frame = uso_template.clone();
    assert_eq!(
        engine.handle_frame(now, guest, &uso, &mut uso_frame),
        Verdict::Forward(uplink)
    );
    let mut out = out_template.clone();
    let mut inb = in_template.clone();
    let info = allocation_counter::measure(|| {
        for i in 0..10_000u64 {
            let t = now + Duration::from_micros(i);
            out.copy_from_slice(&out_template);
            inb.copy_from_slice(&in_template);
            uso_frame.copy_from_slice(&uso_template);
            assert_eq!(
                engine.handle_frame(t, guest, &hdr, &mut out),
                Verdict::Forward(uplink)
            );
            assert_eq!(
                engine.handle_frame(t, uplink, &hdr, &mut inb),
                Verdict::Forward(guest)
            );
            assert_eq!(
                engine.handle_frame(t, guest, &uso, &mut uso_frame),
                Verdict::Forward(uplink)
            );
        }
    });
    assert_eq!(info.count_total, 0, "{info:?}");
    assert_eq!(&out[26..30], &[203, 0, 113, 2]);
    assert_eq!(&inb[30..34], &SRC_IP);
    // RFC 768 / RFC 1624: the super-frame's partial sum is the pseudo-header's of the new
    // source, over its whole UDP length.
    assert_eq!(&uso_frame[26..30], &[203, 0, 113, 2]);
    let pseudo = pseudo_header_v4([203, 0, 113, 2], [203, 0, 113, 1], 17, 8 + 12_000);
    assert_eq!(&uso_frame[40..42], &fold(pseudo).to_be_bytes());
    assert_eq!(uso_frame.len(), uso_template.len(), "one frame, not cut");
}

// DESIGN.md principle 2 for socket NAT's UDP towards guests: datagrams a host socket read,
// one by one or coalesced by the kernel (UDP GRO), are framed for the guest in recycled
// buffers, a coalesced read as one USO super-frame.
#[test]
fn socket_nat_frames_host_datagrams_for_guests_without_allocating() {
    use datapath::gateway::GatewayConfig;
    use datapath::socket_nat::{Action, SocketNatConfig};
    use std::net::{Ipv4Addr, SocketAddrV4};
    const GW: MacAddr = MacAddr([0x52, 0x54, 0, 0xaa, 0, 1]);
    let gateway = Ipv4Addr::new(192, 168, 122, 1);
    let mut engine = Engine::new(&Config {
        gateway: Some(GatewayConfig {
            mac: GW,
            ip: gateway,
            prefix: 24,
        }),
        socket_nat: Some(SocketNatConfig::new(gateway, 24)),
        ..Config::default()
    });
    let guest = engine.add_port("guest");
    let now = Instant::now();
    // The guest's first datagrams (a super-frame) open the mapping.
    let mut uso_frame = routed_uso(GW, A, [203, 0, 113, 1]);
    engine.handle_frame(now, guest, &USO_1200, &mut uso_frame);
    let nat = engine.socket_nat_mut().unwrap();
    let Some(Action::Open(id, _)) = nat.poll_action() else {
        panic!("no mapping");
    };
    while let Some(action) = nat.poll_action() {
        if let Action::SendTo(_, _, datagrams) = action {
            nat.recycle(datagrams.data);
        }
    }
    nat.handle_opened(now, id, Ok(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 40000)));
    let remote = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 1), 4433);
    let coalesced = vec![7u8; 12_000];
    let round = |engine: &mut Engine, t: Instant| {
        let nat = engine.socket_nat_mut().unwrap();
        nat.handle_datagrams(t, id, remote, &coalesced, Some(1200));
        nat.handle_datagrams(t, id, remote, &coalesced[..1200], None);
        let mut sent = 0;
        while let Some(out) = engine.poll_transmit() {
            assert_eq!(out.port, guest);
            sent += 1;
            engine.recycle(out.frame);
        }
        assert_eq!(sent, 2);
    };
    // Warm the spares (a buffer grows once to the largest frame it carries), then count.
    round(&mut engine, now);
    round(&mut engine, now);
    let info = allocation_counter::measure(|| {
        for i in 0..1000u64 {
            round(&mut engine, now + Duration::from_micros(i));
        }
    });
    assert_eq!(info.count_total, 0, "{info:?}");
    let counters = &engine.socket_nat_mut().unwrap().counters;
    assert_eq!(counters.udp_datagrams_in, 1002 * 11);
    assert_eq!(counters.udp_super_frames_in, 1002);
}
