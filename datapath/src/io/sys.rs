//! Every system call the engine makes that std does not wrap: tap ioctls, `setns`, netlink
//! sockets. This is the only module allowed `unsafe`; each block says why it is sound.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

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

fn setsockopt<T>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` points to a live `T` of `size_of::<T>()` bytes for the duration of the
    // call; the kernel only reads it.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Socket buffer size asked for on the uplink, so bursts (a TSO train, an iperf3 window)
/// queue in the kernel rather than drop while the engine serves other ports.
const PACKET_SOCKET_BUFFER: libc::c_int = 8 << 20;

/// An AF_PACKET socket bound to interface `ifindex` for every protocol, non-blocking:
/// frames carry a `vnet_len`-byte virtio-net header (`PACKET_VNET_HDR` and
/// `PACKET_VNET_HDR_SZ`, so GSO frames and partial checksums cross intact), our own
/// transmissions are not looped back (`PACKET_IGNORE_OUTGOING`), and the interface is put in
/// promiscuous mode for the socket's lifetime (`PACKET_MR_PROMISC`), because the engine
/// answers for a MAC the NIC does not own.
pub fn open_packet_socket(ifindex: u32, vnet_len: usize) -> io::Result<OwnedFd> {
    let all = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
    // SAFETY: plain socket creation; no pointers involved.
    let raw = cvt(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            all,
        )
    })?;
    // SAFETY: `raw` was just returned by a successful `socket` and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let sock = fd.as_fd();
    let one: libc::c_int = 1;
    setsockopt(sock, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &one)?;
    let vnet_len = vnet_len as libc::c_int;
    setsockopt(sock, libc::SOL_PACKET, libc::PACKET_VNET_HDR_SZ, &vnet_len)?;
    setsockopt(sock, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &one)?;
    // Best effort: without CAP_NET_ADMIN the kernel caps these at rmem_max / wmem_max.
    let _ = setsockopt(
        sock,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        &PACKET_SOCKET_BUFFER,
    );
    let _ = setsockopt(
        sock,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        &PACKET_SOCKET_BUFFER,
    );

    // SAFETY: `sockaddr_ll` is plain old data; all-zero is valid for every field.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as libc::c_ushort;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = ifindex as libc::c_int;
    // SAFETY: `addr` is a valid `sockaddr_ll` and the length passed is its size.
    cvt(unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    // SAFETY: `packet_mreq` is plain old data; all-zero is valid for every field.
    let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
    mreq.mr_ifindex = ifindex as libc::c_int;
    mreq.mr_type = libc::PACKET_MR_PROMISC as libc::c_ushort;
    setsockopt(sock, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)?;
    Ok(fd)
}

/// The MTU of interface `name` in the calling thread's network namespace (`SIOCGIFMTU`).
pub fn interface_mtu(name: &str) -> io::Result<u32> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    // SAFETY: plain socket creation; no pointers involved.
    let raw =
        cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `raw` was just returned by a successful `socket` and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `ifreq` is plain old data; all-zero is valid for every field.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU reads the name from and writes the MTU into the `ifreq`, which is
    // valid for the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFMTU, &mut req) })?;
    // SAFETY: after a successful SIOCGIFMTU the union holds `ifru_mtu`.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    Ok(mtu as u32)
}
