//! Batched reads and writes on AF_PACKET ports (the NAT uplink, a bridged NIC): one
//! `recvmmsg` reads up to [`sys::BATCH`] frames, and the frames a turn sends to the port wait
//! in a [`TxBatch`] for one `sendmmsg`. A tap has no such calls (one frame per `read` and
//! `write`), and a stream port frames its own bytes.
//!
//! What it saves is the system calls, not the kernel's work per frame: the profiles in
//! `benches/RESULTS.md` put entry and exit at a few percent of the datapath's thread on
//! short-connection loads, where frames come several to a wakeup.

use super::sys;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;

/// The largest frame (virtio-net header included) that waits in a batch: any plain frame of
/// a 1500-byte MTU with a VLAN tag. Larger ones (GSO super-frames, jumbo frames) go out at
/// once, after what waits, so the port's order holds.
pub(super) const SLOT: usize = 2048;

/// Frames waiting for one `sendmmsg` to a port, in preallocated slots.
#[derive(Debug)]
pub(super) struct TxBatch {
    slots: Box<[u8]>,
    lens: [usize; sys::BATCH],
    count: usize,
}

/// What a flush sent and failed to send.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Flushed {
    pub frames: usize,
    /// Bytes of the frames sent, their virtio-net headers left out.
    pub bytes: usize,
    pub failed: usize,
}

impl TxBatch {
    pub fn new() -> TxBatch {
        TxBatch {
            slots: vec![0u8; SLOT * sys::BATCH].into_boxed_slice(),
            lens: [0; sys::BATCH],
            count: 0,
        }
    }

    pub fn fits(len: usize) -> bool {
        len <= SLOT
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count == sys::BATCH
    }

    /// Forgets what waits.
    pub fn clear(&mut self) {
        self.count = 0;
    }

    /// Adds `frame` (which [`TxBatch::fits`]); false if the batch is full.
    pub fn push(&mut self, frame: &[u8]) -> bool {
        if self.is_full() || !Self::fits(frame.len()) {
            return false;
        }
        let at = self.count * SLOT;
        self.slots[at..at + frame.len()].copy_from_slice(frame);
        self.lens[self.count] = frame.len();
        self.count += 1;
        true
    }

    /// Sends what waits to `file` (frames with `header` bytes of virtio-net header each).
    pub fn flush(&mut self, file: &File, header: usize) -> (Flushed, Option<io::Error>) {
        let mut frames: [&[u8]; sys::BATCH] = [&[]; sys::BATCH];
        for (i, frame) in frames.iter_mut().enumerate().take(self.count) {
            *frame = &self.slots[i * SLOT..i * SLOT + self.lens[i]];
        }
        let mut done = Flushed::default();
        let mut error = None;
        let mut next = 0;
        while next < self.count {
            match sys::send_batch(file.as_fd(), &frames[next..self.count]) {
                Ok(0) => break,
                Ok(sent) => {
                    for frame in &frames[next..next + sent] {
                        done.bytes += frame.len().saturating_sub(header);
                    }
                    done.frames += sent;
                    next += sent;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The socket's buffer is full: the rest fails alike (counted below).
                    error = Some(e);
                    break;
                }
                Err(e) => {
                    // The first frame left failed: count it and go on with the rest, as
                    // one write per frame would.
                    error = Some(e);
                    done.failed += 1;
                    next += 1;
                }
            }
        }
        done.failed += self.count - next;
        self.count = 0;
        (done, error)
    }
}

/// Buffers for one [`sys::recv_batch`], whole frames each.
#[derive(Debug)]
pub(super) struct RxBatch {
    pub bufs: Vec<Box<[u8]>>,
    pub got: [sys::Received; sys::BATCH],
}

impl RxBatch {
    pub fn new(buf_len: usize) -> RxBatch {
        RxBatch {
            bufs: (0..sys::BATCH)
                .map(|_| vec![0u8; buf_len].into_boxed_slice())
                .collect(),
            got: [sys::Received::default(); sys::BATCH],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn a_batch_goes_out_as_its_frames_in_order_and_comes_back_in_one_read() {
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        let file = File::from(std::os::fd::OwnedFd::from(ours));
        let mut batch = TxBatch::new();
        for i in 0..5u8 {
            batch.push(&vec![i; 100 + usize::from(i)]);
        }
        assert!(!batch.is_full());
        let (flushed, error) = batch.flush(&file, 12);
        assert!(error.is_none());
        assert_eq!(
            flushed,
            Flushed {
                frames: 5,
                bytes: 510 - 60,
                failed: 0
            }
        );
        assert!(batch.is_empty());

        let mut rx = RxBatch::new(4096);
        let theirs = File::from(std::os::fd::OwnedFd::from(theirs));
        let got = sys::recv_batch(theirs.as_fd(), &mut rx.bufs, &mut rx.got).unwrap();
        assert_eq!(got, 5, "one call");
        for i in 0..5 {
            assert_eq!(rx.got[i].len, 100 + i);
            assert!(!rx.got[i].truncated);
            assert!(
                rx.bufs[i][..rx.got[i].len]
                    .iter()
                    .all(|&b| usize::from(b) == i)
            );
        }
        let empty = sys::recv_batch(theirs.as_fd(), &mut rx.bufs, &mut rx.got);
        assert_eq!(empty.unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_frame_longer_than_its_buffer_is_marked_truncated() {
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        ours.send(&[1u8; 5000]).unwrap();
        ours.send(&[2u8; 300]).unwrap();
        let mut rx = RxBatch::new(4096);
        let got = sys::recv_batch(theirs.as_fd(), &mut rx.bufs, &mut rx.got).unwrap();
        assert_eq!(got, 2);
        assert!(rx.got[0].truncated, "{:?}", rx.got[0]);
        assert_eq!(
            rx.got[1],
            sys::Received {
                len: 300,
                truncated: false
            }
        );
    }

    #[test]
    fn a_full_batch_and_a_refused_one_are_counted() {
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        let file = File::from(std::os::fd::OwnedFd::from(ours));
        let mut batch = TxBatch::new();
        while !batch.is_full() {
            batch.push(&[7u8; 64]);
        }
        drop(theirs);
        let (flushed, error) = batch.flush(&file, 0);
        assert!(error.is_some(), "the peer is gone");
        assert_eq!((flushed.frames, flushed.failed), (0, sys::BATCH));
        assert!(batch.is_empty());
    }
}
