//! NAT's fast path (what workers run, `nat::fast`) against any frame, either way: it never
//! panics, a frame it does not translate is left untouched, and a frame it does translate
//! comes out byte for byte as the engine's NAT makes it. One TCP connection (guest
//! 192.168.122.10:40000 to 203.0.113.1:80) and one UDP flow (:5353 to :53) are established
//! through the engine's NAT and published first. Input: [flags][frame]; flags bit 3 picks the
//! direction (set: from the uplink), bits 0-1 the GSO type, bit 2 a partial checksum.
#![no_main]

use datapath::nat::fast::NatFastPath;
use datapath::nat::packet::{self, TCP_ACK, TCP_SYN};
use datapath::nat::{Nat, NatConfig};
use datapath::port::PortId;
use datapath::wire::checksum;
use datapath::wire::vnet::gso;
use datapath::wire::{MacAddr, VnetHdr};
use libfuzzer_sys::fuzz_target;
use std::net::Ipv4Addr;
use std::time::Instant;

const GUEST: [u8; 4] = [192, 168, 122, 10];
const REMOTE: [u8; 4] = [203, 0, 113, 1];
const EXT: [u8; 4] = [203, 0, 113, 2];
const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x01]);
const GATEWAY_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
const UPLINK_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xdd]);
const NEXT_HOP: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0xfe]);

fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], mut l4: Vec<u8>, check_at: usize) -> Vec<u8> {
    let sum = checksum::pseudo_header_v4(src, dst, proto, l4.len() as u16);
    let c = !checksum::fold(checksum::accumulate(sum, &l4));
    l4[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    let total = (20 + l4.len()) as u16;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    let c = checksum::checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&l4);
    p
}

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let mut l4 = sport.to_be_bytes().to_vec();
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    ipv4(6, src, dst, l4, 16)
}

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut l4 = sport.to_be_bytes().to_vec();
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&[0, 9, 0, 0, b'q']);
    ipv4(17, src, dst, l4, 6)
}

/// The engine's way out and back for one packet; the external port it was given.
fn out(nat: &mut Nat, t: Instant, ip: &[u8]) -> u16 {
    let mut p = ip.to_vec();
    let o = nat.handle_outbound(t, &mut p, GUEST_MAC, false).unwrap();
    nat.publish(&o, NEXT_HOP);
    u16::from_be_bytes([p[20], p[21]])
}

fn back(nat: &mut Nat, t: Instant, ip: &[u8]) {
    let mut p = ip.to_vec();
    nat.handle_inbound(t, &mut p, false).unwrap();
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, frame)) = data.split_first() else {
        return;
    };
    let mut config = NatConfig::new(Ipv4Addr::new(192, 168, 122, 1), 24, Ipv4Addr::from(EXT));
    config.max_flows = 16;
    let mut nat = Nat::new(config);
    let fast = NatFastPath {
        mirror: nat.mirror(),
        uplink: PortId(3),
        uplink_mac: UPLINK_MAC,
        uplink_mtu: 1500,
        external: Ipv4Addr::from(EXT),
        gateway_mac: GATEWAY_MAC,
        guest_mtu: 1500,
    };
    let t = Instant::now();
    let port = out(&mut nat, t, &tcp(GUEST, 40000, REMOTE, 80, TCP_SYN));
    back(&mut nat, t, &tcp(REMOTE, 80, EXT, port, TCP_SYN | TCP_ACK));
    out(&mut nat, t, &tcp(GUEST, 40000, REMOTE, 80, TCP_ACK));
    let port = out(&mut nat, t, &udp(GUEST, 5353, REMOTE, 53));
    back(&mut nat, t, &udp(REMOTE, 53, EXT, port));
    out(&mut nat, t, &udp(GUEST, 5353, REMOTE, 53));

    let vnet = VnetHdr {
        gso_type: [gso::NONE, gso::TCPV4, gso::UDP_L4, gso::TCPV4 | gso::ECN]
            [usize::from(flags & 3)],
        gso_size: if flags & 3 != 0 { 1448 } else { 0 },
        flags: (flags >> 2) & 1,
        csum_start: 34,
        csum_offset: 16,
        ..VnetHdr::default()
    };
    let inbound = flags & 8 != 0;
    let mut fast_frame = frame.to_vec();
    let guest = if inbound {
        match fast.inward(t, &vnet, &mut fast_frame, Some) {
            Some(mac) => Some(mac),
            None => {
                assert_eq!(fast_frame, frame, "left alone, untouched");
                return;
            }
        }
    } else if fast.outward(t, &vnet, &mut fast_frame) {
        None
    } else {
        assert_eq!(fast_frame, frame, "left alone, untouched");
        return;
    };
    // Translated: the engine's NAT must make the same of it.
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let mut ip = frame[14..14 + total].to_vec();
    let mac = if inbound {
        let mac = nat
            .handle_inbound(t, &mut ip, vnet.needs_csum())
            .expect("the engine translates what a worker did");
        assert_eq!(Some(mac), guest);
        mac
    } else {
        let sender = MacAddr::from_slice(&frame[6..12]);
        let o = nat
            .handle_outbound(t, &mut ip, sender, vnet.needs_csum())
            .expect("the engine translates what a worker did");
        assert!(!o.hairpin);
        NEXT_HOP
    };
    assert!(packet::decrement_ttl(&mut ip));
    let source = if inbound { GATEWAY_MAC } else { UPLINK_MAC };
    let mut engine_frame = mac.0.to_vec();
    engine_frame.extend_from_slice(&source.0);
    engine_frame.extend_from_slice(&frame[12..14]);
    engine_frame.extend_from_slice(&ip);
    engine_frame.extend_from_slice(&frame[14 + total..]);
    assert_eq!(
        fast_frame, engine_frame,
        "the worker and the engine disagree"
    );
});
