//! Every system call the engine makes that std does not wrap: tap ioctls, `setns`, netlink
//! sockets. This is the only module allowed `unsafe`; each block says why it is sound.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Offloads switchyard asks taps for: the kernel may hand us frames with a partial checksum
/// and TCP super-frames, which the switch forwards intact.
pub const TAP_OFFLOADS: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;

/// Opens `/dev/net/tun` and binds it to the tap `name` (created if it does not exist in the
/// calling thread's network namespace), non-blocking, with a virtio-net header of `vnet_len`
/// bytes and the offloads of [`TAP_OFFLOADS`]. Returns the fd and the name the kernel used.
pub fn open_tap(name: &str, vnet_len: usize) -> io::Result<(OwnedFd, String)> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    let path = c"/dev/net/tun";
    // SAFETY: `path` is a valid NUL-terminated string; `open` has no other preconditions.
    let raw = cvt(unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `raw` was just returned by a successful `open` and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    // SAFETY: `ifreq` is plain old data (a name array and a union of integers and arrays);
    // all-zero is a valid value for every field.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is one, valid for the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) })?;

    let hdr_len = vnet_len as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which is valid.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) })?;
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of TUN_F_* flags).
    cvt(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            TAP_OFFLOADS as libc::c_ulong,
        )
    })?;

    let len = req
        .ifr_name
        .iter()
        .position(|c| *c == 0)
        .unwrap_or(libc::IFNAMSIZ);
    let actual: Vec<u8> = req.ifr_name[..len].iter().map(|c| *c as u8).collect();
    Ok((fd, String::from_utf8_lossy(&actual).into_owned()))
}

/// Moves the calling thread into the network namespace `ns` (a `/run/netns/NAME` or
/// `/proc/PID/ns/net` file). Only this thread changes namespace.
pub fn setns_net(ns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `ns` is a valid open fd for the duration of the call; setns with
    // CLONE_NEWNET affects only the calling thread's network namespace.
    cvt(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) })?;
    Ok(())
}

/// The index of interface `name` in the calling thread's network namespace.
pub fn if_nametoindex(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// A `NETLINK_ROUTE` socket in the calling thread's network namespace.
pub fn netlink_route_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation; no pointers involved.
    let raw = cvt(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    })?;
    // SAFETY: `raw` was just returned by a successful `socket` and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sends one datagram on a connected or netlink socket.
pub fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call.
    cvt_size(unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) })
}

/// Receives one datagram.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
    cvt_size(unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) })
}
