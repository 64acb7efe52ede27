//! The virtio-net header that taps (`IFF_VNET_HDR`) and AF_PACKET (`PACKET_VNET_HDR`) put in
//! front of each frame (virtio 1.2, 5.1.6 "Device Operation", `struct virtio_net_hdr`).
//!
//! It carries the offload state of the frame: a partial checksum still to be completed and,
//! for a TSO/GSO frame, the segment size. Keeping it attached to the frame is what lets a 64 KB
//! TCP segment cross the switch as one frame.

use super::WireError;

/// Size of the header switchyard configures on its taps (`TUNSETVNETHDRSZ`): the 12-byte
/// `virtio_net_hdr_mrg_rxbuf`, the layout QEMU and vhost use, with `num_buffers` unused.
pub const LEN: usize = 12;

/// `flags`: the checksum from `csum_start` to the end is still to be computed and stored at
/// `csum_start + csum_offset`; the field holds the pseudo-header sum.
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was already verified.
pub const F_DATA_VALID: u8 = 2;

/// `gso_type` values (virtio 1.2, 5.1.6).
pub mod gso {
    pub const NONE: u8 = 0;
    pub const TCPV4: u8 = 1;
    pub const UDP: u8 = 3;
    pub const TCPV6: u8 = 4;
    pub const UDP_L4: u8 = 5;
    pub const ECN: u8 = 0x80;
}

/// A decoded virtio-net header (little-endian on the wire, as modern virtio and taps in their
/// default mode on little-endian hosts use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Parses the first [`LEN`] bytes of `buf`.
    pub fn parse(buf: &[u8]) -> Result<VnetHdr, WireError> {
        if buf.len() < LEN {
            return Err(WireError::Truncated);
        }
        let le = |i: usize| u16::from_le_bytes([buf[i], buf[i + 1]]);
        Ok(VnetHdr {
            flags: buf[0],
            gso_type: buf[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    /// Writes the header into the first [`LEN`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) {
        buf[0] = self.flags;
        buf[1] = self.gso_type;
        buf[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        buf[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        buf[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        buf[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        buf[10..12].copy_from_slice(&0u16.to_le_bytes());
    }

    /// The frame is a GSO super-frame that must be segmented before it reaches a wire.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !gso::ECN != gso::NONE
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0
    }

    /// The largest IPv4 packet `ip` (this header's frame) becomes on the wire: itself, or
    /// for a GSO frame one of its segments (IP and TCP or UDP headers, and `gso_size` bytes
    /// of payload).
    pub fn largest_packet(&self, ip: &[u8]) -> usize {
        if !self.is_gso() {
            return ip.len();
        }
        let l3 = usize::from(ip[0] & 0x0f) * 4;
        let l4 = match ip[9] {
            6 => ip
                .get(l3 + 12)
                .map_or(20, |offset| usize::from(offset >> 4) * 4),
            17 => 8,
            _ => return ip.len(),
        };
        ip.len().min(l3 + l4 + usize::from(self.gso_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_tso_header() {
        // virtio 1.2 5.1.6.2: a TCPv4 GSO frame, checksum partial from the TCP header on.
        let bytes = [
            0x01, 0x01, 0x42, 0x00, 0xb4, 0x05, 0x22, 0x00, 0x10, 0x00, 0, 0,
        ];
        let hdr = VnetHdr::parse(&bytes).unwrap();
        assert_eq!(
            hdr,
            VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: gso::TCPV4,
                hdr_len: 66,
                gso_size: 1460,
                csum_start: 34,
                csum_offset: 16
            }
        );
        assert!(hdr.is_gso() && hdr.needs_csum());
        let mut out = [0xffu8; LEN];
        hdr.emit(&mut out);
        assert_eq!(out, bytes);
    }

    #[test]
    fn ecn_bit_alone_is_not_gso() {
        let hdr = VnetHdr {
            gso_type: gso::ECN,
            ..Default::default()
        };
        assert!(!hdr.is_gso());
    }

    #[test]
    fn short_header_is_truncated() {
        assert_eq!(VnetHdr::parse(&[0; 11]), Err(WireError::Truncated));
    }
}
