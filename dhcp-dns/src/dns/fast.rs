//! Local answers encoded by hand, for the question guests ask most.
//!
//! A guest resolving a lease or `<dns><host>` name, or the gateway's own, sends a standard query
//! with one question, A (and AAAA next to it), class IN, perhaps an EDNS0 OPT: that is nearly
//! all of what a network's DNS answers locally. Through hickory each costs a decode of the whole
//! message, records built and encoded again, and a dozen heap allocations, most of the time a
//! local answer takes. Here the message is checked byte by byte, the name read into a buffer on
//! the stack, the zone asked through borrowed views ([`Zone::held`], [`Zone::route`]), and the
//! answer written into the one buffer the caller sends: no other allocation.
//!
//! What is answered here, and nothing else:
//! - a standard query (QR 0, opcode QUERY) with one question, no answer or authority records,
//!   and either no additional record or exactly one OPT (RFC 6891 6.1.2) with the root as owner,
//!   version 0 and options that exactly fill its RDATA, ending the message; nothing after the
//!   last record (RFC 1035 4.1.1);
//! - class IN and type A, AAAA or PTR, the name uncompressed (RFC 1035 4.1.2, 4.1.4);
//! - a name with local data (its records, or NODATA) or under a local-only zone (NXDOMAIN);
//! - an answer that fits the client's size (512 octets without OPT, RFC 1035 4.2.1; its payload
//!   within 512..=[`EDNS_PAYLOAD`] with one, RFC 6891 6.2.5), so it is never truncated here.
//!
//! Anything else returns `None` and takes the hickory path in `handle_query`, which decides
//! every error, truncation and forwarding, so that the fast path needs no error of its own and
//! can never drop a query. A few cases it could answer are left to it on purpose, as not worth
//! the code: an OPT carrying an ECS option (whose data hickory parses and may refuse), a PTR
//! target whose last label is the question's (hickory would compress it), more than
//! [`MAX_RECORDS`] addresses (hickory stops compressing after 119 names).
//!
//! The answer is the one the hickory path sends for the same query, byte for byte (the tests
//! compare the two for every case here, and for random damage to them): ID, RD and CD copied,
//! QR, AA and RA set, AD and Z clear (RFC 1035 4.1.1, RFC 4035 3.2.3); the question echoed as
//! received, letter case included (RFC 1035 7.1 / RFC 4343); each record's owner a compression
//! pointer to the question's name at offset 12 (RFC 1035 4.1.4); TTL `local-ttl`; an OPT
//! exactly when the query had one, advertising [`EDNS_PAYLOAD`], version 0, DO echoed and no
//! options (RFC 6891 6.1.3, RFC 3225 3).

use std::net::Ipv4Addr;

use super::wire::{self, Header, NameRef};
use super::zone::{PtrTarget, Route, Zone};
use super::{EDNS_PAYLOAD, PLAIN_UDP_PAYLOAD, Transport};

/// Most records in an answer written here: hickory, whose answers these must equal, stops
/// compressing names after the 119th of a message (the question's counts), and a name with
/// more addresses than this is rare enough for the slow path.
const MAX_RECORDS: usize = 100;
/// EDNS0 option code of Client Subnet (RFC 7871 6), whose data hickory decodes (and refuses
/// when malformed) where it keeps other options as opaque bytes.
const OPTION_ECS: u16 = 8;
/// Owner (a pointer to offset 12), TYPE, CLASS, TTL, RDLENGTH (RFC 1035 3.2.1, 4.1.3).
const RR_FIXED_LEN: usize = 2 + 2 + 2 + 4 + 2;
/// An OPT without options: root owner, TYPE, CLASS (payload), TTL (flags), RDLENGTH.
const OPT_LEN: usize = 1 + 2 + 2 + 4 + 2;
/// A compression pointer to the question's name, which starts right after the header.
const QNAME_POINTER: [u8; 2] = [0xc0, wire::HEADER_LEN as u8];

/// Which local answer was given, for its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Records of the type asked (`local_answers`).
    Records,
    /// A local name without that type (`local_nodata`).
    NoData,
    /// A name under a local-only zone without local data (`nxdomain_local`).
    NxDomain,
}

/// The EDNS0 part of a query that matters to its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClientOpt {
    /// The client's UDP payload size, at least 512 (RFC 6891 6.2.5).
    payload: u16,
    /// RFC 3225 3: echoed in the answer's OPT.
    dnssec_ok: bool,
}

/// What is written after the question.
#[derive(Debug, Clone, Copy)]
enum Data<'a> {
    None,
    A(&'a [Ipv4Addr]),
    Ptr(PtrTarget<'a>),
}

/// The answer to `query` (whose header is `header`) from local data, with what kind it is, or
/// `None` for anything the hickory path must decide (see the module's documentation).
pub(crate) fn answer(
    zone: &Zone,
    ttl: u32,
    header: &Header,
    query: &[u8],
    transport: Transport,
) -> Option<(Kind, Vec<u8>)> {
    // RFC 1035 4.1.1: a standard query, one question, nothing but an OPT besides it.
    if header.qr
        || header.opcode != wire::OPCODE_QUERY
        || header.qdcount != 1
        || header.ancount != 0
        || header.nscount != 0
        || header.arcount > 1
    {
        return None;
    }
    let mut name_buf = [0; wire::MAX_NAME_LEN];
    let (name_len, name_end) = wire::read_name(query, wire::HEADER_LEN, &mut name_buf)?;
    let name = NameRef::new(&name_buf[..name_len]);
    let question_end = name_end + 4;
    let [t0, t1, c0, c1] = *query.get(name_end..question_end)? else {
        return None;
    };
    let qtype = u16::from_be_bytes([t0, t1]);
    if u16::from_be_bytes([c0, c1]) != wire::CLASS_IN
        || !matches!(qtype, wire::TYPE_A | wire::TYPE_AAAA | wire::TYPE_PTR)
    {
        return None;
    }
    // The question as received, for the echo: the name's letters in their case.
    let question = &query[wire::HEADER_LEN..question_end];
    let edns = match header.arcount {
        0 if query.len() == question_end => None,
        1 => Some(read_opt(&query[question_end..])?),
        _ => return None,
    };

    let held = zone.held(name);
    let (kind, data) = if qtype == wire::TYPE_A && !held.addrs.is_empty() {
        (Kind::Records, Data::A(held.addrs))
    } else if let (wire::TYPE_PTR, Some(target)) = (qtype, held.ptr) {
        (Kind::Records, Data::Ptr(target))
    } else if held.is_local() {
        (Kind::NoData, Data::None)
    } else if zone.route(name) == Route::Local {
        (Kind::NxDomain, Data::None)
    } else {
        return None;
    };

    let (count, data_len) = match data {
        Data::None => (0, 0),
        Data::A(addrs) => (addrs.len(), addrs.len() * (RR_FIXED_LEN + 4)),
        Data::Ptr(target) => {
            // hickory would compress a target sharing the question's last label.
            let question_name = NameRef::new(&question[..name_end - wire::HEADER_LEN]);
            let (last, _) = question_name.last_labels::<1>();
            if target.labels().last() == Some(last[0]) {
                return None;
            }
            (1, RR_FIXED_LEN + target.wire_len())
        }
    };
    // Owners point at the question's name, which the root cannot be pointed at as (hickory
    // writes a root owner as itself).
    if count > MAX_RECORDS || (count > 0 && name.is_root()) {
        return None;
    }
    let len = wire::HEADER_LEN + question.len() + data_len + edns.map_or(0, |_| OPT_LEN);
    let limit = match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => usize::from(edns.map_or(PLAIN_UDP_PAYLOAD, |e| {
            e.payload.clamp(PLAIN_UDP_PAYLOAD, EDNS_PAYLOAD)
        })),
    };
    if len > limit {
        // The hickory path truncates, and counts it.
        return None;
    }

    let rcode = match kind {
        Kind::NxDomain => wire::RCODE_NXDOMAIN,
        Kind::Records | Kind::NoData => 0,
    };
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&header.id.to_be_bytes());
    // QR, opcode QUERY, AA, RD as asked; RA, CD as asked, the RCODE.
    out.push(0x80 | 0x04 | u8::from(header.rd));
    out.push(0x80 | if header.cd { 0x10 } else { 0 } | rcode);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(count as u16).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&u16::from(edns.is_some()).to_be_bytes());
    out.extend_from_slice(question);
    let record = |out: &mut Vec<u8>, rtype: u16, rdlength: usize| {
        out.extend_from_slice(&QNAME_POINTER);
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&wire::CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(rdlength as u16).to_be_bytes());
    };
    match data {
        Data::None => {}
        Data::A(addrs) => {
            for ip in addrs {
                record(&mut out, wire::TYPE_A, 4);
                out.extend_from_slice(&ip.octets());
            }
        }
        Data::Ptr(target) => {
            record(&mut out, wire::TYPE_PTR, target.wire_len());
            target.write(&mut out);
        }
    }
    if let Some(opt) = edns {
        // RFC 6891 6.1.2-6.1.3: root owner, our payload, extended RCODE 0 (NOERROR and NXDOMAIN
        // fit the header), version 0, DO echoed, no options.
        out.extend_from_slice(&[0]);
        out.extend_from_slice(&wire::TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&EDNS_PAYLOAD.to_be_bytes());
        out.extend_from_slice(&[0, 0, if opt.dnssec_ok { 0x80 } else { 0 }, 0]);
        out.extend_from_slice(&0u16.to_be_bytes());
    }
    debug_assert_eq!(out.len(), len);
    Some((kind, out))
}

/// An OPT RR that is the whole of `rr` (RFC 6891 6.1.2): root owner, version 0 (another is
/// BADVERS, 6.1.3, the hickory path's), RDLENGTH up to the end, options that fill the RDATA
/// exactly and none hickory would parse (ECS). The extended RCODE and the Z flags of a query
/// mean nothing and are ignored, as hickory's decoder does.
fn read_opt(rr: &[u8]) -> Option<ClientOpt> {
    let (fixed, rdata) = rr.split_first_chunk::<11>()?;
    let [
        owner,
        t0,
        t1,
        p0,
        p1,
        _rcode_high,
        version,
        flags,
        _,
        l0,
        l1,
    ] = *fixed;
    if owner != 0
        || u16::from_be_bytes([t0, t1]) != wire::TYPE_OPT
        || version != 0
        || usize::from(u16::from_be_bytes([l0, l1])) != rdata.len()
    {
        return None;
    }
    let mut options = rdata;
    while !options.is_empty() {
        let [c0, c1, n0, n1, rest @ ..] = options else {
            return None;
        };
        let len = usize::from(u16::from_be_bytes([*n0, *n1]));
        if u16::from_be_bytes([*c0, *c1]) == OPTION_ECS || len > rest.len() {
            return None;
        }
        options = &rest[len..];
    }
    Some(ClientOpt {
        payload: u16::from_be_bytes([p0, p1]).max(PLAIN_UDP_PAYLOAD),
        dnssec_ok: flags & 0x80 != 0,
    })
}
