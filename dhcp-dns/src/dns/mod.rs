//! The DNS forwarder of the virtual gateway.
//!
//! Guests on a libvirt network send their queries to the gateway, where dnsmasq answers the
//! names it knows (leases, `<dns><host>`, `<txt>`, `<srv>`), answers from its cache, and
//! forwards the rest to the host's resolvers in `strict-order`. It is a caching forwarder, not
//! a recursive resolver, and that is what this module is: the same behaviours, without sockets
//! or clocks, so the engine can hand it a datagram's payload with `now` and send what comes out
//! of [`DnsServer::poll_output`], and the tests can replay whole exchanges with upstreams.
//!
//! What dnsmasq (2.86 to 2.90, `forward.c`, `rfc1035.c`, `domain-match.c`) does, and is done
//! here:
//! - an opcode other than QUERY is answered NOTIMP;
//! - a name with local data is answered from it for any type, NODATA for types it lacks,
//!   and is never forwarded; with TTL `local-ttl` (0 by default);
//! - a name under a `local=` domain (libvirt's `localOnly`, `localPTR`, and `local=//` for
//!   plain names with `forwardPlainNames='no'`) without local data is NXDOMAIN;
//! - with no server for a name (none configured, or none in resolv.conf) the answer is
//!   REFUSED, dnsmasq's "nowhere to forward to" (`setup_reply` with no flags); so is a query
//!   that finds the table of forwarded queries full (dnsmasq's "Maximum number of concurrent
//!   DNS queries reached"), or too many clients waiting on one question;
//! - in `strict-order` a SERVFAIL or REFUSED from a server sends the query to the next one
//!   ("for broken servers, attempt to send to another one"); the last server's error is
//!   relayed to the client;
//! - the query ID is replaced by one of ours and an answer is accepted only from a server the
//!   query went to, with our ID and the same question; identical questions from several
//!   clients share one upstream query;
//! - AD is cleared (RFC 4035 3.2.3 / 4.6: nothing here validates), RA is set.
//!
//! Where this differs, on purpose:
//! - a query with a question count other than one gets FORMERR (RFC 1035 4.1.1; dnsmasq 2.86+
//!   answers REFUSED with the extended error "invalid data");
//! - dnsmasq moves to the next server only when the client retries; here each server gets
//!   [`DnsConfig::upstream_timeout`] before the next one is tried, and the client gets SERVFAIL
//!   after the last, so a dead first server costs one timeout, not one client retry. A client
//!   retry of a question still pending resends it to the current server (a lost datagram);
//!   an answer from an earlier server that arrives late is still taken;
//! - the query sent upstream is rebuilt from the question: RD set, our own EDNS0 OPT with
//!   payload [`EDNS_PAYLOAD`], no DO or CD. Answers are therefore shared and cached whatever
//!   the client's flags, and DNSSEC records are not proxied;
//! - a truncated (TC) upstream answer is relayed as TC with the question only, also to a TCP
//!   client: forwarding over TCP would need a stream from the I/O edge;
//! - `<forwarder domain='x'/>` without an address is answered locally, as libvirt documents,
//!   where libvirt's `server=/x/#` makes dnsmasq use the default servers (libvirt issue 597).
//!
//! EDNS0 (RFC 6891): a client's OPT is answered with one (payload [`EDNS_PAYLOAD`], DO echoed),
//! an OPT version above 0 with BADVERS (6.1.3); a UDP answer is limited to the client's payload
//! size (512 without OPT, RFC 1035 4.2.1), dropping the additional section first and then, with
//! TC set and only the question left, the answer and authority sections (RFC 2181 9), so the
//! client retries over TCP. Over TCP answers are never truncated: the caller adds the two-byte
//! length (RFC 1035 4.2.2) and hands over bare messages.
//!
//! Speed: the question guests ask most, the A (or AAAA, PTR) of a local name, is answered by
//! `fast` from the raw bytes, without hickory and with no allocation but the answer's buffer;
//! its answers are the hickory path's byte for byte, and it steps aside for anything else
//! (errors, truncation, forwarding, other types), which `handle_query` then decides as before.

mod cache;
mod fast;
#[cfg(test)]
mod tests;
mod wire;
mod zone;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};

use cache::{Answer, Cache};
use wire::{Header, QName, Question};
use zone::{Local, Rejected, Route, Zone};

/// UDP port of the service.
pub const PORT: u16 = 53;
/// The UDP payload size advertised to clients and upstreams, and the largest UDP answer sent:
/// the DNS flag day 2020 value, which fits an IPv6 minimum MTU without fragments.
pub const EDNS_PAYLOAD: u16 = 1232;
/// dnsmasq's default `cache-size`.
pub const DEFAULT_CACHE_SIZE: usize = 150;
/// How long one upstream server has to answer before the next is tried.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Most questions forwarded and unanswered at once (dnsmasq's `dns-forward-max` is 150; this
/// only bounds memory).
pub const MAX_IN_FLIGHT: usize = 4096;
/// Most clients waiting on one forwarded question.
pub const MAX_WAITERS: usize = 64;
/// UDP answer size without EDNS0 (RFC 1035 4.2.1).
const PLAIN_UDP_PAYLOAD: u16 = 512;
/// Cache entries looked at for expiry per timer call.
const SWEEP_BUDGET: usize = 32;

/// An SRV record from `<dns><srv service= protocol= domain= target= port= priority=
/// weight=/>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvRecord {
    /// Without the leading underscore, as in the XML (one is added unless present).
    pub service: String,
    pub protocol: String,
    /// Defaults to the network's domain.
    pub domain: Option<String>,
    /// `None` or "." says the service is not available (RFC 2782).
    pub target: Option<String>,
    /// 0 with a target means dnsmasq's default, 1.
    pub port: u16,
    pub priority: u16,
    pub weight: u16,
}

/// What the forwarder serves, from libvirt's network XML and the host's resolv.conf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// `<domain name=..>`: lease names are served as NAME and NAME.DOMAIN, and `<dns><host>`
    /// names without a dot also as NAME.DOMAIN (dnsmasq's `expand-hosts`).
    pub domain: Option<String>,
    /// `<domain localOnly='yes'>`: names under the domain are never forwarded.
    pub local_only: bool,
    /// The guest subnet: PTR names in its reverse zone are answered here and never forwarded
    /// (libvirt's `<ip localPTR='yes'>`); `None` forwards unknown ones.
    pub network: Option<(Ipv4Addr, u8)>,
    /// `<dns><host ip=..><hostname>..</hostname>..</host>` (dnsmasq's `addn-hosts`): A and
    /// PTR; the first name of an address is its PTR.
    pub hosts: Vec<(Ipv4Addr, Vec<String>)>,
    /// `<dns><txt name= value=/>`, served under exactly that name (`txt-record=NAME,VALUE`).
    pub txt: Vec<(String, String)>,
    /// `<dns><srv/>` (`srv-host=`).
    pub srv: Vec<SrvRecord>,
    /// Default servers, tried in this order (`strict-order`).
    pub upstreams: Vec<SocketAddr>,
    /// `<forwarder domain=.. addr=..>`: names under a domain go only to its servers (longest
    /// suffix wins); an empty list answers the domain locally.
    pub domain_upstreams: Vec<(String, Vec<SocketAddr>)>,
    /// `<dns forwardPlainNames=..>`, default yes; no makes names without a dot local-only.
    pub forward_plain_names: bool,
    /// Cached answers (dnsmasq's `cache-size`); 0 disables the cache.
    pub cache_size: usize,
    /// TTL of local answers (dnsmasq's `local-ttl`, 0 by default).
    pub local_ttl: u32,
    /// How long each upstream server has before the next is tried.
    pub upstream_timeout: Duration,
}

impl DnsConfig {
    /// dnsmasq's defaults as libvirt leaves them, and no data or servers.
    pub fn new() -> Self {
        DnsConfig {
            domain: None,
            local_only: false,
            network: None,
            hosts: Vec::new(),
            txt: Vec::new(),
            srv: Vec::new(),
            upstreams: Vec::new(),
            domain_upstreams: Vec::new(),
            forward_plain_names: true,
            cache_size: DEFAULT_CACHE_SIZE,
            local_ttl: 0,
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
        }
    }

    /// Checks every name. [`DnsServer::new`] skips entries it cannot use; the control plane
    /// should report them instead.
    pub fn validate(&self) -> Result<(), DnsConfigError> {
        let name = |n: &str| {
            QName::parse(n)
                .map(|_| ())
                .ok_or_else(|| DnsConfigError::Name(n.to_owned()))
        };
        if let Some(domain) = &self.domain {
            name(domain)?;
        }
        if let Some((ip, prefix)) = self.network
            && prefix > 32
        {
            return Err(DnsConfigError::Prefix(ip, prefix));
        }
        for (_, names) in &self.hosts {
            names.iter().try_for_each(|n| name(n))?;
        }
        for (n, _) in &self.txt {
            name(n)?;
        }
        for srv in &self.srv {
            name(&format!("_{}._{}", srv.service, srv.protocol))?;
            if let Some(d) = &srv.domain {
                name(d)?;
            }
            if let Some(t) = &srv.target {
                name(t)?;
            }
        }
        for (d, _) in &self.domain_upstreams {
            name(d)?;
        }
        Ok(())
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig::new()
    }
}

/// Why a [`DnsConfig`] cannot be served as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsConfigError {
    #[error("invalid DNS name {0:?}")]
    Name(String),
    #[error("network {0}/{1}: prefix longer than 32")]
    Prefix(Ipv4Addr, u8),
}

/// How a query arrived; TCP answers are never truncated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Who asked: opaque to the forwarder, handed back with the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Client {
    pub addr: SocketAddr,
    pub token: u64,
    pub transport: Transport,
}

/// Something to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// An answer (a bare DNS message) for a client.
    ToClient(Client, Vec<u8>),
    /// A query for an upstream server, over UDP.
    ToUpstream(SocketAddr, Vec<u8>),
}

/// Why a query got no answer at all. Every one is also counted in [`DnsCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DnsDrop {
    #[error("message shorter than a DNS header")]
    Short,
    #[error("message is a response (QR set), not a query")]
    NotAQuery,
    #[error("answer could not be encoded")]
    Encode,
}

/// What the forwarder did, for `switchyard stats`. One counter per drop and per answer kind.
#[derive(Default, Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DnsCounters {
    /// Every message handed to [`DnsServer::handle_query`].
    pub queries: u64,
    /// Answered from local data with records.
    pub local_answers: u64,
    /// Answered NODATA for a local name asked for a type it lacks.
    pub local_nodata: u64,
    /// NXDOMAIN for a name under a local-only zone.
    pub nxdomain_local: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_inserts: u64,
    pub cache_evictions: u64,
    pub cache_expired: u64,
    /// Questions sent upstream (not counting failovers and resends).
    pub forwarded: u64,
    /// Queries that joined a question already forwarded for another client.
    pub coalesced: u64,
    /// Client retransmissions of a question still forwarded (resent to the current server).
    pub client_retries: u64,
    /// Upstream messages matched to a forwarded question.
    pub upstream_responses: u64,
    /// SERVFAIL or REFUSED from an upstream.
    pub upstream_errors: u64,
    /// Matched upstream answers that hickory could not decode.
    pub upstream_malformed: u64,
    /// Matched upstream answers with TC set, relayed as such.
    pub upstream_truncated: u64,
    pub upstream_timeouts: u64,
    /// Moves to the next server (after a timeout, SERVFAIL, REFUSED or an undecodable answer).
    pub upstream_failovers: u64,
    /// Upstream messages that match no forwarded question (wrong ID, server or question),
    /// are not responses, or are too short: ignored.
    pub unmatched_responses: u64,
    pub servfail_sent: u64,
    /// Every REFUSED sent; the reasons follow.
    pub refused: u64,
    pub refused_no_upstream: u64,
    pub refused_busy: u64,
    pub formerr: u64,
    pub notimp: u64,
    pub badvers: u64,
    /// UDP answers sent with TC set because they did not fit the client's payload size.
    pub truncated: u64,
    // drops
    pub dropped_malformed: u64,
    pub dropped_not_query: u64,
    pub encode_errors: u64,
    // names from DHCP
    pub names_added: u64,
    pub names_removed: u64,
    pub names_invalid: u64,
    /// Lease names not served because a `<dns><host>` has the name.
    pub names_shadowed: u64,
    pub names_full: u64,
}

/// A client waiting for an answer, with what its answer must echo.
#[derive(Debug, Clone)]
struct Waiter {
    client: Client,
    id: u16,
    rd: bool,
    cd: bool,
    /// The question as the client wrote it (RFC 1035 7.1: echoed, case included).
    query: Query,
    edns: Option<ClientEdns>,
}

#[derive(Debug, Clone, Copy)]
struct ClientEdns {
    payload: u16,
    dnssec_ok: bool,
}

impl Waiter {
    /// The largest answer this client takes.
    fn limit(&self) -> usize {
        match self.client.transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => usize::from(self.edns.map_or(PLAIN_UDP_PAYLOAD, |e| {
                e.payload.clamp(PLAIN_UDP_PAYLOAD, EDNS_PAYLOAD)
            })),
        }
    }
}

/// A question forwarded upstream and not yet answered.
#[derive(Debug, Clone)]
struct Pending {
    question: Question,
    /// The query as sent (our ID), for failovers and resends.
    packet: Vec<u8>,
    servers: Vec<SocketAddr>,
    /// Index into `servers` of the one being waited on.
    current: usize,
    deadline: Instant,
    waiters: Vec<Waiter>,
}

impl Pending {
    /// Whether `from` is a server this query went to.
    fn sent_to(&self, from: SocketAddr) -> bool {
        self.servers
            .get(..=self.current)
            .is_some_and(|s| s.contains(&from))
    }
}

/// How a forwarded question ends.
#[derive(Debug)]
enum Outcome {
    Answer(Answer),
    /// An answer that upstream truncated: relayed as TC with only the question.
    Truncated,
    Error(ResponseCode),
}

/// Whether an answer can be put in a message: hickory decodes some records it cannot encode.
fn encodable(answer: &Answer) -> bool {
    let mut m = Message::new(0, MessageType::Response, OpCode::Query);
    m.answers.clone_from(&answer.answers);
    m.authorities.clone_from(&answer.authorities);
    m.additionals.clone_from(&answer.additionals);
    m.to_vec().is_ok()
}

/// The forwarder: local data, cache, and the questions forwarded upstream.
#[derive(Debug)]
pub struct DnsServer {
    config: DnsConfig,
    zone: Zone,
    cache: Cache,
    pending: HashMap<u16, Pending>,
    by_question: HashMap<Question, u16>,
    deadlines: BTreeSet<(Instant, u16)>,
    output: VecDeque<Output>,
    rng: u64,
    counters: DnsCounters,
    /// Tests turn the fast path off to compare its answers with the hickory path's.
    #[cfg(test)]
    fast_path: bool,
}

impl DnsServer {
    /// A forwarder whose upstream query IDs come from a seed taken from the process's random
    /// hash keys.
    pub fn new(config: DnsConfig) -> Self {
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        DnsServer::with_seed(config, seed)
    }

    /// A forwarder whose upstream query IDs follow from `seed`: for tests and reproducible
    /// traces. In service the IDs must be unpredictable, use [`DnsServer::new`].
    pub fn with_seed(config: DnsConfig, seed: u64) -> Self {
        DnsServer {
            zone: Zone::new(&config),
            cache: Cache::new(config.cache_size),
            pending: HashMap::new(),
            by_question: HashMap::new(),
            deadlines: BTreeSet::new(),
            output: VecDeque::new(),
            // xorshift64 must not start at 0.
            rng: seed | 1,
            counters: DnsCounters::default(),
            #[cfg(test)]
            fast_path: true,
            config,
        }
    }

    /// The default servers changed (resolv.conf). Questions already forwarded keep theirs.
    pub fn set_upstreams(&mut self, upstreams: Vec<SocketAddr>) {
        self.config.upstreams = upstreams;
    }

    /// A lease with host name `hostname` (one label, or one label and the domain) holds `ip`:
    /// serve `hostname`, `hostname.domain` and the PTR of `ip`. A name held by another lease,
    /// or another name of this address, is replaced; a `<dns><host>` name is not.
    pub fn add_name(&mut self, ip: Ipv4Addr, hostname: &str) {
        match self.zone.add_lease_name(ip, hostname) {
            Ok(()) => self.counters.names_added += 1,
            Err(Rejected::Invalid) => self.counters.names_invalid += 1,
            Err(Rejected::Shadowed) => self.counters.names_shadowed += 1,
            Err(Rejected::Full) => self.counters.names_full += 1,
        }
    }

    /// The lease of `ip` named `hostname` ended: its names go, unless another lease took them.
    pub fn remove_name(&mut self, ip: Ipv4Addr, hostname: &str) {
        if self.zone.remove_lease_name(ip, hostname) {
            self.counters.names_removed += 1;
        }
    }

    /// Every name with an A record held locally, and its address.
    pub fn names(&self) -> Vec<(String, Ipv4Addr)> {
        self.zone.names()
    }

    pub fn counters(&self) -> &DnsCounters {
        &self.counters
    }

    /// Entries in the cache.
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Questions forwarded and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// The next thing to send. Call until `None` after every `handle_*` call.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.output.pop_front()
    }

    /// When [`DnsServer::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// A query from a guest. It is answered at once (local data, cache, or an error) or
    /// forwarded; only a message that cannot be answered at all (shorter than a header, or a
    /// response) is dropped.
    pub fn handle_query(
        &mut self,
        now: Instant,
        client: Client,
        query: &[u8],
    ) -> Result<(), DnsDrop> {
        self.counters.queries += 1;
        let Some(header) = Header::parse(query) else {
            self.counters.dropped_malformed += 1;
            return Err(DnsDrop::Short);
        };
        if header.qr {
            self.counters.dropped_not_query += 1;
            return Err(DnsDrop::NotAQuery);
        }
        if let Some((kind, reply)) = self.fast_answer(&header, client, query) {
            // The counters the hickory path moves for the same answer (see `fast`).
            match kind {
                fast::Kind::Records => self.counters.local_answers += 1,
                fast::Kind::NoData => self.counters.local_nodata += 1,
                fast::Kind::NxDomain => self.counters.nxdomain_local += 1,
            }
            self.output.push_back(Output::ToClient(client, reply));
            return Ok(());
        }
        let question = if header.qdcount == 1 {
            Question::read(query)
        } else {
            None
        };
        if header.opcode != wire::OPCODE_QUERY {
            // RFC 1035 4.1.1 / dnsmasq: NOTIMP, with the question echoed if it can be read.
            self.counters.notimp += 1;
            let raw = question
                .as_ref()
                .and_then(|(_, end)| query.get(wire::HEADER_LEN..*end));
            let reply = wire::header_reply(&header, wire::RCODE_NOTIMP, raw);
            self.output.push_back(Output::ToClient(client, reply));
            return Ok(());
        }
        // The question read by hand and the whole message by hickory; both must agree that
        // there is exactly one question.
        let decoded = question.and_then(|(question, _)| {
            let message = Message::from_vec(query).ok()?;
            let [query] = <[Query; 1]>::try_from(message.queries).ok()?;
            Some((question, query, message.edns))
        });
        let Some((question, query, edns)) = decoded else {
            self.counters.formerr += 1;
            let reply = wire::header_reply(&header, wire::RCODE_FORMERR, None);
            self.output.push_back(Output::ToClient(client, reply));
            return Ok(());
        };
        let waiter = Waiter {
            client,
            id: header.id,
            rd: header.rd,
            cd: header.cd,
            query,
            edns: edns.as_ref().map(|e| ClientEdns {
                payload: e.max_payload().max(PLAIN_UDP_PAYLOAD),
                dnssec_ok: e.flags().dnssec_ok,
            }),
        };
        if edns.as_ref().is_some_and(|e| e.version() > 0) {
            // RFC 6891 6.1.3.
            self.counters.badvers += 1;
            return self.answer_now(&waiter, ResponseCode::BADVERS, false, None);
        }
        if question.qclass != wire::CLASS_IN {
            self.counters.notimp += 1;
            return self.answer_now(&waiter, ResponseCode::NotImp, false, None);
        }
        match question.qtype {
            wire::TYPE_AXFR | wire::TYPE_IXFR | wire::TYPE_MAILA | wire::TYPE_MAILB => {
                self.counters.notimp += 1;
                return self.answer_now(&waiter, ResponseCode::NotImp, false, None);
            }
            wire::TYPE_OPT => {
                self.counters.formerr += 1;
                return self.answer_now(&waiter, ResponseCode::FormErr, false, None);
            }
            _ => {}
        }

        let local = self.zone.lookup(
            &question.name,
            question.qtype,
            waiter.query.name(),
            self.config.local_ttl,
        );
        match local {
            Some(Local::Records(records)) => {
                self.counters.local_answers += 1;
                let answer = Answer {
                    rcode: ResponseCode::NoError,
                    answers: records,
                    authorities: Vec::new(),
                    additionals: Vec::new(),
                };
                return self.answer_now(&waiter, ResponseCode::NoError, true, Some(&answer));
            }
            Some(Local::NoData) => {
                self.counters.local_nodata += 1;
                return self.answer_now(&waiter, ResponseCode::NoError, true, None);
            }
            None => {}
        }
        let servers = match self.zone.route(question.name.as_name()) {
            Route::Local => {
                self.counters.nxdomain_local += 1;
                return self.answer_now(&waiter, ResponseCode::NXDomain, true, None);
            }
            Route::Servers(servers) => servers.to_vec(),
            Route::Default => self.config.upstreams.clone(),
        };

        if let Some(answer) = self.cache.get(now, &question, &mut self.counters) {
            self.counters.cache_hits += 1;
            return self.answer_now(&waiter, answer.rcode, false, Some(&answer));
        }
        self.counters.cache_misses += 1;
        self.forward(now, waiter, question, servers)
    }

    /// The answer of [`fast::answer`] for a query the hickory path would answer from local
    /// data, byte for byte the same; `None` sends the query down that path.
    fn fast_answer(
        &self,
        header: &Header,
        client: Client,
        query: &[u8],
    ) -> Option<(fast::Kind, Vec<u8>)> {
        #[cfg(test)]
        if !self.fast_path {
            return None;
        }
        fast::answer(
            &self.zone,
            self.config.local_ttl,
            header,
            query,
            client.transport,
        )
    }

    /// Sends `waiter` its answer now; an encoding failure drops the query.
    fn answer_now(
        &mut self,
        waiter: &Waiter,
        rcode: ResponseCode,
        authoritative: bool,
        answer: Option<&Answer>,
    ) -> Result<(), DnsDrop> {
        if self.respond(waiter, rcode, authoritative, answer) {
            Ok(())
        } else {
            Err(DnsDrop::Encode)
        }
    }

    /// Encodes and queues an answer for `waiter`, within its size limit. Returns false (and
    /// counts) if it cannot be encoded.
    fn respond(
        &mut self,
        waiter: &Waiter,
        rcode: ResponseCode,
        authoritative: bool,
        answer: Option<&Answer>,
    ) -> bool {
        match rcode {
            ResponseCode::ServFail => self.counters.servfail_sent += 1,
            ResponseCode::Refused => self.counters.refused += 1,
            _ => {}
        }
        let mut m = Message::new(waiter.id, MessageType::Response, OpCode::Query);
        m.metadata.authoritative = authoritative;
        m.metadata.recursion_desired = waiter.rd;
        m.metadata.recursion_available = true;
        m.metadata.checking_disabled = waiter.cd;
        m.metadata.response_code = rcode;
        m.add_query(waiter.query.clone());
        if let Some(client) = waiter.edns {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            edns.set_version(0);
            edns.set_dnssec_ok(client.dnssec_ok);
            m.set_edns(edns);
        }
        if let Some(answer) = answer {
            m.answers.clone_from(&answer.answers);
            m.authorities.clone_from(&answer.authorities);
            m.additionals.clone_from(&answer.additionals);
        }
        let limit = waiter.limit();
        let mut bytes = m.to_vec();
        if matches!(&bytes, Ok(b) if b.len() > limit) && !m.additionals.is_empty() {
            // RFC 2181 9: what does not fit of the additional section is left out, no TC.
            m.additionals.clear();
            bytes = m.to_vec();
        }
        if matches!(&bytes, Ok(b) if b.len() > limit) {
            self.counters.truncated += 1;
            m.answers.clear();
            m.authorities.clear();
            m.metadata.truncation = true;
            bytes = m.to_vec();
        }
        match bytes {
            Ok(bytes) if bytes.len() <= limit => {
                self.output
                    .push_back(Output::ToClient(waiter.client, bytes));
                true
            }
            _ => {
                self.counters.encode_errors += 1;
                false
            }
        }
    }

    /// Forwards `question` for `waiter`, or joins it to the same question already forwarded.
    fn forward(
        &mut self,
        now: Instant,
        waiter: Waiter,
        question: Question,
        servers: Vec<SocketAddr>,
    ) -> Result<(), DnsDrop> {
        if let Some(&id) = self.by_question.get(&question)
            && let Some(pending) = self.pending.get_mut(&id)
        {
            let retry = pending
                .waiters
                .iter()
                .any(|w| w.client == waiter.client && w.id == waiter.id);
            if retry {
                // The client did not hear back and asked again: the datagram to the server or
                // its answer may have been lost, so send it again.
                self.counters.client_retries += 1;
                if let Some(&server) = pending.servers.get(pending.current) {
                    let packet = pending.packet.clone();
                    self.output.push_back(Output::ToUpstream(server, packet));
                }
                return Ok(());
            }
            if pending.waiters.len() < MAX_WAITERS {
                self.counters.coalesced += 1;
                pending.waiters.push(waiter);
                return Ok(());
            }
            self.counters.refused_busy += 1;
            return self.answer_now(&waiter, ResponseCode::Refused, false, None);
        }
        let Some(&first) = servers.first() else {
            self.counters.refused_no_upstream += 1;
            return self.answer_now(&waiter, ResponseCode::Refused, false, None);
        };
        if self.pending.len() >= MAX_IN_FLIGHT {
            self.counters.refused_busy += 1;
            return self.answer_now(&waiter, ResponseCode::Refused, false, None);
        }
        let id = self.fresh_id();
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(waiter.query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        edns.set_version(0);
        m.set_edns(edns);
        let Ok(packet) = m.to_vec() else {
            self.counters.encode_errors += 1;
            return self.answer_now(&waiter, ResponseCode::ServFail, false, None);
        };
        let deadline = self.deadline(now);
        self.output
            .push_back(Output::ToUpstream(first, packet.clone()));
        self.counters.forwarded += 1;
        self.deadlines.insert((deadline, id));
        self.by_question.insert(question.clone(), id);
        self.pending.insert(
            id,
            Pending {
                question,
                packet,
                servers,
                current: 0,
                deadline,
                waiters: vec![waiter],
            },
        );
        Ok(())
    }

    /// When a server asked now has had its time. (A timeout too large for `Instant` gives
    /// none: the configuration is absurd, and waiting forever would leak the query.)
    fn deadline(&self, now: Instant) -> Instant {
        now.checked_add(self.config.upstream_timeout).unwrap_or(now)
    }

    /// An upstream ID not in use: xorshift64, skipping IDs of questions in flight.
    fn fresh_id(&mut self) -> u16 {
        loop {
            let mut x = self.rng;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.rng = x;
            let id = (x >> 32) as u16;
            if !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    /// Sends the question `id` to its next server. False if there is none left.
    fn failover(&mut self, now: Instant, id: u16) -> bool {
        let Some(pending) = self.pending.get_mut(&id) else {
            return false;
        };
        let Some(&next) = pending.servers.get(pending.current + 1) else {
            return false;
        };
        pending.current += 1;
        self.deadlines.remove(&(pending.deadline, id));
        pending.deadline = now.checked_add(self.config.upstream_timeout).unwrap_or(now);
        self.deadlines.insert((pending.deadline, id));
        self.output
            .push_back(Output::ToUpstream(next, pending.packet.clone()));
        self.counters.upstream_failovers += 1;
        true
    }

    /// Ends the question `id`: every waiter gets the outcome.
    fn finish(&mut self, id: u16, outcome: &Outcome) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        self.deadlines.remove(&(pending.deadline, id));
        self.by_question.remove(&pending.question);
        for waiter in &pending.waiters {
            match outcome {
                Outcome::Answer(answer) => {
                    if !self.respond(waiter, answer.rcode, false, Some(answer)) {
                        self.respond(waiter, ResponseCode::ServFail, false, None);
                    }
                }
                Outcome::Truncated => self.respond_truncated(waiter),
                Outcome::Error(rcode) => {
                    self.respond(waiter, *rcode, false, None);
                }
            }
        }
    }

    /// An empty answer with TC set, for an upstream answer that was itself truncated.
    fn respond_truncated(&mut self, waiter: &Waiter) {
        let mut m = Message::new(waiter.id, MessageType::Response, OpCode::Query);
        m.metadata.truncation = true;
        m.metadata.recursion_desired = waiter.rd;
        m.metadata.recursion_available = true;
        m.metadata.checking_disabled = waiter.cd;
        m.add_query(waiter.query.clone());
        if let Some(client) = waiter.edns {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            edns.set_dnssec_ok(client.dnssec_ok);
            m.set_edns(edns);
        }
        match m.to_vec() {
            Ok(bytes) => self
                .output
                .push_back(Output::ToClient(waiter.client, bytes)),
            Err(_) => self.counters.encode_errors += 1,
        }
    }

    /// A message from upstream `from`. It is used only if it answers a question we sent to
    /// `from`, with our ID and the same question (RFC 5452 9.1); anything else is counted and
    /// ignored.
    pub fn handle_upstream(&mut self, now: Instant, from: SocketAddr, response: &[u8]) {
        let Some(header) = Header::parse(response) else {
            self.counters.unmatched_responses += 1;
            return;
        };
        let Some(pending) = self.pending.get(&header.id) else {
            self.counters.unmatched_responses += 1;
            return;
        };
        let matched = header.qr
            && header.opcode == wire::OPCODE_QUERY
            && header.qdcount == 1
            && pending.sent_to(from)
            && Question::read(response).is_some_and(|(q, _)| q == pending.question);
        if !matched {
            self.counters.unmatched_responses += 1;
            return;
        }
        let id = header.id;
        let from_current = pending.servers.get(pending.current) == Some(&from);
        self.counters.upstream_responses += 1;

        if header.tc {
            // Not cached: the client retries over TCP. Forwarding over TCP is the I/O
            // edge's to add; until then a TCP client gets the same.
            self.counters.upstream_truncated += 1;
            self.finish(id, &Outcome::Truncated);
            return;
        }
        let rcode = header.rcode;
        if rcode == wire::RCODE_SERVFAIL || rcode == wire::RCODE_REFUSED {
            // strict-order: a broken or unwilling server passes the question to the next.
            self.counters.upstream_errors += 1;
            if !from_current {
                // A server already given up on; the current one may still answer.
                return;
            }
            if !self.failover(now, id) {
                self.finish(id, &Outcome::Error(ResponseCode::from_low(rcode)));
            }
            return;
        }
        // What hickory cannot decode, or cannot encode again once decoded, cannot be relayed
        // or cached: like a SERVFAIL from that server.
        let answer = Message::from_vec(response).ok().and_then(|message| {
            let answer = Answer {
                rcode: message.metadata.response_code,
                answers: message.answers,
                authorities: message.authorities,
                additionals: message.additionals,
            };
            encodable(&answer).then_some(answer)
        });
        let Some(answer) = answer else {
            self.counters.upstream_malformed += 1;
            if from_current && !self.failover(now, id) {
                self.finish(id, &Outcome::Error(ResponseCode::ServFail));
            }
            return;
        };
        if let Some(pending) = self.pending.get(&id) {
            let question = pending.question.clone();
            self.cache
                .insert(now, question, &answer, &mut self.counters);
        }
        self.finish(id, &Outcome::Answer(answer));
    }

    /// Timers: a server that did not answer in time passes the question to the next, and after
    /// the last the clients get SERVFAIL. Also drops some expired cache entries.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            if !self.pending.contains_key(&id) {
                self.deadlines.pop_first();
                continue;
            }
            // failover and finish both move or remove this deadline.
            self.counters.upstream_timeouts += 1;
            if !self.failover(now, id) {
                self.finish(id, &Outcome::Error(ResponseCode::ServFail));
            }
        }
        self.cache.sweep(now, SWEEP_BUDGET, &mut self.counters);
    }
}
