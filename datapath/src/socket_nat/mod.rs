//! Socket NAT: guests' connections leave through the host's own sockets.
//!
//! Packet NAT needs an external address of the engine's own and a NIC to put it on; a user
//! without root has neither. Here, as in slirp4netns and passt, each guest flow becomes a host
//! socket, so the host's address, routes and firewall apply and no privilege is needed:
//!
//! - **TCP** is terminated in the engine by smoltcp. A guest's SYN is held while the host
//!   socket connects; only when `connect()` succeeds does a listener for exactly that
//!   destination take the SYN and answer SYN-ACK, so a guest sees the same outcome a direct
//!   connection would (refused: a RST; unreachable: ICMP unreachable). Bytes then move between
//!   the smoltcp socket's buffers and the host socket, with no copy in between.
//! - **UDP**: one host socket per guest address and port (endpoint-independent mapping, RFC
//!   4787 REQ-1), bound inside `<nat><port>`; answers are filtered as packet NAT filters them.
//!   A guest's UDP super-frame (USO, from a `UDP_SEGMENT` send) is the datagrams it stands
//!   for, and leaves as them: UDP keeps message boundaries (RFC 768), a host socket would not.
//!   The other way, datagrams the host's kernel coalesced (UDP GRO, one read) reach the guest
//!   as one super-frame, which its kernel cuts into them again.
//! - **ICMP echo** goes out through unprivileged ping sockets where
//!   `net.ipv4.ping_group_range` allows, and is answered host-unreachable where not.
//!
//! The module is sans-IO: it asks for sockets and datagrams through [`Action`]s, moves stream
//! bytes through closures the I/O edge passes in, and is told what the sockets did. That keeps
//! every decision testable with fixtures and virtual time.

#[cfg(test)]
mod tests;

use crate::nat::packet::{self, Tuple};
use crate::nat::{Filtering, FlowRow, Timeouts};
use crate::port::{DropReason, PortId};
use crate::stack::{Clock, Queues};
use crate::wire::ipv4::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use crate::wire::vnet::gso;
use crate::wire::{MacAddr, VnetHdr, checksum, ethernet};
use serde::Serialize;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A TCP connection's buffer from the guest: the window it is offered, drained to the host
/// socket as fast as that takes it.
pub const TCP_RX_BUFFER: usize = 256 * 1024;
/// A TCP connection's buffer towards the guest: it holds what the guest has not acknowledged,
/// so it must cover the guest path's bandwidth-delay product (1 MiB measured 25% more
/// host-to-guest throughput than 256 KiB; 2 MiB little more). Pages are touched only as data
/// passes, so an idle connection costs little of it.
pub const TCP_TX_BUFFER: usize = 1024 * 1024;
/// Sockets kept for reuse after their connection ends, so a churn of short connections does
/// not allocate and zero half a megabyte each.
const SPARE_SOCKETS: usize = 16;
/// Addresses a UDP mapping remembers having sent to, for address-dependent filtering.
const UDP_REMOTES: usize = 16;
/// How often idle flows are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Eviction candidates kept at most (8 bytes each).
const MAX_CANDIDATES: usize = 1 << 20;

/// Ephemeral ports the gateway connects from when it forwards a host connection to a guest.
const FORWARD_PORTS: (u16, u16) = (32768, 60999);
/// The MSS the stack is told guests take: with it, the stack sends segments of up to 64 KiB,
/// which go to the guest as one TSO frame (segmented to the guest's real MSS by whoever must,
/// usually nobody: the guest's own kernel takes the super-frame whole).
const GSO_MSS: u16 = 65535 - 20 - 20;
/// The stack's packets may be this large (one IPv4 packet).
const STACK_MTU: usize = 65535;

/// What the engine needs to know to NAT through host sockets.
#[derive(Debug, Clone)]
pub struct SocketNatConfig {
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    /// The guest-side MTU: the largest IP packet the stack sends to a guest.
    pub mtu: u16,
    /// `<nat><port>`: the host ports UDP mappings are bound to.
    pub ports: (u16, u16),
    pub filtering: Filtering,
    pub max_flows: usize,
    pub max_flows_per_guest: usize,
    pub timeouts: Timeouts,
    /// `<sy:host-loopback/>`: the gateway address stands for the host's 127.0.0.1.
    pub host_loopback: bool,
}

impl SocketNatConfig {
    pub fn new(gateway: Ipv4Addr, prefix: u8) -> SocketNatConfig {
        SocketNatConfig {
            gateway,
            prefix,
            mtu: 1500,
            ports: (1024, 65535),
            filtering: Filtering::AddressAndPortDependent,
            max_flows: crate::nat::DEFAULT_MAX_FLOWS,
            max_flows_per_guest: crate::nat::DEFAULT_MAX_FLOWS_PER_GUEST,
            timeouts: Timeouts::default(),
            host_loopback: false,
        }
    }

    pub fn is_internal(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.gateway) & mask
    }
}

/// What a socket NAT makes of a guest's TCP segment ([`SocketNat::claim`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// A segment of a connection it holds.
    Held,
    /// A SYN for beyond the subnet (not for the gateway's own ports): a new connection.
    Opens,
    /// Anything else.
    Not,
}

/// A flow as the I/O edge names it: its slot and the slot's generation, so a late event for
/// an ended flow never reaches the flow that took its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowId {
    pub index: u32,
    pub generation: u32,
}

/// A host socket the I/O edge is asked to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostSocket {
    /// A non-blocking `connect()`; report with [`SocketNat::handle_opened`] when it completes.
    Tcp(SocketAddrV4),
    /// A UDP socket bound to `preferred` if free, else to another port of `range`.
    Udp { preferred: u16, range: (u16, u16) },
    /// An unprivileged ICMP echo socket (`socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)`).
    Ping,
}

/// What one packet from a guest asks a host datagram socket to send: `data` as one datagram,
/// or, for a UDP super-frame (USO: virtio `GSO_UDP_L4`, what a guest's `UDP_SEGMENT` send
/// becomes on a NIC that takes it), cut into datagrams of `segment` bytes, the last one
/// possibly shorter, as the guest's NIC would have cut it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagrams {
    pub data: Vec<u8>,
    /// Bytes per datagram; `data` is one datagram when it is no longer than this.
    pub segment: usize,
}

impl Datagrams {
    /// `data` as one datagram.
    pub fn one(data: Vec<u8>) -> Datagrams {
        let segment = data.len();
        Datagrams { data, segment }
    }

    /// How many datagrams.
    pub fn count(&self) -> usize {
        datagram_count(self.data.len(), self.segment)
    }

    /// The datagrams, in order, as slices of `data` (nothing is copied).
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let (len, segment) = (self.data.len(), self.segment.max(1));
        (0..self.count())
            .map(move |i| &self.data[(i * segment).min(len)..((i + 1) * segment).min(len)])
    }
}

/// The most payload one UDP datagram over IPv4 carries: the total length's 65535 less the
/// IPv4 and UDP headers. A super-frame to a guest holds no more either (its IPv4 total length
/// covers it all).
const MAX_UDP_PAYLOAD: usize = 65535 - 20 - 8;
/// The most datagrams one UDP super-frame to a guest holds: Linux refuses (`EINVAL`) a
/// virtio `GSO_UDP_L4` frame of more than `UDP_MAX_SEGMENTS`, 64 in older kernels (128 in
/// newer ones), and GRO never coalesces more than 64.
const MAX_SUPER_FRAME_SEGMENTS: usize = 64;
const _: () =
    assert!(ethernet::HEADER_LEN + 20 + 8 + MAX_UDP_PAYLOAD <= crate::engine::MAX_FRAME_LEN);

/// What reached a guest from one host read.
#[derive(Debug, Default, Clone, Copy)]
struct Delivered {
    datagrams: u64,
    bytes: u64,
}

/// How many datagrams `len` bytes make in `segment`-byte ones: an empty payload is still one
/// (empty) datagram.
fn datagram_count(len: usize, segment: usize) -> usize {
    len.div_ceil(segment.max(1)).max(1)
}

/// What the I/O edge must do for the socket NAT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Open(FlowId, HostSocket),
    /// Send datagrams (UDP payloads, or an ICMP echo message) on the flow's socket.
    SendTo(FlowId, SocketAddrV4, Datagrams),
    /// Send a guest's answer to a forwarded UDP port back from that port's listening socket
    /// (the I/O edge's index for it).
    SendFromForward(u32, SocketAddrV4, Datagrams),
    /// The guest finished sending: `shutdown(SHUT_WR)` the host socket.
    ShutdownWrite(FlowId),
    /// The flow ended: close its host socket.
    Close(FlowId),
}

/// What a stream transfer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transfer {
    pub bytes: usize,
    /// The host socket would block: wait for its readiness before trying again.
    pub blocked: bool,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct SocketNatCounters {
    pub tcp_connects: u64,
    pub tcp_established: u64,
    /// Host `connect()` refused: the guest got a RST.
    pub tcp_refused: u64,
    /// Host `connect()` failed otherwise: the guest got ICMP unreachable.
    pub tcp_unreachable: u64,
    /// A host socket failed mid-stream: the guest got a RST.
    pub tcp_host_errors: u64,
    /// Segments for no connection of ours, handed to the stack to answer with a RST.
    pub tcp_stray_segments: u64,
    /// SYN retransmissions while the host socket was still connecting.
    pub tcp_syn_while_connecting: u64,
    /// Segments whose TCP checksum did not verify.
    pub tcp_bad_checksum: u64,
    pub bytes_to_host: u64,
    pub bytes_from_host: u64,
    pub udp_mappings: u64,
    pub udp_datagrams_out: u64,
    /// UDP super-frames (USO) from guests, each sent as the `udp_datagrams_out` it holds.
    pub udp_super_frames_out: u64,
    /// Datagrams from host sockets to guests, coalesced or not.
    pub udp_datagrams_in: u64,
    /// UDP super-frames (GSO_UDP_L4) to guests, each holding several of `udp_datagrams_in`:
    /// datagrams the host's kernel coalesced (UDP GRO) and handed over in one read.
    pub udp_super_frames_in: u64,
    /// Host datagrams too long for an IPv4 packet to a guest, dropped.
    pub udp_oversize_in: u64,
    /// Host datagrams the filtering policy refused.
    pub udp_filtered: u64,
    /// Host UDP sockets that could not be bound in the port range.
    pub udp_bind_failed: u64,
    pub pings_out: u64,
    pub pings_in: u64,
    /// Echo requests answered unreachable because ping sockets are not allowed.
    pub ping_denied: u64,
    pub flows_expired: u64,
    pub table_full: u64,
    pub guest_limit: u64,
    /// Packets socket NAT cannot carry (fragments, ICMP other than echo, broadcast).
    pub unsupported: u64,
    pub port_forward_connections: u64,
    /// UDP and ping flows not assured (see [`SocketNat::evict_for_room`]) that gave up their
    /// place to a new flow at a cap.
    pub flows_evicted: u64,
}

impl SocketNatCounters {
    /// Adds `other`'s counts (another thread's socket NAT) to these.
    pub fn add(&mut self, other: &SocketNatCounters) {
        // Destructured, so that a new counter cannot be left out of the sum.
        let SocketNatCounters {
            tcp_connects,
            tcp_established,
            tcp_refused,
            tcp_unreachable,
            tcp_host_errors,
            tcp_stray_segments,
            tcp_syn_while_connecting,
            tcp_bad_checksum,
            bytes_to_host,
            bytes_from_host,
            udp_mappings,
            udp_datagrams_out,
            udp_super_frames_out,
            udp_datagrams_in,
            udp_super_frames_in,
            udp_oversize_in,
            udp_filtered,
            udp_bind_failed,
            pings_out,
            pings_in,
            ping_denied,
            flows_expired,
            table_full,
            guest_limit,
            unsupported,
            port_forward_connections,
            flows_evicted,
        } = other;
        self.tcp_connects += tcp_connects;
        self.tcp_established += tcp_established;
        self.tcp_refused += tcp_refused;
        self.tcp_unreachable += tcp_unreachable;
        self.tcp_host_errors += tcp_host_errors;
        self.tcp_stray_segments += tcp_stray_segments;
        self.tcp_syn_while_connecting += tcp_syn_while_connecting;
        self.tcp_bad_checksum += tcp_bad_checksum;
        self.bytes_to_host += bytes_to_host;
        self.bytes_from_host += bytes_from_host;
        self.udp_mappings += udp_mappings;
        self.udp_datagrams_out += udp_datagrams_out;
        self.udp_super_frames_out += udp_super_frames_out;
        self.udp_datagrams_in += udp_datagrams_in;
        self.udp_super_frames_in += udp_super_frames_in;
        self.udp_oversize_in += udp_oversize_in;
        self.udp_filtered += udp_filtered;
        self.udp_bind_failed += udp_bind_failed;
        self.pings_out += pings_out;
        self.pings_in += pings_in;
        self.ping_denied += ping_denied;
        self.flows_expired += flows_expired;
        self.table_full += table_full;
        self.guest_limit += guest_limit;
        self.unsupported += unsupported;
        self.port_forward_connections += port_forward_connections;
        self.flows_evicted += flows_evicted;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    /// Guest end, then the far end as the guest sees it.
    Tcp(SocketAddrV4, SocketAddrV4),
    Udp(SocketAddrV4),
    Ping(Ipv4Addr, u16),
    /// A forwarded UDP port's datagrams from one host peer: the guest end, and the gateway
    /// port they come from.
    UdpForward(SocketAddrV4, u16),
}

#[derive(Debug)]
enum Kind {
    Tcp(TcpFlow),
    Udp {
        remotes: VecDeque<SocketAddrV4>,
    },
    /// An echo identifier's socket; `quote` is the first request's IP header and 8 bytes, for
    /// an unreachable answer if the socket cannot be had.
    Ping {
        quote: Vec<u8>,
    },
    /// Datagrams from `remote` to a forwarded port (the I/O edge's `listener`); the guest's
    /// answers go back through the same listening socket.
    UdpForward {
        listener: u32,
        remote: SocketAddrV4,
    },
}

#[derive(Debug)]
struct TcpFlow {
    /// Set once the stack has a socket for the connection.
    handle: Option<SocketHandle>,
    /// The guest's SYN, waiting for the host socket to connect.
    syn: Option<Vec<u8>>,
    shut_write: bool,
    host_eof: bool,
    /// The MSS the guest announced (RFC 9293 3.7.1), before it was raised for the stack.
    mss: u16,
}

#[derive(Debug)]
struct Flow {
    key: Key,
    kind: Kind,
    /// The host socket's own address once open.
    local: Option<SocketAddrV4>,
    last_seen: Instant,
    /// Guest to host, host to guest.
    packets: [u64; 2],
    bytes: [u64; 2],
    /// Waiting in `touched` for a look after the next stack poll.
    touched: bool,
}

impl Flow {
    fn guest_ip(&self) -> Ipv4Addr {
        match self.key {
            Key::Tcp(guest, _) | Key::Udp(guest) | Key::UdpForward(guest, _) => *guest.ip(),
            Key::Ping(ip, _) => ip,
        }
    }
}

/// Where an outgoing IP packet goes, learned from what each guest sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub port: PortId,
    pub mac: MacAddr,
}

/// What a network's socket NATs hold against its caps (`max_flows`, `max_flows_per_guest`):
/// the engine's and each worker's share one, so a cap is the network's whichever thread
/// holds a connection. A flow takes its place when it is made and gives it back when it ends,
/// under a lock: once per connection, never per packet.
#[derive(Debug, Default)]
pub struct SharedCaps(Mutex<Held>);

#[derive(Debug, Default)]
struct Held {
    flows: usize,
    per_guest: HashMap<Ipv4Addr, usize>,
}

impl SharedCaps {
    fn held(&self) -> MutexGuard<'_, Held> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for one more of `guest`'s flows, within `config`'s caps.
    fn take(&self, guest: Ipv4Addr, config: &SocketNatConfig) -> Result<(), DropReason> {
        let mut held = self.held();
        if held.flows >= config.max_flows {
            return Err(DropReason::NatTableFull);
        }
        let count = held.per_guest.get(&guest).copied().unwrap_or(0);
        if count >= config.max_flows_per_guest {
            return Err(DropReason::NatGuestLimit);
        }
        held.flows += 1;
        held.per_guest.insert(guest, count + 1);
        Ok(())
    }

    /// Whether a flow of `guest` would find a place now (a hint: another thread may take it
    /// first).
    fn take_would_succeed(&self, guest: Ipv4Addr, config: &SocketNatConfig) -> bool {
        let held = self.held();
        held.flows < config.max_flows
            && held.per_guest.get(&guest).copied().unwrap_or(0) < config.max_flows_per_guest
    }

    /// Whether `guest` holds as many flows as its cap allows.
    fn guest_full(&self, guest: Ipv4Addr, config: &SocketNatConfig) -> bool {
        self.held().per_guest.get(&guest).copied().unwrap_or(0) >= config.max_flows_per_guest
    }

    fn give_back(&self, guest: Ipv4Addr) {
        let mut held = self.held();
        held.flows = held.flows.saturating_sub(1);
        if let Some(count) = held.per_guest.get_mut(&guest) {
            *count -= 1;
            if *count == 0 {
                held.per_guest.remove(&guest);
            }
        }
    }

    /// Flows held in all.
    pub fn flows(&self) -> usize {
        self.held().flows
    }
}

/// The socket NAT of one network.
pub struct SocketNat {
    config: SocketNatConfig,
    iface: Interface,
    sockets: SocketSet<'static>,
    spare: Vec<tcp::Socket<'static>>,
    queues: Queues,
    clock: Clock,
    flows: Vec<Option<Flow>>,
    /// Each slot's generation, bumped when its flow ends.
    generations: Vec<u32>,
    free: Vec<u32>,
    by_key: HashMap<Key, u32>,
    /// UDP and ping flows as (slot, generation), oldest first, the table's and each guest's:
    /// the candidates for eviction at a cap (`nat::evict`).
    candidates: crate::nat::evict::Candidates,
    /// Forwarded UDP flows by (listener, host peer).
    udp_forwards: HashMap<(u32, SocketAddrV4), u32>,
    caps: Arc<SharedCaps>,
    peers: HashMap<Ipv4Addr, Peer>,
    actions: VecDeque<Action>,
    /// Flows whose state may have changed since the last stack poll.
    touched: Vec<u32>,
    /// Open TCP flows the I/O edge should move bytes for.
    ready: VecDeque<FlowId>,
    /// Frames to guests that are not the stack's (UDP from host sockets, ping replies,
    /// unreachables), framed but for the MACs, with their offload state.
    frames: VecDeque<(Vec<u8>, VnetHdr)>,
    stack_dirty: bool,
    next_poll: Option<Instant>,
    next_sweep: Option<Instant>,
    ping_denied: bool,
    next_forward_port: u16,
    /// The time of the last call that was given one.
    now: Instant,
    pub counters: SocketNatCounters,
}

impl Drop for SocketNat {
    /// Its flows end with it: their places go back to the caps it shares.
    fn drop(&mut self) {
        for flow in self.flows.iter().flatten() {
            self.caps.give_back(flow.guest_ip());
        }
    }
}

impl std::fmt::Debug for SocketNat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketNat")
            .field("flows", &self.by_key.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

fn addr_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

impl SocketNat {
    pub fn new(config: SocketNatConfig, now: Instant) -> SocketNat {
        SocketNat::sharing_caps(config, Arc::default(), now)
    }

    /// A socket NAT whose flows count against `caps` with those of the others sharing them
    /// (a worker's, against the engine's [`SocketNat::caps`]).
    pub fn sharing_caps(config: SocketNatConfig, caps: Arc<SharedCaps>, now: Instant) -> SocketNat {
        // The stack takes whole GSO segments from guests and sends them too (up to 64 KiB);
        // checksums are the offload's (see `poll_packet`).
        let mut queues = Queues::new(STACK_MTU, ethernet::HEADER_LEN, false);
        let mut stack_config = Config::new(HardwareAddress::Ip);
        stack_config.random_seed = crate::stack::random_seed((config.gateway, "socket-nat"));
        let mut iface = Interface::new(stack_config, &mut queues, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(config.gateway), config.prefix));
        });
        // Any destination is ours: the stack stands in for every host a guest connects to.
        iface.set_any_ip(true);
        let _ = iface.routes_mut().add_default_ipv4_route(config.gateway);
        let candidates = crate::nat::evict::Candidates::new(
            config.max_flows.min(MAX_CANDIDATES),
            config.max_flows_per_guest,
        );
        SocketNat {
            config,
            iface,
            sockets: SocketSet::new(Vec::new()),
            spare: Vec::new(),
            queues,
            clock: Clock { epoch: now },
            flows: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            candidates,
            udp_forwards: HashMap::new(),
            caps,
            peers: HashMap::new(),
            actions: VecDeque::new(),
            touched: Vec::new(),
            ready: VecDeque::new(),
            frames: VecDeque::new(),
            stack_dirty: false,
            next_poll: None,
            next_sweep: None,
            ping_denied: false,
            next_forward_port: FORWARD_PORTS.0,
            now,
            counters: SocketNatCounters::default(),
        }
    }

    pub fn config(&self) -> &SocketNatConfig {
        &self.config
    }

    /// What this socket NAT's flows count against, to share with another.
    pub fn caps(&self) -> Arc<SharedCaps> {
        self.caps.clone()
    }

    /// What this socket NAT makes of a guest's IPv4 packet `ip` (header checked) that came
    /// `from` a port and MAC, as a worker's socket NAT asks of each frame its tap queue brings.
    /// A segment of a connection it holds is its own only from where the connection's guest
    /// is (a guest on a clean-traffic port forging another's address and ports gets `Not`,
    /// and the engine's guard sees the frame).
    pub fn claim(&self, ip: &[u8], from: Peer) -> Claim {
        let Some(ihl) = packet::ip_header_len(ip) else {
            return Claim::Not;
        };
        if ip[9] != PROTO_TCP || ip.len() < ihl + 20 || packet::fragment_info(ip) != (0, false) {
            return Claim::Not;
        }
        let (src, dst) = (addr_at(ip, 12), addr_at(ip, 16));
        let port = |at: usize| u16::from_be_bytes([ip[at], ip[at + 1]]);
        let key = Key::Tcp(
            SocketAddrV4::new(src, port(ihl)),
            SocketAddrV4::new(dst, port(ihl + 2)),
        );
        if self.by_key.contains_key(&key) {
            if self.peers.get(&src) == Some(&from) {
                Claim::Held
            } else {
                Claim::Not
            }
        } else if ip[ihl + 13] & 0x12 == 0x02
            && dst != self.config.gateway
            && self.routable(dst)
            && self.config.is_internal(src)
            // At a cap, the engine's socket NAT opens it: only it holds the UDP and ping flows
            // that may make room.
            && self.caps.take_would_succeed(src, &self.config)
        {
            Claim::Opens
        } else {
            Claim::Not
        }
    }

    /// The port `port` is gone: its guests' connections end (their host sockets close) and
    /// nothing more is sent there, not even to a port that later takes its id.
    pub fn forget_port(&mut self, port: PortId) {
        let gone: std::collections::HashSet<Ipv4Addr> = (self.peers.iter())
            .filter(|(_, peer)| peer.port == port)
            .map(|(ip, _)| *ip)
            .collect();
        if gone.is_empty() {
            return;
        }
        for ip in &gone {
            self.peers.remove(ip);
        }
        let ended: Vec<u32> = (self.flows.iter().enumerate())
            .filter(|(_, flow)| flow.as_ref().is_some_and(|f| gone.contains(&f.guest_ip())))
            .map(|(index, _)| index as u32)
            .collect();
        for index in ended {
            self.remove(index);
        }
    }

    /// Whether host sockets wait for something to be done ([`SocketNat::poll_action`]).
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The time this socket NAT was last given (its stack was last run).
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Where the guest with address `ip` was last heard from.
    pub fn peer(&self, ip: Ipv4Addr) -> Option<Peer> {
        self.peers.get(&ip).copied()
    }

    /// A guest announced `ip` (ARP sender): packets for it go to `peer`.
    pub fn note_peer(&mut self, ip: Ipv4Addr, peer: Peer) {
        if !self.config.is_internal(ip) || ip == self.config.gateway {
            return;
        }
        if self.peers.get(&ip) != Some(&peer)
            && (self.peers.len() < self.config.max_flows || self.peers.contains_key(&ip))
        {
            self.peers.insert(ip, peer);
        }
    }

    fn is_current(&self, id: FlowId) -> bool {
        self.generations.get(id.index as usize) == Some(&id.generation)
    }

    fn flow(&self, id: FlowId) -> Option<&Flow> {
        if !self.is_current(id) {
            return None;
        }
        self.flows.get(id.index as usize)?.as_ref()
    }

    fn flow_mut(&mut self, id: FlowId) -> Option<&mut Flow> {
        if !self.is_current(id) {
            return None;
        }
        self.flows.get_mut(id.index as usize)?.as_mut()
    }

    fn id_of(&self, index: u32) -> Option<FlowId> {
        self.flows.get(index as usize)?.as_ref()?;
        Some(FlowId {
            index,
            generation: self.generations[index as usize],
        })
    }

    fn touch(&mut self, index: u32) {
        if let Some(Some(flow)) = self.flows.get_mut(index as usize)
            && !flow.touched
        {
            flow.touched = true;
            self.touched.push(index);
        }
    }

    /// Makes a flow for `key`, within the caps.
    fn insert(&mut self, now: Instant, key: Key, kind: Kind) -> Result<FlowId, DropReason> {
        let guest = match key {
            Key::Tcp(g, _) | Key::Udp(g) | Key::UdpForward(g, _) => *g.ip(),
            Key::Ping(ip, _) => ip,
        };
        let evictable_kind = matches!(key, Key::Udp(_) | Key::Ping(..));
        if let Err(refused) = self.caps.take(guest, &self.config) {
            // A new flow may take the place of a UDP or ping flow that is not assured (this
            // socket NAT's own: a worker's shard holds TCP only, and finds none), the guest's
            // own when the guest is at its cap, whether or not the table is full too.
            let at_guest_cap = self.caps.guest_full(guest, &self.config);
            let retried = self.evict_for_room(now, at_guest_cap.then_some(guest))
                && self.caps.take(guest, &self.config).is_ok();
            if !retried {
                match refused {
                    DropReason::NatTableFull => self.counters.table_full += 1,
                    _ => self.counters.guest_limit += 1,
                }
                return Err(refused);
            }
        }
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.flows.push(None);
                self.generations.push(0);
                (self.flows.len() - 1) as u32
            }
        };
        let generation = self.generations[index as usize];
        self.flows[index as usize] = Some(Flow {
            key,
            kind,
            local: None,
            last_seen: now,
            packets: [0; 2],
            bytes: [0; 2],
            touched: false,
        });
        self.by_key.insert(key, index);
        if evictable_kind {
            self.candidates.push(guest, (index, generation));
        }
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + SWEEP_EVERY);
        }
        Ok(FlowId { index, generation })
    }

    /// At a cap, as packet NAT and Linux's conntrack (`early_drop`) do: ends the oldest UDP or
    /// ping flow (of `guest` only, if given), within the bounds of one scan, that is
    /// not assured (UDP that has not gone both ways twice, such as a query and its answer;
    /// any ping) or is past its timeout; false if there is none. A guest resolving names
    /// itself, from a new port per query, then keeps working at its cap, and can still open
    /// TCP connections on the engine's thread (a worker's, at the cap, cannot reach the
    /// engine's UDP flows and is refused). TCP connections are never taken.
    fn evict_for_room(&mut self, now: Instant, guest: Option<Ipv4Addr>) -> bool {
        use crate::nat::evict::{Scan, Verdict};
        let timeouts = self.config.timeouts;
        let mut scan = Scan::default();
        while scan.goes_on() {
            let Some((index, generation)) = self.candidates.pop(guest) else {
                return false;
            };
            let flow = (self.flows.get(index as usize))
                .and_then(Option::as_ref)
                .filter(|_| self.generations[index as usize] == generation);
            let verdict = match flow {
                None => Verdict::Stale,
                Some(flow) => {
                    let (assured, timeout) = match flow.kind {
                        Kind::Udp { .. } => {
                            (flow.packets[0] >= 2 && flow.packets[1] >= 2, timeouts.udp)
                        }
                        _ => (false, timeouts.icmp),
                    };
                    let expired = now.saturating_duration_since(flow.last_seen) >= timeout;
                    if assured && !expired {
                        Verdict::Keep
                    } else {
                        self.remove(index);
                        if expired {
                            self.counters.flows_expired += 1;
                        } else {
                            self.counters.flows_evicted += 1;
                        }
                        Verdict::Evicted
                    }
                }
            };
            if scan.counts(verdict) {
                return true;
            }
        }
        false
    }

    /// Ends a flow: its socket goes back to the spares and the host socket is closed.
    fn remove(&mut self, index: u32) {
        let Some(flow) = self.flows.get_mut(index as usize).and_then(Option::take) else {
            return;
        };
        let id = FlowId {
            index,
            generation: self.generations[index as usize],
        };
        self.generations[index as usize] = id.generation.wrapping_add(1);
        if let Kind::Tcp(TcpFlow {
            handle: Some(handle),
            ..
        }) = flow.kind
            && let smoltcp::socket::Socket::Tcp(mut socket) = self.sockets.remove(handle)
            && self.spare.len() < SPARE_SOCKETS
        {
            socket.abort();
            self.spare.push(socket);
        }
        let guest = flow.guest_ip();
        self.by_key.remove(&flow.key);
        if let Kind::UdpForward { listener, remote } = flow.kind {
            self.udp_forwards.remove(&(listener, remote));
        }
        self.free.push(index);
        self.caps.give_back(guest);
        self.actions.push_back(Action::Close(id));
    }

    fn tcp_socket(&mut self) -> tcp::Socket<'static> {
        let mut socket = self.spare.pop().unwrap_or_else(|| {
            tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; TCP_RX_BUFFER]),
                tcp::SocketBuffer::new(vec![0; TCP_TX_BUFFER]),
            )
        });
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(None);
        socket
    }

    /// Where the host socket for a guest's destination `dst` goes.
    fn target(&self, dst: SocketAddrV4) -> SocketAddrV4 {
        if self.config.host_loopback && *dst.ip() == self.config.gateway {
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, dst.port())
        } else {
            dst
        }
    }

    /// How a host address appears to guests: the host's loopback as the gateway.
    fn guest_view(&self, from: SocketAddrV4) -> SocketAddrV4 {
        if self.config.host_loopback && from.ip().is_loopback() {
            SocketAddrV4::new(self.config.gateway, from.port())
        } else {
            from
        }
    }

    /// Whether a guest may send to `dst` through the host: not to its own subnet (that is
    /// switched), not to the gateway unless host-loopback stands in for it, never to
    /// loopback, broadcast or multicast addresses.
    fn routable(&self, dst: Ipv4Addr) -> bool {
        if dst == self.config.gateway {
            return self.config.host_loopback;
        }
        !(self.config.is_internal(dst)
            || dst.is_loopback()
            || dst.is_broadcast()
            || dst.is_multicast()
            || dst.is_unspecified())
    }

    /// A packet from a guest (`ip`: the IPv4 packet, header and checksum already checked)
    /// for beyond the subnet, or for the gateway's own TCP/UDP ports, with the offload state
    /// `vnet` of its frame: a partial L4 checksum, a TCP super-frame (handed to the stack
    /// whole) or a UDP one (sent as the datagrams it holds).
    pub fn handle_packet(
        &mut self,
        now: Instant,
        from: Peer,
        ip: &[u8],
        vnet: &VnetHdr,
    ) -> Result<(), DropReason> {
        let ihl = packet::ip_header_len(ip).ok_or(DropReason::BadHeader)?;
        let (offset, more) = packet::fragment_info(ip);
        if offset != 0 || more {
            self.counters.unsupported += 1;
            return Err(DropReason::Fragment);
        }
        let Some((tuple, _, _)) = packet::classify(ip, ihl) else {
            self.counters.unsupported += 1;
            return Err(DropReason::NatUnsupported);
        };
        if !self.config.is_internal(tuple.src)
            || !(self.routable(tuple.dst) || self.is_forward_end(&tuple))
        {
            return Err(DropReason::NoRoute);
        }
        // The GSO type must be the packet's own (virtio 1.2 5.1.6.2.1): a super-frame of
        // another protocol cannot be cut as it says.
        let segment = match (tuple.proto, vnet.gso_type & !gso::ECN, vnet.gso_size) {
            (_, gso::NONE, _) | (PROTO_TCP, gso::TCPV4, _) => None,
            // UFO (an IPv4 datagram the device was to fragment): the host stack fragments it.
            (PROTO_UDP, gso::UDP, _) => None,
            (PROTO_UDP, gso::UDP_L4, size) if size > 0 => Some(usize::from(size)),
            _ => return Err(DropReason::BadVnetHeader),
        };
        match tuple.proto {
            PROTO_TCP => self.guest_tcp(now, from, (ip, ihl), tuple, vnet.needs_csum()),
            PROTO_UDP => self.guest_udp(now, from, (ip, ihl), tuple, segment),
            _ => self.guest_icmp(now, from, (ip, ihl), tuple),
        }
    }

    /// Whether `tuple` goes to the gateway's end of a forwarded connection, which is known
    /// without being routable. (Looked up only for what is not routable: the gateway.)
    fn is_forward_end(&self, tuple: &Tuple) -> bool {
        let guest = SocketAddrV4::new(tuple.src, tuple.sport);
        match tuple.proto {
            PROTO_TCP => self
                .by_key
                .contains_key(&Key::Tcp(guest, SocketAddrV4::new(tuple.dst, tuple.dport))),
            PROTO_UDP => self
                .by_key
                .contains_key(&Key::UdpForward(guest, tuple.dport)),
            _ => false,
        }
    }

    fn guest_tcp(
        &mut self,
        now: Instant,
        from: Peer,
        (ip, ihl): (&[u8], usize),
        tuple: Tuple,
        partial: bool,
    ) -> Result<(), DropReason> {
        if !partial && !tcp_checksum_ok(ip, ihl) {
            self.counters.tcp_bad_checksum += 1;
            return Err(DropReason::BadChecksum);
        }
        let guest = SocketAddrV4::new(tuple.src, tuple.sport);
        let remote = SocketAddrV4::new(tuple.dst, tuple.dport);
        let key = Key::Tcp(guest, remote);
        let flags = ip[ihl + 13];
        let syn = flags & 0x02 != 0;
        if syn {
            // Where answers go is learned as connections open (and from ARP), not per segment.
            self.note_peer(tuple.src, from);
        }
        // A SYN is copied (its MSS is raised, or it waits for the host); anything else goes
        // to the stack straight from the frame, unless packets queued before it must go first.
        let mut segment = (syn || !self.queues.rx.is_empty()).then(|| self.queues.copy_in(ip));
        let mss = match &mut segment {
            Some(segment) if syn => raise_mss(segment, ihl),
            _ => None,
        };
        let payload = ip
            .len()
            .saturating_sub(ihl + usize::from(ip[ihl + 12] >> 4) * 4);
        match self.by_key.get(&key).copied() {
            Some(index) => {
                let Some(Some(flow)) = self.flows.get_mut(index as usize) else {
                    return Err(DropReason::NatNoFlow);
                };
                flow.last_seen = now;
                flow.packets[0] += 1;
                flow.bytes[0] += payload as u64;
                let Kind::Tcp(tcp) = &mut flow.kind else {
                    return Err(DropReason::NatNoFlow);
                };
                if tcp.handle.is_none() {
                    self.counters.tcp_syn_while_connecting += 1;
                    return Ok(());
                }
                if let Some(mss) = mss {
                    // The guest's SYN-ACK, when the stack connected to it (a port forward).
                    tcp.mss = mss;
                }
                match segment {
                    Some(segment) => self.queues.rx.push_back(segment),
                    None => {
                        let at = self.clock.stack_time(now);
                        let mut device = crate::stack::Borrowed::new(ip, &mut self.queues);
                        self.iface
                            .poll_ingress_single(at, &mut device, &mut self.sockets);
                    }
                }
                self.stack_dirty = true;
                self.touch(index);
                Ok(())
            }
            None if flags & 0x12 == 0x02 => {
                // RFC 9293 3.5: a new connection; answered only once the host's is made.
                let target = self.target(remote);
                let id = self.insert(
                    now,
                    key,
                    Kind::Tcp(TcpFlow {
                        handle: None,
                        syn: segment,
                        shut_write: false,
                        host_eof: false,
                        mss: mss.unwrap_or(DEFAULT_MSS),
                    }),
                )?;
                if let Some(flow) = self.flow_mut(id) {
                    flow.packets[0] += 1;
                }
                self.counters.tcp_connects += 1;
                self.actions
                    .push_back(Action::Open(id, HostSocket::Tcp(target)));
                Ok(())
            }
            None => {
                // No connection: the stack answers as a host with nothing listening would.
                self.counters.tcp_stray_segments += 1;
                let segment = segment.unwrap_or_else(|| self.queues.copy_in(ip));
                self.queues.rx.push_back(segment);
                self.stack_dirty = true;
                Ok(())
            }
        }
    }

    /// A guest's UDP packet; `segment`: it is a USO super-frame of datagrams of that size.
    fn guest_udp(
        &mut self,
        now: Instant,
        from: Peer,
        (ip, ihl): (&[u8], usize),
        tuple: Tuple,
        segment: Option<usize>,
    ) -> Result<(), DropReason> {
        let udp = &ip[ihl..];
        let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
        if len < 8 || len > udp.len() {
            return Err(DropReason::BadHeader);
        }
        let payload = &udp[8..len];
        let count = datagram_count(payload.len(), segment.unwrap_or(payload.len()));
        let datagrams = |queues: &mut Queues| {
            let data = queues.copy_in_spare(payload);
            let segment = segment.unwrap_or(data.len());
            Datagrams { data, segment }
        };
        let guest = SocketAddrV4::new(tuple.src, tuple.sport);
        let remote = SocketAddrV4::new(tuple.dst, tuple.dport);
        if tuple.dst == self.config.gateway
            && let Some(index) = self
                .by_key
                .get(&Key::UdpForward(guest, tuple.dport))
                .copied()
            && let Some(Some(flow)) = self.flows.get_mut(index as usize)
            && let Kind::UdpForward { listener, remote } = flow.kind
        {
            // A guest answering a forwarded port's peer.
            flow.last_seen = now;
            flow.packets[0] += count as u64;
            flow.bytes[0] += payload.len() as u64;
            self.counters.udp_datagrams_out += count as u64;
            self.counters.udp_super_frames_out += u64::from(segment.is_some());
            let data = datagrams(&mut self.queues);
            self.actions
                .push_back(Action::SendFromForward(listener, remote, data));
            return Ok(());
        }
        let key = Key::Udp(guest);
        let id = match self.by_key.get(&key).copied().and_then(|i| self.id_of(i)) {
            Some(id) => id,
            None => {
                let id = self.insert(
                    now,
                    key,
                    Kind::Udp {
                        remotes: VecDeque::new(),
                    },
                )?;
                self.counters.udp_mappings += 1;
                self.note_peer(tuple.src, from);
                let preferred = tuple.sport;
                let range = self.config.ports;
                self.actions
                    .push_back(Action::Open(id, HostSocket::Udp { preferred, range }));
                id
            }
        };
        let target = self.target(remote);
        let Some(flow) = self.flow_mut(id) else {
            return Err(DropReason::NatNoFlow);
        };
        flow.last_seen = now;
        flow.packets[0] += count as u64;
        flow.bytes[0] += payload.len() as u64;
        if let Kind::Udp { remotes } = &mut flow.kind
            && !remotes.contains(&remote)
        {
            if remotes.len() == UDP_REMOTES {
                remotes.pop_front();
            }
            remotes.push_back(remote);
        }
        self.counters.udp_datagrams_out += count as u64;
        self.counters.udp_super_frames_out += u64::from(segment.is_some());
        let data = datagrams(&mut self.queues);
        self.actions.push_back(Action::SendTo(id, target, data));
        Ok(())
    }

    fn guest_icmp(
        &mut self,
        now: Instant,
        from: Peer,
        (ip, ihl): (&[u8], usize),
        tuple: Tuple,
    ) -> Result<(), DropReason> {
        if ip[ihl] != packet::ICMP_ECHO_REQUEST {
            self.counters.unsupported += 1;
            return Err(DropReason::NatUnsupported);
        }
        if checksum::checksum(&ip[ihl..]) != 0 {
            return Err(DropReason::BadChecksum);
        }
        if self.ping_denied {
            self.counters.ping_denied += 1;
            self.unreachable(ip);
            return Ok(());
        }
        let key = Key::Ping(tuple.src, tuple.sport);
        let id = match self.by_key.get(&key).copied().and_then(|i| self.id_of(i)) {
            Some(id) => id,
            None => {
                let quote = quote_of(ip);
                let id = self.insert(now, key, Kind::Ping { quote })?;
                self.note_peer(tuple.src, from);
                self.actions.push_back(Action::Open(id, HostSocket::Ping));
                id
            }
        };
        let target = self.target(SocketAddrV4::new(tuple.dst, 0));
        let Some(flow) = self.flow_mut(id) else {
            return Err(DropReason::NatNoFlow);
        };
        flow.last_seen = now;
        flow.packets[0] += 1;
        flow.bytes[0] += (ip.len() - ihl) as u64;
        self.counters.pings_out += 1;
        let message = self.queues.copy_in_spare(&ip[ihl..]);
        self.actions
            .push_back(Action::SendTo(id, target, Datagrams::one(message)));
        Ok(())
    }

    /// Frames `data` from `src` for the guest at `dst`: one datagram, or, with `segment`,
    /// datagrams of that size back to back as UDP super-frames (virtio `GSO_UDP_L4`) of at
    /// most [`MAX_SUPER_FRAME_SEGMENTS`] datagrams and [`MAX_UDP_PAYLOAD`] bytes each, so no
    /// frame outgrows the engine's [`crate::engine::MAX_FRAME_LEN`]. A datagram too long for
    /// any IPv4 packet is dropped and counted (`udp_oversize_in`). Frames are built in
    /// recycled buffers: nothing is allocated per datagram once the spares are warm.
    fn udp_to_guest(
        &mut self,
        (src, dst): (SocketAddrV4, SocketAddrV4),
        data: &[u8],
        segment: Option<usize>,
    ) -> Delivered {
        let segment = segment
            .filter(|&s| s > 0 && s < data.len())
            .unwrap_or(data.len());
        let count = datagram_count(data.len(), segment);
        if segment > MAX_UDP_PAYLOAD {
            self.counters.udp_oversize_in += count as u64;
            return Delivered::default();
        }
        let per_frame =
            segment.max(1) * (MAX_UDP_PAYLOAD / segment.max(1)).min(MAX_SUPER_FRAME_SEGMENTS);
        let mut at = 0;
        loop {
            let chunk = &data[at..(at + per_frame).min(data.len())];
            self.push_udp_frame((src, dst), chunk, segment);
            at += chunk.len();
            if at >= data.len() {
                break;
            }
        }
        self.counters.udp_datagrams_in += count as u64;
        Delivered {
            datagrams: count as u64,
            bytes: data.len() as u64,
        }
    }

    /// Queues one frame for the guest holding `payload`: a plain UDP datagram with its
    /// checksum (RFC 768) when it is one datagram (no longer than `segment`), else a UDP
    /// super-frame whose UDP length covers all of it, its checksum field holding the
    /// pseudo-header's sum for the device to complete (`NEEDS_CSUM`), as Linux leaves a
    /// `CHECKSUM_PARTIAL` GSO packet.
    fn push_udp_frame(
        &mut self,
        (src, dst): (SocketAddrV4, SocketAddrV4),
        payload: &[u8],
        segment: usize,
    ) {
        const L3: usize = ethernet::HEADER_LEN;
        const L4: usize = L3 + 20;
        const HEADERS: usize = L4 + 8;
        let udp_len = 8 + payload.len();
        let mut f = self.queues.spare.pop().unwrap_or_default();
        f.clear();
        f.resize(HEADERS, 0);
        f.extend_from_slice(payload);
        f[12..14].copy_from_slice(&ethernet::EtherType::IPV4.0.to_be_bytes());
        let ip = &mut f[L3..L4];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
        ip[8] = crate::gateway::DEFAULT_TTL;
        ip[9] = PROTO_UDP;
        ip[12..16].copy_from_slice(&src.ip().octets());
        ip[16..20].copy_from_slice(&dst.ip().octets());
        let c = checksum::checksum(ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let udp = &mut f[L4..];
        udp[0..2].copy_from_slice(&src.port().to_be_bytes());
        udp[2..4].copy_from_slice(&dst.port().to_be_bytes());
        udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
        let sum = checksum::pseudo_header_v4(
            src.ip().octets(),
            dst.ip().octets(),
            PROTO_UDP,
            udp_len as u16,
        );
        let vnet = if payload.len() > segment {
            udp[6..8].copy_from_slice(&checksum::fold(sum).to_be_bytes());
            self.counters.udp_super_frames_in += 1;
            VnetHdr {
                flags: crate::wire::vnet::F_NEEDS_CSUM,
                gso_type: gso::UDP_L4,
                hdr_len: HEADERS as u16,
                gso_size: segment as u16,
                csum_start: L4 as u16,
                csum_offset: 6,
            }
        } else {
            let c = !checksum::fold(checksum::accumulate(sum, udp));
            // RFC 768: a computed checksum of zero is sent as all ones.
            let c = if c == 0 { 0xffff } else { c };
            udp[6..8].copy_from_slice(&c.to_be_bytes());
            VnetHdr::default()
        };
        self.frames.push_back((f, vnet));
    }

    /// ICMP host unreachable (RFC 792) from the destination's router (the gateway) about
    /// `offending`.
    fn unreachable(&mut self, offending: &[u8]) {
        let macs = (MacAddr::ZERO, MacAddr::ZERO);
        if let Some(frame) =
            crate::gateway::icmp_error(macs, self.config.gateway, 3, 1, [0; 4], offending)
        {
            self.frames.push_back((frame, VnetHdr::default()));
        }
    }

    /// A RST answering the held SYN `syn` (RFC 9293 3.10.7.1: ACK of its sequence + 1), as
    /// the destination host sends when nothing listens.
    fn reset_for_syn(&mut self, syn: &[u8]) {
        let Some(ihl) = packet::ip_header_len(syn) else {
            return;
        };
        if syn.len() < ihl + 20 {
            return;
        }
        let (src, dst) = (addr_at(syn, 12), addr_at(syn, 16));
        let seq = u32::from_be_bytes([syn[ihl + 4], syn[ihl + 5], syn[ihl + 6], syn[ihl + 7]]);
        let mut f =
            crate::gateway::ipv4_frame((MacAddr::ZERO, MacAddr::ZERO), dst, src, PROTO_TCP, 0, 20);
        let tcp = &mut f[34..];
        tcp[0..2].copy_from_slice(&syn[ihl + 2..ihl + 4]);
        tcp[2..4].copy_from_slice(&syn[ihl..ihl + 2]);
        tcp[8..12].copy_from_slice(&seq.wrapping_add(1).to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x14; // RST, ACK
        let sum = checksum::pseudo_header_v4(dst.octets(), src.octets(), PROTO_TCP, 20);
        let c = !checksum::fold(checksum::accumulate(sum, tcp));
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        self.frames.push_back((f, VnetHdr::default()));
    }

    /// A host connection from `from` to a forwarded port, for `guest`: the stack connects to
    /// the guest from the gateway, and the returned flow carries the bytes both ways once the
    /// I/O edge keeps the accepted socket under this id.
    pub fn open_forwarded_tcp(
        &mut self,
        now: Instant,
        guest: SocketAddrV4,
    ) -> Result<FlowId, DropReason> {
        let gateway = self.config.gateway;
        let port = self.forward_port(|p| Key::Tcp(guest, SocketAddrV4::new(gateway, p)))?;
        let local = SocketAddrV4::new(gateway, port);
        let key = Key::Tcp(guest, local);
        let id = self.insert(
            now,
            key,
            Kind::Tcp(TcpFlow {
                handle: None,
                syn: None,
                shut_write: false,
                host_eof: false,
                mss: DEFAULT_MSS,
            }),
        )?;
        let mut socket = self.tcp_socket();
        let remote = IpEndpoint::new(IpAddress::Ipv4(*guest.ip()), guest.port());
        if socket
            .connect(
                self.iface.context(),
                remote,
                (IpAddress::Ipv4(*local.ip()), local.port()),
            )
            .is_err()
        {
            self.remove(id.index);
            return Err(DropReason::NatUnsupported);
        }
        let handle = self.sockets.add(socket);
        if let Some(flow) = self.flow_mut(id) {
            flow.local = Some(local);
            if let Kind::Tcp(tcp) = &mut flow.kind {
                tcp.handle = Some(handle);
            }
        }
        self.counters.port_forward_connections += 1;
        self.stack_dirty = true;
        self.touch(id.index);
        Ok(id)
    }

    /// A gateway port no flow uses for `guest` under `key`, from the forwarding range.
    fn forward_port(&mut self, key: impl Fn(u16) -> Key) -> Result<u16, DropReason> {
        let (first, last) = FORWARD_PORTS;
        for _ in 0..=u32::from(last - first) {
            let port = self.next_forward_port;
            self.next_forward_port = if port >= last { first } else { port + 1 };
            if !self.by_key.contains_key(&key(port)) {
                return Ok(port);
            }
        }
        Err(DropReason::NatPortsExhausted)
    }

    /// Datagrams from `remote` to the forwarded UDP port `listener` (the I/O edge's index),
    /// for `guest`: they reach the guest from a gateway port kept for `remote`, so the
    /// guest's answers find their way back. `data` is one datagram, or, with `segment`,
    /// several the host's kernel coalesced (UDP GRO) as for [`Self::handle_datagrams`].
    pub fn handle_forwarded_datagrams(
        &mut self,
        now: Instant,
        (listener, remote): (u32, SocketAddrV4),
        guest: SocketAddrV4,
        data: &[u8],
        segment: Option<usize>,
    ) {
        let index = match self.udp_forwards.get(&(listener, remote)).copied() {
            Some(index) => index,
            None => {
                let Ok(port) = self.forward_port(|p| Key::UdpForward(guest, p)) else {
                    return;
                };
                let kind = Kind::UdpForward { listener, remote };
                let Ok(id) = self.insert(now, Key::UdpForward(guest, port), kind) else {
                    return;
                };
                self.udp_forwards.insert((listener, remote), id.index);
                id.index
            }
        };
        let Some(Some(flow)) = self.flows.get_mut(index as usize) else {
            return;
        };
        let Key::UdpForward(guest, port) = flow.key else {
            return;
        };
        flow.last_seen = now;
        let from = SocketAddrV4::new(self.config.gateway, port);
        let delivered = self.udp_to_guest((from, guest), data, segment);
        if let Some(Some(flow)) = self.flows.get_mut(index as usize) {
            flow.packets[1] += delivered.datagrams;
            flow.bytes[1] += delivered.bytes;
        }
    }

    /// The I/O edge opened (or failed to open) the flow's host socket; `Ok` carries the
    /// socket's own address.
    pub fn handle_opened(
        &mut self,
        now: Instant,
        id: FlowId,
        result: Result<SocketAddrV4, io::ErrorKind>,
    ) {
        let Some(flow) = self.flow_mut(id) else {
            return;
        };
        match (&mut flow.kind, result) {
            (Kind::Tcp(tcp), Ok(local)) => {
                flow.local = Some(local);
                let Some(syn) = tcp.syn.take() else {
                    return;
                };
                let Key::Tcp(_, remote) = flow.key else {
                    return;
                };
                let mut socket = self.tcp_socket();
                let endpoint = IpListenEndpoint {
                    addr: Some(IpAddress::Ipv4(*remote.ip())),
                    port: remote.port(),
                };
                if socket.listen(endpoint).is_err() {
                    self.remove(id.index);
                    return;
                }
                let handle = self.sockets.add(socket);
                if let Some(Some(flow)) = self.flows.get_mut(id.index as usize)
                    && let Kind::Tcp(tcp) = &mut flow.kind
                {
                    tcp.handle = Some(handle);
                }
                self.counters.tcp_established += 1;
                self.queues.rx.push_back(syn);
                self.stack_dirty = true;
                // The SYN must meet its own listener before any other listener for the same
                // destination exists.
                self.poll_stack(now);
                self.touch(id.index);
            }
            (Kind::Tcp(tcp), Err(kind)) => {
                let syn = tcp.syn.take().unwrap_or_default();
                if kind == io::ErrorKind::ConnectionRefused {
                    self.counters.tcp_refused += 1;
                    self.reset_for_syn(&syn);
                } else {
                    self.counters.tcp_unreachable += 1;
                    self.unreachable(&syn);
                }
                self.remove(id.index);
            }
            (Kind::Ping { quote }, Err(_)) => {
                let quote = std::mem::take(quote);
                self.ping_denied = true;
                self.counters.ping_denied += 1;
                self.unreachable(&quote);
                self.remove(id.index);
            }
            (Kind::Udp { .. }, Err(_)) => {
                self.counters.udp_bind_failed += 1;
                self.remove(id.index);
            }
            (Kind::UdpForward { .. }, Err(_)) => {}
            (_, Ok(local)) => flow.local = Some(local),
        }
    }

    /// A datagram arrived on the flow's host socket from `from`: a UDP payload, or an ICMP
    /// echo reply whose identifier the kernel chose.
    pub fn handle_datagram(&mut self, now: Instant, id: FlowId, from: SocketAddrV4, data: &[u8]) {
        self.handle_datagrams(now, id, from, data, None);
    }

    /// What one read of the flow's host socket from `from` returned: one datagram, or, with
    /// `segment`, datagrams of that size back to back (the last may be shorter) that the
    /// host's kernel coalesced (`UDP_GRO`). They reach the guest as one UDP super-frame (virtio
    /// `GSO_UDP_L4`), which the guest's kernel, or the I/O edge for a port without offloads,
    /// cuts into the datagrams again. Filtering, counters and timeouts are as for as many
    /// datagrams one by one.
    pub fn handle_datagrams(
        &mut self,
        now: Instant,
        id: FlowId,
        from: SocketAddrV4,
        data: &[u8],
        segment: Option<usize>,
    ) {
        let seen_as = self.guest_view(from);
        let filtering = self.config.filtering;
        let Some(flow) = self.flow_mut(id) else {
            return;
        };
        match (&flow.kind, flow.key) {
            (Kind::Udp { remotes }, Key::Udp(guest)) => {
                let allowed = match filtering {
                    Filtering::EndpointIndependent => true,
                    Filtering::AddressDependent => remotes.iter().any(|r| r.ip() == seen_as.ip()),
                    Filtering::AddressAndPortDependent => remotes.contains(&seen_as),
                };
                if !allowed {
                    let count = datagram_count(data.len(), segment.unwrap_or(data.len()));
                    self.counters.udp_filtered += count as u64;
                    return;
                }
                flow.last_seen = now;
                let delivered = self.udp_to_guest((seen_as, guest), data, segment);
                if let Some(flow) = self.flow_mut(id) {
                    flow.packets[1] += delivered.datagrams;
                    flow.bytes[1] += delivered.bytes;
                }
            }
            (Kind::Ping { .. }, Key::Ping(guest, ident)) => {
                // The kernel hands over the ICMP message: only echo replies are ours.
                if data.len() < 8 || data[0] != packet::ICMP_ECHO_REPLY {
                    return;
                }
                flow.last_seen = now;
                flow.packets[1] += 1;
                flow.bytes[1] += data.len() as u64;
                self.counters.pings_in += 1;
                let mut f = crate::gateway::ipv4_frame(
                    (MacAddr::ZERO, MacAddr::ZERO),
                    *seen_as.ip(),
                    guest,
                    PROTO_ICMP,
                    0,
                    data.len(),
                );
                let icmp = &mut f[34..];
                icmp.copy_from_slice(data);
                icmp[4..6].copy_from_slice(&ident.to_be_bytes());
                icmp[2..4].fill(0);
                let c = checksum::checksum(icmp);
                icmp[2..4].copy_from_slice(&c.to_be_bytes());
                self.frames.push_back((f, VnetHdr::default()));
            }
            _ => {}
        }
    }

    /// Moves what the guest sent on the flow to its host socket through `write` (a
    /// non-blocking `write(2)`), until the socket would block or nothing is left.
    pub fn to_host(
        &mut self,
        id: FlowId,
        mut write: impl FnMut(&[u8]) -> io::Result<usize>,
    ) -> Transfer {
        let Some(handle) = self.tcp_handle(id) else {
            return Transfer::default();
        };
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        let mut done = Transfer::default();
        let mut failed = false;
        while socket.can_recv() {
            match Step::of(socket.recv(|data| Step::counted(write(data)))) {
                Step::Moved(n) => done.bytes += n,
                Step::Again => {}
                Step::End => break,
                Step::Blocked => {
                    done.blocked = true;
                    break;
                }
                Step::Failed => {
                    failed = true;
                    break;
                }
            }
        }
        self.counters.bytes_to_host += done.bytes as u64;
        if done.bytes > 0 {
            // The window opened: the stack tells the guest.
            self.stack_dirty = true;
        }
        if failed {
            self.host_failed(id, handle);
        }
        self.touch(id.index);
        done
    }

    /// Fills the flow's send buffer towards the guest through `read` (a non-blocking
    /// `read(2)` of its host socket), until it would block, the buffer is full or the host
    /// closed its side.
    pub fn from_host(
        &mut self,
        now: Instant,
        id: FlowId,
        mut read: impl FnMut(&mut [u8]) -> io::Result<usize>,
    ) -> Transfer {
        let Some(handle) = self.tcp_handle(id) else {
            return Transfer::default();
        };
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        let mut done = Transfer::default();
        let (mut eof, mut failed) = (false, false);
        while socket.can_send() {
            match Step::of(socket.send(|room| Step::counted(read(room)))) {
                Step::Moved(n) => done.bytes += n,
                Step::Again => {}
                Step::End => {
                    eof = true;
                    break;
                }
                Step::Blocked => {
                    done.blocked = true;
                    break;
                }
                Step::Failed => {
                    failed = true;
                    break;
                }
            }
        }
        if eof {
            // The host closed its side: a FIN follows the data already buffered.
            socket.close();
        }
        self.counters.bytes_from_host += done.bytes as u64;
        if let Some(flow) = self.flow_mut(id) {
            flow.bytes[1] += done.bytes as u64;
            if done.bytes > 0 {
                flow.last_seen = now;
            }
            if let Kind::Tcp(tcp) = &mut flow.kind {
                tcp.host_eof |= eof;
            }
        }
        if done.bytes > 0 || eof {
            self.stack_dirty = true;
        }
        if failed {
            self.host_failed(id, handle);
        }
        self.touch(id.index);
        done
    }

    fn host_failed(&mut self, id: FlowId, handle: SocketHandle) {
        self.counters.tcp_host_errors += 1;
        self.sockets.get_mut::<tcp::Socket>(handle).abort();
        self.stack_dirty = true;
        self.touch(id.index);
    }

    fn tcp_handle(&self, id: FlowId) -> Option<SocketHandle> {
        match &self.flow(id)?.kind {
            Kind::Tcp(tcp) => tcp.handle,
            _ => None,
        }
    }

    /// The next host socket operation the I/O edge must carry out.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next TCP flow whose bytes the I/O edge should try to move ([`Self::to_host`],
    /// [`Self::from_host`]).
    pub fn poll_ready(&mut self) -> Option<FlowId> {
        self.ready.pop_front()
    }

    /// The next IPv4 packet for a guest, after [`ethernet::HEADER_LEN`] bytes of room for
    /// the Ethernet header, with its offload state. The stack's TCP segments carry a partial
    /// checksum (the pseudo-header's sum, completed by whoever delivers the frame), and those
    /// larger than the guest's MSS are TSO frames cut at that MSS.
    pub fn poll_packet(&mut self) -> Option<(Vec<u8>, VnetHdr)> {
        if let Some(frame) = self.frames.pop_front() {
            return Some(frame);
        }
        let mut frame = self.queues.tx.pop_front()?;
        let vnet = self.offload(&mut frame);
        Some((frame, vnet))
    }

    /// Makes a segment from the stack (`frame`: Ethernet room, then IPv4) an offloaded one.
    fn offload(&self, frame: &mut [u8]) -> VnetHdr {
        let l3 = ethernet::HEADER_LEN;
        let ip = &frame[l3..];
        let Some(ihl) = packet::ip_header_len(ip) else {
            return VnetHdr::default();
        };
        if ip[9] != PROTO_TCP || ip.len() < ihl + 20 {
            return VnetHdr::default();
        }
        let thl = usize::from(ip[ihl + 12] >> 4) * 4;
        let tcp_len = ip.len() - ihl;
        let (src, dst) = (addr_at(ip, 12), addr_at(ip, 16));
        let (sport, dport) = (
            u16::from_be_bytes([ip[ihl], ip[ihl + 1]]),
            u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]),
        );
        let sum = checksum::pseudo_header_v4(src.octets(), dst.octets(), PROTO_TCP, tcp_len as u16);
        let check = l3 + ihl + 16;
        frame[check..check + 2].copy_from_slice(&checksum::fold(sum).to_be_bytes());
        let mut vnet = VnetHdr {
            flags: crate::wire::vnet::F_NEEDS_CSUM,
            csum_start: (l3 + ihl) as u16,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        let key = Key::Tcp(SocketAddrV4::new(dst, dport), SocketAddrV4::new(src, sport));
        let mss = self
            .by_key
            .get(&key)
            .and_then(|&i| self.flows.get(i as usize)?.as_ref())
            .and_then(|f| match &f.kind {
                Kind::Tcp(tcp) => Some(tcp.mss),
                _ => None,
            })
            .unwrap_or(DEFAULT_MSS);
        // Options ride in every segment: the payload per segment is the MSS less them.
        let per_segment = usize::from(mss).saturating_sub(thl - 20).max(1);
        if tcp_len - thl > per_segment {
            vnet.gso_type = crate::wire::vnet::gso::TCPV4;
            vnet.gso_size = per_segment as u16;
            vnet.hdr_len = (l3 + ihl + thl) as u16;
        }
        vnet
    }

    /// Takes back the buffer of a frame from [`Self::poll_packet`] once it was sent.
    pub fn recycle(&mut self, buffer: Vec<u8>) {
        self.queues.recycle(buffer);
    }

    /// Runs the stack when something changed (segments in, buffers moved), then looks at the
    /// flows that changed: ended ones are removed, ones with bytes to move become ready.
    pub fn poll_stack(&mut self, now: Instant) {
        self.now = now;
        if self.stack_dirty || self.next_poll.is_some_and(|t| t <= now) {
            self.stack_dirty = false;
            let at = self.clock.stack_time(now);
            self.iface.poll(at, &mut self.queues, &mut self.sockets);
            let clock = self.clock;
            self.next_poll = self
                .iface
                .poll_at(at, &self.sockets)
                .map(|next| clock.engine_time(next));
        }
        let touched = std::mem::take(&mut self.touched);
        for &index in &touched {
            self.review(index);
        }
        self.touched = touched;
        self.touched.clear();
    }

    /// Decides what a TCP flow's stack state asks for.
    fn review(&mut self, index: u32) {
        let Some(id) = self.id_of(index) else {
            return;
        };
        let Some(Some(flow)) = self.flows.get_mut(index as usize) else {
            return;
        };
        flow.touched = false;
        let Kind::Tcp(tcp) = &mut flow.kind else {
            return;
        };
        let Some(handle) = tcp.handle else {
            return;
        };
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        match socket.state() {
            tcp::State::Closed | tcp::State::TimeWait => {
                self.remove(index);
                return;
            }
            tcp::State::Listen => {
                // The held SYN did not open it (a malformed SYN the stack ignored).
                self.remove(index);
                return;
            }
            _ => {}
        }
        let guest_finished = matches!(
            socket.state(),
            tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing
        );
        if guest_finished && socket.recv_queue() == 0 && !tcp.shut_write {
            // The guest sent FIN and everything before it reached the host.
            tcp.shut_write = true;
            self.actions.push_back(Action::ShutdownWrite(id));
        }
        if socket.can_recv() || (socket.can_send() && !tcp.host_eof) {
            self.ready.push_back(id);
        }
    }

    /// When [`Self::handle_timeout`] must next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.next_poll, self.next_sweep]
            .into_iter()
            .flatten()
            .min()
    }

    /// Retransmissions, and idle flows expired (the same timeouts as packet NAT).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_sweep.is_some_and(|t| t <= now) {
            self.sweep(now);
            self.next_sweep = (!self.by_key.is_empty()).then(|| now + SWEEP_EVERY);
        }
        self.poll_stack(now);
    }

    fn sweep(&mut self, now: Instant) {
        let timeouts = self.config.timeouts;
        let mut expired = Vec::new();
        for (index, slot) in self.flows.iter().enumerate() {
            let Some(flow) = slot else {
                continue;
            };
            if !self.by_key.contains_key(&flow.key) {
                continue;
            }
            let limit = match &flow.kind {
                Kind::Udp { .. } | Kind::UdpForward { .. } => timeouts.udp,
                Kind::Ping { .. } => timeouts.icmp,
                Kind::Tcp(tcp) => match tcp.handle {
                    Some(h)
                        if self.sockets.get::<tcp::Socket>(h).state()
                            == tcp::State::Established =>
                    {
                        timeouts.tcp_established
                    }
                    _ => timeouts.tcp_transitory,
                },
            };
            if now.saturating_duration_since(flow.last_seen) >= limit {
                expired.push(index as u32);
            }
        }
        for index in expired {
            self.counters.flows_expired += 1;
            self.remove(index);
        }
    }

    /// The flows as `conntrack -L` lists them: original = guest to destination, reply =
    /// destination to the host socket.
    pub fn rows(&self, now: Instant) -> Vec<FlowRow> {
        let timeouts = self.config.timeouts;
        let mut rows = Vec::new();
        for flow in self.flows.iter().flatten() {
            if !self.by_key.contains_key(&flow.key) {
                continue;
            }
            let local = flow
                .local
                .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
            let idle = now.saturating_duration_since(flow.last_seen);
            let row = |proto: u8,
                       name,
                       state,
                       limit: Duration,
                       guest: SocketAddrV4,
                       remote: SocketAddrV4| {
                let original = Tuple {
                    proto,
                    src: *guest.ip(),
                    sport: guest.port(),
                    dst: *remote.ip(),
                    dport: remote.port(),
                };
                let reply = Tuple {
                    proto,
                    src: *remote.ip(),
                    sport: remote.port(),
                    dst: *local.ip(),
                    dport: local.port(),
                };
                FlowRow {
                    proto: name,
                    state,
                    timeout_secs: limit.saturating_sub(idle).as_secs(),
                    original,
                    reply,
                    packets: flow.packets,
                    bytes: flow.bytes,
                    replied: flow.packets[1] > 0 || flow.bytes[1] > 0,
                }
            };
            match (&flow.kind, flow.key) {
                (Kind::Tcp(tcp), Key::Tcp(guest, remote)) => {
                    let state = tcp
                        .handle
                        .map(|h| self.sockets.get::<tcp::Socket>(h).state());
                    let (name, limit) = match state {
                        None => ("SYN_SENT", timeouts.tcp_transitory),
                        Some(tcp::State::Established) => ("ESTABLISHED", timeouts.tcp_established),
                        Some(tcp::State::SynReceived | tcp::State::SynSent) => {
                            ("SYN_RECV", timeouts.tcp_transitory)
                        }
                        Some(_) => ("FIN_WAIT", timeouts.tcp_transitory),
                    };
                    rows.push(row(PROTO_TCP, "tcp", name, limit, guest, remote));
                }
                (Kind::Udp { remotes }, Key::Udp(guest)) => {
                    for &remote in remotes {
                        rows.push(row(PROTO_UDP, "udp", "", timeouts.udp, guest, remote));
                    }
                }
                (Kind::UdpForward { remote, .. }, Key::UdpForward(guest, _)) => {
                    rows.push(row(PROTO_UDP, "udp", "", timeouts.udp, guest, *remote));
                }
                (Kind::Ping { .. }, Key::Ping(guest, ident)) => {
                    let guest = SocketAddrV4::new(guest, ident);
                    let remote = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, ident);
                    rows.push(row(PROTO_ICMP, "icmp", "", timeouts.icmp, guest, remote));
                }
                _ => {}
            }
        }
        rows
    }
}

/// What one `read` or `write` between a host socket and a stack buffer did.
enum Step {
    Moved(usize),
    /// Nothing moved: end of stream (a read) or no room (a write).
    End,
    Blocked,
    /// Interrupted: try again.
    Again,
    Failed,
}

impl Step {
    /// The stack's buffer closure result: bytes taken, and the call's own result.
    fn counted(result: io::Result<usize>) -> (usize, io::Result<usize>) {
        match result {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        }
    }

    fn of<E>(result: Result<io::Result<usize>, E>) -> Step {
        match result {
            Ok(Ok(0)) => Step::End,
            Ok(Ok(n)) => Step::Moved(n),
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => Step::Blocked,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => Step::Again,
            Ok(Err(_)) | Err(_) => Step::Failed,
        }
    }
}

/// RFC 9293 3.7.1: the MSS a host assumes when its peer announces none.
const DEFAULT_MSS: u16 = 536;

/// Raises the MSS option of the SYN `segment` (IPv4, header `ihl` long) to [`GSO_MSS`] and
/// returns the one the guest announced. The checksum is left alone: the stack does not verify
/// it (the engine did, before).
fn raise_mss(segment: &mut [u8], ihl: usize) -> Option<u16> {
    let thl = usize::from(*segment.get(ihl + 12)? >> 4) * 4;
    let options = segment.get_mut(ihl + 20..ihl + thl)?;
    let mut at = 0;
    while at < options.len() {
        match options[at] {
            0 => break,
            1 => at += 1,
            kind => {
                let len = usize::from(*options.get(at + 1)?);
                if len < 2 || at + len > options.len() {
                    return None;
                }
                if kind == 2 && len == 4 {
                    let mss = u16::from_be_bytes([options[at + 2], options[at + 3]]);
                    options[at + 2..at + 4].copy_from_slice(&GSO_MSS.max(mss).to_be_bytes());
                    return Some(mss);
                }
                at += len;
            }
        }
    }
    None
}

/// The start of `ip` that an ICMP error quotes (RFC 1812 4.3.2.3: as much as fits in 576
/// bytes), its total length and header checksum made to match the cut.
fn quote_of(ip: &[u8]) -> Vec<u8> {
    let mut quote = ip[..ip.len().min(576 - 28)].to_vec();
    let len = quote.len() as u16;
    quote[2..4].copy_from_slice(&len.to_be_bytes());
    quote[10..12].fill(0);
    let ihl = usize::from(quote[0] & 0x0f) * 4;
    let c = checksum::checksum(&quote[..ihl]);
    quote[10..12].copy_from_slice(&c.to_be_bytes());
    quote
}

/// RFC 9293 3.1: the checksum over the pseudo-header and the whole segment.
fn tcp_checksum_ok(ip: &[u8], ihl: usize) -> bool {
    let segment = &ip[ihl..];
    let Ok(len) = u16::try_from(segment.len()) else {
        return false;
    };
    let mut src = [0u8; 4];
    let mut dst = [0u8; 4];
    src.copy_from_slice(&ip[12..16]);
    dst.copy_from_slice(&ip[16..20]);
    let sum = checksum::pseudo_header_v4(src, dst, PROTO_TCP, len);
    checksum::fold(checksum::accumulate(sum, segment)) == 0xffff
}
