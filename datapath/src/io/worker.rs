//! Fast-path workers: the second and later queues of multi-queue taps.
//!
//! With `--workers N`, every tap the engine creates has N queues, and the kernel spreads the
//! frames a guest sends over them by flow (`tun_automq_select_queue`; a flow's replies follow
//! the queue its frames were last written to). Queue 0 of every tap is the engine's thread,
//! as with one worker. Worker k (1 ≤ k < N) owns queue k of every tap, on its own thread with
//! its own `Poll`. It switches a guest's unicast frame to another tap when the forwarding
//! database's [`Mirror`] knows both of its addresses, writing it to queue k of the egress
//! tap; with packet NAT, it translates the data packets of the established connections the
//! engine publishes ([`crate::nat::mirror`]), on its own socket of the uplink; with socket
//! NAT, it runs a socket NAT of its own for the TCP connections that open on its queues
//! ([`super::shard`]). Everything else — the gateway's services, new packet NAT connections,
//! broadcast, ARP, unknown or moved addresses, VLAN tags, ports under clean-traffic, frames
//! while a capture or trace runs — is handed to the engine's thread through a bounded
//! channel of recycled buffers and handled there exactly as if it had been read from queue 0.
//!
//! So the engine's state keeps its one owner, and what a worker shares with it is read-mostly:
//! the mirrors (written by the engine) and counters the worker alone writes (per-port
//! tallies, folded into the engine's counters by its thread). Switching and packet NAT's
//! translation allocate nothing and take no lock; the socket NAT's connections are the
//! worker's own, as they would be the engine's, and it publishes their counts under a lock
//! once a turn. The design is in `benches/WORKERS.md`.

use super::shard::SocketShard;
use super::{BUF_LEN, Placement, RX_BUDGET, ReadyQueue, batch, sys};
use crate::nat::fast::NatFastPath;
use crate::port::PortId;
use crate::socket_nat::Peer;
use crate::switch::Mirror;
use crate::wire::ethernet::{self, EthernetFrame};
use crate::wire::{EtherType, MacAddr, VnetHdr, vnet};
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

const WAKER: Token = Token(usize::MAX);
/// Buffers a worker may have handed over and not yet got back.
const HANDOVER_BUFFERS: usize = 128;
/// Buffers kept for frames the engine must handle: copies for a capture take none of them.
const CAPTURE_RESERVE: usize = 32;

/// What the engine's thread tells a worker.
#[derive(Debug)]
pub(crate) enum Command {
    /// This worker's queue of a tap port, opened under the id's generation `generation`
    /// ([`Mirror::generation`]).
    AddPort {
        id: PortId,
        generation: u32,
        queue: File,
    },
    RemovePort(PortId),
    /// This worker's AF_PACKET socket on packet NAT's uplink (in the uplink's fanout group),
    /// and what it needs to translate established connections itself.
    AddUplink {
        generation: u32,
        socket: File,
        nat: NatFastPath,
    },
    /// A socket NAT of the worker's own, for the TCP connections its queues bring
    /// ([`super::shard`]).
    AddSockets(Box<SocketShard>),
}

/// Why a frame is handed to the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// To be handled as if read from queue 0.
    Handle,
    /// For the captures and the trace only: a copy of a frame the worker's socket NAT took
    /// from the port.
    Taken,
    /// For the captures only: a copy of a frame the worker's socket NAT sent to the port.
    Sent,
}

/// A frame a worker read and the engine must handle: `buf[..len]`, virtio-net header first.
#[derive(Debug)]
pub(crate) struct Handed {
    pub purpose: Purpose,
    pub port: PortId,
    /// The port's generation when the frame was read: a frame of a port since removed (and
    /// its id perhaps given to another) is not handled as the new port's.
    pub generation: u32,
    pub len: usize,
    pub buf: Vec<u8>,
}

/// What a worker does with a frame it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// Switched as it is to this port.
    Forward(PortId),
    /// NAT-translated in place, for this port.
    Translate(PortId),
    /// For another host on the uplink's LAN: dropped, as the engine would.
    NotForUs,
    /// For beyond the subnet, through the worker's socket NAT.
    Sockets,
    HandOver,
}

/// A copy of a frame for the engine: why, and for whom.
#[derive(Debug, Clone, Copy)]
struct EngineCopy {
    purpose: Purpose,
    captured: bool,
    traced: bool,
}

/// One port's counts on one worker, written by that worker only.
#[derive(Debug, Default)]
struct Tally {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    forwarded: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    tx_errors: AtomicU64,
    handed_over: AtomicU64,
    handover_full: AtomicU64,
    /// Packets NAT-translated by the worker, counted on the port they came in on.
    translated: AtomicU64,
    /// Frames on the uplink for another host's MAC (it is promiscuous), dropped.
    not_for_us: AtomicU64,
    /// Frames longer than the read buffer, dropped.
    truncated: AtomicU64,
    /// Copies for a capture that found the hand-over full: missing from the capture.
    capture_missed: AtomicU64,
    /// Copies for a trace that found it full: perhaps missing from the trace (whose filter
    /// the engine applies, so some would not have matched).
    trace_missed: AtomicU64,
}

/// A snapshot of a [`Tally`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub forwarded: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
    pub handed_over: u64,
    pub handover_full: u64,
    pub translated: u64,
    pub not_for_us: u64,
    pub truncated: u64,
    pub capture_missed: u64,
    pub trace_missed: u64,
}

impl Counts {
    /// What happened since `before`.
    pub fn since(&self, before: &Counts) -> Counts {
        Counts {
            rx_packets: self.rx_packets - before.rx_packets,
            rx_bytes: self.rx_bytes - before.rx_bytes,
            forwarded: self.forwarded - before.forwarded,
            tx_packets: self.tx_packets - before.tx_packets,
            tx_bytes: self.tx_bytes - before.tx_bytes,
            tx_errors: self.tx_errors - before.tx_errors,
            handed_over: self.handed_over - before.handed_over,
            handover_full: self.handover_full - before.handover_full,
            translated: self.translated - before.translated,
            not_for_us: self.not_for_us - before.not_for_us,
            truncated: self.truncated - before.truncated,
            capture_missed: self.capture_missed - before.capture_missed,
            trace_missed: self.trace_missed - before.trace_missed,
        }
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    // One writer: a load and a store, not a locked read-modify-write.
    counter.store(counter.load(Ordering::Relaxed) + by, Ordering::Relaxed);
}

impl Tally {
    fn counts(&self) -> Counts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counts {
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            forwarded: get(&self.forwarded),
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            tx_errors: get(&self.tx_errors),
            handed_over: get(&self.handed_over),
            handover_full: get(&self.handover_full),
            translated: get(&self.translated),
            not_for_us: get(&self.not_for_us),
            truncated: get(&self.truncated),
            capture_missed: get(&self.capture_missed),
            trace_missed: get(&self.trace_missed),
        }
    }
}

/// The engine's side of one worker.
#[derive(Debug)]
pub(crate) struct WorkerHandle {
    queue: usize,
    commands: Sender<Command>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    pub handed: Receiver<Handed>,
    pub free: Sender<Vec<u8>>,
    tallies: Arc<[Tally]>,
    /// The tallies as last folded into the engine's counters.
    folded: Vec<Counts>,
    /// The worker, until its thread is started ([`WorkerHandle::start`]).
    pending: Option<Worker>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// A worker for queue `queue`, whose thread starts later (on the datapath thread, so it
    /// inherits the thread's seccomp filter and namespace).
    pub fn new(
        queue: usize,
        mirror: Arc<Mirror>,
        engine_waker: Arc<Waker>,
        gateway_mac: Option<MacAddr>,
        max_plain_frame: usize,
        max_ports: usize,
    ) -> io::Result<WorkerHandle> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (commands, command_rx) = crossbeam_channel::unbounded();
        let (handed_tx, handed) = crossbeam_channel::bounded(HANDOVER_BUFFERS);
        let (free, free_rx) = crossbeam_channel::bounded(HANDOVER_BUFFERS);
        for _ in 0..HANDOVER_BUFFERS {
            // Capacity only: pages are touched as frames are copied in.
            let _ = free.send(Vec::with_capacity(BUF_LEN));
        }
        let tallies: Arc<[Tally]> = (0..max_ports).map(|_| Tally::default()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            queue,
            poll,
            commands: command_rx,
            handed: handed_tx,
            free: free_rx,
            engine_waker,
            stop: stop.clone(),
            mirror,
            gateway_mac,
            max_plain_frame,
            nat: None,
            sockets: None,
            scratch: Box::default(),
            ports: Vec::new(),
            ready: ReadyQueue::default(),
            rx_buf: vec![0u8; BUF_LEN].into_boxed_slice(),
            rx_batch: None,
            uplink_tx: Box::new(batch::TxBatch::new()),
            tallies: tallies.clone(),
        };
        Ok(WorkerHandle {
            queue,
            commands,
            waker,
            stop,
            handed,
            free,
            tallies,
            folded: vec![Counts::default(); max_ports],
            pending: Some(worker),
            thread: None,
        })
    }

    /// Starts the worker's thread, if not yet started, placed as datapath thread `queue`.
    pub fn start(&mut self, placement: &Placement) -> io::Result<()> {
        let Some(worker) = self.pending.take() else {
            return Ok(());
        };
        let name = format!("sy-worker-{}", worker.queue);
        let placement = placement.clone();
        self.thread = Some(std::thread::Builder::new().name(name).spawn(move || {
            // Checked before the datapath started (`Placement::check`): a failure here is
            // logged, and the worker runs where it is.
            if let Err(e) = placement.apply(worker.queue) {
                eprintln!("switchyard: worker {}: {e}", worker.queue);
            }
            worker.run()
        })?);
        Ok(())
    }

    pub fn send(&self, command: Command) {
        if self.commands.send(command).is_ok() {
            self.wake();
        }
    }

    pub fn wake(&self) {
        let _ = self.waker.wake();
    }

    /// What the worker did, over all ports, as last folded into the engine's counters (so
    /// that it agrees with the port counters beside it).
    pub fn stats(&self) -> crate::engine::WorkerStats {
        let mut stats = crate::engine::WorkerStats {
            queue: self.queue,
            ..Default::default()
        };
        for c in &self.folded {
            stats.rx_packets += c.rx_packets;
            stats.rx_bytes += c.rx_bytes;
            stats.tx_packets += c.tx_packets;
            stats.tx_bytes += c.tx_bytes;
            stats.forwarded += c.forwarded;
            stats.translated += c.translated;
            stats.handed_over += c.handed_over;
        }
        stats
    }

    /// What port `port`'s tally gained since the last call.
    pub fn fold(&mut self, port: PortId) -> Option<Counts> {
        let index = port.0 as usize;
        let now = self.tallies.get(index)?.counts();
        let before = std::mem::replace(&mut self.folded[index], now);
        let delta = now.since(&before);
        (delta != Counts::default()).then_some(delta)
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Debug)]
struct WorkerPort {
    queue: File,
    generation: u32,
}

struct Worker {
    queue: usize,
    poll: Poll,
    commands: Receiver<Command>,
    handed: Sender<Handed>,
    free: Receiver<Vec<u8>>,
    engine_waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    mirror: Arc<Mirror>,
    gateway_mac: Option<MacAddr>,
    max_plain_frame: usize,
    /// Packet NAT's fast path, once the uplink is added: the uplink is then one of `ports`.
    nat: Option<NatFastPath>,
    /// Socket NAT's connections that open on this worker's queues.
    sockets: Option<Box<SocketShard>>,
    /// A frame from `sockets` with its virtio-net header, for one write (allocated with
    /// `sockets`).
    scratch: Box<[u8]>,
    /// This worker's queue of each tap (and its socket on the uplink), by port id.
    ports: Vec<Option<WorkerPort>>,
    ready: ReadyQueue,
    rx_buf: Box<[u8]>,
    /// Batched reads of the uplink's socket, once it is added.
    rx_batch: Option<Box<batch::RxBatch>>,
    /// Frames for the uplink, sent together at the end of a port's turn.
    uplink_tx: Box<batch::TxBatch>,
    tallies: Arc<[Tally]>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("queue", &self.queue)
            .finish()
    }
}

impl Worker {
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        while !self.stop.load(Ordering::Relaxed) {
            let busy = !self.ready.is_empty() || self.sockets.as_ref().is_some_and(|s| s.is_busy());
            let timeout = if busy {
                Some(std::time::Duration::ZERO)
            } else {
                (self.sockets.as_ref())
                    .and_then(|s| s.poll_timeout())
                    .map(|t| t.saturating_duration_since(Instant::now()))
            };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("switchyard: worker {}: poll: {e}; stopping", self.queue);
                    return;
                }
            }
            for event in events.iter() {
                let Token(index) = event.token();
                if event.token() == WAKER {
                    continue;
                }
                if index < self.ports.len() && self.ports[index].is_some() {
                    self.ready.mark(PortId(index as u16));
                } else if let Some(sockets) = &mut self.sockets {
                    sockets.handle_event(event);
                }
            }
            self.take_commands();
            let now = Instant::now();
            let mut handed = false;
            for _ in 0..self.ready.len() {
                let Some(id) = self.ready.pop() else {
                    break;
                };
                let (drained, any_handed) = self.serve(now, id);
                handed |= any_handed;
                if !drained {
                    self.ready.mark(id);
                }
            }
            handed |= self.serve_sockets(now);
            if handed {
                let _ = self.engine_waker.wake();
            }
        }
    }

    /// Runs the socket NAT's host sockets, stack and timers, and writes what it has for
    /// guests to this worker's queue of their taps; true if it handed the engine copies for
    /// a capture.
    fn serve_sockets(&mut self, now: Instant) -> bool {
        let Some(mut sockets) = self.sockets.take_if(|s| s.is_due(now)) else {
            return false;
        };
        sockets.serve(now, self.poll.registry());
        let mut copied = false;
        while let Some((port, vnet, frame)) = sockets.poll_frame() {
            let len = vnet::LEN + frame.len();
            if self.is_current(port) && len <= self.scratch.len() {
                vnet.emit(&mut self.scratch[..vnet::LEN]);
                self.scratch[vnet::LEN..len].copy_from_slice(&frame);
                let buf = std::mem::take(&mut self.scratch);
                self.transmit(port, &buf[..len]);
                if self.mirror.captured(port) {
                    let generation = self.mirror.generation(port);
                    let copy = EngineCopy {
                        purpose: Purpose::Sent,
                        captured: true,
                        traced: false,
                    };
                    copied |= self.copy_for_engine(port, generation, &buf[..len], copy);
                }
                self.scratch = buf;
            } else {
                bump(&self.tallies[port.0 as usize].tx_errors, 1);
            }
            sockets.nat.recycle(frame);
        }
        sockets.publish(now);
        self.sockets = Some(sockets);
        copied
    }

    fn take_commands(&mut self) {
        loop {
            match self.commands.try_recv() {
                Ok(Command::AddUplink {
                    generation,
                    socket,
                    nat,
                }) => {
                    let id = nat.uplink;
                    self.nat = Some(nat);
                    self.rx_batch
                        .get_or_insert_with(|| Box::new(batch::RxBatch::new(BUF_LEN)));
                    self.add_port(id, generation, socket);
                }
                Ok(Command::AddPort {
                    id,
                    generation,
                    queue,
                }) => self.add_port(id, generation, queue),
                Ok(Command::AddSockets(sockets)) => {
                    self.scratch = vec![0u8; BUF_LEN].into_boxed_slice();
                    self.sockets = Some(sockets);
                }
                Ok(Command::RemovePort(id)) => {
                    if self.nat.as_ref().is_some_and(|n| n.uplink == id) {
                        self.nat = None;
                    }
                    if let Some(sockets) = &mut self.sockets {
                        sockets.forget_port(id);
                    }
                    if let Some(port) = self.ports.get_mut(id.0 as usize).and_then(Option::take) {
                        let fd = port.queue.as_raw_fd();
                        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
                    }
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
            }
        }
    }

    fn add_port(&mut self, id: PortId, generation: u32, queue: File) {
        let index = id.0 as usize;
        if index >= self.ports.len() {
            self.ports.resize_with(index + 1, || None);
        }
        let fd = queue.as_raw_fd();
        let token = Token(index);
        if let Err(e) =
            (self.poll.registry()).register(&mut SourceFd(&fd), token, Interest::READABLE)
        {
            eprintln!("switchyard: worker {}: port {id}: {e}", self.queue);
            return;
        }
        self.ports[index] = Some(WorkerPort { queue, generation });
        // Frames may be waiting already: edge-triggered polling would not say.
        self.ready.mark(id);
    }

    /// Reads up to [`RX_BUDGET`] frames from port `id`: whether it was drained, and whether
    /// any frame was handed to the engine. The uplink's socket is read a batch at a time, and
    /// what this turn sends to it goes out in batches ([`super::batch`]).
    fn serve(&mut self, now: Instant, id: PortId) -> (bool, bool) {
        let result = if self.nat.as_ref().is_some_and(|n| n.uplink == id) {
            self.serve_batched(now, id)
        } else {
            self.serve_reads(now, id)
        };
        self.flush_uplink();
        result
    }

    fn serve_reads(&mut self, now: Instant, id: PortId) -> (bool, bool) {
        let mut handed = false;
        let mut buf = std::mem::take(&mut self.rx_buf);
        let mut drained = false;
        for _ in 0..RX_BUDGET {
            let Some(port) = self.ports.get(id.0 as usize).and_then(Option::as_ref) else {
                drained = true;
                break;
            };
            let generation = port.generation;
            let n = match (&port.queue).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // WouldBlock, or the device is gone: the engine's thread finds that on
                // queue 0 and removes the port.
                Err(_) => {
                    drained = true;
                    break;
                }
            };
            handed |= self.handle(now, (id, generation), &mut buf[..n]);
        }
        self.rx_buf = buf;
        (drained, handed)
    }

    /// [`Worker::serve_reads`] for the uplink's socket, [`sys::BATCH`] frames a call.
    fn serve_batched(&mut self, now: Instant, id: PortId) -> (bool, bool) {
        let Some(mut rx) = self.rx_batch.take() else {
            return (true, false);
        };
        let (mut handed, mut served) = (false, 0);
        let drained = loop {
            if served >= RX_BUDGET {
                break false;
            }
            let Some(port) = self.ports.get(id.0 as usize).and_then(Option::as_ref) else {
                break true;
            };
            let generation = port.generation;
            let got = match sys::recv_batch(port.queue.as_fd(), &mut rx.bufs, &mut rx.got) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break true,
            };
            for (buf, frame) in rx.bufs.iter_mut().zip(&rx.got[..got]) {
                if frame.truncated {
                    bump(&self.tallies[id.0 as usize].truncated, 1);
                    continue;
                }
                handed |= self.handle(now, (id, generation), &mut buf[..frame.len]);
            }
            served += got;
            if got < rx.bufs.len() {
                break true;
            }
        };
        self.rx_batch = Some(rx);
        (drained, handed)
    }

    /// Switches, translates, gives to the worker's socket NAT, drops or hands over one frame
    /// read from `id` under its `generation`; true if handed over.
    fn handle(&mut self, now: Instant, (id, generation): (PortId, u32), buf: &mut [u8]) -> bool {
        let n = buf.len();
        let decision = self.fast_egress(now, id, buf);
        // Counted here only when not handed over: the engine counts the rest.
        let tally = &self.tallies[id.0 as usize];
        let received = || {
            bump(&tally.rx_packets, 1);
            bump(&tally.rx_bytes, n.saturating_sub(vnet::LEN) as u64);
        };
        match decision {
            Decision::Forward(egress) | Decision::Translate(egress) => {
                received();
                bump(&tally.forwarded, 1);
                if matches!(decision, Decision::Translate(_)) {
                    bump(&tally.translated, 1);
                }
                self.transmit(egress, buf);
                false
            }
            Decision::NotForUs => {
                received();
                bump(&tally.not_for_us, 1);
                false
            }
            Decision::Sockets => {
                received();
                let copy = EngineCopy {
                    purpose: Purpose::Taken,
                    captured: self.mirror.captured(id),
                    traced: self.mirror.traced(),
                };
                let copied = (copy.captured || copy.traced)
                    && self.copy_for_engine(id, generation, buf, copy);
                if let (Some(sockets), Ok(hdr)) = (&mut self.sockets, VnetHdr::parse(buf)) {
                    let frame = &buf[vnet::LEN..];
                    let from = Peer {
                        port: id,
                        mac: MacAddr::from_slice(&frame[6..12]),
                    };
                    sockets.handle(now, from, &hdr, frame);
                }
                copied
            }
            Decision::HandOver => {
                self.hand_over(id, generation, buf);
                true
            }
        }
    }

    /// The port `buf` (a virtio-net header and a frame read from `ingress`) goes to, if this
    /// worker may switch it (or NAT-translate it, in place) itself.
    fn fast_egress(&self, now: Instant, ingress: PortId, buf: &mut [u8]) -> Decision {
        self.decide(now, ingress, buf).unwrap_or(Decision::HandOver)
    }

    fn decide(&self, now: Instant, ingress: PortId, buf: &mut [u8]) -> Option<Decision> {
        if !self.is_current(ingress) {
            return None;
        }
        let hdr = VnetHdr::parse(buf).ok()?;
        let frame = buf.get_mut(vnet::LEN..)?;
        if !hdr.is_gso() && frame.len() > self.max_plain_frame {
            return None;
        }
        // Before anything that may change while a connection lasts ([`super::shard`]).
        if let Some(sockets) = &self.sockets
            && sockets.takes(frame, ingress, self.mirror.fast_ingress(ingress))
        {
            let src = MacAddr::from_slice(&frame[6..12]);
            if self.mirror.lookup(src) == Some(ingress) {
                // A guest whose only traffic is these connections stays learned.
                self.mirror.note_seen(now, src);
            }
            return Some(Decision::Sockets);
        }
        if self.mirror.observed() {
            return None;
        }
        if let Some(nat) = self.nat.as_ref().filter(|n| n.uplink == ingress) {
            let dst = MacAddr::from_slice(frame.get(0..6)?);
            if dst != nat.uplink_mac && !dst.is_multicast() {
                return Some(Decision::NotForUs);
            }
            let to_guest = |mac| self.mirror.lookup(mac).filter(|&p| self.is_current(p));
            return nat
                .inward(now, &hdr, frame, to_guest)
                .map(Decision::Translate);
        }
        if !self.mirror.fast_ingress(ingress) {
            return None;
        }
        let eth = EthernetFrame::new_checked(&*frame).ok()?;
        let (dst, src) = (eth.dst(), eth.src());
        // Untagged IPv4 and IPv6 only: ARP, VLAN tags and the rest are the engine's.
        if eth.header_len() != ethernet::HEADER_LEN
            || !matches!(eth.ethertype(), EtherType::IPV4 | EtherType::IPV6)
            || dst.is_multicast()
            || !src.is_valid_source()
            || self.gateway_mac == Some(src)
        {
            return None;
        }
        if self.mirror.lookup(src)? != ingress {
            return None;
        }
        if self.gateway_mac == Some(dst) {
            let nat = self.nat.as_ref()?;
            if !self.is_current(nat.uplink) || !nat.outward(now, &hdr, frame) {
                return None;
            }
            self.mirror.note_seen(now, src);
            return Some(Decision::Translate(nat.uplink));
        }
        let egress = self.mirror.lookup(dst)?;
        if egress == ingress || !self.is_current(egress) {
            return None;
        }
        self.mirror.note_seen(now, src);
        Some(Decision::Forward(egress))
    }

    /// Whether this worker has a queue of port `port` as the engine knows it now (not of an
    /// earlier port under the same id, whose removal is still on its way here).
    fn is_current(&self, port: PortId) -> bool {
        self.ports
            .get(port.0 as usize)
            .and_then(Option::as_ref)
            .is_some_and(|p| p.generation == self.mirror.generation(port))
    }

    fn transmit(&mut self, egress: PortId, frame: &[u8]) {
        let to_uplink = self.nat.as_ref().is_some_and(|n| n.uplink == egress);
        if to_uplink && batch::TxBatch::fits(frame.len()) {
            if self.uplink_tx.is_full() {
                self.flush_uplink();
            }
            if self.uplink_tx.push(frame) {
                return;
            }
        }
        if to_uplink {
            // After what waits, so the uplink's order holds.
            self.flush_uplink();
        }
        let Some(port) = self.ports.get(egress.0 as usize).and_then(Option::as_ref) else {
            return;
        };
        let tally = &self.tallies[egress.0 as usize];
        match super::write_frame(&port.queue, frame) {
            Ok(()) => {
                bump(&tally.tx_packets, 1);
                bump(
                    &tally.tx_bytes,
                    frame.len().saturating_sub(vnet::LEN) as u64,
                );
            }
            Err(_) => bump(&tally.tx_errors, 1),
        }
    }

    /// Sends what waits for the uplink, and counts it.
    fn flush_uplink(&mut self) {
        if self.uplink_tx.is_empty() {
            return;
        }
        let uplink = self.nat.as_ref().map(|n| n.uplink);
        let port = uplink.and_then(|id| self.ports.get(id.0 as usize).and_then(Option::as_ref));
        let (Some(uplink), Some(port)) = (uplink, port) else {
            // The uplink went away: what waited for it goes with it.
            self.uplink_tx.clear();
            return;
        };
        let (done, _) = self.uplink_tx.flush(&port.queue, vnet::LEN);
        let tally = &self.tallies[uplink.0 as usize];
        bump(&tally.tx_packets, done.frames as u64);
        bump(&tally.tx_bytes, done.bytes as u64);
        bump(&tally.tx_errors, done.failed as u64);
    }

    fn hand_over(&self, port: PortId, generation: u32, frame: &[u8]) {
        let tally = &self.tallies[port.0 as usize];
        if self.send_to_engine((port, generation), frame, Purpose::Handle, 0) {
            bump(&tally.handed_over, 1);
        } else {
            bump(&tally.rx_packets, 1);
            bump(
                &tally.rx_bytes,
                frame.len().saturating_sub(vnet::LEN) as u64,
            );
            bump(&tally.handover_full, 1);
        }
    }

    /// Hands the engine a copy of `frame` (virtio-net header first) for the captures and
    /// the trace; true if handed. A copy finds no buffer when fewer than [`CAPTURE_RESERVE`]
    /// are left for hand-overs, and is counted as missing from those it was for.
    fn copy_for_engine(
        &self,
        port: PortId,
        generation: u32,
        frame: &[u8],
        copy: EngineCopy,
    ) -> bool {
        let handed = self.send_to_engine((port, generation), frame, copy.purpose, CAPTURE_RESERVE);
        if !handed {
            let tally = &self.tallies[port.0 as usize];
            if copy.captured {
                bump(&tally.capture_missed, 1);
            }
            if copy.traced {
                bump(&tally.trace_missed, 1);
            }
        }
        handed
    }

    /// Copies `frame`, read from or sent to `port` under `generation`, into a free hand-over
    /// buffer for the engine, if more than `reserve` are free; whether it went.
    fn send_to_engine(
        &self,
        (port, generation): (PortId, u32),
        frame: &[u8],
        purpose: Purpose,
        reserve: usize,
    ) -> bool {
        if self.free.len() <= reserve {
            return false;
        }
        let Ok(mut buf) = self.free.try_recv() else {
            return false;
        };
        buf.clear();
        buf.extend_from_slice(frame);
        let handed = Handed {
            purpose,
            port,
            generation,
            len: frame.len(),
            buf,
        };
        self.handed.try_send(handed).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Config, Engine};
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    const A: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x0a]);
    const B: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x0b]);

    /// A virtio-net header and an Ethernet frame carrying IPv4 (the worker looks no deeper).
    fn frame(dst: MacAddr, src: MacAddr) -> Vec<u8> {
        let mut f = vec![0u8; vnet::LEN];
        f.extend_from_slice(&dst.0);
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0x45; 46]);
        f
    }

    /// A datagram socket pair stands in for a tap queue: one frame per read and write.
    fn queue() -> (File, UnixDatagram) {
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        (File::from(std::os::fd::OwnedFd::from(ours)), theirs)
    }

    fn learn(engine: &mut Engine, port: PortId, mac: MacAddr) {
        let mut f = frame(MacAddr::BROADCAST, mac);
        let hdr = VnetHdr::default();
        engine.handle_frame(Instant::now(), port, &hdr, &mut f[vnet::LEN..]);
    }

    #[test]
    fn a_worker_switches_mirrored_unicast_and_hands_over_the_rest_and_stale_ports() {
        let mut engine = Engine::new(&Config::default());
        let mirror = engine.mirror();
        let (pa, pb) = (engine.add_port("a"), engine.add_port("b"));
        learn(&mut engine, pa, A);
        learn(&mut engine, pb, B);
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
        let mut worker = WorkerHandle::new(1, mirror.clone(), waker, None, 1514, 8).unwrap();
        let (qa, guest_a) = queue();
        let (qb, guest_b) = queue();
        for (id, queue) in [(pa, qa), (pb, qb)] {
            let generation = mirror.generation(id);
            worker.send(Command::AddPort {
                id,
                generation,
                queue,
            });
        }
        worker.start(&Placement::default()).unwrap();
        let mut buf = [0u8; 2048];

        // Known unicast: straight to b's queue, counted on both ports.
        let unicast = frame(B, A);
        guest_a.send(&unicast).unwrap();
        let n = guest_b.recv(&mut buf).expect("switched by the worker");
        assert_eq!(&buf[..n], &unicast[..]);
        // Broadcast: the engine's.
        guest_a.send(&frame(MacAddr::BROADCAST, A)).unwrap();
        let handed = worker
            .handed
            .recv_timeout(Duration::from_secs(1))
            .expect("handed over");
        assert_eq!((handed.port, handed.len), (pa, unicast.len()));
        let counts = worker.fold(pa).expect("counted");
        assert_eq!(
            (counts.rx_packets, counts.forwarded, counts.handed_over),
            (1, 1, 1),
            "a frame handed over is the engine's to count as received"
        );
        assert_eq!(worker.fold(pb).map(|c| c.tx_packets), Some(1));

        // b is removed and its id given to another guest before the worker has heard: the
        // new guest's frames must not go into the old queue.
        engine.remove_port(pb);
        let pc = engine.add_port("c");
        assert_eq!(pc, pb, "the id is reused");
        learn(&mut engine, pc, B);
        assert_eq!(mirror.lookup(B), Some(pc));
        guest_a.send(&unicast).unwrap();
        let handed = worker
            .handed
            .recv_timeout(Duration::from_secs(1))
            .expect("handed over, not switched");
        assert_eq!(handed.port, pa);
        assert!(guest_b.recv(&mut buf).is_err(), "nothing in the old queue");
    }

    /// A copy for a capture or a trace that finds no free hand-over buffer is counted as
    /// missing from each of those it was for, and only those.
    #[test]
    fn a_copy_that_finds_no_buffer_is_missing_from_those_it_was_for() {
        let mut engine = Engine::new(&Config::default());
        let mirror = engine.mirror();
        let pa = engine.add_port("a");
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
        let mut handle = WorkerHandle::new(1, mirror.clone(), waker, None, 1514, 8).unwrap();
        {
            let worker = handle.pending.as_ref().unwrap();
            while worker.free.try_recv().is_ok() {}
            let generation = mirror.generation(pa);
            for (captured, traced) in [(true, false), (false, true), (true, true)] {
                let copy = EngineCopy {
                    purpose: Purpose::Taken,
                    captured,
                    traced,
                };
                assert!(!worker.copy_for_engine(pa, generation, &frame(B, A), copy));
            }
        }
        let counts = handle.fold(pa).expect("counted");
        assert_eq!((counts.capture_missed, counts.trace_missed), (2, 2));
    }
}
