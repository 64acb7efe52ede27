//! Hostile input, each kind through the whole engine (gateway, socket NAT, DHCP, clean-traffic
//! optional): every frame is dropped with its named counter, or carried as the protocol says;
//! none panics, and nothing is held for a frame that never completes.
//!
//! Parsers have their own byte-level tests (wire, nat::packet, dhcp, dns); here the same
//! inputs arrive as a guest would send them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use datapath::dhcp::DhcpService;
use datapath::gateway::GatewayConfig;
use datapath::guard::GuardConfig;
use datapath::socket_nat::{Action, SocketNatConfig};
use datapath::wire::VnetHdr;
use datapath::wire::checksum::{accumulate, checksum, fold, pseudo_header_v4};
use datapath::{Config, DropReason, Engine, MacAddr, PortId, Verdict};
use dhcp_dns::dhcp::{DhcpConfig, DhcpServer};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const GW_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
const GUEST: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x0a]);
const OTHER: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x0b]);
const GW: [u8; 4] = [192, 168, 122, 1];
const GUEST_IP: [u8; 4] = [192, 168, 122, 10];
const REMOTE: [u8; 4] = [203, 0, 113, 1];

struct Net {
    engine: Engine,
    guest: PortId,
    other: PortId,
    now: Instant,
}

fn net(clean_traffic: bool) -> Net {
    net_with(clean_traffic, usize::MAX)
}

fn net_with(clean_traffic: bool, leases_per_mac: usize) -> Net {
    let gw = Ipv4Addr::from(GW);
    let mut engine = Engine::new(&Config {
        gateway: Some(GatewayConfig {
            mac: GW_MAC,
            ip: gw,
            prefix: 24,
        }),
        socket_nat: Some(SocketNatConfig::new(gw, 24)),
        guard: GuardConfig {
            clean_traffic,
            ..GuardConfig::default()
        },
        ..Config::default()
    });
    let now = Instant::now();
    let dhcp = DhcpConfig::new(
        gw,
        24,
        (
            Ipv4Addr::new(192, 168, 122, 10),
            Ipv4Addr::new(192, 168, 122, 20),
        ),
    );
    let dhcp = DhcpConfig {
        leases_per_mac,
        ..dhcp
    };
    let server = DhcpServer::new(dhcp, Vec::new(), 1_800_000_000);
    engine.enable_dhcp(DhcpService::new(
        server,
        GW_MAC,
        false,
        (now, 1_800_000_000),
    ));
    let guest = engine.add_port("guest");
    let other = engine.add_port("other");
    Net {
        engine,
        guest,
        other,
        now,
    }
}

impl Net {
    fn send(&mut self, port: PortId, frame: &[u8]) -> Verdict {
        self.now += Duration::from_millis(1);
        let mut buf = frame.to_vec();
        let verdict = self
            .engine
            .handle_frame(self.now, port, &VnetHdr::default(), &mut buf);
        while self.engine.poll_transmit().is_some() {}
        verdict
    }

    fn drops(&self, port: PortId, reason: DropReason) -> u64 {
        self.engine.port(port).unwrap().counters.drops(reason)
    }

    fn actions(&mut self) -> Vec<Action> {
        let nat = self.engine.socket_nat_mut().unwrap();
        std::iter::from_fn(|| nat.poll_action()).collect()
    }
}

fn eth(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 packet (header checksum filled in) with `options` after the fixed header.
fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, ttl: u8, options: &[u8], l4: &[u8]) -> Vec<u8> {
    let ihl = 20 + options.len();
    let mut p = vec![0u8; ihl];
    p[0] = 0x40 | (ihl / 4) as u8;
    p[2..4].copy_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
    p[8] = ttl;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..].copy_from_slice(options);
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(l4);
    p
}

fn refresh_header_checksum(p: &mut [u8]) {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    p[10..12].fill(0);
    let c = checksum(&p[..ihl.min(p.len())]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
}

fn udp(src: [u8; 4], dst: [u8; 4], ports: (u16, u16), payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut u = vec![0u8; len];
    u[0..2].copy_from_slice(&ports.0.to_be_bytes());
    u[2..4].copy_from_slice(&ports.1.to_be_bytes());
    u[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    u[8..].copy_from_slice(payload);
    let sum = pseudo_header_v4(src, dst, 17, len as u16);
    let c = !fold(accumulate(sum, &u));
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// A guest's UDP datagram to the outside, as a frame to the gateway.
fn routed_udp() -> Vec<u8> {
    let l4 = udp(GUEST_IP, REMOTE, (5000, 53), b"query");
    eth(
        GW_MAC,
        GUEST,
        0x0800,
        &ipv4(GUEST_IP, REMOTE, 17, 64, &[], &l4),
    )
}

#[test]
fn truncation_at_every_header_boundary_is_dropped_without_a_panic() {
    let mut n = net(false);
    let whole = routed_udp();
    for len in 0..whole.len() {
        let verdict = n.send(n.guest, &whole[..len]);
        assert!(
            matches!(verdict, Verdict::Drop(_)),
            "cut at {len}: {verdict:?}"
        );
    }
    assert_eq!(
        n.drops(n.guest, DropReason::Runt),
        14,
        "Ethernet header cut"
    );
    assert!(n.actions().is_empty(), "nothing truncated left the host");
    assert_eq!(n.send(n.guest, &whole), Verdict::Consumed);
    assert!(matches!(
        n.actions()[..],
        [Action::Open(..), Action::SendTo(..)]
    ));
}

// RFC 791 3.1: IHL is at least 5 and the header fits in the total length, which fits in the
// frame.
#[test]
fn lying_header_and_total_lengths_are_bad_headers() {
    let mut n = net(false);
    let good = routed_udp();
    let mut cases = Vec::new();
    for (at, value) in [(14, 0x44u8), (14, 0x4f), (16, 0xff), (17, 0x0c)] {
        let mut f = good.clone();
        f[at] = value;
        refresh_header_checksum(&mut f[14..]);
        cases.push(f);
    }
    for f in &cases {
        assert_eq!(
            n.send(n.guest, f),
            Verdict::Drop(DropReason::BadHeader),
            "{:02x?}",
            &f[14..20]
        );
    }
    let mut bad_sum = good.clone();
    bad_sum[24] ^= 0xff;
    assert_eq!(
        n.send(n.guest, &bad_sum),
        Verdict::Drop(DropReason::BadChecksum)
    );
    assert!(n.actions().is_empty());
}

#[test]
fn ip_options_are_carried_and_expiring_ttls_get_time_exceeded() {
    let mut n = net(false);
    let l4 = udp(GUEST_IP, REMOTE, (5000, 53), b"query");
    // Four NOPs (RFC 791 3.1 option type 1): a 24-byte header.
    let with_options = eth(
        GW_MAC,
        GUEST,
        0x0800,
        &ipv4(GUEST_IP, REMOTE, 17, 64, &[1, 1, 1, 1], &l4),
    );
    assert_eq!(n.send(n.guest, &with_options), Verdict::Consumed);
    assert!(
        n.actions()
            .iter()
            .any(|a| matches!(a, Action::SendTo(_, _, d) if d.data == b"query")),
        "the payload behind the options"
    );
    // RFC 1812 5.3.1: TTL 1 or 0 dies at the gateway, with time-exceeded back.
    for ttl in [0, 1] {
        let f = eth(
            GW_MAC,
            GUEST,
            0x0800,
            &ipv4(GUEST_IP, REMOTE, 17, ttl, &[], &l4),
        );
        assert_eq!(n.send(n.guest, &f), Verdict::Drop(DropReason::TtlExceeded));
    }
    assert_eq!(n.engine.stats().engine.icmp_errors_sent, 2);
}

#[test]
fn fragments_in_any_order_size_or_overlap_are_dropped_and_hold_nothing() {
    let mut n = net(false);
    let l4 = udp(GUEST_IP, REMOTE, (5000, 53), &[7; 64]);
    let fragment = |offset_words: u16, more: bool, body: &[u8]| {
        let mut p = ipv4(GUEST_IP, REMOTE, 17, 64, &[], body);
        let word = offset_words | if more { 0x2000 } else { 0 };
        p[6..8].copy_from_slice(&word.to_be_bytes());
        p[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
        refresh_header_checksum(&mut p);
        eth(GW_MAC, GUEST, 0x0800, &p)
    };
    let cases = [
        fragment(1, false, &l4[8..]), // the last piece first (out of order)
        fragment(0, true, &l4[..8]),  // a tiny first fragment: only the UDP header
        fragment(0, true, &l4[..16]), // overlapping the one before
        fragment(3, true, &l4[24..]), // a middle piece that is never completed
    ];
    for f in &cases {
        assert_eq!(n.send(n.guest, f), Verdict::Drop(DropReason::Fragment));
    }
    // To the gateway's own address too.
    let mut to_gw = ipv4(GUEST_IP, GW, 17, 64, &[], &l4);
    to_gw[6] = 0x20;
    refresh_header_checksum(&mut to_gw);
    assert_eq!(
        n.send(n.guest, &eth(GW_MAC, GUEST, 0x0800, &to_gw)),
        Verdict::Drop(DropReason::Fragment)
    );
    assert!(n.actions().is_empty());
    assert_eq!(n.engine.stats().nat_flows, 0, "nothing is kept for them");
}

// RFC 1122 3.2.2: no ICMP error about an ICMP error; socket NAT carries echo only.
#[test]
fn icmp_errors_from_guests_quoting_anything_are_not_carried() {
    let mut n = net(false);
    let inner_error = ipv4(REMOTE, GUEST_IP, 1, 64, &[], &[3, 3, 0, 0, 0, 0, 0, 0]);
    let mut quoting_error = vec![3, 1, 0, 0, 0, 0, 0, 0];
    quoting_error.extend_from_slice(&inner_error);
    let c = checksum(&quoting_error);
    quoting_error[2..4].copy_from_slice(&c.to_be_bytes());
    let mut truncated_quote = vec![11, 0, 0, 0, 0, 0, 0, 0];
    truncated_quote.extend_from_slice(&inner_error[..12]);
    let c = checksum(&truncated_quote);
    truncated_quote[2..4].copy_from_slice(&c.to_be_bytes());
    for icmp in [quoting_error, truncated_quote] {
        let f = eth(
            GW_MAC,
            GUEST,
            0x0800,
            &ipv4(GUEST_IP, REMOTE, 1, 64, &[], &icmp),
        );
        assert_eq!(
            n.send(n.guest, &f),
            Verdict::Drop(DropReason::NatUnsupported)
        );
    }
    assert!(n.actions().is_empty());
    assert_eq!(n.engine.stats().engine.icmp_errors_sent, 0);
}

/// A DHCPDISCOVER from `mac` whose options are `options` (after the magic cookie).
fn discover(mac: MacAddr, options: &[u8]) -> Vec<u8> {
    let mut bootp = vec![0u8; 236];
    bootp[0] = 1;
    bootp[1] = 1;
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&[1, 2, 3, 4]);
    bootp[28..34].copy_from_slice(&mac.0);
    bootp.extend_from_slice(&[99, 130, 83, 99]);
    bootp.extend_from_slice(options);
    let l4 = udp([0; 4], [255; 4], (68, 67), &bootp);
    eth(
        MacAddr::BROADCAST,
        mac,
        0x0800,
        &ipv4([0; 4], [255; 4], 17, 64, &[], &l4),
    )
}

// RFC 2131/2132: option overload (52) into empty fields, zero-length and over-long options
// are counted as malformed (or ignored) while a well-formed client is still served.
#[test]
fn malformed_dhcp_options_are_counted_and_the_next_client_is_served() {
    let mut n = net(false);
    for options in [
        &[53, 1, 1, 52, 1, 3, 255][..], // overload into file and sname, both empty
        &[53, 1, 1, 12, 0, 255],        // a zero-length host name
        &[53, 1, 1, 12, 200, b'x', b'y'], // a host name longer than the message
        &[53, 0, 255],                  // a message type with no value
        &[255; 8],                      // nothing but ends
    ] {
        let _ = n.send(n.guest, &discover(GUEST, options));
    }
    let before = n.engine.dhcp().unwrap().counters().offers;
    let _ = n.send(n.other, &discover(OTHER, &[53, 1, 1, 255]));
    assert_eq!(n.engine.dhcp().unwrap().counters().offers, before + 1);
}

// IEEE 802.1Q on a network without VLANs: the tagged frame is switched within its VLAN (the
// FDB is keyed by MAC and VLAN) but never routed or answered by the gateway.
#[test]
fn vlan_tagged_frames_are_not_routed() {
    let mut n = net(false);
    let untagged = routed_udp();
    let mut tagged = untagged[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
    tagged.extend_from_slice(&untagged[12..]);
    assert_eq!(n.send(n.guest, &tagged), Verdict::Drop(DropReason::NoRoute));
    assert!(n.actions().is_empty());
}

#[test]
fn the_gateways_or_another_guests_mac_as_source_is_refused() {
    let mut n = net(false);
    let mut from_gateway = routed_udp();
    from_gateway[6..12].copy_from_slice(&GW_MAC.0);
    assert_eq!(
        n.send(n.guest, &from_gateway),
        Verdict::Drop(DropReason::SpoofedGatewayMac)
    );
    // With clean-traffic, a port keeps the MAC it started with.
    let mut n = net(true);
    let _ = n.send(n.other, &discover(OTHER, &[53, 1, 1, 255]));
    let _ = n.send(n.guest, &discover(GUEST, &[53, 1, 1, 255]));
    let _ = n.send(n.guest, &discover(OTHER, &[53, 1, 1, 255]));
    assert_eq!(n.drops(n.guest, DropReason::SpoofedMac), 1);
}

/// clean-traffic per port, as libvirt's `<filterref filter='clean-traffic'/>` on one
/// interface: a port's own setting wins over the network's, either way.
#[test]
fn clean_traffic_per_port_overrides_the_network() {
    let spoof = |n: &mut Net, port: PortId| {
        let _ = n.send(port, &discover(GUEST, &[53, 1, 1, 255]));
        let _ = n.send(port, &discover(OTHER, &[53, 1, 1, 255]));
        n.drops(port, DropReason::SpoofedMac)
    };
    // The network leaves it off; one port turns it on.
    let mut n = net(false);
    let (guest, other) = (n.guest, n.other);
    n.engine.set_clean_traffic(guest, true);
    assert_eq!(spoof(&mut n, guest), 1);
    assert_eq!(spoof(&mut n, other), 0);
    // The port leaves and a new one takes its place without the filter: the engine stops
    // guarding once no port asks for it.
    n.engine.remove_port(guest);
    let fresh = n.engine.add_port("fresh");
    assert_eq!(spoof(&mut n, fresh), 0);
    // The network turns it on; one port (a trusted appliance) turns it off.
    let mut n = net(true);
    let (guest, other) = (n.guest, n.other);
    n.engine.set_clean_traffic(other, false);
    assert_eq!(spoof(&mut n, guest), 1);
    assert_eq!(spoof(&mut n, other), 0);
}

/// One MAC inventing client identifiers (RFC 2131 4.2, option 61) is held to leases-per-mac,
/// counted, and said in the log once.
#[test]
fn a_mac_past_its_lease_cap_is_refused_counted_and_logged_once() {
    let mut n = net_with(false, 1);
    for id in 1..=3u8 {
        let _ = n.send(n.guest, &discover(GUEST, &[53, 1, 1, 61, 2, 0xff, id, 255]));
    }
    let counters = n.engine.dhcp().unwrap().counters().clone();
    assert_eq!((counters.offers, counters.mac_lease_cap), (1, 2));
    let notices: Vec<String> = std::iter::from_fn(|| n.engine.poll_notice()).collect();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(notices[0].contains("leases-per-mac"), "{notices:?}");
}

/// The offload state of a UDP super-frame (virtio 1.2 5.1.6.2, `GSO_UDP_L4`): `gso_size`
/// bytes of payload per datagram.
fn uso(gso_size: u16) -> VnetHdr {
    VnetHdr {
        flags: datapath::wire::vnet::F_NEEDS_CSUM,
        gso_type: datapath::wire::vnet::gso::UDP_L4,
        hdr_len: 42,
        gso_size,
        csum_start: 34,
        csum_offset: 6,
    }
}

// RFC 768 / RFC 2131 4.1 / RFC 1035 4.2.1: the gateway's DHCP server and DNS forwarder read
// one message per UDP datagram; a USO super-frame (several datagrams in one frame) to them is
// dropped and counted (gso_to_service), never parsed as one long message. Beyond the gateway
// (socket NAT) the same frame leaves as its datagrams, and a super-frame whose GSO type or
// size cannot be honoured is a bad vnet header.
#[test]
fn uso_super_frames_to_the_gateways_services_are_dropped_and_counted() {
    use datapath::dns::DnsService;
    use dhcp_dns::dns::{DnsConfig, DnsServer};
    let mut n = net(false);
    let dns = DnsService::new(DnsServer::new(DnsConfig::new()), GW_MAC, Ipv4Addr::from(GW));
    assert!(n.engine.enable_dns(dns));
    let send = |n: &mut Net, frame: Vec<u8>, vnet: VnetHdr| {
        n.now += Duration::from_millis(1);
        let mut buf = frame;
        let verdict = n.engine.handle_frame(n.now, n.guest, &vnet, &mut buf);
        while n.engine.poll_transmit().is_some() {}
        verdict
    };
    // Two DHCPDISCOVERs back to back, broadcast and to the gateway.
    let mut bootp = vec![0u8; 236];
    bootp[0] = 1;
    bootp[1] = 1;
    bootp[2] = 6;
    bootp[28..34].copy_from_slice(&GUEST.0);
    bootp.extend_from_slice(&[99, 130, 83, 99, 53, 1, 1, 255]);
    let twice = [bootp.clone(), bootp].concat();
    let size = (twice.len() / 2) as u16;
    for (dst_mac, dst) in [(MacAddr::BROADCAST, [255; 4]), (GW_MAC, GW)] {
        let l4 = udp([0; 4], dst, (68, 67), &twice);
        let frame = eth(dst_mac, GUEST, 0x0800, &ipv4([0; 4], dst, 17, 64, &[], &l4));
        assert_eq!(
            send(&mut n, frame, uso(size)),
            Verdict::Drop(DropReason::GsoToService)
        );
    }
    assert_eq!(n.engine.dhcp().unwrap().counters().offers, 0);
    // Two DNS queries back to back.
    let mut query = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    query.extend_from_slice(b"\x07printer\x03lab\x00\x00\x01\x00\x01");
    let twice = [query.clone(), query].concat();
    let l4 = udp(GUEST_IP, GW, (5353, 53), &twice);
    let frame = eth(GW_MAC, GUEST, 0x0800, &ipv4(GUEST_IP, GW, 17, 64, &[], &l4));
    let size = (twice.len() / 2) as u16;
    assert_eq!(
        send(&mut n, frame, uso(size)),
        Verdict::Drop(DropReason::GsoToService)
    );
    assert_eq!(n.drops(n.guest, DropReason::GsoToService), 3);

    // To the outside through socket NAT: three datagrams from one frame.
    let l4 = udp(GUEST_IP, REMOTE, (5000, 4433), &[9; 3000]);
    let frame = eth(
        GW_MAC,
        GUEST,
        0x0800,
        &ipv4(GUEST_IP, REMOTE, 17, 64, &[], &l4),
    );
    assert_eq!(send(&mut n, frame.clone(), uso(1200)), Verdict::Consumed);
    let sent: Vec<usize> = n
        .actions()
        .iter()
        .filter_map(|a| match a {
            Action::SendTo(_, _, d) => Some(d.iter().map(<[u8]>::len).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(sent, [1200, 1200, 600]);
    // A segment size of zero, or a TCP GSO type on UDP, cannot be honoured.
    let tso = VnetHdr {
        gso_type: datapath::wire::vnet::gso::TCPV4,
        ..uso(1200)
    };
    for vnet in [uso(0), tso] {
        assert_eq!(
            send(&mut n, frame.clone(), vnet),
            Verdict::Drop(DropReason::BadVnetHeader)
        );
    }
    assert!(n.actions().is_empty());
}
