//! Link configuration over rtnetlink (RFC 3549; `rtnetlink(7)`), instead of running `ip`.
//!
//! Only what the engine needs for its own ports: set a link up, its MAC, its MTU and its name,
//! and move it into another network namespace. Messages
//! are built here in safe code; `sys` only sends and receives the bytes.

use super::sys;
use crate::wire::MacAddr;
use std::io;
use std::os::fd::AsFd;

const NLMSG_HDR_LEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const IFLA_STATS64: u16 = 23;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_NET_NS_FD: u16 = 28;
const IFF_UP: u32 = 0x1;

/// What to change on a link; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct LinkChange {
    pub up: Option<bool>,
    pub mac: Option<MacAddr>,
    pub mtu: Option<u32>,
    /// A new name (the link must be down).
    pub name: Option<String>,
    /// Moves the link into the network namespace open on this fd.
    pub netns_fd: Option<i32>,
}

fn push_attr(msg: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    msg.extend_from_slice(&(len as u16).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(data);
    while !msg.len().is_multiple_of(4) {
        msg.push(0);
    }
}

/// Builds the RTM_NEWLINK request that applies `change` to link `index`.
fn build_set_link(index: u32, change: &LinkChange, seq: u32) -> Vec<u8> {
    let mut msg = vec![0u8; NLMSG_HDR_LEN];
    // struct ifinfomsg: family, pad, type, index, flags, change.
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    msg.extend_from_slice(&(index as i32).to_ne_bytes());
    let (flags, mask) = match change.up {
        Some(true) => (IFF_UP, IFF_UP),
        Some(false) => (0, IFF_UP),
        None => (0, 0),
    };
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&mask.to_ne_bytes());
    debug_assert_eq!(msg.len(), NLMSG_HDR_LEN + IFINFOMSG_LEN);
    if let Some(mac) = change.mac {
        push_attr(&mut msg, IFLA_ADDRESS, &mac.0);
    }
    if let Some(mtu) = change.mtu {
        push_attr(&mut msg, IFLA_MTU, &mtu.to_ne_bytes());
    }
    if let Some(name) = &change.name {
        let mut bytes = name.as_bytes().to_vec();
        bytes.push(0);
        push_attr(&mut msg, IFLA_IFNAME, &bytes);
    }
    if let Some(fd) = change.netns_fd {
        push_attr(&mut msg, IFLA_NET_NS_FD, &fd.to_ne_bytes());
    }
    let len = msg.len() as u32;
    msg[0..4].copy_from_slice(&len.to_ne_bytes());
    msg[4..6].copy_from_slice(&RTM_NEWLINK.to_ne_bytes());
    msg[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg[8..12].copy_from_slice(&seq.to_ne_bytes());
    msg
}

/// Reads the kernel's acknowledgement: an NLMSG_ERROR carrying 0 or a negative errno.
fn parse_ack(reply: &[u8], seq: u32) -> io::Result<()> {
    let ne32 = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    let mut rest = reply;
    while rest.len() >= NLMSG_HDR_LEN {
        let len = ne32(&rest[0..4]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < NLMSG_HDR_LEN || len > rest.len() {
            break;
        }
        if kind == NLMSG_ERROR && ne32(&rest[8..12]) == seq && len >= NLMSG_HDR_LEN + 4 {
            let errno = ne32(&rest[16..20]) as i32;
            return if errno == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-errno))
            };
        }
        rest = &rest[(len + 3) & !3..];
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "no netlink acknowledgement",
    ))
}

/// A link's counters (`struct rtnl_link_stats64`, its first eight fields).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

/// Builds the RTM_GETLINK request for the link named `name`.
fn build_get_link(name: &str, seq: u32) -> Vec<u8> {
    let mut msg = vec![0u8; NLMSG_HDR_LEN + IFINFOMSG_LEN];
    msg[NLMSG_HDR_LEN] = libc::AF_UNSPEC as u8;
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    push_attr(&mut msg, IFLA_IFNAME, &bytes);
    let len = msg.len() as u32;
    msg[0..4].copy_from_slice(&len.to_ne_bytes());
    msg[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    msg[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg[8..12].copy_from_slice(&seq.to_ne_bytes());
    msg
}

/// Reads the counters out of the kernel's RTM_NEWLINK answer to request `seq` (an
/// NLMSG_ERROR answer is its errno).
fn parse_link_stats(reply: &[u8], seq: u32) -> io::Result<LinkStats> {
    let ne32 = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    let ne64 = |b: &[u8]| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&b[..8]);
        u64::from_ne_bytes(word)
    };
    let mut rest = reply;
    while rest.len() >= NLMSG_HDR_LEN {
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        // An answer cut by the buffer still has its counters, which come early.
        let len = match ne32(&rest[0..4]) as usize {
            len if len > rest.len() && kind == RTM_NEWLINK => rest.len(),
            len => len,
        };
        if len < NLMSG_HDR_LEN || len > rest.len() {
            break;
        }
        if ne32(&rest[8..12]) == seq {
            if kind == NLMSG_ERROR && len >= NLMSG_HDR_LEN + 4 {
                let errno = ne32(&rest[16..20]) as i32;
                return Err(io::Error::from_raw_os_error(-errno));
            }
            if kind == RTM_NEWLINK && len >= NLMSG_HDR_LEN + IFINFOMSG_LEN {
                let mut attrs = &rest[NLMSG_HDR_LEN + IFINFOMSG_LEN..len];
                while attrs.len() >= 4 {
                    let attr_len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
                    let attr_kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
                    if attr_len < 4 || attr_len > attrs.len() {
                        break;
                    }
                    if attr_kind == IFLA_STATS64 && attr_len >= 4 + 8 * 8 {
                        let v = &attrs[4..attr_len];
                        return Ok(LinkStats {
                            rx_packets: ne64(&v[0..]),
                            tx_packets: ne64(&v[8..]),
                            rx_bytes: ne64(&v[16..]),
                            tx_bytes: ne64(&v[24..]),
                            rx_errors: ne64(&v[32..]),
                            tx_errors: ne64(&v[40..]),
                            rx_dropped: ne64(&v[48..]),
                            tx_dropped: ne64(&v[56..]),
                        });
                    }
                    attrs = &attrs[((attr_len + 3) & !3).min(attrs.len())..];
                }
            }
        }
        rest = &rest[((len + 3) & !3).min(rest.len())..];
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "no link counters in the netlink answer",
    ))
}

/// The counters of the link named `name` in the calling thread's network namespace.
pub fn link_stats(name: &str) -> io::Result<LinkStats> {
    let sock = sys::netlink_route_socket()?;
    let seq = 1;
    sys::send(sock.as_fd(), &build_get_link(name, seq))?;
    let mut reply = vec![0u8; 16 * 1024];
    let n = sys::recv(sock.as_fd(), &mut reply)?;
    parse_link_stats(&reply[..n], seq)
}

/// Applies `change` to link `index` in the calling thread's network namespace.
pub fn set_link(index: u32, change: &LinkChange) -> io::Result<()> {
    let sock = sys::netlink_route_socket()?;
    let seq = 1;
    sys::send(sock.as_fd(), &build_set_link(index, change, seq))?;
    let mut reply = [0u8; 4096];
    let n = sys::recv(sock.as_fd(), &mut reply)?;
    parse_ack(&reply[..n], seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    // rtnetlink(7): RTM_NEWLINK with ifi_change selecting IFF_UP, then IFLA_ADDRESS (6 bytes,
    // padded to 4) and IFLA_MTU.
    #[test]
    fn builds_a_set_link_request() {
        let change = LinkChange {
            up: Some(true),
            mac: Some(MacAddr([0x52, 0x54, 0, 1, 2, 3])),
            mtu: Some(1500),
            ..LinkChange::default()
        };
        let msg = build_set_link(7, &change, 42);
        assert_eq!(msg.len(), 16 + 16 + 12 + 8);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()), 52);
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), RTM_NEWLINK);
        assert_eq!(i32::from_ne_bytes(msg[20..24].try_into().unwrap()), 7);
        assert_eq!(u32::from_ne_bytes(msg[24..28].try_into().unwrap()), IFF_UP);
        assert_eq!(u32::from_ne_bytes(msg[28..32].try_into().unwrap()), IFF_UP);
        assert_eq!(u16::from_ne_bytes([msg[32], msg[33]]), 10);
        assert_eq!(&msg[36..42], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(u16::from_ne_bytes([msg[46], msg[47]]), IFLA_MTU);
    }

    // rtnetlink(7): IFLA_IFNAME is a NUL-terminated string, IFLA_NET_NS_FD a u32 fd.
    #[test]
    fn builds_rename_and_move_requests() {
        let change = LinkChange {
            name: Some("eth0".into()),
            netns_fd: Some(9),
            ..LinkChange::default()
        };
        let msg = build_set_link(3, &change, 1);
        assert_eq!(msg.len(), 16 + 16 + 12 + 8);
        assert_eq!(u16::from_ne_bytes([msg[32], msg[33]]), 9);
        assert_eq!(u16::from_ne_bytes([msg[34], msg[35]]), IFLA_IFNAME);
        assert_eq!(&msg[36..41], b"eth0\0");
        assert_eq!(u16::from_ne_bytes([msg[46], msg[47]]), IFLA_NET_NS_FD);
        assert_eq!(i32::from_ne_bytes(msg[48..52].try_into().unwrap()), 9);
    }

    // rtnetlink(7): RTM_GETLINK by name is an ifinfomsg with index 0 and IFLA_IFNAME.
    #[test]
    fn builds_a_get_link_request_by_name() {
        let msg = build_get_link("eth0", 5);
        assert_eq!(msg.len(), 16 + 16 + 12);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()), 44);
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), RTM_GETLINK);
        assert_eq!(u16::from_ne_bytes([msg[6], msg[7]]), NLM_F_REQUEST);
        assert_eq!(u32::from_ne_bytes(msg[8..12].try_into().unwrap()), 5);
        assert_eq!(i32::from_ne_bytes(msg[20..24].try_into().unwrap()), 0);
        assert_eq!(u16::from_ne_bytes([msg[34], msg[35]]), IFLA_IFNAME);
        assert_eq!(&msg[36..41], b"eth0\0");
    }

    // An RTM_NEWLINK answer: IFLA_MTU, then IFLA_STATS64 (struct rtnl_link_stats64, 8-byte
    // fields, rx_packets first, tx_dropped eighth).
    #[test]
    fn reads_a_links_counters_and_skips_what_is_not_its_answer() {
        let mut stats = Vec::new();
        for v in 1..=24u64 {
            stats.extend_from_slice(&(v * 10).to_ne_bytes());
        }
        let mut msg = vec![0u8; NLMSG_HDR_LEN + IFINFOMSG_LEN];
        push_attr(&mut msg, IFLA_MTU, &1500u32.to_ne_bytes());
        push_attr(&mut msg, IFLA_STATS64, &stats);
        let len = msg.len() as u32;
        msg[0..4].copy_from_slice(&len.to_ne_bytes());
        msg[4..6].copy_from_slice(&RTM_NEWLINK.to_ne_bytes());
        msg[8..12].copy_from_slice(&7u32.to_ne_bytes());
        let got = parse_link_stats(&msg, 7).unwrap();
        assert_eq!((got.rx_packets, got.tx_packets), (10, 20));
        assert_eq!((got.rx_dropped, got.tx_dropped), (70, 80));
        assert!(
            parse_link_stats(&msg, 8).is_err(),
            "another request's answer"
        );
        // Cut anywhere, it is an error, never a panic.
        for cut in 0..msg.len() {
            let mut short = msg[..cut].to_vec();
            if cut >= 4 {
                short[0..4].copy_from_slice(&(cut as u32).to_ne_bytes());
            }
            assert!(parse_link_stats(&short, 7).is_err(), "cut at {cut}");
        }
        let mut error = vec![0u8; 36];
        error[0..4].copy_from_slice(&36u32.to_ne_bytes());
        error[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error[8..12].copy_from_slice(&7u32.to_ne_bytes());
        error[16..20].copy_from_slice(&(-libc::ENODEV).to_ne_bytes());
        assert_eq!(
            parse_link_stats(&error, 7).unwrap_err().raw_os_error(),
            Some(libc::ENODEV)
        );
    }

    #[test]
    fn parses_ack_and_errors() {
        let mut ack = vec![0u8; 36];
        ack[0..4].copy_from_slice(&36u32.to_ne_bytes());
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack[8..12].copy_from_slice(&9u32.to_ne_bytes());
        assert!(parse_ack(&ack, 9).is_ok());
        ack[16..20].copy_from_slice(&(-libc::ENODEV).to_ne_bytes());
        assert_eq!(
            parse_ack(&ack, 9).unwrap_err().raw_os_error(),
            Some(libc::ENODEV)
        );
        assert!(parse_ack(&ack[..10], 9).is_err());
        assert!(parse_ack(&ack, 8).is_err());
    }
}
