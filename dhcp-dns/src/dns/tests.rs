//! Exchanges between guests, the forwarder and upstream servers, with messages built and read
//! by hickory as a stub resolver and a recursive server would build and read them.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::*;

mod fast;

const UP1: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(203, 0, 113, 53)), 53);
const UP2: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(198, 51, 100, 53)), 53);
const UP3: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53)), 53);
const TIMEOUT: Duration = Duration::from_millis(500);

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 122, n)
}

/// A fully qualified name, as decoded from the wire.
fn name(s: &str) -> Name {
    let mut n = Name::from_ascii(s).unwrap();
    n.set_fqdn(true);
    n
}

fn client(n: u8) -> Client {
    Client {
        addr: SocketAddr::from((ip(n), 40_000 + u16::from(n))),
        token: u64::from(n),
        transport: Transport::Udp,
    }
}

fn tcp_client(n: u8) -> Client {
    Client {
        transport: Transport::Tcp,
        ..client(n)
    }
}

/// libvirt's default network with `<domain name='lab'/>`, localPTR and two resolvers.
fn config() -> DnsConfig {
    let mut c = DnsConfig::new();
    c.domain = Some("lab".into());
    c.network = Some((ip(1), 24));
    c.upstreams = vec![UP1, UP2];
    c.upstream_timeout = TIMEOUT;
    c
}

fn server_with(config: DnsConfig) -> DnsServer {
    DnsServer::with_seed(config, 0x5eed)
}

fn server() -> DnsServer {
    server_with(config())
}

/// A query as a stub resolver sends it: RD set, no OPT.
fn query(id: u16, qname: &str, qtype: RecordType) -> Message {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name(qname), qtype));
    m
}

/// The same with an EDNS0 OPT advertising `payload`.
fn edns_query(id: u16, qname: &str, qtype: RecordType, payload: u16) -> Message {
    let mut m = query(id, qname, qtype);
    let mut edns = Edns::new();
    edns.set_max_payload(payload);
    m.set_edns(edns);
    m
}

fn outputs(s: &mut DnsServer) -> Vec<Output> {
    std::iter::from_fn(|| s.poll_output()).collect()
}

fn decode(bytes: &[u8]) -> Message {
    Message::from_vec(bytes).unwrap()
}

/// Sends `q` from `c` and expects exactly one answer, to `c`, echoing ID and question.
fn ask(s: &mut DnsServer, now: Instant, c: Client, q: &Message) -> (Message, usize) {
    s.handle_query(now, c, &q.to_vec().unwrap()).unwrap();
    let out = outputs(s);
    assert_eq!(out.len(), 1, "{out:?}");
    let Output::ToClient(to, bytes) = &out[0] else {
        panic!("expected an answer, got {out:?}");
    };
    assert_eq!(*to, c);
    let a = decode(bytes);
    // RFC 1035 4.1.1: the ID and the question come back; QR set, opcode copied.
    assert_eq!(a.metadata.id, q.metadata.id);
    assert_eq!(a.metadata.message_type, MessageType::Response);
    assert_eq!(a.metadata.op_code, OpCode::Query);
    assert_eq!(a.queries, q.queries);
    assert!(a.metadata.recursion_available);
    assert_eq!(a.metadata.recursion_desired, q.metadata.recursion_desired);
    (a, bytes.len())
}

/// Sends `q` from `c` and expects it to be forwarded to `to`; returns the upstream query.
fn forwarded(s: &mut DnsServer, now: Instant, c: Client, q: &Message, to: SocketAddr) -> Message {
    s.handle_query(now, c, &q.to_vec().unwrap()).unwrap();
    upstream(s, to)
}

/// Expects exactly one upstream query, to `to`.
fn upstream(s: &mut DnsServer, to: SocketAddr) -> Message {
    let out = outputs(s);
    assert_eq!(out.len(), 1, "{out:?}");
    let Output::ToUpstream(server, bytes) = &out[0] else {
        panic!("expected an upstream query, got {out:?}");
    };
    assert_eq!(*server, to);
    decode(bytes)
}

/// The only answer in the output, to `c`.
fn answer_for(s: &mut DnsServer, c: Client) -> Message {
    let out = outputs(s);
    assert_eq!(out.len(), 1, "{out:?}");
    let Output::ToClient(to, bytes) = &out[0] else {
        panic!("expected an answer, got {out:?}");
    };
    assert_eq!(*to, c);
    decode(bytes)
}

/// An upstream server's response to `q`.
fn reply(
    q: &Message,
    rcode: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
) -> Vec<u8> {
    let mut m = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.recursion_available = true;
    m.metadata.response_code = rcode;
    m.add_queries(q.queries.iter().cloned());
    m.add_answers(answers);
    m.add_authorities(authorities);
    if q.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        m.set_edns(edns);
    }
    m.to_vec().unwrap()
}

fn a_rec(owner: &str, addr: Ipv4Addr, ttl: u32) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A(addr)))
}

fn soa(zone: &str, ttl: u32, minimum: u32) -> Record {
    let rdata = SOA::new(
        name(&format!("ns.{zone}")),
        name(&format!("hostmaster.{zone}")),
        2024,
        3600,
        600,
        86_400,
        minimum,
    );
    Record::from_rdata(name(zone), ttl, RData::SOA(rdata))
}

fn addrs(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

fn ttls(m: &Message) -> Vec<u32> {
    m.answers.iter().map(|r| r.ttl).collect()
}

fn rdata_names(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::PTR(p) => Some(p.0.to_ascii()),
            RData::CNAME(c) => Some(c.0.to_ascii()),
            _ => None,
        })
        .collect()
}

// ---- local names ----

/// dnsmasq serves a lease's host name plain and qualified with `domain=`, case-insensitively
/// (RFC 4343), authoritatively, with local-ttl 0, and never forwards it.
#[test]
fn lease_name_plain_and_qualified() {
    let mut s = server();
    let t0 = Instant::now();
    s.add_name(ip(10), "vm1");
    for (id, qname) in [(1, "vm1"), (2, "vm1.lab"), (3, "VM1.Lab."), (4, "vm1.lab.")] {
        let (a, _) = ask(&mut s, t0, client(7), &query(id, qname, RecordType::A));
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert!(a.metadata.authoritative);
        assert_eq!(addrs(&a), [ip(10)], "{qname}");
        assert_eq!(ttls(&a), [0]);
        // The owner is the name as asked (RFC 1035 7.1 matching, case kept).
        assert_eq!(a.answers[0].name, name(qname));
    }
    assert_eq!(s.counters().local_answers, 4);
    assert_eq!(s.counters().forwarded, 0);
    assert_eq!(
        s.names(),
        [("vm1".to_string(), ip(10)), ("vm1.lab".to_string(), ip(10))]
    );
}

#[test]
fn local_ttl_is_configurable() {
    let mut c = config();
    c.local_ttl = 60;
    let mut s = server_with(c);
    s.add_name(ip(10), "vm1");
    let (a, _) = ask(
        &mut s,
        Instant::now(),
        client(7),
        &query(1, "vm1", RecordType::A),
    );
    assert_eq!(ttls(&a), [60]);
}

/// RFC 1035 3.5: the address's in-addr.arpa name has a PTR to the lease's qualified name.
#[test]
fn ptr_for_a_lease() {
    let mut s = server();
    s.add_name(ip(10), "vm1");
    let (a, _) = ask(
        &mut s,
        Instant::now(),
        client(7),
        &query(1, "10.122.168.192.in-addr.arpa", RecordType::PTR),
    );
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(a.metadata.authoritative);
    assert_eq!(rdata_names(&a), ["vm1.lab."]);

    // Without a domain the plain name.
    let mut c = config();
    c.domain = None;
    let mut s = server_with(c);
    s.add_name(ip(10), "vm1");
    let (a, _) = ask(
        &mut s,
        Instant::now(),
        client(7),
        &query(1, "10.122.168.192.in-addr.arpa", RecordType::PTR),
    );
    assert_eq!(rdata_names(&a), ["vm1."]);
    // ... and no qualified name.
    let q = query(2, "vm1.lab", RecordType::A);
    forwarded(&mut s, Instant::now(), client(7), &q, UP1);
}

/// A name dnsmasq knows, asked for a type it has not, is NOERROR with no answer (NODATA,
/// RFC 2308 2.2), at once: forwarding it would only make the guest wait for an upstream that
/// cannot know the name.
#[test]
fn nodata_for_other_types_of_a_local_name() {
    let mut s = server();
    s.add_name(ip(10), "vm1");
    for (id, qtype) in [
        (1, RecordType::AAAA),
        (2, RecordType::MX),
        (3, RecordType::TXT),
    ] {
        let (a, _) = ask(
            &mut s,
            Instant::now(),
            client(7),
            &query(id, "vm1.lab", qtype),
        );
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert!(a.answers.is_empty());
        assert!(a.metadata.authoritative);
    }
    assert_eq!(s.counters().local_nodata, 3);
    assert_eq!(s.counters().forwarded, 0);
    // ANY gets what there is.
    let (a, _) = ask(
        &mut s,
        Instant::now(),
        client(7),
        &query(4, "vm1", RecordType::ANY),
    );
    assert_eq!(addrs(&a), [ip(10)]);
}

/// `<domain localOnly='yes'>` is dnsmasq's `local=/lab/`: unknown names under it are NXDOMAIN
/// from here and never reach an upstream.
#[test]
fn nxdomain_under_a_local_only_domain() {
    let mut c = config();
    c.local_only = true;
    let mut s = server_with(c);
    s.add_name(ip(10), "vm1");
    for (id, qname) in [(1, "nothere.lab"), (2, "lab"), (3, "a.b.lab")] {
        let (a, _) = ask(
            &mut s,
            Instant::now(),
            client(7),
            &query(id, qname, RecordType::A),
        );
        assert_eq!(a.metadata.response_code, ResponseCode::NXDomain, "{qname}");
        assert!(a.metadata.authoritative);
    }
    let (a, _) = ask(
        &mut s,
        Instant::now(),
        client(7),
        &query(4, "vm1.lab", RecordType::A),
    );
    assert_eq!(addrs(&a), [ip(10)]);
    assert_eq!(s.counters().nxdomain_local, 3);
    assert_eq!(s.counters().forwarded, 0);

    // Without localOnly the domain's unknown names are forwarded.
    let mut s = server();
    forwarded(
        &mut s,
        Instant::now(),
        client(7),
        &query(1, "nothere.lab", RecordType::A),
        UP1,
    );
}

/// libvirt's localPTR (`local=/122.168.192.in-addr.arpa/`): unknown addresses of the guest
/// network are NXDOMAIN here; other addresses are forwarded.
#[test]
fn nxdomain_in_the_reverse_zone() {
    let mut s = server();
    let now = Instant::now();
    for (id, qname) in [
        (1, "99.122.168.192.in-addr.arpa"),
        (2, "122.168.192.in-addr.arpa"),
        (3, "x.99.122.168.192.in-addr.arpa"),
    ] {
        let (a, _) = ask(&mut s, now, client(7), &query(id, qname, RecordType::PTR));
        assert_eq!(a.metadata.response_code, ResponseCode::NXDomain, "{qname}");
    }
    forwarded(
        &mut s,
        now,
        client(7),
        &query(4, "8.8.8.8.in-addr.arpa", RecordType::PTR),
        UP1,
    );
    forwarded(
        &mut s,
        now,
        client(7),
        &query(5, "168.192.in-addr.arpa", RecordType::PTR),
        UP1,
    );

    // A prefix between octets is covered by the zones one octet longer inside it: /20 by
    // sixteen /24s, /26 by its 64 addresses; nothing outside the network is local.
    let mut c = config();
    c.network = Some((Ipv4Addr::new(10, 0, 16, 1), 20));
    let mut s = server_with(c);
    let (a, _) = ask(
        &mut s,
        now,
        client(7),
        &query(6, "1.31.0.10.in-addr.arpa", RecordType::PTR),
    );
    assert_eq!(a.metadata.response_code, ResponseCode::NXDomain);
    let (a, _) = ask(
        &mut s,
        now,
        client(7),
        &query(7, "16.0.10.in-addr.arpa", RecordType::PTR),
    );
    assert_eq!(a.metadata.response_code, ResponseCode::NXDomain);
    forwarded(
        &mut s,
        now,
        client(7),
        &query(8, "1.32.0.10.in-addr.arpa", RecordType::PTR),
        UP1,
    );
    forwarded(
        &mut s,
        now,
        client(7),
        &query(9, "0.10.in-addr.arpa", RecordType::PTR),
        UP1,
    );

    let mut c = config();
    c.network = Some((ip(65), 26));
    let mut s = server_with(c);
    let (a, _) = ask(
        &mut s,
        now,
        client(7),
        &query(10, "70.122.168.192.in-addr.arpa", RecordType::PTR),
    );
    assert_eq!(a.metadata.response_code, ResponseCode::NXDomain);
    forwarded(
        &mut s,
        now,
        client(7),
        &query(11, "130.122.168.192.in-addr.arpa", RecordType::PTR),
        UP1,
    );
    forwarded(
        &mut s,
        now,
        client(7),
        &query(12, "122.168.192.in-addr.arpa", RecordType::PTR),
        UP1,
    );
}

/// `<dns><txt>` (`txt-record=NAME,VALUE`, answered under exactly that name) and `<dns><srv>`
/// (`srv-host=_service._proto[.domain],target,port,priority,weight`, RFC 2782; a name without
/// a domain gets dnsmasq's domain; no target says "no service": target ".").
#[test]
fn txt_and_srv_records() {
    let mut c = config();
    c.txt = vec![
        ("info.example".into(), "v=spf1 -all".into()),
        ("long".into(), "x".repeat(300)),
    ];
    c.srv = vec![
        SrvRecord {
            service: "ldap".into(),
            protocol: "tcp".into(),
            domain: None,
            target: Some("ldap.lab".into()),
            port: 389,
            priority: 10,
            weight: 5,
        },
        SrvRecord {
            service: "http".into(),
            protocol: "tcp".into(),
            domain: Some("example.org".into()),
            target: Some("www.example.org".into()),
            port: 0,
            priority: 0,
            weight: 0,
        },
        SrvRecord {
            service: "ftp".into(),
            protocol: "tcp".into(),
            domain: None,
            target: None,
            port: 0,
            priority: 0,
            weight: 0,
        },
    ];
    let mut s = server_with(c);
    let now = Instant::now();

    let (a, _) = ask(
        &mut s,
        now,
        client(7),
        &query(1, "info.example", RecordType::TXT),
    );
    let RData::TXT(txt) = &a.answers[0].data else {
        panic!("{a:?}");
    };
    assert_eq!(&*txt.txt_data, [b"v=spf1 -all".to_vec().into_boxed_slice()]);
    // RFC 1035 3.3.14: character-strings are at most 255 octets; longer values are split.
    let (a, _) = ask(&mut s, now, client(7), &query(2, "long", RecordType::TXT));
    let RData::TXT(txt) = &a.answers[0].data else {
        panic!("{a:?}");
    };
    assert_eq!(
        txt.txt_data.iter().map(|c| c.len()).collect::<Vec<_>>(),
        [255, 45]
    );
    // The TXT name is not qualified: info.example.lab is unknown (and forwarded).
    forwarded(
        &mut s,
        now,
        client(7),
        &query(3, "info.example.lab", RecordType::TXT),
        UP1,
    );

    let srv = |m: &Message| match &m.answers[..] {
        [r] => match &r.data {
            RData::SRV(srv) => (srv.priority, srv.weight, srv.port, srv.target.to_ascii()),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    let (a, _) = ask(
        &mut s,
        now,
        client(7),
        &query(4, "_ldap._tcp.lab", RecordType::SRV),
    );
    assert_eq!(srv(&a), (10, 5, 389, "ldap.lab.".into()));
    let (a, _) = ask(
        &mut s,
        now,
        client(7),
        &query(5, "_http._tcp.example.org", RecordType::SRV),
    );
    assert_eq!(srv(&a), (0, 0, 1, "www.example.org.".into()));
    let (a, _) = ask(
        &mut s,
        now,
        client(7),
        &query(6, "_ftp._tcp.lab", RecordType::SRV),
    );
    assert_eq!(srv(&a), (0, 0, 0, ".".into()));
    // A TXT or SRV name is a local name: other types are NODATA.
    let (a, _) = ask(
        &mut s,
        now,
        client(7),
        &query(7, "_ldap._tcp.lab", RecordType::A),
    );
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(a.answers.is_empty());
}

/// `<dns><host>` is dnsmasq's `addn-hosts` with `expand-hosts`: every name resolves, names
/// without a dot also with the domain, a name on several hosts gives all their addresses, and
/// an address's PTR is its first name (qualified).
#[test]
fn addn_hosts_with_several_names() {
    let mut c = config();
    c.hosts = vec![
        (
            ip(5),
            vec!["web".into(), "www.example.org".into(), "Alias".into()],
        ),
        (ip(6), vec!["web".into()]),
    ];
    let mut s = server_with(c);
    let now = Instant::now();
    for (id, qname, want) in [
        (1, "web", vec![ip(5), ip(6)]),
        (2, "web.lab", vec![ip(5), ip(6)]),
        (3, "www.example.org", vec![ip(5)]),
        (4, "alias.lab", vec![ip(5)]),
        (5, "ALIAS", vec![ip(5)]),
    ] {
        let (a, _) = ask(&mut s, now, client(7), &query(id, qname, RecordType::A));
        assert_eq!(addrs(&a), want, "{qname}");
    }
    // Names with a dot are not expanded.
    forwarded(
        &mut s,
        now,
        client(7),
        &query(6, "www.example.org.lab", RecordType::A),
        UP1,
    );
    let (a, _) = ask(
        &mut s,
        now,
        client(7),
        &query(7, "5.122.168.192.in-addr.arpa", RecordType::PTR),
    );
    assert_eq!(rdata_names(&a), ["web.lab."]);
    let (a, _) = ask(
        &mut s,
        now,
        client(7),
        &query(8, "6.122.168.192.in-addr.arpa", RecordType::PTR),
    );
    assert_eq!(rdata_names(&a), ["web.lab."]);

    // dnsmasq does not give a lease a name addn-hosts has.
    s.add_name(ip(50), "web");
    assert_eq!(s.counters().names_shadowed, 1);
    let (a, _) = ask(&mut s, now, client(7), &query(9, "web", RecordType::A));
    assert_eq!(addrs(&a), [ip(5), ip(6)]);
    let (a, _) = ask(
        &mut s,
        now,
        client(7),
        &query(10, "50.122.168.192.in-addr.arpa", RecordType::PTR),
    );
    assert_eq!(a.metadata.response_code, ResponseCode::NXDomain);
}

/// A lease's names go when it ends, unless another lease has taken them since; a lease has one
/// name, and a name follows the lease that last claimed it.
#[test]
fn lease_names_follow_leases() {
    let mut c = config();
    c.local_only = true;
    let mut s = server_with(c);
    let now = Instant::now();
    let nx = |s: &mut DnsServer, id, qname: &str, qtype| {
        let (a, _) = ask(s, now, client(7), &query(id, qname, qtype));
        assert_eq!(a.metadata.response_code, ResponseCode::NXDomain, "{qname}");
    };

    s.add_name(ip(10), "vm1");
    s.remove_name(ip(10), "vm1");
    nx(&mut s, 1, "vm1.lab", RecordType::A);
    nx(&mut s, 2, "10.122.168.192.in-addr.arpa", RecordType::PTR);
    // The plain name is no longer local: it goes upstream.
    forwarded(&mut s, now, client(7), &query(3, "vm1", RecordType::A), UP1);

    // The name moves to another address: the old address loses its PTR.
    s.add_name(ip(10), "vm1");
    s.add_name(ip(11), "vm1");
    let (a, _) = ask(&mut s, now, client(7), &query(4, "vm1.lab", RecordType::A));
    assert_eq!(addrs(&a), [ip(11)]);
    nx(&mut s, 5, "10.122.168.192.in-addr.arpa", RecordType::PTR);
    // The stale removal of the old lease does not take the name from the new one.
    s.remove_name(ip(10), "vm1");
    let (a, _) = ask(&mut s, now, client(7), &query(6, "vm1.lab", RecordType::A));
    assert_eq!(addrs(&a), [ip(11)]);

    // The address gets another name: the old name goes.
    s.add_name(ip(11), "renamed");
    nx(&mut s, 7, "vm1.lab", RecordType::A);
    let (a, _) = ask(
        &mut s,
        now,
        client(7),
        &query(8, "11.122.168.192.in-addr.arpa", RecordType::PTR),
    );
    assert_eq!(rdata_names(&a), ["renamed.lab."]);

    // A qualified host name is accepted for our domain only; invalid labels are refused.
    s.add_name(ip(12), "db.lab");
    s.add_name(ip(13), "db.elsewhere");
    s.add_name(ip(14), "bad name");
    s.add_name(ip(15), "");
    let (a, _) = ask(&mut s, now, client(7), &query(9, "db.lab", RecordType::A));
    assert_eq!(addrs(&a), [ip(12)]);
    assert_eq!(s.counters().names_invalid, 3);
    assert_eq!(
        s.names(),
        [
            ("db".to_string(), ip(12)),
            ("db.lab".to_string(), ip(12)),
            ("renamed".to_string(), ip(11)),
            ("renamed.lab".to_string(), ip(11)),
        ]
    );
}

// ---- forwarding ----

/// The query goes to the first server with an ID of ours (RFC 5452 9.2), RD set and our EDNS0;
/// the answer comes back with the client's ID, RA set, AA and AD clear (RFC 4035 3.2.3: not
/// validated here).
#[test]
fn forward_rewrites_the_id_and_relays_with_the_original() {
    let mut s = server();
    let now = Instant::now();
    let q = query(0x1234, "www.Example.com", RecordType::A);
    let up = forwarded(&mut s, now, client(7), &q, UP1);
    assert_ne!(up.metadata.id, 0x1234);
    assert!(up.metadata.recursion_desired);
    assert_eq!(up.queries, q.queries);
    assert_eq!(up.edns.as_ref().map(Edns::max_payload), Some(EDNS_PAYLOAD));
    assert_eq!(s.poll_timeout(), Some(now + TIMEOUT));

    let mut r = decode(&reply(
        &up,
        ResponseCode::NoError,
        vec![a_rec(
            "www.example.com",
            Ipv4Addr::new(93, 184, 216, 34),
            300,
        )],
        vec![],
    ));
    r.metadata.authentic_data = true;
    r.metadata.authoritative = true;
    s.handle_upstream(now, UP1, &r.to_vec().unwrap());
    let a = answer_for(&mut s, client(7));
    assert_eq!(a.metadata.id, 0x1234);
    assert_eq!(a.queries, q.queries);
    assert_eq!(addrs(&a), [Ipv4Addr::new(93, 184, 216, 34)]);
    assert_eq!(ttls(&a), [300]);
    assert!(a.metadata.recursion_available);
    assert!(!a.metadata.authoritative);
    assert!(!a.metadata.authentic_data);
    // No OPT asked, none answered (RFC 6891 7).
    assert!(a.edns.is_none());
    assert_eq!(s.poll_timeout(), None);
    assert_eq!(s.in_flight(), 0);
    let c = s.counters();
    assert_eq!(
        (c.forwarded, c.upstream_responses, c.cache_misses),
        (1, 1, 1)
    );
}

/// IDs of questions in flight differ, and follow from the seed.
#[test]
fn upstream_ids_are_distinct_and_seeded() {
    let mut s = server();
    let now = Instant::now();
    let mut ids = std::collections::HashSet::new();
    for i in 0..200u16 {
        let up = forwarded(
            &mut s,
            now,
            client(7),
            &query(i, &format!("n{i}.example"), RecordType::A),
            UP1,
        );
        assert!(ids.insert(up.metadata.id));
    }
    let mut again = server();
    let up = forwarded(
        &mut again,
        now,
        client(7),
        &query(0, "n0.example", RecordType::A),
        UP1,
    );
    assert!(ids.contains(&up.metadata.id));
}

/// A second client asking the same question waits for the same upstream answer; a client
/// asking again (same ID) gets the query resent, not a second question.
#[test]
fn identical_questions_share_one_upstream_query() {
    let mut s = server();
    let now = Instant::now();
    let up = forwarded(
        &mut s,
        now,
        client(7),
        &query(1, "example.com", RecordType::A),
        UP1,
    );
    s.handle_query(
        now,
        client(8),
        &query(2, "EXAMPLE.com", RecordType::A).to_vec().unwrap(),
    )
    .unwrap();
    assert!(outputs(&mut s).is_empty());
    let resent = forwarded(
        &mut s,
        now,
        client(7),
        &query(1, "example.com", RecordType::A),
        UP1,
    );
    assert_eq!(resent.metadata.id, up.metadata.id);
    assert_eq!(
        (s.counters().coalesced, s.counters().client_retries),
        (1, 1)
    );

    s.handle_upstream(
        now,
        UP1,
        &reply(
            &up,
            ResponseCode::NoError,
            vec![a_rec("example.com", ip(99), 60)],
            vec![],
        ),
    );
    let out = outputs(&mut s);
    assert_eq!(out.len(), 2);
    for (o, (c, id, qname)) in out
        .iter()
        .zip([(client(7), 1, "example.com"), (client(8), 2, "EXAMPLE.com")])
    {
        let Output::ToClient(to, bytes) = o else {
            panic!("{o:?}")
        };
        let m = decode(bytes);
        assert_eq!((*to, m.metadata.id), (c, id));
        assert_eq!(m.queries[0].name().to_ascii(), format!("{qname}."));
        assert_eq!(addrs(&m), [ip(99)]);
    }
}

/// A cached answer is served with its TTLs lowered by the time it spent in the cache
/// (RFC 1035 4.1.3, RFC 2181 8), and not forwarded.
#[test]
fn cache_hit_with_decremented_ttl() {
    let mut s = server();
    let t0 = Instant::now();
    let up = forwarded(
        &mut s,
        t0,
        client(7),
        &query(1, "example.com", RecordType::A),
        UP1,
    );
    let cname = Record::from_rdata(
        name("example.com"),
        600,
        RData::CNAME(CNAME(name("cdn.example.net"))),
    );
    s.handle_upstream(
        t0,
        UP1,
        &reply(
            &up,
            ResponseCode::NoError,
            vec![cname, a_rec("cdn.example.net", ip(99), 300)],
            vec![],
        ),
    );
    outputs(&mut s);

    let (a, _) = ask(
        &mut s,
        t0 + Duration::from_millis(100_400),
        client(8),
        &query(2, "example.com", RecordType::A),
    );
    assert_eq!(ttls(&a), [500, 200]);
    assert_eq!(rdata_names(&a), ["cdn.example.net."]);
    assert_eq!(addrs(&a), [ip(99)]);
    assert!(!a.metadata.authoritative);
    let c = s.counters();
    assert_eq!((c.cache_hits, c.forwarded, c.cache_inserts), (1, 1, 1));
}

/// Positive answers live for their smallest TTL: asked once more just before, from the cache;
/// at the TTL, from upstream again.
#[test]
fn cache_expires_after_the_ttl() {
    let mut s = server();
    let t0 = Instant::now();
    let up = forwarded(
        &mut s,
        t0,
        client(7),
        &query(1, "example.com", RecordType::A),
        UP1,
    );
    s.handle_upstream(
        t0,
        UP1,
        &reply(
            &up,
            ResponseCode::NoError,
            vec![
                a_rec("example.com", ip(99), 30),
                a_rec("example.com", ip(98), 90),
            ],
            vec![],
        ),
    );
    outputs(&mut s);
    let (a, _) = ask(
        &mut s,
        t0 + Duration::from_secs(29),
        client(7),
        &query(2, "example.com", RecordType::A),
    );
    assert_eq!(ttls(&a), [1, 61]);
    forwarded(
        &mut s,
        t0 + Duration::from_secs(30),
        client(7),
        &query(3, "example.com", RecordType::A),
        UP1,
    );
    assert_eq!(s.counters().cache_expired, 1);

    // A TTL of 0 is not cached at all.
    let mut s = server();
    let up = forwarded(
        &mut s,
        t0,
        client(7),
        &query(1, "example.com", RecordType::A),
        UP1,
    );
    s.handle_upstream(
        t0,
        UP1,
        &reply(
            &up,
            ResponseCode::NoError,
            vec![a_rec("example.com", ip(99), 0)],
            vec![],
        ),
    );
    outputs(&mut s);
    forwarded(
        &mut s,
        t0,
        client(7),
        &query(2, "example.com", RecordType::A),
        UP1,
    );
}

/// RFC 2308 5: NXDOMAIN and NODATA are cached for min(SOA TTL, SOA MINIMUM), and the SOA's
/// TTL says so (section 3); without an SOA they are not cached.
#[test]
fn negative_answers_are_cached_from_the_soa() {
    let t0 = Instant::now();
    for rcode in [ResponseCode::NXDomain, ResponseCode::NoError] {
        let mut s = server();
        let up = forwarded(
            &mut s,
            t0,
            client(7),
            &query(1, "nx.example.com", RecordType::A),
            UP1,
        );
        s.handle_upstream(
            t0,
            UP1,
            &reply(&up, rcode, vec![], vec![soa("example.com", 3600, 60)]),
        );
        let a = answer_for(&mut s, client(7));
        assert_eq!(a.metadata.response_code, rcode);
        // Relayed as the upstream sent it.
        assert_eq!(a.authorities[0].ttl, 3600);

        let (a, _) = ask(
            &mut s,
            t0 + Duration::from_secs(59),
            client(7),
            &query(2, "nx.example.com", RecordType::A),
        );
        assert_eq!(a.metadata.response_code, rcode);
        assert!(a.answers.is_empty());
        assert_eq!(a.authorities.len(), 1);
        assert_eq!(a.authorities[0].ttl, 1);
        forwarded(
            &mut s,
            t0 + Duration::from_secs(60),
            client(7),
            &query(3, "nx.example.com", RecordType::A),
            UP1,
        );
    }

    // The SOA's own TTL can be the smaller one.
    let mut s = server();
    let up = forwarded(
        &mut s,
        t0,
        client(7),
        &query(1, "nx.example.com", RecordType::A),
        UP1,
    );
    s.handle_upstream(
        t0,
        UP1,
        &reply(
            &up,
            ResponseCode::NXDomain,
            vec![],
            vec![soa("example.com", 20, 3600)],
        ),
    );
    outputs(&mut s);
    ask(
        &mut s,
        t0 + Duration::from_secs(19),
        client(7),
        &query(2, "nx.example.com", RecordType::A),
    );
    forwarded(
        &mut s,
        t0 + Duration::from_secs(20),
        client(7),
        &query(3, "nx.example.com", RecordType::A),
        UP1,
    );

    // No SOA: not cached.
    let mut s = server();
    let up = forwarded(
        &mut s,
        t0,
        client(7),
        &query(1, "nx.example.com", RecordType::A),
        UP1,
    );
    s.handle_upstream(t0, UP1, &reply(&up, ResponseCode::NXDomain, vec![], vec![]));
    outputs(&mut s);
    forwarded(
        &mut s,
        t0,
        client(7),
        &query(2, "nx.example.com", RecordType::A),
        UP1,
    );
    assert_eq!(s.counters().cache_inserts, 0);
}

/// A cached answer is still served while the upstreams are down, until its TTL runs out.
#[test]
fn cache_answers_while_upstreams_are_down() {
    let mut s = server();
    let t0 = Instant::now();
    let up = forwarded(
        &mut s,
        t0,
        client(7),
        &query(1, "example.com", RecordType::A),
        UP1,
    );
    s.handle_upstream(
        t0,
        UP1,
        &reply(
            &up,
            ResponseCode::NoError,
            vec![a_rec("example.com", ip(99), 300)],
            vec![],
        ),
    );
    outputs(&mut s);
    s.set_upstreams(Vec::new());
    let (a, _) = ask(
        &mut s,
        t0 + Duration::from_secs(200),
        client(7),
        &query(2, "example.com", RecordType::A),
    );
    assert_eq!(addrs(&a), [ip(99)]);
    // Anything else has nowhere to go: REFUSED, as dnsmasq.
    let (a, _) = ask(
        &mut s,
        t0 + Duration::from_secs(200),
        client(7),
        &query(3, "other.com", RecordType::A),
    );
    assert_eq!(a.metadata.response_code, ResponseCode::Refused);
    assert_eq!(s.counters().refused_no_upstream, 1);
}

/// The cache holds at most `cache_size` answers and evicts the least recently used.
#[test]
fn cache_is_bounded() {
    let mut c = config();
    c.cache_size = 3;
    let mut s = server_with(c);
    let t0 = Instant::now();
    let learn = |s: &mut DnsServer, qname: &str| {
        let up = forwarded(s, t0, client(7), &query(1, qname, RecordType::A), UP1);
        s.handle_upstream(
            t0,
            UP1,
            &reply(
                &up,
                ResponseCode::NoError,
                vec![a_rec(qname, ip(99), 300)],
                vec![],
            ),
        );
        outputs(s);
    };
    learn(&mut s, "a.example");
    learn(&mut s, "b.example");
    learn(&mut s, "c.example");
    // a is used, so b is now the least recently used.
    ask(&mut s, t0, client(7), &query(2, "a.example", RecordType::A));
    learn(&mut s, "d.example");
    learn(&mut s, "e.example");
    assert_eq!(s.cache_len(), 3);
    assert_eq!(s.counters().cache_evictions, 2);
    ask(&mut s, t0, client(7), &query(3, "a.example", RecordType::A));
    ask(&mut s, t0, client(7), &query(4, "e.example", RecordType::A));
    forwarded(
        &mut s,
        t0,
        client(7),
        &query(5, "b.example", RecordType::A),
        UP1,
    );

    // cache_size 0: nothing is kept.
    let mut c = config();
    c.cache_size = 0;
    let mut s = server_with(c);
    learn(&mut s, "a.example");
    assert_eq!(s.cache_len(), 0);
}

/// dnsmasq's strict-order: the first server, then the next when it does not answer in time;
/// an answer from the first that arrives late is still taken.
#[test]
fn strict_order_failover_on_timeout() {
    let mut s = server();
    let t0 = Instant::now();
    let up = forwarded(
        &mut s,
        t0,
        client(7),
        &query(1, "example.com", RecordType::A),
        UP1,
    );
    s.handle_timeout(t0 + TIMEOUT - Duration::from_millis(1));
    assert!(outputs(&mut s).is_empty());
    let t1 = t0 + TIMEOUT;
    s.handle_timeout(t1);
    let again = upstream(&mut s, UP2);
    assert_eq!(again.metadata.id, up.metadata.id);
    assert_eq!(s.poll_timeout(), Some(t1 + TIMEOUT));
    assert_eq!(
        (
            s.counters().upstream_timeouts,
            s.counters().upstream_failovers
        ),
        (1, 1)
    );

    s.handle_upstream(
        t1,
        UP2,
        &reply(
            &up,
            ResponseCode::NoError,
            vec![a_rec("example.com", ip(99), 60)],
            vec![],
        ),
    );
    assert_eq!(addrs(&answer_for(&mut s, client(7))), [ip(99)]);

    // The late answer of the first server.
    let up = forwarded(
        &mut s,
        t1,
        client(7),
        &query(2, "late.example.com", RecordType::A),
        UP1,
    );
    s.handle_timeout(t1 + TIMEOUT);
    upstream(&mut s, UP2);
    s.handle_upstream(
        t1 + TIMEOUT,
        UP1,
        &reply(
            &up,
            ResponseCode::NoError,
            vec![a_rec("late.example.com", ip(98), 60)],
            vec![],
        ),
    );
    assert_eq!(addrs(&answer_for(&mut s, client(7))), [ip(98)]);
}

/// dnsmasq: "for broken servers, attempt to send to another one": SERVFAIL and REFUSED move
/// the question to the next server at once.
#[test]
fn strict_order_failover_on_servfail_and_refused() {
    for rcode in [ResponseCode::ServFail, ResponseCode::Refused] {
        let mut c = config();
        c.upstreams = vec![UP1, UP2, UP3];
        let mut s = server_with(c);
        let t0 = Instant::now();
        let up = forwarded(
            &mut s,
            t0,
            client(7),
            &query(1, "example.com", RecordType::A),
            UP1,
        );
        s.handle_upstream(t0, UP1, &reply(&up, rcode, vec![], vec![]));
        upstream(&mut s, UP2);
        s.handle_upstream(t0, UP2, &reply(&up, rcode, vec![], vec![]));
        upstream(&mut s, UP3);
        // A repeated error from a server already left behind changes nothing.
        s.handle_upstream(t0, UP1, &reply(&up, rcode, vec![], vec![]));
        assert!(outputs(&mut s).is_empty());
        s.handle_upstream(
            t0,
            UP3,
            &reply(
                &up,
                ResponseCode::NoError,
                vec![a_rec("example.com", ip(99), 60)],
                vec![],
            ),
        );
        assert_eq!(addrs(&answer_for(&mut s, client(7))), [ip(99)]);
        assert_eq!(s.counters().upstream_errors, 3);
        assert_eq!(s.counters().upstream_failovers, 2);
    }
}

/// When the last server has failed too, the client gets SERVFAIL (timeouts) or the last
/// server's own error; nothing is cached and nothing is left pending.
#[test]
fn servfail_after_the_last_server() {
    let mut s = server();
    let t0 = Instant::now();
    forwarded(
        &mut s,
        t0,
        client(7),
        &query(1, "example.com", RecordType::A),
        UP1,
    );
    s.handle_timeout(t0 + TIMEOUT);
    upstream(&mut s, UP2);
    s.handle_timeout(t0 + TIMEOUT * 2);
    let a = answer_for(&mut s, client(7));
    assert_eq!(a.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(a.metadata.id, 1);
    assert_eq!(s.poll_timeout(), None);
    assert_eq!(s.in_flight(), 0);
    assert_eq!(s.counters().servfail_sent, 1);

    let up = forwarded(
        &mut s,
        t0,
        client(7),
        &query(2, "example.com", RecordType::A),
        UP1,
    );
    s.handle_upstream(t0, UP1, &reply(&up, ResponseCode::ServFail, vec![], vec![]));
    upstream(&mut s, UP2);
    s.handle_upstream(t0, UP2, &reply(&up, ResponseCode::ServFail, vec![], vec![]));
    let a = answer_for(&mut s, client(7));
    assert_eq!(a.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(s.cache_len(), 0);
    // And the late timer finds nothing to do.
    s.handle_timeout(t0 + TIMEOUT * 10);
    assert!(outputs(&mut s).is_empty());
}

/// `<forwarder domain= addr=>` (`server=/domain/addr`): the longest matching domain picks the
/// servers; one without an address answers its domain locally.
#[test]
fn per_domain_forwarders() {
    let mut c = config();
    c.domain_upstreams = vec![
        ("example".into(), vec![UP2]),
        ("corp.example".into(), vec![UP3, UP1]),
        ("private.example".into(), vec![]),
    ];
    let mut s = server_with(c);
    let now = Instant::now();
    forwarded(
        &mut s,
        now,
        client(7),
        &query(1, "www.example", RecordType::A),
        UP2,
    );
    let up = forwarded(
        &mut s,
        now,
        client(7),
        &query(2, "x.CORP.example", RecordType::A),
        UP3,
    );
    // Its own list, in order.
    s.handle_timeout(now + TIMEOUT);
    let out = outputs(&mut s);
    assert!(
        out.contains(&Output::ToUpstream(UP1, up.to_vec().unwrap())),
        "{out:?}"
    );
    forwarded(
        &mut s,
        now,
        client(7),
        &query(3, "corp.example", RecordType::A),
        UP3,
    );
    forwarded(
        &mut s,
        now,
        client(7),
        &query(4, "notcorp.example", RecordType::A),
        UP2,
    );
    forwarded(
        &mut s,
        now,
        client(7),
        &query(5, "example.org", RecordType::A),
        UP1,
    );
    let (a, _) = ask(
        &mut s,
        now,
        client(7),
        &query(6, "db.private.example", RecordType::A),
    );
    assert_eq!(a.metadata.response_code, ResponseCode::NXDomain);
    // The answer of a domain's server is accepted only from it.
    let up = forwarded(
        &mut s,
        now,
        client(8),
        &query(7, "y.corp.example", RecordType::A),
        UP3,
    );
    s.handle_upstream(
        now,
        UP2,
        &reply(
            &up,
            ResponseCode::NoError,
            vec![a_rec("y.corp.example", ip(1), 5)],
            vec![],
        ),
    );
    assert!(outputs(&mut s).is_empty());
    s.handle_upstream(
        now,
        UP3,
        &reply(
            &up,
            ResponseCode::NoError,
            vec![a_rec("y.corp.example", ip(2), 5)],
            vec![],
        ),
    );
    assert_eq!(addrs(&answer_for(&mut s, client(8))), [ip(2)]);
}

/// `<dns forwardPlainNames='no'>`: libvirt writes `domain-needed` and `local=//`, so names
/// without a dot are never forwarded (NXDOMAIN for any type unless known locally).
#[test]
fn plain_names_are_not_forwarded_when_domain_needed() {
    let mut c = config();
    c.forward_plain_names = false;
    let mut s = server_with(c);
    let now = Instant::now();
    s.add_name(ip(10), "vm1");
    for (id, qtype) in [
        (1, RecordType::A),
        (2, RecordType::AAAA),
        (3, RecordType::MX),
    ] {
        let (a, _) = ask(&mut s, now, client(7), &query(id, "printer", qtype));
        assert_eq!(a.metadata.response_code, ResponseCode::NXDomain);
    }
    let (a, _) = ask(&mut s, now, client(7), &query(4, "vm1", RecordType::A));
    assert_eq!(addrs(&a), [ip(10)]);
    let (a, _) = ask(&mut s, now, client(7), &query(5, "vm1", RecordType::AAAA));
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    forwarded(
        &mut s,
        now,
        client(7),
        &query(6, "printer.example", RecordType::A),
        UP1,
    );
    // The root is not a plain name.
    forwarded(&mut s, now, client(7), &query(7, ".", RecordType::NS), UP1);
    // By default plain names are forwarded.
    let mut s = server();
    forwarded(
        &mut s,
        now,
        client(7),
        &query(8, "printer", RecordType::A),
        UP1,
    );
}

/// RFC 5452 9.1: an answer is accepted only from a server the query went to, with our ID and
/// the same question; anything else is counted and ignored, and the real answer still works.
#[test]
fn spoofed_or_unmatched_responses_are_ignored() {
    let mut s = server();
    let now = Instant::now();
    let up = forwarded(
        &mut s,
        now,
        client(7),
        &query(1, "bank.example", RecordType::A),
        UP1,
    );
    let evil = vec![a_rec("bank.example", Ipv4Addr::new(6, 6, 6, 6), 86_400)];
    let good = reply(
        &up,
        ResponseCode::NoError,
        vec![a_rec("bank.example", ip(99), 60)],
        vec![],
    );

    // Wrong server (UP2 was not asked yet).
    s.handle_upstream(
        now,
        UP2,
        &reply(&up, ResponseCode::NoError, evil.clone(), vec![]),
    );
    // Right server, wrong port.
    s.handle_upstream(now, SocketAddr::new(UP1.ip(), 5353), &good);
    // Wrong ID.
    let mut wrong_id = up.clone();
    wrong_id.metadata.id = up.metadata.id.wrapping_add(1);
    s.handle_upstream(
        now,
        UP1,
        &reply(&wrong_id, ResponseCode::NoError, evil.clone(), vec![]),
    );
    // Wrong question: name, type, and none at all.
    let mut other = query(up.metadata.id, "bank.example.evil", RecordType::A);
    other.edns = None;
    s.handle_upstream(
        now,
        UP1,
        &reply(&other, ResponseCode::NoError, evil.clone(), vec![]),
    );
    let other = query(up.metadata.id, "bank.example", RecordType::AAAA);
    s.handle_upstream(
        now,
        UP1,
        &reply(&other, ResponseCode::NoError, vec![], vec![]),
    );
    let mut noq = decode(&good);
    noq.queries.clear();
    s.handle_upstream(now, UP1, &noq.to_vec().unwrap());
    // Not a response (QR clear), and too short.
    let mut notr = decode(&good);
    notr.metadata.message_type = MessageType::Query;
    s.handle_upstream(now, UP1, &notr.to_vec().unwrap());
    s.handle_upstream(now, UP1, &good[..11]);
    assert!(outputs(&mut s).is_empty());
    assert_eq!(s.counters().unmatched_responses, 8);
    assert_eq!(s.cache_len(), 0);

    s.handle_upstream(now, UP1, &good);
    assert_eq!(addrs(&answer_for(&mut s, client(7))), [ip(99)]);
    // A duplicate of the answer after it was used matches nothing.
    s.handle_upstream(now, UP1, &good);
    assert!(outputs(&mut s).is_empty());
    assert_eq!(s.counters().unmatched_responses, 9);
    // The question is compared case-insensitively (a 0x20-randomising upstream).
    let up = forwarded(
        &mut s,
        now,
        client(7),
        &query(2, "mixed.example", RecordType::A),
        UP1,
    );
    let r = reply(
        &query(up.metadata.id, "MiXeD.ExAmPlE", RecordType::A),
        ResponseCode::NoError,
        vec![a_rec("mixed.example", ip(98), 5)],
        vec![],
    );
    s.handle_upstream(now, UP1, &r);
    assert_eq!(addrs(&answer_for(&mut s, client(7))), [ip(98)]);
}

/// An upstream answer that hickory cannot decode is treated like a SERVFAIL from that server.
#[test]
fn undecodable_upstream_answer_moves_on() {
    let mut s = server();
    let now = Instant::now();
    let up = forwarded(
        &mut s,
        now,
        client(7),
        &query(1, "example.com", RecordType::A),
        UP1,
    );
    let mut bad = reply(
        &up,
        ResponseCode::NoError,
        vec![a_rec("example.com", ip(99), 60)],
        vec![],
    );
    // Claim more answers than there are.
    bad[7] = 9;
    s.handle_upstream(now, UP1, &bad);
    upstream(&mut s, UP2);
    s.handle_upstream(now, UP2, &bad);
    let a = answer_for(&mut s, client(7));
    assert_eq!(a.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(s.counters().upstream_malformed, 2);
}

/// An upstream answer with TC is relayed as TC (question only), not cached: the client retries
/// over TCP.
#[test]
fn truncated_upstream_answer_is_relayed_truncated() {
    let mut s = server();
    let now = Instant::now();
    let up = forwarded(
        &mut s,
        now,
        client(7),
        &query(1, "big.example", RecordType::TXT),
        UP1,
    );
    let mut r = decode(&reply(&up, ResponseCode::NoError, vec![], vec![]));
    r.metadata.truncation = true;
    s.handle_upstream(now, UP1, &r.to_vec().unwrap());
    let a = answer_for(&mut s, client(7));
    assert!(a.metadata.truncation);
    assert!(a.answers.is_empty());
    assert_eq!(a.queries.len(), 1);
    assert_eq!(s.cache_len(), 0);
}

// ---- EDNS0 and truncation ----

/// A local name with 60 addresses: about 1 KB of answer.
fn big_config() -> DnsConfig {
    let mut c = config();
    c.hosts = vec![];
    for i in 0..60u8 {
        c.hosts
            .push((Ipv4Addr::new(10, 0, 0, i), vec!["big.example".into()]));
    }
    c
}

/// RFC 1035 4.2.1 and RFC 6891 6.2.3 / 7: over UDP an answer is at most 512 bytes without OPT
/// and at most the advertised payload with it; one that does not fit is sent with TC set,
/// answer section empty, question kept, so the client retries over TCP. An OPT is answered
/// with an OPT.
#[test]
fn edns0_truncation() {
    let mut s = server_with(big_config());
    let now = Instant::now();

    let (a, len) = ask(
        &mut s,
        now,
        client(7),
        &query(1, "big.example", RecordType::A),
    );
    assert!(a.metadata.truncation);
    assert!(a.answers.is_empty());
    assert!(a.edns.is_none());
    assert!(len <= 512);

    let (a, len) = ask(
        &mut s,
        now,
        client(7),
        &edns_query(2, "big.example", RecordType::A, 700),
    );
    assert!(a.metadata.truncation);
    assert!(a.answers.is_empty());
    assert_eq!(a.edns.as_ref().map(Edns::max_payload), Some(EDNS_PAYLOAD));
    assert!(len <= 700);

    let (a, len) = ask(
        &mut s,
        now,
        client(7),
        &edns_query(3, "big.example", RecordType::A, 4096),
    );
    assert!(!a.metadata.truncation);
    assert_eq!(a.answers.len(), 60);
    assert!(a.edns.is_some());
    assert!((512..=usize::from(EDNS_PAYLOAD)).contains(&len), "{len}");

    // A payload below 512 counts as 512 (RFC 6891 6.2.5).
    let (a, _) = ask(
        &mut s,
        now,
        client(7),
        &edns_query(4, "0.0.0.10.in-addr.arpa", RecordType::PTR, 100),
    );
    assert!(!a.metadata.truncation);
    assert_eq!(s.counters().truncated, 2);
}

/// TCP answers are never truncated, whatever the OPT says.
#[test]
fn tcp_answers_are_not_truncated() {
    let mut s = server_with(big_config());
    let now = Instant::now();
    let (a, len) = ask(
        &mut s,
        now,
        tcp_client(7),
        &query(1, "big.example", RecordType::A),
    );
    assert!(!a.metadata.truncation);
    assert_eq!(a.answers.len(), 60);
    assert!(len > 512);
    assert_eq!(s.counters().truncated, 0);
}

/// The same applies to forwarded and cached answers: upstream sends all it has (we advertise
/// 1232), each client gets what it can take.
#[test]
fn forwarded_answers_are_fitted_to_each_client() {
    let mut s = server();
    let now = Instant::now();
    let many: Vec<Record> = (0..40u8)
        .map(|i| a_rec("many.example", Ipv4Addr::new(10, 0, 0, i), 300))
        .collect();
    let up = forwarded(
        &mut s,
        now,
        client(7),
        &query(1, "many.example", RecordType::A),
        UP1,
    );
    s.handle_query(
        now,
        client(8),
        &edns_query(2, "many.example", RecordType::A, 1232)
            .to_vec()
            .unwrap(),
    )
    .unwrap();
    s.handle_upstream(now, UP1, &reply(&up, ResponseCode::NoError, many, vec![]));
    let out = outputs(&mut s);
    let answers: Vec<Message> = out
        .iter()
        .map(|o| match o {
            Output::ToClient(_, b) => decode(b),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(answers[0].metadata.truncation && answers[0].answers.is_empty());
    assert!(!answers[1].metadata.truncation && answers[1].answers.len() == 40);
    // From the cache, over TCP: all of it.
    let (a, _) = ask(
        &mut s,
        now,
        tcp_client(9),
        &query(3, "many.example", RecordType::A),
    );
    assert_eq!(a.answers.len(), 40);
    // Additional records are dropped before anything is truncated (RFC 2181 9).
    let up = forwarded(
        &mut s,
        now,
        client(7),
        &query(4, "glue.example", RecordType::A),
        UP1,
    );
    let mut m = decode(&reply(
        &up,
        ResponseCode::NoError,
        vec![a_rec("glue.example", ip(3), 60)],
        vec![],
    ));
    m.add_additionals((0..40u8).map(|i| {
        Record::from_rdata(
            name("ns.glue.example"),
            60,
            RData::AAAA(AAAA(std::net::Ipv6Addr::from([
                0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, i,
            ]))),
        )
    }));
    s.handle_upstream(now, UP1, &m.to_vec().unwrap());
    let a = answer_for(&mut s, client(7));
    assert!(!a.metadata.truncation);
    assert_eq!(addrs(&a), [ip(3)]);
    assert!(a.additionals.is_empty());
}

/// RFC 6891 6.1.3: an OPT version we do not implement gets BADVERS (an extended RCODE, so
/// with an OPT of version 0).
#[test]
fn badvers_for_edns_version_1() {
    let mut s = server();
    let mut q = edns_query(1, "example.com", RecordType::A, 1232);
    if let Some(e) = q.edns.as_mut() {
        e.set_version(1);
    }
    let (a, _) = ask(&mut s, Instant::now(), client(7), &q);
    // 16 is both BADVERS and BADSIG (RFC 6895 2.3); hickory reads it as the latter.
    assert_eq!(u16::from(a.metadata.response_code), 16);
    assert_eq!(a.edns.as_ref().map(Edns::version), Some(0));
    assert_eq!(s.counters().badvers, 1);
}

// ---- errors and drops ----

/// RFC 1035 4.1.1: a query must have exactly one question (RFC 9619); FORMERR otherwise, with
/// the ID echoed.
#[test]
fn formerr_for_two_questions() {
    let mut s = server();
    let mut q = query(0x4242, "a.example", RecordType::A);
    q.add_query(Query::query(name("b.example"), RecordType::A));
    s.handle_query(Instant::now(), client(7), &q.to_vec().unwrap())
        .unwrap();
    let a = answer_for(&mut s, client(7));
    assert_eq!(a.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(a.metadata.id, 0x4242);
    assert!(a.queries.is_empty());
    // No question at all.
    let mut q = query(0x4343, "a.example", RecordType::A);
    q.queries.clear();
    s.handle_query(Instant::now(), client(7), &q.to_vec().unwrap())
        .unwrap();
    assert_eq!(
        answer_for(&mut s, client(7)).metadata.response_code,
        ResponseCode::FormErr
    );
    assert_eq!(s.counters().formerr, 2);
    assert_eq!(s.counters().forwarded, 0);
}

/// dnsmasq answers an opcode other than QUERY (here STATUS, 2) with NOTIMP.
#[test]
fn notimp_for_other_opcodes() {
    let mut s = server();
    let mut q = query(7, "example.com", RecordType::A);
    q.metadata.op_code = OpCode::Status;
    s.handle_query(Instant::now(), client(7), &q.to_vec().unwrap())
        .unwrap();
    let a = answer_for(&mut s, client(7));
    assert_eq!(a.metadata.response_code, ResponseCode::NotImp);
    assert_eq!(a.metadata.op_code, OpCode::Status);
    assert_eq!(a.metadata.id, 7);
    assert_eq!(a.queries, q.queries);
    // Other classes (CHAOS) and zone transfers are not implemented either.
    let mut q = query(8, "version.bind", RecordType::TXT);
    q.queries[0].set_query_class(DNSClass::CH);
    let (a, _) = ask(&mut s, Instant::now(), client(7), &q);
    assert_eq!(a.metadata.response_code, ResponseCode::NotImp);
    let (a, _) = ask(
        &mut s,
        Instant::now(),
        client(7),
        &query(9, "lab", RecordType::AXFR),
    );
    assert_eq!(a.metadata.response_code, ResponseCode::NotImp);
    assert_eq!(s.counters().notimp, 3);
}

/// What cannot be answered at all is dropped and counted: shorter than a header, or a
/// response (answering responses could loop two servers).
#[test]
fn drops_are_named_and_counted() {
    let mut s = server();
    let now = Instant::now();
    let good = query(1, "example.com", RecordType::A).to_vec().unwrap();
    assert_eq!(
        s.handle_query(now, client(7), &good[..11]),
        Err(DnsDrop::Short)
    );
    assert_eq!(s.handle_query(now, client(7), &[]), Err(DnsDrop::Short));
    let mut response = good.clone();
    response[2] |= 0x80;
    assert_eq!(
        s.handle_query(now, client(7), &response),
        Err(DnsDrop::NotAQuery)
    );
    assert!(outputs(&mut s).is_empty());
    let c = s.counters();
    assert_eq!(
        (c.queries, c.dropped_malformed, c.dropped_not_query),
        (3, 2, 1)
    );
    // A header with a broken question is still answered: FORMERR.
    s.handle_query(now, client(7), &good[..20]).unwrap();
    assert_eq!(
        answer_for(&mut s, client(7)).metadata.response_code,
        ResponseCode::FormErr
    );
}

/// Beyond MAX_IN_FLIGHT questions waiting on upstreams, new ones are REFUSED (dnsmasq: "Maximum
/// number of concurrent DNS queries reached"), and so are clients beyond MAX_WAITERS on one.
#[test]
fn in_flight_questions_are_bounded() {
    let mut s = server();
    let now = Instant::now();
    for i in 0..MAX_IN_FLIGHT {
        let q = query(1, &format!("n{i}.example"), RecordType::A);
        s.handle_query(now, client(7), &q.to_vec().unwrap())
            .unwrap();
    }
    assert_eq!(outputs(&mut s).len(), MAX_IN_FLIGHT);
    let (a, _) = ask(
        &mut s,
        now,
        client(7),
        &query(2, "one-more.example", RecordType::A),
    );
    assert_eq!(a.metadata.response_code, ResponseCode::Refused);
    for i in 1..MAX_WAITERS {
        let c = Client {
            token: 100 + i as u64,
            ..client(8)
        };
        s.handle_query(
            now,
            c,
            &query(3, "n0.example", RecordType::A).to_vec().unwrap(),
        )
        .unwrap();
    }
    assert!(outputs(&mut s).is_empty());
    let (a, _) = ask(
        &mut s,
        now,
        client(9),
        &query(4, "n0.example", RecordType::A),
    );
    assert_eq!(a.metadata.response_code, ResponseCode::Refused);
    assert_eq!(s.counters().refused_busy, 2);
    // Timers clear them all: each client gets its SERVFAIL.
    s.handle_timeout(now + TIMEOUT);
    assert_eq!(outputs(&mut s).len(), MAX_IN_FLIGHT);
    s.handle_timeout(now + TIMEOUT * 2);
    assert_eq!(outputs(&mut s).len(), MAX_IN_FLIGHT + MAX_WAITERS - 1);
    assert_eq!(s.in_flight(), 0);
}

#[test]
fn config_validation() {
    assert_eq!(config().validate(), Ok(()));
    let mut c = config();
    c.hosts = vec![(ip(5), vec!["bad name".into()])];
    assert_eq!(c.validate(), Err(DnsConfigError::Name("bad name".into())));
    let mut c = config();
    c.domain = Some("a..b".into());
    assert!(c.validate().is_err());
    let mut c = config();
    c.network = Some((ip(0), 33));
    assert!(c.validate().is_err());
    let mut c = config();
    c.txt = vec![("x".repeat(64), "v".into())];
    assert!(c.validate().is_err());
}

// ---- hostile input ----

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
    }
}

/// Record types with an RDATA decoder in hickory (and some without).
const RR_TYPES: &[u16] = &[
    0, 1, 2, 5, 6, 10, 12, 13, 15, 16, 24, 25, 28, 30, 33, 35, 37, 39, 41, 43, 44, 46, 47, 48, 50,
    51, 52, 53, 59, 60, 61, 62, 64, 65, 99, 249, 250, 255, 256, 257, 65535,
];

/// Appends a record of a random type whose RDATA is random bytes (biased towards lengths,
/// pointers and letters), sometimes with an RDLENGTH that lies.
fn random_record(rng: &mut XorShift, out: &mut Vec<u8>) {
    if rng.below(2) == 0 {
        out.push(0);
    } else {
        out.extend_from_slice(&[0xc0, 12]);
    }
    let rtype = RR_TYPES[rng.below(RR_TYPES.len())];
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&(rng.next() as u32).to_be_bytes());
    let len = rng.below(80);
    let declared = if rng.below(8) == 0 {
        rng.below(100)
    } else {
        len
    };
    out.extend_from_slice(&(declared as u16).to_be_bytes());
    for _ in 0..len {
        let byte = match rng.below(4) {
            0 => rng.below(4) as u8,
            1 => 0xc0,
            2 => b'a',
            _ => rng.next() as u8,
        };
        out.push(byte);
    }
}

/// Checks what the forwarder did with `input` from `c`: dropped exactly what has no header or
/// is a response; answered FORMERR or NOTIMP what hickory cannot decode; every answer decodes
/// and carries the query's ID.
fn check_query_outcome(s: &mut DnsServer, now: Instant, c: Client, input: &[u8]) {
    let result = s.handle_query(now, c, input);
    let out = outputs(s);
    if input.len() < 12 {
        assert_eq!(result, Err(DnsDrop::Short));
        assert!(out.is_empty());
        return;
    }
    if input[2] & 0x80 != 0 {
        assert_eq!(result, Err(DnsDrop::NotAQuery));
        assert!(out.is_empty());
        return;
    }
    assert_eq!(result, Ok(()), "{input:02x?}");
    assert!(out.len() <= 1, "{out:?}");
    let id = u16::from_be_bytes([input[0], input[1]]);
    let decodable = Message::from_vec(input).is_ok();
    match out.first() {
        Some(Output::ToClient(to, bytes)) => {
            assert_eq!(*to, c);
            assert!(bytes.len() <= usize::from(EDNS_PAYLOAD) || c.transport == Transport::Tcp);
            let a = Message::from_vec(bytes).unwrap();
            assert_eq!(a.metadata.id, id);
            if !decodable {
                assert!(
                    matches!(
                        a.metadata.response_code,
                        ResponseCode::FormErr | ResponseCode::NotImp
                    ),
                    "{input:02x?} -> {a:?}"
                );
            }
        }
        Some(Output::ToUpstream(_, bytes)) => {
            assert!(decodable, "{input:02x?}");
            Message::from_vec(bytes).unwrap();
        }
        // Joined a question already in flight.
        None => assert!(decodable && s.in_flight() > 0),
    }
}

/// Bad input costs a counter, never a panic (DESIGN.md principle 5): every prefix of valid
/// queries, random bytes, valid headers with random bodies, mutated queries, compression loops
/// and absurd counts, from clients; and the same kinds of damage in upstream answers that pass
/// the (ID, server, question) match, so that they reach hickory's decoder.
#[test]
fn garbage_never_panics() {
    let mut c = big_config();
    c.hosts.push((ip(5), vec!["web".into()]));
    c.txt = vec![("t".into(), "text".into())];
    c.srv = vec![SrvRecord {
        service: "s".into(),
        protocol: "tcp".into(),
        domain: None,
        target: Some("web.lab".into()),
        port: 1,
        priority: 1,
        weight: 1,
    }];
    c.cache_size = 20;
    let mut s = server_with(c);
    s.add_name(ip(10), "vm1");
    let mut now = Instant::now();

    let samples: Vec<Vec<u8>> = vec![
        query(1, "vm1.lab", RecordType::A).to_vec().unwrap(),
        edns_query(2, "big.example", RecordType::A, 1232)
            .to_vec()
            .unwrap(),
        query(3, "10.122.168.192.in-addr.arpa", RecordType::PTR)
            .to_vec()
            .unwrap(),
        query(4, "_s._tcp.lab", RecordType::SRV).to_vec().unwrap(),
        edns_query(5, "www.example.com", RecordType::AAAA, 4096)
            .to_vec()
            .unwrap(),
        query(6, "t", RecordType::ANY).to_vec().unwrap(),
    ];
    for sample in &samples {
        for len in 0..=sample.len() {
            check_query_outcome(&mut s, now, client(7), &sample[..len]);
        }
    }

    // Hand-made hostility: a question that points at itself, a pointer into the header, a
    // label running past the end, a name longer than 255, every count at 0xffff, two OPTs.
    let header = |qd: u16, an: u16, ns: u16, ar: u16| {
        let mut h = vec![0xab, 0xcd, 0x01, 0x00];
        for n in [qd, an, ns, ar] {
            h.extend_from_slice(&n.to_be_bytes());
        }
        h
    };
    let mut crafted: Vec<Vec<u8>> = Vec::new();
    let mut m = header(1, 0, 0, 0);
    m.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    crafted.push(m);
    let mut m = header(1, 0, 0, 0);
    m.extend_from_slice(&[0xc0, 0x02, 0, 1, 0, 1]);
    crafted.push(m);
    let mut m = header(1, 0, 0, 0);
    m.extend_from_slice(&[0x3f, b'a', b'b']);
    crafted.push(m);
    let mut m = header(1, 0, 0, 0);
    for _ in 0..5 {
        m.push(63);
        m.extend_from_slice(&[b'x'; 63]);
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    crafted.push(m);
    let mut m = header(0xffff, 0xffff, 0xffff, 0xffff);
    m.extend_from_slice(&[3, b'w', b'w', b'w', 0, 0, 1, 0, 1]);
    crafted.push(m);
    let mut m = header(1, 0, 0, 2);
    m.extend_from_slice(&[3, b'w', b'w', b'w', 0, 0, 1, 0, 1]);
    for _ in 0..2 {
        m.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
    }
    crafted.push(m);
    // An answer record whose owner name is a compression loop.
    let mut m = header(1, 1, 0, 0);
    m.extend_from_slice(&[3, b'w', b'w', b'w', 0, 0, 1, 0, 1]);
    let at = m.len();
    m.extend_from_slice(&[0xc0, at as u8, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4]);
    crafted.push(m);
    // An OPT with an option longer than its RDATA.
    let mut m = header(1, 0, 0, 1);
    m.extend_from_slice(&[3, b'w', b'w', b'w', 0, 0, 1, 0, 1]);
    m.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 4, 0, 10, 0, 200]);
    crafted.push(m);
    for m in &crafted {
        check_query_outcome(&mut s, now, client(7), m);
        for len in 0..m.len() {
            check_query_outcome(&mut s, now, client(7), &m[..len]);
        }
    }

    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for case in 0..6000 {
        now += Duration::from_millis(rng.next() % 300);
        let bytes: Vec<u8> = match case % 4 {
            // Random bytes, of any length.
            0 => (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
            // A valid header, random body.
            1 => {
                let mut b = samples[rng.below(samples.len())][..12].to_vec();
                b.extend((0..rng.below(300)).map(|_| rng.next() as u8));
                b
            }
            // A crafted or valid message with a few bytes changed.
            _ => {
                let pool = if case % 8 == 2 { &crafted } else { &samples };
                let mut b = pool[rng.below(pool.len())].clone();
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(b.len());
                    b[i] = rng.next() as u8;
                }
                b
            }
        };
        let c = if case % 5 == 0 {
            tcp_client(9)
        } else {
            client((case % 200) as u8)
        };
        check_query_outcome(&mut s, now, c, &bytes);
        if case % 13 == 0 {
            s.handle_timeout(now);
            outputs(&mut s);
        }
    }

    // Upstream answers: forward a question, then answer it with damaged messages that keep
    // the ID and question (so they are matched and decoded) or damage them too.
    let good_answers = |q: &Message| {
        vec![
            reply(
                q,
                ResponseCode::NoError,
                vec![a_rec("www.example.com", ip(99), 60)],
                vec![],
            ),
            reply(
                q,
                ResponseCode::NXDomain,
                vec![],
                vec![soa("example.com", 60, 60)],
            ),
            reply(
                q,
                ResponseCode::NoError,
                vec![Record::from_rdata(
                    name("www.example.com"),
                    60,
                    RData::CNAME(CNAME(name("x.example.net"))),
                )],
                vec![],
            ),
        ]
    };
    for case in 0..3000 {
        now += Duration::from_millis(rng.next() % 50);
        let qname = format!("q{case}.example.com");
        let q = query(case as u16, &qname, RecordType::A);
        s.handle_query(now, client(3), &q.to_vec().unwrap())
            .unwrap();
        let out = outputs(&mut s);
        let Some(Output::ToUpstream(to, up)) = out.first() else {
            continue;
        };
        let up = decode(up);
        let goods = good_answers(&up);
        let mut b = goods[rng.below(goods.len())].clone();
        let question_end = 12 + qname.len() + 2 + 4;
        match case % 4 {
            // Records of every type hickory has a decoder for, with random RDATA.
            3 => {
                b.truncate(question_end);
                let count = 1 + rng.below(3);
                b[6..12].copy_from_slice(&[0, count as u8, 0, 0, 0, 0]);
                for _ in 0..count {
                    random_record(&mut rng, &mut b);
                }
            }
            // Damage after the question: matched, then decoded by hickory.
            0 if b.len() > question_end => {
                for _ in 0..1 + rng.below(6) {
                    let i = question_end + rng.below(b.len() - question_end);
                    b[i] = rng.next() as u8;
                }
            }
            // Truncated anywhere.
            1 => b.truncate(rng.below(b.len() + 1)),
            // Random tail after the question, counts from the original.
            _ => {
                b.truncate(question_end.min(b.len()));
                b.extend((0..rng.below(200)).map(|_| rng.next() as u8));
            }
        }
        s.handle_upstream(now, *to, &b);
        for o in outputs(&mut s) {
            match o {
                Output::ToClient(c, bytes) => {
                    assert_eq!(c, client(3));
                    let m = Message::from_vec(&bytes).unwrap();
                    assert_eq!(m.metadata.id, case as u16);
                }
                Output::ToUpstream(_, bytes) => {
                    Message::from_vec(&bytes).unwrap();
                }
            }
        }
        if case % 7 == 0 {
            s.handle_timeout(now + TIMEOUT * 3);
            outputs(&mut s);
        }
    }
    let c = s.counters();
    assert!(c.formerr > 1000, "{c:?}");
    assert!(c.dropped_malformed + c.dropped_not_query > 500, "{c:?}");
    assert!(c.upstream_malformed > 100, "{c:?}");
    // The damaged messages reach every stage, not just the parser.
    assert!(
        c.local_answers > 0 && c.forwarded > 0 && c.upstream_responses > 0,
        "{c:?}"
    );
}
