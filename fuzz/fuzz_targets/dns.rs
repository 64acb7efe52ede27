//! The DNS forwarder against any queries from guests and any answers from its upstream, with
//! time moving: it never panics, what it sends a client is a DNS message with the client's
//! ID, and what it keeps in flight stays bounded.
#![no_main]

use dhcp_dns::dns::{Client, DnsConfig, DnsServer, MAX_IN_FLIGHT, Output, Transport};
use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let upstream: SocketAddr = (Ipv4Addr::new(203, 0, 113, 1), 53).into();
    let mut config = DnsConfig::new();
    config.domain = Some("lab".into());
    config.network = Some((Ipv4Addr::new(192, 168, 122, 1), 24));
    config.upstreams = vec![upstream];
    config.hosts = vec![(Ipv4Addr::new(192, 168, 122, 7), vec!["printer".into()])];
    let mut server = DnsServer::with_seed(config, 7);
    server.add_name(Ipv4Addr::new(192, 168, 122, 10), "guest1");
    let start = Instant::now();
    let mut now = start;
    // Each message: [kind: bit 0 = from upstream, bit 1 = TCP][time step][length][bytes...]
    let mut rest = data;
    while let [kind, step, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (message, next) = tail.split_at(len);
        rest = next;
        now += Duration::from_millis(u64::from(*step) * 20);
        if kind & 1 == 1 {
            server.handle_upstream(now, upstream, message);
        } else {
            let client = Client {
                addr: (Ipv4Addr::new(192, 168, 122, 10), 40000 + u16::from(*kind)).into(),
                token: u64::from(*kind),
                transport: if kind & 2 == 2 {
                    Transport::Tcp
                } else {
                    Transport::Udp
                },
            };
            let _ = server.handle_query(now, client, message);
        }
        if server.poll_timeout().is_some_and(|t| t <= now) {
            server.handle_timeout(now);
        }
        while let Some(output) = server.poll_output() {
            if let Output::ToClient(_, answer) = output {
                assert!(answer.len() >= 12, "an answer shorter than a DNS header");
                assert!(answer[2] & 0x80 != 0, "an answer without QR set");
            }
        }
        assert!(server.in_flight() <= MAX_IN_FLIGHT);
    }
});
