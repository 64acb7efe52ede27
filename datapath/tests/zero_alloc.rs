//! DESIGN.md principle 2: once flows are established, forwarding a frame allocates nothing,
//! neither in the engine nor in the poll loop that reads, decides and writes it.
//!
//! Ports here are datagram socket pairs (one frame per message, like a tap), so the test runs
//! without privileges; the loop code is the same one that serves taps.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use datapath::io::{Datapath, PortCaps};
use datapath::wire::checksum::{accumulate, fold, pseudo_header_v4};
use datapath::wire::vnet::{self, VnetHdr, gso};
use datapath::{Config, Engine, MacAddr, Verdict};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

const A: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0xa]);
const B: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0xb]);
const C: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0xc]);
const SRC_IP: [u8; 4] = [192, 168, 122, 10];
const DST_IP: [u8; 4] = [192, 168, 122, 11];

/// An Ethernet/IPv4/TCP frame from `src` to `dst` carrying `payload` bytes, with the TCP
/// checksum field holding the pseudo-header sum as the kernel leaves it for NEEDS_CSUM.
fn tcp_frame(dst: MacAddr, src: MacAddr, payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; 54 + payload];
    f[0..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&SRC_IP);
    f[30..34].copy_from_slice(&DST_IP);
    f[46] = 5 << 4;
    f[47] = 0x10;
    let pseudo = pseudo_header_v4(SRC_IP, DST_IP, 6, (20 + payload) as u16);
    f[50..52].copy_from_slice(&fold(pseudo).to_be_bytes());
    f
}

fn with_vnet(hdr: VnetHdr, frame: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; vnet::LEN];
    hdr.emit(&mut buf);
    buf.extend_from_slice(frame);
    buf
}

struct Peer {
    sock: UnixDatagram,
}

impl Peer {
    fn attach(dp: &mut Datapath, name: &str, vnet_hdr: bool) -> Peer {
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        ours.set_nonblocking(true).unwrap();
        let file = File::from(OwnedFd::from(theirs));
        dp.add_fd_port(name.into(), file, PortCaps { vnet_hdr })
            .unwrap();
        Peer { sock: ours }
    }

    fn recv_all(&self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while let Ok(n) = self.sock.recv(&mut buf) {
            frames.push(buf[..n].to_vec());
        }
        frames
    }
}

#[test]
fn engine_forwards_learned_unicast_without_allocating() {
    let mut engine = Engine::new(&Config::default());
    let pa = engine.add_port("a");
    let pb = engine.add_port("b");
    let now = Instant::now();
    let mut ab = tcp_frame(B, A, 1400);
    let mut ba = tcp_frame(A, B, 0);
    let hdr = VnetHdr::default();
    engine.handle_frame(now, pa, &hdr, &mut ab);
    engine.handle_frame(now, pb, &hdr, &mut ba);
    let info = allocation_counter::measure(|| {
        for i in 0..10_000u64 {
            let t = now + Duration::from_micros(i);
            assert_eq!(
                engine.handle_frame(t, pa, &hdr, &mut ab),
                Verdict::Forward(pb)
            );
            assert_eq!(
                engine.handle_frame(t, pb, &hdr, &mut ba),
                Verdict::Forward(pa)
            );
        }
    });
    assert_eq!(info.count_total, 0, "{info:?}");
}

#[test]
fn poll_loop_forwards_floods_and_completes_offloads_without_allocating() {
    let mut dp = Datapath::new(Engine::new(&Config::default())).unwrap();
    let a = Peer::attach(&mut dp, "a", true);
    let b = Peer::attach(&mut dp, "b", true);
    let c = Peer::attach(&mut dp, "c", false);
    let plain = VnetHdr::default();

    // Learn all three MACs (each frame floods once), then drain.
    a.sock
        .send(&with_vnet(plain, &tcp_frame(MacAddr::BROADCAST, A, 0)))
        .unwrap();
    b.sock
        .send(&with_vnet(plain, &tcp_frame(MacAddr::BROADCAST, B, 0)))
        .unwrap();
    c.sock.send(&tcp_frame(MacAddr::BROADCAST, C, 0)).unwrap();
    for _ in 0..5 {
        dp.turn(Some(Duration::from_millis(5))).unwrap();
    }
    a.recv_all();
    b.recv_all();
    c.recv_all();

    let ab = with_vnet(plain, &tcp_frame(B, A, 1400));
    let flood = with_vnet(plain, &tcp_frame(MacAddr::BROADCAST, A, 100));
    let csum = VnetHdr {
        flags: vnet::F_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..Default::default()
    };
    let a_to_c_partial = with_vnet(csum, &tcp_frame(C, A, 1000));
    let tso = VnetHdr {
        flags: vnet::F_NEEDS_CSUM,
        gso_type: gso::TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
    };
    let a_to_c_tso = with_vnet(tso, &tcp_frame(C, A, 60_000));

    let rounds = 200u64;
    let mut allocations = 0;
    for _ in 0..rounds {
        for frame in [&ab, &flood, &a_to_c_partial, &a_to_c_tso] {
            a.sock.send(frame).unwrap();
        }
        allocations += allocation_counter::measure(|| {
            for _ in 0..4 {
                dp.turn(Some(Duration::ZERO)).unwrap();
            }
        })
        .count_total;
        let at_b = b.recv_all();
        let at_c = c.recv_all();
        assert_eq!(at_b.len(), 2, "unicast + flood reach b");
        assert_eq!(at_b[0], ab, "vnet to vnet: written exactly as read");
        // c has no vnet header: the flood arrives plain, the partial checksum completed, and
        // the 60 000-byte TSO frame cut into ceil(60000 / 1448) = 42 segments.
        assert_eq!(at_c.len(), 1 + 1 + 42);
        let partial = &at_c[1];
        let pseudo = pseudo_header_v4(SRC_IP, DST_IP, 6, (partial.len() - 34) as u16);
        assert_eq!(
            fold(accumulate(pseudo, &partial[34..])),
            0xffff,
            "checksum completed"
        );
        assert!(at_c[2..].iter().all(|s| s.len() <= 54 + 1448));
    }
    assert_eq!(
        allocations, 0,
        "allocations in {rounds} rounds of the poll loop"
    );
    let stats = dp.engine().stats();
    let c_counters = &stats.ports[2].1.counters;
    assert_eq!(c_counters.tx_packets, 2 + rounds * 44, "{c_counters:?}");
}
