//! The engine: one network's pipeline, driven from outside.
//!
//! `handle_frame(now, ingress, vnet, frame)` decides what happens to one received frame and
//! returns the decision; the I/O edge carries it out. `poll_timeout` / `handle_timeout` drive
//! the timers. No clock is read and no syscall is made here, which is what makes the engine
//! testable with fixtures and virtual time, and cheap enough to bench per frame (the model is
//! smoltcp's `Interface::poll` and quinn-proto's `Connection`).

use crate::gateway::{Answer, Gateway, GatewayConfig, GatewayCounters};
use crate::port::{DropReason, PortCounters, PortId};
use crate::switch::{self, Fdb, FdbCounters, FdbRow, Learned};
use crate::wire::VnetHdr;
use crate::wire::ethernet::{self, EthernetFrame};
use serde::Serialize;
use std::time::{Duration, Instant};

/// The largest frame the engine accepts: a 64 KiB GSO super-frame plus Ethernet and VLAN
/// headers. I/O buffers are this size plus the virtio-net header.
pub const MAX_FRAME_LEN: usize = 65535 + ethernet::HEADER_LEN + ethernet::VLAN_TAG_LEN;

/// Engine settings, from the network XML.
#[derive(Debug, Clone)]
pub struct Config {
    /// `<mtu size=...>`: the largest L3 packet a non-GSO frame may carry.
    pub mtu: u16,
    pub fdb_capacity: usize,
    pub fdb_aging: Duration,
    /// The gateway address served inside the engine (`<ip>` of the network), if any.
    pub gateway: Option<GatewayConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mtu: 1500,
            fdb_capacity: switch::DEFAULT_CAPACITY,
            fdb_aging: switch::DEFAULT_AGING,
            gateway: None,
        }
    }
}

/// What to do with a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it out of exactly this port.
    Forward(PortId),
    /// Send it out of every port but the ingress one.
    Flood,
    /// The engine rewrote the frame into its answer (ARP, ICMP echo): send it back out of the
    /// ingress port.
    Reply,
    /// Drop it; the reason was counted on the ingress port.
    Drop(DropReason),
}

/// A port as the engine sees it.
#[derive(Debug, Clone, Serialize)]
pub struct PortState {
    pub name: String,
    pub counters: PortCounters,
}

/// Switch-wide counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineCounters {
    pub forwarded: u64,
    pub flooded: u64,
    pub fdb: FdbCounters,
    pub gateway: GatewayCounters,
}

/// A snapshot for `switchyard stats`.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub ports: Vec<(PortId, PortState)>,
    pub engine: EngineCounters,
    pub fdb_entries: usize,
}

/// One network's forwarding pipeline.
#[derive(Debug)]
pub struct Engine {
    max_plain_frame: usize,
    fdb: Fdb,
    gateway: Option<Gateway>,
    ports: Vec<Option<PortState>>,
    forwarded: u64,
    flooded: u64,
}

impl Engine {
    pub fn new(config: &Config) -> Engine {
        Engine {
            max_plain_frame: config.mtu as usize + ethernet::HEADER_LEN + ethernet::VLAN_TAG_LEN,
            fdb: Fdb::new(config.fdb_capacity, config.fdb_aging),
            gateway: config.gateway.map(Gateway::new),
            ports: Vec::new(),
            forwarded: 0,
            flooded: 0,
        }
    }

    /// Adds a port; its id is the lowest free one.
    pub fn add_port(&mut self, name: impl Into<String>) -> PortId {
        let state = PortState {
            name: name.into(),
            counters: PortCounters::default(),
        };
        let slot = match self.ports.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                self.ports.push(None);
                self.ports.len() - 1
            }
        };
        self.ports[slot] = Some(state);
        PortId(slot as u16)
    }

    /// Removes a port and forgets what was learned on it.
    pub fn remove_port(&mut self, port: PortId) -> Option<PortState> {
        self.fdb.flush_port(port);
        self.ports.get_mut(port.0 as usize)?.take()
    }

    pub fn port(&self, port: PortId) -> Option<&PortState> {
        self.ports.get(port.0 as usize)?.as_ref()
    }

    /// Live ports in id order.
    pub fn ports(&self) -> impl Iterator<Item = (PortId, &PortState)> {
        self.ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (PortId(i as u16), p)))
    }

    fn counters_mut(&mut self, port: PortId) -> Option<&mut PortCounters> {
        self.ports
            .get_mut(port.0 as usize)?
            .as_mut()
            .map(|p| &mut p.counters)
    }

    /// Decides the fate of `frame`, received on `ingress` at `now` with offload state `vnet`.
    pub fn handle_frame(
        &mut self,
        now: Instant,
        ingress: PortId,
        vnet: &VnetHdr,
        frame: &mut [u8],
    ) -> Verdict {
        let verdict = self.switch_frame(now, ingress, vnet, frame);
        if let Some(c) = self.counters_mut(ingress) {
            c.record_rx(frame.len());
            if let Verdict::Drop(reason) = verdict {
                c.record_drop(reason);
            }
        }
        verdict
    }

    fn switch_frame(
        &mut self,
        now: Instant,
        ingress: PortId,
        vnet: &VnetHdr,
        frame: &mut [u8],
    ) -> Verdict {
        let max = if vnet.is_gso() {
            MAX_FRAME_LEN
        } else {
            self.max_plain_frame
        };
        if frame.len() > max {
            return Verdict::Drop(DropReason::Oversize);
        }
        let Ok(eth) = EthernetFrame::new_checked(&*frame) else {
            return Verdict::Drop(DropReason::Runt);
        };
        let (src, dst, vlan) = (eth.src(), eth.dst(), eth.vlan_id());
        let (ethertype, l3) = (eth.ethertype(), eth.header_len());
        if !src.is_valid_source() {
            return Verdict::Drop(DropReason::InvalidSource);
        }
        let gateway_mac = self.gateway.as_ref().map(|g| g.config().mac);
        if Some(src) == gateway_mac {
            return Verdict::Drop(DropReason::SpoofedGatewayMac);
        }
        // A full table does not stop forwarding: the frame is still delivered (flooded if its
        // destination is unknown); `fdb.full` counts it.
        let _: Learned = self.fdb.learn(now, src, vlan, ingress);

        if let Some(gateway) = &mut self.gateway {
            let to_gateway = Some(dst) == gateway_mac;
            if to_gateway || dst.is_broadcast() {
                match gateway.handle(frame, l3, ethertype, to_gateway) {
                    Answer::Reply => return Verdict::Reply,
                    Answer::Drop(reason) => return Verdict::Drop(reason),
                    Answer::Pass => {}
                }
            }
        }
        if dst.is_multicast() {
            self.flooded += 1;
            return Verdict::Flood;
        }
        match self.fdb.lookup(now, dst, vlan) {
            Some(port) if port == ingress => Verdict::Drop(DropReason::SamePort),
            Some(port) => {
                self.forwarded += 1;
                Verdict::Forward(port)
            }
            None => {
                self.flooded += 1;
                Verdict::Flood
            }
        }
    }

    /// The I/O edge reports frames it wrote to `port` (more than one when it segmented).
    pub fn record_tx(&mut self, port: PortId, packets: u64, bytes: usize) {
        if let Some(c) = self.counters_mut(port) {
            c.record_tx(packets, bytes);
        }
    }

    /// The I/O edge reports a frame it could not deliver to (or read from) `port`.
    pub fn record_drop(&mut self, port: PortId, reason: DropReason) {
        if let Some(c) = self.counters_mut(port) {
            c.record_drop(reason);
        }
    }

    /// When [`Engine::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.fdb.next_expiry()
    }

    /// Runs the timers that are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.fdb.next_expiry().is_some_and(|t| t <= now) {
            self.fdb.expire(now);
        }
    }

    pub fn fdb(&self) -> &Fdb {
        &self.fdb
    }

    pub fn fdb_rows(&self, now: Instant) -> Vec<FdbRow> {
        self.fdb.rows(now)
    }

    pub fn stats(&self) -> Stats {
        Stats {
            ports: self.ports().map(|(id, p)| (id, p.clone())).collect(),
            engine: EngineCounters {
                forwarded: self.forwarded,
                flooded: self.flooded,
                fdb: self.fdb.counters.clone(),
                gateway: self
                    .gateway
                    .as_ref()
                    .map(|g| g.counters.clone())
                    .unwrap_or_default(),
            },
            fdb_entries: self.fdb.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MacAddr;
    use crate::wire::vnet::gso;

    const A: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0xa]);
    const B: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0xb]);
    const C: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0xc]);

    fn frame(dst: MacAddr, src: MacAddr, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len.max(14)];
        f[0..6].copy_from_slice(&dst.0);
        f[6..12].copy_from_slice(&src.0);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f
    }

    fn three_ports() -> (Engine, [PortId; 3], Instant) {
        let mut e = Engine::new(&Config::default());
        let ports = [e.add_port("a"), e.add_port("b"), e.add_port("c")];
        (e, ports, Instant::now())
    }

    fn send(e: &mut Engine, now: Instant, port: PortId, mut f: Vec<u8>) -> Verdict {
        e.handle_frame(now, port, &VnetHdr::default(), &mut f)
    }

    // IEEE 802.1Q 8.8.6 / 8.6.3: unknown destinations are flooded, learned ones forwarded to
    // exactly the port they were learned on.
    #[test]
    fn learns_then_forwards_known_unicast_to_one_port() {
        let (mut e, [pa, pb, _], t) = three_ports();
        assert_eq!(send(&mut e, t, pa, frame(B, A, 60)), Verdict::Flood);
        assert_eq!(send(&mut e, t, pb, frame(A, B, 60)), Verdict::Forward(pa));
        assert_eq!(send(&mut e, t, pa, frame(B, A, 60)), Verdict::Forward(pb));
        let s = e.stats();
        assert_eq!(s.engine.flooded, 1);
        assert_eq!(s.engine.forwarded, 2);
        assert_eq!(s.ports[0].1.counters.rx_packets, 2);
        assert_eq!(s.ports[0].1.counters.rx_bytes, 120);
    }

    #[test]
    fn broadcast_and_multicast_flood() {
        let (mut e, [pa, _, _], t) = three_ports();
        assert_eq!(
            send(&mut e, t, pa, frame(MacAddr::BROADCAST, A, 42)),
            Verdict::Flood
        );
        let ipv6_all_nodes = MacAddr([0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(
            send(&mut e, t, pa, frame(ipv6_all_nodes, A, 90)),
            Verdict::Flood
        );
    }

    #[test]
    fn never_sends_back_out_of_the_ingress_port() {
        let (mut e, [pa, _, _], t) = three_ports();
        send(&mut e, t, pa, frame(MacAddr::BROADCAST, B, 60));
        assert_eq!(
            send(&mut e, t, pa, frame(B, A, 60)),
            Verdict::Drop(DropReason::SamePort)
        );
        assert_eq!(e.port(pa).unwrap().counters.drops(DropReason::SamePort), 1);
    }

    #[test]
    fn follows_a_mac_that_moves() {
        let (mut e, [pa, pb, pc], t) = three_ports();
        send(&mut e, t, pa, frame(MacAddr::BROADCAST, A, 60));
        assert_eq!(send(&mut e, t, pb, frame(A, B, 60)), Verdict::Forward(pa));
        send(&mut e, t, pc, frame(MacAddr::BROADCAST, A, 60));
        assert_eq!(send(&mut e, t, pb, frame(A, B, 60)), Verdict::Forward(pc));
        assert_eq!(e.stats().engine.fdb.moved, 1);
    }

    #[test]
    fn drops_invalid_sources_runts_and_oversize_with_counters() {
        let (mut e, [pa, _, _], t) = three_ports();
        let cases = [
            (frame(B, MacAddr::BROADCAST, 60), DropReason::InvalidSource),
            (
                frame(B, MacAddr([0x01, 0, 0x5e, 0, 0, 1]), 60),
                DropReason::InvalidSource,
            ),
            (frame(B, MacAddr::ZERO, 60), DropReason::InvalidSource),
            (frame(B, A, 60)[..13].to_vec(), DropReason::Runt),
            (Vec::new(), DropReason::Runt),
            (frame(B, A, 1500 + 18 + 1), DropReason::Oversize),
        ];
        for (f, reason) in cases {
            assert_eq!(send(&mut e, t, pa, f), Verdict::Drop(reason));
        }
        let c = &e.port(pa).unwrap().counters;
        assert_eq!(c.drops(DropReason::InvalidSource), 3);
        assert_eq!(c.drops(DropReason::Runt), 2);
        assert_eq!(c.drops(DropReason::Oversize), 1);
        assert_eq!(c.rx_packets, 6);
        assert!(e.fdb().is_empty(), "nothing learned from dropped frames");
        // A maximal plain frame (MTU 1500 + tagged header) is fine.
        assert_eq!(send(&mut e, t, pa, frame(B, A, 1518)), Verdict::Flood);
    }

    #[test]
    fn gso_frames_may_exceed_the_mtu() {
        let (mut e, [pa, _, _], t) = three_ports();
        let tso = VnetHdr {
            gso_type: gso::TCPV4,
            gso_size: 1448,
            ..Default::default()
        };
        let mut f = frame(B, A, 65000);
        assert_eq!(e.handle_frame(t, pa, &tso, &mut f), Verdict::Flood);
        let mut too_big = frame(B, A, MAX_FRAME_LEN + 1);
        assert_eq!(
            e.handle_frame(t, pa, &tso, &mut too_big),
            Verdict::Drop(DropReason::Oversize)
        );
    }

    #[test]
    fn fdb_overflow_still_floods_and_counts() {
        let mut e = Engine::new(&Config {
            fdb_capacity: 2,
            ..Config::default()
        });
        let pa = e.add_port("a");
        let pb = e.add_port("b");
        let t = Instant::now();
        send(&mut e, t, pa, frame(MacAddr::BROADCAST, A, 60));
        send(&mut e, t, pa, frame(MacAddr::BROADCAST, B, 60));
        assert_eq!(send(&mut e, t, pb, frame(A, C, 60)), Verdict::Forward(pa));
        assert_eq!(send(&mut e, t, pa, frame(C, A, 60)), Verdict::Flood);
        let s = e.stats();
        assert_eq!(s.fdb_entries, 2);
        assert_eq!(s.engine.fdb.full, 1);
    }

    #[test]
    fn timers_age_entries_in_virtual_time() {
        let (mut e, [pa, pb, _], t0) = three_ports();
        assert_eq!(e.poll_timeout(), None);
        send(&mut e, t0, pa, frame(MacAddr::BROADCAST, A, 60));
        let due = e.poll_timeout().unwrap();
        assert_eq!(due, t0 + switch::DEFAULT_AGING);
        e.handle_timeout(due - Duration::from_millis(1));
        assert_eq!(e.fdb().len(), 1);
        e.handle_timeout(due);
        assert_eq!(e.fdb().len(), 0);
        assert_eq!(send(&mut e, due, pb, frame(A, B, 60)), Verdict::Flood);
    }

    #[test]
    fn removed_ports_are_forgotten_and_their_ids_reused() {
        let (mut e, [pa, pb, _], t) = three_ports();
        send(&mut e, t, pa, frame(MacAddr::BROADCAST, A, 60));
        e.remove_port(pa);
        assert_eq!(send(&mut e, t, pb, frame(A, B, 60)), Verdict::Flood);
        assert_eq!(e.add_port("d"), pa);
        assert_eq!(e.ports().count(), 3);
    }

    /// A tiny deterministic generator (xorshift64*), so the property test needs no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    // DESIGN.md principle 5: any byte sequence on any port, at any time, costs at most a
    // counter. After each frame every FDB entry points to a live port and the cap holds.
    #[test]
    fn random_frames_on_random_ports_keep_the_fdb_consistent() {
        let mut e = Engine::new(&Config {
            fdb_capacity: 64,
            fdb_aging: Duration::from_secs(5),
            ..Config::default()
        });
        let mut live: Vec<PortId> = (0..4).map(|i| e.add_port(format!("p{i}"))).collect();
        let mut rng = Rng(0x5eed_1234_abcd_ef01);
        let t0 = Instant::now();
        let mut now = t0;
        let mut buf = vec![0u8; 2048];
        for round in 0..50_000u32 {
            now += Duration::from_millis(rng.next() % 20);
            let len = (rng.next() % 1600) as usize;
            for b in buf[..len].iter_mut() {
                *b = rng.next() as u8;
            }
            // Small MAC space so learning, moves and the cap all happen.
            if len >= 12 && rng.next() % 2 == 0 {
                buf[6] &= 0xfe;
                buf[7..11].fill(0);
                buf[11] = (rng.next() % 100) as u8;
                buf[5] = (rng.next() % 100) as u8;
                buf[0..5].fill(0);
            }
            let port = live[(rng.next() % live.len() as u64) as usize];
            let hdr = VnetHdr {
                gso_type: if rng.next() % 8 == 0 { gso::TCPV4 } else { 0 },
                ..Default::default()
            };
            match e.handle_frame(now, port, &hdr, &mut buf[..len]) {
                Verdict::Forward(p) => assert!(p != port && e.port(p).is_some()),
                Verdict::Flood | Verdict::Reply | Verdict::Drop(_) => {}
            }
            if round % 1000 == 999 {
                let gone = live.remove((rng.next() % live.len() as u64) as usize);
                e.remove_port(gone);
                live.push(e.add_port("again"));
            }
            if e.poll_timeout().is_some_and(|t| t <= now) {
                e.handle_timeout(now);
            }
            assert!(e.fdb().len() <= 64);
        }
        for row in e.fdb_rows(now) {
            assert!(
                e.port(row.port).is_some(),
                "entry {row:?} points to a dead port"
            );
        }
        let s = e.stats();
        assert!(s.engine.fdb.learned > 64 && s.engine.fdb.full > 0 && s.engine.fdb.aged > 0);
        assert!(s.engine.fdb.moved > 0);
    }

    #[test]
    fn the_gateway_answers_on_the_ingress_port_and_is_never_flooded_to() {
        use crate::gateway::GatewayConfig;
        use std::net::Ipv4Addr;
        let gw_mac = MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        let mut e = Engine::new(&Config {
            gateway: Some(GatewayConfig {
                mac: gw_mac,
                ip: Ipv4Addr::new(192, 168, 122, 1),
                prefix: 24,
            }),
            ..Config::default()
        });
        let pa = e.add_port("a");
        e.add_port("b");
        let t = Instant::now();
        // who-has 192.168.122.1 tell 192.168.122.10
        let mut arp = frame(MacAddr::BROADCAST, A, 42);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        arp[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        arp[22..28].copy_from_slice(&A.0);
        arp[28..32].copy_from_slice(&[192, 168, 122, 10]);
        arp[38..42].copy_from_slice(&[192, 168, 122, 1]);
        assert_eq!(send(&mut e, t, pa, arp.clone()), Verdict::Reply);
        // A broadcast ARP for someone else is flooded as usual.
        arp[41] = 11;
        assert_eq!(send(&mut e, t, pa, arp), Verdict::Flood);
        // Frames to the gateway's MAC are the gateway's: answered or dropped, never flooded.
        assert_eq!(
            send(&mut e, t, pa, frame(gw_mac, A, 60)),
            Verdict::Drop(DropReason::BadHeader)
        );
        assert_eq!(
            send(&mut e, t, pa, frame(B, gw_mac, 60)),
            Verdict::Drop(DropReason::SpoofedGatewayMac)
        );
        assert_eq!(e.stats().engine.gateway.arp_replies, 1);
    }
}
