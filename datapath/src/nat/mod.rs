//! MASQUERADE, as libvirt's iptables rules ask of the kernel, without the kernel.
//!
//! Guests on the network's subnet share one external address. Each connection is an entry
//! keyed by the tuple of both directions (the guest's packet as sent, the remote's reply as
//! it arrives), so either direction costs one hash lookup and a few in-place rewrites with
//! incremental checksums. The behaviour is that of a well-behaved NAT per the IETF BEHAVE
//! requirements: endpoint-independent mapping (RFC 4787 4.1, RFC 5382 REQ-1), configurable
//! filtering (RFC 4787 5), hairpinning (RFC 4787 6), the RFC 4787 4.3 / RFC 5382 REQ-5
//! timeouts, and ICMP errors matched to their connection by the packet they quote (RFC 5508).
//!
//! Sans-IO: packets and `now` in, rewritten packets and verdicts out. Expired entries are
//! removed by a sweep that looks at a bounded slice of the table per timer call, and an entry
//! found expired by a lookup is treated as gone, so no timer precision is needed for
//! correctness.
//!
//! Memory is what bounds the table (issue 10: a million connections in 200 MB), so a
//! connection is one compact record in a slab, found through an index of 4-byte references
//! that keeps no copy of the keys (see `index`), and nothing per connection is allocated on
//! its own.
//!
//! A TCP connection both ends have closed (TIME_WAIT, or CLOSE after a RST) keeps its entry
//! for the full transitory timeout, and a UDP exchange or a half-open TCP connection its full
//! timeout, but when a cap (the table's, or the guest's) would refuse a new connection, the
//! oldest of those that are closed, expired or not yet assured gives up its entry instead, as
//! Linux's conntrack lets entries that are not ASSURED go under pressure (`early_drop`,
//! `tcp_can_early_drop`). Assured means a TCP connection that completed its handshake, or UDP
//! that went both ways at least twice each (a stream, not one query and its answer); ICMP
//! queries never are. Without this, a guest that opens short connections fast (8192 in 4
//! minutes at the default per-guest cap), or resolves names itself (a UDP flow per query, 5
//! minutes each: 27 queries a second fill the cap), would be refused every new connection
//! until the old ones time out. Open, assured connections are never taken.

pub(crate) mod evict;
pub mod fast;
mod index;
pub mod mirror;
pub mod packet;

use crate::port::DropReason;
use crate::wire::ipv4::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use crate::wire::{MacAddr, checksum};
use ahash::RandomState;
use index::{FlowRef, Index, Probe};
use mirror::{NatMirror, Published, Rewrite, Tallies};
use packet::{End, Kind, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tuple};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default cap on connections (the kernel's `nf_conntrack_max` is of this order).
pub const DEFAULT_MAX_FLOWS: usize = 65536;
/// Default cap on one guest's connections, so one guest cannot starve the others.
pub const DEFAULT_MAX_FLOWS_PER_GUEST: usize = 8192;
/// How long an unreassembled fragment train keeps its connection (RFC 791's 15 s suggestion,
/// doubled like Linux's `ipfrag_time` of 30 s).
const FRAGMENT_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_FRAGMENT_TRAINS: usize = 4096;
/// The sweep looks at this many table slots per call and runs this often.
const SWEEP_BATCH: usize = 8192;
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Connections whose memory is set aside up front (as address space: pages become resident
/// when used); a larger `max_flows` is honoured by growing the table as connections come.
const PREALLOCATED_FLOWS: usize = 1 << 22;

/// Why a connection gave up its entry at a cap.
#[derive(Debug, Clone, Copy)]
enum Eviction {
    /// Its time was up (the sweep had not reached it yet).
    Expired,
    /// Closed, or not assured.
    Evicted,
}

/// RFC 4787 5: which inbound packets an existing mapping lets in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// Anyone may reach the mapping (RFC 4787 REQ-8's "full cone").
    EndpointIndependent,
    /// Only hosts the guest has sent to.
    AddressDependent,
    /// Only the exact host and port the guest has sent to (the default, as the kernel does).
    AddressAndPortDependent,
}

impl std::str::FromStr for Filtering {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "endpoint-independent" => Ok(Filtering::EndpointIndependent),
            "address-dependent" => Ok(Filtering::AddressDependent),
            "address-and-port-dependent" => Ok(Filtering::AddressAndPortDependent),
            _ => Err("one of endpoint-independent, address-dependent, \
                      address-and-port-dependent"
                .into()),
        }
    }
}

/// Idle timeouts per protocol and state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// RFC 4787 REQ-5: at least 2 minutes; 5 recommended.
    pub udp: Duration,
    /// RFC 5382 REQ-5: at least 2 hours 4 minutes.
    pub tcp_established: Duration,
    /// RFC 5382 REQ-5: at least 4 minutes for partially open or closing connections.
    pub tcp_transitory: Duration,
    /// RFC 5508 REQ-1: ICMP query mappings at least 60 s.
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            udp: Duration::from_secs(300),
            tcp_established: Duration::from_secs(2 * 3600 + 4 * 60),
            tcp_transitory: Duration::from_secs(240),
            icmp: Duration::from_secs(60),
        }
    }
}

/// NAT settings: libvirt's `<nat>` plus switchyard's `<sy:nat>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatConfig {
    /// The network's subnet; only its sources are translated (libvirt's `-s 192.168.122.0/24`).
    pub internal: Ipv4Addr,
    pub internal_prefix: u8,
    /// `<nat><address start=... end=...>`: the address the guests share.
    pub external: Ipv4Addr,
    /// `<nat><port start end>`: external TCP/UDP ports (default 1024-65535).
    pub ports: (u16, u16),
    pub filtering: Filtering,
    pub max_flows: usize,
    pub max_flows_per_guest: usize,
    pub timeouts: Timeouts,
}

impl NatConfig {
    pub fn new(internal: Ipv4Addr, internal_prefix: u8, external: Ipv4Addr) -> NatConfig {
        NatConfig {
            internal,
            internal_prefix,
            external,
            ports: (1024, 65535),
            filtering: Filtering::AddressAndPortDependent,
            max_flows: DEFAULT_MAX_FLOWS,
            max_flows_per_guest: DEFAULT_MAX_FLOWS_PER_GUEST,
            timeouts: Timeouts::default(),
        }
    }

    fn is_internal(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - self.internal_prefix as u32)
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.internal) & mask
    }
}

/// Which way a packet crosses the NAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    /// From a guest towards the outside.
    Out = 0,
    /// From the outside towards a guest.
    In = 1,
}

/// TCP connection state as tracked from SYN, FIN and RST (RFC 5382 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    SynSent,
    SynReceived,
    Established,
    FinWait,
    TimeWait,
    Close,
}

impl TcpState {
    fn name(self) -> &'static str {
        match self {
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynReceived => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
        }
    }
}

/// One connection, in 72 bytes (issue 10: a million connections in 200 MB; with the index's
/// 16 to 32 bytes, about 90 bytes per connection in all). Both of its tuples are kept as their
/// distinct fields only: the reply tuple is the original one turned around, with the external
/// address (the same for every connection) and the mapped port as its destination. The
/// counters stay 64-bit because `conntrack` shows them and a long-lived flow passes 4 GB; the
/// deadline is exact nanoseconds (see [`Stamp`]) so expiry behaves as it did with `Instant`s.
#[derive(Debug, Clone)]
struct Flow {
    proto: u8,
    /// The guest's end, as the guest sends from it.
    guest: Ipv4Addr,
    guest_port: u16,
    /// The remote end, as the guest sends to it (an ICMP query's identifier for ICMP).
    remote: Ipv4Addr,
    remote_port: u16,
    /// The mapped port (the translated identifier for ICMP queries).
    external_port: u16,
    guest_mac: MacAddr,
    initiator: Dir,
    tcp: TcpState,
    fin_seen: [bool; 2],
    seen: [bool; 2],
    expires: Stamp,
    packets: [u64; 2],
    bytes: [u64; 2],
    /// Tells a reused slot from the entry a fragment train was bound to.
    generation: u32,
}

// The budget above, kept honest: `Option` costs nothing (the enums leave a niche).
const _: () = assert!(std::mem::size_of::<Option<Flow>>() <= 72);

/// An instant as nanoseconds since the first connection of its table (negative before it):
/// half the size of an `Instant` and as exact for 292 years either way.
type Stamp = i64;

/// The packed form of a tuple the index hashes and compares.
fn index_key(t: &Tuple) -> u128 {
    (t.proto as u128) << 96
        | (u32::from(t.src) as u128) << 64
        | (t.sport as u128) << 48
        | (u32::from(t.dst) as u128) << 16
        | t.dport as u128
}

impl Flow {
    fn external_port(&self) -> u16 {
        self.external_port
    }

    /// The guest's packets as sent: guest -> remote.
    fn original(&self) -> Tuple {
        Tuple {
            proto: self.proto,
            src: self.guest,
            sport: self.guest_port,
            dst: self.remote,
            dport: self.remote_port,
        }
    }

    /// The remote's packets as they arrive: remote -> external.
    fn reply(&self, external: Ipv4Addr) -> Tuple {
        Tuple {
            proto: self.proto,
            src: self.remote,
            // An echo reply carries the (translated) identifier in both "port" places.
            sport: if self.proto == PROTO_ICMP {
                self.external_port
            } else {
                self.remote_port
            },
            dst: external,
            dport: self.external_port,
        }
    }

    fn tuple(&self, dir: Dir, external: Ipv4Addr) -> Tuple {
        match dir {
            Dir::Out => self.original(),
            Dir::In => self.reply(external),
        }
    }

    /// Both ends are done with it: TIME_WAIT, or CLOSE after a RST.
    fn is_closed(&self) -> bool {
        self.proto == PROTO_TCP && matches!(self.tcp, TcpState::TimeWait | TcpState::Close)
    }

    fn timeout(&self, t: &Timeouts) -> Duration {
        match self.proto {
            PROTO_TCP if self.tcp == TcpState::Established => t.tcp_established,
            PROTO_TCP => t.tcp_transitory,
            PROTO_UDP => t.udp,
            _ => t.icmp,
        }
    }

    /// RFC 5382 5 / RFC 7857 2.2: follow the handshake and the close from the flags.
    fn track_tcp(&mut self, dir: Dir, flags: u8) {
        let responder = dir != self.initiator;
        let syn = flags & TCP_SYN != 0;
        let ack = flags & TCP_ACK != 0;
        if flags & TCP_RST != 0 {
            // RFC 9293 3.10.7.3: the responder's reset of a SYN it never acknowledged is not
            // one (a blind RST, or one for another connection); Linux's conntrack ignores it
            // too. The initiator may abort its own attempt.
            if !(self.tcp == TcpState::SynSent && responder && !ack) {
                self.tcp = TcpState::Close;
            }
            return;
        }
        match self.tcp {
            TcpState::TimeWait | TcpState::Close if syn && !ack && !responder => {
                // The same tuple opens a new connection.
                self.tcp = TcpState::SynSent;
                self.fin_seen = [false; 2];
            }
            TcpState::SynSent if syn && responder => self.tcp = TcpState::SynReceived,
            TcpState::SynReceived if ack && !syn && !responder => self.tcp = TcpState::Established,
            _ => {}
        }
        if flags & TCP_FIN != 0 {
            self.fin_seen[dir as usize] = true;
            self.tcp = if self.fin_seen == [true, true] {
                TcpState::TimeWait
            } else {
                TcpState::FinWait
            };
        }
    }
}

/// An external port shared by every connection of one guest address and port (RFC 4787
/// REQ-1, endpoint-independent mapping).
#[derive(Debug, Clone, Copy)]
struct Mapping {
    external_port: u16,
    flows: u32,
    guest_mac: MacAddr,
}

type MapKey = (u8, Ipv4Addr, u16);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FragKey {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
}

#[derive(Debug, Clone, Copy)]
struct FragTrain {
    slot: u32,
    generation: u32,
    dir: Dir,
    expires: Instant,
}

/// What NAT counts besides drops (which the ports count by reason).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NatCounters {
    pub flows_created: u64,
    pub flows_expired: u64,
    pub translated_out: u64,
    pub translated_in: u64,
    pub icmp_errors_translated: u64,
    pub fragments_translated: u64,
    pub hairpinned: u64,
    /// Connections closed (TCP's TIME_WAIT, CLOSE) or not assured (see the module's doc) that
    /// gave up their entry to a new connection at a cap, before their timeout.
    pub flows_evicted: u64,
}

/// The result of translating a guest's packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outbound {
    /// The destination is the external address itself: the packet must now be taken as
    /// arriving from outside (hairpinning, RFC 4787 6).
    pub hairpin: bool,
    /// The connection's slot, for [`Nat::publish`] (none for fragments and ICMP errors).
    slot: Option<u32>,
}

/// One connection as `switchyard conntrack` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowRow {
    pub proto: &'static str,
    pub state: &'static str,
    pub timeout_secs: u64,
    pub original: Tuple,
    pub reply: Tuple,
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub replied: bool,
}

impl Serialize for Tuple {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(4))?;
        map.serialize_entry("src", &self.src)?;
        map.serialize_entry("dst", &self.dst)?;
        map.serialize_entry("sport", &self.sport)?;
        map.serialize_entry("dport", &self.dport)?;
        map.end()
    }
}

impl fmt::Display for FlowRow {
    /// The layout of `conntrack -L`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let number = match self.proto {
            "tcp" => PROTO_TCP,
            "udp" => PROTO_UDP,
            _ => PROTO_ICMP,
        };
        write!(f, "{:<8} {:<2} {} ", self.proto, number, self.timeout_secs)?;
        if !self.state.is_empty() {
            write!(f, "{} ", self.state)?;
        }
        let side = |f: &mut fmt::Formatter<'_>, t: &Tuple, i: usize| {
            if number == PROTO_ICMP {
                write!(
                    f,
                    "src={} dst={} type=8 code=0 id={} ",
                    t.src, t.dst, t.sport
                )?;
            } else {
                write!(
                    f,
                    "src={} dst={} sport={} dport={} ",
                    t.src, t.dst, t.sport, t.dport
                )?;
            }
            write!(f, "packets={} bytes={}", self.packets[i], self.bytes[i])
        };
        side(f, &self.original, 0)?;
        if !self.replied {
            f.write_str(" [UNREPLIED]")?;
        }
        f.write_str(" ")?;
        side(f, &self.reply, 1)?;
        if self.replied {
            f.write_str(" [ASSURED]")?;
        }
        Ok(())
    }
}

/// The connection table and the translation it drives.
#[derive(Debug)]
pub struct Nat {
    config: NatConfig,
    slots: Vec<Option<Flow>>,
    free: Vec<u32>,
    live: usize,
    generation: u32,
    /// Both tuples of every flow in `slots`, as references to it.
    index: Index,
    /// What [`Stamp`]s count from: the first connection's `now`.
    epoch: Option<Instant>,
    /// The last `now` turned into a [`Stamp`]: every frame of a wakeup comes with the same one.
    last_stamp: Option<(Instant, Stamp)>,
    mappings: HashMap<MapKey, Mapping, RandomState>,
    by_external: HashMap<(u8, u16), (Ipv4Addr, u16), RandomState>,
    /// Connections per (protocol, external port, remote address), for address-dependent
    /// filtering (and kept only under it: with a million flows it would cost 26 bytes each).
    remotes: HashMap<(u8, u16, Ipv4Addr), u32, RandomState>,
    per_guest: HashMap<Ipv4Addr, u32, RandomState>,
    fragments: HashMap<FragKey, FragTrain, RandomState>,
    /// Candidates for eviction at a cap as (slot, generation), oldest first, the table's and
    /// each guest's (`evict`): every connection as it is made or reopened (not yet assured)
    /// and again as it closes. An entry whose slot no longer holds that generation is stale
    /// (a reopened connection takes a new one), and one whose connection became assured and
    /// is still open is dropped when looked at (it comes back when it closes).
    candidates: evict::Candidates,
    port_cursor: u32,
    sweep_cursor: usize,
    next_sweep: Option<Instant>,
    /// Established connections as the fast-path workers see them, when there are workers.
    mirror: Option<Arc<NatMirror>>,
    pub counters: NatCounters,
}

impl Nat {
    pub fn new(config: NatConfig) -> Nat {
        let cap = config.max_flows.min(PREALLOCATED_FLOWS);
        let hasher = RandomState::new;
        Nat {
            slots: Vec::with_capacity(cap),
            free: Vec::with_capacity(cap),
            live: 0,
            generation: 0,
            index: Index::new(config.max_flows, cap * 2),
            epoch: None,
            last_stamp: None,
            mappings: HashMap::with_capacity_and_hasher(cap.min(65536), hasher()),
            by_external: HashMap::with_capacity_and_hasher(cap.min(65536), hasher()),
            remotes: HashMap::with_hasher(hasher()),
            per_guest: HashMap::with_hasher(hasher()),
            fragments: HashMap::with_capacity_and_hasher(MAX_FRAGMENT_TRAINS, hasher()),
            candidates: evict::Candidates::new(cap, config.max_flows_per_guest),
            port_cursor: 0,
            sweep_cursor: 0,
            next_sweep: None,
            mirror: None,
            counters: NatCounters::default(),
            config,
        }
    }

    /// The established connections as fast-path workers read them ([`mirror`]): from now on
    /// [`Nat::publish`] fills it.
    pub fn mirror(&mut self) -> Arc<NatMirror> {
        let external = self.config.external;
        self.mirror
            .get_or_insert_with(|| Arc::new(NatMirror::new(external)))
            .clone()
    }

    /// Shares the connection a guest's packet just went out on with the workers, once it is
    /// established (TCP) or answered (UDP), now that the engine knows the MAC of its next
    /// hop; true when the way out was written now (new, or with a new next hop), so its next
    /// hop is one workers send to. Hairpinned connections and ICMP queries stay the engine's.
    pub fn publish(&mut self, out: &Outbound, next_hop: MacAddr) -> bool {
        let (Some(mirror), Some(slot)) = (&self.mirror, out.slot) else {
            return false;
        };
        let Some(flow) = self.slots.get(slot as usize).and_then(Option::as_ref) else {
            return false;
        };
        let shareable = match flow.proto {
            PROTO_TCP => flow.tcp == TcpState::Established,
            PROTO_UDP => flow.seen == [true, true],
            _ => false,
        };
        let external = self.config.external;
        if !shareable || out.hairpin || flow.remote == external {
            return false;
        }
        let outward = Rewrite {
            ip: external,
            port: flow.external_port,
            mac: next_hop,
            guest: flow.guest_mac,
        };
        let inward = Rewrite {
            ip: flow.guest,
            port: flow.guest_port,
            mac: flow.guest_mac,
            guest: flow.guest_mac,
        };
        mirror.publish(Dir::In, &flow.reply(external), &inward);
        mirror.publish(Dir::Out, &flow.original(), &outward) == Published::Written
    }

    /// Whether workers may be sending connections out to a next hop: some connection's way
    /// out is published. Without workers, never.
    pub fn workers_send_out(&self) -> bool {
        self.mirror.as_ref().is_some_and(|m| m.sends_out())
    }

    /// Takes every connection back from the workers (a next hop's MAC changed): they hand
    /// its packets to the engine until it publishes them again. One store, whatever the
    /// table holds (a neighbour flapping its ARP costs no sweep).
    pub fn withdraw_all(&mut self) {
        let Some(mirror) = self.mirror.clone() else {
            return;
        };
        if mirror.next_invalidation_empties() {
            // Every entry goes with what workers counted and saw of it: taken first, so a
            // connection only workers carry keeps its deadline (once in 65,536 calls).
            for slot in 0..self.slots.len() as u32 {
                if self.slots[slot as usize].is_some() {
                    self.catch_up(slot, false);
                }
            }
        }
        mirror.invalidate();
    }

    /// Takes the connection in `slot` back from the workers, with what they counted and saw
    /// of it.
    fn withdraw(&mut self, slot: u32) {
        self.catch_up(slot, true);
    }

    /// Whether workers translated for the connection in `slot` recently enough that it has
    /// not expired at `now` after all.
    fn revived(&mut self, slot: u32, now: Stamp) -> bool {
        self.catch_up(slot, false)
            .is_some_and(|expires| expires > now)
    }

    /// Adds what workers counted of the connection in `slot` to it, and moves its deadline to
    /// where their last packet puts it if that is later; `withdraw` takes the connection
    /// back from them too. Its deadline, if there are workers.
    fn catch_up(&mut self, slot: u32, withdraw: bool) -> Option<Stamp> {
        let mirror = self.mirror.clone()?;
        let (external, timeouts) = (self.config.external, self.config.timeouts);
        let flow = self.slots.get(slot as usize).and_then(Option::as_ref)?;
        let mut tallies = [Tallies::default(); 2];
        for dir in [Dir::Out, Dir::In] {
            let tuple = flow.tuple(dir, external);
            tallies[dir as usize] = if withdraw {
                mirror.withdraw(dir, &tuple)
            } else {
                mirror.tallies(dir, &tuple, true)
            };
        }
        let last = tallies[0].seen.max(tallies[1].seen);
        let by_workers = last.map(|seen| deadline(self.stamp(seen), flow.timeout(&timeouts)));
        let flow = self.flow_mut(slot);
        for (dir, t) in tallies.iter().enumerate() {
            flow.packets[dir] += t.packets;
            flow.bytes[dir] += t.bytes;
        }
        flow.expires = flow.expires.max(by_workers.unwrap_or(Stamp::MIN));
        Some(flow.expires)
    }

    /// When the connection `f` expires, counting what workers did with it since the engine
    /// last caught up.
    fn expiry(&self, f: &Flow) -> Stamp {
        let Some(mirror) = &self.mirror else {
            return f.expires;
        };
        let external = self.config.external;
        let seen = [Dir::Out, Dir::In]
            .into_iter()
            .filter_map(|dir| mirror.tallies(dir, &f.tuple(dir, external), false).seen)
            .max();
        let timeout = f.timeout(&self.config.timeouts);
        seen.map_or(f.expires, |seen| {
            f.expires.max(deadline(self.stamp(seen), timeout))
        })
    }

    pub fn config(&self) -> &NatConfig {
        &self.config
    }

    /// Live connections.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Translates a guest's IPv4 packet `p` (header checked, cut to its total length) for the
    /// outside: source becomes the external address and mapped port. `partial` says the L4
    /// checksum is a virtio partial sum.
    pub fn handle_outbound(
        &mut self,
        now: Instant,
        p: &mut [u8],
        guest_mac: MacAddr,
        partial: bool,
    ) -> Result<Outbound, DropReason> {
        let ihl = packet::ip_header_len(p).ok_or(DropReason::BadHeader)?;
        let src = Ipv4Addr::from([p[12], p[13], p[14], p[15]]);
        let dst = Ipv4Addr::from([p[16], p[17], p[18], p[19]]);
        // libvirt's rules: only the subnet's sources, never to the subnet itself (`! -d`; a
        // guest with a narrower netmask sends there through the gateway), multicast or
        // broadcast.
        if !self.config.is_internal(src)
            || self.config.is_internal(dst)
            || dst.is_multicast()
            || dst.is_broadcast()
        {
            return Err(DropReason::NoRoute);
        }
        let hairpin = Outbound {
            hairpin: dst == self.config.external,
            slot: None,
        };
        let (offset, more) = packet::fragment_info(p);
        if offset != 0 {
            let (slot, _) = self.fragment_flow(now, p, Dir::Out)?;
            let external = self.config.external;
            packet::rewrite_addr(p, End::Src, external, None, false);
            self.count(slot, Dir::Out, p.len());
            self.counters.fragments_translated += 1;
            return Ok(hairpin);
        }
        let (tuple, kind, layout) = packet::classify(p, ihl).ok_or(DropReason::NatUnsupported)?;
        let tcp_flags = match kind {
            Kind::IcmpError => {
                self.translate_error(now, p, ihl, Dir::Out)?;
                return Ok(hairpin);
            }
            Kind::Flow { tcp_flags } => tcp_flags,
        };
        let (probe, stamp) = (self.index.probe(index_key(&tuple)), self.stamp_now(now));
        let slot = match self.lookup(stamp, &probe, Dir::Out) {
            Some(slot) => slot,
            None => {
                let opens = match tuple.proto {
                    PROTO_TCP => tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN,
                    PROTO_UDP => true,
                    _ => p[ihl] == packet::ICMP_ECHO_REQUEST,
                };
                if !opens {
                    return Err(DropReason::NatUnsupported);
                }
                self.create_outbound(now, tuple, &probe, guest_mac)?
            }
        };
        let flow = self.flow_mut(slot);
        let port = flow.external_port();
        // Written only when it changed: the record's line stays clean, and a load of the
        // fields beside it does not wait on the store.
        if flow.guest_mac != guest_mac {
            flow.guest_mac = guest_mac;
        }
        self.track(stamp, slot, Dir::Out, tcp_flags, p.len());
        let external = self.config.external;
        packet::rewrite_addr(p, End::Src, external, Some(&layout), partial);
        packet::rewrite_port(p, End::Src, port, &layout, partial);
        if more {
            self.bind_fragments(now, &tuple, p, slot, Dir::Out);
        }
        self.counters.translated_out += 1;
        Ok(Outbound {
            slot: Some(slot),
            ..hairpin
        })
    }

    /// Translates a packet that arrived for the external address back to its guest: returns
    /// the guest's MAC to deliver it to.
    pub fn handle_inbound(
        &mut self,
        now: Instant,
        p: &mut [u8],
        partial: bool,
    ) -> Result<MacAddr, DropReason> {
        let ihl = packet::ip_header_len(p).ok_or(DropReason::BadHeader)?;
        let (offset, more) = packet::fragment_info(p);
        if offset != 0 {
            let (slot, guest) = self.fragment_flow(now, p, Dir::In)?;
            packet::rewrite_addr(p, End::Dst, guest, None, false);
            self.count(slot, Dir::In, p.len());
            self.counters.fragments_translated += 1;
            return Ok(self.flow_mut(slot).guest_mac);
        }
        let (tuple, kind, layout) = packet::classify(p, ihl).ok_or(DropReason::NatUnsupported)?;
        let tcp_flags = match kind {
            Kind::IcmpError => return self.translate_error(now, p, ihl, Dir::In),
            Kind::Flow { tcp_flags } => tcp_flags,
        };
        let (probe, stamp) = (self.index.probe(index_key(&tuple)), self.stamp_now(now));
        let slot = match self.lookup(stamp, &probe, Dir::In) {
            Some(slot) => slot,
            None => self.admit_inbound(now, tuple, &probe, tcp_flags)?,
        };
        self.track(stamp, slot, Dir::In, tcp_flags, p.len());
        let flow = self.flow_mut(slot);
        let (guest, guest_port, mac) = (flow.guest, flow.guest_port, flow.guest_mac);
        packet::rewrite_addr(p, End::Dst, guest, Some(&layout), partial);
        packet::rewrite_port(p, End::Dst, guest_port, &layout, partial);
        if more {
            self.bind_fragments(now, &tuple, p, slot, Dir::In);
        }
        self.counters.translated_in += 1;
        Ok(mac)
    }

    /// Counts a packet that went through both translations (guest to guest via the external
    /// address).
    pub fn record_hairpin(&mut self) {
        self.counters.hairpinned += 1;
    }

    /// RFC 5508 4.1 / 4.2: an ICMP error is translated through the connection of the packet it
    /// quotes (which went the other way), quoted header and checksums included.
    fn translate_error(
        &mut self,
        now: Instant,
        p: &mut [u8],
        ihl: usize,
        dir: Dir,
    ) -> Result<MacAddr, DropReason> {
        if packet::fragment_info(p) != (0, false) {
            return Err(DropReason::NatUnsupported);
        }
        // Its checksum is made anew below, so a damaged one must not pass as good: the kernel
        // checks it first too (`nf_conntrack_icmpv4_error`). A Fragmentation Needed with a
        // flipped bit in its MTU would otherwise set the guest's path MTU.
        if checksum::checksum(&p[ihl..]) != 0 {
            return Err(DropReason::BadChecksum);
        }
        let quote_at = ihl + 8;
        let (quoted, quoted_layout) =
            packet::classify_quoted(&p[quote_at..]).ok_or(DropReason::NatUnsupported)?;
        let probe = self.index.probe(index_key(&quoted.reversed()));
        let stamp = self.stamp_now(now);
        let slot = self
            .lookup(stamp, &probe, dir)
            .ok_or(DropReason::NatNoFlow)?;
        let flow = self.flow_mut(slot);
        let (guest, guest_port, external_port, mac) = (
            flow.guest,
            flow.guest_port,
            flow.external_port(),
            flow.guest_mac,
        );
        let external = self.config.external;
        let q = &mut p[quote_at..];
        match dir {
            Dir::In => {
                packet::rewrite_addr(q, End::Src, guest, Some(&quoted_layout), false);
                packet::rewrite_port(q, End::Src, guest_port, &quoted_layout, false);
                packet::rewrite_addr(p, End::Dst, guest, None, false);
            }
            Dir::Out => {
                packet::rewrite_addr(q, End::Dst, external, Some(&quoted_layout), false);
                packet::rewrite_port(q, End::Dst, external_port, &quoted_layout, false);
                packet::rewrite_addr(p, End::Src, external, None, false);
            }
        }
        packet::refresh_icmp_checksum(p, ihl);
        // Not counted as the connection's packets: an error is no answer, and must not make a
        // dead flow look assured (conntrack neither).
        self.counters.icmp_errors_translated += 1;
        Ok(mac)
    }

    fn flow_mut(&mut self, slot: u32) -> &mut Flow {
        // Invariant: slots handed out by `lookup`/`create` hold a flow until `remove`.
        self.slots[slot as usize]
            .as_mut()
            .expect("slot of a live flow")
    }

    /// The live flow the tuple of `probe` belongs to in direction `dir`; an expired one is
    /// removed.
    fn lookup(&mut self, now: Stamp, probe: &Probe, dir: Dir) -> Option<u32> {
        let (slots, external) = (&self.slots, self.config.external);
        let r = self.index.find(probe, |r| {
            r & 1 == dir as u32 && key_of(slots, external, r) == probe.key
        })?;
        let slot = r / 2;
        if self.flow_mut(slot).expires <= now && !self.revived(slot, now) {
            self.remove(slot);
            self.counters.flows_expired += 1;
            return None;
        }
        Some(slot)
    }

    fn count(&mut self, slot: u32, dir: Dir, len: usize) {
        let flow = self.flow_mut(slot);
        flow.packets[dir as usize] += 1;
        flow.bytes[dir as usize] += len as u64;
    }

    fn track(&mut self, now: Stamp, slot: u32, dir: Dir, tcp_flags: u8, len: usize) {
        let timeouts = self.config.timeouts;
        let next_generation = self.generation.wrapping_add(1);
        let flow = self.flow_mut(slot);
        flow.seen[dir as usize] = true;
        let (mut closed, mut reopened, mut closing) = (None, false, false);
        if flow.proto == PROTO_TCP {
            let was_closed = flow.is_closed();
            let was_established = flow.tcp == TcpState::Established;
            flow.track_tcp(dir, tcp_flags);
            closing = was_established && flow.tcp != TcpState::Established;
            match (was_closed, flow.is_closed()) {
                (false, true) => closed = Some(flow.generation),
                (true, false) => {
                    // Reopened by a SYN: a new connection, which the old one's closure must
                    // not evict.
                    flow.generation = next_generation;
                    reopened = true;
                }
                _ => {}
            }
        }
        flow.expires = deadline(now, flow.timeout(&timeouts));
        if reopened {
            self.generation = next_generation;
            self.note_candidate(slot, next_generation);
        }
        if let Some(generation) = closed {
            self.note_candidate(slot, generation);
        }
        if closing {
            // A FIN or RST: the rest of the close is the engine's to follow.
            self.withdraw(slot);
        }
        self.count(slot, dir, len);
    }

    /// Files a connection just made, reopened or closed as a candidate for eviction.
    fn note_candidate(&mut self, slot: u32, generation: u32) {
        if let Some(f) = self.slots.get(slot as usize).and_then(Option::as_ref) {
            self.candidates.push(f.guest, (slot, generation));
        }
    }

    /// Whether the connection in `slot` may give up its entry at a cap: closed, expired, or
    /// not assured (see the module's doc), counting what workers carried of it.
    fn evictable(&mut self, slot: u32, now: Stamp) -> Option<Eviction> {
        self.catch_up(slot, false);
        let f = self.slots.get(slot as usize).and_then(Option::as_ref)?;
        if f.expires <= now {
            return Some(Eviction::Expired);
        }
        let assured = match f.proto {
            PROTO_TCP => !matches!(f.tcp, TcpState::SynSent | TcpState::SynReceived),
            PROTO_UDP => f.packets[0] >= 2 && f.packets[1] >= 2,
            _ => false,
        };
        (f.is_closed() || !assured).then_some(Eviction::Evicted)
    }

    /// Removes the oldest connection (of `guest` only, if given) that is closed, expired or
    /// not assured, within the bounds of one scan ([`evict::SCAN`]); false if there is none.
    fn evict_for_room(&mut self, now: Instant, guest: Option<Ipv4Addr>) -> bool {
        let now = self.stamp(now);
        let mut scan = evict::Scan::default();
        while scan.goes_on() {
            let Some((slot, generation)) = self.candidates.pop(guest) else {
                return false;
            };
            let live = (self.slots.get(slot as usize))
                .and_then(Option::as_ref)
                .is_some_and(|f| f.generation == generation);
            let verdict = if !live {
                evict::Verdict::Stale
            } else if let Some(how) = self.evictable(slot, now) {
                self.remove(slot);
                match how {
                    Eviction::Expired => self.counters.flows_expired += 1,
                    Eviction::Evicted => self.counters.flows_evicted += 1,
                }
                evict::Verdict::Evicted
            } else {
                // Assured and open: it comes back as a candidate when it closes.
                evict::Verdict::Keep
            };
            if scan.counts(verdict) {
                return true;
            }
        }
        false
    }

    fn create_outbound(
        &mut self,
        now: Instant,
        original: Tuple,
        original_probe: &Probe,
        guest_mac: MacAddr,
    ) -> Result<u32, DropReason> {
        // The mapping is held first, so that making room cannot take it away (and with it
        // the guest's external port, RFC 4787 REQ-1) from under the new connection.
        let external_port = self.map(original.proto, original.src, original.sport, guest_mac)?;
        if let Err(refused) = self.check_caps(now, original.src) {
            self.unmap(original.proto, original.src, original.sport);
            return Err(refused);
        }
        let reply = Tuple {
            proto: original.proto,
            src: original.dst,
            // An echo reply carries the (translated) identifier in both "port" places.
            sport: if original.proto == PROTO_ICMP {
                external_port
            } else {
                original.dport
            },
            dst: self.config.external,
            dport: external_port,
        };
        let reply_probe = self.index.probe(index_key(&reply));
        let (slots, external) = (&self.slots, self.config.external);
        let taken = self.index.find(&reply_probe, |r| {
            key_of(slots, external, r) == reply_probe.key
        });
        if taken.is_some() {
            // Another guest's connection already owns this reply tuple (only possible when a
            // mapping's port was reused towards the same remote endpoint).
            self.unmap(original.proto, original.src, original.sport);
            return Err(DropReason::NatPortsExhausted);
        }
        let probes = (original_probe, &reply_probe);
        Ok(self.insert(now, original, external_port, guest_mac, Dir::Out, probes))
    }

    /// RFC 4787 5 / RFC 5382 REQ-3: an unsolicited packet reaches a guest only through an
    /// existing mapping and only as far as the filtering policy allows; TCP only with a SYN.
    fn admit_inbound(
        &mut self,
        now: Instant,
        reply: Tuple,
        reply_probe: &Probe,
        tcp_flags: u8,
    ) -> Result<u32, DropReason> {
        let opens = match reply.proto {
            PROTO_TCP => tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN,
            PROTO_UDP => true,
            _ => false,
        };
        if !opens || reply.dst != self.config.external {
            return Err(DropReason::NatNoFlow);
        }
        let &(guest, guest_port) = self
            .by_external
            .get(&(reply.proto, reply.dport))
            .ok_or(DropReason::NatNoFlow)?;
        let allowed = match self.config.filtering {
            Filtering::EndpointIndependent => true,
            Filtering::AddressDependent => {
                self.remotes
                    .contains_key(&(reply.proto, reply.dport, reply.src))
            }
            Filtering::AddressAndPortDependent => false,
        };
        if !allowed {
            return Err(DropReason::NatNoFlow);
        }
        let key = (reply.proto, guest, guest_port);
        let mapping = self.mappings.get_mut(&key).ok_or(DropReason::NatNoFlow)?;
        // Held first, so that making room cannot take this very mapping away.
        mapping.flows += 1;
        let guest_mac = mapping.guest_mac;
        if let Err(refused) = self.check_caps(now, guest) {
            self.unmap(reply.proto, guest, guest_port);
            return Err(refused);
        }
        let original = Tuple {
            proto: reply.proto,
            src: guest,
            sport: guest_port,
            dst: reply.src,
            dport: reply.sport,
        };
        let probes = (&self.index.probe(index_key(&original)), reply_probe);
        Ok(self.insert(now, original, reply.dport, guest_mac, Dir::In, probes))
    }

    /// Room for one more connection of `guest` under both caps, made if need be by evicting
    /// a closed, expired or unassured connection (the guest's own when the guest is at its
    /// cap).
    fn check_caps(&mut self, now: Instant, guest: Ipv4Addr) -> Result<(), DropReason> {
        let table_full = self.live >= self.config.max_flows.min(index::MAX_RECORDS);
        let guest_full = self.per_guest.get(&guest).copied().unwrap_or(0) as usize
            >= self.config.max_flows_per_guest;
        if !table_full && !guest_full {
            return Ok(());
        }
        // One eviction frees a place in the table and, when it is the guest's own, under the
        // guest's cap too.
        if self.evict_for_room(now, guest_full.then_some(guest)) {
            return Ok(());
        }
        Err(if table_full {
            DropReason::NatTableFull
        } else {
            DropReason::NatGuestLimit
        })
    }

    /// The external port of (guest, port), taking a new one if it has none: the guest's own
    /// port when it is free and in range (as MASQUERADE does), else the next free one.
    fn map(
        &mut self,
        proto: u8,
        guest: Ipv4Addr,
        guest_port: u16,
        guest_mac: MacAddr,
    ) -> Result<u16, DropReason> {
        let key = (proto, guest, guest_port);
        if let Some(m) = self.mappings.get_mut(&key) {
            m.flows += 1;
            m.guest_mac = guest_mac;
            return Ok(m.external_port);
        }
        let (lo, hi) = match proto {
            // ICMP identifiers: any value, as the kernel does.
            PROTO_ICMP => (0u16, u16::MAX),
            _ => self.config.ports,
        };
        let free = |nat: &Nat, port: u16| !nat.by_external.contains_key(&(proto, port));
        let external_port = if (lo..=hi).contains(&guest_port) && free(self, guest_port) {
            guest_port
        } else {
            let span = hi as u32 - lo as u32 + 1;
            let mut found = None;
            for i in 0..span {
                let port = (lo as u32 + (self.port_cursor + i) % span) as u16;
                if free(self, port) {
                    self.port_cursor = (self.port_cursor + i + 1) % span;
                    found = Some(port);
                    break;
                }
            }
            found.ok_or(DropReason::NatPortsExhausted)?
        };
        self.mappings.insert(
            key,
            Mapping {
                external_port,
                flows: 1,
                guest_mac,
            },
        );
        self.by_external
            .insert((proto, external_port), (guest, guest_port));
        Ok(external_port)
    }

    fn unmap(&mut self, proto: u8, guest: Ipv4Addr, guest_port: u16) {
        let key = (proto, guest, guest_port);
        if let Some(m) = self.mappings.get_mut(&key) {
            m.flows -= 1;
            if m.flows == 0 {
                let port = m.external_port;
                self.mappings.remove(&key);
                self.by_external.remove(&(proto, port));
            }
        }
    }

    /// Files a new connection. `probes` are those of its original and reply tuples.
    fn insert(
        &mut self,
        now: Instant,
        original: Tuple,
        external_port: u16,
        guest_mac: MacAddr,
        initiator: Dir,
        probes: (&Probe, &Probe),
    ) -> u32 {
        self.generation = self.generation.wrapping_add(1);
        self.epoch.get_or_insert(now);
        let flow = Flow {
            proto: original.proto,
            guest: original.src,
            guest_port: original.sport,
            remote: original.dst,
            remote_port: original.dport,
            external_port,
            guest_mac,
            initiator,
            tcp: TcpState::SynSent,
            fin_seen: [false; 2],
            seen: [false; 2],
            expires: self.stamp(now),
            packets: [0; 2],
            bytes: [0; 2],
            generation: self.generation,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(flow);
                slot
            }
            None => {
                self.slots.push(Some(flow));
                (self.slots.len() - 1) as u32
            }
        };
        let (slots, external) = (&self.slots, self.config.external);
        let key_of = |r| key_of(slots, external, r);
        let (out, back) = flow_refs(slot);
        self.index.insert(probes.0, out, key_of);
        self.index.insert(probes.1, back, key_of);
        if self.config.filtering == Filtering::AddressDependent {
            *self
                .remotes
                .entry((original.proto, external_port, original.dst))
                .or_default() += 1;
        }
        *self.per_guest.entry(original.src).or_default() += 1;
        self.note_candidate(slot, self.generation);
        self.live += 1;
        self.counters.flows_created += 1;
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + SWEEP_INTERVAL);
        }
        slot
    }

    fn remove(&mut self, slot: u32) {
        self.withdraw(slot);
        let Some(flow) = self.slots.get(slot as usize).and_then(Option::as_ref) else {
            return;
        };
        let external = self.config.external;
        let o = flow.original();
        let original = self.index.probe(index_key(&o));
        let reply = self.index.probe(index_key(&flow.reply(external)));
        let slots = &self.slots;
        let key_of = |r| key_of(slots, external, r);
        // Both entries go while the record is still there: moving the entries after them in
        // their probe runs reads keys, this record's among them.
        let (out, back) = flow_refs(slot);
        self.index.remove(&original, out, key_of);
        self.index.remove(&reply, back, key_of);
        let external_port = flow.external_port();
        self.slots[slot as usize] = None;
        self.unmap(o.proto, o.src, o.sport);
        let remote = (o.proto, external_port, o.dst);
        if let Some(n) = self.remotes.get_mut(&remote) {
            *n -= 1;
            if *n == 0 {
                self.remotes.remove(&remote);
            }
        }
        if let Some(n) = self.per_guest.get_mut(&o.src) {
            *n -= 1;
            if *n == 0 {
                self.per_guest.remove(&o.src);
            }
        }
        self.free.push(slot);
        self.live -= 1;
    }

    /// [`Nat::stamp`], remembered for the next packet.
    fn stamp_now(&mut self, now: Instant) -> Stamp {
        match self.last_stamp {
            Some((at, stamp)) if at == now => stamp,
            _ => {
                let stamp = self.stamp(now);
                // Before the epoch is set, 0 is only right until it is.
                if self.epoch.is_some() {
                    self.last_stamp = Some((now, stamp));
                }
                stamp
            }
        }
    }

    /// `now` as a [`Stamp`]. Before the first connection there is no epoch yet and this is
    /// 0, which is also what `now` becomes when that connection sets the epoch to it.
    fn stamp(&self, now: Instant) -> Stamp {
        let Some(epoch) = self.epoch else {
            return 0;
        };
        match now.checked_duration_since(epoch) {
            Some(since) => nanos(since),
            None => -nanos(epoch.duration_since(now)),
        }
    }

    /// Remembers which connection the rest of a fragmented datagram belongs to: only its
    /// first fragment carries ports. Keyed by the datagram as it arrived (before rewriting).
    fn bind_fragments(&mut self, now: Instant, before: &Tuple, p: &[u8], slot: u32, dir: Dir) {
        let key = FragKey {
            src: before.src,
            dst: before.dst,
            proto: before.proto,
            id: packet::ip_id(p),
        };
        if self.fragments.len() >= MAX_FRAGMENT_TRAINS && !self.fragments.contains_key(&key) {
            self.fragments.retain(|_, t| t.expires > now);
            if self.fragments.len() >= MAX_FRAGMENT_TRAINS {
                return;
            }
        }
        let generation = self.flow_mut(slot).generation;
        self.fragments.insert(
            key,
            FragTrain {
                slot,
                generation,
                dir,
                expires: now + FRAGMENT_TIMEOUT,
            },
        );
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + SWEEP_INTERVAL);
        }
    }

    /// The connection of a later fragment, and the guest address (inbound rewrite).
    fn fragment_flow(
        &mut self,
        now: Instant,
        p: &[u8],
        dir: Dir,
    ) -> Result<(u32, Ipv4Addr), DropReason> {
        let key = FragKey {
            src: Ipv4Addr::from([p[12], p[13], p[14], p[15]]),
            dst: Ipv4Addr::from([p[16], p[17], p[18], p[19]]),
            proto: p[9],
            id: packet::ip_id(p),
        };
        // Fragments that arrive before their first one are dropped: reassembly (and with it
        // out-of-order trains) is not implemented.
        let train = *self.fragments.get(&key).ok_or(DropReason::NatUnsupported)?;
        let live = self.slots.get(train.slot as usize).and_then(Option::as_ref);
        match live {
            Some(f)
                if f.generation == train.generation && train.dir == dir && train.expires > now =>
            {
                Ok((train.slot, f.guest))
            }
            _ => {
                self.fragments.remove(&key);
                Err(DropReason::NatUnsupported)
            }
        }
    }

    /// When [`Nat::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    /// Removes expired connections from the next slice of the table.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_sweep.is_none_or(|t| t > now) {
            return;
        }
        let len = self.slots.len();
        let stamp = self.stamp(now);
        for _ in 0..SWEEP_BATCH.min(len) {
            if self.sweep_cursor >= len {
                self.sweep_cursor = 0;
                self.fragments.retain(|_, t| t.expires > now);
            }
            let slot = self.sweep_cursor;
            self.sweep_cursor += 1;
            if self.slots[slot]
                .as_ref()
                .is_some_and(|f| f.expires <= stamp)
                && !self.revived(slot as u32, stamp)
            {
                self.remove(slot as u32);
                self.counters.flows_expired += 1;
            }
        }
        self.next_sweep =
            (self.live > 0 || !self.fragments.is_empty()).then(|| now + SWEEP_INTERVAL);
    }

    /// Live connections, oldest slot first, as `conntrack -L` lists them.
    pub fn rows(&self, now: Instant) -> Vec<FlowRow> {
        let now = self.stamp(now);
        let external = self.config.external;
        // What workers translated and the engine has not yet taken back into the flow.
        let by_workers = |f: &Flow, dir: Dir| {
            self.mirror.as_ref().map_or(Tallies::default(), |m| {
                m.tallies(dir, &f.tuple(dir, external), false)
            })
        };
        self.slots
            .iter()
            .flatten()
            .map(|f| (f, self.expiry(f)))
            .filter(|&(_, expires)| expires > now)
            .map(|(f, expires)| {
                let (out, back) = (by_workers(f, Dir::Out), by_workers(f, Dir::In));
                let packets = [f.packets[0] + out.packets, f.packets[1] + back.packets];
                let bytes = [f.bytes[0] + out.bytes, f.bytes[1] + back.bytes];
                (f, expires, packets, bytes)
            })
            .map(|(f, expires, packets, bytes)| FlowRow {
                proto: match f.proto {
                    PROTO_TCP => "tcp",
                    PROTO_UDP => "udp",
                    _ => "icmp",
                },
                state: if f.proto == PROTO_TCP {
                    f.tcp.name()
                } else {
                    ""
                },
                timeout_secs: expires.saturating_sub(now) as u64 / 1_000_000_000,
                original: f.original(),
                reply: f.reply(self.config.external),
                packets,
                bytes,
                replied: f.seen[f.initiator as usize ^ 1],
            })
            .collect()
    }
}

/// The index's references to the two directions of the flow in `slot`.
fn flow_refs(slot: u32) -> (FlowRef, FlowRef) {
    (slot * 2 + Dir::Out as u32, slot * 2 + Dir::In as u32)
}

/// The key of the tuple `r` refers to (a value no tuple packs to if `r` names no flow, which
/// the index never asks about).
fn key_of(slots: &[Option<Flow>], external: Ipv4Addr, r: FlowRef) -> u128 {
    let dir = if r & 1 == 0 { Dir::Out } else { Dir::In };
    match slots.get((r / 2) as usize) {
        Some(Some(flow)) => index_key(&flow.tuple(dir, external)),
        _ => u128::MAX,
    }
}

fn nanos(d: Duration) -> Stamp {
    Stamp::try_from(d.as_secs())
        .unwrap_or(Stamp::MAX)
        .saturating_mul(1_000_000_000)
        .saturating_add(Stamp::from(d.subsec_nanos()))
}

/// When a connection last seen at `now` expires (an `Instant` would have overflowed and
/// panicked where this saturates).
fn deadline(now: Stamp, timeout: Duration) -> Stamp {
    now.saturating_add(nanos(timeout))
}

#[cfg(test)]
mod tests;
