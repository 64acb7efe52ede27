//! The host sockets behind socket NAT: opened, fed and closed as [`SocketNat`] asks, in the
//! network namespace of the thread that runs the datapath (the host's, for a rootless run).
//!
//! Sockets are registered edge-triggered; a socket's readiness is remembered until an
//! operation on it would block, so bytes move only when both the host socket and the guest's
//! connection can take them.
//!
//! UDP sockets ask for `UDP_GRO`: datagrams the kernel coalesced (a `UDP_SEGMENT` send from
//! one sender, or a train GRO merged) are read in one call and go to the guest as one UDP
//! super-frame ([`SocketNat::handle_datagrams`]). A kernel without it (before 5.0) reads them
//! one by one, as before.

use super::sys;
use crate::socket_nat::{Action, Datagrams, FlowId, HostSocket, SocketNat};
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Interest, Registry, Token};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::time::Instant;

/// Tokens from here on are socket NAT's host sockets (flow index added).
pub const EGRESS_BASE: usize = 1 << 24;
/// Tokens from here on are the listening sockets of port forwards (forward index added).
pub const FORWARD_BASE: usize = 1 << 23;
/// Datagrams read from one socket per turn.
const DATAGRAM_BUDGET: usize = 64;
/// Rounds of actions and byte moves per turn, so a busy flow cannot keep the loop.
const ROUNDS: usize = 4;

#[derive(Debug)]
enum HostConn {
    Tcp {
        stream: TcpStream,
        connected: bool,
        readable: bool,
        writable: bool,
    },
    Datagram(UdpSocket),
}

#[derive(Debug)]
struct Slot {
    id: FlowId,
    conn: HostConn,
}

/// A host port forwarded to a guest (`<sy:forward>`, `switchyard port-forward`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Forward {
    pub proto: &'static str,
    pub host: SocketAddr,
    pub guest: SocketAddrV4,
}

#[derive(Debug)]
enum ListenSocket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

#[derive(Debug)]
struct Listener {
    forward: Forward,
    socket: ListenSocket,
}

/// The host side of socket NAT.
#[derive(Debug, Default)]
pub struct Egress {
    slots: Vec<Option<Slot>>,
    /// Flow indices whose sockets reported readiness this turn.
    events: Vec<usize>,
    listeners: Vec<Option<Listener>>,
    accepts: Vec<usize>,
    /// Buffer for one read: a datagram, or several the kernel coalesced (up to 64 KiB).
    datagram: Vec<u8>,
}

fn token(index: u32) -> Token {
    Token(EGRESS_BASE + index as usize)
}

/// Binds a UDP socket to `preferred` when it lies in `range` and is free, else to the first
/// free port of `range` from a start that differs per preferred port. It reads coalesced
/// datagrams where the kernel can ([`with_gro`]).
fn bind_udp(preferred: u16, (first, last): (u16, u16)) -> io::Result<UdpSocket> {
    let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    if (first..=last).contains(&preferred)
        && let Ok(socket) = UdpSocket::bind(any(preferred))
    {
        return Ok(with_gro(socket));
    }
    let span = u32::from(last - first) + 1;
    let start = u32::from(preferred).wrapping_mul(2_654_435_761) % span;
    let mut error = io::Error::from(io::ErrorKind::AddrInUse);
    for step in 0..span.min(256) {
        let port = first + ((start + step) % span) as u16;
        match UdpSocket::bind(any(port)) {
            Ok(socket) => return Ok(with_gro(socket)),
            Err(e) => error = e,
        }
    }
    Err(error)
}

/// `socket` with `UDP_GRO` asked for; a kernel that refuses it (before 5.0) leaves the socket
/// reading one datagram per call, which works the same.
fn with_gro(socket: UdpSocket) -> UdpSocket {
    let _ = sys::enable_udp_gro(socket.as_fd());
    socket
}

/// Reads what is waiting on the datagram socket `socket` into `buf`: one datagram, or a
/// coalesced train, from an IPv4 sender; `None` for a read that is not one (no IPv4 sender,
/// or cut short: with a 64 KiB buffer, nothing IPv4 carries is).
fn recv_datagrams(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<Option<(usize, SocketAddrV4, Option<usize>)>> {
    let read = sys::recv_gro(socket.as_fd(), buf)?;
    Ok(match read.from {
        Some(from) if !read.truncated => Some((read.len, from, read.segment.map(usize::from))),
        _ => None,
    })
}

fn v4(addr: io::Result<SocketAddr>) -> SocketAddrV4 {
    match addr {
        Ok(SocketAddr::V4(a)) => a,
        _ => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
    }
}

impl Egress {
    /// Listens on `forward.host` (TCP or UDP) for connections or datagrams to hand to
    /// `forward.guest`.
    pub fn add_forward(&mut self, registry: &Registry, forward: Forward) -> io::Result<()> {
        if self
            .forwards()
            .any(|f| f.host == forward.host && f.proto == forward.proto)
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} {} is already forwarded", forward.proto, forward.host),
            ));
        }
        let index = self
            .listeners
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.listeners.len());
        if index >= EGRESS_BASE - FORWARD_BASE {
            return Err(io::Error::other("too many port forwards"));
        }
        let token = Token(FORWARD_BASE + index);
        let socket = match forward.proto {
            "tcp" => {
                let mut listener = TcpListener::bind(forward.host)?;
                registry.register(&mut listener, token, Interest::READABLE)?;
                ListenSocket::Tcp(listener)
            }
            "udp" => {
                let mut socket = with_gro(UdpSocket::bind(forward.host)?);
                registry.register(&mut socket, token, Interest::READABLE)?;
                ListenSocket::Udp(socket)
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("cannot forward {other}: tcp or udp"),
                ));
            }
        };
        let slot = Some(Listener { forward, socket });
        match self.listeners.get_mut(index) {
            Some(s) => *s = slot,
            None => self.listeners.push(slot),
        }
        Ok(())
    }

    /// Stops forwarding `proto` `host`; false when it was not forwarded.
    pub fn remove_forward(&mut self, registry: &Registry, proto: &str, host: SocketAddr) -> bool {
        for slot in &mut self.listeners {
            if slot
                .as_ref()
                .is_some_and(|l| l.forward.host == host && l.forward.proto == proto)
                && let Some(mut l) = slot.take()
            {
                let _ = match &mut l.socket {
                    ListenSocket::Tcp(listener) => registry.deregister(listener),
                    ListenSocket::Udp(socket) => registry.deregister(socket),
                };
                return true;
            }
        }
        false
    }

    pub fn forwards(&self) -> impl Iterator<Item = &Forward> {
        self.listeners.iter().flatten().map(|l| &l.forward)
    }

    /// Whether sockets are waiting for another turn (a budget ran out before they drained).
    pub fn has_pending(&self) -> bool {
        !self.events.is_empty() || !self.accepts.is_empty()
    }

    /// A readiness event for `token` (true when it was one of ours).
    pub fn handle_event(&mut self, event: &mio::event::Event) -> bool {
        let Token(t) = event.token();
        if t >= EGRESS_BASE {
            let index = t - EGRESS_BASE;
            if let Some(Some(slot)) = self.slots.get_mut(index) {
                if let HostConn::Tcp {
                    readable, writable, ..
                } = &mut slot.conn
                {
                    *readable |= event.is_readable() || event.is_read_closed();
                    *writable |= event.is_writable() || event.is_error();
                }
                self.events.push(index);
            }
            true
        } else if t >= FORWARD_BASE {
            self.accepts.push(t - FORWARD_BASE);
            true
        } else {
            false
        }
    }

    /// Carries out socket NAT's actions, serves the sockets that were ready and moves bytes
    /// for the flows that can take them.
    pub fn serve(&mut self, now: Instant, nat: &mut SocketNat, registry: &Registry) {
        self.accept(now, nat, registry);
        nat.poll_stack(now);
        for _ in 0..ROUNDS {
            let mut busy = false;
            while let Some(action) = nat.poll_action() {
                busy = true;
                self.act(now, nat, registry, action);
            }
            for index in std::mem::take(&mut self.events) {
                busy = true;
                self.serve_socket(now, nat, index);
            }
            while let Some(id) = nat.poll_ready() {
                busy = true;
                self.move_bytes(now, nat, id);
            }
            nat.poll_stack(now);
            if !busy {
                break;
            }
        }
    }

    fn accept(&mut self, now: Instant, nat: &mut SocketNat, registry: &Registry) {
        for index in std::mem::take(&mut self.accepts) {
            let Some(Some(listener)) = self.listeners.get(index) else {
                continue;
            };
            let guest = listener.forward.guest;
            let listener = match &listener.socket {
                ListenSocket::Tcp(listener) => listener,
                ListenSocket::Udp(socket) => {
                    if self.datagram.is_empty() {
                        self.datagram = vec![0; 65536];
                    }
                    for _ in 0..DATAGRAM_BUDGET {
                        match recv_datagrams(socket, &mut self.datagram) {
                            Ok(Some((n, from, segment))) => {
                                let data = &self.datagram[..n];
                                let listener = (index as u32, from);
                                nat.handle_forwarded_datagrams(now, listener, guest, data, segment);
                            }
                            Ok(None) => {}
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                    continue;
                }
            };
            let mut accepted = Vec::new();
            loop {
                match listener.accept() {
                    Ok((stream, _)) => accepted.push(stream),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            for stream in accepted {
                // A refused forward (table full) closes the host connection at once.
                let Ok(id) = nat.open_forwarded_tcp(now, guest) else {
                    continue;
                };
                let conn = HostConn::Tcp {
                    stream,
                    connected: true,
                    readable: false,
                    writable: false,
                };
                self.insert(registry, id, conn);
            }
        }
    }

    fn insert(&mut self, registry: &Registry, id: FlowId, mut conn: HostConn) -> bool {
        let interest = Interest::READABLE | Interest::WRITABLE;
        let registered = match &mut conn {
            HostConn::Tcp { stream, .. } => registry.register(stream, token(id.index), interest),
            HostConn::Datagram(socket) => {
                registry.register(socket, token(id.index), Interest::READABLE)
            }
        };
        if registered.is_err() {
            return false;
        }
        let index = id.index as usize;
        if self.slots.len() <= index {
            self.slots.resize_with(index + 1, || None);
        }
        if let Some(mut old) = self.slots[index].replace(Slot { id, conn }) {
            deregister(registry, &mut old.conn);
        }
        true
    }

    fn act(&mut self, now: Instant, nat: &mut SocketNat, registry: &Registry, action: Action) {
        match action {
            Action::Open(id, HostSocket::Tcp(to)) => match TcpStream::connect(SocketAddr::V4(to)) {
                Ok(stream) => {
                    let conn = HostConn::Tcp {
                        stream,
                        connected: false,
                        readable: false,
                        writable: false,
                    };
                    if !self.insert(registry, id, conn) {
                        nat.handle_opened(now, id, Err(io::ErrorKind::Other));
                    }
                }
                Err(e) => nat.handle_opened(now, id, Err(e.kind())),
            },
            Action::Open(id, HostSocket::Udp { preferred, range }) => {
                let socket = bind_udp(preferred, range);
                self.open_datagram(now, nat, registry, id, socket);
            }
            Action::Open(id, HostSocket::Ping) => {
                let socket = sys::open_ping_socket()
                    .map(|fd| UdpSocket::from_std(std::net::UdpSocket::from(fd)));
                self.open_datagram(now, nat, registry, id, socket);
            }
            Action::SendTo(id, to, datagrams) => {
                if let Some(Slot {
                    conn: HostConn::Datagram(socket),
                    ..
                }) = self.slot(id)
                {
                    send_datagrams(socket, to, &datagrams);
                }
                nat.recycle(datagrams.data);
            }
            Action::SendFromForward(listener, to, datagrams) => {
                if let Some(Some(Listener {
                    socket: ListenSocket::Udp(socket),
                    ..
                })) = self.listeners.get(listener as usize)
                {
                    send_datagrams(socket, to, &datagrams);
                }
                nat.recycle(datagrams.data);
            }
            Action::ShutdownWrite(id) => {
                if let Some(Slot {
                    conn: HostConn::Tcp { stream, .. },
                    ..
                }) = self.slot(id)
                {
                    let _ = stream.shutdown(Shutdown::Write);
                }
            }
            Action::Close(id) => {
                if self.slot(id).is_some()
                    && let Some(mut slot) = self.slots[id.index as usize].take()
                {
                    deregister(registry, &mut slot.conn);
                }
            }
        }
    }

    /// Keeps a UDP or ping socket for flow `id` and tells socket NAT how opening it went.
    fn open_datagram(
        &mut self,
        now: Instant,
        nat: &mut SocketNat,
        registry: &Registry,
        id: FlowId,
        socket: io::Result<UdpSocket>,
    ) {
        let result = match socket {
            Ok(socket) => {
                let local = v4(socket.local_addr());
                if self.insert(registry, id, HostConn::Datagram(socket)) {
                    Ok(local)
                } else {
                    Err(io::ErrorKind::Other)
                }
            }
            Err(e) => Err(e.kind()),
        };
        nat.handle_opened(now, id, result);
    }

    fn slot(&mut self, id: FlowId) -> Option<&mut Slot> {
        self.slots
            .get_mut(id.index as usize)?
            .as_mut()
            .filter(|s| s.id == id)
    }

    fn serve_socket(&mut self, now: Instant, nat: &mut SocketNat, index: usize) {
        let Some(Some(slot)) = self.slots.get_mut(index) else {
            return;
        };
        let id = slot.id;
        match &mut slot.conn {
            HostConn::Tcp {
                stream, connected, ..
            } => {
                if !*connected {
                    match stream.take_error() {
                        Ok(Some(e)) | Err(e) => {
                            nat.handle_opened(now, id, Err(e.kind()));
                            return;
                        }
                        Ok(None) => {}
                    }
                    match stream.peer_addr() {
                        Ok(_) => {
                            *connected = true;
                            nat.handle_opened(now, id, Ok(v4(stream.local_addr())));
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                        Err(e) => {
                            nat.handle_opened(now, id, Err(e.kind()));
                            return;
                        }
                    }
                }
                self.move_bytes(now, nat, id);
            }
            HostConn::Datagram(socket) => {
                if self.datagram.is_empty() {
                    self.datagram = vec![0; 65536];
                }
                for _ in 0..DATAGRAM_BUDGET {
                    match recv_datagrams(socket, &mut self.datagram) {
                        Ok(Some((n, from, segment))) => {
                            nat.handle_datagrams(now, id, from, &self.datagram[..n], segment);
                        }
                        Ok(None) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        // An ICMP error for an earlier datagram: nothing to read.
                        Err(_) => {}
                    }
                }
                // Not drained: another turn without a new edge.
                self.events.push(index);
            }
        }
    }

    /// Moves bytes of a connected TCP flow both ways, as far as both sides allow.
    fn move_bytes(&mut self, now: Instant, nat: &mut SocketNat, id: FlowId) {
        let Some(Slot {
            conn:
                HostConn::Tcp {
                    stream,
                    connected: true,
                    readable,
                    writable,
                },
            ..
        }) = self.slot(id)
        else {
            return;
        };
        if *writable {
            let moved = nat.to_host(id, |data| stream.write(data));
            *writable = !moved.blocked;
        }
        if *readable {
            let moved = nat.from_host(now, id, |room| stream.read(room));
            *readable = !moved.blocked;
        }
    }
}

/// Sends each of `datagrams` to `to`, one `sendto` apiece: a guest's UDP super-frame leaves
/// as the datagrams it stands for. (One `sendmsg` with a `UDP_SEGMENT` control message would
/// save system calls, but the kernel refuses it outright (`EINVAL`) where the segment does not
/// fit the route's MTU or there are more than its 64 or 128 segments, and a guest may ask for
/// either; apart, each datagram is fragmented or refused on its own, as the guest's were.)
///
/// A lost datagram is the guest's protocol's to recover, as on any network; once the socket's
/// buffer is full the rest would be lost too, so they are not tried.
fn send_datagrams(socket: &UdpSocket, to: SocketAddrV4, datagrams: &Datagrams) {
    for datagram in datagrams.iter() {
        if let Err(e) = socket.send_to(datagram, SocketAddr::V4(to))
            && e.kind() == io::ErrorKind::WouldBlock
        {
            break;
        }
    }
}

fn deregister(registry: &Registry, conn: &mut HostConn) {
    let _ = match conn {
        HostConn::Tcp { stream, .. } => registry.deregister(stream),
        HostConn::Datagram(socket) => registry.deregister(socket),
    };
}
