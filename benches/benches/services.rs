//! The gateway's services through the whole pipeline, frames in and frames out, as
//! `Engine::handle_frame` and `poll_transmit` serve them: a full DHCP exchange (DISCOVER, the
//! ARP probe of the address, OFFER once the probe's wait is over in virtual time, REQUEST,
//! ACK, then RELEASE so the pool never runs dry), and a DNS query for a local name answered
//! from the gateway, plain (as dnsperf asks) and with an EDNS0 OPT (as dig and glibc with
//! `edns0` ask). The DNS queries are also timed against `DnsServer` alone, without the
//! frames around them, whose heap allocations per query are the reply buffer only.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use datapath::dhcp::{DhcpService, PROBE_WAIT};
use datapath::dns::DnsService;
use datapath::gateway::GatewayConfig;
use datapath::wire::VnetHdr;
use datapath::wire::checksum::checksum;
use datapath::{Config, Engine, MacAddr, PortId};
use dhcp_dns::dhcp::{DhcpConfig, DhcpServer};
use dhcp_dns::dns::{Client, DnsConfig, DnsServer, Transport};
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Instant;
use switchyard_benches::bench_frames;

const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 1);
const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x0a]);

fn dns_config() -> DnsConfig {
    let mut dns = DnsConfig::new();
    dns.domain = Some("lab".into());
    dns.hosts = vec![(Ipv4Addr::new(192, 168, 122, 7), vec!["printer".into()])];
    dns
}

/// "printer.lab A", RD set as a stub resolver sends it; with an OPT (payload 1232, version 0)
/// when `edns`.
fn dns_query(edns: bool) -> Vec<u8> {
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)];
    query.extend_from_slice(b"\x07printer\x03lab\x00\x00\x01\x00\x01");
    if edns {
        query.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    }
    query
}

fn network() -> (Engine, PortId, MacAddr) {
    let gw_mac = GatewayConfig::mac_for_network("default");
    let mut engine = Engine::new(&Config {
        gateway: Some(GatewayConfig {
            mac: gw_mac,
            ip: GW,
            prefix: 24,
        }),
        ..Config::default()
    });
    let now = Instant::now();
    let dhcp = DhcpConfig::new(
        GW,
        24,
        (
            Ipv4Addr::new(192, 168, 122, 2),
            Ipv4Addr::new(192, 168, 122, 254),
        ),
    );
    let server = DhcpServer::new(dhcp, Vec::new(), 1_800_000_000);
    // Not durable: the lease file's fsync is the I/O edge's cost, measured end to end.
    engine.enable_dhcp(DhcpService::new(
        server,
        gw_mac,
        false,
        (now, 1_800_000_000),
    ));
    engine.enable_dns(DnsService::new(DnsServer::new(dns_config()), gw_mac, GW));
    let port = engine.add_port("guest");
    (engine, port, gw_mac)
}

/// An Ethernet/IPv4/UDP frame, header checksum filled in, UDP checksum 0 (RFC 768: none).
fn udp_frame(
    (dst_mac, src_mac): (MacAddr, MacAddr),
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let mut f = vec![0u8; 42];
    f[0..6].copy_from_slice(&dst_mac.0);
    f[6..12].copy_from_slice(&src_mac.0);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((28 + payload.len()) as u16).to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&src.octets());
    f[30..34].copy_from_slice(&dst.octets());
    let c = checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[36..38].copy_from_slice(&dport.to_be_bytes());
    f[38..40].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A DHCP message of `kind` (RFC 2132 option 53) from the guest, with `options` after it.
fn dhcp(kind: u8, ciaddr: Ipv4Addr, options: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; 236];
    m[0] = 1;
    m[1] = 1;
    m[2] = 6;
    m[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    m[12..16].copy_from_slice(&ciaddr.octets());
    m[28..34].copy_from_slice(&GUEST_MAC.0);
    m.extend_from_slice(&[99, 130, 83, 99, 53, 1, kind]);
    m.extend_from_slice(options);
    m.push(255);
    m
}

fn send(engine: &mut Engine, port: PortId, now: Instant, frame: &[u8]) -> Option<Vec<u8>> {
    let mut buf = frame.to_vec();
    let _ = engine.handle_frame(now, port, &VnetHdr::default(), &mut buf);
    let mut reply = None;
    while let Some(out) = engine.poll_transmit() {
        reply = Some(out.frame);
    }
    reply
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("services");
    group.throughput(Throughput::Elements(1));

    let (mut engine, port, gw_mac) = network();
    let broadcast = (MacAddr::BROADCAST, GUEST_MAC);
    let discover = udp_frame(
        broadcast,
        (Ipv4Addr::UNSPECIFIED, 68),
        (Ipv4Addr::BROADCAST, 67),
        &dhcp(1, Ipv4Addr::UNSPECIFIED, &[]),
    );
    group.bench_function("dhcp_dora_and_release", |b| {
        b.iter(|| {
            let now = Instant::now();
            // The address was released: it is probed again before it is offered.
            let probe = send(&mut engine, port, now, &discover).expect("ARP probe");
            assert_eq!(&probe[12..14], &[0x08, 0x06]);
            let now = now + PROBE_WAIT;
            engine.handle_timeout(now);
            let offer = engine.poll_transmit().expect("OFFER").frame;
            let yiaddr: [u8; 4] = offer[14 + 28 + 16..14 + 28 + 20]
                .try_into()
                .expect("yiaddr is four bytes");
            let mut options = vec![50, 4];
            options.extend_from_slice(&yiaddr);
            options.extend_from_slice(&[54, 4]);
            options.extend_from_slice(&GW.octets());
            let request = udp_frame(
                broadcast,
                (Ipv4Addr::UNSPECIFIED, 68),
                (Ipv4Addr::BROADCAST, 67),
                &dhcp(3, Ipv4Addr::UNSPECIFIED, &options),
            );
            let ack = send(&mut engine, port, now, &request).expect("ACK");
            let ip = Ipv4Addr::from(yiaddr);
            let release = udp_frame(
                (gw_mac, GUEST_MAC),
                (ip, 68),
                (GW, 67),
                &dhcp(7, ip, &[54, 4, 192, 168, 122, 1]),
            );
            let _ = send(&mut engine, port, now, &release);
            black_box(ack)
        })
    });

    for (name, edns) in [("dns_local_answer", false), ("dns_local_answer_edns", true)] {
        let (mut engine, port, gw_mac) = network();
        let frame = udp_frame(
            (gw_mac, GUEST_MAC),
            (Ipv4Addr::new(192, 168, 122, 10), 40000),
            (GW, 53),
            &dns_query(edns),
        );
        bench_frames(&mut group, name, || {
            black_box(send(&mut engine, port, Instant::now(), &frame).expect("answer"))
        });
    }

    for (name, edns) in [
        ("dns_server_local_answer", false),
        ("dns_server_local_answer_edns", true),
    ] {
        let mut server = DnsServer::new(dns_config());
        let client = Client {
            addr: (Ipv4Addr::new(192, 168, 122, 10), 40000).into(),
            token: 0,
            transport: Transport::Udp,
        };
        let query = dns_query(edns);
        bench_frames(&mut group, name, || {
            server
                .handle_query(Instant::now(), client, black_box(&query))
                .expect("served");
            black_box(server.poll_output().expect("answer"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
