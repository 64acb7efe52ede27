//! VM ports without root: a unix stream socket that QEMU connects to with
//! `-netdev stream,server=off,addr.type=unix,addr.path=PATH` (and passt speaks): each frame is
//! preceded by its length as 4 bytes, big-endian, with no virtio-net header.
//!
//! The socket file is the port: it exists as long as the port does, and the VM behind it may
//! come, go and come back (each new connection replaces the old one). A VM that reads slowly
//! never blocks the engine: what the socket does not take at once waits in a bounded queue,
//! and beyond that frames are dropped and counted.

use mio::net::{UnixListener, UnixStream};
use std::io::{self, IoSlice, Read, Write};
use std::path::{Path, PathBuf};

/// Bytes waiting for a slow VM before frames are dropped.
const TX_QUEUE: usize = 1 << 20;
/// Largest frame length accepted from the VM (a 64 KiB frame and change); a longer prefix
/// means the stream is out of step, and the connection is closed.
const MAX_FRAME: usize = 65535 + 18;
const PREFIX: usize = 4;

#[derive(Debug)]
pub struct StreamPort {
    pub(crate) listener: UnixListener,
    path: PathBuf,
    pub(crate) conn: Option<UnixStream>,
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
    /// Listens on `path` (a stale socket file is replaced).
    pub fn bind(path: &Path) -> io::Result<StreamPort> {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{}: something already listens there", path.display()),
            ));
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(StreamPort {
            listener: UnixListener::bind(path)?,
            path: path.to_path_buf(),
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

    pub fn path(&self) -> &Path {
        &self.path
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
                Ok((stream, _)) => newest = Some(stream),
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
        let _ = std::fs::remove_file(&self.path);
    }
}
