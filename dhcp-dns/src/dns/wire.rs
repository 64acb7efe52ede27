//! The part of a DNS message read by hand: the header and the question.
//!
//! Everything a drop, an error answer or the anti-spoofing match depends on is read here with
//! explicit bounds, before hickory sees the bytes: a message shorter than a header or with the
//! QR bit set is dropped without decoding it, an opcode other than QUERY or a question count
//! other than one is answered from the header alone, and an upstream response is matched on
//! (ID, server, question) without trusting a full decode of a message that may be spoofed.
//!
//! Question names are kept as [`QName`]: the wire form with ASCII letters lowercased. That is
//! the comparison RFC 1035 2.3.3 and RFC 4343 ask for, it is unambiguous for labels holding
//! dots or other bytes (which a dotted string is not), and a suffix test on label boundaries is
//! a byte comparison.

use std::fmt;
use std::net::Ipv4Addr;

use hickory_proto::rr::Name;

/// Length of the fixed header (RFC 1035 4.1.1).
pub(crate) const HEADER_LEN: usize = 12;
/// Longest name on the wire, length octets and the root included (RFC 1035 3.1).
const MAX_NAME_LEN: usize = 255;
/// Longest label (RFC 1035 2.3.4).
const MAX_LABEL_LEN: usize = 63;

pub(crate) const RCODE_FORMERR: u8 = 1;
pub(crate) const RCODE_SERVFAIL: u8 = 2;
pub(crate) const RCODE_NOTIMP: u8 = 4;
pub(crate) const RCODE_REFUSED: u8 = 5;

pub(crate) const OPCODE_QUERY: u8 = 0;

pub(crate) const CLASS_IN: u16 = 1;
pub(crate) const TYPE_A: u16 = 1;
pub(crate) const TYPE_PTR: u16 = 12;
pub(crate) const TYPE_TXT: u16 = 16;
pub(crate) const TYPE_SRV: u16 = 33;
pub(crate) const TYPE_OPT: u16 = 41;
pub(crate) const TYPE_IXFR: u16 = 251;
pub(crate) const TYPE_AXFR: u16 = 252;
pub(crate) const TYPE_MAILB: u16 = 253;
pub(crate) const TYPE_MAILA: u16 = 254;
pub(crate) const TYPE_ANY: u16 = 255;

/// The fixed header (RFC 1035 4.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub id: u16,
    pub qr: bool,
    pub opcode: u8,
    pub tc: bool,
    pub rd: bool,
    /// RFC 4035 3.2.2.
    pub cd: bool,
    pub rcode: u8,
    pub qdcount: u16,
}

impl Header {
    pub fn parse(msg: &[u8]) -> Option<Header> {
        let h = msg.get(..HEADER_LEN)?;
        Some(Header {
            id: u16::from_be_bytes([h[0], h[1]]),
            qr: h[2] & 0x80 != 0,
            opcode: (h[2] >> 3) & 0x0f,
            tc: h[2] & 0x02 != 0,
            rd: h[2] & 0x01 != 0,
            cd: h[3] & 0x10 != 0,
            rcode: h[3] & 0x0f,
            qdcount: u16::from_be_bytes([h[4], h[5]]),
        })
    }
}

/// A domain name in wire form, ASCII letters lowercased, ending with the root label.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct QName(Vec<u8>);

impl QName {
    pub fn root() -> QName {
        QName(vec![0])
    }

    /// Reads an uncompressed name at `at`; returns it and the offset after it. Compression
    /// pointers are refused: the question is the first name of a message, so a pointer there
    /// can only point into the header or forward (RFC 1035 4.1.4 allows only prior names).
    pub fn read(msg: &[u8], mut at: usize) -> Option<(QName, usize)> {
        let mut wire = Vec::with_capacity(32);
        loop {
            let len = usize::from(*msg.get(at)?);
            if len == 0 {
                wire.push(0);
                return (wire.len() <= MAX_NAME_LEN).then_some((QName(wire), at + 1));
            }
            // 0xc0 is a pointer; 0x40 and 0x80 are the extended label types of RFC 6891 5,
            // which nothing uses.
            if len > MAX_LABEL_LEN {
                return None;
            }
            let label = msg.get(at + 1..at + 1 + len)?;
            wire.push(len as u8);
            wire.extend(label.iter().map(u8::to_ascii_lowercase));
            if wire.len() >= MAX_NAME_LEN {
                return None;
            }
            at += 1 + len;
        }
    }

    /// A name from its labels, most specific first.
    pub fn from_labels<'a>(labels: impl IntoIterator<Item = &'a [u8]>) -> Option<QName> {
        let mut wire = Vec::with_capacity(32);
        for label in labels {
            if label.is_empty() || label.len() > MAX_LABEL_LEN {
                return None;
            }
            wire.push(label.len() as u8);
            wire.extend(label.iter().map(u8::to_ascii_lowercase));
        }
        wire.push(0);
        (wire.len() <= MAX_NAME_LEN).then_some(QName(wire))
    }

    /// A name from configuration text: dot-separated labels of printable ASCII without
    /// backslash escapes, an optional final dot. "" and "." are the root.
    pub fn parse(text: &str) -> Option<QName> {
        let text = text.strip_suffix('.').unwrap_or(text);
        if text.is_empty() {
            return Some(QName::root());
        }
        if !text.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') {
            return None;
        }
        QName::from_labels(text.split('.').map(str::as_bytes))
    }

    pub fn labels(&self) -> Labels<'_> {
        Labels {
            wire: &self.0,
            at: 0,
        }
    }

    pub fn label_count(&self) -> usize {
        self.labels().count()
    }

    pub fn is_root(&self) -> bool {
        self.0.len() == 1
    }

    /// The first (most specific) label.
    pub fn first_label(&self) -> Option<&[u8]> {
        self.labels().next()
    }

    /// `label` followed by this name.
    pub fn prepend(&self, label: &[u8]) -> Option<QName> {
        QName::from_labels(std::iter::once(label).chain(self.labels()))
    }

    /// Whether this name is `zone` or below it.
    pub fn is_in(&self, zone: &QName) -> bool {
        let mut at = 0;
        loop {
            if self.0.get(at..) == Some(&zone.0[..]) {
                return true;
            }
            match self.0.get(at) {
                Some(&len) if len != 0 => at += 1 + usize::from(len),
                _ => return false,
            }
        }
    }

    /// The address whose reverse-lookup name this is (`d.c.b.a.in-addr.arpa`).
    pub fn reverse_ip(&self) -> Option<Ipv4Addr> {
        let labels: Vec<&[u8]> = self.labels().collect();
        let [d, c, b, a, in_addr, arpa] = labels[..] else {
            return None;
        };
        if in_addr != b"in-addr" || arpa != b"arpa" {
            return None;
        }
        Some(Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?))
    }

    pub fn to_hickory(&self) -> Option<Name> {
        Name::from_labels(self.labels()).ok()
    }
}

/// A decimal octet as written in reverse names: no sign, no leading zero.
pub(crate) fn octet(label: &[u8]) -> Option<u8> {
    if label.is_empty() || label.len() > 3 || (label.len() > 1 && label[0] == b'0') {
        return None;
    }
    std::str::from_utf8(label).ok()?.parse().ok()
}

/// Presentation form (RFC 1035 5.1): dotted, with a final dot only for the root, bytes outside
/// letters, digits, '-' and '_' escaped as `\DDD`.
impl fmt::Display for QName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            return f.write_str(".");
        }
        for (i, label) in self.labels().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            for &b in label {
                if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                    write!(f, "{}", char::from(b))?;
                } else {
                    write!(f, "\\{b:03}")?;
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for QName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QName({self})")
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Labels<'a> {
    wire: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Labels<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(*self.wire.get(self.at)?);
        if len == 0 {
            return None;
        }
        let label = self.wire.get(self.at + 1..self.at + 1 + len)?;
        self.at += 1 + len;
        Some(label)
    }
}

/// The one question of a query, as compared for caching, coalescing and matching answers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Question {
    pub name: QName,
    pub qtype: u16,
    pub qclass: u16,
}

impl Question {
    /// Reads the first question; returns it and the offset after it.
    pub fn read(msg: &[u8]) -> Option<(Question, usize)> {
        let (name, at) = QName::read(msg, HEADER_LEN)?;
        let fixed = msg.get(at..at + 4)?;
        Some((
            Question {
                name,
                qtype: u16::from_be_bytes([fixed[0], fixed[1]]),
                qclass: u16::from_be_bytes([fixed[2], fixed[3]]),
            },
            at + 4,
        ))
    }
}

/// An answer built from the query's header alone, for messages hickory is not asked to decode:
/// ID, opcode, RD and CD copied, QR and RA set, and the question echoed if `question` (the raw
/// question section) is given.
pub(crate) fn header_reply(query: &Header, rcode: u8, question: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + question.map_or(0, <[u8]>::len));
    out.extend_from_slice(&query.id.to_be_bytes());
    out.push(0x80 | (query.opcode << 3) | u8::from(query.rd));
    out.push(0x80 | if query.cd { 0x10 } else { 0 } | (rcode & 0x0f));
    out.extend_from_slice(&u16::from(question.is_some()).to_be_bytes());
    out.extend_from_slice(&[0; 6]);
    if let Some(q) = question {
        out.extend_from_slice(q);
    }
    out
}
