//! The gateway's DHCP service: picks DHCP requests out of guests' frames, hands them to the
//! sans-IO server of [`dhcp_dns::dhcp`], and frames its replies from the gateway.
//!
//! It lives in the datapath because the gateway address exists only inside the engine: no
//! host socket is bound to port 67, so switchyard never clashes with a DHCP server on the
//! host, and only guest-facing ports are served (never the uplink), so it can never be a
//! rogue DHCP server on a LAN.
//!
//! An acknowledgement that changes the lease set is held until the lease file holding it is
//! on disk ([`DhcpService::poll_lease_write`], [`DhcpService::handle_lease_written`]): after a
//! crash, every lease a client was told about is still honoured. Changes that arrive while a
//! write is under way are committed together by the next one. Changes no reply waits for (a
//! RELEASE, an expiry) are written within [`LAZY_WRITE`], usually together with the next
//! acknowledgement: losing one in a crash only keeps an address leased until it expires.
//!
//! An OFFER of an address new to its client is held until an ARP probe for that address has
//! gone unanswered for [`PROBE_WAIT`] (RFC 2131 3.1 step 2 and 4.4.1: the server SHOULD probe
//! before allocating; dnsmasq pings and waits up to 3 s). The probe is RFC 5227's, sender IP
//! 0.0.0.0, not the gateway's address: Linux answers such a probe for any address it has,
//! without the route check (rp_filter) it applies to ordinary requests, and no guest's ARP
//! cache is touched by it. A guest's own ARP traffic counts as an answer too (RFC 5227 2.1.1:
//! any ARP whose sender IP is the probed address, or another host's probe for it). An answer
//! from another MAC marks the address in use (as a passively seen one) and the next free
//! address is probed, [`PROBE_TRIES`] at most; probes are bounded ([`MAX_PROBES`]) and every
//! outcome has a counter ([`ProbeCounters`]). A guest on this host answers within a
//! millisecond, so a short wait suffices; the held OFFER costs a fresh client's first lease
//! those [`PROBE_WAIT`] milliseconds, and nothing else waits for it. With clean-traffic on, a
//! port cannot answer for an address it was not given: its frames are dropped, so such an
//! address is not really in use on the network.

use crate::engine::Outgoing;
use crate::gateway::udp_frame;
use crate::port::PortId;
use crate::wire::{MacAddr, VnetHdr};
use dhcp_dns::dhcp::Probe;
use dhcp_dns::dhcp::{
    Destination, DhcpConfig, DhcpCounters, DhcpServer, Lease, Reply, format_lease_line,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
/// Replies waiting for the lease file; beyond this, the oldest are dropped (the client
/// retries), so a stuck disk cannot grow memory without bound.
const MAX_HELD: usize = 1024;
/// How long a lease change that no reply waits for may stay unwritten.
pub const LAZY_WRITE: Duration = Duration::from_secs(1);

/// What changed in the lease file since the last write: the new line of each address whose
/// lease was set, `None` for each whose lease ended. Whoever writes the file keeps its lines
/// ([`LeaseLines`]) and applies these in order, so the datapath does work in proportion to the
/// changes, not to the leases (with tens of thousands of leases, building the whole file for
/// every write was most of the engine's time under a burst of new clients).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseUpdate {
    pub generation: u64,
    pub changes: Vec<(Ipv4Addr, Option<String>)>,
}

/// The lease file, line by line in address order, for whoever writes it.
#[derive(Debug, Clone, Default)]
pub struct LeaseLines {
    lines: BTreeMap<Ipv4Addr, String>,
    len: usize,
}

impl LeaseLines {
    pub fn apply(&mut self, update: LeaseUpdate) {
        for (ip, line) in update.changes {
            let old = match line {
                Some(line) => {
                    self.len += line.len();
                    self.lines.insert(ip, line)
                }
                None => self.lines.remove(&ip),
            };
            self.len -= old.map_or(0, |l| l.len());
        }
    }

    /// The whole file (dnsmasq's format, as [`dhcp_dns::dhcp::format_lease_file`]).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(self.len);
        for line in self.lines.values() {
            out.push_str(line);
        }
        out
    }
}
/// How long an OFFER of an address new to its client waits for an answer to its ARP probe.
/// Guests of this host answer in well under a millisecond (a loaded VM in a few); 30 ms keeps
/// a fresh client's whole first exchange far under 100 ms.
pub const PROBE_WAIT: Duration = Duration::from_millis(30);
/// Addresses one DISCOVER may find in use before it is dropped (the client asks again later).
pub const PROBE_TRIES: u8 = 3;
/// OFFERs held for a probe at once; beyond, a DISCOVER that needs one is dropped and counted
/// (the client retries). At [`PROBE_WAIT`] this still takes 1024 / 30 ms = 34 k new clients a
/// second.
pub const MAX_PROBES: usize = 1024;

/// What the probes before OFFERs found, for `switchyard stats`.
#[derive(Default, Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeCounters {
    /// ARP probes sent (one per address offered to a client that did not hold it).
    pub sent: u64,
    /// Probes nobody answered within [`PROBE_WAIT`]: their OFFER left.
    pub clear: u64,
    /// Probes answered from another MAC: the address was marked in use and the next tried.
    pub conflicts: u64,
    /// DISCOVERs dropped after [`PROBE_TRIES`] addresses in a row were found in use.
    pub gave_up: u64,
    /// DISCOVERs dropped because [`MAX_PROBES`] OFFERs were already held.
    pub queue_full: u64,
    /// Held OFFERs not sent because the offer was withdrawn meanwhile.
    pub stale: u64,
    /// DISCOVERs repeated while their address was being probed: the held OFFER answers the
    /// latest, with no second probe.
    pub merged: u64,
}

/// An OFFER held while its address is probed.
#[derive(Debug)]
struct PendingProbe {
    deadline: Instant,
    /// The client's chaddr: its own answer is no conflict.
    client: [u8; 6],
    /// Addresses this DISCOVER already found in use.
    conflicts: u8,
    ingress: PortId,
    src: (MacAddr, Ipv4Addr),
    /// The DISCOVER, to ask the server again if the address is in use.
    request: Vec<u8>,
    offer: Outgoing,
}

#[derive(Debug)]
pub struct DhcpService {
    server: DhcpServer,
    gateway_mac: MacAddr,
    /// An instant and the Unix time it corresponds to: leases are kept in wall-clock time
    /// because they outlive the process; the engine's time is monotonic.
    clock: (Instant, u64),
    /// Hold lease-changing replies until the lease file is written.
    durable: bool,
    held: VecDeque<(u64, Outgoing)>,
    /// The lease generation last handed out for writing, and the last one on disk.
    requested: u64,
    written: u64,
    /// Since when the lease set has changes not yet handed out for writing.
    dirty_since: Option<Instant>,
    /// Addresses whose lease changed since the last [`LeaseUpdate`] was handed out (at first,
    /// every lease: the writer starts with no lines).
    unwritten: BTreeSet<u32>,
    pub held_dropped: u64,
    /// OFFERs waiting for their probe, by address (the server offers an address to one client
    /// at a time), and their deadlines.
    probes: HashMap<Ipv4Addr, PendingProbe>,
    probe_due: BTreeSet<(Instant, Ipv4Addr)>,
    /// Probes to send ([`Self::poll_probe`]).
    probe_out: VecDeque<Ipv4Addr>,
    pub probe_counters: ProbeCounters,
}

impl DhcpService {
    /// `durable`: a lease file is kept, and replies wait for it. `clock`: an instant and the
    /// Unix time (seconds) at that instant.
    pub fn new(
        server: DhcpServer,
        gateway_mac: MacAddr,
        durable: bool,
        clock: (Instant, u64),
    ) -> DhcpService {
        let mut server = server;
        let generation = server.generation();
        let mut unwritten = BTreeSet::new();
        if durable {
            server.track_changes(true);
            unwritten.extend(server.leases().map(|l| u32::from(l.ip)));
        }
        DhcpService {
            server,
            gateway_mac,
            clock,
            durable,
            held: VecDeque::new(),
            requested: generation,
            written: generation,
            dirty_since: None,
            unwritten,
            held_dropped: 0,
            probes: HashMap::new(),
            probe_due: BTreeSet::new(),
            probe_out: VecDeque::new(),
            probe_counters: ProbeCounters::default(),
        }
    }

    pub fn config(&self) -> &DhcpConfig {
        self.server.config()
    }

    pub fn counters(&self) -> &DhcpCounters {
        self.server.counters()
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.server.leases()
    }

    /// The next change of the lease set (for the DNS).
    pub fn poll_event(&mut self) -> Option<dhcp_dns::dhcp::LeaseEvent> {
        self.server.poll_event()
    }

    pub fn server(&self) -> &DhcpServer {
        &self.server
    }

    /// Unix seconds at `now`.
    pub fn unix_time(&self, now: Instant) -> u64 {
        let (at, unix) = self.clock;
        match now.checked_duration_since(at) {
            Some(d) => unix + d.as_secs(),
            None => unix.saturating_sub(at.duration_since(now).as_secs()),
        }
    }

    /// When [`Self::handle_timeout`] is next due (a lease or an offer expires, a probe ends).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let (at, unix) = self.clock;
        let lease = self
            .server
            .poll_timeout()
            .map(|due| at + Duration::from_secs(due.saturating_sub(unix)));
        let flush = self.dirty_since.map(|t| t + LAZY_WRITE);
        let probe = self.probe_due.first().map(|(t, _)| *t);
        lease.into_iter().chain(flush).chain(probe).min()
    }

    /// Runs the server's timers, and sends the OFFERs whose probe nobody answered.
    pub fn handle_timeout(&mut self, now: Instant, ready: &mut VecDeque<Outgoing>) {
        let unix = self.unix_time(now);
        self.server.handle_timeout(unix);
        while let Some(&(at, ip)) = self.probe_due.first() {
            if at > now {
                break;
            }
            self.probe_due.pop_first();
            if self.probes.get(&ip).is_none_or(|p| p.deadline != at) {
                continue;
            }
            let Some(probe) = self.probes.remove(&ip) else {
                continue;
            };
            if self.server.offer_pending(unix, ip, probe.client) {
                self.probe_counters.clear += 1;
                ready.push_back(probe.offer);
            } else {
                self.probe_counters.stale += 1;
            }
        }
    }

    /// `mac` was seen using `ip` (as an ARP sender).
    pub fn note_address_in_use(&mut self, now: Instant, ip: Ipv4Addr, mac: MacAddr) {
        let unix = self.unix_time(now);
        self.server.note_address_in_use(unix, ip, mac.0);
    }

    /// An ARP packet from a guest: its sender address is in use, and it may answer a probe
    /// (RFC 5227 2.1.1: an ARP whose sender IP is the probed address, or a probe of another
    /// host, sender IP 0.0.0.0, whose target is). An answer from a MAC other than the
    /// client's marks the address in use and offers the next free one, probed in turn.
    /// Returns whether it answered a probe. Constant time, no allocation unless it did.
    pub fn handle_arp(
        &mut self,
        now: Instant,
        (sender_mac, sender_ip): (MacAddr, Ipv4Addr),
        target_ip: Ipv4Addr,
        ready: &mut VecDeque<Outgoing>,
    ) -> bool {
        if !sender_ip.is_unspecified() {
            self.note_address_in_use(now, sender_ip, sender_mac);
        }
        if self.probes.is_empty() {
            return false;
        }
        let claimed = if sender_ip.is_unspecified() {
            target_ip
        } else {
            sender_ip
        };
        if self
            .probes
            .get(&claimed)
            .is_none_or(|p| p.client == sender_mac.0)
        {
            return false;
        }
        let Some(probe) = self.probes.remove(&claimed) else {
            return false;
        };
        self.probe_counters.conflicts += 1;
        if sender_ip.is_unspecified() {
            // Another host probing for it means to take it.
            self.note_address_in_use(now, claimed, sender_mac);
        }
        let conflicts = probe.conflicts.saturating_add(1);
        if conflicts >= PROBE_TRIES {
            // Its offer went with the note above; the client asks again later.
            self.probe_counters.gave_up += 1;
            return true;
        }
        let unix = self.unix_time(now);
        let (src_mac, src_ip) = probe.src;
        if let Ok(Some(reply)) = self
            .server
            .handle_retry(unix, src_mac.0, src_ip, &probe.request)
        {
            let out = Outgoing {
                port: probe.ingress,
                vnet: VnetHdr::default(),
                frame: self.frame(&reply),
            };
            match reply.probe {
                Some(next) => {
                    let held = (probe.ingress, probe.src, probe.request);
                    self.hold_for_probe(now, next, held, out, conflicts);
                }
                None => ready.push_back(out),
            }
        }
        true
    }

    /// The next ARP probe to flood from the gateway to every switch port.
    pub fn poll_probe(&mut self) -> Option<Vec<u8>> {
        while let Some(ip) = self.probe_out.pop_front() {
            if self.probes.contains_key(&ip) {
                return Some(crate::wire::arp::probe_frame(self.gateway_mac, ip));
            }
        }
        None
    }

    /// Holds `offer` until `probe`'s address has gone unanswered for [`PROBE_WAIT`]. False
    /// when too many are held already (the offer is withdrawn and the DISCOVER dropped).
    fn hold_for_probe(
        &mut self,
        now: Instant,
        probe: Probe,
        (ingress, src, request): (PortId, (MacAddr, Ipv4Addr), Vec<u8>),
        offer: Outgoing,
        conflicts: u8,
    ) -> bool {
        if let Some(held) = self.probes.get_mut(&probe.ip) {
            // The client asked again while its address is probed: answer the latest DISCOVER
            // when the probe ends.
            held.client = probe.mac;
            held.ingress = ingress;
            held.src = src;
            held.request = request;
            held.offer = offer;
            self.probe_counters.merged += 1;
            return true;
        }
        if self.probes.len() >= MAX_PROBES {
            self.server.withdraw_offer(probe.ip);
            self.probe_counters.queue_full += 1;
            return false;
        }
        let deadline = now + PROBE_WAIT;
        self.probes.insert(
            probe.ip,
            PendingProbe {
                deadline,
                client: probe.mac,
                conflicts,
                ingress,
                src,
                request,
                offer,
            },
        );
        self.probe_due.insert((deadline, probe.ip));
        self.probe_out.push_back(probe.ip);
        self.probe_counters.sent += 1;
        true
    }

    /// Handles the DHCP `payload` that arrived on `ingress` from `src_mac`/`src_ip`. The reply
    /// joins `ready` at once, or once the lease file holds it. Returns false when the message
    /// was dropped (the server counts why).
    pub fn handle_request(
        &mut self,
        now: Instant,
        ingress: PortId,
        (src_mac, src_ip): (MacAddr, Ipv4Addr),
        payload: &[u8],
        ready: &mut VecDeque<Outgoing>,
    ) -> bool {
        let unix = self.unix_time(now);
        let reply = match self.server.handle_message(unix, src_mac.0, src_ip, payload) {
            Ok(Some(reply)) => reply,
            Ok(None) => return true,
            Err(_) => return false,
        };
        let out = Outgoing {
            port: ingress,
            vnet: VnetHdr::default(),
            frame: self.frame(&reply),
        };
        if let Some(probe) = reply.probe {
            let held = (ingress, (src_mac, src_ip), payload.to_vec());
            return self.hold_for_probe(now, probe, held, out, 0);
        }
        if reply.durable && self.durable && self.server.generation() > self.written {
            if self.held.len() >= MAX_HELD {
                self.held.pop_front();
                self.held_dropped += 1;
            }
            self.held.push_back((self.server.generation(), out));
        } else {
            ready.push_back(out);
        }
        true
    }

    /// The changes to write to the lease file and their generation, when a lease file is kept
    /// and the lease set changed since the last call: at once when a reply waits for it, else
    /// once the change is [`LAZY_WRITE`] old; and not while the last one handed out is still
    /// being written, so that the next write commits every change made meanwhile.
    pub fn poll_lease_write(&mut self, now: Instant) -> Option<LeaseUpdate> {
        if !self.durable {
            return None;
        }
        self.unwritten.extend(self.server.take_changed());
        let generation = self.server.generation();
        if generation <= self.requested || self.written < self.requested {
            return None;
        }
        let dirty_since = *self.dirty_since.get_or_insert(now);
        let waited_for = self.held.back().is_some_and(|(g, _)| *g > self.requested);
        if !waited_for && now < dirty_since + LAZY_WRITE {
            return None;
        }
        self.requested = generation;
        self.dirty_since = None;
        let changes = std::mem::take(&mut self.unwritten)
            .into_iter()
            .map(|ip| {
                let ip = Ipv4Addr::from(ip);
                (ip, self.server.lease(ip).map(format_lease_line))
            })
            .collect();
        Some(LeaseUpdate {
            generation,
            changes,
        })
    }

    /// The lease file of `generation` is on disk: replies it covers may leave.
    pub fn handle_lease_written(&mut self, generation: u64, ready: &mut VecDeque<Outgoing>) {
        self.written = self.written.max(generation);
        while self.held.front().is_some_and(|(g, _)| *g <= self.written) {
            if let Some((_, out)) = self.held.pop_front() {
                ready.push_back(out);
            }
        }
    }

    /// Ethernet + IPv4 + UDP around `reply`, from the gateway's port 67.
    fn frame(&self, reply: &Reply) -> Vec<u8> {
        let server = self.server.config().server;
        let (dst_mac, dst_ip, port) = match reply.to {
            Destination::Broadcast => (MacAddr::BROADCAST, Ipv4Addr::BROADCAST, CLIENT_PORT),
            Destination::Unicast { ip, mac, port } => (MacAddr(mac), ip, port),
        };
        udp_frame(
            (dst_mac, self.gateway_mac),
            (server, SERVER_PORT),
            (dst_ip, port),
            &reply.payload,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Config, Engine, Verdict};
    use crate::gateway::GatewayConfig;
    use dhcp_dns::dhcp::DhcpServer;

    const GW_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
    const GUEST: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 7]);
    const UNIX: u64 = 1_800_000_000;

    /// A BOOTREQUEST (RFC 2131 2) from GUEST with options 53 = `kind`, plus `extra` options.
    fn bootrequest(kind: u8, ciaddr: Ipv4Addr, extra: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; 236];
        m[0] = 1; // BOOTREQUEST
        m[1] = 1; // Ethernet
        m[2] = 6;
        m[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        m[12..16].copy_from_slice(&ciaddr.octets());
        m[28..34].copy_from_slice(&GUEST.0);
        m.extend_from_slice(&[99, 130, 83, 99, 53, 1, kind]);
        m.extend_from_slice(extra);
        m.push(255);
        m
    }

    fn engine(durable: bool) -> (Engine, PortId, PortId, Instant) {
        let mut e = Engine::new(&Config {
            gateway: Some(GatewayConfig {
                mac: GW_MAC,
                ip: Ipv4Addr::new(192, 168, 122, 1),
                prefix: 24,
            }),
            ..Config::default()
        });
        let (a, b) = (e.add_port("a"), e.add_port("b"));
        let now = Instant::now();
        let config = DhcpConfig::new(
            Ipv4Addr::new(192, 168, 122, 1),
            24,
            (
                Ipv4Addr::new(192, 168, 122, 10),
                Ipv4Addr::new(192, 168, 122, 20),
            ),
        );
        let server = DhcpServer::new(config, Vec::new(), UNIX);
        assert!(e.enable_dhcp(DhcpService::new(server, GW_MAC, durable, (now, UNIX))));
        (e, a, b, now)
    }

    fn from_guest(dst: (MacAddr, Ipv4Addr), src_ip: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        udp_frame(
            (dst.0, GUEST),
            (src_ip, CLIENT_PORT),
            (dst.1, SERVER_PORT),
            payload,
        )
    }

    /// The reply's DHCP message type (option 53) and yiaddr.
    fn reply_of(out: &Outgoing) -> (u8, Ipv4Addr) {
        let dhcp = &out.frame[42..];
        let yiaddr = Ipv4Addr::new(dhcp[16], dhcp[17], dhcp[18], dhcp[19]);
        assert_eq!(&dhcp[236..240], &[99, 130, 83, 99]);
        assert_eq!(dhcp[240], 53, "option 53 first");
        (dhcp[242], yiaddr)
    }

    fn discover_from(e: &mut Engine, now: Instant, port: PortId) -> Verdict {
        let mut f = from_guest(
            (MacAddr::BROADCAST, Ipv4Addr::BROADCAST),
            Ipv4Addr::UNSPECIFIED,
            &bootrequest(1, Ipv4Addr::UNSPECIFIED, &[]),
        );
        e.handle_frame(now, port, &VnetHdr::default(), &mut f)
    }

    /// The targets of the ARP probes queued (one frame per switch port each), checking the
    /// RFC 5227 2.1.1 format: broadcast from the gateway's MAC, a request with sender IP
    /// 0.0.0.0 and target hardware address zero.
    fn probes_sent(e: &mut Engine, ports: &[PortId]) -> Vec<Ipv4Addr> {
        let mut targets = Vec::new();
        let mut seen_ports = Vec::new();
        while let Some(out) = e.poll_transmit() {
            let f = &out.frame;
            assert_eq!(&f[12..14], &[0x08, 0x06], "only probes: {f:?}");
            assert_eq!(&f[0..6], &MacAddr::BROADCAST.0);
            assert_eq!(&f[6..12], &GW_MAC.0);
            let arp = crate::wire::arp::ArpPacket::new_checked(&f[14..]).unwrap();
            assert_eq!(arp.operation(), crate::wire::arp::OP_REQUEST);
            assert_eq!(arp.sender_mac(), GW_MAC);
            assert_eq!(arp.sender_ip(), Ipv4Addr::UNSPECIFIED);
            assert_eq!(&f[14 + 18..14 + 24], &[0; 6]);
            seen_ports.push(out.port);
            if !targets.contains(&arp.target_ip()) {
                targets.push(arp.target_ip());
            }
        }
        assert_eq!(seen_ports.len(), ports.len() * targets.len(), "every port");
        for p in ports {
            assert!(seen_ports.contains(p));
        }
        targets
    }

    /// An ARP reply from `mac` for `ip` to the gateway, as Linux answers an RFC 5227 probe
    /// (target IP 0.0.0.0, unicast to the prober).
    fn probe_answer(mac: MacAddr, ip: Ipv4Addr) -> Vec<u8> {
        let mut f = crate::wire::arp::request_frame(mac, ip, Ipv4Addr::UNSPECIFIED);
        f[0..6].copy_from_slice(&GW_MAC.0);
        f[14 + 6..14 + 8].copy_from_slice(&crate::wire::arp::OP_REPLY.to_be_bytes());
        f[14 + 18..14 + 24].copy_from_slice(&GW_MAC.0);
        f
    }

    // RFC 2131 4.1: a DISCOVER broadcast by a client without an address gets its OFFER from
    // the gateway on the port it came in; the broadcast itself is still flooded, as virbr0
    // would. RFC 2131 3.1 step 2 / 4.4.1: the address is new to the client, so it is probed
    // first (RFC 5227 2.1.1 probe on every port) and offered once nobody answered.
    #[test]
    fn a_discover_is_answered_from_the_gateway_and_still_flooded() {
        let (mut e, a, b, now) = engine(false);
        assert_eq!(discover_from(&mut e, now, a), Verdict::Flood);
        assert_eq!(
            probes_sent(&mut e, &[a, b]),
            [Ipv4Addr::new(192, 168, 122, 10)]
        );
        let due = e.poll_timeout().expect("the probe's end");
        assert_eq!(due, now + PROBE_WAIT);
        e.handle_timeout(due - Duration::from_millis(1));
        assert!(e.poll_transmit().is_none(), "held while probing");
        e.handle_timeout(due);
        let out = e.poll_transmit().expect("an offer");
        assert_eq!(out.port, a);
        assert_eq!(&out.frame[6..12], &GW_MAC.0);
        assert_eq!(&out.frame[26..30], &[192, 168, 122, 1]);
        assert_eq!(reply_of(&out), (2, Ipv4Addr::new(192, 168, 122, 10)));
        let ip = &out.frame[14..];
        assert_eq!(crate::wire::checksum::checksum(&ip[..20]), 0);
        assert!(e.poll_transmit().is_none());
        let probes = e.stats().engine.dhcp_probes;
        assert_eq!((probes.sent, probes.clear, probes.conflicts), (1, 1, 0));
    }

    // RFC 5227 2.1.1: an answer whose sender IP is the probed address means another host has
    // it. It is marked in use (never offered), the next address is probed and offered.
    #[test]
    fn an_answered_probe_offers_the_next_address() {
        let (mut e, a, b, now) = engine(false);
        let squatter = MacAddr([0x52, 0x54, 0, 0, 0, 8]);
        let first = Ipv4Addr::new(192, 168, 122, 10);
        discover_from(&mut e, now, a);
        assert_eq!(probes_sent(&mut e, &[a, b]), [first]);
        let t = now + Duration::from_millis(2);
        let mut answer = probe_answer(squatter, first);
        assert_eq!(
            e.handle_frame(t, b, &VnetHdr::default(), &mut answer),
            Verdict::Consumed
        );
        assert_eq!(
            probes_sent(&mut e, &[a, b]),
            [Ipv4Addr::new(192, 168, 122, 11)]
        );
        e.handle_timeout(t + PROBE_WAIT);
        let offer = e.poll_transmit().expect("an offer");
        assert_eq!(reply_of(&offer), (2, Ipv4Addr::new(192, 168, 122, 11)));
        assert_eq!(offer.port, a);
        let s = e.stats().engine;
        assert_eq!((s.dhcp_probes.sent, s.dhcp_probes.conflicts), (2, 1));
        assert_eq!(s.dhcp_probes.clear, 1);
        assert_eq!(s.dhcp.in_use_noted, 1);
        assert_eq!(s.dhcp.discovers, 1, "the retry is not another DISCOVER");

        // The squatter's address is never offered: not to the next client either.
        let mut f = from_guest(
            (MacAddr::BROADCAST, Ipv4Addr::BROADCAST),
            Ipv4Addr::UNSPECIFIED,
            &bootrequest(1, Ipv4Addr::UNSPECIFIED, &[]),
        );
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 9]);
        f[42 + 28..42 + 34].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 9]);
        e.handle_frame(t, a, &VnetHdr::default(), &mut f);
        assert_eq!(
            probes_sent(&mut e, &[a, b]),
            [Ipv4Addr::new(192, 168, 122, 12)]
        );
    }

    // RFC 5227 2.1.1: another host's probe (sender IP 0.0.0.0) for the address being probed
    // means it is about to take it: a conflict too. The client's own ARP is not one.
    #[test]
    fn another_hosts_probe_is_a_conflict_and_the_clients_own_arp_is_not() {
        let (mut e, a, b, now) = engine(false);
        let first = Ipv4Addr::new(192, 168, 122, 10);
        discover_from(&mut e, now, a);
        probes_sent(&mut e, &[a, b]);
        let mut own = crate::wire::arp::probe_frame(GUEST, first);
        assert_eq!(
            e.handle_frame(now, a, &VnetHdr::default(), &mut own),
            Verdict::Flood
        );
        assert_eq!(e.stats().engine.dhcp_probes.conflicts, 0);
        let other = MacAddr([0x52, 0x54, 0, 0, 0, 8]);
        let mut theirs = crate::wire::arp::probe_frame(other, first);
        assert_eq!(
            e.handle_frame(now, b, &VnetHdr::default(), &mut theirs),
            Verdict::Flood,
            "a broadcast probe is still flooded"
        );
        assert_eq!(e.stats().engine.dhcp_probes.conflicts, 1);
        assert_eq!(
            probes_sent(&mut e, &[a, b]),
            [Ipv4Addr::new(192, 168, 122, 11)]
        );
    }

    // The number of addresses tried for one DISCOVER is bounded: after PROBE_TRIES conflicts
    // nothing is offered (the client asks again later), and every conflict stays marked.
    #[test]
    fn probing_gives_up_after_bounded_tries() {
        let (mut e, a, b, now) = engine(false);
        discover_from(&mut e, now, a);
        for n in 0..PROBE_TRIES {
            let target = probes_sent(&mut e, &[a, b]);
            assert_eq!(target, [Ipv4Addr::new(192, 168, 122, 10 + n)]);
            let mut answer = probe_answer(MacAddr([0x52, 0x54, 0, 0, 1, n]), target[0]);
            e.handle_frame(now, b, &VnetHdr::default(), &mut answer);
        }
        assert!(e.poll_transmit().is_none(), "no fourth probe");
        e.handle_timeout(now + PROBE_WAIT * 2);
        assert!(e.poll_transmit().is_none(), "no offer");
        let s = e.stats().engine;
        assert_eq!(s.dhcp_probes.gave_up, 1);
        assert_eq!(s.dhcp.in_use_noted, u64::from(PROBE_TRIES));
        // Asked again, the client is offered the first address nobody answered for.
        discover_from(&mut e, now + PROBE_WAIT * 2, a);
        assert_eq!(
            probes_sent(&mut e, &[a, b]),
            [Ipv4Addr::new(192, 168, 122, 10 + PROBE_TRIES)]
        );
    }

    // A client that holds a lease and asks again (a reboot) is offered its own address at
    // once: nobody else may use it (RFC 2131 4.3.1 existing binding), so there is no probe.
    #[test]
    fn a_clients_own_lease_is_offered_without_a_probe() {
        let (mut e, a, _b, now) = engine(false);
        let request = bootrequest(3, Ipv4Addr::UNSPECIFIED, &[50, 4, 192, 168, 122, 10]);
        let mut f = from_guest(
            (MacAddr::BROADCAST, Ipv4Addr::BROADCAST),
            Ipv4Addr::UNSPECIFIED,
            &request,
        );
        e.handle_frame(now, a, &VnetHdr::default(), &mut f);
        assert_eq!(reply_of(&e.poll_transmit().expect("an ACK")).0, 5);
        discover_from(&mut e, now, a);
        let offer = e.poll_transmit().expect("an offer at once");
        assert_eq!(reply_of(&offer), (2, Ipv4Addr::new(192, 168, 122, 10)));
        assert_eq!(e.stats().engine.dhcp_probes.sent, 0);
    }

    // A DISCOVER repeated while its address is probed is answered by the held OFFER (the
    // latest one), with no second probe.
    #[test]
    fn a_repeated_discover_joins_its_probe() {
        let (mut e, a, b, now) = engine(false);
        discover_from(&mut e, now, a);
        probes_sent(&mut e, &[a, b]);
        discover_from(&mut e, now + Duration::from_millis(10), a);
        assert!(e.poll_transmit().is_none(), "no second probe");
        e.handle_timeout(now + PROBE_WAIT);
        assert_eq!(
            reply_of(&e.poll_transmit().expect("one offer")),
            (2, Ipv4Addr::new(192, 168, 122, 10))
        );
        assert!(e.poll_transmit().is_none());
        let p = e.stats().engine.dhcp_probes;
        assert_eq!((p.sent, p.merged, p.clear), (1, 1, 1));
    }

    // Held offers are bounded: past MAX_PROBES, a DISCOVER that needs a probe is dropped and
    // counted, and its address is not kept from others.
    #[test]
    fn held_offers_are_bounded() {
        let mut e = Engine::new(&Config {
            gateway: Some(GatewayConfig {
                mac: GW_MAC,
                ip: Ipv4Addr::new(10, 0, 0, 1),
                prefix: 16,
            }),
            ..Config::default()
        });
        let a = e.add_port("a");
        let now = Instant::now();
        let config = DhcpConfig::new(
            Ipv4Addr::new(10, 0, 0, 1),
            16,
            (Ipv4Addr::new(10, 0, 1, 0), Ipv4Addr::new(10, 0, 255, 250)),
        );
        let server = DhcpServer::new(config, Vec::new(), UNIX);
        e.enable_dhcp(DhcpService::new(server, GW_MAC, false, (now, UNIX)));
        let discover = |e: &mut Engine, n: u16| {
            let mac = [0x02, 0, 0, 0, (n >> 8) as u8, n as u8];
            let mut m = bootrequest(1, Ipv4Addr::UNSPECIFIED, &[]);
            m[28..34].copy_from_slice(&mac);
            let mut f = udp_frame(
                (MacAddr::BROADCAST, MacAddr(mac)),
                (Ipv4Addr::UNSPECIFIED, CLIENT_PORT),
                (Ipv4Addr::BROADCAST, SERVER_PORT),
                &m,
            );
            e.handle_frame(now, a, &VnetHdr::default(), &mut f);
        };
        let count = u16::try_from(MAX_PROBES).unwrap();
        for n in 0..=count {
            discover(&mut e, n);
        }
        let s = e.stats().engine;
        assert_eq!(s.dhcp_probes.sent, MAX_PROBES as u64);
        assert_eq!(s.dhcp_probes.queue_full, 1);
        let mut sent = 0;
        while e.poll_transmit().is_some() {
            sent += 1;
        }
        assert_eq!(sent, MAX_PROBES, "one probe each, no offer yet");
        e.handle_timeout(now + PROBE_WAIT);
        let mut offers = Vec::new();
        while let Some(out) = e.poll_transmit() {
            offers.push(reply_of(&out).1);
        }
        assert_eq!(offers.len(), MAX_PROBES);
        // The dropped client's address was not held: the next client gets it.
        discover(&mut e, count + 1);
        let next = e.poll_transmit().expect("a probe");
        let arp = crate::wire::arp::ArpPacket::new_checked(&next.frame[14..]).unwrap();
        assert!(!offers.contains(&arp.target_ip()));
        assert_eq!(e.stats().engine.dhcp_probes.sent, MAX_PROBES as u64 + 1);
    }

    // A lease is on disk before its ACK leaves: the ACK waits for the lease file.
    #[test]
    fn an_ack_waits_for_the_lease_file() {
        let (mut e, a, _b, now) = engine(true);
        let ip = Ipv4Addr::new(192, 168, 122, 10);
        let mut request = bootrequest(3, Ipv4Addr::UNSPECIFIED, &[50, 4, 192, 168, 122, 10]);
        let mut f = from_guest(
            (MacAddr::BROADCAST, Ipv4Addr::BROADCAST),
            Ipv4Addr::UNSPECIFIED,
            &request,
        );
        assert_eq!(
            e.handle_frame(now, a, &VnetHdr::default(), &mut f),
            Verdict::Flood
        );
        assert!(e.poll_transmit().is_none(), "held until written");
        let mut file = LeaseLines::default();
        let update = e.poll_lease_write(now).expect("a lease file to write");
        let generation = update.generation;
        file.apply(update);
        let contents = file.render();
        assert!(contents.contains("192.168.122.10"), "{contents}");
        let whole = dhcp_dns::dhcp::format_lease_file(e.dhcp().unwrap().leases());
        assert_eq!(contents, whole, "kept line by line, the same file");
        assert!(e.poll_lease_write(now).is_none(), "asked once");
        e.handle_lease_written(generation);
        assert_eq!(reply_of(&e.poll_transmit().expect("the ACK")), (5, ip));

        // RFC 2131 4.3.2 RENEWING: unicast to the server, from the leased address.
        request = bootrequest(3, ip, &[]);
        let mut f = from_guest((GW_MAC, Ipv4Addr::new(192, 168, 122, 1)), ip, &request);
        let later = now + Duration::from_secs(10);
        assert_eq!(
            e.handle_frame(later, a, &VnetHdr::default(), &mut f),
            Verdict::Consumed
        );
        let Some(update) = e.poll_lease_write(later) else {
            panic!("a renewal moves the expiry");
        };
        let generation = update.generation;
        file.apply(update);
        let whole = dhcp_dns::dhcp::format_lease_file(e.dhcp().unwrap().leases());
        assert_eq!(file.render(), whole, "the renewal's line replaced");
        e.handle_lease_written(generation);
        let out = e.poll_transmit().expect("the renewal's ACK");
        assert_eq!(reply_of(&out), (5, ip));
        assert_eq!(&out.frame[0..6], &GUEST.0, "unicast to the client");
        assert_eq!(e.stats().dhcp_leases, 1);
    }

    // A RELEASE gets no reply (RFC 2131 4.4.6), so nothing waits for its write: it is
    // written within LAZY_WRITE, or with the next acknowledgement.
    #[test]
    fn a_release_is_written_lazily() {
        let (mut e, a, _b, now) = engine(true);
        let ip = Ipv4Addr::new(192, 168, 122, 10);
        let request = bootrequest(3, Ipv4Addr::UNSPECIFIED, &[50, 4, 192, 168, 122, 10]);
        let mut f = from_guest(
            (MacAddr::BROADCAST, Ipv4Addr::BROADCAST),
            Ipv4Addr::UNSPECIFIED,
            &request,
        );
        e.handle_frame(now, a, &VnetHdr::default(), &mut f);
        let mut file = LeaseLines::default();
        let update = e.poll_lease_write(now).expect("the ACK waits for this");
        let generation = update.generation;
        file.apply(update);
        e.handle_lease_written(generation);
        assert!(e.poll_transmit().is_some());
        let release = bootrequest(7, ip, &[54, 4, 192, 168, 122, 1]);
        let mut f = from_guest((GW_MAC, Ipv4Addr::new(192, 168, 122, 1)), ip, &release);
        e.handle_frame(now, a, &VnetHdr::default(), &mut f);
        assert_eq!(e.stats().dhcp_leases, 0);
        assert!(e.poll_lease_write(now).is_none(), "nothing waits for it");
        let due = e.poll_timeout().expect("a flush is due");
        assert!(due <= now + LAZY_WRITE);
        file.apply(e.poll_lease_write(due).expect("written by then"));
        let contents = file.render();
        assert!(!contents.contains("192.168.122.10"), "{contents}");
        assert_eq!(contents, "", "the released lease's line is gone");
    }

    // Garbage to port 67 of the gateway is dropped with a reason, never a panic.
    #[test]
    fn malformed_requests_to_the_gateway_are_dropped_and_counted() {
        let (mut e, a, _b, now) = engine(false);
        let mut f = from_guest(
            (GW_MAC, Ipv4Addr::new(192, 168, 122, 1)),
            Ipv4Addr::new(192, 168, 122, 9),
            &[1, 1, 6],
        );
        assert_eq!(
            e.handle_frame(now, a, &VnetHdr::default(), &mut f),
            Verdict::Drop(crate::port::DropReason::DhcpRejected)
        );
        assert_eq!(e.stats().engine.dhcp.malformed, 1);
        assert!(e.poll_transmit().is_none());
    }

    // An address a guest announces by ARP is in use: it is not offered to another client.
    #[test]
    fn an_address_seen_in_arp_is_not_offered() {
        let (mut e, a, b, now) = engine(false);
        let other = MacAddr([0x52, 0x54, 0, 0, 0, 8]);
        let mut arp = crate::wire::arp::request_frame(
            other,
            Ipv4Addr::new(192, 168, 122, 10),
            Ipv4Addr::new(192, 168, 122, 1),
        );
        e.handle_frame(now, b, &VnetHdr::default(), &mut arp);
        while e.poll_transmit().is_some() {}
        let mut f = from_guest(
            (MacAddr::BROADCAST, Ipv4Addr::BROADCAST),
            Ipv4Addr::UNSPECIFIED,
            &bootrequest(1, Ipv4Addr::UNSPECIFIED, &[]),
        );
        e.handle_frame(now, a, &VnetHdr::default(), &mut f);
        assert_eq!(
            probes_sent(&mut e, &[a, b]),
            [Ipv4Addr::new(192, 168, 122, 11)]
        );
        e.handle_timeout(now + PROBE_WAIT);
        assert_eq!(
            reply_of(&e.poll_transmit().expect("an offer")).1,
            Ipv4Addr::new(192, 168, 122, 11)
        );
    }
}
