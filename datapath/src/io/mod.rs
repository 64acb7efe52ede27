//! The I/O edge: ports backed by file descriptors and the mio loop that feeds the engine.
//!
//! One thread owns the engine and every port fd. mio is edge-triggered, so a readable port is
//! drained until `WouldBlock`, but at most [`RX_BUDGET`] frames per turn: a port that still has
//! frames goes to the back of a ready queue, and the next poll does not sleep. One busy guest
//! therefore cannot starve the others, nor the timers. Frames are read into one preallocated
//! buffer and written from it to their egress ports; nothing on this path allocates.

mod batch;
pub mod capture;
pub mod control;
pub mod egress;
pub mod netlink;
pub mod netns;
pub mod placement;
pub mod seccomp;
mod shard;
pub mod stream;
pub mod sys;
pub mod tap;
mod worker;

use crate::engine::{Engine, MAX_FRAME_LEN, Outgoing, Verdict};
use crate::port::{DropReason, PortId};
use crate::wire::offload::{self, Segmenter};
use crate::wire::{VnetHdr, vnet};
use mio::net::UnixStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use placement::Placement;
pub use tap::{Tap, TapSpec};

/// Frames read from one port before the loop turns to the others.
pub const RX_BUDGET: usize = 64;
/// Upper bound on ports per engine (the ready queue is sized for it up front).
pub const MAX_PORTS: usize = 1024;
const BUF_LEN: usize = vnet::LEN + MAX_FRAME_LEN;

/// Tokens from here on are the listening sockets of stream ports (port index added).
const LISTENER_BASE: usize = MAX_PORTS;
const WAKER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
const UPSTREAM_V4: Token = Token(usize::MAX - 4);
const UPSTREAM_V6: Token = Token(usize::MAX - 5);
/// Upstream DNS answers read per socket per turn.
const UPSTREAM_BUDGET: usize = 256;
/// How often the resolver configuration is checked for changes.
const RESOLV_CHECK: Duration = Duration::from_secs(2);
/// How long [`Datapath::conntrack`] waits for the workers' socket NAT rows.
const SHARD_ROWS_WAIT: Duration = Duration::from_millis(200);
/// How often the fast-path workers' counts are added to the engine's counters.
const FOLD_INTERVAL: Duration = Duration::from_millis(100);
/// How often a lease file that could not be written is tried again.
const LEASE_RETRY: Duration = Duration::from_secs(1);

/// What the fd of a port speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortCaps {
    /// Each frame is preceded by a virtio-net header ([`vnet::LEN`] bytes).
    pub vnet_hdr: bool,
    /// The port takes UDP super-frames (virtio `GSO_UDP_L4`): a tap whose kernel accepted
    /// USO (Linux 6.2 and later), and AF_PACKET sockets. Others get their datagrams.
    pub uso: bool,
}

impl PortCaps {
    /// A port with virtio-net headers: USO as `uso` says.
    pub fn vnet(uso: bool) -> PortCaps {
        PortCaps {
            vnet_hdr: true,
            uso,
        }
    }

    /// A port of plain frames (a QEMU stream): every offload is done in software.
    pub const PLAIN: PortCaps = PortCaps {
        vnet_hdr: false,
        uso: false,
    };

    /// Whether a frame with offload state `hdr` can be written to the port as it is.
    fn takes(&self, hdr: &VnetHdr) -> bool {
        let uso = hdr.gso_type & !vnet::gso::ECN == vnet::gso::UDP_L4;
        self.vnet_hdr && (self.uso || !uso)
    }
}

#[derive(Debug)]
struct IoPort {
    /// The fd frames are read from and written to, one frame per call; `None` for a stream
    /// port, whose frames go through `stream`.
    file: Option<File>,
    stream: Option<stream::StreamPort>,
    caps: PortCaps,
    /// Frames arrive in this mapped ring instead of by `read` (the uplink).
    ring: Option<sys::RxRing>,
    /// Kept so a created tap lives (and is removed) with the port.
    tap: Option<Tap>,
    /// An AF_PACKET port's frames to send, waiting for one `sendmmsg` ([`batch`]); such a
    /// port is also read by `recvmmsg`, unless a ring reads it.
    tx_batch: Option<Box<batch::TxBatch>>,
    /// What flushes of `tx_batch` sent and failed since the counters last took it, and the
    /// last error.
    flushed: batch::Flushed,
    flush_error: Option<io::Error>,
}

impl IoPort {
    fn new(file: Option<File>, caps: PortCaps, tap: Option<Tap>) -> IoPort {
        IoPort {
            file,
            stream: None,
            caps,
            ring: None,
            tap,
            tx_batch: None,
            flushed: batch::Flushed::default(),
            flush_error: None,
        }
    }

    /// Writes one whole frame (with the port's framing), after any that wait in its batch.
    fn send(&mut self, buf: &[u8]) -> io::Result<()> {
        self.flush();
        match (&self.file, &mut self.stream) {
            (Some(file), _) => write_frame(file, buf),
            (None, Some(stream)) => stream.send(buf),
            (None, None) => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }

    /// Puts `buf` in the port's batch if it has one and the frame fits (sending the batch
    /// first when full); false when it must go out at once.
    fn queue(&mut self, buf: &[u8]) -> bool {
        let Some(batch) = &mut self.tx_batch else {
            return false;
        };
        if !batch::TxBatch::fits(buf.len()) {
            return false;
        }
        if batch.is_full() {
            self.flush();
        }
        self.tx_batch.as_mut().is_some_and(|batch| batch.push(buf))
    }

    /// Sends what waits in the batch; the counts wait in `flushed` for the engine's counters.
    fn flush(&mut self) {
        let (Some(batch), Some(file)) = (&mut self.tx_batch, &self.file) else {
            return;
        };
        if batch.is_empty() {
            return;
        }
        let (done, error) = batch.flush(file, vnet::LEN);
        self.flushed.frames += done.frames;
        self.flushed.bytes += done.bytes;
        self.flushed.failed += done.failed;
        if error.is_some() {
            self.flush_error = error;
        }
    }
}

/// Ports with frames still to read, in the order they get their next turn. Sized for
/// [`MAX_PORTS`] up front, so marking a port never allocates.
#[derive(Debug)]
struct ReadyQueue {
    order: VecDeque<PortId>,
    queued: Vec<bool>,
}

impl Default for ReadyQueue {
    fn default() -> Self {
        ReadyQueue {
            order: VecDeque::with_capacity(MAX_PORTS),
            queued: vec![false; MAX_PORTS],
        }
    }
}

impl ReadyQueue {
    fn mark(&mut self, id: PortId) {
        let index = id.0 as usize;
        if index < MAX_PORTS && !self.queued[index] {
            self.queued[index] = true;
            self.order.push_back(id);
        }
    }

    fn pop(&mut self) -> Option<PortId> {
        let id = self.order.pop_front()?;
        self.queued[id.0 as usize] = false;
        Some(id)
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// Stops a running [`Datapath`] from another thread.
#[derive(Debug, Clone)]
pub struct Handle {
    waker: Arc<Waker>,
    shutdown: Arc<AtomicBool>,
}

impl Handle {
    /// A stop was asked for (by this handle or a signal).
    pub fn is_shutdown(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        // A failed wake only delays the stop to the next timer or frame.
        let _ = self.waker.wake();
    }
}

/// One engine with its ports and its poll loop.
#[derive(Debug)]
pub struct Datapath {
    poll: Poll,
    events: Events,
    engine: Engine,
    ports: Vec<Option<IoPort>>,
    rx_buf: Box<[u8]>,
    /// Buffers for batched reads of AF_PACKET ports, once there is one.
    rx_batch: Option<Box<batch::RxBatch>>,
    /// Ports whose batch has frames waiting, or counts not yet taken.
    tx_pending: Vec<PortId>,
    scratch: Box<[u8]>,
    ready: ReadyQueue,
    waker: Arc<Waker>,
    shutdown: Arc<AtomicBool>,
    report: Arc<AtomicBool>,
    signals: Option<UnixStream>,
    /// The control socket's path, removed when the datapath is dropped.
    control_path: Option<PathBuf>,
    /// The control and metrics sockets, until [`Datapath::run`] gives them to the control
    /// thread ([`control`]).
    listeners: control::Listeners,
    control_thread: Option<control::ControlThread>,
    /// Requests from the control thread.
    requests: Option<crossbeam_channel::Receiver<control::Request>>,
    leases: Option<LeaseWriter>,
    upstream: Vec<mio::net::UdpSocket>,
    upstream_ready: bool,
    captures: Vec<capture::Capture>,
    tracing: Option<TraceSession>,
    resolv: Option<ResolvWatch>,
    egress: egress::Egress,
    /// Ports found dead this turn, removed at its end.
    dead_ports: Vec<PortId>,
    /// Taps whose device went away, opened again when it comes back.
    lost_taps: Vec<LostTap>,
    /// When taps are next checked for a device and lost taps looked for.
    next_port_check: Instant,
    /// How long to keep polling without sleeping after a turn that had events
    /// ([`Datapath::set_busy_poll`]); zero sleeps at once.
    busy_poll: Duration,
    /// Where the engine's and the workers' threads run ([`Datapath::set_placement`]).
    placement: Placement,
    /// When a turn last had events.
    last_busy: Option<Instant>,
    /// Fast-path workers for the taps' further queues ([`worker`]); empty with one worker.
    workers: Vec<worker::WorkerHandle>,
    /// What each worker's socket NAT shows (empty without socket NAT or workers).
    shard_views: Vec<Arc<shard::ShardView>>,
    /// A worker's hand-over channel still had frames at the end of the turn.
    handover_pending: bool,
    /// When the workers' counts are next folded into the engine's counters.
    next_fold: Instant,
}

/// Whether `tap`'s namespace is held alive only by the tap itself: its path is gone or names
/// another namespace now (`ip netns del`; the `/proc/PID` process exited), and no process is
/// left in it. A tap opened from inside its namespace (an existing persistent tap, or a
/// rootless helper's) holds that namespace, so the kernel alone would never end the port.
fn namespace_abandoned(tap: &Tap) -> bool {
    let (Some(path), Some(was)) = (&tap.netns, tap.netns_id) else {
        return false;
    };
    netns::identity(path) != Some(was) && !netns::has_processes(was)
}

/// How often live taps are checked for their device and lost taps are looked for.
const PORT_CHECK: Duration = Duration::from_secs(1);

/// A tap port whose device went away (deleted, or its namespace destroyed), kept so that the
/// port comes back when its kernel side does: a tap of that name reappears (a persistent tap
/// made again), or a new namespace is made under the same `ip netns` name (a guest restarted),
/// where the tap is then created again. Taps in `/proc/PID` namespaces are not kept: a PID
/// coming back is another process.
#[derive(Debug)]
struct LostTap {
    spec: TapSpec,
    /// The namespace's identity when the tap was lost; `None` if it was gone too.
    netns_was: Option<(u64, u64)>,
    /// The last reopening error, logged once.
    failed: Option<String>,
}

impl LostTap {
    /// For a dead port's tap, if it is one that can come back.
    fn of(tap: &Tap) -> Option<LostTap> {
        if tap
            .netns
            .as_ref()
            .is_some_and(|p| !p.starts_with(netns::NETNS_RUN_DIR))
        {
            return None;
        }
        Some(LostTap {
            spec: TapSpec {
                name: tap.name.clone(),
                netns: tap.netns.clone(),
                mac: tap.mac,
                mtu: None,
                clean_traffic: tap.clean_traffic,
            },
            netns_was: tap.netns.as_deref().and_then(netns::identity),
            failed: None,
        })
    }

    /// Whether the tap's kernel side is back: its namespace is a new one, or a device of its
    /// name exists again.
    fn is_back(&self) -> bool {
        let name = self.spec.name.clone();
        match &self.spec.netns {
            None => sys::if_nametoindex(&name).is_some(),
            Some(path) => match netns::identity(path) {
                None => false,
                Some(now) if Some(now) != self.netns_was => true,
                Some(_) => {
                    netns::run_in(Some(path), move || Ok(sys::if_nametoindex(&name).is_some()))
                        .unwrap_or(false)
                }
            },
        }
    }
}

/// The resolver configuration whose `nameserver` lines are the DNS upstreams, re-read when it
/// changes (as dnsmasq does with resolv.conf).
#[derive(Debug)]
struct ResolvWatch {
    path: PathBuf,
    stamp: Option<(std::time::SystemTime, u64)>,
    next_check: Instant,
}

/// Listens on the unix socket `path`, non-blocking: its directory is made if need be, a stale
/// socket file (nobody answers on it) is replaced, a live one is refused (`AddrInUse`), and
/// the file gets `mode` when given.
pub fn bind_unix(path: &Path, mode: Option<u32>) -> io::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
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
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// A running `switchyard trace`: which frames to trace and their rendered traces, bounded.
#[derive(Debug)]
struct TraceSession {
    port: Option<PortId>,
    filter: crate::trace::Filter,
    remaining: u64,
    records: VecDeque<String>,
    seq: u64,
    dropped: u64,
    /// Frames a worker's socket NAT took that it could not copy to the engine for the trace
    /// (its hand-over full): perhaps frames the trace would have shown.
    missed: u64,
}

/// Traces waiting for the reader before new ones are dropped.
const MAX_TRACES: usize = 1000;

impl TraceSession {
    /// Whether a frame that entered `ingress` is one to trace.
    fn wants(&self, ingress: PortId, frame: &[u8]) -> bool {
        self.remaining > 0 && self.port.is_none_or(|p| p == ingress) && self.filter.matches(frame)
    }

    /// Keeps one frame's rendered trace for the reader (counted as dropped if it is behind).
    fn keep(&mut self, trace: &str) {
        self.remaining = self.remaining.saturating_sub(1);
        self.seq += 1;
        if self.records.len() >= MAX_TRACES {
            self.dropped += 1;
        } else {
            self.records
                .push_back(format!("frame {}:\n{trace}", self.seq));
        }
    }
}

/// The `nameserver` addresses of a resolv.conf, port 53, in order.
pub fn parse_resolv_conf(text: &str) -> Vec<std::net::SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        // A scoped IPv6 address (fe80::1%eth0) is not usable from here: skipped.
        .filter_map(|addr| addr.parse::<std::net::IpAddr>().ok())
        .map(|ip| std::net::SocketAddr::new(ip, 53))
        .collect()
}

/// The thread that writes the DHCP lease file, so the datapath never waits for a disk.
///
/// Each write is a whole new file (temp file, fsync, rename, fsync of the directory): the file
/// is always one complete generation. The engine hands out the next generation only once the
/// last is written, so each write commits every change made meanwhile (and, should two be
/// queued, the newest is written).
#[derive(Debug)]
struct LeaseWriter {
    tx: Option<std::sync::mpsc::Sender<crate::dhcp::LeaseUpdate>>,
    /// The newest generation on disk, set by the thread.
    written: Arc<std::sync::atomic::AtomicU64>,
    /// The newest generation the engine was told about.
    reported: u64,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LeaseWriter {
    fn spawn(path: PathBuf, waker: Arc<Waker>, first: u64) -> io::Result<LeaseWriter> {
        let (tx, rx) = std::sync::mpsc::channel::<crate::dhcp::LeaseUpdate>();
        let written = Arc::new(std::sync::atomic::AtomicU64::new(first));
        let done = written.clone();
        let thread = std::thread::Builder::new()
            .name("lease-writer".into())
            .spawn(move || {
                // The file's lines, kept up to date from the engine's changes (it starts with
                // every lease as a change). A generation that could not be written (disk
                // full, read-only) is retried every LEASE_RETRY until it is, or a newer one
                // replaces it.
                let mut lines = crate::dhcp::LeaseLines::default();
                let mut failed: Option<u64> = None;
                let mut complained = false;
                loop {
                    let next = match failed.take() {
                        None => match rx.recv() {
                            Ok(update) => {
                                let generation = update.generation;
                                lines.apply(update);
                                generation
                            }
                            Err(_) => break,
                        },
                        Some(pending) => match rx.recv_timeout(LEASE_RETRY) {
                            Ok(update) => {
                                let generation = update.generation;
                                lines.apply(update);
                                generation
                            }
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => pending,
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                        },
                    };
                    let mut next = next;
                    while let Ok(newer) = rx.try_recv() {
                        next = newer.generation;
                        lines.apply(newer);
                    }
                    match write_durably(&path, lines.render().as_bytes()) {
                        Ok(()) => {
                            if complained {
                                eprintln!(
                                    "switchyard: the lease file {} is written again",
                                    path.display()
                                );
                                complained = false;
                            }
                            done.store(next, Ordering::SeqCst);
                            let _ = waker.wake();
                        }
                        Err(e) => {
                            if !complained {
                                eprintln!(
                                    "switchyard: cannot write the lease file {}: {e}; DHCP \
                                     acknowledgements wait for it (retried every second)",
                                    path.display()
                                );
                                complained = true;
                            }
                            failed = Some(next);
                        }
                    }
                }
            })?;
        Ok(LeaseWriter {
            tx: Some(tx),
            written,
            reported: first,
            thread: Some(thread),
        })
    }
}

impl Drop for LeaseWriter {
    fn drop(&mut self) {
        // Closing the channel ends the thread once the write under way is done.
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Replaces `path` with `contents` so that a crash leaves either the old file or the new one:
/// write a temporary file beside it, fsync it, rename it over, fsync the directory.
pub fn write_durably(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let written = File::create(&tmp).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    if let Err(e) = written {
        // A partial temporary file would only hold on to the space that ran out.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)?;
    File::open(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    })?
    .sync_all()
}

impl Datapath {
    pub fn new(engine: Engine) -> io::Result<Datapath> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        Ok(Datapath {
            poll,
            events: Events::with_capacity(256),
            engine,
            ports: Vec::new(),
            rx_buf: vec![0u8; BUF_LEN].into_boxed_slice(),
            rx_batch: None,
            tx_pending: Vec::with_capacity(MAX_PORTS),
            scratch: vec![0u8; BUF_LEN].into_boxed_slice(),
            ready: ReadyQueue::default(),
            waker,
            shutdown: Arc::new(AtomicBool::new(false)),
            report: Arc::new(AtomicBool::new(false)),
            signals: None,
            control_path: None,
            listeners: control::Listeners::default(),
            control_thread: None,
            requests: None,
            leases: None,
            upstream: Vec::new(),
            upstream_ready: false,
            captures: Vec::new(),
            tracing: None,
            resolv: None,
            shard_views: Vec::new(),
            egress: egress::Egress::default(),
            dead_ports: Vec::new(),
            lost_taps: Vec::new(),
            next_port_check: Instant::now() + PORT_CHECK,
            busy_poll: Duration::ZERO,
            placement: Placement::default(),
            last_busy: None,
            workers: Vec::new(),
            handover_pending: false,
            next_fold: Instant::now(),
        })
    }

    /// Spreads the taps over `count` threads: taps are then opened with `count` queues
    /// ([`Datapath::open_tap`]), queue 0 served by this thread (the engine's), each further
    /// queue by a fast-path worker ([`worker`]) that switches known unicast between taps,
    /// translates packet NAT's established connections, carries the socket NAT connections
    /// that open on its queues, and hands the rest to the engine. Call before adding taps;
    /// the workers' threads start with the first [`Datapath::turn`], so they inherit its
    /// seccomp filter.
    pub fn set_workers(&mut self, count: usize) -> io::Result<()> {
        if count <= 1 || !self.workers.is_empty() {
            return Ok(());
        }
        let mirror = self.engine.mirror();
        for queue in 1..count {
            self.workers.push(worker::WorkerHandle::new(
                queue,
                mirror.clone(),
                self.waker.clone(),
                self.engine.gateway_mac(),
                self.engine.max_plain_frame(),
                MAX_PORTS,
            )?);
        }
        // Socket NAT: each worker carries the TCP connections that open on its queues, under
        // the network's caps, shared with the engine's ([`shard`]).
        let gateway_mac = self.engine.gateway_mac();
        let socket_nat = (self.engine.socket_nat()).map(|s| (s.config().clone(), s.caps()));
        if let (Some((config, caps)), Some(gateway_mac)) = (socket_nat, gateway_mac) {
            for worker in &self.workers {
                let (shard, view) =
                    shard::SocketShard::new(&config, caps.clone(), gateway_mac, Instant::now());
                worker.send(worker::Command::AddSockets(Box::new(shard)));
                self.shard_views.push(view);
            }
        }
        Ok(())
    }

    /// How many threads carry the taps' frames ([`Datapath::set_workers`]).
    pub fn workers(&self) -> usize {
        self.workers.len() + 1
    }

    /// Opens the tap of `spec`, with a queue per worker, and adds it as a port.
    pub fn open_tap(&mut self, spec: &TapSpec) -> io::Result<PortId> {
        let tap = Tap::open_queues(spec, self.workers())?;
        self.add_tap(tap)
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine's [`Engine::stats`], with what the workers' socket NATs counted and hold.
    pub fn stats(&self) -> crate::engine::Stats {
        let mut stats = self.engine.stats();
        stats.workers = self.workers.iter().map(|w| w.stats()).collect();
        // Views are made in the workers' order ([`Datapath::set_workers`]).
        for (view, worker) in self.shard_views.iter().zip(&mut stats.workers) {
            let shard = view.counts();
            let engine = &mut stats.engine;
            engine.socket_nat.add(&shard.counters);
            engine.socket_nat_unresolved += shard.unresolved;
            engine.socket_nat_worker_connects += shard.counters.tcp_connects;
            stats.nat_flows += shard.flows;
            worker.socket_nat_connects = shard.counters.tcp_connects;
            worker.socket_nat_flows = shard.flows;
        }
        stats
    }

    /// [`Datapath::stats`] now, and then, off the datapath's thread (the control thread
    /// calls it), each tap's counters as its guest's kernel keeps them
    /// ([`crate::engine::TapKernelCounters`]): read over rtnetlink in the tap's namespace,
    /// a thread and a request per tap, which the datapath's thread must not wait for. A tap
    /// whose counters cannot be read (its namespace gone, or not ours to enter) has none.
    pub fn stats_later(&self) -> impl FnOnce() -> crate::engine::Stats + Send + 'static {
        let mut stats = self.stats();
        // Its namespace as it was when opened, and its name now (a guest may rename it).
        type TapAt = (usize, Option<PathBuf>, Option<(u64, u64)>, String);
        let taps: Vec<TapAt> = (stats.ports.iter().enumerate())
            .filter_map(|(at, (id, _))| {
                let tap = self.ports.get(usize::from(id.0))?.as_ref()?.tap.as_ref()?;
                let name = sys::tap_name(tap.file.as_fd()).ok()?;
                Some((at, tap.netns.clone(), tap.netns_id, name))
            })
            .collect();
        move || {
            for (at, netns, id, name) in taps {
                let read = netns::run_in_same(netns.as_deref(), id, || netlink::link_stats(&name));
                if let Ok(link) = read {
                    stats.ports[at].1.kernel = Some(crate::engine::TapKernelCounters {
                        guest_sent: link.tx_packets + link.tx_dropped,
                        guest_sent_dropped: link.tx_dropped,
                        guest_received_dropped: link.rx_dropped,
                    });
                }
            }
            stats
        }
    }

    /// The engine's [`Engine::conntrack`], with the workers' socket NAT connections (see
    /// [`Datapath::conntrack_later`]).
    pub fn conntrack(&self, now: Instant) -> Vec<crate::nat::FlowRow> {
        self.conntrack_later(now)()
    }

    /// The engine's [`Engine::conntrack`] now, and the workers' socket NAT connections once
    /// they answer: each worker is asked for its rows, and the function returned waits up to
    /// [`SHARD_ROWS_WAIT`] for them (a worker answers within its turn), off the datapath's
    /// thread (the control thread calls it). A worker that did not answer in time is left
    /// out, and said to be.
    pub fn conntrack_later(
        &self,
        now: Instant,
    ) -> impl FnOnce() -> Vec<crate::nat::FlowRow> + Send + 'static {
        let mut rows = self.engine.conntrack(now);
        let mut waiting: Vec<(usize, shard::RowsTicket)> = (self.shard_views.iter())
            .enumerate()
            .map(|(w, view)| (w, view.ask_rows()))
            .collect();
        for worker in &self.workers {
            worker.wake();
        }
        move || {
            let deadline = Instant::now() + SHARD_ROWS_WAIT;
            loop {
                waiting.retain_mut(|(_, ticket)| match ticket.take() {
                    Some(theirs) => {
                        rows.extend(theirs.iter().cloned());
                        false
                    }
                    None => true,
                });
                if waiting.is_empty() || Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            for (w, ..) in waiting {
                eprintln!("switchyard: worker {}: no connection rows in time", w + 1);
            }
            rows
        }
    }

    /// Keeps polling without sleeping for `spin` after each turn that had events, as
    /// `SO_BUSY_POLL` or a DPDK poll loop do: the next frame of a burst or of a request/reply
    /// exchange is picked up without a wakeup (a context switch and the scheduler's latency),
    /// at the cost of a core kept busy meanwhile. Zero (the default) sleeps at once.
    pub fn set_busy_poll(&mut self, spin: Duration) {
        self.busy_poll = spin;
    }

    /// Pins the datapath's threads to CPUs and puts them under the real-time scheduler (see
    /// [`placement`]): the engine's thread when [`Datapath::run`] starts, each worker's when
    /// its thread starts. Check it first with [`Placement::check`].
    pub fn set_placement(&mut self, placement: Placement) {
        self.placement = placement;
    }

    pub fn handle(&self) -> Handle {
        Handle {
            waker: self.waker.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Adds an open tap as a port.
    pub fn add_tap(&mut self, mut tap: Tap) -> io::Result<PortId> {
        let file = tap.file.try_clone()?;
        let queues = std::mem::take(&mut tap.queues);
        // A tap in an `ip netns` namespace is named NAME@NETNS: many guests call theirs eth0.
        let name = match tap
            .netns
            .as_ref()
            .and_then(|p| p.strip_prefix(netns::NETNS_RUN_DIR).ok())
        {
            Some(ns) => format!("{}@{}", tap.name, ns.display()),
            None => tap.name.clone(),
        };
        self.lost_taps
            .retain(|l| !(l.spec.name == tap.name && l.spec.netns == tap.netns));
        let (mac, clean_traffic) = (tap.mac, tap.clean_traffic);
        let caps = PortCaps::vnet(sys::tap_takes_uso(tap.file.as_fd()));
        let id = self.add_port(name, file, caps, Some(tap))?;
        if let Some(mac) = mac {
            self.engine.bind_mac(id, mac);
        }
        if let Some(on) = clean_traffic {
            self.engine.set_clean_traffic(id, on);
        }
        let generation = self.engine.fdb().mirrored().map_or(0, |m| m.generation(id));
        for (worker, queue) in self.workers.iter().zip(queues) {
            worker.send(worker::Command::AddPort {
                id,
                generation,
                queue,
            });
        }
        Ok(id)
    }

    /// Adds a port that exchanges one frame per read/write on `file`.
    pub fn add_fd_port(&mut self, name: String, file: File, caps: PortCaps) -> io::Result<PortId> {
        self.add_port(name, file, caps, None)
    }

    /// Adds the uplink of packet NAT: an AF_PACKET socket on interface `dev` (in the calling
    /// thread's namespace), promiscuous, with virtio-net headers, receiving through a
    /// `TPACKET_V3` ring shaped by `ring` (or by `read`, one frame per call, when `None`).
    ///
    /// With workers ([`Datapath::set_workers`]), each worker gets a socket of its own on
    /// `dev`, all in one fanout group with the engine's ([`sys::join_fanout`]: a connection's
    /// opening and closing frames reach the engine's socket, its data one socket by its
    /// ports), and translates the data packets of established connections both ways itself
    /// (`nat::fast`); the rest it hands to the engine.
    pub fn add_uplink(&mut self, dev: &str, ring: Option<sys::RingLayout>) -> io::Result<PortId> {
        let (file, ring) = self.open_nic(dev, ring)?;
        let id = self
            .engine
            .add_uplink(format!("{dev}(uplink)"))
            .ok_or_else(|| io::Error::other("the network has no NAT uplink configured"))?;
        if let Err(e) = self.share_uplink(dev, &file) {
            // Workers that got no socket leave the uplink's frames to the others.
            eprintln!("switchyard: uplink {dev}: not every worker translates NAT: {e}");
        }
        let attached = self.attach(id, file, (PortCaps::vnet(true), true), ring, None);
        if attached.is_err() {
            for worker in &self.workers {
                worker.send(worker::Command::RemovePort(id));
            }
        }
        attached
    }

    /// Gives each worker its socket on uplink `dev` and the NAT fast path, the engine's
    /// socket `ours` leading their fanout group.
    fn share_uplink(&mut self, dev: &str, ours: &File) -> io::Result<()> {
        if self.workers.is_empty() {
            return Ok(());
        }
        let Some(nat) = self.engine.nat_mirror() else {
            return Ok(());
        };
        let index = sys::if_nametoindex(dev).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no interface {dev}"))
        })?;
        let group = sys::join_fanout(ours.as_fd(), None)?;
        let generation = self
            .engine
            .fdb()
            .mirrored()
            .map_or(0, |m| m.generation(nat.uplink));
        for worker in &self.workers {
            let socket = sys::open_packet_socket(index, vnet::LEN)?;
            sys::join_fanout(socket.as_fd(), Some(group))?;
            worker.send(worker::Command::AddUplink {
                generation,
                socket: File::from(socket),
                nat: nat.clone(),
            });
        }
        Ok(())
    }

    /// Adds host NIC `dev` as a switch port (bridge mode): an AF_PACKET socket, promiscuous,
    /// with virtio-net headers, receiving through a `TPACKET_V3` ring when `ring` says so.
    /// Guests appear on the NIC's LAN with their own MACs. The host's own traffic on `dev` is
    /// not seen (`PACKET_IGNORE_OUTGOING` skips every outgoing frame), as with macvtap.
    pub fn add_nic_port(&mut self, dev: &str, ring: Option<sys::RingLayout>) -> io::Result<PortId> {
        let (file, ring) = self.open_nic(dev, ring)?;
        let id = self.engine.add_port(format!("{dev}(nic)"));
        // The LAN's hosts are not guests: no clean-traffic or rate caps on their port.
        self.engine.set_trusted(id);
        self.attach(id, file, (PortCaps::vnet(true), true), ring, None)
    }

    /// The AF_PACKET socket (and ring) of host NIC `dev`, if a port may still be added.
    fn open_nic(
        &self,
        dev: &str,
        ring: Option<sys::RingLayout>,
    ) -> io::Result<(File, Option<sys::RxRing>)> {
        if self.engine.ports().count() >= MAX_PORTS {
            return Err(io::Error::other(format!("at most {MAX_PORTS} ports")));
        }
        let index = sys::if_nametoindex(dev).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no interface {dev}"))
        })?;
        let socket = sys::open_packet_socket(index, vnet::LEN)?;
        let ring = match ring {
            Some(layout) => Some(sys::RxRing::attach(socket.as_fd(), layout, vnet::LEN)?),
            None => None,
        };
        Ok((File::from(socket), ring))
    }

    fn add_port(
        &mut self,
        name: String,
        file: File,
        caps: PortCaps,
        tap: Option<Tap>,
    ) -> io::Result<PortId> {
        if self.engine.ports().count() >= MAX_PORTS {
            return Err(io::Error::other(format!("at most {MAX_PORTS} ports")));
        }
        let id = self.engine.add_port(name);
        self.attach(id, file, (caps, false), None, tap)
    }

    /// Registers `file` as port `id`; `packet_socket`: an AF_PACKET socket, whose reads (when
    /// no `ring` reads them) and writes are batched ([`batch`]).
    fn attach(
        &mut self,
        id: PortId,
        file: File,
        (caps, packet_socket): (PortCaps, bool),
        ring: Option<sys::RxRing>,
        tap: Option<Tap>,
    ) -> io::Result<PortId> {
        let index = id.0 as usize;
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&file.as_raw_fd()),
            Token(index),
            Interest::READABLE,
        ) {
            self.engine.remove_port(id);
            return Err(e);
        }
        if self.ports.len() <= index {
            self.ports.resize_with(index + 1, || None);
        }
        let mut port = IoPort::new(Some(file), caps, tap);
        if packet_socket {
            port.tx_batch = Some(Box::new(batch::TxBatch::new()));
            self.rx_batch
                .get_or_insert_with(|| Box::new(batch::RxBatch::new(BUF_LEN)));
        }
        port.ring = ring;
        self.ports[index] = Some(port);
        // Frames may already be waiting: edge-triggered polling reports only new arrivals.
        self.ready.mark(id);
        Ok(id)
    }

    /// Adds a VM port: a unix stream socket at `path` that QEMU connects to (see
    /// [`stream`]). The port exists from now on; VMs connect, leave and come back.
    pub fn add_stream(&mut self, name: String, addr: &stream::StreamAddr) -> io::Result<PortId> {
        if self.engine.ports().count() >= MAX_PORTS {
            return Err(io::Error::other(format!("at most {MAX_PORTS} ports")));
        }
        let mut stream = stream::StreamPort::bind(addr)?;
        let id = self.engine.add_port(name);
        let index = id.0 as usize;
        if let Err(e) = stream
            .listener
            .register(self.poll.registry(), Token(LISTENER_BASE + index))
        {
            self.engine.remove_port(id);
            return Err(e);
        }
        if self.ports.len() <= index {
            self.ports.resize_with(index + 1, || None);
        }
        let mut port = IoPort::new(None, PortCaps::PLAIN, None);
        port.stream = Some(stream);
        self.ports[index] = Some(port);
        Ok(id)
    }

    /// The stream ports: (port, where it listens, whether a VM is connected).
    pub fn streams(&self) -> Vec<(PortId, stream::StreamAddr, bool)> {
        self.ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let stream = p.as_ref()?.stream.as_ref()?;
                Some((
                    PortId(i as u16),
                    stream.addr().clone(),
                    stream.is_connected(),
                ))
            })
            .collect()
    }

    /// A VM connected to stream port `index` (or more than one: the newest wins).
    fn accept_stream(&mut self, index: usize) {
        let Some(stream) = self
            .ports
            .get_mut(index)
            .and_then(Option::as_mut)
            .and_then(|p| p.stream.as_mut())
        else {
            return;
        };
        // The connection it replaces is closed, which takes it out of the poll set.
        if let Ok(true) = stream.accept()
            && let Some(conn) = &mut stream.conn
        {
            let _ = conn.register(self.poll.registry(), Token(index));
            self.ready.mark(PortId(index as u16));
        }
    }

    /// Removes a port (its tap goes away if switchyard created it).
    pub fn remove_port(&mut self, id: PortId) {
        self.flush_tx();
        self.captures.retain(|c| c.port != id);
        if let Some(mut port) = self.ports.get_mut(id.0 as usize).and_then(Option::take) {
            let registry = self.poll.registry();
            if let Some(file) = &port.file {
                let _ = registry.deregister(&mut SourceFd(&file.as_raw_fd()));
            }
            if let Some(stream) = &mut port.stream {
                let _ = stream.listener.deregister(registry);
                if let Some(conn) = &mut stream.conn {
                    let _ = conn.deregister(registry);
                }
            }
        }
        // Its last counts go to it, not to the next port under its id; then the mirror
        // forgets it and starts the id's next generation (in the engine), and the workers
        // close their queues of it.
        self.fold_workers();
        self.engine.remove_port(id);
        for worker in &self.workers {
            worker.send(worker::Command::RemovePort(id));
        }
    }

    /// Adds what the workers counted since last time to the engine's counters.
    fn fold_workers(&mut self) {
        for worker in &mut self.workers {
            for index in 0..self.ports.len() {
                let port = PortId(index as u16);
                let Some(counts) = worker.fold(port) else {
                    continue;
                };
                self.engine.record_worker_rx(
                    port,
                    (counts.rx_packets, counts.rx_bytes),
                    counts.forwarded,
                    counts.handed_over,
                );
                self.engine
                    .record_tx(port, counts.tx_packets, counts.tx_bytes as usize);
                self.engine
                    .record_drops(port, DropReason::TxError, counts.tx_errors);
                self.engine
                    .record_drops(port, DropReason::HandoverFull, counts.handover_full);
                self.engine.record_worker_nat(port, counts.translated);
                self.engine
                    .record_drops(port, DropReason::NotForUs, counts.not_for_us);
                self.engine
                    .record_drops(port, DropReason::Truncated, counts.truncated);
                for capture in &mut self.captures {
                    if capture.port == port || capture.port == capture::GATEWAY {
                        capture.dropped += counts.capture_missed;
                    }
                }
                if let Some(session) = self
                    .tracing
                    .as_mut()
                    .filter(|s| s.port.is_none_or(|p| p == port))
                {
                    session.missed += counts.trace_missed;
                }
            }
        }
        let now = Instant::now();
        for view in &self.shard_views {
            for (port, reason, count) in view.take_drops() {
                self.engine.record_worker_drops(now, port, reason, count);
            }
        }
    }

    /// Handles up to [`RX_BUDGET`] frames from each worker's hand-over channel, as if read
    /// from queue 0 of their port; false if any is left.
    fn serve_handovers(&mut self, now: Instant) -> bool {
        let mut drained = true;
        for w in 0..self.workers.len() {
            for _ in 0..RX_BUDGET {
                let Ok(mut handed) = self.workers[w].handed.try_recv() else {
                    break;
                };
                let current = self
                    .engine
                    .fdb()
                    .mirrored()
                    .is_some_and(|m| m.generation(handed.port) == handed.generation);
                let frame = &mut handed.buf[..handed.len];
                match handed.purpose {
                    // Of a port since removed (its id perhaps given to another): dropped.
                    _ if !current => {}
                    worker::Purpose::Handle => {
                        let caps = PortCaps::vnet(true);
                        self.forward(now, handed.port, caps, frame);
                        // At once: handling it may have published its connection, whose next
                        // packets the worker then sends itself; this one must not come after.
                        self.flush_tx();
                    }
                    // What a worker's socket NAT took or sent: the port's capture and the
                    // gateway's (the gateway is the one it talks to); what it took, the trace.
                    worker::Purpose::Taken | worker::Purpose::Sent => {
                        if let Some(frame) = frame.get(vnet::LEN..) {
                            self.record_capture(handed.port, frame);
                            self.record_capture(capture::GATEWAY, frame);
                        }
                        if handed.purpose == worker::Purpose::Taken {
                            self.trace_taken(handed.port, w + 1, &handed.buf[..handed.len]);
                        }
                    }
                }
                let _ = self.workers[w].free.send(handed.buf);
            }
            drained &= self.workers[w].handed.is_empty();
        }
        drained
    }

    /// Turns SIGINT and SIGTERM into a clean stop, and SIGUSR1 into a call of `run`'s report.
    pub fn install_signal_handlers(&mut self) -> io::Result<()> {
        let (tx, rx) = std::os::unix::net::UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        let mut rx = UnixStream::from_std(rx);
        self.poll
            .registry()
            .register(&mut rx, SIGNALS, Interest::READABLE)?;
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, self.shutdown.clone())?;
            signal_hook::low_level::pipe::register(signal, tx.try_clone()?)?;
        }
        signal_hook::flag::register(signal_hook::consts::SIGUSR1, self.report.clone())?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGUSR1, tx)?;
        self.signals = Some(rx);
        Ok(())
    }

    /// Listens for control requests on the unix socket `path` (mode 0600; a stale socket is
    /// replaced). Each connection sends one request line and gets one answer from `run`'s
    /// `answer`. The socket file is removed when the datapath is dropped.
    pub fn listen_control(&mut self, path: &Path) -> io::Result<()> {
        let listener = bind_unix(path, Some(0o600)).map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse => io::Error::new(
                e.kind(),
                "another switchyard answers there: is this network already running?",
            ),
            _ => e,
        })?;
        self.listeners.control = Some(mio::net::UnixListener::from_std(listener));
        self.control_path = Some(path.to_path_buf());
        Ok(())
    }

    /// Keeps the DHCP leases in `path` (dnsmasq's format), written by a thread of its own; a
    /// lease-changing DHCP reply leaves only once the file holding it is on disk. The engine
    /// must have DHCP enabled with durable replies.
    pub fn persist_leases(&mut self, path: &Path) -> io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let first = self.engine.dhcp().map_or(0, |d| d.server().generation());
        self.leases = Some(LeaseWriter::spawn(
            path.to_path_buf(),
            self.waker.clone(),
            first,
        )?);
        Ok(())
    }

    /// Opens the host sockets (IPv4, and IPv6 where the host has it) that the DNS forwarder's
    /// upstream queries leave from, in the calling thread's network namespace.
    pub fn enable_upstream_dns(&mut self) -> io::Result<()> {
        let any4 = std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0));
        let any6 = std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
        let mut v4 = mio::net::UdpSocket::bind(any4)?;
        self.poll
            .registry()
            .register(&mut v4, UPSTREAM_V4, Interest::READABLE)?;
        self.upstream = vec![v4];
        if let Ok(mut v6) = mio::net::UdpSocket::bind(any6) {
            self.poll
                .registry()
                .register(&mut v6, UPSTREAM_V6, Interest::READABLE)?;
            self.upstream.push(v6);
        }
        Ok(())
    }

    /// Forwards host connections to `forward.host` to the guest at `forward.guest` (socket
    /// NAT only).
    pub fn add_forward(&mut self, forward: egress::Forward) -> io::Result<()> {
        if self.engine.socket_nat_mut().is_none() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "port forwarding needs socket NAT (<forward mode='nat'> without an address)",
            ));
        }
        self.egress.add_forward(self.poll.registry(), forward)
    }

    /// Stops forwarding `proto` `host`; false when it was not forwarded.
    pub fn remove_forward(&mut self, proto: &str, host: std::net::SocketAddr) -> bool {
        self.egress
            .remove_forward(self.poll.registry(), proto, host)
    }

    pub fn forwards(&self) -> Vec<egress::Forward> {
        self.egress.forwards().copied().collect()
    }

    /// Takes the DNS upstreams from the `nameserver` lines of `path` (a resolv.conf), now and
    /// whenever the file changes.
    pub fn watch_resolv_conf(&mut self, path: &Path) {
        self.resolv = Some(ResolvWatch {
            path: path.to_path_buf(),
            stamp: None,
            next_check: Instant::now(),
        });
        self.check_resolv_conf(Instant::now());
    }

    fn check_resolv_conf(&mut self, now: Instant) {
        let Some(watch) = &mut self.resolv else {
            return;
        };
        if now < watch.next_check {
            return;
        }
        watch.next_check = now + RESOLV_CHECK;
        let stamp = std::fs::metadata(&watch.path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if stamp == watch.stamp {
            return;
        }
        watch.stamp = stamp;
        let servers = std::fs::read_to_string(&watch.path)
            .map(|text| parse_resolv_conf(&text))
            .unwrap_or_default();
        if let Some(dns) = self.engine.dns_mut() {
            dns.server_mut().set_upstreams(servers);
        }
    }

    /// Reads upstream DNS answers (within a budget) and sends the queries the forwarder asks
    /// for.
    fn exchange_upstream(&mut self, now: Instant) {
        if std::mem::take(&mut self.upstream_ready) {
            for socket in &self.upstream {
                let mut drained = false;
                for _ in 0..UPSTREAM_BUDGET {
                    match socket.recv_from(&mut self.scratch) {
                        Ok((n, from)) => {
                            self.engine
                                .handle_upstream_response(now, from, &self.scratch[..n]);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            drained = true;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        // An ICMP error for an earlier query (port unreachable): the
                        // forwarder's timeout moves on to the next server.
                        Err(_) => {}
                    }
                }
                // Edge-triggered: a socket not drained gets another turn without a new event.
                self.upstream_ready |= !drained;
            }
        }
        while let Some((to, query)) = self.engine.poll_upstream_query() {
            let socket = match to {
                std::net::SocketAddr::V4(_) => self.upstream.first(),
                std::net::SocketAddr::V6(_) => self.upstream.get(1),
            };
            if let Some(socket) = socket {
                // A failed send is a lost datagram: the forwarder's timeout covers it.
                let _ = socket.send_to(&query, to);
            }
        }
    }

    /// Hands changed leases to the writer, and releases replies whose leases are on disk.
    fn sync_leases(&mut self) {
        let Some(writer) = &mut self.leases else {
            return;
        };
        if let Some(next) = self.engine.poll_lease_write(Instant::now())
            && let Some(tx) = &writer.tx
        {
            let _ = tx.send(next);
        }
        let written = writer.written.load(Ordering::SeqCst);
        if written > writer.reported {
            writer.reported = written;
            self.engine.handle_lease_written(written);
        }
    }

    /// Serves `GET /metrics` (Prometheus text, from `run`'s answer to `metrics`) over HTTP on
    /// `addr`, which must be a loopback address.
    pub fn listen_metrics(&mut self, addr: std::net::SocketAddr) -> io::Result<()> {
        if !addr.ip().is_loopback() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "metrics listen on loopback only",
            ));
        }
        self.listeners.metrics = Some(mio::net::TcpListener::bind(addr)?);
        Ok(())
    }

    /// Runs until [`Handle::shutdown`] or a termination signal; `report` is called with the
    /// engine on SIGUSR1, `answer` with each control request line (a metrics scrape asks
    /// [`control::METRICS_REQUEST`]). The control and metrics sockets are served from here
    /// on, by a thread of their own ([`control`]).
    pub fn run(
        &mut self,
        mut report: impl FnMut(&Datapath),
        mut answer: impl FnMut(&mut Datapath, &str) -> control::Answer,
    ) -> io::Result<()> {
        if !self.listeners.is_empty() {
            let listeners = std::mem::take(&mut self.listeners);
            let (thread, requests) = control::ControlThread::spawn(listeners, self.waker.clone())?;
            self.control_thread = Some(thread);
            self.requests = Some(requests);
        }
        // After the control thread started: it stays an ordinary thread. Checked before the
        // datapath started (`Placement::check`): a failure now (the process's CPUs changed
        // since) is logged, and the engine runs where it is, as a worker would.
        if let Err(e) = self.placement.apply(0) {
            eprintln!("switchyard: the engine's thread: {e}");
        }
        while !self.shutdown.load(Ordering::SeqCst) {
            if let Err(e) = self.turn(None) {
                self.stop_control();
                return Err(e);
            }
            if self.report.swap(false, Ordering::SeqCst) {
                self.fold_workers();
                report(self);
            }
            self.serve_requests(&mut answer);
        }
        self.stop_control();
        // What the workers counted last, for the report on exit.
        self.fold_workers();
        Ok(())
    }

    /// Nothing is answered any more: clients are refused rather than left waiting.
    fn stop_control(&mut self) {
        self.control_thread = None;
        self.requests = None;
    }

    /// Answers the control thread's waiting requests, at most
    /// [`control::MAX_REQUESTS_PER_TURN`] (the next poll does not sleep if more wait).
    fn serve_requests(&mut self, answer: &mut impl FnMut(&mut Datapath, &str) -> control::Answer) {
        let mut served = 0;
        while served < control::MAX_REQUESTS_PER_TURN {
            let Some(request) = self.requests.as_ref().and_then(|r| r.try_recv().ok()) else {
                break;
            };
            if served == 0 {
                self.fold_workers();
            }
            let _ = request.reply.send(answer(self, &request.line));
            served += 1;
        }
        if served == 0 {
            return;
        }
        if let Some(thread) = &self.control_thread {
            thread.wake();
        }
        if self.requests.as_ref().is_some_and(|r| !r.is_empty()) {
            let _ = self.waker.wake();
        }
    }

    /// Traces the next `count` frames that enter `port` (any port when `None`) and pass
    /// `filter`; see [`crate::trace`].
    pub fn start_trace(&mut self, port: Option<PortId>, count: u64, filter: crate::trace::Filter) {
        self.tracing = Some(TraceSession {
            port,
            filter,
            remaining: count,
            records: VecDeque::new(),
            seq: 0,
            dropped: 0,
            missed: 0,
        });
    }

    /// The traces recorded since the last read, then a line `remaining N dropped M missed
    /// K`: frames still to trace, traced frames dropped because the reader fell behind, and
    /// frames workers could not copy for the trace; `None` when no trace runs.
    pub fn read_trace(&mut self) -> Option<String> {
        let session = self.tracing.as_mut()?;
        let mut out: String = session.records.drain(..).collect();
        out.push_str(&format!(
            "remaining {} dropped {} missed {}\n",
            session.remaining, session.dropped, session.missed
        ));
        Some(out)
    }

    /// Runs `frame` through the pipeline as if it had entered `ingress`, traced, and sends
    /// nothing (like `ovs-appctl ofproto/trace`). The pipeline's state moves as it would: a
    /// MAC is learned, a flow created. Returns the rendered trace.
    pub fn inject_trace(&mut self, now: Instant, ingress: PortId, frame: &[u8]) -> String {
        let mut buf = frame.to_vec();
        self.engine.set_tracing(true);
        let verdict = self
            .engine
            .handle_frame(now, ingress, &VnetHdr::default(), &mut buf);
        let trace = self.engine.take_trace();
        self.engine.set_tracing(false);
        // Frames the engine queued of its own because of it are not sent either.
        while self.engine.poll_transmit().is_some() {}
        let engine = &self.engine;
        let name = |p: PortId| engine.port(p).map(|s| s.name.clone()).unwrap_or_default();
        match trace {
            Some(trace) => format!("{}    (injected: nothing was sent)\n", trace.render(name)),
            None => format!("verdict {verdict:?}\n"),
        }
    }

    pub fn stop_trace(&mut self) {
        self.tracing = None;
        self.engine.set_tracing(false);
    }

    /// Renders the engine's trace of the frame just handled.
    fn finish_trace(&mut self, verdict: Verdict) {
        let trace = self.engine.take_trace();
        self.engine.set_tracing(false);
        let (Some(trace), Some(session)) = (trace, self.tracing.as_mut()) else {
            return;
        };
        let engine = &self.engine;
        let name = |p: PortId| engine.port(p).map(|s| s.name.clone()).unwrap_or_default();
        let mut text = trace.render(name);
        if verdict == Verdict::Flood {
            let to: Vec<String> = engine
                .ports()
                .filter(|(id, _)| *id != trace.ingress && engine.is_switch_port(*id))
                .map(|(id, p)| format!("{id} ({})", p.name))
                .collect();
            if to.is_empty() {
                text.push_str("    flooded to: no other switch port\n");
            } else {
                text.push_str(&format!("    flooded to: {}\n", to.join(", ")));
            }
        }
        session.keep(&text);
    }

    /// Traces a frame a worker's socket NAT took from `port` (`buf`: virtio-net header
    /// first). The engine did not handle it, so the trace says who did.
    fn trace_taken(&mut self, port: PortId, worker: usize, buf: &[u8]) {
        let (Some(session), Some(frame)) = (self.tracing.as_mut(), buf.get(vnet::LEN..)) else {
            return;
        };
        if !session.wants(port, frame) {
            return;
        }
        let trace = crate::trace::FrameTrace {
            ingress: port,
            before: crate::trace::describe(frame, &VnetHdr::parse(buf).unwrap_or_default()),
            decisions: Vec::new(),
            after: None,
            verdict: format!(
                "taken by worker {worker}'s socket NAT (a TCP connection it holds or opens)"
            ),
            originated: 0,
        };
        let engine = &self.engine;
        let name = |p: PortId| engine.port(p).map(|s| s.name.clone()).unwrap_or_default();
        session.keep(&trace.render(name));
    }

    /// Starts capturing the frames of `port`, both ways (see [`capture`]).
    pub fn start_capture(&mut self, port: PortId) -> Result<(), String> {
        if port != capture::GATEWAY && self.ports.get(port.0 as usize).is_none_or(Option::is_none) {
            return Err(format!("no port {port}"));
        }
        if self.captures.iter().any(|c| c.port == port) {
            return Err(format!("port {port} is already being captured"));
        }
        self.captures.push(capture::Capture::new(port));
        self.mark_captured(port, true);
        Ok(())
    }

    /// What the capture of `port` holds, taken (see [`capture::Capture::drain_text`]).
    pub fn read_capture(&mut self, port: PortId) -> Option<String> {
        let c = self.captures.iter_mut().find(|c| c.port == port)?;
        Some(c.drain_text())
    }

    /// Ends the capture of `port`: (frames captured, frames dropped).
    pub fn stop_capture(&mut self, port: PortId) -> Option<(u64, u64)> {
        let at = self.captures.iter().position(|c| c.port == port)?;
        let c = self.captures.swap_remove(at);
        self.mark_captured(port, false);
        Some((c.captured, c.dropped))
    }

    /// Tells the workers whether `port` (or the gateway) is captured, so they copy what they
    /// handle of it without the engine ([`worker::Purpose`]).
    fn mark_captured(&self, port: PortId, on: bool) {
        if let Some(mirror) = self.engine.fdb().mirrored() {
            let port = (port != capture::GATEWAY).then_some(port);
            mirror.set_captured(port, on);
        }
    }

    fn record_capture(&mut self, port: PortId, frame: &[u8]) {
        if let Some(c) = self.captures.iter_mut().find(|c| c.port == port) {
            c.record(frame);
        }
    }

    /// The tap ports: (port, tap name, its namespace, the MAC asked for its kernel side).
    pub fn taps(
        &self,
    ) -> Vec<(
        PortId,
        String,
        Option<PathBuf>,
        Option<crate::wire::MacAddr>,
    )> {
        self.ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let tap = p.as_ref()?.tap.as_ref()?;
                Some((
                    PortId(i as u16),
                    tap.name.clone(),
                    tap.netns.clone(),
                    tap.mac,
                ))
            })
            .collect()
    }

    /// One turn of the loop: wait for readiness (at most `max_wait`, and never past the next
    /// timer), serve ready ports within their budget, run due timers.
    pub fn turn(&mut self, max_wait: Option<Duration>) -> io::Result<()> {
        for worker in &mut self.workers {
            worker.start(&self.placement)?;
        }
        let timeout = if self.ready.is_empty()
            && !self.upstream_ready
            && !self.egress.has_pending()
            && !self.handover_pending
            && !self.engine.socket_nat().is_some_and(|s| s.has_actions())
        {
            let resolv = self.resolv.as_ref().map(|w| w.next_check);
            let timer = [
                self.engine.poll_timeout(),
                resolv,
                Some(self.next_port_check),
            ]
            .into_iter()
            .flatten()
            .min()
            .map(|t| t.saturating_duration_since(Instant::now()));
            match (timer, max_wait) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        } else {
            Some(Duration::ZERO)
        };
        let spinning = self
            .last_busy
            .is_some_and(|at| at.elapsed() < self.busy_poll);
        let timeout = if spinning {
            Some(Duration::ZERO)
        } else {
            timeout
        };
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if !self.busy_poll.is_zero() && !self.events.is_empty() {
            self.last_busy = Some(Instant::now());
        }
        let mut drain_signals = false;
        let mut accepts = Vec::new();
        for event in self.events.iter() {
            match event.token() {
                WAKER => {}
                SIGNALS => drain_signals = true,
                UPSTREAM_V4 | UPSTREAM_V6 => self.upstream_ready = true,
                _ if self.egress.handle_event(event) => {}
                Token(index) if (LISTENER_BASE..2 * MAX_PORTS).contains(&index) => {
                    accepts.push(index - LISTENER_BASE);
                }
                Token(index) => {
                    if event.is_writable()
                        && let Some(stream) = self
                            .ports
                            .get_mut(index)
                            .and_then(Option::as_mut)
                            .and_then(|p| p.stream.as_mut())
                    {
                        stream.flush();
                    }
                    if self.ports.get(index).is_some_and(Option::is_some) {
                        self.ready.mark(PortId(index as u16));
                    }
                }
            }
        }
        for index in accepts {
            self.accept_stream(index);
        }
        if drain_signals && let Some(rx) = &mut self.signals {
            let mut sink = [0u8; 64];
            while matches!(rx.read(&mut sink), Ok(n) if n > 0) {}
        }

        let now = Instant::now();
        for _ in 0..self.ready.len() {
            let Some(id) = self.ready.pop() else {
                break;
            };
            if !self.serve_port(now, id) {
                self.ready.mark(id);
            }
        }
        if !self.workers.is_empty() {
            self.handover_pending = !self.serve_handovers(now);
            if let Some(mirror) = self.engine.fdb().mirrored() {
                mirror.set_observed(!self.captures.is_empty() || self.tracing.is_some());
                mirror.set_traced(self.tracing.as_ref().is_some_and(|t| t.remaining > 0));
            }
            if now >= self.next_fold {
                self.next_fold = now + FOLD_INTERVAL;
                self.fold_workers();
            }
        }
        let now = Instant::now();
        if self.engine.poll_timeout().is_some_and(|t| t <= now) {
            self.engine.handle_timeout(now);
        }
        self.check_resolv_conf(now);
        self.check_ports(now);
        self.exchange_upstream(now);
        if let Some(nat) = self.engine.socket_nat_mut() {
            self.egress.serve(now, nat, self.poll.registry());
        }
        self.sync_leases();
        while let Some(out) = self.engine.poll_transmit() {
            self.transmit_outgoing(&out);
            self.engine.recycle(out.frame);
        }
        while let Some(line) = self.engine.poll_notice() {
            eprintln!("switchyard: {line}");
        }
        self.flush_tx();
        for port in std::mem::take(&mut self.dead_ports) {
            let name = self.engine.port(port).map(|p| p.name.clone());
            let lost = self
                .ports
                .get(port.0 as usize)
                .and_then(Option::as_ref)
                .and_then(|p| p.tap.as_ref())
                .and_then(LostTap::of);
            eprintln!(
                "switchyard: port {port} ({}): its device is gone; removed{}",
                name.unwrap_or_default(),
                if lost.is_some() {
                    " (it is attached again when it comes back)"
                } else {
                    ""
                }
            );
            self.remove_port(port);
            self.lost_taps.extend(lost);
        }
        Ok(())
    }

    /// Once per [`PORT_CHECK`]: a tap whose device is gone is found even when no frame is sent
    /// to it (the kernel does not always wake its poller), and lost taps whose kernel side is
    /// back are opened again.
    fn check_ports(&mut self, now: Instant) {
        if now < self.next_port_check {
            return;
        }
        self.next_port_check = now + PORT_CHECK;
        for (index, port) in self.ports.iter().enumerate() {
            let Some(IoPort {
                tap: Some(tap),
                file: Some(file),
                ..
            }) = port
            else {
                continue;
            };
            let id = PortId(index as u16);
            if (!sys::tap_is_attached(file.as_fd()) || namespace_abandoned(tap))
                && !self.dead_ports.contains(&id)
            {
                self.dead_ports.push(id);
            }
        }
        for mut lost in std::mem::take(&mut self.lost_taps) {
            if !lost.is_back() {
                self.lost_taps.push(lost);
                continue;
            }
            match self.open_tap(&lost.spec) {
                Ok(id) => eprintln!(
                    "switchyard: port {id} ({}): its device is back; attached again",
                    lost.spec
                ),
                Err(e) => {
                    let why = e.to_string();
                    if lost.failed.as_ref() != Some(&why) {
                        eprintln!("switchyard: {}: cannot attach again: {why}", lost.spec);
                        lost.failed = Some(why);
                    }
                    self.lost_taps.push(lost);
                }
            }
        }
    }

    /// Writes a frame the engine originated (ICMP error, ARP) or released (held for ARP).
    fn transmit_outgoing(&mut self, out: &Outgoing) {
        let Some(port) = self
            .ports
            .get_mut(out.port.0 as usize)
            .and_then(Option::as_mut)
        else {
            return;
        };
        let len = out.frame.len();
        let offloaded = out.vnet.is_gso() || out.vnet.needs_csum();
        let result = if offloaded && !port.caps.takes(&out.vnet) {
            // To a port without vnet headers, or a UDP super-frame (socket NAT's) to a tap
            // whose kernel has no USO: its datagrams.
            write_without_offloads(port, &out.vnet, &out.frame, &mut self.scratch)
                .map_err(|_| io::Error::other("offload"))
        } else if port.caps.vnet_hdr {
            let buf = &mut self.scratch[..vnet::LEN + len];
            out.vnet.emit(buf);
            buf[vnet::LEN..].copy_from_slice(&out.frame);
            port.send(buf).map(|()| (1, len))
        } else {
            port.send(&out.frame).map(|()| (1, len))
        };
        match result {
            Ok((packets, bytes)) => {
                self.engine.record_tx(out.port, packets as u64, bytes);
                if !self.captures.is_empty() {
                    self.record_capture(out.port, &out.frame);
                    self.record_capture(capture::GATEWAY, &out.frame);
                }
            }
            Err(e) => {
                self.engine.record_drop(out.port, DropReason::TxError);
                self.note_tx_error(out.port, &e);
            }
        }
    }

    /// Reads and forwards up to [`RX_BUDGET`] frames from `id`; true when drained.
    fn serve_port(&mut self, now: Instant, id: PortId) -> bool {
        let Some(port) = self.ports.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return true;
        };
        if let Some(ring) = port.ring.take() {
            let drained = self.serve_ring(now, id, ring);
            self.flush_tx();
            return drained;
        }
        if port.tx_batch.is_some() {
            let drained = self.serve_batched_reads(now, id);
            self.flush_tx();
            return drained;
        }
        let is_stream = port.stream.is_some();
        // The buffer leaves `self` while a frame is handled, so the frame and the ports can be
        // borrowed at once; taking an empty box does not allocate.
        let mut rx_buf = std::mem::take(&mut self.rx_buf);
        let drained = if is_stream {
            self.serve_stream(now, id, &mut rx_buf)
        } else {
            self.serve_reads(now, id, &mut rx_buf)
        };
        self.rx_buf = rx_buf;
        self.flush_tx();
        drained
    }

    /// Forwards up to [`RX_BUDGET`] frames of AF_PACKET port `id`, read [`sys::BATCH`] at a
    /// time; true when drained (a short batch says nothing more waits).
    fn serve_batched_reads(&mut self, now: Instant, id: PortId) -> bool {
        let Some(mut rx) = self.rx_batch.take() else {
            return true;
        };
        let mut served = 0;
        let drained = loop {
            if served >= RX_BUDGET {
                break false;
            }
            let Some(port) = self.ports.get(id.0 as usize).and_then(Option::as_ref) else {
                break true;
            };
            let caps = port.caps;
            let Some(file) = &port.file else {
                break true;
            };
            let got = match sys::recv_batch(file.as_fd(), &mut rx.bufs, &mut rx.got) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if is_gone(&e) {
                        self.dead_ports.push(id);
                    }
                    // WouldBlock; or a NIC's link went down (ENETDOWN): the port stays.
                    break true;
                }
            };
            for (buf, frame) in rx.bufs.iter_mut().zip(&rx.got[..got]) {
                if frame.truncated {
                    self.engine.record_drop(id, DropReason::Truncated);
                    continue;
                }
                self.forward(now, id, caps, &mut buf[..frame.len]);
            }
            served += got;
            if got < rx.bufs.len() {
                break true;
            }
        };
        self.rx_batch = Some(rx);
        drained
    }

    /// Sends what waits in the ports' batches and counts what their flushes did.
    fn flush_tx(&mut self) {
        while let Some(id) = self.tx_pending.pop() {
            let Some(port) = self.ports.get_mut(id.0 as usize).and_then(Option::as_mut) else {
                continue;
            };
            port.flush();
            let done = std::mem::take(&mut port.flushed);
            let error = port.flush_error.take();
            if done.frames > 0 {
                self.engine.record_tx(id, done.frames as u64, done.bytes);
            }
            self.engine
                .record_drops(id, DropReason::TxError, done.failed as u64);
            if let Some(e) = error {
                self.note_tx_error(id, &e);
            }
        }
    }

    fn serve_reads(&mut self, now: Instant, id: PortId, rx_buf: &mut [u8]) -> bool {
        for _ in 0..RX_BUDGET {
            let Some(port) = self.ports.get(id.0 as usize).and_then(Option::as_ref) else {
                return true;
            };
            let caps = port.caps;
            let Some(file) = &port.file else {
                return true;
            };
            let n = match (&*file).read(rx_buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_gone(&e) => {
                    // The device went away (tap deleted): the port is dead.
                    self.dead_ports.push(id);
                    return true;
                }
                Err(_) => {
                    // A NIC's link went down (ENETDOWN on its packet socket), or another
                    // passing error: the port stays, and reads on when frames come again.
                    return true;
                }
            };
            self.forward(now, id, caps, &mut rx_buf[..n]);
        }
        false
    }

    /// Forwards up to [`RX_BUDGET`] frames a VM sent on stream port `id`, in place.
    /// The frame is copied out of the stream's buffer, so the stream stays in its port
    /// (a reply may go straight back to it).
    fn serve_stream(&mut self, now: Instant, id: PortId, rx_buf: &mut [u8]) -> bool {
        let caps = PortCaps::PLAIN;
        for _ in 0..RX_BUDGET {
            let Some(stream) = self
                .ports
                .get_mut(id.0 as usize)
                .and_then(Option::as_mut)
                .and_then(|p| p.stream.as_mut())
            else {
                return true;
            };
            match stream.read_frame(rx_buf) {
                Ok(n) => self.forward(now, id, caps, &mut rx_buf[..n]),
                Err(_) => return true,
            }
        }
        false
    }

    /// Forwards up to [`RX_BUDGET`] frames from the ring of `id`, in place.
    fn serve_ring(&mut self, now: Instant, id: PortId, mut ring: sys::RxRing) -> bool {
        let caps = PortCaps::vnet(true);
        let mut drained = false;
        for _ in 0..RX_BUDGET {
            let Some(frame) = ring.next_frame() else {
                drained = true;
                break;
            };
            if frame.truncated {
                self.engine.record_drop(id, DropReason::RingTruncated);
                continue;
            }
            self.forward(now, id, caps, frame.buf);
        }
        if let Some(port) = self.ports.get_mut(id.0 as usize).and_then(Option::as_mut) {
            port.ring = Some(ring);
        }
        drained
    }

    /// Hands the frame in `buf` (after its virtio-net header when the port has one) to the
    /// engine and carries out the verdict.
    fn forward(&mut self, now: Instant, ingress: PortId, caps: PortCaps, buf: &mut [u8]) {
        let (hdr, frame_start) = if caps.vnet_hdr {
            match VnetHdr::parse(buf) {
                Ok(hdr) => (hdr, vnet::LEN),
                Err(_) => {
                    self.engine.record_drop(ingress, DropReason::BadVnetHeader);
                    return;
                }
            }
        } else {
            (VnetHdr::default(), 0)
        };
        // The gateway's capture: frames it answers or keeps, as they came in.
        let mut to_gateway = None;
        if !self.captures.is_empty() {
            self.record_capture(ingress, &buf[frame_start..]);
            if self.captures.iter().any(|c| c.port == capture::GATEWAY) {
                to_gateway = Some(buf[frame_start..].to_vec());
            }
        }
        let traced = (self.tracing.as_ref()).is_some_and(|t| t.wants(ingress, &buf[frame_start..]));
        if traced {
            self.engine.set_tracing(true);
        }
        let verdict = self
            .engine
            .handle_frame(now, ingress, &hdr, &mut buf[frame_start..]);
        if traced {
            self.finish_trace(verdict);
        }
        if let Some(frame) = to_gateway
            && matches!(verdict, Verdict::Reply | Verdict::Consumed)
        {
            self.record_capture(capture::GATEWAY, &frame);
            if verdict == Verdict::Reply {
                self.record_capture(capture::GATEWAY, &buf[frame_start..]);
            }
        }
        match verdict {
            Verdict::Forward(egress) => self.transmit(egress, &hdr, buf, frame_start),
            Verdict::Reply => self.transmit(ingress, &hdr, buf, frame_start),
            Verdict::Flood => {
                for index in 0..self.ports.len() {
                    let port = PortId(index as u16);
                    if index != ingress.0 as usize
                        && self.ports[index].is_some()
                        && self.engine.is_switch_port(port)
                    {
                        self.transmit(port, &hdr, buf, frame_start);
                    }
                }
            }
            Verdict::Drop(_) | Verdict::Consumed => {}
        }
    }

    /// Writes the frame at `buf[frame_start..]` to `egress`, adapting its offload state to
    /// what the port can take.
    fn transmit(&mut self, egress: PortId, hdr: &VnetHdr, buf: &[u8], frame_start: usize) {
        let Some(port) = self
            .ports
            .get_mut(egress.0 as usize)
            .and_then(Option::as_mut)
        else {
            return;
        };
        let frame = &buf[frame_start..];
        let offloaded = hdr.is_gso() || hdr.needs_csum();
        let result = if offloaded && !port.caps.takes(hdr) {
            // To a port without vnet headers, or a UDP super-frame to a tap whose kernel has
            // no USO: segmented, checksums completed, in software.
            match write_without_offloads(port, hdr, frame, &mut self.scratch) {
                Ok(sent) => Ok(sent),
                Err(reason) => {
                    self.engine.record_drop(egress, reason);
                    return;
                }
            }
        } else if port.caps.vnet_hdr && frame_start == vnet::LEN {
            if port.queue(buf) {
                // Sent and counted at the end of the port's read batch ([`Datapath::flush_tx`]);
                // a capture has it now.
                if !self.tx_pending.contains(&egress) {
                    self.tx_pending.push(egress);
                }
                if !self.captures.is_empty() {
                    self.record_capture(egress, &buf[frame_start..]);
                }
                return;
            }
            port.send(buf).map(|()| (1, frame.len()))
        } else if port.caps.vnet_hdr {
            // A plain frame to a vnet port: prepend an empty header.
            let out = &mut self.scratch[..vnet::LEN + frame.len()];
            out[..vnet::LEN].fill(0);
            out[vnet::LEN..].copy_from_slice(frame);
            port.send(out).map(|()| (1, frame.len()))
        } else {
            port.send(frame).map(|()| (1, frame.len()))
        };
        match result {
            Ok((packets, bytes)) => {
                self.engine.record_tx(egress, packets as u64, bytes);
                if !self.captures.is_empty() {
                    self.record_capture(egress, &buf[frame_start..]);
                }
            }
            Err(e) => {
                self.engine.record_drop(egress, DropReason::TxError);
                self.note_tx_error(egress, &e);
            }
        }
    }

    /// A tap whose device is gone (its namespace was deleted) answers EBADFD, and the kernel
    /// does not wake its poller: the first failed write marks the port dead, and it is
    /// removed at the end of the turn.
    fn note_tx_error(&mut self, port: PortId, error: &io::Error) {
        if is_gone(error) && !self.dead_ports.contains(&port) {
            self.dead_ports.push(port);
        }
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        // Stopped first: it may still be writing an answer.
        drop(self.control_thread.take());
        if let Some(path) = &self.control_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Whether `error` from a port's fd means its device is gone for good: a tap whose device was
/// deleted answers EBADFD; a NIC that was removed, ENODEV or ENXIO. (ENETDOWN is a link
/// that may come back.)
fn is_gone(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EBADFD | libc::ENODEV | libc::ENXIO)
    )
}

fn write_frame(file: &File, buf: &[u8]) -> io::Result<()> {
    loop {
        match (&*file).write(buf) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Completes the checksum of, or segments, an offloaded frame into `scratch` and writes the
/// result as plain frames (after an empty virtio-net header on a port that takes them).
/// Returns (frames written, bytes written).
fn write_without_offloads(
    port: &mut IoPort,
    hdr: &VnetHdr,
    frame: &[u8],
    scratch: &mut [u8],
) -> Result<(usize, usize), DropReason> {
    let at = if port.caps.vnet_hdr { vnet::LEN } else { 0 };
    scratch[..at].fill(0);
    if hdr.is_gso() {
        let mut segmenter =
            Segmenter::new(hdr, frame).map_err(|_| DropReason::OffloadUnsupported)?;
        if at + segmenter.max_segment_len() > scratch.len() {
            return Err(DropReason::OffloadUnsupported);
        }
        let (mut count, mut bytes) = (0, 0);
        while let Some(len) = segmenter.next_into(&mut scratch[at..]) {
            port.send(&scratch[..at + len])
                .map_err(|_| DropReason::TxError)?;
            count += 1;
            bytes += len;
        }
        return Ok((count, bytes));
    }
    let out = &mut scratch[at..at + frame.len()];
    out.copy_from_slice(frame);
    if hdr.needs_csum() {
        offload::complete_checksum(hdr, out).map_err(|_| DropReason::BadVnetHeader)?;
    }
    port.send(&scratch[..at + frame.len()])
        .map_err(|_| DropReason::TxError)?;
    Ok((1, frame.len()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::wire::checksum;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;

    /// A port over one end of a datagram socket pair (one frame per message, as a tap).
    fn port(vnet_hdr: bool) -> (IoPort, UnixDatagram) {
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        let caps = PortCaps {
            vnet_hdr,
            uso: vnet_hdr,
        };
        let port = IoPort::new(Some(File::from(OwnedFd::from(ours))), caps, None);
        (port, theirs)
    }

    /// A UDP super-frame of ten 1200-byte datagrams as socket NAT builds it for a guest.
    fn super_frame() -> (Vec<u8>, VnetHdr) {
        let mut f = vec![0u8; 42 + 12_000];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&(28u16 + 12_000).to_be_bytes());
        f[22] = 64;
        f[23] = 17;
        f[26..30].copy_from_slice(&[203, 0, 113, 1]);
        f[30..34].copy_from_slice(&[192, 168, 122, 10]);
        let c = checksum::checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f[34..36].copy_from_slice(&4433u16.to_be_bytes());
        f[36..38].copy_from_slice(&5000u16.to_be_bytes());
        f[38..40].copy_from_slice(&(8u16 + 12_000).to_be_bytes());
        let pseudo = checksum::pseudo_header_v4([203, 0, 113, 1], [192, 168, 122, 10], 17, 12_008);
        f[40..42].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
        for (i, b) in f[42..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let vnet = VnetHdr {
            flags: vnet::F_NEEDS_CSUM,
            gso_type: vnet::gso::UDP_L4,
            hdr_len: 42,
            gso_size: 1200,
            csum_start: 34,
            csum_offset: 6,
        };
        (f, vnet)
    }

    // A UDP super-frame is written whole only to a port that takes virtio GSO_UDP_L4 (a tap on
    // Linux 6.2 or later, an AF_PACKET socket); TSO frames and partial checksums to any port
    // with vnet headers.
    #[test]
    fn which_ports_take_which_offloads_as_they_are() {
        let (_, uso) = super_frame();
        let tso = VnetHdr {
            gso_type: vnet::gso::TCPV4,
            gso_size: 1448,
            ..VnetHdr::default()
        };
        assert!(PortCaps::vnet(true).takes(&uso));
        assert!(!PortCaps::vnet(false).takes(&uso), "a tap without USO");
        assert!(PortCaps::vnet(false).takes(&tso));
        assert!(!PortCaps::PLAIN.takes(&tso) && !PortCaps::PLAIN.takes(&uso));
    }

    /// A UDP super-frame for a port that cannot take it whole (no vnet headers, or a kernel
    /// that refused it) leaves as its ten datagrams, each verifying (RFC 768), after an empty
    /// virtio-net header where the port takes headers.
    #[test]
    fn a_super_frame_is_written_as_its_datagrams_with_or_without_vnet_headers() {
        let (frame, hdr) = super_frame();
        for vnet_hdr in [false, true] {
            let (mut port, peer) = port(vnet_hdr);
            let mut scratch = vec![0xeeu8; BUF_LEN];
            let sent = write_without_offloads(&mut port, &hdr, &frame, &mut scratch).unwrap();
            assert_eq!(sent, (10, 10 * (42 + 1200)));
            let at = if vnet_hdr { vnet::LEN } else { 0 };
            let mut buf = vec![0u8; BUF_LEN];
            let mut payload = Vec::new();
            for _ in 0..10 {
                let n = peer.recv(&mut buf).unwrap();
                assert_eq!(n, at + 42 + 1200, "vnet_hdr {vnet_hdr}");
                assert!(buf[..at].iter().all(|&b| b == 0), "an empty vnet header");
                let ip = &buf[at + 14..n];
                assert_eq!(checksum::checksum(&ip[..20]), 0);
                let sum = checksum::pseudo_header_v4(
                    [203, 0, 113, 1],
                    [192, 168, 122, 10],
                    17,
                    (ip.len() - 20) as u16,
                );
                assert_eq!(checksum::fold(checksum::accumulate(sum, &ip[20..])), 0xffff);
                payload.extend_from_slice(&ip[28..]);
            }
            assert_eq!(payload, frame[42..]);
        }
    }
}
