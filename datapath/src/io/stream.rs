//! VM ports without root: a unix stream socket that QEMU connects to with
//! `-netdev stream,server=off,addr.type=unix,addr.path=PATH` (and passt speaks): each frame is
//! preceded by its length as 4 bytes, big-endian, with no virtio-net header.
//!
//! QEMU's older `-netdev socket,connect=127.0.0.1:PORT` speaks the same framing over TCP:
//! a port may listen on a loopback TCP address instead (`tcp:127.0.0.1:PORT`).
//!
//! The socket is the port: it exists as long as the port does, and the VM behind it may
//! come, go and come back (each new connection replaces the old one). A VM that reads slowly
//! never blocks the engine: what the socket does not take at once waits in a bounded queue,
//! and beyond that frames are dropped and counted.

use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Where a stream port listens: a unix socket path, or `tcp:ADDR:PORT` on loopback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl StreamAddr {
    /// `tcp:127.0.0.1:5555` (loopback only: anyone who can connect is a VM on the switch), or
    /// a path.
    pub fn parse(spec: &str) -> io::Result<StreamAddr> {
        match spec.strip_prefix("tcp:") {
            Some(addr) => {
                let addr: SocketAddr = addr.parse().map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("{spec}: {e}"))
                })?;
                if !addr.ip().is_loopback() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "{spec}: only a loopback address (anyone reaching it joins the switch)"
                        ),
                    ));
                }
                Ok(StreamAddr::Tcp(addr))
            }
            None => Ok(StreamAddr::Unix(PathBuf::from(spec))),
        }
    }
}

impl std::fmt::Display for StreamAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamAddr::Unix(path) => write!(f, "{}", path.display()),
            StreamAddr::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

#[derive(Debug)]
pub(crate) enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

#[derive(Debug)]
pub(crate) enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Listener {
    fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Conn::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
        }
    }

    pub(crate) fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.register(registry, token, Interest::READABLE),
            Listener::Tcp(l) => l.register(registry, token, Interest::READABLE),
        }
    }

    pub(crate) fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.deregister(registry),
            Listener::Tcp(l) => l.deregister(registry),
        }
    }
}

impl Conn {
    pub(crate) fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let interest = Interest::READABLE | Interest::WRITABLE;
        match self {
            Conn::Unix(s) => s.register(registry, token, interest),
            Conn::Tcp(s) => s.register(registry, token, interest),
        }
    }

    pub(crate) fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.deregister(registry),
            Conn::Tcp(s) => s.deregister(registry),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write_vectored(bufs),
            Conn::Tcp(s) => s.write_vectored(bufs),
        }
    }
}

/// Bytes waiting for a slow VM before frames are dropped.
const TX_QUEUE: usize = 1 << 20;
/// Largest frame length accepted from the VM (a 64 KiB frame and change); a longer prefix
/// means the stream is out of step, and the connection is closed.
const MAX_FRAME: usize = 65535 + 18;
const PREFIX: usize = 4;

#[derive(Debug)]
pub struct StreamPort {
    pub(crate) listener: Listener,
    addr: StreamAddr,
    pub(crate) conn: Option<Conn>,
    rx: Vec<u8>,
    rx_len: usize,
    tx: Vec<u8>,
    tx_sent: usize,
    pub connections: u64,
    pub tx_dropped: u64,
    pub rx_bad_length: u64,
}

/// Why a read stopped without a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Nothing more to read now.
    Drained,
    /// The VM went away (or broke the framing): the connection was closed.
    Closed,
}

impl StreamPort {
    /// Listens on `addr` (a stale unix socket file is replaced).
    pub fn bind(addr: &StreamAddr) -> io::Result<StreamPort> {
        let listener = match addr {
            StreamAddr::Unix(path) => {
                Listener::Unix(UnixListener::from_std(super::bind_unix(path, None)?))
            }
            StreamAddr::Tcp(sockaddr) => Listener::Tcp(TcpListener::bind(*sockaddr)?),
        };
        Ok(StreamPort {
            listener,
            addr: addr.clone(),
            conn: None,
            rx: vec![0; PREFIX + MAX_FRAME],
            rx_len: 0,
            tx: Vec::new(),
            tx_sent: 0,
            connections: 0,
            tx_dropped: 0,
            rx_bad_length: 0,
        })
    }

    pub fn addr(&self) -> &StreamAddr {
        &self.addr
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Takes the newest waiting connection, if any, in place of the current one; returns
    /// whether it did (the caller registers the new stream).
    pub fn accept(&mut self) -> io::Result<bool> {
        let mut newest = None;
        loop {
            match self.listener.accept() {
                Ok(stream) => newest = Some(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let Some(stream) = newest else {
            return Ok(false);
        };
        self.close();
        self.conn = Some(stream);
        self.connections += 1;
        Ok(true)
    }

    /// Drops the connection and whatever was half read or queued for it.
    pub fn close(&mut self) {
        self.conn = None;
        self.rx_len = 0;
        self.tx.clear();
        self.tx_sent = 0;
    }

    /// The next whole frame the VM sent, copied into `out`: its length, or what stopped the
    /// read.
    pub fn read_frame(&mut self, out: &mut [u8]) -> Result<usize, ReadOutcome> {
        loop {
            if self.rx_len >= PREFIX {
                let len =
                    u32::from_be_bytes([self.rx[0], self.rx[1], self.rx[2], self.rx[3]]) as usize;
                if len > MAX_FRAME || len > out.len() {
                    self.rx_bad_length += 1;
                    self.close();
                    return Err(ReadOutcome::Closed);
                }
                if self.rx_len >= PREFIX + len {
                    out[..len].copy_from_slice(&self.rx[PREFIX..PREFIX + len]);
                    self.rx.copy_within(PREFIX + len..self.rx_len, 0);
                    self.rx_len -= PREFIX + len;
                    return Ok(len);
                }
            }
            let Some(conn) = &mut self.conn else {
                return Err(ReadOutcome::Closed);
            };
            match conn.read(&mut self.rx[self.rx_len..]) {
                Ok(0) => {
                    self.close();
                    return Err(ReadOutcome::Closed);
                }
                Ok(n) => self.rx_len += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(ReadOutcome::Drained);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close();
                    return Err(ReadOutcome::Closed);
                }
            }
        }
    }

    /// Sends one frame with its length prefix, queueing what the socket does not take now.
    /// An error means the frame was dropped (no VM connected, or the queue is full).
    pub fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let Some(conn) = &mut self.conn else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no VM connected",
            ));
        };
        let prefix = (frame.len() as u32).to_be_bytes();
        let mut written = 0;
        if self.tx.len() == self.tx_sent {
            self.tx.clear();
            self.tx_sent = 0;
            match conn.write_vectored(&[IoSlice::new(&prefix), IoSlice::new(frame)]) {
                Ok(n) => written = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.close();
                    return Err(e);
                }
            }
        }
        let total = PREFIX + frame.len();
        if written == total {
            return Ok(());
        }
        if self.tx.len() - self.tx_sent + total - written > TX_QUEUE {
            // A part of this frame may be out already: the rest must follow, or the stream
            // loses its framing. Only a frame not yet started is dropped.
            if written == 0 {
                self.tx_dropped += 1;
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "VM queue full"));
            }
        }
        let rest = written;
        if rest < PREFIX {
            self.tx.extend_from_slice(&prefix[rest..]);
            self.tx.extend_from_slice(frame);
        } else {
            self.tx.extend_from_slice(&frame[rest - PREFIX..]);
        }
        Ok(())
    }

    /// Writes what is queued, as far as the socket takes it (on writable readiness).
    pub fn flush(&mut self) {
        while self.tx_sent < self.tx.len() {
            let Some(conn) = &mut self.conn else {
                return;
            };
            match conn.write(&self.tx[self.tx_sent..]) {
                Ok(n) => self.tx_sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close();
                    return;
                }
            }
        }
        self.tx.clear();
        self.tx_sent = 0;
    }

    pub fn has_queued(&self) -> bool {
        self.tx_sent < self.tx.len()
    }
}

impl Drop for StreamPort {
    fn drop(&mut self) {
        if let StreamAddr::Unix(path) = &self.addr {
            let _ = std::fs::remove_file(path);
        }
    }
}
