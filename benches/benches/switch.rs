//! The pure switch pipeline: how many frames per second `Engine::handle_frame` decides.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use datapath::gateway::GatewayConfig;
use datapath::wire::VnetHdr;
use datapath::{Config, Engine, MacAddr, PortId};
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use switchyard_benches::bench_frames;

fn frame(dst: MacAddr, src: MacAddr) -> [u8; 64] {
    let mut f = [0u8; 64];
    f[0..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f
}

fn mac(i: u32) -> MacAddr {
    let b = i.to_be_bytes();
    MacAddr([0x52, 0x54, b[0], b[1], b[2], b[3]])
}

fn engine_with(ports: usize, learned: u32) -> (Engine, Vec<PortId>, Instant) {
    // As `switchyard run` builds it for libvirt's default network: with the gateway.
    let mut e = Engine::new(&Config {
        gateway: Some(GatewayConfig {
            mac: GatewayConfig::mac_for_network("default"),
            ip: Ipv4Addr::new(192, 168, 122, 1),
            prefix: 24,
        }),
        ..Config::default()
    });
    let ids: Vec<PortId> = (0..ports).map(|i| e.add_port(format!("p{i}"))).collect();
    let now = Instant::now();
    for i in 0..learned {
        let port = ids[i as usize % ports];
        let mut f = frame(MacAddr::BROADCAST, mac(i));
        e.handle_frame(now, port, &VnetHdr::default(), &mut f);
    }
    (e, ids, now)
}

fn switch(c: &mut Criterion) {
    let mut group = c.benchmark_group("switch");
    group.throughput(Throughput::Elements(1));
    let hdr = VnetHdr::default();

    let (mut e, ports, now) = engine_with(2, 2);
    let mut f = frame(mac(1), mac(0));
    bench_frames(&mut group, "learned_unicast", || {
        black_box(e.handle_frame(now, ports[0], &hdr, black_box(&mut f)))
    });

    let (mut e, ports, now) = engine_with(8, 8000);
    let mut f = frame(mac(7001), mac(4000));
    bench_frames(&mut group, "learned_unicast_8000_macs", || {
        black_box(e.handle_frame(now, ports[0], &hdr, black_box(&mut f)))
    });

    let (mut e, ports, now) = engine_with(2, 2);
    let mut f = frame(MacAddr::BROADCAST, mac(0));
    bench_frames(&mut group, "broadcast_flood", || {
        black_box(e.handle_frame(now, ports[0], &hdr, black_box(&mut f)))
    });

    let (mut e, ports, now) = engine_with(2, 0);
    let mut i = 0u32;
    bench_frames(&mut group, "broadcast_from_4096_rotating_macs", || {
        i = i.wrapping_add(1);
        let mut f = frame(MacAddr::BROADCAST, mac(i % 4096));
        let t = now + Duration::from_nanos(i as u64);
        black_box(e.handle_frame(t, ports[0], &hdr, &mut f))
    });
    group.finish();
}

criterion_group!(benches, switch);
criterion_main!(benches);
