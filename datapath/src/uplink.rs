//! The uplink of packet NAT: the external address the engine owns on the host's NIC.
//!
//! The engine is a host on the uplink's LAN like any other: it has its own MAC (so the host
//! kernel, sharing the NIC, drops our frames as addressed to another host instead of
//! answering them), answers ARP for the external address, and resolves its next hops by ARP,
//! holding a few packets while it waits and retrying before giving up (RFC 1122 2.3.2.2).
//! Entries are used for [`REACHABLE`] after confirmation and then re-probed while still used,
//! as Linux's STALE/PROBE states do, so a working flow never waits on ARP again.

use crate::port::DropReason;
use crate::wire::arp::{self, ArpPacket};
use crate::wire::{MacAddr, VnetHdr};
use ahash::RandomState;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// How long an answer is trusted before the next use re-probes (Linux `base_reachable_time`).
pub const REACHABLE: Duration = Duration::from_secs(30);
/// Time between ARP probes, and how many are sent before giving up (Linux `retrans_time`,
/// `mcast_solicit`).
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const MAX_PROBES: u8 = 3;
/// Packets held per unresolved next hop (RFC 1122 2.3.2.2 asks for at least one; Linux
/// holds 101 by default through `unres_qlen_bytes`).
const MAX_PENDING: usize = 64;
const MAX_NEIGHBORS: usize = 1024;

/// `<forward dev>`, `<nat><address>` and `<sy:uplink>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UplinkConfig {
    pub mac: MacAddr,
    /// The external address.
    pub ip: Ipv4Addr,
    pub prefix: u8,
    /// The next hop for destinations off the uplink's subnet.
    pub gateway: Option<Ipv4Addr>,
    /// The uplink's MTU: larger packets with DF set get ICMP fragmentation-needed.
    pub mtu: u16,
}

impl UplinkConfig {
    fn on_link(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.ip) & mask
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No answer yet: `probes` sent, the next at `next`.
    Incomplete {
        probes: u8,
        next: Instant,
    },
    Reachable {
        until: Instant,
    },
    /// Still used, re-probing; the MAC stays in use until probes run out.
    Probe {
        probes: u8,
        next: Instant,
    },
}

#[derive(Debug)]
struct Neighbor {
    mac: Option<MacAddr>,
    /// Fast-path workers send to it ([`Uplink::share`]): it is re-probed when its
    /// confirmation runs out, as a next hop in use is, though the engine may not use it.
    shared: bool,
    state: State,
    pending: VecDeque<(VnetHdr, Vec<u8>)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UplinkCounters {
    pub arp_requests_sent: u64,
    pub arp_replies_sent: u64,
    pub neighbors_resolved: u64,
    pub neighbors_failed: u64,
}

/// What an ARP packet on the uplink was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpAnswer {
    /// A request for the external address: the frame is now the reply.
    Reply,
    /// Nothing for us (perhaps learned from).
    Consumed,
    NotOurs,
}

/// One row of `switchyard neighbors` (and of `stats --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NeighborRow {
    pub ip: Ipv4Addr,
    pub mac: Option<MacAddr>,
    pub state: &'static str,
    pub pending: usize,
}

#[derive(Debug)]
pub struct Uplink {
    config: UplinkConfig,
    neighbors: HashMap<Ipv4Addr, Neighbor, RandomState>,
    tx: VecDeque<(VnetHdr, Vec<u8>)>,
    /// A next hop's MAC changed ([`Uplink::take_moved`]).
    moved: bool,
    pub counters: UplinkCounters,
}

impl Uplink {
    pub fn new(config: UplinkConfig) -> Uplink {
        Uplink {
            config,
            neighbors: HashMap::with_hasher(RandomState::new()),
            tx: VecDeque::new(),
            moved: false,
            counters: UplinkCounters::default(),
        }
    }

    pub fn config(&self) -> &UplinkConfig {
        &self.config
    }

    /// Where a packet for `dst` goes next: itself when on the uplink's subnet, else the
    /// gateway.
    pub fn next_hop(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        if self.config.on_link(dst) {
            Some(dst)
        } else {
            self.config.gateway
        }
    }

    /// The MAC of `ip` if known. A use after [`REACHABLE`] starts re-probing.
    pub fn resolve(&mut self, now: Instant, ip: Ipv4Addr) -> Option<MacAddr> {
        let n = self.neighbors.get_mut(&ip)?;
        let mac = n.mac?;
        if let State::Reachable { until } = n.state
            && until <= now
        {
            n.state = State::Probe {
                probes: 1,
                next: now + PROBE_INTERVAL,
            };
            let frame = arp::request_frame(self.config.mac, self.config.ip, ip);
            self.tx.push_back((VnetHdr::default(), frame));
            self.counters.arp_requests_sent += 1;
        }
        Some(mac)
    }

    /// Holds `frame` (with every header final but the destination MAC) until `ip` answers;
    /// the first packet for a next hop sends the ARP request.
    pub fn enqueue(
        &mut self,
        now: Instant,
        ip: Ipv4Addr,
        vnet: VnetHdr,
        frame: Vec<u8>,
    ) -> Result<(), DropReason> {
        if !self.neighbors.contains_key(&ip) {
            if self.neighbors.len() >= MAX_NEIGHBORS {
                return Err(DropReason::NeighborUnresolved);
            }
            self.neighbors.insert(
                ip,
                Neighbor {
                    shared: false,
                    mac: None,
                    state: State::Incomplete {
                        probes: 1,
                        next: now + PROBE_INTERVAL,
                    },
                    pending: VecDeque::new(),
                },
            );
            let request = arp::request_frame(self.config.mac, self.config.ip, ip);
            self.tx.push_back((VnetHdr::default(), request));
            self.counters.arp_requests_sent += 1;
        }
        let Some(n) = self.neighbors.get_mut(&ip) else {
            return Err(DropReason::NeighborUnresolved);
        };
        if n.pending.len() >= MAX_PENDING {
            return Err(DropReason::NeighborUnresolved);
        }
        n.pending.push_back((vnet, frame));
        Ok(())
    }

    /// RFC 826 "Packet Reception" on the uplink: answer for the external address, learn the
    /// next hops we asked for (or already know), and release what waited for them.
    pub fn handle_arp(&mut self, now: Instant, frame: &mut [u8], l3: usize) -> ArpAnswer {
        let Ok(mut packet) = ArpPacket::new_checked(&mut frame[l3..]) else {
            return ArpAnswer::NotOurs;
        };
        let (sender, sender_mac) = (packet.sender_ip(), packet.sender_mac());
        let for_us = packet.target_ip() == self.config.ip;
        if let Some(n) = self.neighbors.get_mut(&sender)
            && sender_mac.is_valid_source()
        {
            self.moved |= n.mac.is_some_and(|old| old != sender_mac);
            n.mac = Some(sender_mac);
            n.state = State::Reachable {
                until: now + REACHABLE,
            };
            if !n.pending.is_empty() {
                self.counters.neighbors_resolved += 1;
            }
            for (vnet, mut held) in n.pending.drain(..) {
                held[0..6].copy_from_slice(&sender_mac.0);
                self.tx.push_back((vnet, held));
            }
        }
        if for_us
            && sender_mac.is_valid_source()
            && !self.neighbors.contains_key(&sender)
            && self.neighbors.len() < MAX_NEIGHBORS
        {
            // RFC 826 "merge": whoever asks for us is about to talk to us.
            self.neighbors.insert(
                sender,
                Neighbor {
                    shared: false,
                    mac: Some(sender_mac),
                    state: State::Reachable {
                        until: now + REACHABLE,
                    },
                    pending: VecDeque::new(),
                },
            );
        }
        if for_us && packet.operation() == arp::OP_REQUEST {
            packet.make_reply(self.config.mac, self.config.ip);
            frame.copy_within(6..12, 0);
            frame[6..12].copy_from_slice(&self.config.mac.0);
            self.counters.arp_replies_sent += 1;
            return ArpAnswer::Reply;
        }
        if for_us {
            ArpAnswer::Consumed
        } else {
            ArpAnswer::NotOurs
        }
    }

    /// Notes that fast-path workers send to next hop `ip` (its MAC is in NAT's mirror).
    pub fn share(&mut self, ip: Ipv4Addr) {
        if let Some(n) = self.neighbors.get_mut(&ip)
            && !n.shared
        {
            n.shared = true;
        }
    }

    /// Workers send to no next hop any more: next hops are re-probed only when the engine
    /// uses them again.
    pub fn unshare_all(&mut self) {
        for n in self.neighbors.values_mut() {
            n.shared = false;
        }
    }

    /// Whether a next hop's MAC changed, or a next hop with a MAC stopped answering, since
    /// the last call: what workers were given for it is stale.
    pub fn take_moved(&mut self) -> bool {
        std::mem::take(&mut self.moved)
    }

    /// A frame the uplink originated (ARP) or released (held for ARP), to send out.
    pub fn poll_transmit(&mut self) -> Option<(VnetHdr, Vec<u8>)> {
        self.tx.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.neighbors
            .values()
            .filter_map(|n| match n.state {
                State::Incomplete { next, .. } | State::Probe { next, .. } => Some(next),
                State::Reachable { until } if n.shared => Some(until),
                State::Reachable { .. } => None,
            })
            .min()
    }

    /// Sends due probes; a next hop that did not answer [`MAX_PROBES`] loses its held packets
    /// (returned as a count, for the drop counter) and its entry.
    pub fn handle_timeout(&mut self, now: Instant) -> usize {
        let mut dropped = 0;
        let (mac, ip) = (self.config.mac, self.config.ip);
        let mut failed = Vec::new();
        for (target, n) in self.neighbors.iter_mut() {
            let (probes, next) = match n.state {
                State::Incomplete { probes, next } | State::Probe { probes, next } => {
                    (probes, next)
                }
                // Used by workers, unconfirmed for too long: probe it as a use would.
                State::Reachable { until } if n.shared && until <= now => (0, now),
                State::Reachable { .. } => continue,
            };
            if next > now {
                continue;
            }
            if probes >= MAX_PROBES {
                failed.push(*target);
                continue;
            }
            let next = now + PROBE_INTERVAL;
            n.state = match n.state {
                State::Incomplete { .. } => State::Incomplete {
                    probes: probes + 1,
                    next,
                },
                _ => State::Probe {
                    probes: probes + 1,
                    next,
                },
            };
            self.tx
                .push_back((VnetHdr::default(), arp::request_frame(mac, ip, *target)));
            self.counters.arp_requests_sent += 1;
        }
        for target in failed {
            if let Some(n) = self.neighbors.remove(&target) {
                dropped += n.pending.len();
                self.counters.neighbors_failed += 1;
                self.moved |= n.mac.is_some();
            }
        }
        dropped
    }

    pub fn rows(&self) -> Vec<NeighborRow> {
        let mut rows: Vec<_> = self
            .neighbors
            .iter()
            .map(|(ip, n)| NeighborRow {
                ip: *ip,
                mac: n.mac,
                state: match n.state {
                    State::Incomplete { .. } => "INCOMPLETE",
                    State::Reachable { .. } => "REACHABLE",
                    State::Probe { .. } => "PROBE",
                },
                pending: n.pending.len(),
            })
            .collect();
        rows.sort_by_key(|r| r.ip);
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: MacAddr = MacAddr([0x52, 0x54, 0, 0xee, 0, 2]);
    const ROUTER: MacAddr = MacAddr([0x52, 0x54, 0, 0xee, 0, 1]);

    fn uplink() -> (Uplink, Instant) {
        let u = Uplink::new(UplinkConfig {
            mac: OURS,
            ip: Ipv4Addr::new(203, 0, 113, 2),
            prefix: 24,
            gateway: Some(Ipv4Addr::new(203, 0, 113, 1)),
            mtu: 1500,
        });
        (u, Instant::now())
    }

    fn arp_from_router(op: u16, target: Ipv4Addr) -> Vec<u8> {
        let mut f = arp::request_frame(ROUTER, Ipv4Addr::new(203, 0, 113, 1), target);
        f[20..22].copy_from_slice(&op.to_be_bytes());
        f
    }

    #[test]
    fn next_hop_is_on_link_or_the_gateway() {
        let (u, _) = uplink();
        let router = Ipv4Addr::new(203, 0, 113, 1);
        assert_eq!(
            u.next_hop(Ipv4Addr::new(203, 0, 113, 9)),
            Some(Ipv4Addr::new(203, 0, 113, 9))
        );
        assert_eq!(u.next_hop(Ipv4Addr::new(198, 51, 100, 1)), Some(router));
    }

    // RFC 1122 2.3.2.2: hold packets while resolving; send them once the reply comes.
    #[test]
    fn holds_packets_until_the_next_hop_answers() {
        let (mut u, t) = uplink();
        let router = Ipv4Addr::new(203, 0, 113, 1);
        assert_eq!(u.resolve(t, router), None);
        u.enqueue(t, router, VnetHdr::default(), vec![0; 60])
            .unwrap();
        u.enqueue(t, router, VnetHdr::default(), vec![1; 60])
            .unwrap();
        let (_, request) = u.poll_transmit().unwrap();
        assert_eq!(&request[..6], &[0xff; 6]);
        assert!(u.poll_transmit().is_none(), "one request for both packets");

        let mut reply = arp_from_router(arp::OP_REPLY, Ipv4Addr::new(203, 0, 113, 2));
        assert_eq!(u.handle_arp(t, &mut reply, 14), ArpAnswer::Consumed);
        for fill in [0, 1] {
            let (_, f) = u.poll_transmit().unwrap();
            assert_eq!(&f[..6], &ROUTER.0);
            assert_eq!(f[20], fill);
        }
        assert_eq!(u.resolve(t, router), Some(ROUTER));
    }

    #[test]
    fn answers_arp_for_the_external_address_only() {
        let (mut u, t) = uplink();
        let mut f = arp_from_router(arp::OP_REQUEST, Ipv4Addr::new(203, 0, 113, 2));
        assert_eq!(u.handle_arp(t, &mut f, 14), ArpAnswer::Reply);
        assert_eq!(&f[..6], &ROUTER.0);
        assert_eq!(&f[6..12], &OURS.0);
        let mut other = arp_from_router(arp::OP_REQUEST, Ipv4Addr::new(203, 0, 113, 3));
        assert_eq!(u.handle_arp(t, &mut other, 14), ArpAnswer::NotOurs);
    }

    // Retries, then gives up and drops what it held.
    #[test]
    fn unanswered_next_hops_fail_after_three_probes() {
        let (mut u, t) = uplink();
        let router = Ipv4Addr::new(203, 0, 113, 1);
        u.enqueue(t, router, VnetHdr::default(), vec![0; 60])
            .unwrap();
        let mut now = t;
        let mut dropped = 0;
        for _ in 0..5 {
            now += PROBE_INTERVAL;
            dropped += u.handle_timeout(now);
        }
        let mut requests = 0;
        while u.poll_transmit().is_some() {
            requests += 1;
        }
        assert_eq!(requests, MAX_PROBES as usize);
        assert_eq!(dropped, 1);
        assert!(u.rows().is_empty());
    }

    /// An uplink that has resolved the router (which answered `reply`) and sent what it held.
    fn resolved_router() -> (Uplink, Instant, Ipv4Addr, Vec<u8>) {
        let (mut u, t) = uplink();
        let router = Ipv4Addr::new(203, 0, 113, 1);
        u.enqueue(t, router, VnetHdr::default(), vec![0; 60])
            .unwrap();
        let mut reply = arp_from_router(arp::OP_REPLY, Ipv4Addr::new(203, 0, 113, 2));
        u.handle_arp(t, &mut reply, 14);
        while u.poll_transmit().is_some() {}
        (u, t, router, reply)
    }

    // Once workers send to it no more, an idle next hop is left alone, as one the engine
    // stopped using is.
    #[test]
    fn a_next_hop_workers_stopped_using_is_not_reprobed() {
        let (mut u, t, router, _) = resolved_router();
        u.share(router);
        u.unshare_all();
        assert_eq!(u.poll_timeout(), None);
        u.handle_timeout(t + REACHABLE);
        assert_eq!(u.rows()[0].state, "REACHABLE");
        assert!(u.poll_transmit().is_none(), "no probe");
    }

    // A known MAC stays in use past REACHABLE while it is re-probed.
    #[test]
    fn stale_entries_keep_working_while_reprobed() {
        let (mut u, t, router, mut reply) = resolved_router();
        let later = t + REACHABLE;
        assert_eq!(u.resolve(later, router), Some(ROUTER));
        assert_eq!(u.rows()[0].state, "PROBE");
        assert!(u.poll_transmit().is_some(), "a probe went out");
        u.handle_arp(later, &mut reply, 14);
        assert_eq!(u.rows()[0].state, "REACHABLE");
    }

    // RFC 1122 2.3.2.1: a next hop in use is revalidated; one only workers send to is too,
    // and when it stops answering, or answers with another MAC, what workers hold is stale.
    #[test]
    fn next_hops_workers_use_are_reprobed_and_their_loss_or_move_is_told() {
        let (mut u, t, router, _) = resolved_router();
        u.share(router);
        assert_eq!(
            u.poll_timeout(),
            Some(t + REACHABLE),
            "its confirmation runs out then"
        );
        u.handle_timeout(t + REACHABLE);
        assert_eq!(
            u.rows()[0].state,
            "PROBE",
            "probed without a use by the engine"
        );
        assert!(u.poll_transmit().is_some());
        assert!(!u.take_moved());

        // It answers from another MAC.
        let new_mac = MacAddr([0x06, 0, 0, 0, 0, 0x01]);
        let mut moved = arp::request_frame(new_mac, router, Ipv4Addr::new(203, 0, 113, 2));
        moved[20..22].copy_from_slice(&arp::OP_REPLY.to_be_bytes());
        u.handle_arp(t + REACHABLE, &mut moved, 14);
        assert!(u.take_moved(), "a new MAC");
        assert!(!u.take_moved(), "told once");

        // It stops answering.
        let mut now = t + REACHABLE * 2;
        for _ in 0..5 {
            u.handle_timeout(now);
            now += PROBE_INTERVAL;
        }
        assert!(u.rows().is_empty());
        assert!(u.take_moved(), "gone");
    }
}
