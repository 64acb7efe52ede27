//! The engine: one network's pipeline, driven from outside.
//!
//! `handle_frame(now, ingress, vnet, frame)` decides what happens to one received frame and
//! returns the decision; the I/O edge carries it out. `poll_timeout` / `handle_timeout` drive
//! the timers. No clock is read and no syscall is made here, which is what makes the engine
//! testable with fixtures and virtual time, and cheap enough to bench per frame (the model is
//! smoltcp's `Interface::poll` and quinn-proto's `Connection`).

use crate::dhcp::{self, DhcpService};
use crate::dns::DnsService;
use crate::gateway::{self, Answer, Gateway, GatewayConfig, GatewayCounters};
use crate::guard::{Cap, GuardConfig, PortGuard};
use crate::nat::fast::NatFastPath;
use crate::nat::{FlowRow, Nat, NatConfig, NatCounters, packet};
use crate::port::{DropReason, PortCounters, PortId};
use crate::socket_nat::{Peer, SocketNat, SocketNatConfig, SocketNatCounters};
use crate::switch::{self, Fdb, FdbCounters, FdbRow, Learned, Mirror};
use crate::trace::{self, FrameTrace};
use crate::uplink::{ArpAnswer, NeighborRow, Uplink, UplinkConfig, UplinkCounters};
use crate::wire::arp::ArpPacket;
use crate::wire::ethernet::{self, EthernetFrame};
use crate::wire::ipv4::{Ipv4Packet, PROTO_ICMP};
use crate::wire::{EtherType, MacAddr, VnetHdr};
use serde::Serialize;
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// ICMP errors the engine originates: at most a burst of this many, refilled at one per
/// millisecond (Linux's `icmp_msgs_per_sec` 1000, `icmp_msgs_burst` 50).
const ICMP_BURST: u32 = 50;
/// Frames the engine originates (ICMP errors) waiting for the I/O edge.
const MAX_OUTGOING: usize = 256;

/// The largest frame the engine accepts: a 64 KiB GSO super-frame plus Ethernet and VLAN
/// headers. I/O buffers are this size plus the virtio-net header.
pub const MAX_FRAME_LEN: usize = 65535 + ethernet::HEADER_LEN + ethernet::VLAN_TAG_LEN;

/// Engine settings, from the network XML.
#[derive(Debug, Clone)]
pub struct Config {
    /// `<mtu size=...>`: the largest L3 packet a non-GSO frame may carry.
    pub mtu: u16,
    pub fdb_capacity: usize,
    pub fdb_aging: Duration,
    /// The gateway address served inside the engine (`<ip>` of the network), if any.
    pub gateway: Option<GatewayConfig>,
    /// Packet NAT through an uplink (`<forward mode='nat' dev=...>` with an address).
    pub nat: Option<(NatConfig, UplinkConfig)>,
    /// Socket NAT through the host's own sockets (`<forward mode='nat'>` without an address
    /// of its own, or rootless).
    pub socket_nat: Option<SocketNatConfig>,
    /// clean-traffic and the per-port rate caps.
    pub guard: GuardConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mtu: 1500,
            fdb_capacity: switch::DEFAULT_CAPACITY,
            fdb_aging: switch::DEFAULT_AGING,
            gateway: None,
            nat: None,
            socket_nat: None,
            guard: GuardConfig::default(),
        }
    }
}

/// What to do with a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it out of exactly this port.
    Forward(PortId),
    /// Send it out of every port but the ingress one.
    Flood,
    /// The engine rewrote the frame into its answer (ARP, ICMP echo): send it back out of the
    /// ingress port.
    Reply,
    /// Drop it; the reason was counted on the ingress port.
    Drop(DropReason),
    /// The engine kept a copy (held for ARP) or answered through
    /// [`Engine::poll_transmit`]: nothing to send now.
    Consumed,
}

/// A frame the engine originated or released, for the I/O edge to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub port: PortId,
    pub vnet: VnetHdr,
    pub frame: Vec<u8>,
}

/// A port as the engine sees it.
#[derive(Debug, Clone, Serialize)]
pub struct PortState {
    pub name: String,
    pub counters: PortCounters,
    #[serde(skip)]
    pub guard: PortGuard,
    /// A tap's counters as its guest's kernel keeps them, where they could be read
    /// ([`crate::io::Datapath::stats_later`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<TapKernelCounters>,
}

/// What the kernel counts on a tap's guest side (`ip -s link` in the guest's namespace):
/// above all the frames a guest sent that were lost before switchyard read them, which no
/// counter of switchyard's own can see.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TapKernelCounters {
    /// Frames the guest sent into the tap: those switchyard read (the kernel's `tx_packets`
    /// on the guest's side, which tun counts as userspace reads them) and those dropped.
    pub guest_sent: u64,
    /// Of those, dropped by the tap before switchyard read them: its queue was full (the
    /// kernel's `tx_dropped` on the guest's side).
    pub guest_sent_dropped: u64,
    /// Frames switchyard wrote that the guest's kernel dropped on arrival (`rx_dropped`).
    pub guest_received_dropped: u64,
}

/// Switch-wide counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineCounters {
    pub forwarded: u64,
    /// Of `forwarded`, frames the fast-path workers switched without the engine.
    pub worker_forwarded: u64,
    /// Frames the fast-path workers read and handed to the engine (for the gateway, ARP,
    /// broadcast, unknown or moved MACs, clean-traffic ports, while a trace or capture runs).
    pub worker_handed_over: u64,
    pub flooded: u64,
    pub fdb: FdbCounters,
    pub gateway: GatewayCounters,
    pub nat: NatCounters,
    pub uplink: UplinkCounters,
    pub icmp_errors_sent: u64,
    pub icmp_errors_rate_limited: u64,
    pub dhcp: dhcp_dns::dhcp::DhcpCounters,
    /// DHCP replies dropped because too many waited for the lease file.
    pub dhcp_held_dropped: u64,
    /// The ARP probes before OFFERs of new addresses, and what they found.
    pub dhcp_probes: crate::dhcp::ProbeCounters,
    pub dns: dhcp_dns::dns::DnsCounters,
    /// Upstream DNS queries dropped because too many waited for the host socket.
    pub dns_upstream_dropped: u64,
    pub dns_tcp: crate::dns_tcp::DnsTcpCounters,
    pub socket_nat: SocketNatCounters,
    /// Packets from socket NAT for a guest whose MAC is not known (the engine sends an ARP
    /// request; a worker's socket NAT only drops them, TCP retransmits).
    pub socket_nat_unresolved: u64,
    /// Of `socket_nat.tcp_connects`, connections the fast-path workers' socket NATs opened
    /// (those that opened on their tap queues).
    pub socket_nat_worker_connects: u64,
}

/// A snapshot for `switchyard stats`.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub ports: Vec<(PortId, PortState)>,
    pub engine: EngineCounters,
    pub fdb_entries: usize,
    pub nat_flows: usize,
    pub dhcp_leases: usize,
    /// Each fast-path worker's share (`--workers`; empty with one thread). The port counters
    /// include it: what they count beyond the workers' is the engine's thread's (queue 0).
    pub workers: Vec<WorkerStats>,
}

/// What one worker thread did with the frames of its tap queue (queue `queue` of every tap,
/// and its socket of the uplink).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WorkerStats {
    pub queue: usize,
    /// Frames it read and handled itself (a frame it hands over counts in `handed_over`,
    /// and in its port's counters as the engine's, which handles it).
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Switched to another tap by the worker itself.
    pub forwarded: u64,
    /// Of `forwarded`, translated by packet NAT on the way.
    pub translated: u64,
    /// Given to the engine to handle.
    pub handed_over: u64,
    /// Connections its socket NAT opened, and those it holds now.
    pub socket_nat_connects: u64,
    pub socket_nat_flows: usize,
}

/// Packet NAT's parts: the connection table, the uplink host and its port.
#[derive(Debug)]
struct Router {
    nat: Nat,
    uplink: Uplink,
    port: Option<PortId>,
}

/// One network's forwarding pipeline.
#[derive(Debug)]
pub struct Engine {
    mtu: u16,
    max_plain_frame: usize,
    fdb: Fdb,
    gateway: Option<Gateway>,
    router: Option<Router>,
    socket_nat: Option<SocketNat>,
    dhcp: Option<DhcpService>,
    dns: Option<DnsService>,
    tracing: bool,
    trace: Option<FrameTrace>,
    ports: Vec<Option<PortState>>,
    outgoing: VecDeque<Outgoing>,
    icmp_tokens: u32,
    icmp_refilled: Option<Instant>,
    forwarded: u64,
    worker_forwarded: u64,
    worker_handed_over: u64,
    flooded: u64,
    icmp_errors_sent: u64,
    icmp_errors_rate_limited: u64,
    socket_nat_unresolved: u64,
    guard: GuardConfig,
    /// Ports whose own setting turns clean-traffic on (the guard runs for them even when the
    /// network's is off).
    clean_traffic_ports: usize,
    /// Lines for the log: a cap or filter that started dropping (once per interval each).
    notices: VecDeque<String>,
    /// When each table cap last put a notice in the log.
    cap_noticed: [Option<Instant>; 3],
}

/// The engine-wide caps whose refusals are logged.
#[derive(Debug, Clone, Copy)]
enum CapNotice {
    Fdb,
    Nat,
    LeasesPerMac,
}

/// The DHCP server's view of who holds which address, for clean-traffic.
struct LeaseView<'a>(Option<&'a DhcpService>);

impl crate::guard::Addresses for LeaseView<'_> {
    fn holds(&self, mac: MacAddr, ip: Ipv4Addr) -> bool {
        let Some(dhcp) = self.0 else {
            return false;
        };
        dhcp.leases().any(|l| l.mac == mac.0 && l.ip == ip)
            || dhcp
                .config()
                .hosts
                .iter()
                .any(|h| h.mac == mac.0 && h.ip == Some(ip))
    }

    fn assigns(&self) -> bool {
        self.0.is_some()
    }
}

impl Engine {
    pub fn new(config: &Config) -> Engine {
        Engine {
            mtu: config.mtu,
            max_plain_frame: config.mtu as usize + ethernet::HEADER_LEN + ethernet::VLAN_TAG_LEN,
            fdb: Fdb::new(config.fdb_capacity, config.fdb_aging),
            gateway: config.gateway.map(Gateway::new),
            router: config.nat.as_ref().map(|(nat, uplink)| Router {
                nat: Nat::new(nat.clone()),
                uplink: Uplink::new(*uplink),
                port: None,
            }),
            socket_nat: config
                .socket_nat
                .clone()
                .map(|c| SocketNat::new(c, Instant::now())),
            dhcp: None,
            dns: None,
            tracing: false,
            trace: None,
            ports: Vec::new(),
            outgoing: VecDeque::with_capacity(MAX_OUTGOING),
            icmp_tokens: ICMP_BURST,
            icmp_refilled: None,
            forwarded: 0,
            worker_forwarded: 0,
            worker_handed_over: 0,
            flooded: 0,
            icmp_errors_sent: 0,
            icmp_errors_rate_limited: 0,
            socket_nat_unresolved: 0,
            guard: config.guard,
            clean_traffic_ports: 0,
            notices: VecDeque::new(),
            cap_noticed: [None; 3],
        }
    }

    /// Adds the uplink port of packet NAT. It is not a switch port: frames reach it only
    /// through the gateway and NAT. `None` when the network has no NAT configured.
    pub fn add_uplink(&mut self, name: impl Into<String>) -> Option<PortId> {
        self.router.as_ref()?;
        let id = self.add_port(name);
        if let Some(router) = &mut self.router {
            router.port = Some(id);
        }
        self.sync_fast_ingress(id);
        Some(id)
    }

    /// Packet NAT's established connections as the fast-path workers read them, with what
    /// they need to translate on their own; `None` without packet NAT.
    pub fn nat_mirror(&mut self) -> Option<NatFastPath> {
        let gateway = self.gateway.as_ref()?.config().mac;
        let router = self.router.as_mut()?;
        let uplink = *router.uplink.config();
        Some(NatFastPath {
            mirror: router.nat.mirror(),
            uplink: router.port?,
            uplink_mac: uplink.mac,
            uplink_mtu: uplink.mtu,
            external: uplink.ip,
            gateway_mac: gateway,
            guest_mtu: self.mtu,
        })
    }

    /// Counts `translated` packets that came in on `port` and that a fast-path worker
    /// NAT-translated (in to guests when `port` is the uplink, else out).
    pub fn record_worker_nat(&mut self, port: PortId, translated: u64) {
        if translated == 0 {
            return;
        }
        if let Some(router) = &mut self.router {
            if router.port == Some(port) {
                router.nat.counters.translated_in += translated;
            } else {
                router.nat.counters.translated_out += translated;
            }
        }
    }

    /// The forwarding database as the fast-path workers read it ([`Mirror`]), with each
    /// port's leave to use it.
    pub fn mirror(&mut self) -> Arc<Mirror> {
        let mirror = self.fdb.mirror(crate::io::MAX_PORTS);
        for index in 0..self.ports.len() {
            self.sync_fast_ingress(PortId(index as u16));
        }
        mirror
    }

    /// Whether frames from `port` may be switched by a worker without the engine: a live
    /// switch port whose frames clean-traffic does not check.
    fn sync_fast_ingress(&self, port: PortId) {
        let Some(mirror) = self.fdb.mirrored() else {
            return;
        };
        let fast = self.is_switch_port(port)
            && self.port(port).is_some_and(|state| {
                state.guard.trusted
                    || !state
                        .guard
                        .clean_traffic
                        .unwrap_or(self.guard.clean_traffic)
            });
        mirror.set_fast_ingress(port, fast);
    }

    /// The gateway's MAC, if the network has a gateway.
    pub fn gateway_mac(&self) -> Option<MacAddr> {
        self.gateway.as_ref().map(|g| g.config().mac)
    }

    /// The longest frame without segmentation offload that the network carries.
    pub fn max_plain_frame(&self) -> usize {
        self.max_plain_frame
    }

    /// What a fast-path worker read from `port`: `(packets, bytes)` it counted (those it
    /// switched itself, `forwarded`, or dropped), and how many it handed to the engine (which
    /// counts them when it handles them).
    pub fn record_worker_rx(
        &mut self,
        port: PortId,
        (packets, bytes): (u64, u64),
        forwarded: u64,
        handed_over: u64,
    ) {
        self.forwarded += forwarded;
        self.worker_forwarded += forwarded;
        self.worker_handed_over += handed_over;
        if let Some(c) = self.counters_mut(port) {
            c.rx_packets += packets;
            c.rx_bytes += bytes;
        }
    }

    /// Whether `port` takes part in switching (floods reach it).
    pub fn is_switch_port(&self, port: PortId) -> bool {
        self.router.as_ref().and_then(|r| r.port) != Some(port)
    }

    /// Adds a port; its id is the lowest free one.
    pub fn add_port(&mut self, name: impl Into<String>) -> PortId {
        let state = PortState {
            name: name.into(),
            counters: PortCounters::default(),
            guard: PortGuard::default(),
            kernel: None,
        };
        let slot = match self.ports.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                self.ports.push(None);
                self.ports.len() - 1
            }
        };
        self.ports[slot] = Some(state);
        if let Some(mirror) = self.fdb.mirrored() {
            mirror.next_generation(PortId(slot as u16));
        }
        self.sync_fast_ingress(PortId(slot as u16));
        PortId(slot as u16)
    }

    /// Removes a port and forgets what was learned on it.
    pub fn remove_port(&mut self, port: PortId) -> Option<PortState> {
        if let Some(mirror) = self.fdb.mirrored() {
            mirror.set_fast_ingress(port, false);
            mirror.next_generation(port);
        }
        self.fdb.flush_port(port);
        if let Some(sockets) = &mut self.socket_nat {
            sockets.forget_port(port);
        }
        self.set_clean_traffic(port, false);
        if let Some(router) = &mut self.router
            && router.port == Some(port)
        {
            router.port = None;
        }
        let state = self.ports.get_mut(port.0 as usize)?.take();
        self.sync_fast_ingress(port);
        state
    }

    /// Marks `port` as no guest's (a host NIC in bridge mode): clean-traffic and the rate caps
    /// leave it alone.
    pub fn set_trusted(&mut self, port: PortId) {
        if let Some(Some(state)) = self.ports.get_mut(port.0 as usize) {
            state.guard.trusted = true;
        }
        self.sync_fast_ingress(port);
    }

    /// clean-traffic on or off for `port` alone, whatever the network says (libvirt's
    /// `<filterref filter='clean-traffic'/>` on one interface).
    pub fn set_clean_traffic(&mut self, port: PortId, on: bool) {
        let Some(Some(state)) = self.ports.get_mut(port.0 as usize) else {
            return;
        };
        let was = state.guard.clean_traffic == Some(true);
        state.guard.clean_traffic = Some(on);
        match (was, on) {
            (false, true) => self.clean_traffic_ports += 1,
            (true, false) => self.clean_traffic_ports -= 1,
            _ => {}
        }
        self.sync_fast_ingress(port);
    }

    /// The MAC the guest on `port` was given: clean-traffic lets the port send only from it.
    pub fn bind_mac(&mut self, port: PortId, mac: MacAddr) {
        if let Some(Some(state)) = self.ports.get_mut(port.0 as usize) {
            state.guard.bind_mac(mac);
        }
    }

    /// Logs `line` for a table cap, at most once per [`crate::guard::NOTICE_INTERVAL`].
    fn notice_cap(&mut self, now: Instant, cap: CapNotice, line: impl FnOnce() -> String) {
        let slot = &mut self.cap_noticed[cap as usize];
        if slot.is_some_and(|at| now.saturating_duration_since(at) < crate::guard::NOTICE_INTERVAL)
        {
            return;
        }
        *slot = Some(now);
        self.notices.push_back(line());
    }

    /// The next line for the log (a filter or cap that started dropping).
    pub fn poll_notice(&mut self) -> Option<String> {
        self.notices.pop_front()
    }

    /// clean-traffic and storm control for a frame from guest port `ingress`.
    fn guard_frame(
        &mut self,
        now: Instant,
        ingress: PortId,
        (src, dst, ethertype): (MacAddr, MacAddr, EtherType),
        l3: &[u8],
    ) -> Option<DropReason> {
        let config = self.guard;
        let addresses = LeaseView(self.dhcp.as_ref());
        let state = self.ports.get_mut(ingress.0 as usize)?.as_mut()?;
        let guard = &mut state.guard;
        let (reason, cap) = if let Some(reason) = guard
            .clean_traffic
            .unwrap_or(config.clean_traffic)
            .then(|| guard.check_clean(src, ethertype, l3, &addresses))
            .flatten()
        {
            (reason, Cap::CleanTraffic)
        } else if dst.is_multicast() && !guard.allow_broadcast(now, &config) {
            (DropReason::StormControl, Cap::Broadcast)
        } else {
            return None;
        };
        if guard.should_notice(now, cap) {
            let what = match cap {
                Cap::CleanTraffic => "clean-traffic is dropping frames",
                _ => "storm control is dropping broadcast/multicast frames",
            };
            let line = format!(
                "port {ingress} ({}): {what} ({reason}, from {src}); counted in `switchyard stats`",
                state.name
            );
            self.notices.push_back(line);
        }
        Some(reason)
    }

    /// Whether a DHCP message (`dns` false) or DNS query (`dns` true) from `ingress` is
    /// within the port's rate; a refusal is noted in the log once per interval.
    fn within_rate(&mut self, now: Instant, ingress: PortId, dns: bool) -> bool {
        let config = self.guard;
        let Some(Some(state)) = self.ports.get_mut(ingress.0 as usize) else {
            return true;
        };
        let (allowed, cap, what) = if dns {
            (state.guard.allow_dns(now, &config), Cap::Dns, "DNS queries")
        } else {
            (
                state.guard.allow_dhcp(now, &config),
                Cap::Dhcp,
                "DHCP messages",
            )
        };
        if !allowed && state.guard.should_notice(now, cap) {
            let rate = if dns {
                config.dns_per_second
            } else {
                config.dhcp_per_second
            };
            let line = format!(
                "port {ingress} ({}): dropping {what} beyond {rate}/s",
                state.name
            );
            self.notices.push_back(line);
        }
        allowed
    }

    pub fn port(&self, port: PortId) -> Option<&PortState> {
        self.ports.get(port.0 as usize)?.as_ref()
    }

    /// Live ports in id order.
    pub fn ports(&self) -> impl Iterator<Item = (PortId, &PortState)> {
        self.ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (PortId(i as u16), p)))
    }

    fn counters_mut(&mut self, port: PortId) -> Option<&mut PortCounters> {
        self.ports
            .get_mut(port.0 as usize)?
            .as_mut()
            .map(|p| &mut p.counters)
    }

    /// Decides the fate of `frame`, received on `ingress` at `now` with offload state `vnet`.
    pub fn handle_frame(
        &mut self,
        now: Instant,
        ingress: PortId,
        vnet: &VnetHdr,
        frame: &mut [u8],
    ) -> Verdict {
        if self.tracing {
            return self.handle_frame_traced(now, ingress, vnet, frame);
        }
        self.handle_frame_untraced(now, ingress, vnet, frame)
    }

    /// Traces the next frames handled (see [`crate::trace`]); each trace is taken with
    /// [`Engine::take_trace`].
    pub fn set_tracing(&mut self, on: bool) {
        self.tracing = on;
        if !on {
            self.trace = None;
        }
    }

    /// The trace of the last frame handled while tracing.
    pub fn take_trace(&mut self) -> Option<FrameTrace> {
        self.trace.take()
    }

    /// The same handling, with what it decided recorded. Cold: kept out of the fast path.
    #[cold]
    #[inline(never)]
    fn handle_frame_traced(
        &mut self,
        now: Instant,
        ingress: PortId,
        vnet: &VnetHdr,
        frame: &mut [u8],
    ) -> Verdict {
        let before = trace::counters(&self.stats(), ingress);
        let described = trace::describe(frame, vnet);
        let original = frame.to_vec();
        let queued = self.outgoing.len();
        let verdict = self.handle_frame_untraced(now, ingress, vnet, frame);
        let after = trace::counters(&self.stats(), ingress);
        let name = |p: PortId| self.port(p).map(|s| s.name.clone()).unwrap_or_default();
        self.trace = Some(FrameTrace {
            ingress,
            before: described,
            decisions: trace::moved(&before, &after),
            after: (*frame != original[..]).then(|| trace::describe(frame, vnet)),
            verdict: trace::verdict_text(verdict, name),
            originated: self.outgoing.len().saturating_sub(queued),
        });
        verdict
    }

    #[inline]
    fn handle_frame_untraced(
        &mut self,
        now: Instant,
        ingress: PortId,
        vnet: &VnetHdr,
        frame: &mut [u8],
    ) -> Verdict {
        let verdict = self.switch_frame(now, ingress, vnet, frame);
        if let Some(c) = self.counters_mut(ingress) {
            c.record_rx(frame.len());
            if let Verdict::Drop(reason) = verdict {
                c.record_drop(reason);
                self.note_nat_refusal(now, ingress, reason);
            }
        }
        verdict
    }

    /// Says (rate-limited) that NAT refuses new connections, when `reason` is one of its caps.
    fn note_nat_refusal(&mut self, now: Instant, port: PortId, reason: DropReason) {
        if matches!(
            reason,
            DropReason::NatTableFull | DropReason::NatGuestLimit | DropReason::NatPortsExhausted
        ) {
            self.notice_cap(now, CapNotice::Nat, || {
                format!(
                    "port {port}: NAT refuses new connections ({reason}); \
                     counted in `switchyard stats`"
                )
            });
        }
    }

    fn switch_frame(
        &mut self,
        now: Instant,
        ingress: PortId,
        vnet: &VnetHdr,
        frame: &mut [u8],
    ) -> Verdict {
        let max = if vnet.is_gso() {
            MAX_FRAME_LEN
        } else {
            self.max_plain_frame
        };
        if frame.len() > max {
            return Verdict::Drop(DropReason::Oversize);
        }
        let Ok(eth) = EthernetFrame::new_checked(&*frame) else {
            return Verdict::Drop(DropReason::Runt);
        };
        let (src, dst, vlan) = (eth.src(), eth.dst(), eth.vlan_id());
        let (ethertype, l3) = (eth.ethertype(), eth.header_len());
        if self.router.as_ref().and_then(|r| r.port) == Some(ingress) {
            return self.uplink_frame(now, ingress, vnet, frame, (dst, ethertype, l3));
        }
        if !src.is_valid_source() {
            return Verdict::Drop(DropReason::InvalidSource);
        }
        let gateway_mac = self.gateway.as_ref().map(|g| g.config().mac);
        if Some(src) == gateway_mac {
            return Verdict::Drop(DropReason::SpoofedGatewayMac);
        }
        if (self.guard.is_active() || self.clean_traffic_ports > 0)
            && let Some(reason) =
                self.guard_frame(now, ingress, (src, dst, ethertype), &frame[l3..])
        {
            return Verdict::Drop(reason);
        }
        // A full table does not stop forwarding: the frame is still delivered (flooded if its
        // destination is unknown); `fdb.full` counts it.
        if matches!(self.fdb.learn(now, src, vlan, ingress), Learned::TableFull) {
            let capacity = self.fdb.capacity();
            self.notice_cap(now, CapNotice::Fdb, || {
                format!(
                    "the MAC table is full ({capacity} entries): frames from new MACs are \
                     flooded, not learned (fdb.full)"
                )
            });
        }

        let to_gateway = gateway_mac.is_some() && Some(dst) == gateway_mac;
        if to_gateway
            && ethertype == EtherType::IPV4
            && let Some(verdict) = self.serve_dns(now, ingress, src, (vnet, frame), l3)
        {
            return verdict;
        }
        if let Some(sockets) = &mut self.socket_nat
            && ethertype == EtherType::ARP
            && let Ok(arp) = ArpPacket::new_checked(&frame[l3..])
        {
            let peer = Peer {
                port: ingress,
                mac: src,
            };
            sockets.note_peer(arp.sender_ip(), peer);
        }
        if self.dhcp.is_some() {
            if ethertype == EtherType::ARP {
                // An answer to the gateway's probe is the gateway's (nothing else to do).
                if self.note_arp_sender(now, &frame[l3..]) && to_gateway {
                    return Verdict::Consumed;
                }
            } else if ethertype == EtherType::IPV4
                && (to_gateway || dst.is_broadcast())
                && let Some(verdict) =
                    self.serve_dhcp(now, ingress, src, (vnet, &frame[l3..]), to_gateway)
            {
                return verdict;
            }
        }
        if to_gateway
            && ethertype == EtherType::IPV4
            && let Some(verdict) = self.serve_gateway_socket(now, ingress, src, (vnet, frame), l3)
        {
            return verdict;
        }
        if let Some(gateway) = &mut self.gateway
            && (to_gateway || dst.is_broadcast())
        {
            match gateway.handle(frame, l3, ethertype, to_gateway) {
                Answer::Reply => return Verdict::Reply,
                Answer::Drop(reason) => return Verdict::Drop(reason),
                Answer::Route => return self.route_out(now, ingress, vnet, frame, l3),
                Answer::Pass => {}
            }
        }
        if dst.is_multicast() {
            self.flooded += 1;
            return Verdict::Flood;
        }
        self.forward_unicast(now, dst, vlan, Some(ingress))
    }

    /// A DHCP request to the gateway (or broadcast) goes to the DHCP server; its reply leaves
    /// through [`Engine::poll_transmit`]. A broadcast is still flooded, as a bridge would.
    /// `None`: not a DHCP request.
    fn serve_dhcp(
        &mut self,
        now: Instant,
        ingress: PortId,
        src_mac: MacAddr,
        (vnet, packet): (&VnetHdr, &[u8]),
        to_gateway: bool,
    ) -> Option<Verdict> {
        self.dhcp.as_ref()?;
        // Cheap tests first: most frames to the gateway are routed traffic, not DHCP.
        let (_, payload) = gateway::udp_datagram_to(packet, dhcp::SERVER_PORT)?;
        if vnet.is_gso() {
            // A USO super-frame is several datagrams in one; the server reads one.
            return Some(Verdict::Drop(DropReason::GsoToService));
        }
        let ip = checked_ipv4(packet)?;
        if self.guard.dhcp_per_second > 0 && !self.within_rate(now, ingress, false) {
            return Some(Verdict::Drop(DropReason::DhcpRateLimited));
        }
        let dhcp = self.dhcp.as_mut()?;
        let capped = |c: &dhcp_dns::dhcp::DhcpCounters| c.mac_lease_cap + c.nak_mac_lease_cap;
        let capped_before = capped(dhcp.counters());
        let served = dhcp.handle_request(
            now,
            ingress,
            (src_mac, ip.src()),
            payload,
            &mut self.outgoing,
        );
        if capped(dhcp.counters()) > capped_before {
            self.notice_cap(now, CapNotice::LeasesPerMac, || {
                format!(
                    "port {ingress}: {src_mac} asks for more DHCP leases than leases-per-mac \
                     allows (under other client identifiers); refused, counted in \
                     `switchyard stats` (dhcp.mac_lease_cap)"
                )
            });
        }
        self.send_probes();
        self.sync_names();
        Some(if !to_gateway {
            self.flooded += 1;
            Verdict::Flood
        } else if served {
            Verdict::Consumed
        } else {
            Verdict::Drop(DropReason::DhcpRejected)
        })
    }

    /// A DNS query to the gateway goes to the forwarder; answers leave through
    /// [`Engine::poll_transmit`]. `None`: not a DNS query (or DNS is off).
    fn serve_dns(
        &mut self,
        now: Instant,
        ingress: PortId,
        src_mac: MacAddr,
        (vnet, frame): (&VnetHdr, &[u8]),
        l3: usize,
    ) -> Option<Verdict> {
        let dns = self.dns.as_mut()?;
        let packet = &frame[l3..];
        if dns.wants_tcp(packet) {
            checked_ipv4(packet)?;
            dns.handle_tcp_segment(now, ingress, src_mac, (vnet, frame), &mut self.outgoing);
            return Some(Verdict::Consumed);
        }
        let (sport, query) = dns.query_in(packet)?;
        if vnet.is_gso() {
            // A USO super-frame is several queries in one; the forwarder reads one.
            return Some(Verdict::Drop(DropReason::GsoToService));
        }
        let ip = checked_ipv4(packet)?;
        if self.guard.dns_per_second > 0 && !self.within_rate(now, ingress, true) {
            return Some(Verdict::Drop(DropReason::DnsRateLimited));
        }
        let dns = self.dns.as_mut()?;
        let src = std::net::SocketAddrV4::new(ip.src(), sport);
        Some(
            if dns.handle_query(now, ingress, src_mac, src, query, &mut self.outgoing) {
                Verdict::Consumed
            } else {
                Verdict::Drop(DropReason::DnsRejected)
            },
        )
    }

    /// TCP and UDP to the gateway's own address beyond DNS and DHCP (both served before it):
    /// the host's loopback under
    /// `<sy:host-loopback/>`, and the gateway's end of port-forwarded connections. `None`:
    /// not such a packet (or no socket NAT).
    fn serve_gateway_socket(
        &mut self,
        now: Instant,
        ingress: PortId,
        src_mac: MacAddr,
        (vnet, frame): (&VnetHdr, &[u8]),
        l3: usize,
    ) -> Option<Verdict> {
        let sockets = self.socket_nat.as_mut()?;
        let packet = &frame[l3..];
        let gateway = sockets.config().gateway;
        if packet.len() < 20
            || packet[16..20] != gateway.octets()
            || !matches!(
                packet[9],
                crate::wire::ipv4::PROTO_TCP | crate::wire::ipv4::PROTO_UDP
            )
        {
            return None;
        }
        let ip = Ipv4Packet::new_checked(packet).ok()?;
        if !ip.header_checksum_ok() {
            return Some(Verdict::Drop(DropReason::BadChecksum));
        }
        let packet = &packet[..ip.total_len()];
        let from = Peer {
            port: ingress,
            mac: src_mac,
        };
        Some(match sockets.handle_packet(now, from, packet, vnet) {
            Ok(()) => Verdict::Consumed,
            Err(DropReason::NoRoute) => Verdict::Drop(DropReason::GatewayUnhandled),
            Err(reason) => Verdict::Drop(reason),
        })
    }

    /// A guest's packet for beyond the subnet through host sockets: the TTL is checked as a
    /// router checks it; everything else is up to the host's stack.
    fn route_to_sockets(
        &mut self,
        now: Instant,
        ingress: PortId,
        vnet: &VnetHdr,
        frame: &mut [u8],
        l3: usize,
    ) -> Verdict {
        let Some(gateway) = &self.gateway else {
            return Verdict::Drop(DropReason::NoRoute);
        };
        if l3 != ethernet::HEADER_LEN {
            return Verdict::Drop(DropReason::NoRoute);
        }
        let back = (MacAddr::from_slice(&frame[6..12]), gateway.config().mac);
        let gateway_ip = gateway.config().ip;
        if let Some(reason) =
            self.check_forwardable(now, ingress, vnet, frame, back, gateway_ip, u16::MAX)
        {
            return Verdict::Drop(reason);
        }
        let total = ip_total_len(frame);
        let Some(sockets) = &mut self.socket_nat else {
            return Verdict::Drop(DropReason::NoRoute);
        };
        let from = Peer {
            port: ingress,
            mac: back.0,
        };
        match sockets.handle_packet(now, from, &frame[l3..l3 + total], vnet) {
            Ok(()) => Verdict::Consumed,
            Err(reason) => Verdict::Drop(reason),
        }
    }

    /// Lease changes become name changes in the DNS (or are discarded without one).
    fn sync_names(&mut self) {
        let Some(dhcp) = &mut self.dhcp else {
            return;
        };
        while let Some(event) = dhcp.poll_event() {
            if let dhcp_dns::dhcp::LeaseEvent::Removed(lease) = &event {
                // clean-traffic: a released address is no longer its port's.
                for state in self.ports.iter_mut().flatten() {
                    state.guard.forget_ip(lease.ip);
                }
            }
            let Some(dns) = &mut self.dns else {
                continue;
            };
            match event {
                dhcp_dns::dhcp::LeaseEvent::Added(lease) => {
                    if let Some(name) = &lease.hostname {
                        dns.server_mut().add_name(lease.ip, name);
                    }
                }
                dhcp_dns::dhcp::LeaseEvent::Removed(lease) => {
                    if let Some(name) = &lease.hostname {
                        dns.server_mut().remove_name(lease.ip, name);
                    }
                }
            }
        }
    }

    /// A guest announcing or asking with an address (ARP sender) holds it: DHCP must not
    /// offer it to another client. Returns whether it answered a DHCP probe.
    fn note_arp_sender(&mut self, now: Instant, arp: &[u8]) -> bool {
        let (Some(dhcp), Ok(arp)) = (self.dhcp.as_mut(), ArpPacket::new_checked(arp)) else {
            return false;
        };
        let sender = (arp.sender_mac(), arp.sender_ip());
        let answered = dhcp.handle_arp(now, sender, arp.target_ip(), &mut self.outgoing);
        if answered {
            self.send_probes();
        }
        answered
    }

    /// Floods the DHCP server's ARP probes from the gateway to every switch port (the guest
    /// that has the address may be behind any of them). They are not held to MAX_OUTGOING:
    /// there are at most `MAX_PROBES` at once, each sent once.
    fn send_probes(&mut self) {
        let Some(dhcp) = &mut self.dhcp else {
            return;
        };
        let uplink = self.router.as_ref().and_then(|r| r.port);
        while let Some(probe) = dhcp.poll_probe() {
            for (i, state) in self.ports.iter().enumerate() {
                let port = PortId(i as u16);
                if state.is_some() && Some(port) != uplink {
                    self.outgoing.push_back(Outgoing {
                        port,
                        vnet: VnetHdr::default(),
                        frame: probe.clone(),
                    });
                }
            }
        }
    }

    /// Forwards to the port `dst` was learned on, or floods if unknown. A frame never goes
    /// back out of `ingress`.
    fn forward_unicast(
        &mut self,
        now: Instant,
        dst: MacAddr,
        vlan: u16,
        ingress: Option<PortId>,
    ) -> Verdict {
        match self.fdb.lookup(now, dst, vlan) {
            Some(port) if Some(port) == ingress => Verdict::Drop(DropReason::SamePort),
            Some(port) => {
                self.forwarded += 1;
                Verdict::Forward(port)
            }
            None => {
                self.flooded += 1;
                Verdict::Flood
            }
        }
    }

    /// A guest's packet for beyond the subnet, sent to the gateway (RFC 1812 5.2/5.3):
    /// TTL, MTU, NAT, then out of the uplink to the next hop, or back in (hairpin).
    fn route_out(
        &mut self,
        now: Instant,
        ingress: PortId,
        vnet: &VnetHdr,
        frame: &mut [u8],
        l3: usize,
    ) -> Verdict {
        if self.router.is_none() && self.socket_nat.is_some() {
            return self.route_to_sockets(now, ingress, vnet, frame, l3);
        }
        let (Some(gateway), Some(router)) = (&self.gateway, &self.router) else {
            return Verdict::Drop(DropReason::NoRoute);
        };
        let (gateway_ip, uplink_mtu) = (gateway.config().ip, router.uplink.config().mtu);
        if l3 != ethernet::HEADER_LEN || router.port.is_none() {
            return Verdict::Drop(DropReason::NoRoute);
        }
        let back = (MacAddr::from_slice(&frame[6..12]), gateway.config().mac);
        let ip = &frame[l3..];
        let external = router.uplink.config().ip;
        if ip[16..20] == external.octets()
            && ip[9] == PROTO_ICMP
            && ip.get(ip_header_len(ip)) == Some(&packet::ICMP_ECHO_REQUEST)
        {
            // The external address is the engine's own: it answers, as the host owning it
            // would.
            return match gateway::answer_echo(&mut frame[l3..]) {
                Ok(()) => {
                    frame[0..6].copy_from_slice(&back.0.0);
                    frame[6..12].copy_from_slice(&back.1.0);
                    Verdict::Reply
                }
                Err(reason) => Verdict::Drop(reason),
            };
        }
        if let Some(reason) =
            self.check_forwardable(now, ingress, vnet, frame, back, gateway_ip, uplink_mtu)
        {
            return Verdict::Drop(reason);
        }
        let total = ip_total_len(frame);
        let Some(router) = &mut self.router else {
            return Verdict::Drop(DropReason::NoRoute);
        };
        let ip = &mut frame[l3..l3 + total];
        let partial = vnet.needs_csum();
        let outbound = match router.nat.handle_outbound(now, ip, back.0, partial) {
            Ok(o) => o,
            Err(reason) => return Verdict::Drop(reason),
        };
        packet::decrement_ttl(ip);
        if outbound.hairpin {
            return match router.nat.handle_inbound(now, ip, partial) {
                Ok(guest_mac) => {
                    router.nat.record_hairpin();
                    self.deliver_to_guest(now, frame, guest_mac)
                }
                Err(reason) => Verdict::Drop(reason),
            };
        }
        let dst = Ipv4Addr::from([ip[16], ip[17], ip[18], ip[19]]);
        let Some(next_hop) = router.uplink.next_hop(dst) else {
            return Verdict::Drop(DropReason::NoRoute);
        };
        frame[6..12].copy_from_slice(&router.uplink.config().mac.0);
        match router.uplink.resolve(now, next_hop) {
            Some(mac) => {
                frame[0..6].copy_from_slice(&mac.0);
                // Marked once, when workers first learn the next hop (not on every packet).
                if router.nat.publish(&outbound, mac) {
                    router.uplink.share(next_hop);
                }
                self.forwarded += 1;
                router
                    .port
                    .map_or(Verdict::Drop(DropReason::NoRoute), Verdict::Forward)
            }
            None => match router.uplink.enqueue(now, next_hop, *vnet, frame.to_vec()) {
                Ok(()) => Verdict::Consumed,
                Err(reason) => Verdict::Drop(reason),
            },
        }
    }

    /// RFC 1812 5.3.1 and 4.2.2.5: a packet whose TTL runs out here, or that is too large for
    /// the egress with DF set, gets its ICMP error back (to `back` = (its sender's MAC, our
    /// MAC), from `our_ip`, out of `ingress`) and is dropped for the returned reason.
    #[allow(clippy::too_many_arguments)]
    fn check_forwardable(
        &mut self,
        now: Instant,
        ingress: PortId,
        vnet: &VnetHdr,
        frame: &[u8],
        back: (MacAddr, MacAddr),
        our_ip: Ipv4Addr,
        egress_mtu: u16,
    ) -> Option<DropReason> {
        let ip = &frame[ethernet::HEADER_LEN..ethernet::HEADER_LEN + ip_total_len(frame)];
        if ip[8] <= 1 {
            self.send_icmp_error(
                now,
                ingress,
                back,
                our_ip,
                (ICMP_TIME_EXCEEDED, 0),
                [0; 4],
                ip,
            );
            return Some(DropReason::TtlExceeded);
        }
        // A GSO frame leaves as packets of its headers and gso_size bytes each: those are
        // what must fit (as Linux's forwarding checks a GSO packet's segments).
        if vnet.largest_packet(ip) > egress_mtu as usize {
            if ip[6] & 0x40 != 0 {
                let [hi, lo] = egress_mtu.to_be_bytes();
                let code = (ICMP_DEST_UNREACHABLE, ICMP_FRAG_NEEDED);
                self.send_icmp_error(now, ingress, back, our_ip, code, [0, 0, hi, lo], ip);
            }
            return Some(DropReason::NeedsFragmentation);
        }
        None
    }

    /// A frame on the uplink: ARP for the external address, ping to it, or NAT's way back in.
    fn uplink_frame(
        &mut self,
        now: Instant,
        ingress: PortId,
        vnet: &VnetHdr,
        frame: &mut [u8],
        (dst, ethertype, l3): (MacAddr, EtherType, usize),
    ) -> Verdict {
        let Some(router) = &mut self.router else {
            return Verdict::Drop(DropReason::NotForUs);
        };
        let ours = *router.uplink.config();
        if l3 != ethernet::HEADER_LEN || !(dst == ours.mac || dst.is_broadcast()) {
            return Verdict::Drop(DropReason::NotForUs);
        }
        if ethertype == EtherType::ARP {
            let answer = router.uplink.handle_arp(now, frame, l3);
            if router.uplink.take_moved() {
                // Workers would go on sending to the old MAC: they ask the engine again.
                router.nat.withdraw_all();
            }
            return match answer {
                ArpAnswer::Reply => Verdict::Reply,
                ArpAnswer::Consumed => Verdict::Consumed,
                ArpAnswer::NotOurs => Verdict::Drop(DropReason::NotForUs),
            };
        }
        if dst != ours.mac || ethertype != EtherType::IPV4 {
            return Verdict::Drop(DropReason::NotForUs);
        }
        let Ok(ip) = Ipv4Packet::new_checked(&frame[l3..]) else {
            return Verdict::Drop(DropReason::BadHeader);
        };
        if !ip.header_checksum_ok() {
            return Verdict::Drop(DropReason::BadChecksum);
        }
        if ip.dst() != ours.ip {
            return Verdict::Drop(DropReason::NotForUs);
        }
        let total = ip.total_len();
        let is_echo_request = ip.protocol() == PROTO_ICMP
            && !ip.is_fragment()
            && ip.payload().first() == Some(&packet::ICMP_ECHO_REQUEST);
        let sender = MacAddr::from_slice(&frame[6..12]);
        if is_echo_request {
            // The external address answers ping, as the host owning it would.
            return match gateway::answer_echo(&mut frame[l3..]) {
                Ok(()) => {
                    frame[0..6].copy_from_slice(&sender.0);
                    frame[6..12].copy_from_slice(&ours.mac.0);
                    Verdict::Reply
                }
                Err(reason) => Verdict::Drop(reason),
            };
        }
        let mtu = self.mtu;
        if let Some(reason) =
            self.check_forwardable(now, ingress, vnet, frame, (sender, ours.mac), ours.ip, mtu)
        {
            return Verdict::Drop(reason);
        }
        let Some(router) = &mut self.router else {
            return Verdict::Drop(DropReason::NotForUs);
        };
        let ip = &mut frame[l3..l3 + total];
        match router.nat.handle_inbound(now, ip, vnet.needs_csum()) {
            Ok(guest_mac) => {
                packet::decrement_ttl(ip);
                self.deliver_to_guest(now, frame, guest_mac)
            }
            Err(reason) => Verdict::Drop(reason),
        }
    }

    /// Sends a routed packet from the gateway to the guest with `guest_mac`.
    fn deliver_to_guest(&mut self, now: Instant, frame: &mut [u8], guest_mac: MacAddr) -> Verdict {
        let Some(gateway) = &self.gateway else {
            return Verdict::Drop(DropReason::NoRoute);
        };
        frame[0..6].copy_from_slice(&guest_mac.0);
        frame[6..12].copy_from_slice(&gateway.config().mac.0);
        // Routed frames come from the gateway, not a port: any port may take them.
        self.forward_unicast(now, guest_mac, 0, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn send_icmp_error(
        &mut self,
        now: Instant,
        port: PortId,
        macs: (MacAddr, MacAddr),
        src_ip: Ipv4Addr,
        (kind, code): (u8, u8),
        rest: [u8; 4],
        offending: &[u8],
    ) {
        let elapsed = self
            .icmp_refilled
            .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
        let refill = elapsed.as_millis().min(ICMP_BURST as u128) as u32;
        if refill > 0 {
            self.icmp_tokens = (self.icmp_tokens + refill).min(ICMP_BURST);
            self.icmp_refilled = Some(now);
        }
        if self.icmp_tokens == 0 || self.outgoing.len() >= MAX_OUTGOING {
            self.icmp_errors_rate_limited += 1;
            return;
        }
        let Some(frame) = gateway::icmp_error(macs, src_ip, kind, code, rest, offending) else {
            return;
        };
        self.icmp_tokens -= 1;
        self.icmp_errors_sent += 1;
        self.outgoing.push_back(Outgoing {
            port,
            vnet: VnetHdr::default(),
            frame,
        });
    }

    /// The next frame the engine wants sent: ICMP errors it generated, ARP requests and
    /// packets released by ARP answers.
    pub fn poll_transmit(&mut self) -> Option<Outgoing> {
        if let Some(out) = self.outgoing.pop_front() {
            return Some(out);
        }
        while let Some(sockets) = &mut self.socket_nat
            && let Some((frame, vnet)) = sockets.poll_packet()
        {
            if let Some(out) = self.frame_for_guest(frame, vnet) {
                return Some(out);
            }
            if let Some(out) = self.outgoing.pop_front() {
                return Some(out);
            }
        }
        let router = self.router.as_mut()?;
        let port = router.port?;
        let (vnet, frame) = router.uplink.poll_transmit()?;
        Some(Outgoing { port, vnet, frame })
    }

    /// Frames an IP packet from socket NAT (after room for the Ethernet header) for the guest
    /// it is addressed to: where that guest was last heard from, else its DHCP lease's MAC
    /// where the switch learned it. An unknown guest gets an ARP request from the gateway
    /// instead, and the packet is dropped (TCP retransmits it).
    fn frame_for_guest(&mut self, mut frame: Vec<u8>, vnet: VnetHdr) -> Option<Outgoing> {
        let gateway = self.gateway.as_ref()?.config();
        let at = ethernet::HEADER_LEN + 16;
        let dst = Ipv4Addr::from(<[u8; 4]>::try_from(frame.get(at..at + 4)?).ok()?);
        let sockets = self.socket_nat.as_ref()?;
        let peer = sockets.peer(dst).or_else(|| {
            let mac = self.dhcp.as_ref()?.leases().find(|l| l.ip == dst)?.mac;
            let mac = MacAddr(mac);
            let port = self.fdb.lookup(sockets.now(), mac, 0)?;
            Some(Peer { port, mac })
        });
        match peer {
            Some(peer) => {
                ethernet::write_header(&mut frame, peer.mac, gateway.mac);
                Some(Outgoing {
                    port: peer.port,
                    vnet,
                    frame,
                })
            }
            None => {
                self.socket_nat_unresolved += 1;
                let request = crate::wire::arp::request_frame(gateway.mac, gateway.ip, dst);
                let ports: Vec<PortId> = self
                    .ports()
                    .map(|(id, _)| id)
                    .filter(|&id| self.is_switch_port(id))
                    .collect();
                for port in ports {
                    if self.outgoing.len() < MAX_OUTGOING {
                        self.outgoing.push_back(Outgoing {
                            port,
                            vnet: VnetHdr::default(),
                            frame: request.clone(),
                        });
                    }
                }
                None
            }
        }
    }

    /// Takes back the buffer of a frame from [`Engine::poll_transmit`] once it was sent, for
    /// the frames to come.
    pub fn recycle(&mut self, buffer: Vec<u8>) {
        if let Some(sockets) = &mut self.socket_nat {
            sockets.recycle(buffer);
        }
    }

    /// The socket NAT, for the I/O edge to carry out its actions.
    pub fn socket_nat(&self) -> Option<&SocketNat> {
        self.socket_nat.as_ref()
    }

    pub fn socket_nat_mut(&mut self) -> Option<&mut SocketNat> {
        self.socket_nat.as_mut()
    }

    /// The I/O edge reports frames it wrote to `port` (more than one when it segmented).
    pub fn record_tx(&mut self, port: PortId, packets: u64, bytes: usize) {
        if let Some(c) = self.counters_mut(port) {
            c.record_tx(packets, bytes);
        }
    }

    /// The I/O edge reports a frame it could not deliver to (or read from) `port`.
    pub fn record_drop(&mut self, port: PortId, reason: DropReason) {
        self.record_drops(port, reason, 1);
    }

    /// `count` drops at once (a fast-path worker's, folded in).
    pub fn record_drops(&mut self, port: PortId, reason: DropReason, count: u64) {
        if let Some(c) = self.counters_mut(port) {
            c.record_drops(reason, count);
        }
    }

    /// Drops a worker's socket NAT made (and told at `now`): counted, and a refusal at its
    /// caps said as the engine's own are.
    pub fn record_worker_drops(
        &mut self,
        now: Instant,
        port: PortId,
        reason: DropReason,
        count: u64,
    ) {
        self.record_drops(port, reason, count);
        if count > 0 {
            self.note_nat_refusal(now, port, reason);
        }
    }

    /// When [`Engine::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let router = self.router.as_ref();
        [
            self.fdb.next_expiry(),
            router.and_then(|r| r.nat.poll_timeout()),
            router.and_then(|r| r.uplink.poll_timeout()),
            self.dhcp.as_ref().and_then(DhcpService::poll_timeout),
            self.dns.as_ref().and_then(DnsService::poll_timeout),
            self.socket_nat.as_ref().and_then(SocketNat::poll_timeout),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs the timers that are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.fdb.next_expiry().is_some_and(|t| t <= now) {
            self.fdb.expire(now);
        }
        if let Some(dhcp) = &mut self.dhcp {
            dhcp.handle_timeout(now, &mut self.outgoing);
            self.sync_names();
        }
        if let Some(dns) = &mut self.dns
            && dns.poll_timeout().is_some_and(|t| t <= now)
        {
            dns.handle_timeout(now, &mut self.outgoing);
        }
        if let Some(sockets) = &mut self.socket_nat
            && sockets.poll_timeout().is_some_and(|t| t <= now)
        {
            sockets.handle_timeout(now);
        }
        let Some(router) = &mut self.router else {
            return;
        };
        router.nat.handle_timeout(now);
        if !router.nat.workers_send_out() {
            // The last connection workers carried has ended or been taken back.
            router.uplink.unshare_all();
        }
        let unresolved = router.uplink.handle_timeout(now);
        if router.uplink.take_moved() {
            router.nat.withdraw_all();
        }
        if let Some(port) = router.port {
            for _ in 0..unresolved {
                self.record_drop(port, DropReason::NeighborUnresolved);
            }
        }
    }

    /// Serves DHCP on the gateway's address (it needs a gateway; false without one).
    pub fn enable_dhcp(&mut self, service: DhcpService) -> bool {
        if self.gateway.is_none() {
            return false;
        }
        self.dhcp = Some(service);
        true
    }

    pub fn dhcp(&self) -> Option<&DhcpService> {
        self.dhcp.as_ref()
    }

    /// Answers DNS on the gateway's address (it needs a gateway; false without one). The
    /// names of current DHCP leases are added at once.
    pub fn enable_dns(&mut self, mut service: DnsService) -> bool {
        if self.gateway.is_none() {
            return false;
        }
        if let Some(dhcp) = &self.dhcp {
            for lease in dhcp.leases() {
                if let Some(name) = &lease.hostname {
                    service.server_mut().add_name(lease.ip, name);
                }
            }
        }
        self.dns = Some(service);
        true
    }

    pub fn dns(&self) -> Option<&DnsService> {
        self.dns.as_ref()
    }

    pub fn dns_mut(&mut self) -> Option<&mut DnsService> {
        self.dns.as_mut()
    }

    /// The next DNS query to send upstream from a host socket.
    pub fn poll_upstream_query(&mut self) -> Option<(std::net::SocketAddr, Vec<u8>)> {
        self.dns.as_mut()?.poll_upstream()
    }

    /// A datagram a host socket received from upstream DNS server `from`.
    pub fn handle_upstream_response(
        &mut self,
        now: Instant,
        from: std::net::SocketAddr,
        response: &[u8],
    ) {
        if let Some(dns) = &mut self.dns {
            dns.handle_upstream(now, from, response, &mut self.outgoing);
        }
    }

    /// The lease file's next changes and their generation, when the leases changed since the
    /// last call (see [`DhcpService::poll_lease_write`]).
    pub fn poll_lease_write(&mut self, now: Instant) -> Option<dhcp::LeaseUpdate> {
        self.dhcp.as_mut()?.poll_lease_write(now)
    }

    /// The lease file of `generation` is on disk: the replies it holds may leave.
    pub fn handle_lease_written(&mut self, generation: u64) {
        if let Some(dhcp) = &mut self.dhcp {
            dhcp.handle_lease_written(generation, &mut self.outgoing);
        }
    }

    /// NAT's connections, as `switchyard conntrack` lists them.
    pub fn conntrack(&self, now: Instant) -> Vec<FlowRow> {
        let mut rows = self
            .router
            .as_ref()
            .map(|r| r.nat.rows(now))
            .unwrap_or_default();
        if let Some(sockets) = &self.socket_nat {
            rows.extend(sockets.rows(now));
        }
        rows
    }

    /// The uplink's ARP cache.
    pub fn neighbors(&self) -> Vec<NeighborRow> {
        self.router
            .as_ref()
            .map(|r| r.uplink.rows())
            .unwrap_or_default()
    }

    pub fn fdb(&self) -> &Fdb {
        &self.fdb
    }

    pub fn fdb_rows(&self, now: Instant) -> Vec<FdbRow> {
        self.fdb.rows(now)
    }

    pub fn stats(&self) -> Stats {
        let router = self.router.as_ref();
        let dhcp = self.dhcp.as_ref();
        Stats {
            workers: Vec::new(),
            ports: self.ports().map(|(id, p)| (id, p.clone())).collect(),
            engine: EngineCounters {
                forwarded: self.forwarded,
                worker_forwarded: self.worker_forwarded,
                worker_handed_over: self.worker_handed_over,
                flooded: self.flooded,
                fdb: self.fdb.counters.clone(),
                gateway: self
                    .gateway
                    .as_ref()
                    .map(|g| g.counters.clone())
                    .unwrap_or_default(),
                nat: router.map(|r| r.nat.counters.clone()).unwrap_or_default(),
                uplink: router
                    .map(|r| r.uplink.counters.clone())
                    .unwrap_or_default(),
                icmp_errors_sent: self.icmp_errors_sent,
                icmp_errors_rate_limited: self.icmp_errors_rate_limited,
                dhcp: dhcp.map(|d| d.counters().clone()).unwrap_or_default(),
                dhcp_held_dropped: dhcp.map_or(0, |d| d.held_dropped),
                dhcp_probes: dhcp.map(|d| d.probe_counters.clone()).unwrap_or_default(),
                dns: self
                    .dns
                    .as_ref()
                    .map(|d| d.counters().clone())
                    .unwrap_or_default(),
                dns_upstream_dropped: self.dns.as_ref().map_or(0, |d| d.upstream_dropped),
                dns_tcp: self
                    .dns
                    .as_ref()
                    .and_then(DnsService::tcp)
                    .map(|t| t.counters.clone())
                    .unwrap_or_default(),
                socket_nat: self
                    .socket_nat
                    .as_ref()
                    .map(|s| s.counters.clone())
                    .unwrap_or_default(),
                socket_nat_unresolved: self.socket_nat_unresolved,
                socket_nat_worker_connects: 0,
            },
            fdb_entries: self.fdb.len(),
            nat_flows: router.map_or(0, |r| r.nat.len())
                + self.socket_nat.as_ref().map_or(0, SocketNat::len),
            dhcp_leases: dhcp.map_or(0, |d| d.leases().count()),
        }
    }
}

/// `packet` as an IPv4 packet whose header is whole and whose header checksum verifies.
fn checked_ipv4(packet: &[u8]) -> Option<Ipv4Packet<&[u8]>> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    ip.header_checksum_ok().then_some(ip)
}

fn ip_header_len(ip: &[u8]) -> usize {
    (ip[0] & 0x0f) as usize * 4
}

/// The IPv4 total length of a frame whose header the gateway checked.
fn ip_total_len(frame: &[u8]) -> usize {
    let at = ethernet::HEADER_LEN + 2;
    u16::from_be_bytes([frame[at], frame[at + 1]]) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MacAddr;
    use crate::wire::vnet::gso;

    const A: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0xa]);
    const B: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0xb]);
    const C: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0xc]);

    fn frame(dst: MacAddr, src: MacAddr, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len.max(14)];
        f[0..6].copy_from_slice(&dst.0);
        f[6..12].copy_from_slice(&src.0);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f
    }

    fn three_ports() -> (Engine, [PortId; 3], Instant) {
        let mut e = Engine::new(&Config::default());
        let ports = [e.add_port("a"), e.add_port("b"), e.add_port("c")];
        (e, ports, Instant::now())
    }

    fn send(e: &mut Engine, now: Instant, port: PortId, mut f: Vec<u8>) -> Verdict {
        e.handle_frame(now, port, &VnetHdr::default(), &mut f)
    }

    // IEEE 802.1Q 8.8.6 / 8.6.3: unknown destinations are flooded, learned ones forwarded to
    // exactly the port they were learned on.
    #[test]
    fn learns_then_forwards_known_unicast_to_one_port() {
        let (mut e, [pa, pb, _], t) = three_ports();
        assert_eq!(send(&mut e, t, pa, frame(B, A, 60)), Verdict::Flood);
        assert_eq!(send(&mut e, t, pb, frame(A, B, 60)), Verdict::Forward(pa));
        assert_eq!(send(&mut e, t, pa, frame(B, A, 60)), Verdict::Forward(pb));
        let s = e.stats();
        assert_eq!(s.engine.flooded, 1);
        assert_eq!(s.engine.forwarded, 2);
        assert_eq!(s.ports[0].1.counters.rx_packets, 2);
        assert_eq!(s.ports[0].1.counters.rx_bytes, 120);
    }

    #[test]
    fn broadcast_and_multicast_flood() {
        let (mut e, [pa, _, _], t) = three_ports();
        assert_eq!(
            send(&mut e, t, pa, frame(MacAddr::BROADCAST, A, 42)),
            Verdict::Flood
        );
        let ipv6_all_nodes = MacAddr([0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(
            send(&mut e, t, pa, frame(ipv6_all_nodes, A, 90)),
            Verdict::Flood
        );
    }

    #[test]
    fn never_sends_back_out_of_the_ingress_port() {
        let (mut e, [pa, _, _], t) = three_ports();
        send(&mut e, t, pa, frame(MacAddr::BROADCAST, B, 60));
        assert_eq!(
            send(&mut e, t, pa, frame(B, A, 60)),
            Verdict::Drop(DropReason::SamePort)
        );
        assert_eq!(e.port(pa).unwrap().counters.drops(DropReason::SamePort), 1);
    }

    #[test]
    fn follows_a_mac_that_moves() {
        let (mut e, [pa, pb, pc], t) = three_ports();
        send(&mut e, t, pa, frame(MacAddr::BROADCAST, A, 60));
        assert_eq!(send(&mut e, t, pb, frame(A, B, 60)), Verdict::Forward(pa));
        send(&mut e, t, pc, frame(MacAddr::BROADCAST, A, 60));
        assert_eq!(send(&mut e, t, pb, frame(A, B, 60)), Verdict::Forward(pc));
        assert_eq!(e.stats().engine.fdb.moved, 1);
    }

    #[test]
    fn drops_invalid_sources_runts_and_oversize_with_counters() {
        let (mut e, [pa, _, _], t) = three_ports();
        let cases = [
            (frame(B, MacAddr::BROADCAST, 60), DropReason::InvalidSource),
            (
                frame(B, MacAddr([0x01, 0, 0x5e, 0, 0, 1]), 60),
                DropReason::InvalidSource,
            ),
            (frame(B, MacAddr::ZERO, 60), DropReason::InvalidSource),
            (frame(B, A, 60)[..13].to_vec(), DropReason::Runt),
            (Vec::new(), DropReason::Runt),
            (frame(B, A, 1500 + 18 + 1), DropReason::Oversize),
        ];
        for (f, reason) in cases {
            assert_eq!(send(&mut e, t, pa, f), Verdict::Drop(reason));
        }
        let c = &e.port(pa).unwrap().counters;
        assert_eq!(c.drops(DropReason::InvalidSource), 3);
        assert_eq!(c.drops(DropReason::Runt), 2);
        assert_eq!(c.drops(DropReason::Oversize), 1);
        assert_eq!(c.rx_packets, 6);
        assert!(e.fdb().is_empty(), "nothing learned from dropped frames");
        // A maximal plain frame (MTU 1500 + tagged header) is fine.
        assert_eq!(send(&mut e, t, pa, frame(B, A, 1518)), Verdict::Flood);
    }

    #[test]
    fn gso_frames_may_exceed_the_mtu() {
        let (mut e, [pa, _, _], t) = three_ports();
        let tso = VnetHdr {
            gso_type: gso::TCPV4,
            gso_size: 1448,
            ..Default::default()
        };
        let mut f = frame(B, A, 65000);
        assert_eq!(e.handle_frame(t, pa, &tso, &mut f), Verdict::Flood);
        let mut too_big = frame(B, A, MAX_FRAME_LEN + 1);
        assert_eq!(
            e.handle_frame(t, pa, &tso, &mut too_big),
            Verdict::Drop(DropReason::Oversize)
        );
    }

    #[test]
    fn fdb_overflow_still_floods_and_counts() {
        let mut e = Engine::new(&Config {
            fdb_capacity: 2,
            ..Config::default()
        });
        let pa = e.add_port("a");
        let pb = e.add_port("b");
        let t = Instant::now();
        send(&mut e, t, pa, frame(MacAddr::BROADCAST, A, 60));
        send(&mut e, t, pa, frame(MacAddr::BROADCAST, B, 60));
        assert_eq!(send(&mut e, t, pb, frame(A, C, 60)), Verdict::Forward(pa));
        assert_eq!(send(&mut e, t, pa, frame(C, A, 60)), Verdict::Flood);
        let s = e.stats();
        assert_eq!(s.fdb_entries, 2);
        assert_eq!(s.engine.fdb.full, 1);
        // The log hears of it once per interval, not per frame.
        send(
            &mut e,
            t,
            pb,
            frame(A, MacAddr([0x52, 0x54, 0, 0, 0, 0x77]), 60),
        );
        let notices: Vec<String> = std::iter::from_fn(|| e.poll_notice()).collect();
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(
            notices[0].contains("MAC table is full (2 entries)"),
            "{notices:?}"
        );
    }

    /// A worker's socket NAT at its caps is heard of as the engine's own NAT is: counted on
    /// the port, and said once per interval.
    #[test]
    fn a_workers_refusals_are_counted_and_said_once() {
        let (mut e, [pa, _, _], t) = three_ports();
        e.record_worker_drops(t, pa, DropReason::NatGuestLimit, 3);
        e.record_worker_drops(t, pa, DropReason::NatGuestLimit, 2);
        e.record_worker_drops(t, pa, DropReason::BadChecksum, 1);
        let counters = &e.port(pa).unwrap().counters;
        assert_eq!(counters.drops(DropReason::NatGuestLimit), 5);
        assert_eq!(counters.drops(DropReason::BadChecksum), 1);
        let notices: Vec<String> = std::iter::from_fn(|| e.poll_notice()).collect();
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(
            notices[0].contains("NAT refuses new connections"),
            "{notices:?}"
        );
    }

    #[test]
    fn timers_age_entries_in_virtual_time() {
        let (mut e, [pa, pb, _], t0) = three_ports();
        assert_eq!(e.poll_timeout(), None);
        send(&mut e, t0, pa, frame(MacAddr::BROADCAST, A, 60));
        let due = e.poll_timeout().unwrap();
        assert_eq!(due, t0 + switch::DEFAULT_AGING);
        e.handle_timeout(due - Duration::from_millis(1));
        assert_eq!(e.fdb().len(), 1);
        e.handle_timeout(due);
        assert_eq!(e.fdb().len(), 0);
        assert_eq!(send(&mut e, due, pb, frame(A, B, 60)), Verdict::Flood);
    }

    #[test]
    fn removed_ports_are_forgotten_and_their_ids_reused() {
        let (mut e, [pa, pb, _], t) = three_ports();
        send(&mut e, t, pa, frame(MacAddr::BROADCAST, A, 60));
        e.remove_port(pa);
        assert_eq!(send(&mut e, t, pb, frame(A, B, 60)), Verdict::Flood);
        assert_eq!(e.add_port("d"), pa);
        assert_eq!(e.ports().count(), 3);
    }

    /// A tiny deterministic generator (xorshift64*), so the property test needs no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    // DESIGN.md principle 5: any byte sequence on any port, at any time, costs at most a
    // counter. After each frame every FDB entry points to a live port and the cap holds.
    #[test]
    fn random_frames_on_random_ports_keep_the_fdb_consistent() {
        let mut e = Engine::new(&Config {
            fdb_capacity: 64,
            fdb_aging: Duration::from_secs(5),
            ..Config::default()
        });
        let mut live: Vec<PortId> = (0..4).map(|i| e.add_port(format!("p{i}"))).collect();
        // The fast-path workers' view must never disagree with the table (a miss is allowed).
        let mirror = e.mirror();
        let small_mac = |last: u8| MacAddr([0, 0, 0, 0, 0, last]);
        let mut rng = Rng(0x5eed_1234_abcd_ef01);
        let mut mirrored = 0u64;
        let t0 = Instant::now();
        let mut now = t0;
        let mut buf = vec![0u8; 2048];
        for round in 0..50_000u32 {
            now += Duration::from_millis(rng.next() % 20);
            let len = (rng.next() % 1600) as usize;
            for b in buf[..len].iter_mut() {
                *b = rng.next() as u8;
            }
            // Small MAC space so learning, moves and the cap all happen.
            if len >= 12 && rng.next().is_multiple_of(2) {
                buf[6] &= 0xfe;
                buf[7..11].fill(0);
                buf[11] = (rng.next() % 100) as u8;
                buf[5] = (rng.next() % 100) as u8;
                buf[0..5].fill(0);
            }
            let port = live[(rng.next() % live.len() as u64) as usize];
            let src = (len >= 12).then(|| MacAddr(buf[6..12].try_into().unwrap()));
            let hdr = VnetHdr {
                gso_type: if rng.next().is_multiple_of(8) {
                    gso::TCPV4
                } else {
                    0
                },
                ..Default::default()
            };
            match e.handle_frame(now, port, &hdr, &mut buf[..len]) {
                Verdict::Forward(p) => assert!(p != port && e.port(p).is_some()),
                Verdict::Flood | Verdict::Reply | Verdict::Drop(_) | Verdict::Consumed => {}
            }
            if round % 1000 == 999 {
                let gone = live.remove((rng.next() % live.len() as u64) as usize);
                e.remove_port(gone);
                live.push(e.add_port("again"));
            }
            if rng.next().is_multiple_of(4) {
                // A worker forwarding this MAC's frames.
                mirror.note_seen(now, small_mac((rng.next() % 100) as u8));
            }
            if e.poll_timeout().is_some_and(|t| t <= now) {
                e.handle_timeout(now);
            }
            assert!(e.fdb().len() <= 64);
            for mac in (0..100).map(small_mac).chain(src) {
                if let Some(p) = mirror.lookup(mac) {
                    mirrored += 1;
                    assert_eq!(e.fdb().lookup(now, mac, 0), Some(p), "round {round}: {mac}");
                    assert!(mirror.fast_ingress(p), "a live port");
                }
            }
        }
        assert!(mirrored > 10_000, "the mirror was used: {mirrored}");
        for index in 0..8 {
            let port = PortId(index);
            assert_eq!(mirror.fast_ingress(port), e.port(port).is_some());
        }
        for row in e.fdb_rows(now) {
            assert!(
                e.port(row.port).is_some(),
                "entry {row:?} points to a dead port"
            );
        }
        let s = e.stats();
        assert!(s.engine.fdb.learned > 64 && s.engine.fdb.full > 0 && s.engine.fdb.aged > 0);
        assert!(s.engine.fdb.moved > 0);
    }

    #[test]
    fn the_gateway_answers_on_the_ingress_port_and_is_never_flooded_to() {
        use crate::gateway::GatewayConfig;
        use std::net::Ipv4Addr;
        let gw_mac = MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        let mut e = Engine::new(&Config {
            gateway: Some(GatewayConfig {
                mac: gw_mac,
                ip: Ipv4Addr::new(192, 168, 122, 1),
                prefix: 24,
            }),
            ..Config::default()
        });
        let pa = e.add_port("a");
        e.add_port("b");
        let t = Instant::now();
        // who-has 192.168.122.1 tell 192.168.122.10
        let mut arp = frame(MacAddr::BROADCAST, A, 42);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        arp[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        arp[22..28].copy_from_slice(&A.0);
        arp[28..32].copy_from_slice(&[192, 168, 122, 10]);
        arp[38..42].copy_from_slice(&[192, 168, 122, 1]);
        assert_eq!(send(&mut e, t, pa, arp.clone()), Verdict::Reply);
        // A broadcast ARP for someone else is flooded as usual.
        arp[41] = 11;
        assert_eq!(send(&mut e, t, pa, arp), Verdict::Flood);
        // Frames to the gateway's MAC are the gateway's: answered or dropped, never flooded.
        assert_eq!(
            send(&mut e, t, pa, frame(gw_mac, A, 60)),
            Verdict::Drop(DropReason::BadHeader)
        );
        assert_eq!(
            send(&mut e, t, pa, frame(B, gw_mac, 60)),
            Verdict::Drop(DropReason::SpoofedGatewayMac)
        );
        assert_eq!(e.stats().engine.gateway.arp_replies, 1);
    }

    mod routed {
        //! The gateway, NAT and uplink together, in memory.
        use super::*;
        use crate::nat::packet::fixtures;
        use crate::wire::arp;

        const GW: MacAddr = MacAddr([0x52, 0x54, 0, 0xaa, 0, 1]);
        const UP: MacAddr = MacAddr([0x52, 0x54, 0, 0xee, 0, 2]);
        const ROUTER: MacAddr = MacAddr([0x52, 0x54, 0, 0xee, 0, 1]);
        const GUEST: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x10]);

        fn engine() -> (Engine, PortId, PortId, Instant) {
            engine_with_uplink_mtu(1500)
        }

        fn engine_with_uplink_mtu(mtu: u16) -> (Engine, PortId, PortId, Instant) {
            let mut e = Engine::new(&Config {
                gateway: Some(GatewayConfig {
                    mac: GW,
                    ip: Ipv4Addr::new(192, 168, 122, 1),
                    prefix: 24,
                }),
                nat: Some((
                    NatConfig::new(
                        Ipv4Addr::new(192, 168, 122, 1),
                        24,
                        Ipv4Addr::new(203, 0, 113, 2),
                    ),
                    UplinkConfig {
                        mac: UP,
                        ip: Ipv4Addr::new(203, 0, 113, 2),
                        prefix: 24,
                        gateway: Some(Ipv4Addr::new(203, 0, 113, 1)),
                        mtu,
                    },
                )),
                ..Config::default()
            });
            let guest = e.add_port("guest");
            let uplink = e.add_uplink("up0").unwrap();
            (e, guest, uplink, Instant::now())
        }

        fn eth(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
            let mut f = dst.0.to_vec();
            f.extend_from_slice(&src.0);
            f.extend_from_slice(&ethertype.to_be_bytes());
            f.extend_from_slice(payload);
            f
        }

        fn guest_udp(ttl: u8) -> Vec<u8> {
            let mut ip = fixtures::udp([192, 168, 122, 10], 40000, [203, 0, 113, 1], 53, b"q");
            ip[8] = ttl;
            ip[10..12].fill(0);
            let c = crate::wire::checksum::checksum(&ip[..20]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            eth(GW, GUEST, 0x0800, &ip)
        }

        // RFC 1812 4.2.2.5 / RFC 1191, and what Linux's forwarding does with a GSO packet: the
        // segments a super-frame stands for must fit the uplink's MTU; if they do not and DF is
        // set, fragmentation-needed with the MTU goes back, as for a plain packet.
        #[test]
        fn a_super_frame_whose_segments_exceed_the_uplink_mtu_gets_fragmentation_needed() {
            let (mut e, guest, _, t) = engine_with_uplink_mtu(1400);
            let datagrams = vec![7u8; 3 * 1372];
            let ip = fixtures::udp(
                [192, 168, 122, 10],
                40000,
                [203, 0, 113, 1],
                4433,
                &datagrams,
            );
            let uso = |gso_size| VnetHdr {
                gso_type: gso::UDP_L4,
                gso_size,
                ..Default::default()
            };
            // 20 + 8 + 1372 = 1400: fits (held for the next hop's ARP).
            let mut f = eth(GW, GUEST, 0x0800, &ip);
            assert_eq!(
                e.handle_frame(t, guest, &uso(1372), &mut f),
                Verdict::Consumed
            );
            while e.poll_transmit().is_some() {}
            // 1401: one byte too many per segment, DF set.
            let mut f = eth(GW, GUEST, 0x0800, &ip);
            assert_eq!(
                e.handle_frame(t, guest, &uso(1373), &mut f),
                Verdict::Drop(DropReason::NeedsFragmentation)
            );
            let icmp = e.poll_transmit().expect("fragmentation-needed");
            assert_eq!(icmp.port, guest);
            let l4 = &icmp.frame[14 + 20..];
            assert_eq!((l4[0], l4[1]), (ICMP_DEST_UNREACHABLE, ICMP_FRAG_NEEDED));
            assert_eq!(u16::from_be_bytes([l4[6], l4[7]]), 1400, "the next-hop MTU");
            // A TCP super-frame: its segments are IP + TCP headers + gso_size.
            let tcp = fixtures::tcp([192, 168, 122, 10], 40001, [203, 0, 113, 1], 80, 0x10);
            let tso = |gso_size| VnetHdr {
                gso_type: gso::TCPV4,
                gso_size,
                ..Default::default()
            };
            let mut segment = tcp[20..].to_vec();
            segment.extend_from_slice(&[0u8; 4000]);
            let big = fixtures::ipv4(6, [192, 168, 122, 10], [203, 0, 113, 1], &segment);
            let mut f = eth(GW, GUEST, 0x0800, &big);
            assert_eq!(
                e.handle_frame(t, guest, &tso(1448), &mut f),
                Verdict::Drop(DropReason::NeedsFragmentation)
            );
            let mut f = eth(GW, GUEST, 0x0800, &big);
            assert_ne!(
                e.handle_frame(t, guest, &tso(1360), &mut f),
                Verdict::Drop(DropReason::NeedsFragmentation),
                "40 + 1360 fits"
            );
        }

        fn router_arp(mac: MacAddr) -> Vec<u8> {
            let mut answer = arp::request_frame(
                mac,
                Ipv4Addr::new(203, 0, 113, 1),
                Ipv4Addr::new(203, 0, 113, 2),
            );
            answer[20..22].copy_from_slice(&arp::OP_REPLY.to_be_bytes());
            answer[0..6].copy_from_slice(&UP.0);
            answer
        }

        // RFC 1122 2.3.2.1: with workers, an answered UDP flow is published with the next
        // hop's MAC; when the next hop answers ARP from another MAC, the workers' copy is taken
        // back at once, and the engine's next packet publishes the new MAC.
        #[test]
        fn a_next_hop_that_moves_takes_its_connections_back_from_the_workers() {
            let (mut e, guest, uplink, t) = engine();
            let fast = e.nat_mirror().expect("packet NAT");
            let hdr = VnetHdr::default();
            let mut f = guest_udp(64);
            e.handle_frame(t, guest, &hdr, &mut f);
            e.handle_frame(t, uplink, &hdr, &mut router_arp(ROUTER));
            while e.poll_transmit().is_some() {}
            let ip = fixtures::udp([203, 0, 113, 1], 53, [203, 0, 113, 2], 40000, b"a");
            let mut reply = eth(UP, ROUTER, 0x0800, &ip);
            e.handle_frame(t, uplink, &hdr, &mut reply);
            let mut f = guest_udp(64);
            assert_eq!(
                e.handle_frame(t, guest, &hdr, &mut f),
                Verdict::Forward(uplink)
            );
            let query = packet::classify(&guest_udp(64)[14..], 20).unwrap().0;
            let (out, _) = fast
                .mirror
                .lookup(crate::nat::Dir::Out, &query)
                .expect("published");
            assert_eq!(out.mac, ROUTER);

            let moved = MacAddr([0x52, 0x54, 0, 0xee, 0, 9]);
            e.handle_frame(t, uplink, &hdr, &mut router_arp(moved));
            assert!(
                fast.mirror.lookup(crate::nat::Dir::Out, &query).is_none(),
                "taken back"
            );
            let mut f = guest_udp(64);
            assert_eq!(
                e.handle_frame(t, guest, &hdr, &mut f),
                Verdict::Forward(uplink)
            );
            assert_eq!(&f[0..6], &moved.0);
            let (out, _) = fast
                .mirror
                .lookup(crate::nat::Dir::Out, &query)
                .expect("again");
            assert_eq!(out.mac, moved);
        }

        // RFC 1122 2.3.2.2 and the whole path: held for ARP, released with the next hop's MAC
        // and the uplink's, translated; the reply comes back to the guest from the gateway.
        #[test]
        fn a_guest_packet_goes_out_after_arp_and_its_reply_comes_back() {
            let (mut e, guest, uplink, t) = engine();
            let hdr = VnetHdr::default();
            let mut f = guest_udp(64);
            assert_eq!(e.handle_frame(t, guest, &hdr, &mut f), Verdict::Consumed);
            let request = e.poll_transmit().unwrap();
            assert_eq!(request.port, uplink);
            assert_eq!(&request.frame[..6], &[0xff; 6]);
            assert!(e.poll_transmit().is_none());

            let mut answer = arp::request_frame(
                ROUTER,
                Ipv4Addr::new(203, 0, 113, 1),
                Ipv4Addr::new(203, 0, 113, 2),
            );
            answer[20..22].copy_from_slice(&arp::OP_REPLY.to_be_bytes());
            answer[0..6].copy_from_slice(&UP.0);
            assert_eq!(
                e.handle_frame(t, uplink, &hdr, &mut answer),
                Verdict::Consumed
            );
            let out = e.poll_transmit().unwrap();
            assert_eq!(out.port, uplink);
            assert_eq!(&out.frame[0..6], &ROUTER.0);
            assert_eq!(&out.frame[6..12], &UP.0);
            assert_eq!(&out.frame[14 + 12..14 + 16], &[203, 0, 113, 2]);
            assert_eq!(out.frame[14 + 8], 63, "TTL decremented");
            assert!(fixtures::checksums_ok(&out.frame[14..]));

            // Now resolved: the next packet goes straight out.
            let mut f = guest_udp(64);
            assert_eq!(
                e.handle_frame(t, guest, &hdr, &mut f),
                Verdict::Forward(uplink)
            );

            let sport = u16::from_be_bytes([out.frame[34], out.frame[35]]);
            let ip = fixtures::udp([203, 0, 113, 1], 53, [203, 0, 113, 2], sport, b"a");
            let mut reply = eth(UP, ROUTER, 0x0800, &ip);
            assert_eq!(
                e.handle_frame(t, uplink, &hdr, &mut reply),
                Verdict::Forward(guest)
            );
            assert_eq!(&reply[0..6], &GUEST.0);
            assert_eq!(&reply[6..12], &GW.0);
            assert_eq!(&reply[14 + 16..14 + 20], &[192, 168, 122, 10]);
            assert!(fixtures::checksums_ok(&reply[14..]));
            assert_eq!(e.conntrack(t).len(), 1);

            // Frames for other hosts on the uplink are not ours.
            let mut other = eth(ROUTER, UP, 0x0800, &ip);
            assert_eq!(
                e.handle_frame(t, uplink, &hdr, &mut other),
                Verdict::Drop(DropReason::NotForUs)
            );
        }

        // RFC 1812 5.3.1: TTL 1 is not forwarded; time exceeded goes back from the gateway.
        #[test]
        fn expiring_ttl_gets_time_exceeded_from_the_gateway() {
            let (mut e, guest, _, t) = engine();
            let mut f = guest_udp(1);
            assert_eq!(
                e.handle_frame(t, guest, &VnetHdr::default(), &mut f),
                Verdict::Drop(DropReason::TtlExceeded)
            );
            let err = e.poll_transmit().unwrap();
            assert_eq!(err.port, guest);
            assert_eq!(&err.frame[0..6], &GUEST.0);
            assert_eq!(&err.frame[14 + 12..14 + 16], &[192, 168, 122, 1]);
            assert_eq!(err.frame[34], 11);
            assert!(e.conntrack(t).is_empty(), "nothing was translated");
        }

        // RFC 826 on the uplink: the engine answers for its external address.
        #[test]
        fn the_uplink_answers_arp_and_ping_for_the_external_address() {
            let (mut e, _, uplink, t) = engine();
            let hdr = VnetHdr::default();
            let mut who_has = arp::request_frame(
                ROUTER,
                Ipv4Addr::new(203, 0, 113, 1),
                Ipv4Addr::new(203, 0, 113, 2),
            );
            assert_eq!(
                e.handle_frame(t, uplink, &hdr, &mut who_has),
                Verdict::Reply
            );
            assert_eq!(&who_has[6..12], &UP.0);
            let ip = fixtures::echo([203, 0, 113, 1], [203, 0, 113, 2], 8, 1);
            let mut ping = eth(UP, ROUTER, 0x0800, &ip);
            assert_eq!(e.handle_frame(t, uplink, &hdr, &mut ping), Verdict::Reply);
            assert_eq!(&ping[0..6], &ROUTER.0);
            assert_eq!(ping[34], 0, "echo reply");
        }
    }
}
