//! Leases and the files that show them.
//!
//! The lease file keeps dnsmasq's format on purpose: users of libvirt's default network already
//! read `/var/lib/libvirt/dnsmasq/*.leases` by hand and with scripts, and a daemon that restarts
//! must be able to take over the leases dnsmasq handed out. Reading it is defensive (a file can
//! be truncated by a crash or edited by hand), so a bad line is skipped, never fatal.
//!
//! The table mirrors `virsh net-dhcp-leases default`, the command the users already know.

use std::fmt::{self, Write as _};
use std::net::Ipv4Addr;

/// One address handed to one client.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Lease {
    /// Unix seconds at which the lease ends; `None` is an infinite lease (written as 0).
    pub expiry: Option<u64>,
    /// The client's hardware address (chaddr).
    pub mac: [u8; 6],
    /// The leased address.
    pub ip: Ipv4Addr,
    /// The sanitised host name (one DNS label), from option 12 or the reservation.
    pub hostname: Option<String>,
    /// Option 61, when the client sent one.
    pub client_id: Option<Vec<u8>>,
}

impl Lease {
    /// A lease whose expiry is at or before `now` no longer holds its address.
    pub fn is_active(&self, now: u64) -> bool {
        self.expiry.is_none_or(|e| e > now)
    }
}

/// Formats a MAC address as dnsmasq and virsh do: lowercase, colon-separated.
pub fn format_mac(mac: &[u8; 6]) -> String {
    format_hex(mac)
}

fn format_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn parse_hex(text: &str) -> Option<Vec<u8>> {
    text.split(':')
        .map(|part| {
            if part.is_empty() || part.len() > 2 {
                return None;
            }
            u8::from_str_radix(part, 16).ok()
        })
        .collect()
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    parse_hex(text)?.try_into().ok()
}

/// Renders leases in dnsmasq's lease-file format, one line per lease:
/// `EXPIRY MAC IP HOSTNAME CLIENTID`, expiry 0 for an infinite lease, `*` for no name or id.
pub fn format_lease_file<'a>(leases: impl IntoIterator<Item = &'a Lease>) -> String {
    let mut out = String::new();
    for lease in leases {
        out.push_str(&format_lease_line(lease));
    }
    out
}

/// One line of [`format_lease_file`], with its newline.
pub fn format_lease_line(lease: &Lease) -> String {
    format!(
        "{} {} {} {} {}\n",
        lease.expiry.unwrap_or(0),
        format_mac(&lease.mac),
        lease.ip,
        lease.hostname.as_deref().unwrap_or("*"),
        lease
            .client_id
            .as_deref()
            .map_or_else(|| "*".to_owned(), format_hex),
    )
}

/// Reads a dnsmasq lease file. Lines that do not describe an IPv4 lease of an Ethernet client
/// (DHCPv6 `duid` lines, IPv6 leases, other hardware types, damage) are skipped.
pub fn parse_lease_file(text: &str) -> Vec<Lease> {
    text.lines().filter_map(parse_lease_line).collect()
}

fn parse_lease_line(line: &str) -> Option<Lease> {
    let mut fields = line.split_whitespace();
    let expiry: u64 = fields.next()?.parse().ok()?;
    let mac = parse_mac(fields.next()?)?;
    let ip: Ipv4Addr = fields.next()?.parse().ok()?;
    let hostname = match fields.next()? {
        "*" => None,
        name => Some(super::sanitize_hostname(name.as_bytes())?),
    };
    let client_id = match fields.next() {
        None | Some("*") => None,
        Some(hex) => Some(parse_hex(hex).filter(|id| id.len() <= 255)?),
    };
    if fields.next().is_some() {
        return None;
    }
    Some(Lease {
        expiry: (expiry != 0).then_some(expiry),
        mac,
        ip,
        hostname,
        client_id,
    })
}

/// One row of the `virsh net-dhcp-leases` table for one lease.
#[derive(Debug, Clone, Copy)]
pub struct LeaseRow<'a> {
    pub lease: &'a Lease,
    /// Prefix length shown after the address, as virsh does (`192.168.122.45/24`).
    pub prefix: u8,
}

/// Column titles of `virsh net-dhcp-leases`.
const TITLES: [&str; 6] = [
    "Expiry Time",
    "MAC address",
    "Protocol",
    "IP address",
    "Hostname",
    "Client ID or DUID",
];

/// Column widths used when a row is printed on its own.
const DEFAULT_WIDTHS: [usize; 6] = [19, 17, 8, 18, 10, 17];

impl LeaseRow<'_> {
    /// The six cells: expiry, MAC, protocol, address/prefix, host name, client id.
    pub fn cells(&self) -> [String; 6] {
        let lease = self.lease;
        [
            lease.expiry.map_or_else(|| "never".to_owned(), format_utc),
            format_mac(&lease.mac),
            "ipv4".to_owned(),
            format!("{}/{}", lease.ip, self.prefix),
            lease.hostname.clone().unwrap_or_else(|| "-".to_owned()),
            lease
                .client_id
                .as_deref()
                .map_or_else(|| "-".to_owned(), format_hex),
        ]
    }
}

fn write_row<S: AsRef<str>>(
    out: &mut impl fmt::Write,
    cells: &[S],
    widths: &[usize],
) -> fmt::Result {
    let mut line = String::new();
    for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
        line.push(' ');
        if i + 1 == cells.len() {
            line.push_str(cell.as_ref());
        } else {
            let _ = write!(line, "{:<width$}  ", cell.as_ref());
        }
    }
    out.write_str(line.trim_end())
}

impl fmt::Display for LeaseRow<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_row(f, &self.cells(), &DEFAULT_WIDTHS)
    }
}

/// Renders leases as `virsh net-dhcp-leases` does: a title line, a rule, one row per lease,
/// columns as wide as their widest cell.
pub fn format_lease_table<'a>(leases: impl IntoIterator<Item = &'a Lease>, prefix: u8) -> String {
    let rows: Vec<[String; 6]> = leases
        .into_iter()
        .map(|lease| LeaseRow { lease, prefix }.cells())
        .collect();
    let mut widths = TITLES.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_row(&mut out, &TITLES, &widths);
    out.push('\n');
    let total: usize = widths.iter().map(|w| w + 3).sum();
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for row in &rows {
        let _ = write_row(&mut out, row, &widths);
        out.push('\n');
    }
    out
}

/// Formats Unix seconds as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn format_utc(unix: u64) -> String {
    let days = unix / 86_400;
    let secs = unix % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day).
///
/// Counts in 400-year eras (146 097 days each) starting on 0000-03-01, so that the leap day is
/// the last day of each shifted year and months have a fixed day-of-year formula.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // 719 468 days from 0000-03-01 to 1970-01-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097; // day of era, 0..=146_096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era, 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year from March 1st, 0..=365
    let mp = (5 * doy + 2) / 153; // month from March, 0..=11
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(n: u8, expiry: Option<u64>, name: Option<&str>, id: Option<&[u8]>) -> Lease {
        Lease {
            expiry,
            mac: [0x52, 0x54, 0x00, 0xab, 0xcd, n],
            ip: Ipv4Addr::new(192, 168, 122, n),
            hostname: name.map(str::to_owned),
            client_id: id.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn lease_file_round_trip() {
        let leases = vec![
            lease(
                45,
                Some(1_700_000_000),
                Some("vm1"),
                Some(&[1, 0x52, 0x54, 0, 0xab, 0xcd, 45]),
            ),
            lease(46, None, None, None),
        ];
        let text = format_lease_file(&leases);
        assert_eq!(
            text,
            "1700000000 52:54:00:ab:cd:2d 192.168.122.45 vm1 01:52:54:00:ab:cd:2d\n\
             0 52:54:00:ab:cd:2e 192.168.122.46 * *\n"
        );
        assert_eq!(parse_lease_file(&text), leases);
    }

    #[test]
    fn lease_file_skips_bad_lines() {
        let text = "\
garbage
1700000000 52:54:00:ab:cd:2d 192.168.122.45 vm1 01:52:54:00:ab:cd:2d
duid 00:01:00:01:2c:aa:bb:cc:52:54:00:00:00:01
1700000000 1234 52:54:00:00:00:02 fd00::2 host6 00:01:02
1700000000 52:54:00:ab:cd:2e 192.168.122.300 x *
-5 52:54:00:ab:cd:2e 192.168.122.46 x *
1700000000 52:54:00:ab:cd 192.168.122.46 x *
1700000000 06-52:54:00:ab:cd:2e 192.168.122.46 x *
1700000000 52:54:00:ab:cd:2e 192.168.122.46 x 0g:11
1700000000 52:54:00:ab:cd:2e 192.168.122.46 x * extra

1700000000 52:54:00:ab:cd:2f 192.168.122.47 host-7
\u{0}\u{ff}
";
        let leases = parse_lease_file(text);
        assert_eq!(
            leases,
            vec![
                lease(
                    45,
                    Some(1_700_000_000),
                    Some("vm1"),
                    Some(&[1, 0x52, 0x54, 0, 0xab, 0xcd, 45])
                ),
                lease(47, Some(1_700_000_000), Some("host-7"), None),
            ]
        );
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(format_utc(4_107_542_399), "2100-02-28 23:59:59");
        assert_eq!(format_utc(4_107_542_400), "2100-03-01 00:00:00");
    }

    #[test]
    fn lease_table_like_virsh() {
        let leases = [
            lease(
                45,
                Some(1_700_000_000),
                Some("vm1"),
                Some(&[1, 0x52, 0x54, 0, 0xab, 0xcd, 45]),
            ),
            lease(46, None, None, None),
        ];
        let table = format_lease_table(&leases, 24);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[0],
            " Expiry Time           MAC address         Protocol   IP address          Hostname   Client ID or DUID"
        );
        assert!(lines[1].chars().all(|c| c == '-'));
        assert_eq!(
            lines[2],
            " 2023-11-14 22:13:20   52:54:00:ab:cd:2d   ipv4       192.168.122.45/24   vm1        01:52:54:00:ab:cd:2d"
        );
        assert_eq!(
            lines[3],
            " never                 52:54:00:ab:cd:2e   ipv4       192.168.122.46/24   -          -"
        );
        let row = LeaseRow {
            lease: &leases[1],
            prefix: 24,
        }
        .to_string();
        assert!(row.starts_with(" never "));
        assert!(row.ends_with(" -"));
    }
}
