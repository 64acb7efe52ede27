//! Issue 10's memory floor: one million concurrent packet-NAT flows, and what they cost in
//! resident memory. One guest endpoint talks to a million destinations (endpoint-independent
//! mapping shares its external port; each destination is its own connection, as address-and-
//! port-dependent filtering needs). Prints the resident memory before and after, and the time
//! per new flow.
//!
//! `cargo run --release -p switchyard-benches --example nat_million [FLOWS]`

use datapath::gateway::GatewayConfig;
use datapath::nat::NatConfig;
use datapath::uplink::UplinkConfig;
use datapath::wire::VnetHdr;
use datapath::wire::arp;
use datapath::wire::checksum::checksum;
use datapath::{Config, Engine, MacAddr, Verdict};
use std::net::Ipv4Addr;
use std::time::Instant;

const GW_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0xaa, 0, 1]);
const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x0a]);
const UPLINK_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0xee, 0, 2]);
const ROUTER_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0xee, 0, 1]);

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// A guest's UDP datagram from 192.168.122.10:5000 to `dst`:53 (no UDP checksum).
fn datagram(dst: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 8 + 4];
    f[0..6].copy_from_slice(&GW_MAC.0);
    f[6..12].copy_from_slice(&GUEST_MAC.0);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&32u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[192, 168, 122, 10]);
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f[34..36].copy_from_slice(&5000u16.to_be_bytes());
    f[36..38].copy_from_slice(&53u16.to_be_bytes());
    f[38..40].copy_from_slice(&12u16.to_be_bytes());
    f
}

fn main() {
    let flows: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let gateway = Ipv4Addr::new(192, 168, 122, 1);
    let external = Ipv4Addr::new(203, 0, 113, 2);
    let mut nat = NatConfig::new(gateway, 24, external);
    nat.max_flows = flows as usize + 1;
    nat.max_flows_per_guest = flows as usize + 1;
    let mut engine = Engine::new(&Config {
        gateway: Some(GatewayConfig {
            mac: GW_MAC,
            ip: gateway,
            prefix: 24,
        }),
        nat: Some((
            nat,
            UplinkConfig {
                mac: UPLINK_MAC,
                ip: external,
                prefix: 24,
                gateway: Some(Ipv4Addr::new(203, 0, 113, 1)),
                mtu: 1500,
            },
        )),
        ..Config::default()
    });
    let guest = engine.add_port("guest");
    let uplink = engine.add_uplink("up0").expect("NAT is configured");
    let now = Instant::now();
    let mut who_has = arp::request_frame(ROUTER_MAC, Ipv4Addr::new(203, 0, 113, 1), external);
    assert_eq!(
        engine.handle_frame(now, uplink, &VnetHdr::default(), &mut who_has),
        Verdict::Reply
    );
    let before = rss_kib();
    let started = Instant::now();
    let mut frame = datagram(Ipv4Addr::new(10, 0, 0, 0));
    for i in 0..flows {
        // Destinations 10.0.0.0 upward; the frame is rewritten in place by NAT, so it is
        // rebuilt from the template each time.
        let dst = Ipv4Addr::from(0x0a00_0000 + i);
        frame.copy_from_slice(&datagram(dst));
        let verdict = engine.handle_frame(now, guest, &VnetHdr::default(), &mut frame);
        assert_eq!(verdict, Verdict::Forward(uplink), "flow {i}");
    }
    let elapsed = started.elapsed();
    let after = rss_kib();
    let stats = engine.stats();
    println!(
        "{} concurrent NAT flows: resident memory {:.1} MiB -> {:.1} MiB (+{:.1} MiB, {:.0} bytes \
         per flow); {:.0} ns per new flow including the frame's construction",
        stats.nat_flows,
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after - before) as f64 / 1024.0,
        (after - before) as f64 * 1024.0 / f64::from(flows),
        elapsed.as_nanos() as f64 / f64::from(flows)
    );
}
