//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! NAT rewrites addresses and ports in place; recomputing a checksum over a 64 KB TSO frame
//! for a 4-byte change would dominate the cost, so rewrites adjust the checksum by the
//! difference instead (RFC 1624 eqn. 3).

/// Adds `data` to a running one's-complement sum (RFC 1071 4.1), as big-endian 16-bit words.
/// An odd trailing byte is padded with zero.
pub fn accumulate(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    let mut wide: u64 = sum as u64;
    for pair in &mut chunks {
        wide += u16::from_be_bytes([pair[0], pair[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        wide += (*last as u64) << 8;
    }
    while wide > 0xffff_ffff {
        wide = (wide & 0xffff_ffff) + (wide >> 32);
    }
    sum = wide as u32;
    sum
}

/// Folds a 32-bit running sum to 16 bits with end-around carry.
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum of `data`: the complement of its folded one's-complement sum.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(accumulate(0, data))
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word changed from `old` to `new`,
/// `HC' = ~(~HC + ~m + m')`.
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32) + (new as u32);
    !fold(sum)
}

/// [`update16`] for a 32-bit field (an IPv4 address), as two 16-bit words.
pub fn update32(check: u16, old: u32, new: u32) -> u16 {
    let sum = (!check as u32)
        + (!(old >> 16) as u16 as u32)
        + (!(old as u16) as u32)
        + (new >> 16)
        + (new & 0xffff);
    !fold(sum)
}

/// The IPv4 pseudo-header sum for TCP/UDP (RFC 793 3.1, RFC 768).
pub fn pseudo_header_v4(src: [u8; 4], dst: [u8; 4], protocol: u8, length: u16) -> u32 {
    let mut sum = accumulate(0, &src);
    sum = accumulate(sum, &dst);
    sum + protocol as u32 + length as u32
}

/// The IPv6 pseudo-header sum for upper layers (RFC 8200 8.1).
pub fn pseudo_header_v6(src: [u8; 16], dst: [u8; 16], next_header: u8, length: u32) -> u32 {
    let mut sum = accumulate(0, &src);
    sum = accumulate(sum, &dst);
    sum = accumulate(sum, &length.to_be_bytes());
    sum + next_header as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 1071 3: the worked example, bytes 00 01 f2 03 f4 f5 f6 f7 sum to ddf2.
    #[test]
    fn rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(accumulate(0, &data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    // A real IPv4 header (checksum field zeroed) whose checksum is 0xb861.
    const IPV4_HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    #[test]
    fn ipv4_header_checksum() {
        assert_eq!(checksum(&IPV4_HDR), 0xb861);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(fold(accumulate(0, &[0x12, 0x34, 0x56])), 0x1234 + 0x5600);
    }

    // RFC 1624 3: updating incrementally must equal recomputing from scratch.
    #[test]
    fn rfc1624_incremental_matches_full_recompute() {
        let mut hdr = IPV4_HDR;
        let check = checksum(&hdr);
        // Rewrite the source address (NAT), 192.168.0.1 -> 203.0.113.2.
        let old = u32::from_be_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
        let new = u32::from_be_bytes([203, 0, 113, 2]);
        hdr[12..16].copy_from_slice(&new.to_be_bytes());
        assert_eq!(update32(check, old, new), checksum(&hdr));
        // And a 16-bit field (TTL/protocol word).
        let old16 = u16::from_be_bytes([hdr[8], hdr[9]]);
        hdr[8] -= 1;
        let new16 = u16::from_be_bytes([hdr[8], hdr[9]]);
        assert_eq!(
            update16(update32(check, old, new), old16, new16),
            checksum(&hdr)
        );
    }

    // RFC 1624 4: the example eqn. 2 gets wrong (0xFFFF); eqn. 3 gives the recomputed 0x0000.
    #[test]
    fn rfc1624_section4_example() {
        assert_eq!(update16(0xdd2f, 0x5555, 0x3285), 0x0000);
    }
}
