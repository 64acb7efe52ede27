//! Software fallbacks for offloads, used only when an egress port cannot take a frame as is.
//!
//! Taps opened with `TUNSETOFFLOAD` accept partial checksums, TSO and USO frames, so between
//! taps a 64 KB TCP segment or a train of UDP datagrams crosses the switch untouched. A port
//! without those offloads (a stream socket to a VM without vnet headers, a NIC that lacks them)
//! gets the checksum completed here, or the super-frame cut into MSS-sized segments (or
//! `gso_size` datagrams), as the kernel's `skb_checksum_help` and GSO do.

use super::WireError;
use super::checksum::{accumulate, fold, pseudo_header_v4, pseudo_header_v6};
use super::ethernet::{EtherType, EthernetFrame};
use super::vnet::{VnetHdr, gso};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Completes a partial checksum (virtio 1.2 5.1.6.2, `VIRTIO_NET_HDR_F_NEEDS_CSUM`): the sum of
/// everything from `csum_start` to the end, stored complemented at `csum_start + csum_offset`.
///
/// A result of zero is stored as 0xffff, which is the same value in one's-complement and is
/// what a UDP receiver requires (RFC 768: zero means "no checksum").
pub fn complete_checksum(hdr: &VnetHdr, frame: &mut [u8]) -> Result<(), WireError> {
    let start = hdr.csum_start as usize;
    let at = start + hdr.csum_offset as usize;
    if at + 2 > frame.len() {
        return Err(WireError::Malformed);
    }
    let mut check = !fold(accumulate(0, &frame[start..]));
    if check == 0 {
        check = 0xffff;
    }
    frame[at..at + 2].copy_from_slice(&check.to_be_bytes());
    Ok(())
}

/// Cuts a TSO (TCPv4/TCPv6) or USO (`UDP_L4`) super-frame into wire-sized frames.
///
/// Each call to [`Segmenter::next_into`] writes one complete frame, headers fixed up and
/// checksums computed, into a caller-provided buffer: no allocation per segment.
#[derive(Debug)]
pub struct Segmenter<'a> {
    frame: &'a [u8],
    l3: usize,
    l4: usize,
    payload_start: usize,
    mss: usize,
    offset: usize,
    index: u16,
    ipv6: bool,
    udp: bool,
    done: bool,
}

impl<'a> Segmenter<'a> {
    pub fn new(hdr: &VnetHdr, frame: &'a [u8]) -> Result<Segmenter<'a>, WireError> {
        let eth = EthernetFrame::new_checked(frame)?;
        let l3 = eth.header_len();
        let (l4, ipv6, protocol) = match eth.ethertype() {
            EtherType::IPV4 => {
                let ihl = (*frame.get(l3).ok_or(WireError::Truncated)? & 0x0f) as usize * 4;
                if ihl < 20 || frame.len() < l3 + ihl {
                    return Err(WireError::Malformed);
                }
                (l3 + ihl, false, frame[l3 + 9])
            }
            EtherType::IPV6 => {
                if frame.len() < l3 + 40 {
                    return Err(WireError::Truncated);
                }
                (l3 + 40, true, frame[l3 + 6])
            }
            _ => return Err(WireError::Unsupported),
        };
        let udp = match (hdr.gso_type & !gso::ECN, protocol) {
            (gso::TCPV4, IPPROTO_TCP) if !ipv6 => false,
            (gso::TCPV6, IPPROTO_TCP) if ipv6 => false,
            (gso::UDP_L4, IPPROTO_UDP) => true,
            _ => return Err(WireError::Unsupported),
        };
        let l4_len = if udp {
            8
        } else {
            let doff = (*frame.get(l4 + 12).ok_or(WireError::Truncated)? >> 4) as usize * 4;
            if doff < 20 {
                return Err(WireError::Malformed);
            }
            doff
        };
        let payload_start = l4 + l4_len;
        if frame.len() < payload_start || hdr.gso_size == 0 {
            return Err(WireError::Malformed);
        }
        Ok(Segmenter {
            frame,
            l3,
            l4,
            payload_start,
            mss: hdr.gso_size as usize,
            offset: 0,
            index: 0,
            ipv6,
            udp,
            done: false,
        })
    }

    /// Length of the largest frame [`Segmenter::next_into`] writes.
    pub fn max_segment_len(&self) -> usize {
        self.payload_start + self.mss
    }

    /// Writes the next segment into `out` and returns its length, or `None` when done.
    /// `out` must hold [`Segmenter::max_segment_len`] bytes.
    pub fn next_into(&mut self, out: &mut [u8]) -> Option<usize> {
        if self.done {
            return None;
        }
        let payload = &self.frame[self.payload_start..];
        let chunk_len = self.mss.min(payload.len() - self.offset);
        let first = self.index == 0;
        let last = self.offset + chunk_len >= payload.len();
        let hdrs = self.payload_start;
        let len = hdrs + chunk_len;
        out[..hdrs].copy_from_slice(&self.frame[..hdrs]);
        out[hdrs..len].copy_from_slice(&payload[self.offset..self.offset + chunk_len]);

        let l3 = self.l3;
        let l4 = self.l4;
        let l4_total = (len - l4) as u16;
        if self.ipv6 {
            out[l3 + 4..l3 + 6].copy_from_slice(&l4_total.to_be_bytes());
        } else {
            let total = (len - l3) as u16;
            out[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
            let id = u16::from_be_bytes([out[l3 + 4], out[l3 + 5]]).wrapping_add(self.index);
            out[l3 + 4..l3 + 6].copy_from_slice(&id.to_be_bytes());
            out[l3 + 10..l3 + 12].fill(0);
            let check = !fold(accumulate(0, &out[l3..l4]));
            out[l3 + 10..l3 + 12].copy_from_slice(&check.to_be_bytes());
        }

        let check_at = if self.udp {
            out[l4 + 4..l4 + 6].copy_from_slice(&l4_total.to_be_bytes());
            l4 + 6
        } else {
            let seq = u32::from_be_bytes([out[l4 + 4], out[l4 + 5], out[l4 + 6], out[l4 + 7]])
                .wrapping_add(self.offset as u32);
            out[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
            if !last {
                out[l4 + 13] &= !(TCP_FIN | TCP_PSH);
            }
            if !first {
                out[l4 + 13] &= !TCP_CWR;
            }
            l4 + 16
        };
        out[check_at..check_at + 2].fill(0);
        let protocol = if self.udp { IPPROTO_UDP } else { IPPROTO_TCP };
        let pseudo = if self.ipv6 {
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&out[l3 + 8..l3 + 24]);
            dst.copy_from_slice(&out[l3 + 24..l3 + 40]);
            pseudo_header_v6(src, dst, protocol, l4_total as u32)
        } else {
            let mut src = [0u8; 4];
            let mut dst = [0u8; 4];
            src.copy_from_slice(&out[l3 + 12..l3 + 16]);
            dst.copy_from_slice(&out[l3 + 16..l3 + 20]);
            pseudo_header_v4(src, dst, protocol, l4_total)
        };
        let mut check = !fold(accumulate(pseudo, &out[l4..len]));
        if check == 0 && self.udp {
            check = 0xffff;
        }
        out[check_at..check_at + 2].copy_from_slice(&check.to_be_bytes());

        self.offset += chunk_len;
        self.index = self.index.wrapping_add(1);
        self.done = last;
        Some(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::checksum::checksum;
    use crate::wire::vnet::F_NEEDS_CSUM;

    /// Builds an Ethernet + IPv4 + TCP frame with `payload_len` bytes and, like the kernel does
    /// for CHECKSUM_PARTIAL, the pseudo-header sum in the TCP checksum field.
    fn tcp4_frame(payload_len: usize, flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + payload_len];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((40 + payload_len) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x1000u16.to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = IPPROTO_TCP;
        ip[12..16].copy_from_slice(&[192, 168, 122, 10]);
        ip[16..20].copy_from_slice(&[192, 168, 122, 11]);
        let tcp = &mut f[34..54];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let pseudo = pseudo_header_v4(
            [192, 168, 122, 10],
            [192, 168, 122, 11],
            IPPROTO_TCP,
            (20 + payload_len) as u16,
        );
        f[50..52].copy_from_slice(&fold(pseudo).to_be_bytes());
        f
    }

    fn tcp_checksum_ok(seg: &[u8]) -> bool {
        let l4_len = (seg.len() - 34) as u16;
        let pseudo = pseudo_header_v4(
            seg[26..30].try_into().unwrap(),
            seg[30..34].try_into().unwrap(),
            IPPROTO_TCP,
            l4_len,
        );
        fold(accumulate(pseudo, &seg[34..])) == 0xffff
    }

    // virtio 1.2 5.1.6.2: the device completes the checksum from csum_start at csum_offset.
    #[test]
    fn completes_a_partial_tcp_checksum() {
        let mut f = tcp4_frame(100, 0x18);
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        complete_checksum(&hdr, &mut f).unwrap();
        assert!(tcp_checksum_ok(&f));
    }

    #[test]
    fn partial_checksum_offset_out_of_frame_is_malformed() {
        let mut f = tcp4_frame(0, 0x10);
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 50,
            csum_offset: 16,
            ..Default::default()
        };
        assert_eq!(complete_checksum(&hdr, &mut f), Err(WireError::Malformed));
    }

    // RFC 9293 3.1 / RFC 791 3.1: every segment is a valid datagram on its own: lengths,
    // sequence numbers, IP id, flags and both checksums follow from its position.
    #[test]
    fn segments_a_tso_frame() {
        let payload = 4000;
        let frame = tcp4_frame(payload, TCP_PSH | TCP_FIN | TCP_CWR | 0x10);
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: gso::TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut seg = Segmenter::new(&hdr, &frame).unwrap();
        let mut out = vec![0u8; seg.max_segment_len()];
        let mut sizes = vec![];
        let mut reassembled = vec![];
        while let Some(len) = seg.next_into(&mut out) {
            let s = &out[..len];
            let i = sizes.len();
            sizes.push(len - 54);
            assert_eq!(
                checksum(&s[14..34]),
                0,
                "IPv4 header checksum of segment {i}"
            );
            assert!(tcp_checksum_ok(s), "TCP checksum of segment {i}");
            assert_eq!(u16::from_be_bytes([s[16], s[17]]) as usize, len - 14);
            assert_eq!(u16::from_be_bytes([s[18], s[19]]), 0x1000 + i as u16);
            let seq = u32::from_be_bytes(s[38..42].try_into().unwrap());
            assert_eq!(seq, 0xffff_fff0u32.wrapping_add((i * 1448) as u32));
            let flags = s[47];
            assert_eq!(flags & TCP_CWR != 0, i == 0);
            assert_eq!(flags & (TCP_FIN | TCP_PSH) != 0, i == 2);
            reassembled.extend_from_slice(&s[54..]);
        }
        assert_eq!(sizes, vec![1448, 1448, 1104]);
        assert_eq!(reassembled, frame[54..]);
    }

    /// An Ethernet + IPv4 (or IPv6) + UDP frame with `payload_len` bytes and, as a Linux
    /// `UDP_SEGMENT` send leaves it, the pseudo-header sum over the whole UDP length in the
    /// checksum field.
    fn udp_frame(ipv6: bool, payload_len: usize) -> Vec<u8> {
        let l3 = 14;
        let l4 = if ipv6 { l3 + 40 } else { l3 + 20 };
        let udp_len = 8 + payload_len;
        let mut f = vec![0u8; l4 + udp_len];
        f[12..14].copy_from_slice(if ipv6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
        let pseudo = if ipv6 {
            let (src, dst) = ([0xfd; 16], [0xfe; 16]);
            f[l3] = 0x60;
            f[l3 + 4..l3 + 6].copy_from_slice(&(udp_len as u16).to_be_bytes());
            f[l3 + 6] = IPPROTO_UDP;
            f[l3 + 7] = 64;
            f[l3 + 8..l3 + 24].copy_from_slice(&src);
            f[l3 + 24..l3 + 40].copy_from_slice(&dst);
            pseudo_header_v6(src, dst, IPPROTO_UDP, udp_len as u32)
        } else {
            let (src, dst) = ([192, 168, 122, 10], [192, 168, 122, 11]);
            f[l3] = 0x45;
            f[l3 + 2..l3 + 4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
            f[l3 + 4..l3 + 6].copy_from_slice(&0xfffeu16.to_be_bytes());
            f[l3 + 8] = 64;
            f[l3 + 9] = IPPROTO_UDP;
            f[l3 + 12..l3 + 16].copy_from_slice(&src);
            f[l3 + 16..l3 + 20].copy_from_slice(&dst);
            pseudo_header_v4(src, dst, IPPROTO_UDP, udp_len as u16)
        };
        f[l4..l4 + 2].copy_from_slice(&40000u16.to_be_bytes());
        f[l4 + 2..l4 + 4].copy_from_slice(&4433u16.to_be_bytes());
        f[l4 + 4..l4 + 6].copy_from_slice(&(udp_len as u16).to_be_bytes());
        f[l4 + 6..l4 + 8].copy_from_slice(&fold(pseudo).to_be_bytes());
        for (i, b) in f[l4 + 8..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        f
    }

    // RFC 768: each datagram cut from a USO super-frame stands alone: its UDP length and
    // checksum (over its own pseudo-header, never zero) are its own; RFC 791 3.1 / RFC 8200
    // 3: so are the IPv4 total length, header checksum and identification (one per datagram,
    // as the kernel's GSO numbers them), or the IPv6 payload length.
    #[test]
    fn segments_a_uso_frame_over_ipv4_and_ipv6() {
        for ipv6 in [false, true] {
            let frame = udp_frame(ipv6, 2500);
            let (l3, l4) = (14, if ipv6 { 54 } else { 34 });
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: gso::UDP_L4,
                hdr_len: (l4 + 8) as u16,
                gso_size: 1200,
                csum_start: l4 as u16,
                csum_offset: 6,
            };
            let mut seg = Segmenter::new(&hdr, &frame).unwrap();
            let mut out = vec![0u8; seg.max_segment_len()];
            let (mut sizes, mut reassembled) = (vec![], vec![]);
            while let Some(len) = seg.next_into(&mut out) {
                let s = &out[..len];
                let i = sizes.len();
                let udp_len = len - l4;
                sizes.push(udp_len - 8);
                assert_eq!(u16::from_be_bytes([s[l4 + 4], s[l4 + 5]]) as usize, udp_len);
                assert_eq!(&s[l4..l4 + 4], &frame[l4..l4 + 4], "ports of datagram {i}");
                let pseudo = if ipv6 {
                    assert_eq!(u16::from_be_bytes([s[l3 + 4], s[l3 + 5]]) as usize, udp_len);
                    pseudo_header_v6([0xfd; 16], [0xfe; 16], IPPROTO_UDP, udp_len as u32)
                } else {
                    assert_eq!(checksum(&s[l3..l4]), 0, "IPv4 header checksum of {i}");
                    assert_eq!(
                        u16::from_be_bytes([s[l3 + 2], s[l3 + 3]]) as usize,
                        len - l3
                    );
                    let id = u16::from_be_bytes([s[l3 + 4], s[l3 + 5]]);
                    assert_eq!(id, 0xfffeu16.wrapping_add(i as u16));
                    let (src, dst) = ([192, 168, 122, 10], [192, 168, 122, 11]);
                    pseudo_header_v4(src, dst, IPPROTO_UDP, udp_len as u16)
                };
                assert_ne!(&s[l4 + 6..l4 + 8], &[0, 0], "RFC 768: zero is no checksum");
                assert_eq!(
                    fold(accumulate(pseudo, &s[l4..])),
                    0xffff,
                    "UDP checksum of {i}"
                );
                reassembled.extend_from_slice(&s[l4 + 8..]);
            }
            assert_eq!(sizes, [1200, 1200, 100], "ipv6: {ipv6}");
            assert_eq!(reassembled, frame[l4 + 8..]);
        }
        // The GSO type must name the packet's protocol: UDP_L4 on TCP is refused.
        let tcp = tcp4_frame(3000, 0x10);
        let uso = VnetHdr {
            gso_type: gso::UDP_L4,
            gso_size: 1200,
            ..Default::default()
        };
        assert_eq!(
            Segmenter::new(&uso, &tcp).unwrap_err(),
            WireError::Unsupported
        );
    }

    #[test]
    fn refuses_gso_type_that_does_not_match_the_packet() {
        let frame = tcp4_frame(3000, 0x10);
        let hdr = VnetHdr {
            gso_type: gso::TCPV6,
            gso_size: 1448,
            ..Default::default()
        };
        assert_eq!(
            Segmenter::new(&hdr, &frame).unwrap_err(),
            WireError::Unsupported
        );
        let zero_mss = VnetHdr {
            gso_type: gso::TCPV4,
            ..Default::default()
        };
        assert_eq!(
            Segmenter::new(&zero_mss, &frame).unwrap_err(),
            WireError::Malformed
        );
    }

    #[test]
    fn truncated_headers_never_panic() {
        let cases = [
            (tcp4_frame(3000, 0x10), gso::TCPV4),
            (udp_frame(false, 3000), gso::UDP_L4),
            (udp_frame(true, 3000), gso::UDP_L4),
        ];
        for (frame, gso_type) in cases {
            let hdr = VnetHdr {
                gso_type,
                gso_size: 1448,
                ..Default::default()
            };
            for len in 0..80 {
                if let Ok(mut seg) = Segmenter::new(&hdr, &frame[..len]) {
                    let mut out = vec![0u8; seg.max_segment_len()];
                    while seg.next_into(&mut out).is_some() {}
                }
            }
        }
    }
}
