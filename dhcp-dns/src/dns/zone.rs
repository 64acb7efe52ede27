//! Local names and where every other name goes.
//!
//! libvirt hands dnsmasq four sources of local data: the DHCP leases (a guest's host name,
//! plain and qualified with `domain=`), `addn-hosts` for `<dns><host>` (with `expand-hosts`,
//! names without a dot are qualified too), `txt-record` and `srv-host`. For a name it holds,
//! dnsmasq answers from them and does not forward, whatever the type asked: a guest asking for
//! the AAAA of a lease name gets an empty NOERROR (NODATA) at once instead of waiting on an
//! upstream that cannot know it. This module holds that data and answers those questions.
//!
//! It also says where the other names go, as dnsmasq's `server=`/`local=` lines do, by the
//! longest matching suffix: `<forwarder domain=.. addr=..>` to its servers, and to nobody (an
//! NXDOMAIN from here) the `<domain localOnly='yes'>` domain, the network's reverse zone
//! (libvirt's `localPTR`), a `<forwarder domain=..>` without an address, and plain names when
//! `<dns forwardPlainNames='no'>` (libvirt writes `domain-needed` and `local=//`).
//!
//! Precedence, as dnsmasq's: `<dns><host>` names shadow lease names (dnsmasq refuses to give a
//! lease a name that `addn-hosts` has), and the last lease to claim a name or an address wins
//! (a lease has one name, and a name moves with the lease that last claimed it).
//!
//! Finding what a name holds ([`Zone::held`]) and where it goes ([`Zone::route`]) borrows from
//! the zone and allocates nothing: the fast path encodes its answer straight from what they
//! return, and [`Zone::lookup`] builds hickory records from the same, so that the two paths
//! cannot disagree on what is local.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};

use hickory_proto::rr::rdata::{A, PTR, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record};

use super::wire::{self, Labels, NameRef, QName};
use super::{DnsConfig, SrvRecord};

/// Most lease names held at once; DHCP's `lease_max` keeps far below it.
const MAX_LEASE_NAMES: usize = 65_536;
/// Longest TXT character-string (RFC 1035 3.3.14); longer values are split.
const TXT_CHUNK: usize = 255;

/// What the local data says about a question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Local {
    /// Records of the type asked (never empty).
    Records(Vec<Record>),
    /// The name is local, without records of that type.
    NoData,
}

/// The name a PTR query for an address answers with, borrowed from the zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PtrTarget<'a> {
    /// The first `<dns><host>` name of the address.
    Host(&'a QName),
    /// A lease's label, followed by the domain when there is one and the whole fits in a name.
    Lease {
        label: &'a [u8],
        domain: Option<&'a QName>,
    },
}

impl<'a> PtrTarget<'a> {
    pub fn labels(self) -> impl Iterator<Item = &'a [u8]> {
        let (first, rest) = match self {
            PtrTarget::Host(name) => (None, name.labels()),
            PtrTarget::Lease { label, domain } => (
                Some(label),
                domain.map_or_else(Labels::empty, QName::labels),
            ),
        };
        first.into_iter().chain(rest)
    }

    /// Length on the wire, uncompressed, the root label included.
    pub fn wire_len(self) -> usize {
        self.labels().map(|l| 1 + l.len()).sum::<usize>() + 1
    }

    /// Appends the name uncompressed.
    pub fn write(self, out: &mut Vec<u8>) {
        for label in self.labels() {
            out.push(label.len() as u8);
            out.extend_from_slice(label);
        }
        out.push(0);
    }

    pub fn to_hickory(self) -> Option<Name> {
        Name::from_labels(self.labels()).ok()
    }
}

/// What the zone holds under one name, borrowed. The name is local when any of it is there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Held<'a> {
    /// The name is a reverse-lookup name of an address with a name.
    pub ptr: Option<PtrTarget<'a>>,
    /// A addresses, in configuration order (a lease name has one).
    pub addrs: &'a [Ipv4Addr],
    txt: Option<&'a [TXT]>,
    srv: Option<&'a [Srv]>,
}

impl Held<'_> {
    pub fn is_local(&self) -> bool {
        self.ptr.is_some() || !self.addrs.is_empty() || self.txt.is_some() || self.srv.is_some()
    }
}

/// Where a name without local data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    /// Answered here only: NXDOMAIN.
    Local,
    /// A `<forwarder domain=..>` with addresses.
    Servers(&'a [SocketAddr]),
    /// The default upstreams.
    Default,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Srv {
    priority: u16,
    weight: u16,
    port: u16,
    target: QName,
}

/// Why [`Zone::add_lease_name`] did not add a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejected {
    Invalid,
    /// A `<dns><host>` has it.
    Shadowed,
    Full,
}

#[derive(Debug, Clone)]
pub(crate) struct Zone {
    domain: Option<QName>,
    forward_plain_names: bool,
    /// (network, prefix) of the guest subnet, for its reverse zone.
    network: Option<(u32, u8)>,
    /// `<dns><host>` names, qualified ones included, and their addresses in configuration
    /// order.
    hosts: HashMap<QName, Vec<Ipv4Addr>>,
    /// An address's name from `<dns><host>`: its first one (dnsmasq: "first one trumps").
    hosts_ptr: HashMap<Ipv4Addr, QName>,
    /// Lease names: one label each, lowercase.
    leases: BTreeMap<Vec<u8>, Ipv4Addr>,
    lease_by_ip: HashMap<Ipv4Addr, Vec<u8>>,
    txt: HashMap<QName, Vec<TXT>>,
    srv: HashMap<QName, Vec<Srv>>,
    /// Suffixes with their route: empty server list = answered here only.
    routes: Vec<(QName, Vec<SocketAddr>)>,
}

impl Zone {
    /// Builds the zone. Entries whose names cannot be parsed are skipped; the control plane
    /// reports them through [`DnsConfig::validate`].
    pub fn new(config: &DnsConfig) -> Zone {
        let domain = config
            .domain
            .as_deref()
            .and_then(QName::parse)
            .filter(|d| !d.is_root());
        let mut zone = Zone {
            forward_plain_names: config.forward_plain_names,
            network: config.network.map(|(ip, prefix)| {
                let prefix = prefix.min(32);
                (u32::from(ip) & mask(prefix), prefix)
            }),
            hosts: HashMap::new(),
            hosts_ptr: HashMap::new(),
            leases: BTreeMap::new(),
            lease_by_ip: HashMap::new(),
            txt: HashMap::new(),
            srv: HashMap::new(),
            routes: Vec::new(),
            domain,
        };
        for (ip, names) in &config.hosts {
            for name in names {
                let Some(name) = QName::parse(name).filter(|n| !n.is_root()) else {
                    continue;
                };
                // expand-hosts: a name without a dot also gets the domain, and the qualified
                // form comes first so that it is the one PTR answers with.
                if let Some(qualified) = zone.qualify(&name) {
                    zone.add_host(*ip, qualified);
                }
                zone.add_host(*ip, name);
            }
        }
        for (name, value) in &config.txt {
            if let Some(name) = QName::parse(name).filter(|n| !n.is_root()) {
                let chunks: Vec<&[u8]> = if value.is_empty() {
                    vec![&[][..]]
                } else {
                    value.as_bytes().chunks(TXT_CHUNK).collect()
                };
                zone.txt
                    .entry(name)
                    .or_default()
                    .push(TXT::from_bytes(chunks));
            }
        }
        for srv in &config.srv {
            if let Some((name, data)) = zone.srv_entry(srv) {
                zone.srv.entry(name).or_default().push(data);
            }
        }
        if let Some(domain) = &zone.domain
            && config.local_only
        {
            zone.routes.push((domain.clone(), Vec::new()));
        }
        for (suffix, servers) in &config.domain_upstreams {
            if let Some(suffix) = QName::parse(suffix) {
                zone.routes.push((suffix, servers.clone()));
            }
        }
        zone
    }

    /// `name.domain` for a name of one label, when there is a domain.
    fn qualify(&self, name: &QName) -> Option<QName> {
        let domain = self.domain.as_ref()?;
        if name.label_count() != 1 {
            return None;
        }
        domain.prepend(name.first_label()?)
    }

    fn add_host(&mut self, ip: Ipv4Addr, name: QName) {
        self.hosts_ptr.entry(ip).or_insert_with(|| name.clone());
        let ips = self.hosts.entry(name).or_default();
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }

    /// libvirt writes `srv-host=_SERVICE._PROTOCOL[.DOMAIN],TARGET,PORT,PRIORITY,WEIGHT`, and
    /// dnsmasq appends its domain to a name with a single dot (a missing DOMAIN). Without a
    /// target the record says "no such service" (RFC 2782: target "."); with one, dnsmasq's
    /// default port is 1.
    fn srv_entry(&self, srv: &SrvRecord) -> Option<(QName, Srv)> {
        let underscore = |s: &str| {
            if s.starts_with('_') {
                s.to_owned()
            } else {
                format!("_{s}")
            }
        };
        let mut text = format!("{}.{}", underscore(&srv.service), underscore(&srv.protocol));
        if let Some(domain) = srv.domain.as_deref().filter(|d| !d.is_empty()) {
            text.push('.');
            text.push_str(domain);
        }
        let mut name = QName::parse(&text)?;
        if srv.domain.as_deref().is_none_or(str::is_empty)
            && let Some(domain) = &self.domain
        {
            let mut labels: Vec<&[u8]> = name.labels().collect();
            labels.extend(domain.labels());
            name = QName::from_labels(labels)?;
        }
        let target = match srv.target.as_deref() {
            None | Some("" | ".") => None,
            Some(t) => Some(QName::parse(t)?),
        };
        let data = match target {
            Some(target) => Srv {
                priority: srv.priority,
                weight: srv.weight,
                port: if srv.port == 0 { 1 } else { srv.port },
                target,
            },
            None => Srv {
                priority: srv.priority,
                weight: srv.weight,
                port: srv.port,
                target: QName::root(),
            },
        };
        Some((name, data))
    }

    /// A lease's host name: `name` and, with a domain, `name.domain`, plus the PTR of `ip`.
    /// A name with dots is accepted only if what follows the first label is the domain.
    pub fn add_lease_name(&mut self, ip: Ipv4Addr, hostname: &str) -> Result<(), Rejected> {
        let label = self.lease_label(hostname).ok_or(Rejected::Invalid)?;
        let plain = QName::from_labels([&label[..]]).ok_or(Rejected::Invalid)?;
        let qualified = self.qualify(&plain);
        if self.hosts.contains_key(&plain) || qualified.is_some_and(|q| self.hosts.contains_key(&q))
        {
            return Err(Rejected::Shadowed);
        }
        if self.leases.get(&label) == Some(&ip) {
            return Ok(());
        }
        if let Some(old) = self.lease_by_ip.remove(&ip) {
            self.leases.remove(&old);
        }
        if let Some(old_ip) = self.leases.remove(&label) {
            self.lease_by_ip.remove(&old_ip);
        }
        if self.leases.len() >= MAX_LEASE_NAMES {
            return Err(Rejected::Full);
        }
        self.lease_by_ip.insert(ip, label.clone());
        self.leases.insert(label, ip);
        Ok(())
    }

    /// Removes a lease's name if it still belongs to `ip` (a later lease may have taken it).
    pub fn remove_lease_name(&mut self, ip: Ipv4Addr, hostname: &str) -> bool {
        let Some(label) = self.lease_label(hostname) else {
            return false;
        };
        if self.leases.get(&label) != Some(&ip) {
            return false;
        }
        self.leases.remove(&label);
        self.lease_by_ip.remove(&ip);
        true
    }

    /// The lowercase label a lease host name is served under: letters, digits, '-' and '_'.
    fn lease_label(&self, hostname: &str) -> Option<Vec<u8>> {
        let hostname = hostname.strip_suffix('.').unwrap_or(hostname);
        let (label, rest) = hostname.split_once('.').unwrap_or((hostname, ""));
        if !rest.is_empty() && self.domain.as_ref() != QName::parse(rest).as_ref() {
            return None;
        }
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        ok.then(|| label.to_ascii_lowercase().into_bytes())
    }

    /// The lease address `name` stands for: the label itself, or label.domain.
    fn lease_for<'a>(&'a self, name: NameRef<'_>) -> Option<&'a Ipv4Addr> {
        let ip = self.leases.get(name.first_label()?)?;
        match name.label_count() {
            1 => Some(ip),
            _ => {
                let domain = self.domain.as_ref()?;
                (name.parent() == domain.as_name()).then_some(ip)
            }
        }
    }

    fn addresses<'a>(&'a self, name: NameRef<'_>) -> &'a [Ipv4Addr] {
        match self.hosts.get(name.wire()) {
            Some(ips) => ips,
            None => self.lease_for(name).map_or(&[], std::slice::from_ref),
        }
    }

    /// The name a PTR query for `ip` answers with.
    fn ptr_target(&self, ip: Ipv4Addr) -> Option<PtrTarget<'_>> {
        if let Some(name) = self.hosts_ptr.get(&ip) {
            return Some(PtrTarget::Host(name));
        }
        let label = self.lease_by_ip.get(&ip)?;
        // As `qualify`: the plain label when label.domain would be longer than a name.
        let domain = self
            .domain
            .as_ref()
            .filter(|d| 1 + label.len() + d.as_name().wire().len() <= wire::MAX_NAME_LEN);
        Some(PtrTarget::Lease { label, domain })
    }

    /// Everything held under `name`.
    pub fn held(&self, name: NameRef<'_>) -> Held<'_> {
        Held {
            ptr: name.reverse_ip().and_then(|ip| self.ptr_target(ip)),
            addrs: self.addresses(name),
            txt: self.txt.get(name.wire()).map(Vec::as_slice),
            srv: self.srv.get(name.wire()).map(Vec::as_slice),
        }
    }

    /// Local data for (`name`, `qtype`); `None` if the name is not local. `owner` is the name
    /// as the client wrote it, used as the owner of the answers.
    pub fn lookup(&self, name: &QName, qtype: u16, owner: &Name, ttl: u32) -> Option<Local> {
        let held = self.held(name.as_name());
        if !held.is_local() {
            return None;
        }
        let any = qtype == wire::TYPE_ANY;
        let record = |data: RData| Record::from_rdata(owner.clone(), ttl, data);
        let mut records = Vec::new();
        if (any || qtype == wire::TYPE_PTR)
            && let Some(target) = held.ptr.and_then(PtrTarget::to_hickory)
        {
            records.push(record(RData::PTR(PTR(target))));
        }
        if any || qtype == wire::TYPE_A {
            records.extend(held.addrs.iter().map(|ip| record(RData::A(A(*ip)))));
        }
        if any || qtype == wire::TYPE_TXT {
            let txts = held.txt.unwrap_or_default();
            records.extend(txts.iter().map(|t| record(RData::TXT(t.clone()))));
        }
        if any || qtype == wire::TYPE_SRV {
            for s in held.srv.unwrap_or_default() {
                if let Some(target) = s.target.to_hickory() {
                    let srv = SRV::new(s.priority, s.weight, s.port, target);
                    records.push(record(RData::SRV(srv)));
                }
            }
        }
        Some(if records.is_empty() {
            Local::NoData
        } else {
            Local::Records(records)
        })
    }

    /// Where a name without local data goes: the longest matching suffix wins, and between
    /// equally long ones a forwarder with addresses wins over answering locally.
    pub fn route(&self, name: NameRef<'_>) -> Route<'_> {
        let mut best: Option<((usize, bool), &[SocketAddr])> = None;
        for (suffix, servers) in &self.routes {
            let rank = (suffix.label_count(), !servers.is_empty());
            if name.is_in(suffix.as_name()) && best.is_none_or(|(r, _)| rank > r) {
                best = Some((rank, servers));
            }
        }
        if let Some((network, prefix)) = self.network
            && in_reverse_zone(name, network, prefix)
        {
            // The zone's name: one label per octet of the prefix, then in-addr.arpa.
            let rank = (2 + usize::from(prefix).div_ceil(8), false);
            if best.is_none_or(|(r, _)| rank > r) {
                best = Some((rank, &[]));
            }
        }
        match best {
            Some((_, [])) => Route::Local,
            Some((_, servers)) => Route::Servers(servers),
            None if !self.forward_plain_names && name.label_count() == 1 => Route::Local,
            None => Route::Default,
        }
    }

    /// Every A name held, for `switchyard` to show.
    pub fn names(&self) -> Vec<(String, Ipv4Addr)> {
        let mut out: Vec<(String, Ipv4Addr)> = self
            .hosts
            .iter()
            .flat_map(|(name, ips)| ips.iter().map(move |ip| (name.to_string(), *ip)))
            .collect();
        for (label, ip) in &self.leases {
            if let Some(plain) = QName::from_labels([&label[..]]) {
                if let Some(qualified) = self.qualify(&plain) {
                    out.push((qualified.to_string(), *ip));
                }
                out.push((plain.to_string(), *ip));
            }
        }
        out.sort();
        out
    }
}

fn mask(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

/// Whether `name` is in the reverse zone of network/prefix. The zone is cut at octet
/// boundaries (RFC 1035 3.5 names have one label per octet): a /24 is `c.b.a.in-addr.arpa`,
/// a /16 `b.a.in-addr.arpa`, and a prefix between two octets is covered by the zones one octet
/// longer that lie inside it (a /20 by sixteen /24 zones, a /26 by its 64 addresses), so that
/// no name of an address outside the network is ever answered here.
fn in_reverse_zone(name: NameRef<'_>, network: u32, prefix: u8) -> bool {
    // in-addr.arpa and at most four octets.
    let (tail, n) = name.last_labels::<6>();
    if n < 2 || tail[5] != b"arpa" || tail[4] != b"in-addr" {
        return false;
    }
    let octets = usize::from(prefix).div_ceil(8);
    let mut addr = 0u32;
    for i in 0..octets {
        if n < 3 + i {
            return false;
        }
        let Some(octet) = wire::octet(tail[3 - i]) else {
            return false;
        };
        addr |= u32::from(octet) << (24 - 8 * i);
    }
    addr & mask(prefix) == network
}
