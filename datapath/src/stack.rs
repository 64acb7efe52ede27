//! The glue between the engine and smoltcp, shared by the gateway's userspace TCP endpoints
//! (DNS over TCP, socket NAT): smoltcp is fed whole IP packets and hands IP packets back, so
//! its device is two queues, and its clock is the engine's time counted from an epoch.
//!
//! Packets the stack emits are allocated with `headroom` bytes in front, so the engine can
//! write the Ethernet header in place instead of copying the packet into a new frame.

use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A device whose wire is two queues of IPv4 packets.
#[derive(Debug, Default)]
pub struct Queues {
    pub rx: VecDeque<Vec<u8>>,
    /// Emitted packets, each after `headroom` zero bytes.
    pub tx: VecDeque<Vec<u8>>,
    pub mtu: usize,
    pub headroom: usize,
    /// Buffers of sent packets, given back for the next ones: a 64 KiB segment in a fresh
    /// allocation costs page faults that showed as a fifth of the socket NAT's time.
    pub spare: Vec<Vec<u8>>,
    /// Buffers of received packets the stack has taken in, for the next ones.
    pub rx_spare: Vec<Vec<u8>>,
    /// Whether the stack verifies and computes TCP checksums. The socket NAT does both itself:
    /// a guest's offloaded segment carries only a partial sum, and its own segments leave
    /// with a partial sum for offload.
    pub verify_tcp: bool,
}

impl Queues {
    pub fn new(mtu: usize, headroom: usize, verify_tcp: bool) -> Queues {
        Queues {
            mtu,
            headroom,
            verify_tcp,
            ..Queues::default()
        }
    }
}

impl Queues {
    /// A buffer from the transmit spares holding a copy of `data` (a datagram for a host
    /// socket); it comes back through [`Queues::recycle`] once sent.
    pub fn copy_in_spare(&mut self, data: &[u8]) -> Vec<u8> {
        copied(&mut self.spare, data)
    }

    /// A buffer holding a copy of `packet`, to queue for the stack.
    pub fn copy_in(&mut self, packet: &[u8]) -> Vec<u8> {
        copied(&mut self.rx_spare, packet)
    }
}

/// A buffer from `pool` (or a new one) holding a copy of `data`.
fn copied(pool: &mut Vec<Vec<u8>>, data: &[u8]) -> Vec<u8> {
    let mut buffer = pool.pop().unwrap_or_default();
    buffer.clear();
    buffer.extend_from_slice(data);
    buffer
}

#[derive(Debug)]
pub struct RxToken<'a> {
    packet: Vec<u8>,
    spare: &'a mut Vec<Vec<u8>>,
}

impl smoltcp::phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let result = f(&self.packet);
        if self.spare.len() < MAX_SPARE {
            self.spare.push(self.packet);
        }
        result
    }
}

/// Spare packet buffers kept for reuse.
pub const MAX_SPARE: usize = 64;

impl Queues {
    /// Takes back the buffer of a packet that was sent.
    pub fn recycle(&mut self, buffer: Vec<u8>) {
        if self.spare.len() < MAX_SPARE && buffer.capacity() >= self.headroom {
            self.spare.push(buffer);
        }
    }
}

#[derive(Debug)]
pub struct TxToken<'a> {
    queue: &'a mut VecDeque<Vec<u8>>,
    spare: &'a mut Vec<Vec<u8>>,
    headroom: usize,
}

impl smoltcp::phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = self.spare.pop().unwrap_or_default();
        // Old bytes may stay: the stack writes every byte of its packet, and the engine the
        // headroom's Ethernet header. Only growth is zeroed.
        packet.resize(self.headroom + len, 0);
        let result = f(&mut packet[self.headroom..]);
        self.queue.push_back(packet);
        result
    }
}

impl Device for Queues {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        let tx = TxToken {
            queue: &mut self.tx,
            spare: &mut self.spare,
            headroom: self.headroom,
        };
        let rx = RxToken {
            packet,
            spare: &mut self.rx_spare,
        };
        Some((rx, tx))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(TxToken {
            queue: &mut self.tx,
            spare: &mut self.spare,
            headroom: self.headroom,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        if !self.verify_tcp {
            // Neither verified nor computed: the socket NAT verifies guests' segments and
            // leaves its own to checksum offload.
            caps.checksum.tcp = Checksum::None;
        }
        caps
    }
}

/// The device for one received packet handed to the stack where it lies (in the frame the
/// engine was given), so it is not copied into a queue first; what the stack sends in answer
/// joins the queues' transmit side.
#[derive(Debug)]
pub struct Borrowed<'p, 'q> {
    packet: Option<&'p [u8]>,
    queues: &'q mut Queues,
}

impl<'p, 'q> Borrowed<'p, 'q> {
    pub fn new(packet: &'p [u8], queues: &'q mut Queues) -> Self {
        Borrowed {
            packet: Some(packet),
            queues,
        }
    }
}

#[derive(Debug)]
pub struct BorrowedRx<'p>(&'p [u8]);

impl smoltcp::phy::RxToken for BorrowedRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl<'p> Device for Borrowed<'p, '_> {
    type RxToken<'a>
        = BorrowedRx<'p>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a>
    where
        Self: 'a;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.packet.take()?;
        let tx = TxToken {
            queue: &mut self.queues.tx,
            spare: &mut self.queues.spare,
            headroom: self.queues.headroom,
        };
        Some((BorrowedRx(packet), tx))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(TxToken {
            queue: &mut self.queues.tx,
            spare: &mut self.queues.spare,
            headroom: self.queues.headroom,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.queues.capabilities()
    }
}

/// The engine's clock as the stack counts it: time since `epoch`.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub epoch: Instant,
}

impl Clock {
    pub fn stack_time(&self, now: Instant) -> smoltcp::time::Instant {
        let micros = now.saturating_duration_since(self.epoch).as_micros();
        smoltcp::time::Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    pub fn engine_time(&self, at: smoltcp::time::Instant) -> Instant {
        let micros = u64::try_from(at.total_micros()).unwrap_or(0);
        self.epoch + Duration::from_micros(micros)
    }
}

/// A random seed for initial sequence numbers: different on each start (RFC 6528 asks for
/// unpredictable ones).
pub fn random_seed(salt: impl std::hash::Hash) -> u64 {
    std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), salt)
        .rotate_left(17)
}
