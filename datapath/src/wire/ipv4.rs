//! IPv4 headers (RFC 791): a checked view plus the in-place rewrites the gateway and NAT make.

use super::WireError;
use super::checksum;
use std::net::Ipv4Addr;

mod field {
    use std::ops::Range;
    pub const VER_IHL: usize = 0;
    pub const LENGTH: Range<usize> = 2..4;
    pub const FLAGS_FRAG: Range<usize> = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Range<usize> = 10..12;
    pub const SRC: Range<usize> = 12..16;
    pub const DST: Range<usize> = 16..20;
}

pub const MIN_HEADER_LEN: usize = 20;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// A view of an IPv4 packet whose header and total length were checked against the buffer.
#[derive(Debug)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// RFC 791 3.1 / RFC 1122 3.2.1: version 4, IHL >= 5, header within the buffer, and total
    /// length covering the header and not past the buffer (trailing Ethernet padding is fine).
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < MIN_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let ihl = (b[field::VER_IHL] & 0x0f) as usize * 4;
        if b[field::VER_IHL] >> 4 != 4 || ihl < MIN_HEADER_LEN {
            return Err(WireError::Malformed);
        }
        let total = u16::from_be_bytes([b[2], b[3]]) as usize;
        if ihl > b.len() || total < ihl || total > b.len() {
            return Err(WireError::Malformed);
        }
        Ok(Ipv4Packet { buffer })
    }

    pub fn header_len(&self) -> usize {
        (self.buffer.as_ref()[field::VER_IHL] & 0x0f) as usize * 4
    }

    pub fn total_len(&self) -> usize {
        let b = &self.buffer.as_ref()[field::LENGTH];
        u16::from_be_bytes([b[0], b[1]]) as usize
    }

    /// More-fragments set or a non-zero offset: part of a fragmented datagram.
    pub fn is_fragment(&self) -> bool {
        let b = &self.buffer.as_ref()[field::FLAGS_FRAG];
        u16::from_be_bytes([b[0], b[1]]) & 0x3fff != 0
    }

    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    pub fn src(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::SRC];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    pub fn dst(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::DST];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    /// The header checksum verifies (RFC 791 3.1: the sum over the header is all ones).
    pub fn header_checksum_ok(&self) -> bool {
        checksum::fold(checksum::accumulate(
            0,
            &self.buffer.as_ref()[..self.header_len()],
        )) == 0xffff
    }

    /// The payload: after the header, up to the total length.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..self.total_len()]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (start, end) = (self.header_len(), self.total_len());
        &mut self.buffer.as_mut()[start..end]
    }

    /// Swaps source and destination (the header checksum is unchanged: the sum is the same).
    pub fn swap_addresses(&mut self) {
        let b = self.buffer.as_mut();
        let mut src = [0u8; 4];
        src.copy_from_slice(&b[field::SRC]);
        b.copy_within(field::DST, field::SRC.start);
        b[field::DST].copy_from_slice(&src);
    }

    /// Sets the TTL and adjusts the header checksum incrementally (RFC 1624).
    pub fn set_ttl(&mut self, ttl: u8) {
        let b = self.buffer.as_mut();
        let old = u16::from_be_bytes([b[field::TTL], b[field::PROTOCOL]]);
        b[field::TTL] = ttl;
        let new = u16::from_be_bytes([b[field::TTL], b[field::PROTOCOL]]);
        let check = u16::from_be_bytes([b[10], b[11]]);
        b[field::CHECKSUM].copy_from_slice(&checksum::update16(check, old, new).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // An ICMP echo request 192.168.122.10 -> 192.168.122.1, 84 bytes, valid header checksum.
    fn echo_request() -> Vec<u8> {
        let mut p = vec![0u8; 84];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&84u16.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = PROTO_ICMP;
        p[12..16].copy_from_slice(&[192, 168, 122, 10]);
        p[16..20].copy_from_slice(&[192, 168, 122, 1]);
        let c = checksum::checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn parses_a_valid_header() {
        let p = echo_request();
        let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
        assert!(ip.header_checksum_ok());
        assert_eq!(
            (ip.src(), ip.dst()),
            (
                Ipv4Addr::new(192, 168, 122, 10),
                Ipv4Addr::new(192, 168, 122, 1)
            )
        );
        assert_eq!(ip.payload().len(), 64);
        assert!(!ip.is_fragment(), "DF alone is not a fragment");
    }

    // RFC 791 3.1: IHL counts 32-bit words and is at least 5; total length covers the header.
    #[test]
    fn rejects_lying_lengths() {
        let p = echo_request();
        for len in 0..20 {
            assert_eq!(
                Ipv4Packet::new_checked(&p[..len]).unwrap_err(),
                WireError::Truncated
            );
        }
        let mut bad = p.clone();
        bad[0] = 0x44; // IHL 4
        assert!(Ipv4Packet::new_checked(&bad[..]).is_err());
        let mut bad = p.clone();
        bad[0] = 0x4f; // IHL 15 = 60 bytes: fits in 84, but total length 84 is fine; shrink it
        bad[2..4].copy_from_slice(&40u16.to_be_bytes());
        assert!(Ipv4Packet::new_checked(&bad[..]).is_err());
        let mut bad = p.clone();
        bad[2..4].copy_from_slice(&85u16.to_be_bytes());
        assert!(Ipv4Packet::new_checked(&bad[..]).is_err());
        let mut bad = p.clone();
        bad[0] = 0x65;
        assert!(Ipv4Packet::new_checked(&bad[..]).is_err());
        // Trailing Ethernet padding beyond the total length is accepted.
        let mut padded = p.clone();
        padded.extend_from_slice(&[0; 6]);
        assert_eq!(
            Ipv4Packet::new_checked(&padded[..])
                .unwrap()
                .payload()
                .len(),
            64
        );
    }

    #[test]
    fn ttl_rewrite_keeps_the_checksum_valid() {
        let mut p = echo_request();
        let mut ip = Ipv4Packet::new_checked(&mut p[..]).unwrap();
        ip.set_ttl(1);
        ip.swap_addresses();
        assert!(ip.header_checksum_ok());
        assert_eq!(ip.ttl(), 1);
        assert_eq!(ip.src(), Ipv4Addr::new(192, 168, 122, 1));
    }

    #[test]
    fn fragments_are_recognised() {
        let mut p = echo_request();
        p[6] = 0x20; // MF
        assert!(Ipv4Packet::new_checked(&p[..]).unwrap().is_fragment());
        p[6] = 0x00;
        p[7] = 0x10; // offset 16 * 8
        assert!(Ipv4Packet::new_checked(&p[..]).unwrap().is_fragment());
    }
}
