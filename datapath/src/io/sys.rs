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

/// `TUN_F_USO4` and `TUN_F_USO6` from `<linux/if_tun.h>` (Linux 6.2; the libc crate lacks
/// them): the tap takes UDP super-frames (virtio `GSO_UDP_L4`). The kernel turns USO on only
/// when both are asked for together.
pub const TUN_F_USO4: libc::c_uint = 0x20;
pub const TUN_F_USO6: libc::c_uint = 0x40;

/// Offloads switchyard asks taps for: the kernel may hand us frames with a partial checksum,
/// and TCP (TSO) and UDP (USO) super-frames, which the switch forwards intact. The guest's
/// interface then shows `tx-udp-segmentation: on`.
pub const TAP_OFFLOADS: libc::c_uint =
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6;

/// [`TAP_OFFLOADS`] without USO, for kernels before 6.2, which refuse a flag they do not know
/// with `EINVAL`.
pub const TAP_OFFLOADS_WITHOUT_USO: libc::c_uint = TAP_OFFLOADS & !(TUN_F_USO4 | TUN_F_USO6);

/// When set (to anything) in switchyard's environment, taps are opened as on a kernel before
/// 6.2, without USO, whatever this kernel knows: how the tests check that path here.
pub const TAP_NO_USO_ENV: &str = "SWITCHYARD_TAP_NO_USO";

fn tap_uso_wanted() -> bool {
    std::env::var_os(TAP_NO_USO_ENV).is_none()
}

/// Whether the tap open on `fd` takes UDP super-frames: asking again for [`TAP_OFFLOADS`]
/// (what [`open_tap`] asked first) succeeds only where the kernel knows USO; where it does not,
/// the `EINVAL` changes nothing.
pub fn tap_takes_uso(fd: BorrowedFd<'_>) -> bool {
    if !tap_uso_wanted() {
        return false;
    }
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of TUN_F_* flags).
    let result = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            TAP_OFFLOADS as libc::c_ulong,
        )
    };
    result == 0
}

/// Opens `/dev/net/tun` and binds it to the tap `name` (created if it does not exist in the
/// calling thread's network namespace), non-blocking, with a virtio-net header of `vnet_len`
/// bytes and the offloads of [`TAP_OFFLOADS`] (or [`TAP_OFFLOADS_WITHOUT_USO`] where the
/// kernel has no USO). Returns the fd and the name the kernel used.
///
/// With `multi_queue`, the tap is made with `IFF_MULTI_QUEUE` and each call on the same name
/// attaches one more queue: the kernel spreads the frames the guest sends over the queues by
/// flow ([`open_tap`] once per worker).
pub fn open_tap(name: &str, vnet_len: usize, multi_queue: bool) -> io::Result<(OwnedFd, String)> {
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
    let queues = if multi_queue {
        libc::IFF_MULTI_QUEUE
    } else {
        0
    };
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | queues) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is one, valid for the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) })?;

    let hdr_len = vnet_len as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which is valid.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) })?;
    let offloads = if tap_uso_wanted() {
        TAP_OFFLOADS
    } else {
        TAP_OFFLOADS_WITHOUT_USO
    };
    match set_tap_offloads(fd.as_fd(), offloads) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            set_tap_offloads(fd.as_fd(), TAP_OFFLOADS_WITHOUT_USO)?
        }
        result => result?,
    }

    let len = req
        .ifr_name
        .iter()
        .position(|c| *c == 0)
        .unwrap_or(libc::IFNAMSIZ);
    let actual: Vec<u8> = req.ifr_name[..len].iter().map(|c| *c as u8).collect();
    Ok((fd, String::from_utf8_lossy(&actual).into_owned()))
}

/// `TUNSETOFFLOAD`: the offloads (`TUN_F_*`) the tap open on `fd` takes from the kernel.
fn set_tap_offloads(fd: BorrowedFd<'_>, offloads: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of TUN_F_* flags).
    cvt(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            offloads as libc::c_ulong,
        )
    })?;
    Ok(())
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
/// Whether the tap open on `fd` still has its device: a tap whose device was deleted (or
/// whose namespace was destroyed) answers TUNGETIFF with EBADFD.
pub fn tap_is_attached(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value for every field.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one `struct ifreq` through the pointer, which is valid for it.
    let result = cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) });
    !matches!(result, Err(e) if e.raw_os_error() == Some(libc::EBADFD))
}

/// The current name of the tap open on `fd` (in its namespace; a guest may rename it).
pub fn tap_name(fd: BorrowedFd<'_>) -> io::Result<String> {
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value for every field.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one `struct ifreq` through the pointer, which is valid for it.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) })?;
    let name: Vec<u8> = (req.ifr_name.iter())
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8(name).map_err(|_| io::Error::other("tap name is not UTF-8"))
}

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

/// Asks the kernel to coalesce datagrams for the UDP socket `fd` (`UDP_GRO`, Linux 5.0): a
/// train from one sender (a `UDP_SEGMENT` send, or datagrams GRO merged on receive) is read
/// in one call, with its datagram size in a control message ([`recv_gro`]).
pub fn enable_udp_gro(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt(fd, libc::SOL_UDP, libc::UDP_GRO, &(1 as libc::c_int))
}

/// What one [`recv_gro`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroRead {
    /// Bytes in the buffer.
    pub len: usize,
    /// The sender, when it has an IPv4 address.
    pub from: Option<std::net::SocketAddrV4>,
    /// The size of each coalesced datagram (the last may be shorter), when the kernel
    /// coalesced (a `UDP_GRO` control message); `None` for one plain datagram.
    pub segment: Option<u16>,
    /// The buffer was too small (`MSG_TRUNC`): what it holds is incomplete.
    pub truncated: bool,
}

/// Room for control messages on a [`recv_gro`]: `CMSG_SPACE(sizeof(int))` is 24 bytes on
/// 64-bit Linux; twice that leaves room for one we did not ask for. `u64`s for the alignment
/// of `cmsghdr`.
const GRO_CONTROL_WORDS: usize = 8;

/// Receives one datagram, or several the kernel coalesced (see [`enable_udp_gro`]), from the
/// UDP socket `fd` into `buf`, with its sender. Non-blocking as `fd` is.
pub fn recv_gro(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<GroRead> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: sockaddr_in is plain integers; all zeros is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut control = [0u64; GRO_CONTROL_WORDS];
    let mut msg = empty_msghdr();
    msg.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `addr` (msg_namelen bytes), `iov` (over `buf`) and `control`
    // (msg_controllen bytes), all alive and writable for the call; the kernel writes no more
    // than those lengths.
    let len = cvt_size(unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) })?;
    let from = (addr.sin_family == libc::AF_INET as libc::sa_family_t
        && msg.msg_namelen as usize >= std::mem::size_of::<libc::sockaddr_in>())
    .then(|| {
        std::net::SocketAddrV4::new(
            u32::from_be(addr.sin_addr.s_addr).into(),
            u16::from_be(addr.sin_port),
        )
    });
    // How much of `control` the kernel wrote.
    #[allow(clippy::unnecessary_cast)] // a size_t in glibc, a socklen_t in musl
    let written = (msg.msg_controllen as usize).min(std::mem::size_of_val(&control));
    let mut segment = None;
    // SAFETY: `msg` is the header recvmsg just filled: msg_control points at `control` and
    // msg_controllen says how much of it the kernel wrote, which is all CMSG_FIRSTHDR reads.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return either null or a pointer to a whole
        // `cmsghdr` inside `control` (they check it against msg_controllen), aligned as the
        // buffer of u64s is.
        let header = unsafe { &*cmsg };
        // Where the message's int would end, from the start of `control`: inside what the
        // kernel wrote, and inside what the message says it holds.
        let offset = cmsg as usize - control.as_ptr() as usize;
        let int_end =
            offset + std::mem::size_of::<libc::cmsghdr>() + std::mem::size_of::<libc::c_int>();
        #[allow(clippy::unnecessary_cast)] // a size_t in glibc, a socklen_t in musl
        let message_end = offset + header.cmsg_len as usize;
        if header.cmsg_level == libc::SOL_UDP
            && header.cmsg_type == libc::UDP_GRO
            && int_end <= message_end
            && int_end <= written
        {
            // SAFETY: `cmsg` points at a whole message in `control` (above); CMSG_DATA only
            // computes the address just past its header.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<libc::c_int>();
            // SAFETY: the int at `data` lies inside `control` and inside the message (both
            // checked above, `int_end`); read_unaligned assumes nothing of its alignment.
            let size = unsafe { std::ptr::read_unaligned(data) };
            segment = u16::try_from(size).ok().filter(|&s| s > 0);
        }
        // SAFETY: as for CMSG_FIRSTHDR: `msg` and `cmsg` are the header and a message in it.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(GroRead {
        len,
        from,
        segment,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
    })
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

/// Frames one [`recv_batch`] or [`send_batch`] call moves at most.
pub const BATCH: usize = 16;

/// One frame of a [`recv_batch`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    /// Bytes in the buffer.
    pub len: usize,
    /// The frame was longer than the buffer (`MSG_TRUNC`): a GRO super-frame past 64 KiB,
    /// say, on a NIC with BIG TCP. What the buffer holds is its start, never to be forwarded.
    pub truncated: bool,
}

/// Reads up to `bufs.len()` frames (at most [`BATCH`]) from datagram socket `fd` in one
/// `recvmmsg` call, without blocking; what each frame was goes to `got`. How many were read
/// (`WouldBlock` when none waits).
pub fn recv_batch(
    fd: BorrowedFd<'_>,
    bufs: &mut [Box<[u8]>],
    got: &mut [Received],
) -> io::Result<usize> {
    let n = bufs.len().min(got.len()).min(BATCH);
    // SAFETY: `iovec` and `mmsghdr` are plain old data; all-zero is valid for every field.
    let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (i, buf) in bufs.iter_mut().take(n).enumerate() {
        iov[i].iov_base = buf.as_mut_ptr().cast();
        iov[i].iov_len = buf.len();
        msgs[i].msg_hdr.msg_iov = &mut iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `msgs[..n]` each name one `iovec` of a live buffer the caller lends us
    // exclusively for the call; the kernel writes at most `iov_len` bytes into each.
    let read = cvt(unsafe {
        libc::recvmmsg(
            fd.as_raw_fd(),
            msgs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    })? as usize;
    for (frame, msg) in got.iter_mut().zip(&msgs[..read]) {
        *frame = Received {
            len: msg.msg_len as usize,
            truncated: msg.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        };
    }
    Ok(read)
}

/// Writes `frames` (at most [`BATCH`]) to datagram socket `fd` in one `sendmmsg` call, one
/// datagram each; how many the kernel took (the rest, if any, were not sent).
pub fn send_batch(fd: BorrowedFd<'_>, frames: &[&[u8]]) -> io::Result<usize> {
    let n = frames.len().min(BATCH);
    // SAFETY: `iovec` and `mmsghdr` are plain old data; all-zero is valid for every field.
    let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (i, frame) in frames.iter().take(n).enumerate() {
        // The kernel only reads through `iov_base` on a send.
        iov[i].iov_base = frame.as_ptr().cast_mut().cast();
        iov[i].iov_len = frame.len();
        msgs[i].msg_hdr.msg_iov = &mut iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `msgs[..n]` each name one `iovec` of a live buffer borrowed for the call, which
    // the kernel only reads.
    let sent =
        cvt(unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), n as libc::c_uint, 0) })?;
    Ok(sent as usize)
}

/// A `PACKET_FANOUT` group: its id, and the type and flags its members join with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutGroup {
    pub id: u16,
    mode: libc::c_uint,
}

/// Joins AF_PACKET socket `fd` to fanout group `group`, or, with `None`, starts a group
/// under an id the kernel picks (`PACKET_FANOUT_FLAG_UNIQUEID`); the socket that starts it
/// is the group's first, the one [`steering_program`] names 0.
///
/// The group steers by [`steering_program`] (`PACKET_FANOUT_CBPF`, Linux 4.5): a
/// connection's opening and closing frames to the engine's socket, its data by its ports to
/// one socket. Where that is refused, by the kernel's flow hash (`PACKET_FANOUT_HASH`).
///
/// A group receives through a hook of its own, which ignores the members'
/// `PACKET_IGNORE_OUTGOING`: the host's transmissions on the interface would reach the
/// group. Linux 6.2 skips them for a group made with `PACKET_FANOUT_FLAG_IGNORE_OUTGOING`
/// (asked for, and left out where refused); on every kernel, each member also gets a filter
/// that drops them ([`drop_outgoing`]).
pub fn join_fanout(fd: BorrowedFd<'_>, group: Option<FanoutGroup>) -> io::Result<FanoutGroup> {
    drop_outgoing(fd)?;
    let fanout = |id: u16, mode: libc::c_uint| {
        let arg = (u32::from(id) | mode << 16) as libc::c_int;
        setsockopt(fd, libc::SOL_PACKET, libc::PACKET_FANOUT, &arg)
    };
    if let Some(group) = group {
        fanout(group.id, group.mode)?;
        return Ok(group);
    }
    let (cbpf, hash) = (libc::PACKET_FANOUT_CBPF, libc::PACKET_FANOUT_HASH);
    let ignore = libc::PACKET_FANOUT_FLAG_IGNORE_OUTGOING;
    let unique = libc::PACKET_FANOUT_FLAG_UNIQUEID;
    let mut joined = None;
    for mode in [cbpf | ignore, cbpf, hash | ignore, hash] {
        match fanout(0, mode | unique) {
            Ok(()) => {
                joined = Some(mode);
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => return Err(e),
        }
    }
    let mode = joined.ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    if mode & 0xff == cbpf {
        let program = steering_program();
        set_program(fd, (libc::SOL_PACKET, libc::PACKET_FANOUT_DATA), &program)?;
    }
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live locals of the sizes the kernel is told.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_FANOUT,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(FanoutGroup {
        id: (value & 0xffff) as u16,
        mode,
    })
}

fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The classic BPF program that picks a fanout group's socket for a frame (offsets from
/// the network header, where the kernel runs it): 0, the group's first socket (the
/// engine's), for everything but unfragmented IPv4 TCP and UDP, and for TCP segments with
/// SYN, FIN or RST (a connection opening or closing is the engine's to handle anyway, so no
/// hand-over); the others by a multiplicative hash of their ports (Linux's `connect` picks
/// even ports first, so the ports' low bits alone would pick one socket), modulo the
/// group's size.
pub fn steering_program() -> [libc::sock_filter; 20] {
    // Classic BPF opcodes (linux/filter.h).
    const LD_H_ABS: u16 = 0x28;
    const LD_B_ABS: u16 = 0x30;
    const LD_H_IND: u16 = 0x48;
    const LD_B_IND: u16 = 0x50;
    const LDX_B_MSH: u16 = 0xb1;
    const LDX_W_MEM: u16 = 0x61;
    const ST: u16 = 0x02;
    const JEQ_K: u16 = 0x15;
    const JSET_K: u16 = 0x45;
    const LSH_K: u16 = 0x64;
    const RSH_K: u16 = 0x74;
    const MUL_K: u16 = 0x24;
    const OR_X: u16 = 0x4c;
    const RET_A: u16 = 0x16;
    const RET_K: u16 = 0x06;
    const PROTOCOL: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_PROTOCOL) as u32;
    [
        bpf(LD_H_ABS, 0, 0, PROTOCOL), // 0: A = ethertype
        bpf(JEQ_K, 0, 17, 0x0800),     // 1: IPv4, else 19
        bpf(LD_H_ABS, 0, 0, 6),        // 2: A = flags and fragment offset
        bpf(JSET_K, 15, 0, 0x3fff),    // 3: a fragment: 19
        bpf(LDX_B_MSH, 0, 0, 0),       // 4: X = header length
        bpf(LD_B_ABS, 0, 0, 9),        // 5: A = protocol
        bpf(JEQ_K, 0, 2, 6),           // 6: TCP, else 9
        bpf(LD_B_IND, 0, 0, 13),       // 7: A = TCP flags
        bpf(JSET_K, 10, 1, 0x07),      // 8: FIN, SYN or RST: 19, else 10
        bpf(JEQ_K, 0, 9, 17),          // 9: UDP, else 19
        bpf(LD_H_IND, 0, 0, 0),        // 10: A = source port
        bpf(LSH_K, 0, 0, 16),          // 11: A <<= 16
        bpf(ST, 0, 0, 0),              // 12: M[0] = A
        bpf(LD_H_IND, 0, 0, 2),        // 13: A = destination port
        bpf(LDX_W_MEM, 0, 0, 0),       // 14: X = M[0]
        bpf(OR_X, 0, 0, 0),            // 15: A = ports
        bpf(MUL_K, 0, 0, 0x9E37_79B1), // 16: A *= 2^32 / golden ratio
        bpf(RSH_K, 0, 0, 16),          // 17: A = its high half
        bpf(RET_A, 0, 0, 0),           // 18: that socket
        bpf(RET_K, 0, 0, 0),           // 19: the engine's
    ]
}

/// Attaches to AF_PACKET socket `fd` a classic BPF filter that drops the frames the host
/// sends on its interface (`skb->pkt_type == PACKET_OUTGOING`) and keeps the rest whole.
pub fn drop_outgoing(fd: BorrowedFd<'_>) -> io::Result<()> {
    // The ancillary load of `pkt_type` (SKF_AD_OFF + SKF_AD_PKTTYPE).
    const PKTTYPE: u32 = (-0x1000i32 + 4) as u32;
    // BPF_LD (0) | BPF_B (0x10) | BPF_ABS (0x20).
    const LD_B_ABS: u16 = 0x30;
    const JEQ_K: u16 = 0x05 | 0x10;
    const RET_K: u16 = 0x06;
    let program = [
        libc::sock_filter {
            code: LD_B_ABS,
            jt: 0,
            jf: 0,
            k: PKTTYPE,
        },
        libc::sock_filter {
            code: JEQ_K,
            jt: 0,
            jf: 1,
            k: u32::from(libc::PACKET_OUTGOING),
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: u32::MAX,
        },
    ];
    set_program(fd, (libc::SOL_SOCKET, libc::SO_ATTACH_FILTER), &program)
}

/// Hands classic BPF `program` to socket option `(level, name)` of `fd`.
fn set_program(
    fd: BorrowedFd<'_>,
    (level, name): (libc::c_int, libc::c_int),
    program: &[libc::sock_filter],
) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: program.len() as libc::c_ushort,
        // The kernel only reads the program, and copies it during the call.
        filter: program.as_ptr().cast_mut(),
    };
    setsockopt(fd, level, name, &fprog)
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

/// The shape of a `TPACKET_V3` receive ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Bytes per block: a multiple of the page size, larger than the largest frame (a 64 KB
    /// GSO frame with its headers), or the kernel truncates it.
    pub block_size: usize,
    pub block_count: usize,
    /// A block that is not full is handed over after this many milliseconds: the latency
    /// floor of a lone frame.
    pub retire_ms: u32,
}

impl Default for RingLayout {
    fn default() -> Self {
        RingLayout {
            block_size: 128 << 10,
            block_count: 64,
            retire_ms: 1,
        }
    }
}

/// `tp_frame_size` given to the kernel: V3 packs frames back to back whatever this is, but it
/// must divide the block size and hold a header.
const RING_FRAME_SIZE: usize = 2048;

/// One frame in the ring: `buf` holds the virtio-net header (`vnet_len` bytes, normalised to
/// the layout a tap read has: header first, `num_buffers` zero) followed by the frame.
#[derive(Debug)]
pub struct RingFrame<'a> {
    pub buf: &'a mut [u8],
    /// The kernel cut the frame to fit the block (`tp_snaplen < tp_len`).
    pub truncated: bool,
}

/// A `TPACKET_V3` receive ring mapped from an AF_PACKET socket.
///
/// The kernel fills one block at a time and hands it over (`TP_STATUS_USER`) when it is full
/// or after [`RingLayout::retire_ms`]; the socket turns readable then. Frames are read in place,
/// with no system call per frame, and the block goes back to the kernel when the next frame is
/// asked for after its last one.
#[derive(Debug)]
pub struct RxRing {
    map: std::ptr::NonNull<u8>,
    map_len: usize,
    block_size: usize,
    block_count: usize,
    vnet_len: usize,
    /// The block being read, if one is held.
    block: usize,
    held: bool,
    /// Offset of the next frame header within the held block, and frames left in it.
    next: usize,
    left: u32,
}

// SAFETY: the mapping is owned by this value alone (nothing else holds its address), and the
// kernel side synchronises through the block status words, so moving it between threads is
// sound.
unsafe impl Send for RxRing {}

/// The virtio-net header the kernel writes right before the MAC header in a ring
/// (`sizeof(struct virtio_net_hdr)`, whatever `PACKET_VNET_HDR_SZ` says).
const KERNEL_VNET_LEN: usize = 10;

impl RxRing {
    /// Sets up a `TPACKET_V3` rx ring on `fd` (an AF_PACKET socket whose vnet header, if any,
    /// is already configured as `vnet_len` bytes) and maps it.
    pub fn attach(fd: BorrowedFd<'_>, layout: RingLayout, vnet_len: usize) -> io::Result<RxRing> {
        // SAFETY: `sysconf` has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        if !layout.block_size.is_multiple_of(page)
            || !layout.block_size.is_multiple_of(RING_FRAME_SIZE)
            || layout.block_count == 0
            || vnet_len < KERNEL_VNET_LEN && vnet_len != 0
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad ring layout {layout:?}"),
            ));
        }
        let version = libc::tpacket_versions::TPACKET_V3 as libc::c_int;
        setsockopt(fd, libc::SOL_PACKET, libc::PACKET_VERSION, &version)?;
        let frames_per_block = layout.block_size / RING_FRAME_SIZE;
        let req = libc::tpacket_req3 {
            tp_block_size: layout.block_size as libc::c_uint,
            tp_block_nr: layout.block_count as libc::c_uint,
            tp_frame_size: RING_FRAME_SIZE as libc::c_uint,
            tp_frame_nr: (frames_per_block * layout.block_count) as libc::c_uint,
            tp_retire_blk_tov: layout.retire_ms,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        setsockopt(fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &req)?;
        let map_len = layout.block_size * layout.block_count;
        // SAFETY: a fresh shared mapping of the socket's ring, of exactly the size the kernel
        // just allocated; no existing memory is affected.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = std::ptr::NonNull::new(map.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(RxRing {
            map,
            map_len,
            block_size: layout.block_size,
            block_count: layout.block_count,
            vnet_len,
            block: 0,
            held: false,
            next: 0,
            left: 0,
        })
    }

    /// The address `offset` bytes into the mapping (computing it is safe; using it is not).
    fn at(&self, offset: usize) -> *mut u8 {
        self.map.as_ptr().wrapping_add(offset)
    }

    /// The status word of block `index`, shared with the kernel.
    fn block_status(&self, index: usize) -> &std::sync::atomic::AtomicU32 {
        let offset = index * self.block_size + std::mem::offset_of!(libc::tpacket_block_desc, hdr);
        // SAFETY: `offset` lies inside the mapping (index < block_count) at the start of the
        // block's `tpacket_hdr_v1`, whose first field is the u32 `block_status`; blocks are
        // page aligned so the word is 4-byte aligned. The kernel and we access it only
        // atomically (it is the handover flag), which is what `AtomicU32` models.
        unsafe { std::sync::atomic::AtomicU32::from_ptr(self.at(offset).cast()) }
    }

    /// The next frame, or `None` when the kernel has handed over no more blocks.
    pub fn next_frame(&mut self) -> Option<RingFrame<'_>> {
        use std::sync::atomic::Ordering;
        while self.left == 0 {
            if self.held {
                self.block_status(self.block)
                    .store(libc::TP_STATUS_KERNEL, Ordering::Release);
                self.held = false;
                self.block = (self.block + 1) % self.block_count;
            }
            if self.block_status(self.block).load(Ordering::Acquire) & libc::TP_STATUS_USER == 0 {
                return None;
            }
            // SAFETY: the block is ours (TP_STATUS_USER, read with Acquire above), it starts
            // with a `tpacket_block_desc`, and blocks are page aligned.
            let desc = unsafe {
                std::ptr::read(
                    self.at(self.block * self.block_size)
                        .cast::<libc::tpacket_block_desc>(),
                )
            };
            // SAFETY: in a TPACKET_V3 ring the header union holds `bh1`.
            let bh1 = unsafe { desc.hdr.bh1 };
            self.held = true;
            self.left = bh1.num_pkts;
            self.next = bh1.offset_to_first_pkt as usize;
        }
        self.left -= 1;
        let base = self.block * self.block_size;
        let header_len = std::mem::size_of::<libc::tpacket3_hdr>();
        if self.next + header_len > self.block_size {
            // A header past the block: the block is corrupt; give it back.
            self.left = 0;
            return None;
        }
        // SAFETY: the header lies inside the held block (checked above); tpacket3_hdr is
        // plain old data and the kernel aligns it to TPACKET_ALIGNMENT (16).
        let hdr = unsafe { std::ptr::read(self.at(base + self.next).cast::<libc::tpacket3_hdr>()) };
        let frame_at = self.next;
        self.next += hdr.tp_next_offset as usize;
        let mac = frame_at + hdr.tp_mac as usize;
        let end = mac + hdr.tp_snaplen as usize;
        if (hdr.tp_mac as usize) < header_len + self.vnet_len || end > self.block_size {
            self.left = 0;
            return None;
        }
        // SAFETY: [mac - vnet_len, end) lies inside the held block (checked above), which the
        // kernel does not touch until we store TP_STATUS_KERNEL into its status word; the
        // slice's lifetime is tied to `&mut self`, so it ends before that can happen.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(
                self.at(base + mac - self.vnet_len),
                end - mac + self.vnet_len,
            )
        };
        if self.vnet_len > 0 {
            // The kernel wrote its 10-byte header just before the MAC header; move it to the
            // front, as a tap read has it, and zero `num_buffers`.
            let from = self.vnet_len - KERNEL_VNET_LEN;
            buf.copy_within(from..self.vnet_len, 0);
            buf[KERNEL_VNET_LEN..self.vnet_len].fill(0);
        }
        Some(RingFrame {
            buf,
            truncated: hdr.tp_snaplen < hdr.tp_len,
        })
    }
}

impl Drop for RxRing {
    fn drop(&mut self) {
        // SAFETY: `map`/`map_len` are exactly the mapping made in `attach`, and no slice into
        // it outlives `&mut self`.
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), self.map_len);
        }
    }
}

/// Opens an unprivileged ICMP echo socket (`SOCK_DGRAM`, `IPPROTO_ICMP`), non-blocking: the
/// kernel allows it to groups within `net.ipv4.ping_group_range`, picks the echo identifier
/// and fills the checksum. `PermissionDenied` where the range excludes us.
pub fn open_ping_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; a non-negative return is a new fd we own.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    })?;
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `NS_GET_USERNS` from `<linux/nsfs.h>`: `_IO(0xb7, 0x1)`.
const NS_GET_USERNS: libc::c_ulong = 0xb701;

/// The user namespace that owns the namespace `ns` (`ioctl(NS_GET_USERNS)`).
pub fn namespace_owner(ns: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: NS_GET_USERNS takes no argument and returns a new fd (or -1) for a valid `ns`.
    let fd = cvt(unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_USERNS as _) })?;
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Moves the calling process into the user namespace `ns`. The kernel allows it only to a
/// single-threaded process, which is why a helper process does it (see `netns`).
pub fn setns_user(ns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `ns` is a valid open fd for the duration of the call.
    cvt(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWUSER) })?;
    Ok(())
}

/// One `SCM_RIGHTS` control message carrying one fd, laid out as `CMSG_SPACE(sizeof(int))`
/// bytes: the header, the fd at `CMSG_DATA`, padding to the alignment of the header.
#[repr(C)]
struct FdMessage {
    header: libc::cmsghdr,
    fd: libc::c_int,
    padding: libc::c_int,
}

/// `CMSG_LEN(sizeof(int))`: the header and one fd.
const FD_MESSAGE_LEN: usize =
    std::mem::size_of::<libc::cmsghdr>() + std::mem::size_of::<libc::c_int>();

fn empty_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain data (integers and pointers); all zeros is a valid value.
    unsafe { std::mem::zeroed() }
}

fn empty_fd_message() -> FdMessage {
    // SAFETY: cmsghdr is plain integers; all zeros is a valid value.
    let header: libc::cmsghdr = unsafe { std::mem::zeroed() };
    FdMessage {
        header,
        fd: -1,
        padding: 0,
    }
}

/// Sends `data` over the unix socket `sock`, with `fd` attached (`SCM_RIGHTS`) if given.
pub fn send_with_fd(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control = empty_fd_message();
    let mut msg = empty_msghdr();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        control.header.cmsg_level = libc::SOL_SOCKET;
        control.header.cmsg_type = libc::SCM_RIGHTS;
        control.header.cmsg_len = FD_MESSAGE_LEN as _;
        control.fd = fd.as_raw_fd();
        msg.msg_control = (&mut control as *mut FdMessage).cast();
        msg.msg_controllen = std::mem::size_of::<FdMessage>() as _;
    }
    // SAFETY: `msg` points at `iov` (over `data`) and `control`, all alive for the call.
    cvt_size(unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) })?;
    Ok(())
}

/// Receives one message into `buf` from the unix socket `sock`, with the fd attached to it, if
/// any (`SCM_RIGHTS`, received close-on-exec).
pub fn recv_with_fd(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = empty_fd_message();
    let mut msg = empty_msghdr();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = (&mut control as *mut FdMessage).cast();
    msg.msg_controllen = std::mem::size_of::<FdMessage>() as _;
    // SAFETY: `msg` points at `iov` (over `buf`) and `control`, both alive and writable; the
    // kernel writes at most msg_controllen bytes of control data.
    let n = cvt_size(unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) })?;
    let carries_fd = msg.msg_controllen >= FD_MESSAGE_LEN
        && control.header.cmsg_level == libc::SOL_SOCKET
        && control.header.cmsg_type == libc::SCM_RIGHTS
        && control.fd >= 0;
    let fd = carries_fd.then(|| {
        // SAFETY: the kernel installed this fd for us with the SCM_RIGHTS message; nothing
        // else owns it.
        unsafe { OwnedFd::from_raw_fd(control.fd) }
    });
    Ok((n, fd))
}

/// The user id of the process at the other end of the unix socket `sock` (`SO_PEERCRED`).
pub fn peer_uid(sock: BorrowedFd<'_>) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given for the call.
    cvt(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(cred.uid)
}

/// The calling process's effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether the peer of control socket `sock` may control this process: the same user, or
/// root. The socket's mode already keeps others out; this holds where a directory's or
/// socket's permissions were loosened.
pub fn peer_may_control(sock: BorrowedFd<'_>) -> bool {
    peer_uid(sock).is_ok_and(|uid| uid == 0 || uid == effective_uid())
}

/// The CPUs the calling thread may run on (`sched_getaffinity`), in order.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity(2) writes at most `size_of::<cpu_set_t>()` bytes into `set`,
    // which is that large; pid 0 is the calling thread.
    cvt(unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) })?;
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads bit `cpu` of `set`, below CPU_SETSIZE.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Runs the calling thread on `cpu` only (`sched_setaffinity`).
pub fn pin_this_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above), so CPU_SET writes inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity(2) reads `size_of::<cpu_set_t>()` bytes of `set`; pid 0 is
    // the calling thread.
    cvt(unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) })?;
    Ok(())
}

/// Puts the calling thread under `SCHED_RR` at `priority` (1-99): it runs ahead of every
/// normal thread when it has work, as the kernel's softirqs do. Needs CAP_SYS_NICE or an
/// `RLIMIT_RTPRIO` of at least `priority`. With `SCHED_RESET_ON_FORK`, so threads and
/// processes it starts afterwards (a tap opener, the rootless helper) run under the normal
/// scheduler (its CPU affinity they do inherit).
pub fn set_this_thread_realtime(priority: u8) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: libc::c_int::from(priority),
    };
    // SAFETY: sched_setscheduler(2) reads one sched_param, valid for the call; pid 0 is the
    // calling thread (Linux schedules threads, not processes).
    cvt(unsafe {
        libc::sched_setscheduler(0, libc::SCHED_RR | libc::SCHED_RESET_ON_FORK, &param)
    })?;
    Ok(())
}

/// `prctl(PR_SET_NO_NEW_PRIVS)`: nothing this process executes can gain privileges (no
/// setuid, no file capabilities).
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    Ok(())
}

/// Capabilities a running network may still need: CAP_NET_ADMIN (creating and configuring
/// taps on live attach), CAP_NET_RAW (a NIC's packet socket), CAP_SYS_ADMIN (joining a guest's
/// network namespace to make its tap there) and CAP_NET_BIND_SERVICE (a port forward from a
/// port below 1024).
pub const KEPT_CAPABILITIES: [u32; 4] = [
    CAP_NET_BIND_SERVICE,
    CAP_NET_ADMIN,
    CAP_NET_RAW,
    CAP_SYS_ADMIN,
];
/// Capability numbers from `<linux/capability.h>`. CAP_SYS_NICE is kept only for
/// `--realtime` (the datapath threads' `SCHED_RR`).
pub const CAP_NET_BIND_SERVICE: u32 = 10;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_NET_RAW: u32 = 13;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_SYS_NICE: u32 = 23;

/// The `_LINUX_CAPABILITY_VERSION_3` header of capget/capset.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Drops every capability but `keep` from the calling process for good: from the bounding
/// set (so no exec regains them) and from the effective, permitted and inheritable sets.
/// Threads started afterwards inherit the result; call it before starting any.
pub fn drop_capabilities(keep: &[u32]) -> io::Result<()> {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    for cap in (0..=last).filter(|c| !keep.contains(c)) {
        // SAFETY: PR_CAPBSET_DROP takes integer arguments only. EINVAL (a capability the
        // kernel does not know) is ignored.
        let _ = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
    }
    let mut data = [CapData::default(); 2];
    for &cap in keep {
        let word = (cap / 32) as usize;
        if word < 2 {
            let bit = 1u32 << (cap % 32);
            data[word].effective |= bit;
            data[word].permitted |= bit;
        }
    }
    let mut current = [CapData::default(); 2];
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: capget(2) writes two CapData words for a version-3 header; both are valid.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            current.as_mut_ptr(),
        ) as libc::c_int
    })?;
    // Keep only what the process holds: capset fails when asked to add to the permitted set.
    for (wanted, held) in data.iter_mut().zip(current) {
        wanted.permitted &= held.permitted;
        wanted.effective &= held.permitted;
    }
    // SAFETY: capset(2) reads the header and two CapData words, all valid for the call.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        ) as libc::c_int
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

    /// Sends `data` from `socket` to `to` as datagrams of `segment` bytes in one call
    /// (`UDP_SEGMENT`, Linux 4.18), as a USO sender does.
    fn send_segmented(socket: &UdpSocket, to: SocketAddrV4, data: &[u8], segment: u16) {
        let size = libc::c_int::from(segment);
        setsockopt(socket.as_fd(), libc::SOL_UDP, libc::UDP_SEGMENT, &size).unwrap();
        assert_eq!(socket.send_to(data, to).unwrap(), data.len());
    }

    fn loopback() -> (UdpSocket, SocketAddrV4) {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let std::net::SocketAddr::V4(addr) = socket.local_addr().unwrap() else {
            unreachable!()
        };
        (socket, addr)
    }

    /// With UDP_GRO, a train of datagrams from one send is one read, its datagram size in the
    /// control message; without it, the same train is read datagram by datagram, no size.
    #[test]
    fn recv_gro_reads_a_coalesced_train_with_its_size() {
        let (sender, from) = loopback();
        let (gro, gro_at) = loopback();
        let (plain, plain_at) = loopback();
        enable_udp_gro(gro.as_fd()).unwrap();
        let data: Vec<u8> = (0..12_000u32).map(|i| (i % 251) as u8).collect();
        let mut buf = vec![0; 65536];

        send_segmented(&sender, gro_at, &data, 1200);
        let read = recv_gro(gro.as_fd(), &mut buf).unwrap();
        assert_eq!(
            read,
            GroRead {
                len: 12_000,
                from: Some(from),
                segment: Some(1200),
                truncated: false
            }
        );
        assert_eq!(&buf[..read.len], &data[..]);

        send_segmented(&sender, plain_at, &data, 1200);
        for chunk in data.chunks(1200) {
            let read = recv_gro(plain.as_fd(), &mut buf).unwrap();
            assert_eq!(
                (read.len, read.segment, read.from),
                (1200, None, Some(from))
            );
            assert_eq!(&buf[..read.len], chunk);
        }

        // A buffer too small says so.
        sender.send_to(&data[..100], plain_at).unwrap();
        let read = recv_gro(plain.as_fd(), &mut buf[..10]).unwrap();
        assert!(read.truncated);
    }
}
