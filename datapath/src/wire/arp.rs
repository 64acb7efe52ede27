//! ARP for IPv4 over Ethernet (RFC 826), the only kind the gateway answers.

use super::{MacAddr, WireError};
use std::net::Ipv4Addr;

mod field {
    use std::ops::Range;
    pub const HTYPE: Range<usize> = 0..2;
    pub const PTYPE: Range<usize> = 2..4;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: Range<usize> = 6..8;
    pub const SHA: Range<usize> = 8..14;
    pub const SPA: Range<usize> = 14..18;
    pub const THA: Range<usize> = 18..24;
    pub const TPA: Range<usize> = 24..28;
}

/// Length of an Ethernet/IPv4 ARP packet.
pub const LEN: usize = 28;
pub const OP_REQUEST: u16 = 1;
pub const OP_REPLY: u16 = 2;

/// A view of an Ethernet/IPv4 ARP packet.
#[derive(Debug)]
pub struct ArpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

fn ipv4_at(b: &[u8], r: std::ops::Range<usize>) -> Ipv4Addr {
    Ipv4Addr::new(b[r.start], b[r.start + 1], b[r.start + 2], b[r.start + 3])
}

impl<T: AsRef<[u8]>> ArpPacket<T> {
    /// Checks length and that hardware/protocol types are Ethernet/IPv4 (RFC 826 "Packet
    /// Reception": other types are not ours to answer).
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < LEN {
            return Err(WireError::Truncated);
        }
        if b[field::HTYPE] != [0, 1]
            || b[field::PTYPE] != [0x08, 0x00]
            || b[field::HLEN] != 6
            || b[field::PLEN] != 4
        {
            return Err(WireError::Unsupported);
        }
        Ok(ArpPacket { buffer })
    }

    pub fn operation(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::OPER];
        u16::from_be_bytes([b[0], b[1]])
    }

    pub fn sender_mac(&self) -> MacAddr {
        MacAddr::from_slice(&self.buffer.as_ref()[field::SHA])
    }

    pub fn sender_ip(&self) -> Ipv4Addr {
        ipv4_at(self.buffer.as_ref(), field::SPA)
    }

    pub fn target_ip(&self) -> Ipv4Addr {
        ipv4_at(self.buffer.as_ref(), field::TPA)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> ArpPacket<T> {
    /// Turns a request into the reply from `mac`/`ip` to its sender, in place
    /// (RFC 826: swap sender and target, fill in our hardware address, opcode reply).
    pub fn make_reply(&mut self, mac: MacAddr, ip: Ipv4Addr) {
        let b = self.buffer.as_mut();
        let mut requester = [0u8; 10];
        requester.copy_from_slice(&b[field::SHA.start..field::SPA.end]);
        b[field::THA.start..field::TPA.end].copy_from_slice(&requester);
        b[field::SHA].copy_from_slice(&mac.0);
        b[field::SPA].copy_from_slice(&ip.octets());
        b[field::OPER].copy_from_slice(&OP_REPLY.to_be_bytes());
    }
}

/// An Ethernet frame carrying the broadcast ARP request "who has `target`, tell `ip`"
/// (RFC 826 "Packet Generation").
pub fn request_frame(mac: MacAddr, ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + LEN);
    f.extend_from_slice(&MacAddr::BROADCAST.0);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&[0x08, 0x06, 0x00, 0x01, 0x08, 0x00, 6, 4]);
    f.extend_from_slice(&OP_REQUEST.to_be_bytes());
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// An RFC 5227 2.1.1 ARP probe for `target` from `mac`: a broadcast request whose sender IP
/// is 0.0.0.0 and target hardware address zero. A host that has `target` answers it (RFC 5227
/// 2.4, and Linux even when the probe's sender is not routable back), and no host adds or
/// updates an ARP cache entry from it.
pub fn probe_frame(mac: MacAddr, target: Ipv4Addr) -> Vec<u8> {
    request_frame(mac, Ipv4Addr::UNSPECIFIED, target)
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 826: who-has 192.168.122.1 tell 192.168.122.10.
    pub const REQUEST: [u8; 28] = [
        0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 192, 168, 122,
        10, 0, 0, 0, 0, 0, 0, 192, 168, 122, 1,
    ];

    #[test]
    fn parses_and_answers_a_request_in_place() {
        let mut buf = REQUEST;
        let mut arp = ArpPacket::new_checked(&mut buf[..]).unwrap();
        assert_eq!(arp.operation(), OP_REQUEST);
        assert_eq!(arp.target_ip(), Ipv4Addr::new(192, 168, 122, 1));
        let gw = MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        arp.make_reply(gw, Ipv4Addr::new(192, 168, 122, 1));
        assert_eq!(arp.operation(), OP_REPLY);
        assert_eq!(arp.sender_mac(), gw);
        assert_eq!(arp.sender_ip(), Ipv4Addr::new(192, 168, 122, 1));
        assert_eq!(&buf[18..24], &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(&buf[24..28], &[192, 168, 122, 10]);
    }

    #[test]
    fn builds_a_broadcast_request() {
        let mac = MacAddr([0x52, 0x54, 0, 1, 2, 3]);
        let f = request_frame(
            mac,
            Ipv4Addr::new(203, 0, 113, 2),
            Ipv4Addr::new(203, 0, 113, 1),
        );
        let arp = ArpPacket::new_checked(&f[14..]).unwrap();
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(arp.operation(), OP_REQUEST);
        assert_eq!(arp.sender_mac(), mac);
        assert_eq!(arp.target_ip(), Ipv4Addr::new(203, 0, 113, 1));
    }

    #[test]
    fn rejects_short_and_foreign_packets() {
        for len in 0..LEN {
            assert_eq!(
                ArpPacket::new_checked(&REQUEST[..len]).unwrap_err(),
                WireError::Truncated
            );
        }
        let mut ipv6ish = REQUEST;
        ipv6ish[5] = 16;
        assert_eq!(
            ArpPacket::new_checked(&ipv6ish[..]).unwrap_err(),
            WireError::Unsupported
        );
    }
}
