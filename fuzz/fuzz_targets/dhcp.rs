//! The DHCP server against any sequence of messages from any client, with time moving:
//! it never panics, every lease lies in the range (or is the reservation's address), and no
//! address is leased twice.
#![no_main]

use dhcp_dns::dhcp::{DhcpConfig, DhcpServer, HostReservation};
use libfuzzer_sys::fuzz_target;
use std::net::Ipv4Addr;

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 122, n)
}

fuzz_target!(|data: &[u8]| {
    let mut config = DhcpConfig::new(ip(1), 24, (ip(10), ip(13)));
    config.hosts.push(HostReservation {
        mac: [0x52, 0x54, 0, 0, 0, 9],
        name: Some("fixed".into()),
        ip: Some(ip(50)),
    });
    config.leases_per_mac = 2;
    let mut server = DhcpServer::new(config, Vec::new(), 1_800_000_000);
    let mut now = 1_800_000_000u64;
    // Each message: [time step][client (low 2 bits of the MAC)][length][payload...]
    let mut rest = data;
    while let [step, client, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (payload, next) = tail.split_at(len);
        rest = next;
        now += u64::from(*step) * 30;
        let mac = [0x52, 0x54, 0, 0, 0, client & 0x0b];
        let _ = server.handle_message(now, mac, Ipv4Addr::UNSPECIFIED, payload);
        server.handle_timeout(now);
        while server.poll_event().is_some() {}
        let mut seen = Vec::new();
        for lease in server.leases() {
            let n = lease.ip.octets()[3];
            assert!(
                (10..=13).contains(&n) || n == 50,
                "lease outside the range: {lease:?}"
            );
            assert!(!seen.contains(&lease.ip), "address leased twice: {lease:?}");
            seen.push(lease.ip);
        }
        for lease in server.leases() {
            let same_mac = server.leases().filter(|l| l.mac == lease.mac).count();
            assert!(same_mac <= 2, "leases-per-mac exceeded: {lease:?}");
        }
    }
});
