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
