//! The parts of an IPv4 packet NAT reads and rewrites, and the rewrites themselves.
//!
//! Every rewrite adjusts the checksums it touches incrementally (RFC 1624), never by summing
//! the payload again: a 64 KB TSO frame costs the same few instructions as a 64-byte one.
//! When the L4 checksum field holds only a partial sum (virtio `NEEDS_CSUM`: the device
//! finishes it over the pseudo-header and the segment), address changes are folded into that
//! partial sum and port changes are left out, because the device will sum the new ports itself.

use crate::wire::checksum;
use crate::wire::ipv4::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use std::net::Ipv4Addr;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACHABLE: u8 = 3;
pub const ICMP_SOURCE_QUENCH: u8 = 4;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A connection's identity as one packet carries it. ICMP queries use their identifier as both
/// ports, so the same lookups serve them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub proto: u8,
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
}

impl Tuple {
    pub fn reversed(&self) -> Tuple {
        Tuple {
            proto: self.proto,
            src: self.dst,
            sport: self.dport,
            dst: self.src,
            dport: self.sport,
        }
    }
}

/// Which end of a packet a rewrite changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
}

/// What kind of packet an L4 header makes this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// TCP, UDP or an ICMP query (echo): translated through its own connection.
    Flow { tcp_flags: u8 },
    /// An ICMP error (RFC 792 types 3, 4, 11, 12): translated through the connection of the
    /// packet it quotes (RFC 5508 4.1).
    IcmpError,
}

/// Offsets of the fields a rewrite touches, found once per packet.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub l4: usize,
    /// Where the L4 checksum lives, if this packet carries it.
    pub check: Option<usize>,
    /// Whether the L4 checksum covers the pseudo-header (TCP, UDP; not ICMP).
    pub pseudo: bool,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn addr(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// Header length of the IPv4 packet at `b`, checked against `b`.
pub fn ip_header_len(b: &[u8]) -> Option<usize> {
    let ihl = (*b.first()? & 0x0f) as usize * 4;
    (b[0] >> 4 == 4 && ihl >= 20 && b.len() >= ihl).then_some(ihl)
}

/// Fragment offset (in bytes) and more-fragments flag.
pub fn fragment_info(b: &[u8]) -> (usize, bool) {
    let word = be16(b, 6);
    ((word & 0x1fff) as usize * 8, word & 0x2000 != 0)
}

pub fn ip_id(b: &[u8]) -> u16 {
    be16(b, 4)
}

/// Reads the tuple and kind of the packet `b` (an IPv4 packet whose header was checked),
/// whose L4 header starts at `l4`. `None` when the L4 header is too short to hold its ports
/// and checksum (for TCP, a whole header), or the protocol is not one NAT translates.
pub fn classify(b: &[u8], l4: usize) -> Option<(Tuple, Kind, Layout)> {
    classify_at(b, l4, false)
}

fn classify_at(b: &[u8], l4: usize, quoted: bool) -> Option<(Tuple, Kind, Layout)> {
    let proto = b[9];
    let (src, dst) = (addr(b, 12), addr(b, 16));
    let rest = b.len().checked_sub(l4)?;
    // A whole TCP header (RFC 9293 3.1: data offset 5 or more, within the segment), unless
    // quoted in an ICMP error, which may hold only its first 8 bytes.
    let tcp_header_ok = || rest >= 20 && (20..=rest).contains(&(usize::from(b[l4 + 12] >> 4) * 4));
    let (sport, dport, kind, layout) = match proto {
        PROTO_TCP if (quoted && rest >= 8) || (!quoted && tcp_header_ok()) => (
            be16(b, l4),
            be16(b, l4 + 2),
            Kind::Flow {
                tcp_flags: if rest >= 20 { b[l4 + 13] } else { 0 },
            },
            Layout {
                l4,
                check: Some(l4 + 16),
                pseudo: true,
            },
        ),
        PROTO_UDP if rest >= 8 => (
            be16(b, l4),
            be16(b, l4 + 2),
            Kind::Flow { tcp_flags: 0 },
            Layout {
                l4,
                check: Some(l4 + 6),
                pseudo: true,
            },
        ),
        PROTO_ICMP if rest >= 8 => {
            let layout = Layout {
                l4,
                check: Some(l4 + 2),
                pseudo: false,
            };
            match b[l4] {
                ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY => {
                    let id = be16(b, l4 + 4);
                    (id, id, Kind::Flow { tcp_flags: 0 }, layout)
                }
                ICMP_DEST_UNREACHABLE
                | ICMP_SOURCE_QUENCH
                | ICMP_TIME_EXCEEDED
                | ICMP_PARAMETER_PROBLEM => (0, 0, Kind::IcmpError, layout),
                _ => return None,
            }
        }
        _ => return None,
    };
    let tuple = Tuple {
        proto,
        src,
        sport,
        dst,
        dport,
    };
    Some((tuple, kind, layout))
}

/// Like [`classify`] for the packet quoted inside an ICMP error: only its IP header and the
/// first 8 bytes of its L4 header are guaranteed (RFC 792), so the L4 checksum is rewritten
/// only when the quote reaches it.
pub fn classify_quoted(b: &[u8]) -> Option<(Tuple, Layout)> {
    let ihl = ip_header_len(b)?;
    if b.len() < ihl + 8 || fragment_info(b).0 != 0 {
        return None;
    }
    match classify_at(b, ihl, true)? {
        (tuple, Kind::Flow { .. }, mut layout) => {
            layout.check = layout.check.filter(|c| c + 2 <= b.len());
            Some((tuple, layout))
        }
        (_, Kind::IcmpError, _) => None,
    }
}

/// Replaces one address of the IPv4 packet `b` (header checksum and, when the L4 header is in
/// this packet, its pseudo-header checksum included).
pub fn rewrite_addr(b: &mut [u8], end: End, new: Ipv4Addr, layout: Option<&Layout>, partial: bool) {
    let at = match end {
        End::Src => 12,
        End::Dst => 16,
    };
    let old = u32::from(addr(b, at));
    let new = u32::from(new);
    if old == new {
        return;
    }
    b[at..at + 4].copy_from_slice(&new.to_be_bytes());
    let ip_check = be16(b, 10);
    b[10..12].copy_from_slice(&checksum::update32(ip_check, old, new).to_be_bytes());
    if let Some(layout) = layout.filter(|l| l.pseudo) {
        update_l4_check(b, layout, partial, |c| checksum::update32(c, old, new));
    }
}

/// Replaces one port (or the ICMP query identifier) of the L4 header described by `layout`.
pub fn rewrite_port(b: &mut [u8], end: End, new: u16, layout: &Layout, partial: bool) {
    let at = match (b[9], end) {
        (PROTO_ICMP, _) => layout.l4 + 4,
        (_, End::Src) => layout.l4,
        (_, End::Dst) => layout.l4 + 2,
    };
    let old = be16(b, at);
    if old == new {
        return;
    }
    b[at..at + 2].copy_from_slice(&new.to_be_bytes());
    // A partial sum covers only the pseudo-header: the device sums the ports.
    if !partial {
        update_l4_check(b, layout, false, |c| checksum::update16(c, old, new));
    }
}

fn update_l4_check(b: &mut [u8], layout: &Layout, partial: bool, update: impl Fn(u16) -> u16) {
    let Some(at) = layout.check.filter(|c| c + 2 <= b.len()) else {
        return;
    };
    let check = be16(b, at);
    let is_udp = b[9] == PROTO_UDP;
    let new = if partial {
        // The field holds the folded pseudo-header sum itself, not its complement.
        !update(!check)
    } else if is_udp && check == 0 {
        // RFC 768: zero means "no checksum" and stays so.
        return;
    } else {
        let c = update(check);
        // RFC 768: a computed UDP checksum of zero is sent as all ones.
        if is_udp && c == 0 { 0xffff } else { c }
    };
    b[at..at + 2].copy_from_slice(&new.to_be_bytes());
}

/// Recomputes the ICMP checksum over the whole message at `b[l4..]` (ICMP errors are at most
/// 576 bytes, and their quoted headers change in several places).
pub fn refresh_icmp_checksum(b: &mut [u8], l4: usize) {
    b[l4 + 2..l4 + 4].fill(0);
    let c = checksum::checksum(&b[l4..]);
    b[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
}

/// Decrements the TTL with its checksum update; false when it would reach zero.
pub fn decrement_ttl(b: &mut [u8]) -> bool {
    if b[8] <= 1 {
        return false;
    }
    let old = be16(b, 8);
    b[8] -= 1;
    let new = be16(b, 8);
    let check = be16(b, 10);
    b[10..12].copy_from_slice(&checksum::update16(check, old, new).to_be_bytes());
    true
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Packets built field by field with full checksums, for the NAT tests.
    use super::*;

    pub fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        let total = (20 + l4.len()) as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        let c = checksum::checksum(&p);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(l4);
        p
    }

    fn with_l4_checksum(
        proto: u8,
        src: [u8; 4],
        dst: [u8; 4],
        mut l4: Vec<u8>,
        at: usize,
    ) -> Vec<u8> {
        let sum = checksum::pseudo_header_v4(src, dst, proto, l4.len() as u16);
        let c = !checksum::fold(checksum::accumulate(sum, &l4));
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        ipv4(proto, src, dst, &l4)
    }

    pub fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, data: &[u8]) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.extend_from_slice(data);
        with_l4_checksum(PROTO_UDP, src, dst, l4, 6)
    }

    pub fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        l4.extend_from_slice(b"data");
        with_l4_checksum(PROTO_TCP, src, dst, l4, 16)
    }

    pub fn icmp(
        src: [u8; 4],
        dst: [u8; 4],
        kind: u8,
        code: u8,
        rest: [u8; 4],
        data: &[u8],
    ) -> Vec<u8> {
        let mut l4 = vec![kind, code, 0, 0];
        l4.extend_from_slice(&rest);
        l4.extend_from_slice(data);
        let c = checksum::checksum(&l4);
        l4[2..4].copy_from_slice(&c.to_be_bytes());
        ipv4(PROTO_ICMP, src, dst, &l4)
    }

    pub fn echo(src: [u8; 4], dst: [u8; 4], kind: u8, id: u16) -> Vec<u8> {
        let [a, b] = id.to_be_bytes();
        icmp(src, dst, kind, 0, [a, b, 0, 1], b"abcdefgh")
    }

    /// The packet's IP header and L4 checksums all verify.
    pub fn checksums_ok(p: &[u8]) -> bool {
        let ihl = ip_header_len(p).unwrap();
        if checksum::checksum(&p[..ihl]) != 0 {
            return false;
        }
        let l4 = &p[ihl..];
        match p[9] {
            PROTO_ICMP => checksum::checksum(l4) == 0,
            PROTO_UDP if l4[6..8] == [0, 0] => true,
            proto => {
                let src: [u8; 4] = p[12..16].try_into().unwrap();
                let dst: [u8; 4] = p[16..20].try_into().unwrap();
                let sum = checksum::pseudo_header_v4(src, dst, proto, l4.len() as u16);
                checksum::fold(checksum::accumulate(sum, l4)) == 0xffff
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    const GUEST: [u8; 4] = [192, 168, 122, 10];
    const EXT: [u8; 4] = [203, 0, 113, 2];
    const REMOTE: [u8; 4] = [203, 0, 113, 1];

    fn layout(p: &[u8]) -> Layout {
        classify(p, 20).unwrap().2
    }

    // RFC 1624 3: the incrementally updated checksums equal freshly computed ones.
    #[test]
    fn rewrites_keep_tcp_udp_icmp_checksums_valid() {
        for mut p in [
            tcp(GUEST, 40000, REMOTE, 80, TCP_SYN),
            udp(GUEST, 5353, REMOTE, 53, b"query"),
            echo(GUEST, REMOTE, ICMP_ECHO_REQUEST, 77),
        ] {
            let l = layout(&p);
            rewrite_addr(&mut p, End::Src, Ipv4Addr::from(EXT), Some(&l), false);
            rewrite_port(&mut p, End::Src, 1024, &l, false);
            assert!(checksums_ok(&p), "{p:?}");
            let (t, _, _) = classify(&p, 20).unwrap();
            assert_eq!(t.src, Ipv4Addr::from(EXT));
            assert_eq!(t.sport, 1024);
        }
    }

    // RFC 768: a UDP checksum of zero means none was computed; it stays zero.
    #[test]
    fn udp_without_checksum_stays_without() {
        let mut p = udp(GUEST, 5000, REMOTE, 53, b"x");
        p[26..28].fill(0);
        let l = layout(&p);
        rewrite_addr(&mut p, End::Src, Ipv4Addr::from(EXT), Some(&l), false);
        rewrite_port(&mut p, End::Src, 2000, &l, false);
        assert_eq!(&p[26..28], &[0, 0]);
        assert_eq!(checksum::checksum(&p[..20]), 0);
    }

    // virtio 1.1 5.1.6.2: with NEEDS_CSUM the field holds the pseudo-header sum; after the
    // rewrite it must be the pseudo-header sum of the new addresses, ports left to the device.
    #[test]
    fn partial_checksum_tracks_the_pseudo_header_only() {
        let mut p = tcp(GUEST, 40000, REMOTE, 80, TCP_ACK);
        let len = (p.len() - 20) as u16;
        let partial = checksum::fold(checksum::pseudo_header_v4(GUEST, REMOTE, PROTO_TCP, len));
        p[36..38].copy_from_slice(&partial.to_be_bytes());
        let l = layout(&p);
        rewrite_addr(&mut p, End::Src, Ipv4Addr::from(EXT), Some(&l), true);
        rewrite_port(&mut p, End::Src, 1500, &l, true);
        let want = checksum::fold(checksum::pseudo_header_v4(EXT, REMOTE, PROTO_TCP, len));
        assert_eq!(u16::from_be_bytes([p[36], p[37]]), want);
        // What the device then computes is a valid checksum.
        p[36..38].fill(0);
        let full = !checksum::fold(checksum::accumulate(want as u32, &p[20..]));
        p[36..38].copy_from_slice(&full.to_be_bytes());
        assert!(checksums_ok(&p));
    }

    #[test]
    fn ttl_decrements_with_checksum_and_stops_at_one() {
        let mut p = udp(GUEST, 1, REMOTE, 2, b"");
        assert!(decrement_ttl(&mut p));
        assert_eq!(p[8], 63);
        assert_eq!(checksum::checksum(&p[..20]), 0);
        p[8] = 1;
        assert!(!decrement_ttl(&mut p));
    }

    #[test]
    fn quoted_packets_need_only_eight_bytes_of_l4() {
        let p = tcp(EXT, 1024, REMOTE, 80, TCP_SYN);
        let (t, l) = classify_quoted(&p[..28]).unwrap();
        assert_eq!((t.sport, t.dport, t.proto), (1024, 80, PROTO_TCP));
        assert_eq!(l.check, None);
        let (_, l) = classify_quoted(&p).unwrap();
        assert_eq!(l.check, Some(36));
        assert!(classify_quoted(&p[..27]).is_none());
        assert!(classify(&[0x45; 24], 20).is_none());
    }
}
