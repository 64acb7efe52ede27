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

use crate::engine::Outgoing;
use crate::gateway::udp_frame;
use crate::port::PortId;
use crate::wire::{MacAddr, VnetHdr};
use dhcp_dns::dhcp::{
    Destination, DhcpConfig, DhcpCounters, DhcpServer, Lease, Reply, format_lease_file,
};
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
/// Replies waiting for the lease file; beyond this, the oldest are dropped (the client
/// retries), so a stuck disk cannot grow memory without bound.
const MAX_HELD: usize = 1024;
/// How long a lease change that no reply waits for may stay unwritten.
pub const LAZY_WRITE: Duration = Duration::from_secs(1);

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
    pub held_dropped: u64,
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
        let generation = server.generation();
        DhcpService {
            server,
            gateway_mac,
            clock,
            durable,
            held: VecDeque::new(),
            requested: generation,
            written: generation,
            dirty_since: None,
            held_dropped: 0,
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

    /// When [`Self::handle_timeout`] is next due (a lease or an offer expires).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let (at, unix) = self.clock;
        let lease = self
            .server
            .poll_timeout()
            .map(|due| at + Duration::from_secs(due.saturating_sub(unix)));
        let flush = self.dirty_since.map(|t| t + LAZY_WRITE);
        lease.into_iter().chain(flush).min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let unix = self.unix_time(now);
        self.server.handle_timeout(unix);
    }

    /// `mac` was seen using `ip` (as an ARP sender).
    pub fn note_address_in_use(&mut self, now: Instant, ip: Ipv4Addr, mac: MacAddr) {
        let unix = self.unix_time(now);
        self.server.note_address_in_use(unix, ip, mac.0);
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

    /// The lease file's new contents and their generation, when a lease file is kept and the
    /// lease set changed since the last call: at once when a reply waits for it, else once the
    /// change is [`LAZY_WRITE`] old.
    pub fn poll_lease_write(&mut self, now: Instant) -> Option<(u64, String)> {
        let generation = self.server.generation();
        if !self.durable || generation <= self.requested {
            return None;
        }
        let dirty_since = *self.dirty_since.get_or_insert(now);
        let waited_for = self.held.back().is_some_and(|(g, _)| *g > self.requested);
        if !waited_for && now < dirty_since + LAZY_WRITE {
            return None;
        }
        self.requested = generation;
        self.dirty_since = None;
        Some((generation, format_lease_file(self.server.leases())))
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

    // RFC 2131 4.1: a DISCOVER broadcast by a client without an address gets its OFFER from
    // the gateway on the port it came in; the broadcast itself is still flooded, as virbr0
    // would.
    #[test]
    fn a_discover_is_answered_from_the_gateway_and_still_flooded() {
        let (mut e, a, _b, now) = engine(false);
        let mut f = from_guest(
            (MacAddr::BROADCAST, Ipv4Addr::BROADCAST),
            Ipv4Addr::UNSPECIFIED,
            &bootrequest(1, Ipv4Addr::UNSPECIFIED, &[]),
        );
        assert_eq!(
            e.handle_frame(now, a, &VnetHdr::default(), &mut f),
            Verdict::Flood
        );
        let out = e.poll_transmit().expect("an offer");
        assert_eq!(out.port, a);
        assert_eq!(&out.frame[6..12], &GW_MAC.0);
        assert_eq!(&out.frame[26..30], &[192, 168, 122, 1]);
        assert_eq!(reply_of(&out), (2, Ipv4Addr::new(192, 168, 122, 10)));
        let ip = &out.frame[14..];
        assert_eq!(crate::wire::checksum::checksum(&ip[..20]), 0);
        assert!(e.poll_transmit().is_none());
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
        let (generation, contents) = e.poll_lease_write(now).expect("a lease file to write");
        assert!(contents.contains("192.168.122.10"), "{contents}");
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
        let Some((generation, _)) = e.poll_lease_write(later) else {
            panic!("a renewal moves the expiry");
        };
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
        let (generation, _) = e.poll_lease_write(now).expect("the ACK waits for this");
        e.handle_lease_written(generation);
        assert!(e.poll_transmit().is_some());
        let release = bootrequest(7, ip, &[54, 4, 192, 168, 122, 1]);
        let mut f = from_guest((GW_MAC, Ipv4Addr::new(192, 168, 122, 1)), ip, &release);
        e.handle_frame(now, a, &VnetHdr::default(), &mut f);
        assert_eq!(e.stats().dhcp_leases, 0);
        assert!(e.poll_lease_write(now).is_none(), "nothing waits for it");
        let due = e.poll_timeout().expect("a flush is due");
        assert!(due <= now + LAZY_WRITE);
        let (_, contents) = e.poll_lease_write(due).expect("written by then");
        assert!(!contents.contains("192.168.122.10"), "{contents}");
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
            reply_of(&e.poll_transmit().expect("an offer")).1,
            Ipv4Addr::new(192, 168, 122, 11)
        );
    }
}
