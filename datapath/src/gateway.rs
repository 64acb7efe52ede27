//! The virtual gateway: the address `virbr0` holds in libvirt's default network
//! (192.168.122.1), served inside the engine.
//!
//! It answers ARP for its address and ICMP echo, rewriting the request into the reply in the
//! frame buffer itself, so answering costs no allocation and no copy. Packets for other
//! addresses are handed to the engine to route (TTL, MTU, NAT); the ICMP errors routing
//! needs are built here.

use crate::port::DropReason;
use crate::wire::arp::{self, ArpPacket};
use crate::wire::checksum;
use crate::wire::ipv4::{self, Ipv4Packet};
use crate::wire::{EtherType, MacAddr};
use serde::Serialize;
use std::net::Ipv4Addr;

/// TTL of packets the gateway originates (Linux's default `ip_default_ttl`).
pub const DEFAULT_TTL: u8 = 64;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

/// The gateway's identity on the network: `<mac address>` and `<ip address prefix>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayConfig {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub prefix: u8,
}

impl GatewayConfig {
    /// A stable locally administered MAC for a network without `<mac>`: libvirt's
    /// 52:54:00 prefix with three bytes derived from the network name (FNV-1a), so the
    /// gateway keeps its MAC across restarts and guests' ARP caches stay valid.
    pub fn mac_for_network(name: &str) -> MacAddr {
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let b = hash.to_be_bytes();
        MacAddr([0x52, 0x54, 0x00, b[5], b[6], b[7]])
    }
}

/// What the gateway did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The frame was rewritten into a reply: send it back out of the ingress port.
    Reply,
    /// Not addressed to the gateway: switch it as usual.
    Pass,
    /// An IPv4 packet sent to the gateway's MAC for another address: route it (its header
    /// was checked).
    Route,
    Drop(DropReason),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GatewayCounters {
    pub arp_replies: u64,
    pub echo_replies: u64,
}

#[derive(Debug)]
pub struct Gateway {
    config: GatewayConfig,
    pub counters: GatewayCounters,
}

impl Gateway {
    pub fn new(config: GatewayConfig) -> Gateway {
        Gateway {
            config,
            counters: GatewayCounters::default(),
        }
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// Handles `frame`, whose Ethernet header is `l3` bytes long. `unicast_to_us` says the
    /// destination MAC is the gateway's; otherwise only a broadcast ARP for the gateway's
    /// address is taken, and everything else passes.
    pub fn handle(
        &mut self,
        frame: &mut [u8],
        l3: usize,
        ethertype: EtherType,
        unicast_to_us: bool,
    ) -> Answer {
        let answer = match ethertype {
            EtherType::ARP => self.handle_arp(frame, l3, unicast_to_us),
            _ if !unicast_to_us => Answer::Pass,
            EtherType::IPV4 => self.handle_ipv4(&mut frame[l3..]),
            _ => Answer::Drop(DropReason::GatewayUnhandled),
        };
        if answer == Answer::Reply {
            // Back to the sender, from the gateway.
            frame.copy_within(6..12, 0);
            frame[6..12].copy_from_slice(&self.config.mac.0);
        }
        answer
    }

    /// RFC 826 "Packet Reception": answer a request for our protocol address.
    fn handle_arp(&mut self, frame: &mut [u8], l3: usize, unicast_to_us: bool) -> Answer {
        let not_ours = if unicast_to_us {
            Answer::Drop(DropReason::GatewayUnhandled)
        } else {
            Answer::Pass
        };
        let Ok(mut arp) = ArpPacket::new_checked(&mut frame[l3..]) else {
            return if unicast_to_us {
                Answer::Drop(DropReason::BadHeader)
            } else {
                Answer::Pass
            };
        };
        if arp.operation() != arp::OP_REQUEST || arp.target_ip() != self.config.ip {
            return not_ours;
        }
        arp.make_reply(self.config.mac, self.config.ip);
        self.counters.arp_replies += 1;
        Answer::Reply
    }

    fn handle_ipv4(&mut self, packet: &mut [u8]) -> Answer {
        let Ok(ip) = Ipv4Packet::new_checked(&*packet) else {
            return Answer::Drop(DropReason::BadHeader);
        };
        if !ip.header_checksum_ok() {
            return Answer::Drop(DropReason::BadChecksum);
        }
        if ip.dst() != self.config.ip {
            return Answer::Route;
        }
        match answer_echo(packet) {
            Ok(()) => {
                self.counters.echo_replies += 1;
                Answer::Reply
            }
            Err(reason) => Answer::Drop(reason),
        }
    }
}

/// RFC 792 "Echo or Echo Reply Message": turns the echo request `packet` (an IPv4 packet
/// whose header was checked) into its reply, in place: same identifier, sequence and data,
/// type 0, addresses swapped. The type/code word changes, so the checksum is updated for that
/// word (RFC 1624).
pub fn answer_echo(packet: &mut [u8]) -> Result<(), DropReason> {
    let Ok(mut ip) = Ipv4Packet::new_checked(packet) else {
        return Err(DropReason::BadHeader);
    };
    if ip.protocol() != ipv4::PROTO_ICMP {
        return Err(DropReason::GatewayUnhandled);
    }
    if ip.is_fragment() {
        return Err(DropReason::Fragment);
    }
    let icmp = ip.payload_mut();
    if icmp.len() < 8 || icmp[0] != ICMP_ECHO_REQUEST || icmp[1] != 0 {
        return Err(DropReason::GatewayUnhandled);
    }
    if checksum::fold(checksum::accumulate(0, icmp)) != 0xffff {
        return Err(DropReason::BadChecksum);
    }
    let check = u16::from_be_bytes([icmp[2], icmp[3]]);
    icmp[0] = ICMP_ECHO_REPLY;
    let check = checksum::update16(
        check,
        (ICMP_ECHO_REQUEST as u16) << 8,
        (ICMP_ECHO_REPLY as u16) << 8,
    );
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    ip.swap_addresses();
    ip.set_ttl(DEFAULT_TTL);
    Ok(())
}

/// ICMP types that are errors (RFC 792); RFC 1122 3.2.2 forbids answering them with errors.
fn is_icmp_error(kind: u8) -> bool {
    matches!(kind, 3 | 4 | 5 | 11 | 12)
}

/// An Ethernet frame carrying an ICMP error (RFC 792) from `src_ip` about `offending` (the
/// IPv4 packet that caused it), quoting as much of it as fits in 576 bytes (RFC 1812
/// 4.3.2.3). `None` where RFC 1122 3.2.2 says no error may be sent: about an ICMP error, a
/// later fragment, or a packet to or from a broadcast, multicast or unspecified address.
pub fn icmp_error(
    macs: (MacAddr, MacAddr),
    src_ip: Ipv4Addr,
    kind: u8,
    code: u8,
    rest: [u8; 4],
    offending: &[u8],
) -> Option<Vec<u8>> {
    let ip = Ipv4Packet::new_checked(offending).ok()?;
    let ihl = ip.header_len();
    let (offset_word, proto) = (
        u16::from_be_bytes([offending[6], offending[7]]),
        ip.protocol(),
    );
    let dst = ip.src();
    let bad_address = |a: Ipv4Addr| a.is_broadcast() || a.is_multicast() || a.is_unspecified();
    if offset_word & 0x1fff != 0
        || bad_address(ip.src())
        || bad_address(ip.dst())
        || (proto == ipv4::PROTO_ICMP && offending.len() > ihl && is_icmp_error(offending[ihl]))
    {
        return None;
    }
    let quote = &offending[..ip.total_len().min(576 - 28)];
    let mut f = ipv4_frame(macs, src_ip, dst, ipv4::PROTO_ICMP, 0xc0, 8 + quote.len());
    f[34..36].copy_from_slice(&[kind, code]);
    f[38..42].copy_from_slice(&rest);
    f[42..].copy_from_slice(quote);
    let c = checksum::checksum(&f[34..]);
    f[36..38].copy_from_slice(&c.to_be_bytes());
    Some(f)
}

/// An Ethernet frame (`macs` = destination, source) with an IPv4 header from `src` to `dst`
/// (TTL [`DEFAULT_TTL`], type of service `tos`, header checksum filled in) and
/// `payload_len` zero bytes of payload for the caller to fill.
pub fn ipv4_frame(
    (dst_mac, src_mac): (MacAddr, MacAddr),
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    tos: u8,
    payload_len: usize,
) -> Vec<u8> {
    let total = 20 + payload_len;
    let mut f = vec![0u8; 14 + total];
    f[0..6].copy_from_slice(&dst_mac.0);
    f[6..12].copy_from_slice(&src_mac.0);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let header = &mut f[14..34];
    header[0] = 0x45;
    header[1] = tos;
    header[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    header[8] = DEFAULT_TTL;
    header[9] = protocol;
    header[12..16].copy_from_slice(&src.octets());
    header[16..20].copy_from_slice(&dst.octets());
    let c = checksum::checksum(header);
    header[10..12].copy_from_slice(&c.to_be_bytes());
    f
}

/// The source port and payload of `packet` (an IPv4 packet) when it is an unfragmented UDP
/// datagram to port `port` whose lengths are consistent.
pub fn udp_datagram_to(packet: &[u8], port: u16) -> Option<(u16, &[u8])> {
    // Most frames to the gateway are routed TCP: decided on one byte, before the header is
    // checked in full.
    if packet.get(9) != Some(&ipv4::PROTO_UDP) {
        return None;
    }
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    if ip.protocol() != ipv4::PROTO_UDP || ip.is_fragment() {
        return None;
    }
    let udp = packet.get(ip.header_len()..ip.total_len())?;
    if udp.len() < 8 || u16::from_be_bytes([udp[2], udp[3]]) != port {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if len < 8 || len > udp.len() {
        return None;
    }
    Some((u16::from_be_bytes([udp[0], udp[1]]), &udp[8..len]))
}

/// An Ethernet frame carrying one UDP datagram, checksums filled in.
pub fn udp_frame(
    macs: (MacAddr, MacAddr),
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut f = ipv4_frame(macs, src, dst, ipv4::PROTO_UDP, 0, udp_len);
    let udp = &mut f[34..];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    udp[8..].copy_from_slice(payload);
    let sum =
        checksum::pseudo_header_v4(src.octets(), dst.octets(), ipv4::PROTO_UDP, udp_len as u16);
    let c = !checksum::fold(checksum::accumulate(sum, udp));
    // RFC 768: a computed checksum of zero is sent as all ones.
    let c = if c == 0 { 0xffff } else { c };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ethernet::HEADER_LEN;

    const GW_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
    const GUEST: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    fn gateway() -> Gateway {
        Gateway::new(GatewayConfig {
            mac: GW_MAC,
            ip: Ipv4Addr::new(192, 168, 122, 1),
            prefix: 24,
        })
    }

    fn eth(dst: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst.0);
        f.extend_from_slice(&GUEST.0);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn arp_request(target: [u8; 4]) -> Vec<u8> {
        let mut a = vec![0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01];
        a.extend_from_slice(&GUEST.0);
        a.extend_from_slice(&[192, 168, 122, 10]);
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&target);
        eth(MacAddr::BROADCAST, 0x0806, &a)
    }

    fn echo_request(dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0x00, 0x01];
        icmp.extend_from_slice(payload);
        let c = checksum::checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 1, 0, 0, 192, 168, 122, 10];
        ip.extend_from_slice(&dst);
        let total = (20 + icmp.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let c = checksum::checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(&icmp);
        eth(GW_MAC, 0x0800, &ip)
    }

    // RFC 826: a request for our address is answered with our hardware address, to the asker.
    #[test]
    fn answers_arp_for_its_address_only() {
        let mut gw = gateway();
        let mut f = arp_request([192, 168, 122, 1]);
        assert_eq!(
            gw.handle(&mut f, HEADER_LEN, EtherType::ARP, false),
            Answer::Reply
        );
        assert_eq!(&f[0..6], &GUEST.0);
        assert_eq!(&f[6..12], &GW_MAC.0);
        let arp = ArpPacket::new_checked(&f[HEADER_LEN..]).unwrap();
        assert_eq!(arp.operation(), arp::OP_REPLY);
        assert_eq!(arp.sender_mac(), GW_MAC);

        let mut other = arp_request([192, 168, 122, 11]);
        let before = other.clone();
        assert_eq!(
            gw.handle(&mut other, HEADER_LEN, EtherType::ARP, false),
            Answer::Pass
        );
        assert_eq!(other, before, "frames that pass are untouched");
        assert_eq!(gw.counters.arp_replies, 1);
    }

    // RFC 792: the echo reply carries the request's identifier, sequence and data.
    #[test]
    fn answers_ping_with_valid_checksums() {
        let mut gw = gateway();
        let data: Vec<u8> = (0..56).collect();
        let mut f = echo_request([192, 168, 122, 1], &data);
        assert_eq!(
            gw.handle(&mut f, HEADER_LEN, EtherType::IPV4, true),
            Answer::Reply
        );
        let ip = Ipv4Packet::new_checked(&f[HEADER_LEN..]).unwrap();
        assert!(ip.header_checksum_ok());
        assert_eq!(ip.src(), Ipv4Addr::new(192, 168, 122, 1));
        assert_eq!(ip.dst(), Ipv4Addr::new(192, 168, 122, 10));
        let icmp = ip.payload();
        assert_eq!(icmp[0], 0);
        assert_eq!(&icmp[4..8], &[0x12, 0x34, 0x00, 0x01]);
        assert_eq!(&icmp[8..], &data[..]);
        assert_eq!(checksum::fold(checksum::accumulate(0, icmp)), 0xffff);
        assert_eq!(&f[0..6], &GUEST.0);
    }

    #[test]
    fn routes_other_destinations_and_drops_the_rest_with_a_reason() {
        let mut gw = gateway();
        let mut beyond = echo_request([203, 0, 113, 1], &[0; 8]);
        assert_eq!(
            gw.handle(&mut beyond, HEADER_LEN, EtherType::IPV4, true),
            Answer::Route
        );
        let mut bad_sum = echo_request([192, 168, 122, 1], &[0; 8]);
        let last = bad_sum.len() - 1;
        bad_sum[last] ^= 0xff;
        assert_eq!(
            gw.handle(&mut bad_sum, HEADER_LEN, EtherType::IPV4, true),
            Answer::Drop(DropReason::BadChecksum)
        );
        let mut bad_ip_sum = echo_request([192, 168, 122, 1], &[0; 8]);
        bad_ip_sum[HEADER_LEN + 8] = 1;
        assert_eq!(
            gw.handle(&mut bad_ip_sum, HEADER_LEN, EtherType::IPV4, true),
            Answer::Drop(DropReason::BadChecksum)
        );
        let mut truncated = echo_request([192, 168, 122, 1], &[0; 8]);
        truncated.truncate(HEADER_LEN + 10);
        assert_eq!(
            gw.handle(&mut truncated, HEADER_LEN, EtherType::IPV4, true),
            Answer::Drop(DropReason::BadHeader)
        );
        let mut v6 = eth(GW_MAC, 0x86dd, &[0; 40]);
        assert_eq!(
            gw.handle(&mut v6, HEADER_LEN, EtherType::IPV6, true),
            Answer::Drop(DropReason::GatewayUnhandled)
        );
    }

    // RFC 792 / RFC 1812 4.3.2.3: the error quotes the offending header and data, from the
    // gateway to the sender; RFC 1122 3.2.2: never about an ICMP error.
    #[test]
    fn icmp_errors_quote_the_packet_and_are_not_sent_about_errors() {
        let f = echo_request([203, 0, 113, 1], &[7; 32]);
        let offending = &f[HEADER_LEN..];
        let gw_ip = Ipv4Addr::new(192, 168, 122, 1);
        let e = icmp_error((GUEST, GW_MAC), gw_ip, 11, 0, [0; 4], offending).unwrap();
        assert_eq!(&e[0..6], &GUEST.0);
        let ip = Ipv4Packet::new_checked(&e[HEADER_LEN..]).unwrap();
        assert!(ip.header_checksum_ok());
        assert_eq!(ip.src(), gw_ip);
        assert_eq!(ip.dst(), Ipv4Addr::new(192, 168, 122, 10));
        let icmp = ip.payload();
        assert_eq!((icmp[0], icmp[1]), (11, 0));
        assert_eq!(checksum::checksum(icmp), 0);
        assert_eq!(&icmp[8..], offending);
        let about_error = icmp_error((GUEST, GW_MAC), gw_ip, 3, 1, [0; 4], &e[HEADER_LEN..]);
        assert!(about_error.is_none());
    }

    #[test]
    fn generated_mac_is_stable_and_local() {
        let a = GatewayConfig::mac_for_network("default");
        assert_eq!(a, GatewayConfig::mac_for_network("default"));
        assert_ne!(a, GatewayConfig::mac_for_network("other"));
        assert!(a.is_valid_source());
        assert_eq!(&a.0[..3], &[0x52, 0x54, 0x00]);
    }

    const SERVER_PORT: u16 = 67;

    fn udp_packet(dport: u16, payload: &[u8]) -> Vec<u8> {
        let f = udp_frame(
            (MacAddr::BROADCAST, MacAddr([2, 0, 0, 0, 0, 1])),
            (Ipv4Addr::UNSPECIFIED, 68),
            (Ipv4Addr::BROADCAST, dport),
            payload,
        );
        f[14..].to_vec()
    }

    #[test]
    fn finds_the_payload_of_datagrams_to_one_port_only() {
        let p = udp_packet(SERVER_PORT, b"hello");
        assert_eq!(
            udp_datagram_to(&p, SERVER_PORT).map(|(_, d)| d),
            Some(&b"hello"[..])
        );
        assert_eq!(
            udp_datagram_to(&udp_packet(53, b"hello"), SERVER_PORT),
            None
        );
        // A UDP length longer than the packet, or shorter than its header: not DHCP.
        let mut lying = p.clone();
        lying[24..26].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(udp_datagram_to(&lying, SERVER_PORT), None);
        lying[24..26].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(udp_datagram_to(&lying, SERVER_PORT), None);
        for n in 0..p.len() {
            let _ = udp_datagram_to(&p[..n], SERVER_PORT);
        }
    }

    #[test]
    fn udp_frames_carry_valid_checksums() {
        let p = udp_packet(SERVER_PORT, b"odd");
        assert_eq!(checksum::checksum(&p[..20]), 0);
        let sum = checksum::pseudo_header_v4(
            p[12..16].try_into().unwrap(),
            p[16..20].try_into().unwrap(),
            ipv4::PROTO_UDP,
            11,
        );
        assert_eq!(checksum::fold(checksum::accumulate(sum, &p[20..])), 0xffff);
    }
}
