//! Ethernet II with an optional 802.1Q tag (IEEE 802.3 clause 3, IEEE 802.1Q clause 9).
//!
//! The switch only needs destination, source and VLAN id; it never rewrites the header, so
//! a borrowed view is enough.

use super::WireError;
use std::fmt;

/// A 48-bit IEEE 802 MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// The I/G bit: group (multicast or broadcast) addresses (IEEE 802 clause 8.2).
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    pub fn is_zero(&self) -> bool {
        *self == Self::ZERO
    }

    /// A source address a station may legitimately use: unicast and not all zeros.
    pub fn is_valid_source(&self) -> bool {
        !self.is_multicast() && !self.is_zero()
    }

    pub fn from_slice(bytes: &[u8]) -> MacAddr {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&bytes[..6]);
        MacAddr(mac)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for MacAddr {
    type Err = WireError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mac = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in mac.iter_mut() {
            let part = parts.next().ok_or(WireError::Malformed)?;
            if part.is_empty() || part.len() > 2 {
                return Err(WireError::Malformed);
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| WireError::Malformed)?;
        }
        if parts.next().is_some() {
            return Err(WireError::Malformed);
        }
        Ok(MacAddr(mac))
    }
}

/// EtherType values the engine recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EtherType(pub u16);

impl EtherType {
    pub const IPV4: EtherType = EtherType(0x0800);
    pub const ARP: EtherType = EtherType(0x0806);
    pub const VLAN: EtherType = EtherType(0x8100);
    pub const IPV6: EtherType = EtherType(0x86dd);
}

mod field {
    use std::ops::Range;
    pub const DST: Range<usize> = 0..6;
    pub const SRC: Range<usize> = 6..12;
    pub const TYPE: Range<usize> = 12..14;
    pub const VLAN_TCI: Range<usize> = 14..16;
    pub const VLAN_TYPE: Range<usize> = 16..18;
}

/// Length of an untagged Ethernet II header.
pub const HEADER_LEN: usize = 14;
/// Length of the 802.1Q tag that may follow the source address.
pub const VLAN_TAG_LEN: usize = 4;

/// Writes an untagged IPv4 Ethernet header into the first [`HEADER_LEN`] bytes of `frame`
/// (which the caller made at least that long).
pub fn write_header(frame: &mut [u8], dst: MacAddr, src: MacAddr) {
    frame[field::DST].copy_from_slice(&dst.0);
    frame[field::SRC].copy_from_slice(&src.0);
    frame[field::TYPE].copy_from_slice(&EtherType::IPV4.0.to_be_bytes());
}

/// A read view of an Ethernet frame (without FCS, as taps and AF_PACKET deliver it).
#[derive(Debug, Clone, Copy)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// Wraps `buffer` after checking the untagged header, and the tag when one is announced.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let len = buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let frame = EthernetFrame { buffer };
        if frame.outer_ethertype() == EtherType::VLAN && len < HEADER_LEN + VLAN_TAG_LEN {
            return Err(WireError::Truncated);
        }
        Ok(frame)
    }

    pub fn dst(&self) -> MacAddr {
        MacAddr::from_slice(&self.buffer.as_ref()[field::DST])
    }

    pub fn src(&self) -> MacAddr {
        MacAddr::from_slice(&self.buffer.as_ref()[field::SRC])
    }

    fn outer_ethertype(&self) -> EtherType {
        let b = &self.buffer.as_ref()[field::TYPE];
        EtherType(u16::from_be_bytes([b[0], b[1]]))
    }

    /// The 12-bit VLAN id of an 802.1Q-tagged frame; 0 when untagged (IEEE 802.1Q 9.6: VID 0
    /// means priority-tagged, i.e. no VLAN).
    pub fn vlan_id(&self) -> u16 {
        if self.outer_ethertype() == EtherType::VLAN {
            let b = &self.buffer.as_ref()[field::VLAN_TCI];
            u16::from_be_bytes([b[0], b[1]]) & 0x0fff
        } else {
            0
        }
    }

    /// The EtherType of the payload, past any 802.1Q tag.
    pub fn ethertype(&self) -> EtherType {
        if self.outer_ethertype() == EtherType::VLAN {
            let b = &self.buffer.as_ref()[field::VLAN_TYPE];
            EtherType(u16::from_be_bytes([b[0], b[1]]))
        } else {
            self.outer_ethertype()
        }
    }

    /// Offset of the payload (the L3 header).
    pub fn header_len(&self) -> usize {
        if self.outer_ethertype() == EtherType::VLAN {
            HEADER_LEN + VLAN_TAG_LEN
        } else {
            HEADER_LEN
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // An ARP request as a tap delivers it: 42 bytes, no padding, no FCS.
    const ARP_REQUEST: [u8; 42] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x08, 0x06, //
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, //
        192, 168, 122, 10, 0, 0, 0, 0, 0, 0, 192, 168, 122, 1,
    ];

    #[test]
    fn parses_untagged_header() {
        let f = EthernetFrame::new_checked(&ARP_REQUEST[..]).unwrap();
        assert!(f.dst().is_broadcast());
        assert_eq!(f.src(), "52:54:00:12:34:56".parse().unwrap());
        assert_eq!(f.ethertype(), EtherType::ARP);
        assert_eq!(f.vlan_id(), 0);
        assert_eq!(f.header_len(), 14);
    }

    #[test]
    fn parses_802_1q_tag() {
        // IEEE 802.1Q 9.6: TPID 0x8100, then PCP/DEI/VID; VID 100 here.
        let mut tagged = [0u8; 46];
        tagged[..12].copy_from_slice(&ARP_REQUEST[..12]);
        tagged[12..16].copy_from_slice(&[0x81, 0x00, 0xa0, 0x64]);
        tagged[16..].copy_from_slice(&ARP_REQUEST[12..]);
        let f = EthernetFrame::new_checked(&tagged[..]).unwrap();
        assert_eq!(f.vlan_id(), 100);
        assert_eq!(f.ethertype(), EtherType::ARP);
        assert_eq!(f.header_len(), 18);
    }

    #[test]
    fn rejects_truncation_at_every_boundary() {
        for len in 0..HEADER_LEN {
            assert_eq!(
                EthernetFrame::new_checked(&ARP_REQUEST[..len]).unwrap_err(),
                WireError::Truncated
            );
        }
        let tag_only = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1, 0x81, 0x00, 0,
        ];
        assert!(EthernetFrame::new_checked(&tag_only[..]).is_err());
    }

    #[test]
    fn source_validity_follows_the_ig_bit() {
        assert!(!MacAddr::BROADCAST.is_valid_source());
        assert!(!MacAddr::ZERO.is_valid_source());
        assert!(
            !"01:00:5e:00:00:01"
                .parse::<MacAddr>()
                .unwrap()
                .is_valid_source()
        );
        assert!(
            "52:54:00:00:00:01"
                .parse::<MacAddr>()
                .unwrap()
                .is_valid_source()
        );
    }

    #[test]
    fn mac_parse_rejects_garbage() {
        for bad in [
            "",
            "52:54:00:00:00",
            "52:54:00:00:00:01:02",
            "zz:54:00:00:00:01",
            "525:4:0:0:0:1",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert_eq!(
            "52:54:00:ab:CD:ef".parse::<MacAddr>().unwrap().to_string(),
            "52:54:00:ab:cd:ef"
        );
    }
}
