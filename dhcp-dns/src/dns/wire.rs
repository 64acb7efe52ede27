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
//! a byte comparison. [`NameRef`] is the same form borrowed: the fast path reads a question's
//! name into a buffer on the stack ([`read_name`]) and looks it up in the zone through it, so
//! that answering a local name allocates nothing but the answer.

use std::borrow::Borrow;
use std::fmt;
use std::net::Ipv4Addr;

use hickory_proto::rr::Name;

/// Length of the fixed header (RFC 1035 4.1.1).
pub(crate) const HEADER_LEN: usize = 12;
/// Longest name on the wire, length octets and the root included (RFC 1035 3.1).
pub(crate) const MAX_NAME_LEN: usize = 255;
/// Longest label (RFC 1035 2.3.4).
const MAX_LABEL_LEN: usize = 63;

pub(crate) const RCODE_FORMERR: u8 = 1;
pub(crate) const RCODE_NXDOMAIN: u8 = 3;
pub(crate) const RCODE_SERVFAIL: u8 = 2;
pub(crate) const RCODE_NOTIMP: u8 = 4;
pub(crate) const RCODE_REFUSED: u8 = 5;

pub(crate) const OPCODE_QUERY: u8 = 0;

pub(crate) const CLASS_IN: u16 = 1;
pub(crate) const TYPE_A: u16 = 1;
pub(crate) const TYPE_PTR: u16 = 12;
pub(crate) const TYPE_TXT: u16 = 16;
pub(crate) const TYPE_AAAA: u16 = 28;
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
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
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
            ancount: u16::from_be_bytes([h[6], h[7]]),
            nscount: u16::from_be_bytes([h[8], h[9]]),
            arcount: u16::from_be_bytes([h[10], h[11]]),
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

    /// Reads an uncompressed name at `at` (see [`read_name`]); returns it and the offset after
    /// it.
    pub fn read(msg: &[u8], at: usize) -> Option<(QName, usize)> {
        let mut buf = [0; MAX_NAME_LEN];
        let (len, end) = read_name(msg, at, &mut buf)?;
        Some((QName(buf[..len].to_vec()), end))
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

    /// The same name, borrowed.
    pub fn as_name(&self) -> NameRef<'_> {
        NameRef(&self.0)
    }

    pub fn labels(&self) -> Labels<'_> {
        self.as_name().labels()
    }

    pub fn label_count(&self) -> usize {
        self.as_name().label_count()
    }

    pub fn is_root(&self) -> bool {
        self.as_name().is_root()
    }

    /// The first (most specific) label.
    pub fn first_label(&self) -> Option<&[u8]> {
        self.as_name().first_label()
    }

    /// `label` followed by this name.
    pub fn prepend(&self, label: &[u8]) -> Option<QName> {
        QName::from_labels(std::iter::once(label).chain(self.labels()))
    }

    pub fn to_hickory(&self) -> Option<Name> {
        Name::from_labels(self.labels()).ok()
    }
}

/// Maps keyed by [`QName`] are looked up with a [`NameRef`]'s bytes, without building a key:
/// the derived `Hash`, `Eq` and `Ord` of `QName` are those of its bytes.
impl Borrow<[u8]> for QName {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

/// Reads an uncompressed name at `at` into `buf`, ASCII letters lowercased; returns its length
/// in `buf` (the root label included) and the offset after it in `msg`. Compression pointers
/// are refused: the question is the first name of a message, so a pointer there can only point
/// into the header or forward (RFC 1035 4.1.4 allows only prior names). So are labels longer
/// than 63 octets (RFC 1035 2.3.4) and names longer than 255 (3.1), which is also where
/// hickory's decoder draws both lines.
pub(crate) fn read_name(
    msg: &[u8],
    mut at: usize,
    buf: &mut [u8; MAX_NAME_LEN],
) -> Option<(usize, usize)> {
    let mut len = 0;
    loop {
        let label_len = usize::from(*msg.get(at)?);
        if label_len == 0 {
            *buf.get_mut(len)? = 0;
            return Some((len + 1, at + 1));
        }
        // 0xc0 is a pointer; 0x40 and 0x80 are the extended label types of RFC 6891 5,
        // which nothing uses.
        if label_len > MAX_LABEL_LEN {
            return None;
        }
        let label = msg.get(at + 1..at + 1 + label_len)?;
        // The root label must still fit after this one.
        if len + 1 + label_len >= MAX_NAME_LEN {
            return None;
        }
        let out = &mut buf[len..len + 1 + label_len];
        out[0] = label_len as u8;
        for (o, b) in out[1..].iter_mut().zip(label) {
            *o = b.to_ascii_lowercase();
        }
        len += 1 + label_len;
        at += 1 + label_len;
    }
}

/// A name in wire form, borrowed: what a [`QName`] holds, or what [`read_name`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NameRef<'a>(&'a [u8]);

impl<'a> NameRef<'a> {
    /// `wire` must be a name in uncompressed wire form (labels, then the root label), as
    /// [`read_name`] writes it. Comparisons are of bytes: lowercase both sides first.
    pub fn new(wire: &'a [u8]) -> NameRef<'a> {
        NameRef(wire)
    }

    pub fn wire(self) -> &'a [u8] {
        self.0
    }

    pub fn labels(self) -> Labels<'a> {
        Labels {
            wire: self.0,
            at: 0,
        }
    }

    pub fn label_count(self) -> usize {
        self.labels().count()
    }

    pub fn is_root(self) -> bool {
        self.0.len() == 1
    }

    /// The first (most specific) label.
    pub fn first_label(self) -> Option<&'a [u8]> {
        self.labels().next()
    }

    /// The name without its first label (the root stays the root).
    pub fn parent(self) -> NameRef<'a> {
        match self.0.first() {
            Some(&len) if len != 0 => NameRef(self.0.get(1 + usize::from(len)..).unwrap_or(&[0])),
            _ => self,
        }
    }

    /// Whether this name is `zone` or below it.
    pub fn is_in(self, zone: NameRef<'_>) -> bool {
        let mut at = 0;
        loop {
            if self.0.get(at..) == Some(zone.0) {
                return true;
            }
            match self.0.get(at) {
                Some(&len) if len != 0 => at += 1 + usize::from(len),
                _ => return false,
            }
        }
    }

    /// The last `N` labels, the last one at `N - 1`, and how many labels the name has; when
    /// it has fewer than `N`, the first slots are empty.
    pub fn last_labels<const N: usize>(self) -> ([&'a [u8]; N], usize) {
        let mut tail: [&[u8]; N] = [&[]; N];
        let mut count = 0;
        for label in self.labels() {
            if N > 0 {
                tail.rotate_left(1);
                tail[N - 1] = label;
            }
            count += 1;
        }
        (tail, count)
    }

    /// The address whose reverse-lookup name this is (`d.c.b.a.in-addr.arpa`).
    pub fn reverse_ip(self) -> Option<Ipv4Addr> {
        let ([d, c, b, a, in_addr, arpa], 6) = self.last_labels::<6>() else {
            return None;
        };
        if in_addr != b"in-addr" || arpa != b"arpa" {
            return None;
        }
        Some(Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?))
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

impl<'a> Labels<'a> {
    /// No labels: the root's.
    pub fn empty() -> Labels<'a> {
        Labels { wire: &[], at: 0 }
    }
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
