//! The hand-encoded fast path against the hickory path: for every query it answers, the answer
//! must be the hickory path's, byte for byte (and so also once decoded), with the same counters
//! moved; for every other query it must step aside. Queries are written by hand here, byte by
//! byte, so that letter case, flags and OPT fields are exactly what the test says.

use super::*;
use crate::dns::fast;

/// Lease `vm1` (192.168.122.10) and `<dns><host>` names: `printer` (.7), `gateway` (the
/// gateway's own address, .1), `multi` with two addresses; a TXT-only name; `lab` local-only.
fn fast_config() -> DnsConfig {
    let mut c = config();
    c.local_only = true;
    c.hosts = vec![
        (ip(7), vec!["printer".into()]),
        (ip(1), vec!["gateway".into()]),
        (ip(21), vec!["multi".into()]),
        (ip(22), vec!["multi".into()]),
    ];
    c.txt = vec![("t.lab".into(), "text".into())];
    c
}

/// The same server twice, one with the fast path off.
fn pair_with(config: DnsConfig) -> (DnsServer, DnsServer) {
    let mut fast = server_with(config.clone());
    let mut slow = server_with(config);
    slow.fast_path = false;
    for s in [&mut fast, &mut slow] {
        s.add_name(ip(10), "vm1");
    }
    (fast, slow)
}

fn pair() -> (DnsServer, DnsServer) {
    pair_with(fast_config())
}

const RD: u8 = 0x01;
const CD: u8 = 0x10;

/// A query as bytes: ID 0xbeef, `flags` split over the two flag octets (RD in the first, CD in
/// the second), one question `qname` (dotted, case kept) of `qtype`, class IN, then `tail`
/// (records counted in ARCOUNT by `arcount`).
fn raw(flags: (u8, u8), qname: &str, qtype: u16, arcount: u16, tail: &[u8]) -> Vec<u8> {
    let mut m = vec![0xbe, 0xef, flags.0, flags.1, 0, 1, 0, 0, 0, 0];
    m.extend_from_slice(&arcount.to_be_bytes());
    for label in qname.split('.').filter(|l| !l.is_empty()) {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(tail);
    m
}

/// An OPT RR (RFC 6891 6.1.2): root owner, `payload`, extended RCODE 0, `version`, DO as
/// given, `options` as RDATA.
fn opt(payload: u16, version: u8, dnssec_ok: bool, options: &[u8]) -> Vec<u8> {
    let mut rr = vec![0, 0, 41];
    rr.extend_from_slice(&payload.to_be_bytes());
    rr.extend_from_slice(&[0, version, if dnssec_ok { 0x80 } else { 0 }, 0]);
    rr.extend_from_slice(&(options.len() as u16).to_be_bytes());
    rr.extend_from_slice(options);
    rr
}

fn plain(qname: &str, qtype: u16) -> Vec<u8> {
    raw((RD, 0), qname, qtype, 0, &[])
}

fn with_opt(qname: &str, qtype: u16, opt_rr: &[u8]) -> Vec<u8> {
    raw((RD, 0), qname, qtype, 1, opt_rr)
}

fn fast_reply(s: &DnsServer, c: Client, query: &[u8]) -> Option<(fast::Kind, Vec<u8>)> {
    s.fast_answer(&wire::Header::parse(query)?, c, query)
}

/// Sends `query` from `c` to both servers and checks that they do the same: the same outputs,
/// byte for byte and once decoded by hickory, and the same counters. Returns the outputs.
fn same(fast: &mut DnsServer, slow: &mut DnsServer, c: Client, query: &[u8]) -> Vec<Output> {
    let now = Instant::now();
    let rf = fast.handle_query(now, c, query);
    let rs = slow.handle_query(now, c, query);
    assert_eq!(rf, rs, "{query:02x?}");
    let (of, os) = (outputs(fast), outputs(slow));
    assert_eq!(of.len(), os.len(), "{query:02x?}");
    for (f, s) in of.iter().zip(&os) {
        if let (Output::ToClient(_, fb), Output::ToClient(_, sb)) = (f, s) {
            assert_eq!(
                Message::from_vec(fb).ok(),
                Message::from_vec(sb).ok(),
                "{query:02x?}"
            );
        }
        assert_eq!(f, s, "{query:02x?}");
    }
    assert_eq!(fast.counters(), slow.counters(), "{query:02x?}");
    of
}

/// Sends `query` to both servers, expecting the fast path to answer it (with `kind`) exactly
/// as the hickory path does; returns the answer.
fn fast_same(
    fast: &mut DnsServer,
    slow: &mut DnsServer,
    c: Client,
    query: &[u8],
    kind: fast::Kind,
) -> Vec<u8> {
    let (k, expected) = fast_reply(fast, c, query).expect("the fast path answers");
    assert_eq!(k, kind, "{query:02x?}");
    let out = same(fast, slow, c, query);
    let [Output::ToClient(to, bytes)] = &out[..] else {
        panic!("expected one answer, got {out:?}");
    };
    assert_eq!(*to, c);
    assert_eq!(*bytes, expected);
    bytes.clone()
}

/// Sends `query` to both servers, expecting the fast path to step aside, and both to do the
/// same (the hickory path's work).
fn slow_same(fast: &mut DnsServer, slow: &mut DnsServer, c: Client, query: &[u8]) -> Vec<Output> {
    assert_eq!(fast_reply(fast, c, query), None, "{query:02x?}");
    same(fast, slow, c, query)
}

/// The offset just after the question of `query` (one uncompressed name).
fn question_end(query: &[u8]) -> usize {
    let mut at = 12;
    while query[at] != 0 {
        at += 1 + usize::from(query[at]);
    }
    at + 1 + 4
}

/// RFC 1035 4.1.1 (header: ID copied, QR, AA and RA set, RD and CD copied, RCODE 0, one
/// question), 4.1.3 (A records: owner, TYPE A, CLASS IN, TTL, RDLENGTH 4) and 4.1.4 (the owner
/// a pointer to the question's name at offset 12): lease names plain and qualified, host
/// names, the gateway's own name, a name with two addresses, in any letter case, which the
/// answer echoes as asked (RFC 4343 / RFC 1035 7.1).
#[test]
fn fast_path_a_rfc1035_4_1_1_4_1_3_4_1_4() {
    let (mut f, mut s) = pair();
    let cases: &[(&str, &[Ipv4Addr])] = &[
        ("vm1", &[ip(10)]),
        ("vm1.lab", &[ip(10)]),
        ("Vm1.LaB", &[ip(10)]),
        ("printer", &[ip(7)]),
        ("PRINTER.lab", &[ip(7)]),
        ("gateway.lab", &[ip(1)]),
        ("Gateway", &[ip(1)]),
        ("multi.lab", &[ip(21), ip(22)]),
    ];
    for (qname, addrs) in cases {
        for flags in [(RD, 0), (0, 0), (RD, CD), (0, CD)] {
            let q = raw(flags, qname, wire::TYPE_A, 0, &[]);
            let a = fast_same(&mut f, &mut s, client(9), &q, fast::Kind::Records);
            assert_eq!(&a[..2], &[0xbe, 0xef]);
            assert_eq!(a[2], 0x80 | 0x04 | flags.0, "QR AA RD");
            assert_eq!(a[3], 0x80 | flags.1, "RA CD, NOERROR");
            assert_eq!(&a[4..12], &[0, 1, 0, addrs.len() as u8, 0, 0, 0, 0]);
            let end = question_end(&q);
            assert_eq!(a[12..end], q[12..end], "question echoed as asked");
            let mut at = end;
            for addr in *addrs {
                // 0xC00C, A, IN, TTL 0 (local-ttl's default), RDLENGTH 4, the address.
                assert_eq!(a[at..at + 10], [0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0]);
                assert_eq!(a[at + 10..at + 12], [0, 4]);
                assert_eq!(a[at + 12..at + 16], addr.octets());
                at += 16;
            }
            assert_eq!(at, a.len());
            let m = decode(&a);
            assert!(m.metadata.authoritative);
            assert_eq!(m.queries[0].name().to_ascii(), format!("{qname}."));
        }
    }
    let c = f.counters();
    assert_eq!(c.local_answers, 32);
    assert_eq!((c.queries, c.forwarded, c.formerr), (32, 0, 0));
}

/// The TTL is `local-ttl` (RFC 1035 4.1.3: a 32-bit TTL), as on the hickory path.
#[test]
fn fast_path_local_ttl_rfc1035_4_1_3() {
    let mut c = fast_config();
    c.local_ttl = 0x0102_0304;
    let (mut f, mut s) = pair_with(c);
    let q = plain("vm1.lab", wire::TYPE_A);
    let a = fast_same(&mut f, &mut s, client(9), &q, fast::Kind::Records);
    let at = question_end(&q);
    assert_eq!(a[at + 6..at + 10], [1, 2, 3, 4]);
    assert_eq!(ttls(&decode(&a)), vec![0x0102_0304]);
}

/// RFC 6891 6.1.1-6.1.3: a query with an OPT gets one, and only then: payload 1232 whatever the
/// client's, version 0, DO echoed (RFC 3225 3), extended RCODE 0, no options; the client's
/// own options (here a COOKIE, which is not echoed) change nothing.
#[test]
fn fast_path_edns_rfc6891_6_1() {
    let (mut f, mut s) = pair();
    let cookie = [0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8];
    let opts: &[(u16, bool, &[u8])] = &[
        (1232, false, &[]),
        (4096, false, &[]),
        (512, true, &[]),
        // Below 512 counts as 512 (6.2.5).
        (100, false, &[]),
        (0, true, &[]),
        (1232, true, &cookie),
        // Two options, one empty.
        (
            1400,
            false,
            &[0, 12, 0, 0, 0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8],
        ),
    ];
    for &(payload, dnssec_ok, options) in opts {
        for qname in ["vm1.lab", "Printer"] {
            let q = with_opt(qname, wire::TYPE_A, &opt(payload, 0, dnssec_ok, options));
            let a = fast_same(&mut f, &mut s, client(9), &q, fast::Kind::Records);
            assert_eq!(&a[10..12], &[0, 1], "ARCOUNT");
            let rr = &a[a.len() - 11..];
            let flags = if dnssec_ok { 0x80 } else { 0 };
            assert_eq!(rr, [0, 0, 41, 0x04, 0xd0, 0, 0, flags, 0, 0, 0]);
            let m = decode(&a);
            let edns = m.edns.as_ref().expect("an OPT");
            assert_eq!(edns.max_payload(), EDNS_PAYLOAD);
            assert_eq!(edns.flags().dnssec_ok, dnssec_ok);
        }
        // NODATA and NXDOMAIN carry the OPT too.
        let q = with_opt("vm1", wire::TYPE_AAAA, &opt(payload, 0, dnssec_ok, options));
        fast_same(&mut f, &mut s, client(9), &q, fast::Kind::NoData);
        let q = with_opt(
            "nope.lab",
            wire::TYPE_A,
            &opt(payload, 0, dnssec_ok, options),
        );
        let a = fast_same(&mut f, &mut s, client(9), &q, fast::Kind::NxDomain);
        assert_eq!(a[3] & 0x0f, 3);
    }
    // Without an OPT, none (6.1.1: a responder includes one only if the request had one).
    let a = fast_same(
        &mut f,
        &mut s,
        client(9),
        &plain("vm1", wire::TYPE_A),
        fast::Kind::Records,
    );
    assert_eq!(&a[10..12], &[0, 0]);
    assert!(decode(&a).edns.is_none());
}

/// NODATA (RFC 2308 2.2: NOERROR, no answers) for a local name without the type, and
/// NXDOMAIN (RFC 1035 4.1.1 RCODE 3) for a name under a local-only zone or in the network's
/// reverse zone, both authoritative, counted as on the hickory path.
#[test]
fn fast_path_nodata_and_nxdomain_rfc1035_4_1_1() {
    let (mut f, mut s) = pair();
    let c = client(9);
    for (qname, qtype) in [
        ("vm1", wire::TYPE_AAAA),
        ("VM1.lab", wire::TYPE_AAAA),
        ("printer.lab", wire::TYPE_AAAA),
        ("vm1.lab", wire::TYPE_PTR),
        // Local through its TXT record only.
        ("t.lab", wire::TYPE_A),
        // A reverse name with a PTR, asked for its A.
        ("10.122.168.192.in-addr.arpa", wire::TYPE_A),
    ] {
        let a = fast_same(&mut f, &mut s, c, &plain(qname, qtype), fast::Kind::NoData);
        assert_eq!(a[2..8], [0x85, 0x80, 0, 1, 0, 0]);
    }
    for (qname, qtype) in [
        ("nope.lab", wire::TYPE_A),
        ("a.b.LAB", wire::TYPE_AAAA),
        ("lab", wire::TYPE_A),
        ("99.122.168.192.in-addr.arpa", wire::TYPE_PTR),
        ("122.168.192.in-addr.arpa", wire::TYPE_PTR),
    ] {
        let a = fast_same(
            &mut f,
            &mut s,
            c,
            &plain(qname, qtype),
            fast::Kind::NxDomain,
        );
        assert_eq!(a[2..8], [0x85, 0x83, 0, 1, 0, 0]);
    }
    let counters = f.counters();
    assert_eq!(
        (
            counters.local_nodata,
            counters.nxdomain_local,
            counters.forwarded
        ),
        (6, 5, 0)
    );

    // Plain names are local with forwardPlainNames='no' (dnsmasq's local=//).
    let mut config = fast_config();
    config.forward_plain_names = false;
    let (mut f, mut s) = pair_with(config);
    fast_same(
        &mut f,
        &mut s,
        c,
        &plain("nobody", wire::TYPE_A),
        fast::Kind::NxDomain,
    );
}

/// PTR for a lease's and a host's address (RFC 1035 3.5), the target written in full (RFC 1035
/// 4.1.4 allows, not requires, compression; hickory finds nothing to compress either).
#[test]
fn fast_path_ptr_rfc1035_3_5() {
    let (mut f, mut s) = pair();
    for (qname, target) in [
        ("10.122.168.192.in-addr.arpa", "vm1.lab."),
        ("7.122.168.192.IN-ADDR.ARPA", "printer.lab."),
        ("1.122.168.192.in-addr.arpa", "gateway.lab."),
    ] {
        let a = fast_same(
            &mut f,
            &mut s,
            client(9),
            &plain(qname, wire::TYPE_PTR),
            fast::Kind::Records,
        );
        assert_eq!(rdata_names(&decode(&a)), vec![target.to_owned()]);
    }
}

/// Everything outside the common case goes to the hickory path, which decides it as before;
/// the fast path never answers it. Among them, RFC 1035 4.1.1's counts and RFC 6891 6.1.1's
/// single OPT at the end: a byte after the last record (hickory ignores it and answers; the
/// fast path does not guess), a second OPT, an OPT that is not last or not version 0.
#[test]
fn fast_path_steps_aside() {
    let (mut f, mut s) = pair();
    let c = client(9);
    let a = wire::TYPE_A;
    let mut cases: Vec<Vec<u8>> = Vec::new();
    // A trailing byte after the question, and after the OPT.
    let mut q = plain("vm1.lab", a);
    q.push(0);
    cases.push(q);
    let mut q = with_opt("vm1.lab", a, &opt(1232, 0, false, &[]));
    q.push(0);
    cases.push(q);
    // RDLENGTH shorter than what follows, options that overrun RDATA, an ECS option.
    let mut rr = opt(1232, 0, false, &[0, 10, 0, 2, 1, 2]);
    rr[10] = 4;
    cases.push(with_opt("vm1.lab", a, &rr));
    cases.push(with_opt(
        "vm1.lab",
        a,
        &opt(1232, 0, false, &[0, 10, 0, 9, 1]),
    ));
    cases.push(with_opt(
        "vm1.lab",
        a,
        &opt(1232, 0, false, &[0, 8, 0, 7, 0, 1, 24, 0, 192, 168, 122]),
    ));
    // EDNS version 1 (BADVERS), an OPT owner that is not the root, two OPTs.
    cases.push(with_opt("vm1.lab", a, &opt(1232, 1, false, &[])));
    let mut rr = opt(1232, 0, false, &[]);
    rr.splice(0..1, [1, b'x', 0]);
    cases.push(with_opt("vm1.lab", a, &rr));
    let mut two = opt(1232, 0, false, &[]);
    two.extend(opt(1232, 0, false, &[]));
    cases.push(raw((RD, 0), "vm1.lab", a, 2, &two));
    // ARCOUNT 1 with nothing there, an A record in the additional section.
    cases.push(raw((RD, 0), "vm1.lab", a, 1, &[]));
    cases.push(raw(
        (RD, 0),
        "vm1.lab",
        a,
        1,
        &[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4],
    ));
    // Other counts, opcodes, classes and types.
    let mut q = plain("vm1.lab", a);
    q[7] = 1;
    cases.push(q);
    let mut q = plain("vm1.lab", a);
    q[9] = 1;
    cases.push(q);
    let mut q = plain("vm1.lab", a);
    q[5] = 2;
    cases.push(q);
    let mut q = plain("vm1.lab", a);
    q[2] |= 2 << 3;
    cases.push(q);
    let mut q = plain("vm1.lab", a);
    let end = q.len();
    q[end - 1] = 3;
    cases.push(q);
    for qtype in [wire::TYPE_TXT, wire::TYPE_ANY, wire::TYPE_SRV, 15, 252] {
        cases.push(plain("vm1.lab", qtype));
    }
    // A compressed question name.
    let mut q = raw((RD, 0), "", a, 0, &[]);
    q.splice(12..13, [0xc0, 12]);
    cases.push(q);
    // Names that are not local: forwarded.
    cases.push(plain("www.example.com", a));
    cases.push(plain("vm2", a));
    for q in &cases {
        slow_same(&mut f, &mut s, c, q);
    }
    // The trailing byte is the hickory path's to take: it answers as if it were not there.
    let mut q = plain("vm1.lab", a);
    q.push(0);
    let out = slow_same(&mut f, &mut s, c, &q);
    let [Output::ToClient(_, bytes)] = &out[..] else {
        panic!("{out:?}");
    };
    assert_eq!(addrs(&decode(bytes)), vec![ip(10)]);
    // What was asked of QR set or short messages is still dropped.
    assert_eq!(fast_reply(&f, c, &[0xbe, 0xef]), None);
    let mut q = plain("vm1.lab", a);
    q[2] |= 0x80;
    slow_same(&mut f, &mut s, c, &q);
}

/// RFC 1035 4.2.1 / RFC 6891 6.2.5: an answer that does not fit the client's payload is the
/// hickory path's (which truncates it and counts); one that fits is not, up to `MAX_RECORDS`
/// records, which hickory still compresses all of.
#[test]
fn fast_path_leaves_truncation_to_hickory_rfc1035_4_2_1() {
    // 40 addresses: 12 + 13 + 40 * 16 = 665 octets.
    let mut config = fast_config();
    config.hosts = (0..40).map(|i| (ip(100 + i), vec!["big".into()])).collect();
    let (mut f, mut s) = pair_with(config);
    slow_same(&mut f, &mut s, client(9), &plain("big.lab", wire::TYPE_A));
    assert_eq!(f.counters().truncated, 1);
    let q = with_opt("big.lab", wire::TYPE_A, &opt(1232, 0, false, &[]));
    fast_same(&mut f, &mut s, client(9), &q, fast::Kind::Records);
    let q = with_opt("big.lab", wire::TYPE_A, &opt(600, 0, false, &[]));
    slow_same(&mut f, &mut s, client(9), &q);
    fast_same(
        &mut f,
        &mut s,
        tcp_client(9),
        &plain("big.lab", wire::TYPE_A),
        fast::Kind::Records,
    );
    assert_eq!(f.counters().truncated, 2);

    // Over TCP: 100 records (every owner still a pointer), then 101.
    for (n, fast_path) in [(100u32, true), (101, false)] {
        let mut config = fast_config();
        config.hosts = (0..n)
            .map(|i| (Ipv4Addr::from(0x0a00_0000 + i), vec!["big".into()]))
            .collect();
        let (mut f, mut s) = pair_with(config);
        let q = plain("big", wire::TYPE_A);
        if fast_path {
            let a = fast_same(&mut f, &mut s, tcp_client(9), &q, fast::Kind::Records);
            assert_eq!(a[a.len() - 16..a.len() - 14], [0xc0, 0x0c]);
        } else {
            slow_same(&mut f, &mut s, tcp_client(9), &q);
        }
    }
}

/// A PTR target ending in the question's last label would be compressed by hickory: left to it.
#[test]
fn fast_path_ptr_target_sharing_a_label_is_left_to_hickory() {
    let mut config = fast_config();
    config.hosts = vec![(ip(30), vec!["odd.arpa".into()])];
    let (mut f, mut s) = pair_with(config);
    slow_same(
        &mut f,
        &mut s,
        client(9),
        &plain("30.122.168.192.in-addr.arpa", wire::TYPE_PTR),
    );
    // With the question's last label in another case, hickory compresses nothing: fast.
    fast_same(
        &mut f,
        &mut s,
        client(9),
        &plain("30.122.168.192.in-addr.ARPA", wire::TYPE_PTR),
        fast::Kind::Records,
    );
}

/// Damaged versions of every query above, and random tails: whatever the fast path answers is
/// what the hickory path answers, and it steps aside from the rest; nothing panics.
#[test]
fn fast_path_matches_hickory_under_damage() {
    let mut config = fast_config();
    config.hosts.push((ip(30), vec!["odd.arpa".into()]));
    let (mut f, mut s) = pair_with(config);
    let mut base: Vec<Vec<u8>> = Vec::new();
    for qname in [
        "vm1",
        "VM1.Lab",
        "printer.lab",
        "nope.lab",
        "t.lab",
        "multi",
    ] {
        for qtype in [wire::TYPE_A, wire::TYPE_AAAA, wire::TYPE_PTR] {
            base.push(plain(qname, qtype));
            base.push(with_opt(
                qname,
                qtype,
                &opt(1232, 0, true, &[0, 10, 0, 2, 1, 2]),
            ));
        }
    }
    base.push(plain("10.122.168.192.in-addr.arpa", wire::TYPE_PTR));
    base.push(plain("30.122.168.192.in-addr.arpa", wire::TYPE_PTR));
    let mut rng = XorShift(0x0123_4567_89ab_cdef);
    let mut fast_answers = 0;
    for case in 0..20_000 {
        let mut q = base[rng.below(base.len())].clone();
        match case % 4 {
            0 => {}
            1 => {
                for _ in 0..1 + rng.below(3) {
                    let i = rng.below(q.len());
                    q[i] = match rng.below(3) {
                        0 => rng.below(4) as u8,
                        1 => q[i] ^ (1 << rng.below(8)),
                        _ => rng.next() as u8,
                    };
                }
            }
            2 => q.truncate(rng.below(q.len() + 1)),
            _ => q.extend((0..1 + rng.below(12)).map(|_| rng.below(3) as u8)),
        }
        let c = if case % 7 == 0 {
            tcp_client(9)
        } else {
            client(9)
        };
        if fast_reply(&f, c, &q).is_some() {
            fast_answers += 1;
        }
        same(&mut f, &mut s, c, &q);
        if case % 50 == 0 {
            // Forwarded questions time out on both sides alike.
            let later = Instant::now() + TIMEOUT * 10;
            f.handle_timeout(later);
            s.handle_timeout(later);
            assert_eq!(outputs(&mut f), outputs(&mut s));
        }
    }
    assert!(fast_answers > 4000, "{fast_answers}");
    assert!(f.counters().formerr > 100, "{:?}", f.counters());
}

/// The fast path's one heap allocation is the answer's buffer (the output queue keeps its
/// capacity between queries).
#[test]
fn fast_path_allocates_only_the_answer() {
    let (mut f, _) = pair();
    let now = Instant::now();
    let queries = [
        plain("vm1.lab", wire::TYPE_A),
        plain("Printer", wire::TYPE_A),
        with_opt(
            "multi.lab",
            wire::TYPE_A,
            &opt(1232, 0, true, &[0, 10, 0, 2, 1, 2]),
        ),
        plain("vm1", wire::TYPE_AAAA),
        plain("nope.lab", wire::TYPE_A),
        plain("10.122.168.192.in-addr.arpa", wire::TYPE_PTR),
    ];
    for q in &queries {
        f.handle_query(now, client(9), q).unwrap();
        assert!(f.poll_output().is_some());
        let info = allocation_counter::measure(|| {
            f.handle_query(now, client(9), q).unwrap();
            let out = f.poll_output();
            assert!(matches!(out, Some(Output::ToClient(..))));
        });
        assert_eq!(info.count_total, 1, "{q:02x?}");
    }
}
