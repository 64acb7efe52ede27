//! Packet traces: what the pipeline decided for one frame, told plainly.
//!
//! A trace is a read of the same code path, not a second implementation: the engine handles
//! the frame exactly as it always does, and the trace records the frame as it came in, every
//! counter the handling moved (a MAC learned, a NAT flow created or found and translated, an
//! ARP or echo answered, a DHCP message or DNS query served, an ICMP error sent, a drop and its
//! reason), the frame as it left when the pipeline rewrote it (NAT, TTL, MACs, checksums),
//! and the verdict. With tracing off the engine pays one branch per frame.

use crate::engine::{Stats, Verdict};
use crate::port::PortId;
use crate::wire::VnetHdr;
use crate::wire::vnet::gso;
use std::fmt::Write as _;

/// One traced frame.
#[derive(Debug, Clone)]
pub struct FrameTrace {
    pub ingress: PortId,
    /// The frame as it arrived.
    pub before: String,
    /// Counters the handling moved: (name, by how much).
    pub decisions: Vec<(String, u64)>,
    /// The frame as the pipeline left it, when it rewrote it.
    pub after: Option<String>,
    pub verdict: String,
    /// Frames the engine queued of its own (answers, ICMP errors, ARP requests, released
    /// packets).
    pub originated: usize,
}

impl FrameTrace {
    /// The trace as indented lines; `port_name` names ports.
    pub fn render(&self, port_name: impl Fn(PortId) -> String) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "in  port {} ({}): {}",
            self.ingress,
            port_name(self.ingress),
            self.before
        );
        for (name, by) in &self.decisions {
            let _ = writeln!(out, "    {name} +{by}");
        }
        if let Some(after) = &self.after {
            let _ = writeln!(out, "    rewritten: {after}");
        }
        if self.originated > 0 {
            let _ = writeln!(
                out,
                "    engine queued {} frame(s) of its own",
                self.originated
            );
        }
        let _ = writeln!(out, "    verdict: {}", self.verdict);
        out
    }
}

/// The verdict in words.
pub fn verdict_text(verdict: Verdict, port_name: impl Fn(PortId) -> String) -> String {
    match verdict {
        Verdict::Forward(p) => format!("forward to port {p} ({})", port_name(p)),
        Verdict::Flood => "flood to every other switch port".into(),
        Verdict::Reply => "answered: the frame goes back out of its ingress port".into(),
        Verdict::Drop(reason) => format!("drop ({})", reason.name()),
        Verdict::Consumed => "consumed by the engine (answered later or held)".into(),
    }
}

/// Every counter of a stats snapshot, flattened to `path = value`.
pub fn counters(stats: &Stats, port: PortId) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    if let Ok(value) = serde_json::to_value(&stats.engine) {
        flatten("", &value, &mut out);
    }
    if let Some((_, p)) = stats.ports.iter().find(|(id, _)| *id == port)
        && let Ok(value) = serde_json::to_value(&p.counters)
    {
        flatten("port", &value, &mut out);
    }
    out
}

/// Every number in `value` (a JSON object tree), as `path.to.it = n`, prefixed by `prefix`.
pub fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, u64)>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&path, v, out);
            }
        }
        serde_json::Value::Number(n) => {
            if let Some(n) = n.as_u64() {
                out.push((prefix.to_string(), n));
            }
        }
        _ => {}
    }
}

/// The counters that grew from `before` to `after` (rx counts of the ingress left out: every
/// frame moves them).
pub fn moved(before: &[(String, u64)], after: &[(String, u64)]) -> Vec<(String, u64)> {
    after
        .iter()
        .zip(before)
        .filter(|((name, a), (_, b))| a > b && !name.starts_with("port.rx_"))
        .map(|((name, a), (_, b))| (name.clone(), a - b))
        .collect()
}

fn mac(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ip4(b: &[u8]) -> String {
    format!("{}.{}.{}.{}", b[0], b[1], b[2], b[3])
}

/// One line describing a frame: Ethernet addresses, then ARP, or IPv4 with TTL, checksum and
/// the transport header (ports, TCP flags, ICMP type, DHCP and DNS recognised).
pub fn describe(frame: &[u8], vnet: &VnetHdr) -> String {
    let mut out = String::new();
    if frame.len() < 14 {
        return format!("runt frame of {} bytes", frame.len());
    }
    let _ = write!(out, "{} > {}", mac(&frame[6..12]), mac(&frame[0..6]));
    let mut l3 = 14;
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype == 0x8100 && frame.len() >= 18 {
        let _ = write!(
            out,
            " vlan {}",
            u16::from_be_bytes([frame[14], frame[15]]) & 0x0fff
        );
        ethertype = u16::from_be_bytes([frame[16], frame[17]]);
        l3 = 18;
    }
    let p = &frame[l3..];
    match ethertype {
        0x0806 if p.len() >= 28 => {
            let op = u16::from_be_bytes([p[6], p[7]]);
            match op {
                1 => {
                    let _ = write!(
                        out,
                        ", ARP who-has {} tell {}",
                        ip4(&p[24..28]),
                        ip4(&p[14..18])
                    );
                }
                2 => {
                    let _ = write!(out, ", ARP {} is-at {}", ip4(&p[14..18]), mac(&p[8..14]));
                }
                _ => {
                    let _ = write!(out, ", ARP op {op}");
                }
            }
        }
        0x0800 if p.len() >= 20 => describe_ipv4(&mut out, p),
        0x86dd => out.push_str(", IPv6"),
        other => {
            let _ = write!(out, ", ethertype 0x{other:04x}");
        }
    }
    if vnet.is_gso() {
        let kind = match vnet.gso_type & !gso::ECN {
            gso::TCPV4 => "TCPv4",
            gso::TCPV6 => "TCPv6",
            gso::UDP => "UFO",
            gso::UDP_L4 => "UDP",
            _ => "unknown",
        };
        let _ = write!(
            out,
            " [GSO {kind} (type {}), segments of {}]",
            vnet.gso_type, vnet.gso_size
        );
    } else if vnet.needs_csum() {
        out.push_str(" [partial checksum]");
    }
    let _ = write!(out, ", {} bytes", frame.len());
    out
}

fn describe_ipv4(out: &mut String, p: &[u8]) {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let (proto, ttl) = (p[9], p[8]);
    let offset = u16::from_be_bytes([p[6], p[7]]);
    let (src, dst) = (ip4(&p[12..16]), ip4(&p[16..20]));
    let l4 = p.get(ihl..).unwrap_or(&[]);
    let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    match proto {
        6 if l4.len() >= 20 => {
            let flags = l4[13];
            let names: String = [
                (0x02, 'S'),
                (0x10, '.'),
                (0x01, 'F'),
                (0x04, 'R'),
                (0x08, 'P'),
            ]
            .iter()
            .filter(|(bit, _)| flags & bit != 0)
            .map(|(_, c)| *c)
            .collect();
            let _ = write!(
                out,
                ", IPv4 TCP {src}:{} > {dst}:{} [{names}] tcp-csum 0x{:04x}",
                port(0),
                port(2),
                port(16)
            );
        }
        17 if l4.len() >= 8 => {
            let (sport, dport) = (port(0), port(2));
            let what = match (sport, dport) {
                (67 | 68, 67 | 68) => dhcp_type(&l4[8..]),
                (53, _) | (_, 53) => " DNS".to_string(),
                _ => String::new(),
            };
            let _ = write!(
                out,
                ", IPv4 UDP {src}:{sport} > {dst}:{dport}{what} udp-csum 0x{:04x}",
                port(6)
            );
        }
        1 if l4.len() >= 4 => {
            let kind = match l4[0] {
                0 => "echo reply".to_string(),
                3 => format!("destination unreachable (code {})", l4[1]),
                8 => "echo request".to_string(),
                11 => "time exceeded".to_string(),
                t => format!("type {t}"),
            };
            let id = if l4.len() >= 8 && (l4[0] == 0 || l4[0] == 8) {
                format!(" id {}", port(4))
            } else {
                String::new()
            };
            let _ = write!(out, ", IPv4 ICMP {src} > {dst} {kind}{id}");
        }
        other => {
            let _ = write!(out, ", IPv4 proto {other} {src} > {dst}");
        }
    }
    let _ = write!(
        out,
        " ttl {ttl} ip-csum 0x{:04x}",
        u16::from_be_bytes([p[10], p[11]])
    );
    if offset & 0x3fff != 0 {
        let _ = write!(out, " fragment offset {}", (offset & 0x1fff) * 8);
    }
}

/// The DHCP message type (option 53) of a BOOTP payload, as a word.
fn dhcp_type(bootp: &[u8]) -> String {
    let mut i = 240;
    if bootp.get(236..240) != Some(&[99, 130, 83, 99][..]) {
        return " BOOTP".into();
    }
    while let (Some(&code), Some(&len)) = (bootp.get(i), bootp.get(i + 1)) {
        if code == 53 && len == 1 {
            let name = match bootp.get(i + 2) {
                Some(1) => "DISCOVER",
                Some(2) => "OFFER",
                Some(3) => "REQUEST",
                Some(4) => "DECLINE",
                Some(5) => "ACK",
                Some(6) => "NAK",
                Some(7) => "RELEASE",
                Some(8) => "INFORM",
                _ => "?",
            };
            return format!(" DHCP {name}");
        }
        if code == 0 {
            i += 1;
            continue;
        }
        if code == 255 {
            break;
        }
        i += 2 + usize::from(len);
    }
    " DHCP".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_arp_and_never_panics_on_short_frames() {
        let gw = crate::wire::MacAddr([0x52, 0x54, 0, 0, 0, 1]);
        let arp = crate::wire::arp::request_frame(
            gw,
            std::net::Ipv4Addr::new(192, 168, 122, 10),
            std::net::Ipv4Addr::new(192, 168, 122, 1),
        );
        let text = describe(&arp, &VnetHdr::default());
        assert!(
            text.contains("ARP who-has 192.168.122.1 tell 192.168.122.10"),
            "{text}"
        );
        for n in 0..arp.len() {
            let _ = describe(&arp[..n], &VnetHdr::default());
        }
        let mut ip = vec![0u8; 14 + 20];
        ip[12] = 8;
        ip[14] = 0x4f; // an IHL longer than the packet
        ip[23] = 6;
        let _ = describe(&ip, &VnetHdr::default());
    }

    #[test]
    fn names_the_gso_type() {
        let mut frame = vec![0u8; 14 + 28];
        frame[12] = 8;
        let uso = VnetHdr {
            gso_type: gso::UDP_L4,
            gso_size: 1200,
            ..Default::default()
        };
        let text = describe(&frame, &uso);
        assert!(
            text.contains("[GSO UDP (type 5), segments of 1200]"),
            "{text}"
        );
    }
}

/// Which frames `switchyard trace --filter` follows: words that must all hold, tcpdump-like:
/// `arp`, `ip`, `icmp`, `tcp`, `udp`, `ipv6`, `host A.B.C.D` (either address), `port N`
/// (either TCP/UDP port), `ether HOST` (either MAC); `and` may join them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    terms: Vec<Term>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    EtherType(u16),
    Protocol(u8),
    Host([u8; 4]),
    Port(u16),
    Ether([u8; 6]),
}

impl Filter {
    pub fn parse(expr: &str) -> Result<Filter, String> {
        let mut terms = Vec::new();
        let mut words = expr.split_whitespace();
        while let Some(word) = words.next() {
            let mut value = |what: &str| {
                words
                    .next()
                    .ok_or_else(|| format!("{what} needs a value"))
                    .map(str::to_string)
            };
            terms.push(match word {
                "and" | "&&" => continue,
                "arp" => Term::EtherType(0x0806),
                "ip" => Term::EtherType(0x0800),
                "ipv6" | "ip6" => Term::EtherType(0x86dd),
                "icmp" => Term::Protocol(1),
                "tcp" => Term::Protocol(6),
                "udp" => Term::Protocol(17),
                "host" => {
                    let v = value("host")?;
                    let ip: std::net::Ipv4Addr = v
                        .parse()
                        .map_err(|_| format!("host {v}: an IPv4 address"))?;
                    Term::Host(ip.octets())
                }
                "port" => {
                    let v = value("port")?;
                    Term::Port(v.parse().map_err(|_| format!("port {v}: a number"))?)
                }
                "ether" => {
                    let v = value("ether")?;
                    let mac: crate::wire::MacAddr =
                        v.parse().map_err(|_| format!("ether {v}: a MAC address"))?;
                    Term::Ether(mac.0)
                }
                other => return Err(format!("unknown filter word {other:?}")),
            });
        }
        Ok(Filter { terms })
    }

    /// Whether `frame` (Ethernet, untagged or one 802.1Q tag) satisfies every term.
    pub fn matches(&self, frame: &[u8]) -> bool {
        if self.terms.is_empty() {
            return true;
        }
        let Some(header) = frame.get(..14) else {
            return false;
        };
        let (mut ethertype, mut l3) = (u16::from_be_bytes([header[12], header[13]]), 14);
        if ethertype == 0x8100 && frame.len() >= 18 {
            ethertype = u16::from_be_bytes([frame[16], frame[17]]);
            l3 = 18;
        }
        let ip = (ethertype == 0x0800)
            .then(|| frame.get(l3..))
            .flatten()
            .filter(|p| p.len() >= 20);
        let ports = ip.and_then(|p| {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            matches!(p[9], 6 | 17)
                .then(|| p.get(ihl..ihl + 4))
                .flatten()
                .map(|l4| {
                    (
                        u16::from_be_bytes([l4[0], l4[1]]),
                        u16::from_be_bytes([l4[2], l4[3]]),
                    )
                })
        });
        self.terms.iter().all(|term| match term {
            Term::EtherType(t) => ethertype == *t,
            Term::Protocol(proto) => ip.is_some_and(|p| p[9] == *proto),
            Term::Host(a) => ip.is_some_and(|p| p[12..16] == a[..] || p[16..20] == a[..]),
            Term::Port(n) => ports.is_some_and(|(s, d)| s == *n || d == *n),
            Term::Ether(m) => header[0..6] == m[..] || header[6..12] == m[..],
        })
    }
}

#[cfg(test)]
mod filter_tests {
    use super::*;

    #[test]
    fn filters_match_like_tcpdump_words() {
        let gw = crate::wire::MacAddr([0x52, 0x54, 0, 0, 0, 1]);
        let arp = crate::wire::arp::request_frame(
            gw,
            std::net::Ipv4Addr::new(192, 168, 122, 10),
            std::net::Ipv4Addr::new(192, 168, 122, 1),
        );
        assert!(Filter::parse("arp").unwrap().matches(&arp));
        assert!(!Filter::parse("ip").unwrap().matches(&arp));
        assert!(
            Filter::parse("ether 52:54:00:00:00:01")
                .unwrap()
                .matches(&arp)
        );
        assert!(!Filter::parse("tcp and port 80").unwrap().matches(&arp));
        let mut syn = vec![0u8; 14 + 20 + 20];
        syn[12..14].copy_from_slice(&[8, 0]);
        syn[14] = 0x45;
        syn[23] = 6;
        syn[26..30].copy_from_slice(&[192, 168, 122, 10]);
        syn[30..34].copy_from_slice(&[203, 0, 113, 1]);
        syn[36..38].copy_from_slice(&80u16.to_be_bytes());
        let f = Filter::parse("tcp and host 203.0.113.1 and port 80").unwrap();
        assert!(f.matches(&syn));
        assert!(!Filter::parse("udp").unwrap().matches(&syn));
        assert!(!Filter::parse("host 10.0.0.1").unwrap().matches(&syn));
        assert!(Filter::parse("port").is_err() && Filter::parse("tcp or udp").is_err());
        for n in 0..syn.len() {
            let _ = f.matches(&syn[..n]);
        }
    }
}
