//! The DHCPv4 server of the virtual gateway.
//!
//! Guests that boot on libvirt's default network expect dnsmasq: an address from
//! `dhcp-range`, the same address again after a reboot or an expired lease, static hosts from
//! `<dhcp><host/>` that always win, and a lease file that `virsh net-dhcp-leases` reads. This
//! module reproduces those behaviours (RFC 2131/2132 as dnsmasq reads them) without sockets or
//! clocks, so the datapath thread can call it inline with a frame's UDP payload and `now`, and
//! the tests can replay whole client conversations.
//!
//! Where RFC 2131 leaves a choice, dnsmasq's is taken, because that is what guests on libvirt
//! networks have been tested against: an INIT-REBOOT request for a free address in the range is
//! acknowledged instead of ignored (4.3.2 would have us stay silent), a renewing client is
//! acknowledged for any address it may have, and options 3, 6, 15 and 28 are sent only when
//! the client's parameter request list asks for them (or it sent none).
//!
//! The work per message does not grow with the number of leases: a client's own leases and
//! offers are found through indexes by client identifier and by MAC, and a new
//! address is the first of the range nobody holds, found from a cursor below which every
//! address is taken (amortised constant time while the pool fills in order). A burst of new
//! clients (perfdhcp, a rack of VMs booting) is served at the same cost per message whether
//! the table holds ten leases or sixty thousand.
//! [`DhcpServer::note_address_in_use`], which the datapath may call for every guest frame, is
//! constant-time and does not allocate in the common case.

mod lease;
#[cfg(test)]
mod tests;
mod wire;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, MessageType, OptionCode};

pub use lease::{
    Lease, LeaseRow, format_lease_file, format_lease_line, format_lease_table, format_mac,
    format_utc, parse_lease_file, parse_mac,
};

/// UDP port the server listens on.
pub const SERVER_PORT: u16 = 67;
/// UDP port clients listen on.
pub const CLIENT_PORT: u16 = 68;
/// Default lease time, as libvirt's dnsmasq configuration uses.
pub const DEFAULT_LEASE_SECS: u32 = 3600;
/// How long an offered address stays held for the client it was offered to.
pub const OFFER_HOLD_SECS: u64 = 60;
/// How long a declined (RFC 2131 4.3.3) or seen-in-use address is kept out of the pool.
pub const QUARANTINE_SECS: u64 = 600;
/// How many clients' last addresses are remembered after their leases end.
const HISTORY_MAX: usize = 4096;

/// A `<dhcp><host mac= name= ip=/>` reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReservation {
    pub mac: [u8; 6],
    /// Host name given to the client instead of the one it sends.
    pub name: Option<String>,
    /// Address always given to this MAC and never to another; `None` reserves only the name.
    pub ip: Option<Ipv4Addr>,
}

/// What the server hands out, from libvirt's `<ip>` element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpConfig {
    /// The gateway's address: option 54 server identifier and the default router and DNS.
    pub server: Ipv4Addr,
    /// Prefix length of the network (option 1).
    pub prefix: u8,
    /// First and last address handed out dynamically (inclusive).
    pub range: (Ipv4Addr, Ipv4Addr),
    /// Lease time in seconds; `None` is an infinite lease (libvirt's `<lease expiry='0'/>`).
    pub lease_time: Option<u32>,
    pub hosts: Vec<HostReservation>,
    /// Option 15.
    pub domain: Option<String>,
    /// Option 3.
    pub router: Option<Ipv4Addr>,
    /// Option 6.
    pub dns: Option<Ipv4Addr>,
    /// Most leases held at once (dnsmasq's `dhcp-lease-max`).
    pub lease_max: usize,
    /// Most leases and pending offers one MAC may hold under different client identifiers
    /// (`<sy:guard leases-per-mac>`), so a guest cannot drain the pool by inventing
    /// identifiers; with clean-traffic, a port's MAC is fixed, so this is a cap per port.
    pub leases_per_mac: usize,
}

impl DhcpConfig {
    /// A configuration with dnsmasq's defaults as libvirt writes them: one-hour leases, the
    /// server as router and DNS, `lease_max` the size of the range.
    pub fn new(server: Ipv4Addr, prefix: u8, range: (Ipv4Addr, Ipv4Addr)) -> Self {
        let (start, end) = (u32::from(range.0), u32::from(range.1));
        let size = if end >= start {
            usize::try_from(end - start).map_or(usize::MAX, |n| n.saturating_add(1))
        } else {
            0
        };
        DhcpConfig {
            server,
            prefix,
            range,
            lease_time: Some(DEFAULT_LEASE_SECS),
            hosts: Vec::new(),
            domain: None,
            router: Some(server),
            dns: Some(server),
            lease_max: size,
            leases_per_mac: usize::MAX,
        }
    }

    /// Checks the configuration the way libvirt would reject it. [`DhcpServer::new`] copes with
    /// an invalid one (it clamps the range to the subnet and skips bad reservations), but the
    /// control plane should report these instead.
    pub fn validate(&self) -> Result<(), DhcpConfigError> {
        if self.prefix > 30 {
            return Err(DhcpConfigError::Prefix(self.prefix));
        }
        let net = Subnet::new(self.server, self.prefix);
        if !net.is_host(u32::from(self.server)) {
            return Err(DhcpConfigError::Server(self.server));
        }
        let (start, end) = self.range;
        if !net.is_host(u32::from(start)) || !net.is_host(u32::from(end)) {
            return Err(DhcpConfigError::RangeOutsideSubnet(start, end));
        }
        if u32::from(start) > u32::from(end) {
            return Err(DhcpConfigError::RangeReversed(start, end));
        }
        for (i, host) in self.hosts.iter().enumerate() {
            if let Some(ip) = host.ip
                && (!net.is_host(u32::from(ip)) || ip == self.server)
            {
                return Err(DhcpConfigError::HostOutsideSubnet(ip));
            }
            for other in &self.hosts[..i] {
                if other.mac == host.mac {
                    return Err(DhcpConfigError::DuplicateMac(format_mac(&host.mac)));
                }
                if let Some(ip) = host.ip
                    && other.ip == Some(ip)
                {
                    return Err(DhcpConfigError::DuplicateIp(ip));
                }
            }
        }
        Ok(())
    }
}

/// Why a [`DhcpConfig`] cannot be served as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DhcpConfigError {
    #[error("prefix /{0} leaves no addresses to hand out")]
    Prefix(u8),
    #[error("server address {0} is not a host address of its subnet")]
    Server(Ipv4Addr),
    #[error("DHCP range {0} - {1} is not inside the network")]
    RangeOutsideSubnet(Ipv4Addr, Ipv4Addr),
    #[error("DHCP range start {0} is after its end {1}")]
    RangeReversed(Ipv4Addr, Ipv4Addr),
    #[error("DHCP host address {0} is not a usable address of the network")]
    HostOutsideSubnet(Ipv4Addr),
    #[error("two DHCP hosts with MAC {0}")]
    DuplicateMac(String),
    #[error("two DHCP hosts with address {0}")]
    DuplicateIp(Ipv4Addr),
}

/// A reply to transmit from the server's port 67.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The encoded DHCP message (at least 300 bytes).
    pub payload: Vec<u8>,
    pub to: Destination,
    /// The lease set changed: write the lease file before sending, so an acknowledged lease
    /// survives a crash.
    pub durable: bool,
    /// An OFFER of an address new to its client: check that nobody answers for it before
    /// sending (RFC 2131 3.1 step 2 and 4.4.1: the server SHOULD probe before allocating).
    /// `None` for every other reply, and for an OFFER of the client's own lease or reservation.
    pub probe: Option<Probe>,
}

/// What an OFFER that waits for a conflict check (see [`Reply::probe`]) offers, and to whom.
///
/// The caller probes `ip` (the datapath sends an RFC 5227 ARP probe) and holds the reply a
/// short while. If another MAC answers, it reports the answer with
/// [`DhcpServer::note_address_in_use`] (which withdraws the offer) and asks again with
/// [`DhcpServer::handle_retry`]; otherwise it sends the reply if
/// [`DhcpServer::offer_pending`] still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub ip: Ipv4Addr,
    /// The client's hardware address (chaddr); an answer from it is no conflict.
    pub mac: [u8; 6],
}

/// Where a reply goes (RFC 2131 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// 255.255.255.255:68 from ff:ff:ff:ff:ff:ff.
    Broadcast,
    Unicast {
        ip: Ipv4Addr,
        mac: [u8; 6],
        port: u16,
    },
}

/// A change of the active lease set, for the DNS (names follow leases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A lease was created, or an existing one changed address, owner or host name.
    Added(Lease),
    /// A lease ended: released, declined, expired, moved or revoked by a reservation.
    Removed(Lease),
}

/// Why a message got no reply. Every one is also counted in [`DhcpCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DhcpDrop {
    #[error("malformed DHCP message")]
    Malformed,
    #[error("not a BOOTREQUEST")]
    NotBootRequest,
    #[error("hardware type is not Ethernet (htype 1, hlen 6)")]
    BadHardware,
    #[error("no DHCP message type (option 53)")]
    NoMessageType,
    #[error("unsupported DHCP message type {0}")]
    UnknownType(u8),
    #[error("message meant for another server or network")]
    NotForUs,
    #[error("no address left to offer")]
    PoolExhausted,
    #[error("the client's MAC holds as many leases as it may")]
    MacLeaseCap,
    #[error("message names no address")]
    NoAddress,
    #[error("release or decline of a lease the client does not hold")]
    UnknownLease,
    #[error("reply could not be encoded")]
    Encode,
}

/// What the server did, for `switchyard stats`. One counter per drop and NAK reason.
#[derive(Default, Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DhcpCounters {
    pub discovers: u64,
    /// OFFERs made. One that waits for a probe ([`Reply::probe`]) is sent only if nobody
    /// answers: the datapath counts what its probes found.
    pub offers: u64,
    pub requests: u64,
    pub acks: u64,
    pub naks: u64,
    pub releases: u64,
    pub declines: u64,
    pub informs: u64,
    // drops
    pub malformed: u64,
    pub not_boot_request: u64,
    pub bad_hardware: u64,
    pub no_message_type: u64,
    pub unknown_type: u64,
    pub not_for_us: u64,
    pub pool_exhausted: u64,
    pub mac_lease_cap: u64,
    pub no_address: u64,
    pub unknown_lease: u64,
    pub encode_errors: u64,
    // NAK reasons
    pub nak_not_in_subnet: u64,
    pub nak_not_in_range: u64,
    pub nak_in_use: u64,
    pub nak_reserved: u64,
    pub nak_static_elsewhere: u64,
    pub nak_lease_max: u64,
    pub nak_mac_lease_cap: u64,
    // lease life
    pub leases_expired: u64,
    pub leases_revoked: u64,
    pub offers_expired: u64,
    pub in_use_noted: u64,
}

/// Why a requested address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NakReason {
    NotInSubnet,
    NotInRange,
    InUse,
    Reserved,
    StaticElsewhere,
    LeaseMax,
    MacLeaseCap,
}

impl NakReason {
    fn message(self) -> &'static str {
        match self {
            NakReason::NotInSubnet => "wrong network",
            NakReason::NotInRange => "address not available",
            NakReason::InUse => "address in use",
            NakReason::Reserved => "address reserved",
            NakReason::StaticElsewhere => "static lease available",
            NakReason::LeaseMax => "no leases left",
            NakReason::MacLeaseCap => "too many leases for this hardware address",
        }
    }
}

/// The network, as integers.
#[derive(Debug, Clone, Copy)]
struct Subnet {
    network: u32,
    mask: u32,
}

impl Subnet {
    fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        let prefix = prefix.min(32);
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        Subnet {
            network: u32::from(addr) & mask,
            mask,
        }
    }
    fn contains(&self, ip: u32) -> bool {
        ip & self.mask == self.network
    }
    fn broadcast(&self) -> u32 {
        self.network | !self.mask
    }
    /// In the subnet, and neither its network nor its broadcast address.
    fn is_host(&self, ip: u32) -> bool {
        self.contains(ip) && ip != self.network && ip != self.broadcast()
    }
}

/// Who sent a message: RFC 2131 4.2 identifies a client by option 61 when present, else by
/// chaddr.
#[derive(Debug, Clone, Copy)]
struct Client<'a> {
    mac: [u8; 6],
    id: Option<&'a [u8]>,
}

impl Client<'_> {
    /// Whether a lease or offer recorded for (`mac`, `id`) belongs to this client. When both
    /// sides carry a client identifier it decides; otherwise the MAC does (as dnsmasq matches a
    /// client that starts or stops sending option 61).
    fn owns(&self, mac: &[u8; 6], id: Option<&[u8]>) -> bool {
        match (self.id, id) {
            (Some(a), Some(b)) => a == b,
            _ => self.mac == *mac,
        }
    }
    fn owns_lease(&self, lease: &Lease) -> bool {
        self.owns(&lease.mac, lease.client_id.as_deref())
    }
}

/// An address offered and held for one client until `expires`.
#[derive(Debug, Clone)]
struct Offer {
    mac: [u8; 6],
    client_id: Option<Vec<u8>>,
    expires: u64,
}

/// An address kept out of the pool until `until`: declined by a client (`mac` None), or seen
/// in use on the LAN by `mac`, which may still be given it.
#[derive(Debug, Clone, Copy)]
struct Quarantine {
    until: u64,
    mac: Option<[u8; 6]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Lease(u32),
    Offer(u32),
    Quarantine(u32),
}

/// A client's last address, kept after its lease ends so it gets it again.
#[derive(Debug, Clone, Copy)]
struct Remembered {
    ip: u32,
    seen: u64,
}

/// The addresses each client identity holds (leases, or pending offers), so that a client's own
/// are found without a scan. An entry is listed under its MAC, and under its client identifier
/// when it has one: the entries a client owns ([`Client::owns`]) are among those listed under
/// its identifier or its MAC.
#[derive(Debug, Default)]
struct Owners {
    by_id: HashMap<Vec<u8>, Vec<u32>>,
    by_mac: HashMap<[u8; 6], Vec<u32>>,
}

impl Owners {
    fn insert(&mut self, ip: u32, mac: [u8; 6], id: Option<&[u8]>) {
        if let Some(id) = id {
            self.by_id.entry(id.to_vec()).or_default().push(ip);
        }
        self.by_mac.entry(mac).or_default().push(ip);
    }

    fn remove(&mut self, ip: u32, mac: [u8; 6], id: Option<&[u8]>) {
        fn take<
            K: Eq + std::hash::Hash + std::borrow::Borrow<Q>,
            Q: Eq + std::hash::Hash + ?Sized,
        >(
            map: &mut HashMap<K, Vec<u32>>,
            key: &Q,
            ip: u32,
        ) {
            if let Some(ips) = map.get_mut(key) {
                ips.retain(|x| *x != ip);
                if ips.is_empty() {
                    map.remove(key);
                }
            }
        }
        if let Some(id) = id {
            take(&mut self.by_id, id, ip);
        }
        take(&mut self.by_mac, &mac, ip);
    }

    /// Addresses listed under `client`'s identifier or MAC (a superset of those it owns; an
    /// address may come twice).
    fn candidates<'a>(&'a self, client: &Client<'_>) -> impl Iterator<Item = u32> + 'a {
        let by_id = client.id.and_then(|id| self.by_id.get(id));
        let by_mac = self.by_mac.get(&client.mac);
        by_id
            .into_iter()
            .flatten()
            .chain(by_mac.into_iter().flatten())
            .copied()
    }

    /// Addresses listed under `mac`.
    fn of_mac<'a>(&'a self, mac: &[u8; 6]) -> impl Iterator<Item = u32> + 'a {
        self.by_mac.get(mac).into_iter().flatten().copied()
    }
}

/// The server: configuration, leases, pending offers, and what it remembers about clients.
#[derive(Debug)]
pub struct DhcpServer {
    config: DhcpConfig,
    net: Subnet,
    server: u32,
    /// The dynamic range clamped to the subnet's host addresses; `None` if empty.
    range: Option<(u32, u32)>,
    reserved_ips: HashMap<u32, [u8; 6]>,
    hosts_by_mac: HashMap<[u8; 6], HostReservation>,
    leases: BTreeMap<u32, Lease>,
    offers: HashMap<u32, Offer>,
    quarantine: HashMap<u32, Quarantine>,
    lease_owners: Owners,
    offer_owners: Owners,
    /// Quarantined addresses by the MAC seen using them (which may still be given them).
    quarantine_by_mac: HashMap<[u8; 6], Vec<u32>>,
    /// No address of the range below this one is free for anyone (held, offered, quarantined,
    /// reserved or the server's); lowered whenever an address is let go.
    free_from: u32,
    timers: BTreeSet<(u64, Timer)>,
    history_by_id: HashMap<Vec<u8>, Remembered>,
    history_by_mac: HashMap<[u8; 6], Remembered>,
    events: VecDeque<LeaseEvent>,
    /// Addresses whose lease was set or ended since [`DhcpServer::take_changed`] was last
    /// called, when tracking is on (a lease file kept line by line).
    changed: Option<Vec<u32>>,
    generation: u64,
    counters: DhcpCounters,
}

impl DhcpServer {
    /// Starts a server with the leases read back from the lease file. Expired leases are only
    /// remembered (their clients get the same address again); leases outside the range, and
    /// leases that conflict with a reservation, are dropped, since reservations win.
    pub fn new(config: DhcpConfig, leases: Vec<Lease>, now: u64) -> Self {
        let net = Subnet::new(config.server, config.prefix);
        let server = u32::from(config.server);
        let mut this = DhcpServer {
            range: None,
            net,
            server,
            reserved_ips: HashMap::new(),
            hosts_by_mac: HashMap::new(),
            leases: BTreeMap::new(),
            offers: HashMap::new(),
            quarantine: HashMap::new(),
            lease_owners: Owners::default(),
            offer_owners: Owners::default(),
            quarantine_by_mac: HashMap::new(),
            free_from: 0,
            timers: BTreeSet::new(),
            history_by_id: HashMap::new(),
            history_by_mac: HashMap::new(),
            events: VecDeque::new(),
            changed: None,
            generation: 0,
            counters: DhcpCounters::default(),
            config,
        };
        this.range = this.clamp_range();
        this.load_hosts();
        // A damaged or hand-edited file may name a client or an address twice: the first wins.
        let mut seen_ids: HashSet<Vec<u8>> = HashSet::new();
        let mut seen_macs: HashSet<[u8; 6]> = HashSet::new();
        for lease in leases {
            let ip = u32::from(lease.ip);
            if !lease.is_active(now) {
                this.remember(&lease, now);
                continue;
            }
            let client = Client {
                mac: lease.mac,
                id: lease.client_id.as_deref(),
            };
            let duplicate = this.leases.contains_key(&ip)
                || match &lease.client_id {
                    Some(id) => seen_ids.contains(id),
                    None => seen_macs.contains(&lease.mac),
                };
            if duplicate || this.lease_conflict(ip, &client).is_some() {
                continue;
            }
            match &lease.client_id {
                Some(id) => seen_ids.insert(id.clone()),
                None => seen_macs.insert(lease.mac),
            };
            this.remember(&lease, now);
            this.put_lease(lease);
        }
        this
    }

    /// Replaces the `<dhcp><host/>` reservations (`virsh net-update ... ip-dhcp-host --live`).
    /// Leases that now conflict with a reservation are revoked ([`LeaseEvent::Removed`]) and
    /// pending offers of reserved addresses are withdrawn.
    pub fn update_hosts(&mut self, now: u64, hosts: Vec<HostReservation>) {
        self.handle_timeout(now);
        self.config.hosts = hosts;
        self.load_hosts();
        self.free_from = 0;
        let conflicting: Vec<u32> = self
            .leases
            .iter()
            .filter(|(ip, lease)| {
                let client = Client {
                    mac: lease.mac,
                    id: lease.client_id.as_deref(),
                };
                self.lease_conflict(**ip, &client).is_some()
            })
            .map(|(ip, _)| *ip)
            .collect();
        for ip in conflicting {
            self.counters.leases_revoked += 1;
            self.remove_lease(ip, now);
        }
        let withdrawn: Vec<u32> = self
            .offers
            .iter()
            .filter(|(ip, offer)| {
                self.reserved_ips
                    .get(*ip)
                    .is_some_and(|owner| *owner != offer.mac)
            })
            .map(|(ip, _)| *ip)
            .collect();
        for ip in withdrawn {
            self.remove_offer(ip);
        }
    }

    /// Handles the UDP payload of a datagram that arrived on port 67 (to the gateway or
    /// broadcast). `src_mac` and `src_ip` are the frame's Ethernet and IPv4 sources.
    pub fn handle_message(
        &mut self,
        now: u64,
        src_mac: [u8; 6],
        src_ip: Ipv4Addr,
        payload: &[u8],
    ) -> Result<Option<Reply>, DhcpDrop> {
        self.handle(now, (src_mac, src_ip), payload, false)
    }

    /// Handles again a DISCOVER whose OFFER a probe found in use (see [`Probe`]), once the
    /// answer was reported with [`DhcpServer::note_address_in_use`]: the next free address is
    /// offered. It is not counted as another DISCOVER.
    pub fn handle_retry(
        &mut self,
        now: u64,
        src_mac: [u8; 6],
        src_ip: Ipv4Addr,
        payload: &[u8],
    ) -> Result<Option<Reply>, DhcpDrop> {
        self.handle(now, (src_mac, src_ip), payload, true)
    }

    /// Timers first, then the message; a drop is counted.
    fn handle(
        &mut self,
        now: u64,
        (src_mac, src_ip): ([u8; 6], Ipv4Addr),
        payload: &[u8],
        retry: bool,
    ) -> Result<Option<Reply>, DhcpDrop> {
        self.handle_timeout(now);
        let result = self.dispatch(now, src_mac, src_ip, payload, retry);
        if let Err(drop) = &result {
            self.count_drop(*drop);
        }
        result
    }

    /// Whether `ip` is still offered to the client with hardware address `mac` (an offer held
    /// for a probe may have been withdrawn meanwhile: the client chose another server, asked
    /// again and got another address, or the address was seen in use).
    pub fn offer_pending(&self, now: u64, ip: Ipv4Addr, mac: [u8; 6]) -> bool {
        self.offers
            .get(&u32::from(ip))
            .is_some_and(|o| o.mac == mac && o.expires > now)
    }

    /// Withdraws the offer of `ip` (one that could not be probed, and so is not sent).
    pub fn withdraw_offer(&mut self, ip: Ipv4Addr) {
        self.remove_offer(u32::from(ip));
    }

    /// An IPv4 address seen in use by `mac` on the LAN (ARP sender, or the source of a guest's
    /// IPv4 frame, or the answer to a probe). An address of the range that `mac` does not
    /// lease is kept out of the pool for [`QUARANTINE_SECS`], except for `mac` itself, as
    /// dnsmasq's ping check would, and a pending offer of it to another client is withdrawn.
    pub fn note_address_in_use(&mut self, now: u64, ip: Ipv4Addr, mac: [u8; 6]) {
        let ip = u32::from(ip);
        if !self.in_range(ip) {
            return;
        }
        if self.leases.get(&ip).is_some_and(|l| l.mac == mac)
            || self.reserved_ips.get(&ip) == Some(&mac)
        {
            return;
        }
        // An offer of it to another client is no longer made (its REQUEST would be NAKed).
        if self.offers.get(&ip).is_some_and(|o| o.mac != mac) {
            self.remove_offer(ip);
        }
        if let Some(q) = self.quarantine.get(&ip)
            && q.mac == Some(mac)
            && q.until >= now.saturating_add(QUARANTINE_SECS / 2)
        {
            return;
        }
        self.counters.in_use_noted += 1;
        self.set_quarantine(ip, now.saturating_add(QUARANTINE_SECS), Some(mac));
    }

    /// When [`DhcpServer::handle_timeout`] next has work: the earliest lease expiry, offer
    /// expiry or end of a quarantine.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// Ends leases, offers and quarantines whose time is at or before `now`.
    pub fn handle_timeout(&mut self, now: u64) {
        while let Some(&(at, timer)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            match timer {
                Timer::Lease(ip) => {
                    if self.leases.get(&ip).is_some_and(|l| l.expiry == Some(at)) {
                        self.counters.leases_expired += 1;
                        self.remove_lease(ip, now);
                    }
                }
                Timer::Offer(ip) => {
                    if self.offers.get(&ip).is_some_and(|o| o.expires == at) {
                        self.counters.offers_expired += 1;
                        self.remove_offer(ip);
                    }
                }
                Timer::Quarantine(ip) => {
                    if self.quarantine.get(&ip).is_some_and(|q| q.until == at) {
                        self.remove_quarantine(ip);
                    }
                }
            }
        }
    }

    /// The active leases (not pending offers), in address order.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    pub fn counters(&self) -> &DhcpCounters {
        &self.counters
    }

    pub fn config(&self) -> &DhcpConfig {
        &self.config
    }

    /// Bumped on every change of the active lease set: an ACK that creates, extends or changes
    /// a lease, a release, a decline, an expiry, a revocation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Starts (or stops) recording which addresses' leases change, for
    /// [`DhcpServer::take_changed`]; whoever turns it on must take them.
    pub fn track_changes(&mut self, on: bool) {
        self.changed = on.then(Vec::new);
    }

    /// The addresses whose lease was set (created, renewed, changed) or ended since the last
    /// call, in no order and possibly repeated, so a lease file can be updated line by line
    /// instead of formatted whole for every write.
    pub fn take_changed(&mut self) -> Vec<u32> {
        self.changed
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The lease of `ip`, if any.
    pub fn lease(&self, ip: Ipv4Addr) -> Option<&Lease> {
        self.leases.get(&u32::from(ip))
    }

    /// The next lease change not yet taken. Renewals that only move the expiry produce none.
    /// The queue grows until drained, so whoever owns the server should drain it.
    pub fn poll_event(&mut self) -> Option<LeaseEvent> {
        self.events.pop_front()
    }

    // ---- message handling ----

    fn dispatch(
        &mut self,
        now: u64,
        src_mac: [u8; 6],
        src_ip: Ipv4Addr,
        payload: &[u8],
        retry: bool,
    ) -> Result<Option<Reply>, DhcpDrop> {
        let req = wire::parse(payload)?;
        let giaddr = req.header.giaddr();
        // Only our own subnet is served; a relay for another one is not for us.
        if !giaddr.is_unspecified() && !self.net.contains(u32::from(giaddr)) {
            return Err(DhcpDrop::NotForUs);
        }
        match req.msg_type {
            MessageType::Discover => self.discover(now, src_mac, &req, retry).map(Some),
            MessageType::Request => self.request(now, src_mac, &req).map(Some),
            MessageType::Decline => self.decline(now, &req).map(|()| None),
            MessageType::Release => self.release(now, &req).map(|()| None),
            MessageType::Inform => self.inform(src_mac, src_ip, &req).map(Some),
            other => Err(DhcpDrop::UnknownType(u8::from(other))),
        }
    }

    /// RFC 2131 4.3.1: DISCOVER -> OFFER.
    fn discover(
        &mut self,
        now: u64,
        src_mac: [u8; 6],
        req: &wire::Request,
        retry: bool,
    ) -> Result<Reply, DhcpDrop> {
        if !retry {
            self.counters.discovers += 1;
        }
        let client = client_of(req);
        if self.lease_of(&client).is_none() && self.mac_at_cap(now, &client) {
            return Err(DhcpDrop::MacLeaseCap);
        }
        let ip = self
            .choose_address(now, &client, req.requested_ip)
            .ok_or(DhcpDrop::PoolExhausted)?;
        // One pending offer per client.
        for other in self.offers_of(&client) {
            if other != ip {
                self.remove_offer(other);
            }
        }
        // RFC 2131 3.1 step 2 / 4.4.1: an address new to the client is probed before it is
        // offered; its current lease and its reservation are its own (dnsmasq pings neither).
        let own = self.leases.get(&ip).is_some_and(|l| client.owns_lease(l))
            || self.reserved_ip_for(&client.mac) == Some(ip);
        self.set_offer(ip, &client, now.saturating_add(OFFER_HOLD_SECS));
        let mut reply =
            self.address_reply(req, src_mac, MessageType::Offer, ip, Ipv4Addr::UNSPECIFIED)?;
        if !own {
            reply.probe = Some(Probe {
                ip: Ipv4Addr::from(ip),
                mac: client.mac,
            });
        }
        self.counters.offers += 1;
        Ok(reply)
    }

    /// The address to offer, in dnsmasq's order of preference.
    fn choose_address(
        &mut self,
        now: u64,
        client: &Client<'_>,
        requested: Option<Ipv4Addr>,
    ) -> Option<u32> {
        // 1. The client's reservation, even over another client's lease (revoked on ACK).
        if let Some(ip) = self.reserved_ip_for(&client.mac) {
            return self.check_lease_max(ip, client).is_ok().then_some(ip);
        }
        // 2. Its current lease.
        if let Some(ip) = self.lease_of(client)
            && self.check_address(now, ip, client).is_ok()
        {
            return Some(ip);
        }
        if self.leases.len() >= self.config.lease_max {
            return None;
        }
        // 3. The address it had last, 4. the one it asks for, 5. the first free one.
        let free = |ip: u32| self.in_range(ip) && self.check_address(now, ip, client).is_ok();
        if let Some(ip) = self.remembered(client).filter(|ip| free(*ip)) {
            return Some(ip);
        }
        if let Some(ip) = requested.map(u32::from).filter(|ip| free(*ip)) {
            return Some(ip);
        }
        // The lowest free one: among those the client may have although others may not (its
        // pending offer, an address it was seen using) and the first nobody holds.
        let own = self
            .offer_owners
            .candidates(client)
            .chain(
                self.quarantine_by_mac
                    .get(&client.mac)
                    .into_iter()
                    .flatten()
                    .copied(),
            )
            .filter(|ip| free(*ip))
            .min();
        let first = self.first_unheld(now);
        own.into_iter().chain(first).min()
    }

    /// The first address of the range nobody holds, offers, reserves or has been seen using;
    /// moves the cursor up to it.
    fn first_unheld(&mut self, now: u64) -> Option<u32> {
        let (start, end) = self.range?;
        let mut ip = self.free_from.max(start);
        while ip <= end && self.held(now, ip) {
            ip += 1;
        }
        self.free_from = ip;
        (ip <= end).then_some(ip)
    }

    /// Whether `ip` is out of the pool for every client.
    fn held(&self, now: u64, ip: u32) -> bool {
        ip == self.server
            || self.reserved_ips.contains_key(&ip)
            || self.leases.contains_key(&ip)
            || self.offers.get(&ip).is_some_and(|o| o.expires > now)
            || self.quarantine.get(&ip).is_some_and(|q| q.until > now)
    }

    /// RFC 2131 4.3.2: REQUEST in the SELECTING, INIT-REBOOT, RENEWING and REBINDING states.
    fn request(
        &mut self,
        now: u64,
        src_mac: [u8; 6],
        req: &wire::Request,
    ) -> Result<Reply, DhcpDrop> {
        self.counters.requests += 1;
        let client = client_of(req);
        let ciaddr = req.header.ciaddr();
        let ip = if let Some(server_id) = req.server_id {
            // SELECTING: the client answers one of the offers it got.
            if server_id != self.config.server {
                // It chose another server: our offer is free again.
                self.withdraw_offers(&client);
                return Err(DhcpDrop::NotForUs);
            }
            req.requested_ip
                .or((!ciaddr.is_unspecified()).then_some(ciaddr))
                .ok_or(DhcpDrop::NoAddress)?
        } else if !ciaddr.is_unspecified() {
            // RENEWING (unicast) or REBINDING (broadcast): the address is in ciaddr.
            ciaddr
        } else {
            // INIT-REBOOT: the client asks to keep the address it remembers.
            req.requested_ip.ok_or(DhcpDrop::NoAddress)?
        };
        let ip = u32::from(ip);
        match self.check_request(now, ip, &client) {
            Ok(()) => self.commit(now, src_mac, req, &client, ip),
            Err(reason) => self.nak(req, reason),
        }
    }

    /// Whether `client` may hold `ip` now.
    fn check_request(&self, now: u64, ip: u32, client: &Client<'_>) -> Result<(), NakReason> {
        if !self.net.contains(ip) {
            return Err(NakReason::NotInSubnet);
        }
        if let Some(reserved) = self.reserved_ip_for(&client.mac)
            && reserved != ip
        {
            return Err(NakReason::StaticElsewhere);
        }
        self.check_address(now, ip, client)?;
        let own_lease = self.leases.get(&ip).is_some_and(|l| client.owns_lease(l));
        let reserved_here = self.reserved_ips.get(&ip) == Some(&client.mac);
        if !self.in_range(ip) && !reserved_here && !own_lease {
            return Err(NakReason::NotInRange);
        }
        self.check_lease_max(ip, client)?;
        if self.lease_of(client).is_none() && self.mac_at_cap(now, client) {
            return Err(NakReason::MacLeaseCap);
        }
        Ok(())
    }

    /// Whether `ip` is a host address of the subnet that nobody else holds, has been offered,
    /// has reserved, or has declined or been seen using.
    fn check_address(&self, now: u64, ip: u32, client: &Client<'_>) -> Result<(), NakReason> {
        if !self.net.is_host(ip) {
            return Err(NakReason::NotInSubnet);
        }
        if ip == self.server {
            return Err(NakReason::InUse);
        }
        match self.reserved_ips.get(&ip) {
            // Reservations win over every other claim.
            Some(owner) if *owner == client.mac => return Ok(()),
            Some(_) => return Err(NakReason::Reserved),
            None => {}
        }
        if self.leases.get(&ip).is_some_and(|l| !client.owns_lease(l)) {
            return Err(NakReason::InUse);
        }
        if self
            .offers
            .get(&ip)
            .is_some_and(|o| o.expires > now && !client.owns(&o.mac, o.client_id.as_deref()))
        {
            return Err(NakReason::InUse);
        }
        if self
            .quarantine
            .get(&ip)
            .is_some_and(|q| q.until > now && q.mac != Some(client.mac))
        {
            return Err(NakReason::InUse);
        }
        Ok(())
    }

    /// A client that holds no lease yet needs room under `lease_max`.
    fn check_lease_max(&self, ip: u32, client: &Client<'_>) -> Result<(), NakReason> {
        let adds = self.lease_of(client).is_none() && !self.leases.contains_key(&ip);
        if adds && self.leases.len() >= self.config.lease_max {
            return Err(NakReason::LeaseMax);
        }
        Ok(())
    }

    /// Whether `client`'s MAC already holds `leases_per_mac` leases and live offers made to
    /// other client identifiers (the client's own are not counted: it may renew or re-ask).
    fn mac_at_cap(&self, now: u64, client: &Client<'_>) -> bool {
        let cap = self.config.leases_per_mac;
        if cap == usize::MAX {
            return false;
        }
        let leases = self
            .lease_owners
            .of_mac(&client.mac)
            .filter_map(|ip| self.leases.get(&ip))
            .filter(|l| !client.owns_lease(l))
            .count();
        let offers = self
            .offer_owners
            .of_mac(&client.mac)
            .filter_map(|ip| self.offers.get(&ip))
            .filter(|o| o.expires > now && !client.owns(&o.mac, o.client_id.as_deref()))
            .count();
        leases + offers >= cap
    }

    /// Grants `ip` to `client` and acknowledges it.
    fn commit(
        &mut self,
        now: u64,
        src_mac: [u8; 6],
        req: &wire::Request,
        client: &Client<'_>,
        ip: u32,
    ) -> Result<Reply, DhcpDrop> {
        // A reservation takes the address from whoever held it.
        if self.leases.get(&ip).is_some_and(|l| !client.owns_lease(l)) {
            self.counters.leases_revoked += 1;
            self.remove_lease(ip, now);
        }
        // A client holds one lease: one it had elsewhere ends.
        for other in self.leases_of(client) {
            if other != ip {
                self.remove_lease(other, now);
            }
        }
        self.withdraw_offers(client);
        self.remove_offer(ip);
        self.remove_quarantine(ip);

        let old = self.leases.get(&ip).cloned();
        // The reservation's name wins over the client's, as in dnsmasq; a client that stops
        // sending option 12 (many do when renewing) keeps the name it had.
        let hostname = self
            .hosts_by_mac
            .get(&client.mac)
            .and_then(|h| h.name.clone())
            .or_else(|| req.hostname.clone())
            .or_else(|| old.as_ref().and_then(|l| l.hostname.clone()));
        let lease = Lease {
            expiry: self
                .config
                .lease_time
                .map(|t| now.saturating_add(u64::from(t))),
            mac: client.mac,
            ip: Ipv4Addr::from(ip),
            hostname,
            client_id: client.id.map(<[u8]>::to_vec),
        };
        let durable = old.as_ref() != Some(&lease);
        if durable {
            self.generation += 1;
            match old {
                None => self.events.push_back(LeaseEvent::Added(lease.clone())),
                Some(old)
                    if old.mac != lease.mac
                        || old.hostname != lease.hostname
                        || old.client_id != lease.client_id =>
                {
                    self.events.push_back(LeaseEvent::Removed(old));
                    self.events.push_back(LeaseEvent::Added(lease.clone()));
                }
                Some(_) => {}
            }
        }
        self.remember(&lease, now);
        self.put_lease(lease);
        let mut reply =
            self.address_reply(req, src_mac, MessageType::Ack, ip, req.header.ciaddr())?;
        reply.durable = durable;
        self.counters.acks += 1;
        Ok(reply)
    }

    /// RFC 2131 4.3.2: DHCPNAK, broadcast unless relayed, with the broadcast bit set for the
    /// relay.
    fn nak(&mut self, req: &wire::Request, reason: NakReason) -> Result<Reply, DhcpDrop> {
        let counter = match reason {
            NakReason::NotInSubnet => &mut self.counters.nak_not_in_subnet,
            NakReason::NotInRange => &mut self.counters.nak_not_in_range,
            NakReason::InUse => &mut self.counters.nak_in_use,
            NakReason::Reserved => &mut self.counters.nak_reserved,
            NakReason::StaticElsewhere => &mut self.counters.nak_static_elsewhere,
            NakReason::LeaseMax => &mut self.counters.nak_lease_max,
            NakReason::MacLeaseCap => &mut self.counters.nak_mac_lease_cap,
        };
        *counter += 1;
        let giaddr = req.header.giaddr();
        let mut flags = u16::from(req.header.flags());
        if !giaddr.is_unspecified() {
            flags |= 0x8000;
        }
        let header = wire::ReplyHeader {
            xid: req.header.xid(),
            flags,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            giaddr,
            chaddr: req.mac,
        };
        let options = [
            DhcpOption::MessageType(MessageType::Nak),
            DhcpOption::ServerIdentifier(self.config.server),
            DhcpOption::Message(reason.message().to_owned()),
        ];
        let payload = wire::encode_reply(&header, &options)?;
        let to = if giaddr.is_unspecified() {
            Destination::Broadcast
        } else {
            Destination::Unicast {
                ip: giaddr,
                mac: req.mac,
                port: SERVER_PORT,
            }
        };
        self.counters.naks += 1;
        Ok(Reply {
            payload,
            to,
            durable: false,
            probe: None,
        })
    }

    /// RFC 2131 4.3.4: the client gives its lease back.
    fn release(&mut self, now: u64, req: &wire::Request) -> Result<(), DhcpDrop> {
        self.counters.releases += 1;
        if req.server_id.is_some_and(|s| s != self.config.server) {
            return Err(DhcpDrop::NotForUs);
        }
        let client = client_of(req);
        let ip = u32::from(req.header.ciaddr());
        if !self.leases.get(&ip).is_some_and(|l| client.owns_lease(l)) {
            return Err(DhcpDrop::UnknownLease);
        }
        self.remove_lease(ip, now);
        Ok(())
    }

    /// RFC 2131 4.3.3: the client found the address in use; keep it out of the pool.
    fn decline(&mut self, now: u64, req: &wire::Request) -> Result<(), DhcpDrop> {
        self.counters.declines += 1;
        if req.server_id.is_some_and(|s| s != self.config.server) {
            return Err(DhcpDrop::NotForUs);
        }
        let client = client_of(req);
        let ip = u32::from(req.requested_ip.ok_or(DhcpDrop::NoAddress)?);
        // Only the holder may decline, or any client could empty the pool.
        if !self.leases.get(&ip).is_some_and(|l| client.owns_lease(l)) {
            return Err(DhcpDrop::UnknownLease);
        }
        self.remove_lease(ip, now);
        self.set_quarantine(ip, now.saturating_add(QUARANTINE_SECS), None);
        Ok(())
    }

    /// RFC 2131 4.3.5: configuration without an address, sent straight to the client.
    fn inform(
        &mut self,
        src_mac: [u8; 6],
        src_ip: Ipv4Addr,
        req: &wire::Request,
    ) -> Result<Reply, DhcpDrop> {
        self.counters.informs += 1;
        let ciaddr = req.header.ciaddr();
        let addr = if ciaddr.is_unspecified() {
            src_ip
        } else {
            ciaddr
        };
        if addr.is_unspecified() {
            return Err(DhcpDrop::NoAddress);
        }
        if req.header.giaddr().is_unspecified() && !self.net.contains(u32::from(addr)) {
            return Err(DhcpDrop::NotForUs);
        }
        let header = wire::ReplyHeader {
            xid: req.header.xid(),
            flags: u16::from(req.header.flags()),
            ciaddr,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: req.header.giaddr(),
            chaddr: req.mac,
        };
        let options = self.reply_options(MessageType::Ack, false, req.prl.as_deref());
        let payload = wire::encode_reply(&header, &options)?;
        let to = if header.giaddr.is_unspecified() {
            Destination::Unicast {
                ip: addr,
                mac: src_mac,
                port: CLIENT_PORT,
            }
        } else {
            destination(req, src_mac, Ipv4Addr::UNSPECIFIED)
        };
        self.counters.acks += 1;
        Ok(Reply {
            payload,
            to,
            durable: false,
            probe: None,
        })
    }

    /// An OFFER or ACK of `ip`.
    fn address_reply(
        &self,
        req: &wire::Request,
        src_mac: [u8; 6],
        msg_type: MessageType,
        ip: u32,
        ciaddr: Ipv4Addr,
    ) -> Result<Reply, DhcpDrop> {
        let yiaddr = Ipv4Addr::from(ip);
        let header = wire::ReplyHeader {
            xid: req.header.xid(),
            flags: u16::from(req.header.flags()),
            ciaddr,
            yiaddr,
            giaddr: req.header.giaddr(),
            chaddr: req.mac,
        };
        let options = self.reply_options(msg_type, true, req.prl.as_deref());
        Ok(Reply {
            payload: wire::encode_reply(&header, &options)?,
            to: destination(req, src_mac, yiaddr),
            durable: false,
            probe: None,
        })
    }

    /// The options of an OFFER or ACK: 53 first, then the requested ones in the order of the
    /// parameter request list (RFC 2132 9.8), then the rest in a fixed order.
    ///
    /// 54, 1 and the lease times always go; 3, 6, 15 and 28 go when configured and requested,
    /// or when the client sent no list, as dnsmasq does.
    fn reply_options(
        &self,
        msg_type: MessageType,
        with_lease: bool,
        prl: Option<&[u8]>,
    ) -> Vec<DhcpOption> {
        let wanted = |code: OptionCode| prl.is_none_or(|list| list.contains(&u8::from(code)));
        let mut send = Vec::with_capacity(10);
        send.push(DhcpOption::ServerIdentifier(self.config.server));
        if with_lease {
            match self.config.lease_time {
                Some(t) => {
                    send.push(DhcpOption::AddressLeaseTime(t));
                    send.push(DhcpOption::Renewal(t / 2));
                    // 7/8 of u32::MAX still fits.
                    let t2 = u64::from(t) * 7 / 8;
                    send.push(DhcpOption::Rebinding(u32::try_from(t2).unwrap_or(u32::MAX)));
                }
                // RFC 2132 9.2: 0xffffffff is infinity; T1 and T2 would be meaningless.
                None => send.push(DhcpOption::AddressLeaseTime(u32::MAX)),
            }
        }
        send.push(DhcpOption::SubnetMask(Ipv4Addr::from(self.net.mask)));
        if let Some(router) = self.config.router
            && wanted(OptionCode::Router)
        {
            send.push(DhcpOption::Router(vec![router]));
        }
        if let Some(dns) = self.config.dns
            && wanted(OptionCode::DomainNameServer)
        {
            send.push(DhcpOption::DomainNameServer(vec![dns]));
        }
        if let Some(domain) = &self.config.domain
            && wanted(OptionCode::DomainName)
        {
            send.push(DhcpOption::DomainName(domain.clone()));
        }
        if wanted(OptionCode::BroadcastAddr) {
            send.push(DhcpOption::BroadcastAddr(Ipv4Addr::from(
                self.net.broadcast(),
            )));
        }

        let mut out = Vec::with_capacity(send.len() + 1);
        out.push(DhcpOption::MessageType(msg_type));
        for code in prl.unwrap_or_default() {
            if let Some(pos) = send
                .iter()
                .position(|o| u8::from(OptionCode::from(o)) == *code)
            {
                out.push(send.remove(pos));
            }
        }
        out.extend(send);
        out
    }

    // ---- state ----

    fn clamp_range(&self) -> Option<(u32, u32)> {
        let (start, end) = (
            u32::from(self.config.range.0),
            u32::from(self.config.range.1),
        );
        let first_host = self.net.network.saturating_add(1);
        let last_host = self.net.broadcast().saturating_sub(1);
        let (start, end) = (start.max(first_host), end.min(last_host));
        (start <= end).then_some((start, end))
    }

    fn load_hosts(&mut self) {
        self.reserved_ips.clear();
        self.hosts_by_mac.clear();
        for host in &self.config.hosts {
            if self.hosts_by_mac.contains_key(&host.mac) {
                continue;
            }
            let mut host = host.clone();
            if let Some(ip) = host.ip.map(u32::from) {
                let usable = self.net.is_host(ip) && ip != self.server;
                if usable && !self.reserved_ips.contains_key(&ip) {
                    self.reserved_ips.insert(ip, host.mac);
                } else {
                    host.ip = None;
                }
            }
            self.hosts_by_mac.insert(host.mac, host);
        }
    }

    fn in_range(&self, ip: u32) -> bool {
        self.range
            .is_some_and(|(start, end)| (start..=end).contains(&ip) && ip != self.server)
    }

    fn reserved_ip_for(&self, mac: &[u8; 6]) -> Option<u32> {
        self.hosts_by_mac.get(mac)?.ip.map(u32::from)
    }

    /// Why a lease of `ip` by `client` may not stand (reservations, range), if it may not.
    fn lease_conflict(&self, ip: u32, client: &Client<'_>) -> Option<NakReason> {
        match self.reserved_ips.get(&ip) {
            Some(owner) if *owner != client.mac => return Some(NakReason::Reserved),
            Some(_) => return None,
            None => {}
        }
        if self.reserved_ip_for(&client.mac).is_some() {
            return Some(NakReason::StaticElsewhere);
        }
        (!self.in_range(ip)).then_some(NakReason::NotInRange)
    }

    /// The client's lease (the lowest, should it hold more).
    fn lease_of(&self, client: &Client<'_>) -> Option<u32> {
        self.lease_owners
            .candidates(client)
            .filter(|ip| self.leases.get(ip).is_some_and(|l| client.owns_lease(l)))
            .min()
    }

    /// Every lease the client owns.
    fn leases_of(&self, client: &Client<'_>) -> Vec<u32> {
        let mut ips: Vec<u32> = self
            .lease_owners
            .candidates(client)
            .filter(|ip| self.leases.get(ip).is_some_and(|l| client.owns_lease(l)))
            .collect();
        ips.sort_unstable();
        ips.dedup();
        ips
    }

    /// Every pending offer made to the client.
    fn offers_of(&self, client: &Client<'_>) -> Vec<u32> {
        let mut ips: Vec<u32> = self
            .offer_owners
            .candidates(client)
            .filter(|ip| {
                self.offers
                    .get(ip)
                    .is_some_and(|o| client.owns(&o.mac, o.client_id.as_deref()))
            })
            .collect();
        ips.sort_unstable();
        ips.dedup();
        ips
    }

    fn put_lease(&mut self, lease: Lease) {
        let ip = u32::from(lease.ip);
        if let Some(old) = self.leases.get(&ip) {
            if let Some(at) = old.expiry {
                self.timers.remove(&(at, Timer::Lease(ip)));
            }
            self.lease_owners
                .remove(ip, old.mac, old.client_id.as_deref());
        }
        if let Some(at) = lease.expiry {
            self.timers.insert((at, Timer::Lease(ip)));
        }
        self.lease_owners
            .insert(ip, lease.mac, lease.client_id.as_deref());
        self.leases.insert(ip, lease);
        if let Some(changed) = &mut self.changed {
            changed.push(ip);
        }
    }

    /// Ends a lease: the lease set changes and the DNS is told.
    fn remove_lease(&mut self, ip: u32, now: u64) {
        if let Some(lease) = self.leases.remove(&ip) {
            if let Some(at) = lease.expiry {
                self.timers.remove(&(at, Timer::Lease(ip)));
            }
            self.lease_owners
                .remove(ip, lease.mac, lease.client_id.as_deref());
            self.free_from = self.free_from.min(ip);
            if let Some(changed) = &mut self.changed {
                changed.push(ip);
            }
            self.remember(&lease, now);
            self.generation += 1;
            self.events.push_back(LeaseEvent::Removed(lease));
        }
    }

    fn set_offer(&mut self, ip: u32, client: &Client<'_>, expires: u64) {
        self.remove_offer(ip);
        self.offer_owners.insert(ip, client.mac, client.id);
        self.offers.insert(
            ip,
            Offer {
                mac: client.mac,
                client_id: client.id.map(<[u8]>::to_vec),
                expires,
            },
        );
        self.timers.insert((expires, Timer::Offer(ip)));
    }

    fn remove_offer(&mut self, ip: u32) {
        if let Some(offer) = self.offers.remove(&ip) {
            self.timers.remove(&(offer.expires, Timer::Offer(ip)));
            self.offer_owners
                .remove(ip, offer.mac, offer.client_id.as_deref());
            self.free_from = self.free_from.min(ip);
        }
    }

    fn withdraw_offers(&mut self, client: &Client<'_>) {
        for ip in self.offers_of(client) {
            self.remove_offer(ip);
        }
    }

    fn set_quarantine(&mut self, ip: u32, until: u64, mac: Option<[u8; 6]>) {
        self.remove_quarantine(ip);
        self.quarantine.insert(ip, Quarantine { until, mac });
        if let Some(mac) = mac {
            self.quarantine_by_mac.entry(mac).or_default().push(ip);
        }
        self.timers.insert((until, Timer::Quarantine(ip)));
    }

    fn remove_quarantine(&mut self, ip: u32) {
        let Some(old) = self.quarantine.remove(&ip) else {
            return;
        };
        self.timers.remove(&(old.until, Timer::Quarantine(ip)));
        if let Some(mac) = old.mac
            && let Some(ips) = self.quarantine_by_mac.get_mut(&mac)
        {
            ips.retain(|x| *x != ip);
            if ips.is_empty() {
                self.quarantine_by_mac.remove(&mac);
            }
        }
        self.free_from = self.free_from.min(ip);
    }

    /// Remembers the client's address so it gets it back after the lease ends.
    fn remember(&mut self, lease: &Lease, now: u64) {
        let entry = Remembered {
            ip: u32::from(lease.ip),
            seen: now,
        };
        if let Some(id) = &lease.client_id {
            if !self.history_by_id.contains_key(id.as_slice()) {
                evict_oldest(&mut self.history_by_id);
            }
            self.history_by_id.insert(id.clone(), entry);
        }
        if !self.history_by_mac.contains_key(&lease.mac) {
            evict_oldest(&mut self.history_by_mac);
        }
        self.history_by_mac.insert(lease.mac, entry);
    }

    fn remembered(&self, client: &Client<'_>) -> Option<u32> {
        match client.id {
            Some(id) => self.history_by_id.get(id),
            None => self.history_by_mac.get(&client.mac),
        }
        .map(|r| r.ip)
    }

    fn count_drop(&mut self, drop: DhcpDrop) {
        let c = &mut self.counters;
        let counter = match drop {
            DhcpDrop::Malformed => &mut c.malformed,
            DhcpDrop::NotBootRequest => &mut c.not_boot_request,
            DhcpDrop::BadHardware => &mut c.bad_hardware,
            DhcpDrop::NoMessageType => &mut c.no_message_type,
            DhcpDrop::UnknownType(_) => &mut c.unknown_type,
            DhcpDrop::NotForUs => &mut c.not_for_us,
            DhcpDrop::PoolExhausted => &mut c.pool_exhausted,
            DhcpDrop::MacLeaseCap => &mut c.mac_lease_cap,
            DhcpDrop::NoAddress => &mut c.no_address,
            DhcpDrop::UnknownLease => &mut c.unknown_lease,
            DhcpDrop::Encode => &mut c.encode_errors,
        };
        *counter += 1;
    }
}

/// Keeps a history map under [`HISTORY_MAX`]: when full, it forgets the quarter of its
/// clients least recently seen (one pass for a quarter of the inserts: constant time each,
/// amortised, where forgetting one at a time scanned the whole map for every new client).
fn evict_oldest<K: Eq + std::hash::Hash>(map: &mut HashMap<K, Remembered>) {
    if map.len() < HISTORY_MAX {
        return;
    }
    let drop = (map.len() / 4).max(1);
    let mut seen: Vec<u64> = map.values().map(|r| r.seen).collect();
    let cutoff = *seen.select_nth_unstable(drop - 1).1;
    let below = seen.iter().filter(|t| **t < cutoff).count();
    let mut ties = drop.saturating_sub(below);
    map.retain(|_, r| {
        if r.seen < cutoff {
            false
        } else if r.seen == cutoff && ties > 0 {
            ties -= 1;
            false
        } else {
            true
        }
    });
}

fn client_of(req: &wire::Request) -> Client<'_> {
    Client {
        mac: req.mac,
        id: req.client_id.as_deref(),
    }
}

/// RFC 2131 4.1: where a server sends an OFFER or ACK (a NAK always goes to the relay or to
/// broadcast).
fn destination(req: &wire::Request, src_mac: [u8; 6], yiaddr: Ipv4Addr) -> Destination {
    let giaddr = req.header.giaddr();
    let ciaddr = req.header.ciaddr();
    if !giaddr.is_unspecified() {
        Destination::Unicast {
            ip: giaddr,
            mac: src_mac,
            port: SERVER_PORT,
        }
    } else if !ciaddr.is_unspecified() {
        Destination::Unicast {
            ip: ciaddr,
            mac: src_mac,
            port: CLIENT_PORT,
        }
    } else if req.header.flags().broadcast() || yiaddr.is_unspecified() {
        Destination::Broadcast
    } else {
        Destination::Unicast {
            ip: yiaddr,
            mac: req.mac,
            port: CLIENT_PORT,
        }
    }
}

/// Turns a client's option 12 (or a lease-file name) into one DNS label: the part before the
/// first dot, only letters, digits and hyphens, no leading or trailing hyphen, at most 63
/// characters. `None` when nothing is left.
pub fn sanitize_hostname(raw: &[u8]) -> Option<String> {
    let label = raw.split(|b| *b == b'.').next().unwrap_or_default();
    let kept: String = label
        .iter()
        .filter(|b| b.is_ascii_alphanumeric() || **b == b'-')
        .take(63)
        .map(|b| char::from(*b))
        .collect();
    let trimmed = kept.trim_matches('-');
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}
