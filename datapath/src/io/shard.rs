//! Socket NAT on a worker: the TCP connections that open on the worker's tap queues.
//!
//! Socket NAT's connections are smoltcp sockets and host sockets, each with one owner that
//! moves bytes between the two; nothing of a connection is shared with another. So each
//! worker runs a socket NAT of its own (a shard) for the TCP connections that open on its
//! queues: the kernel puts a guest's flow on one queue by its hash, and once the worker has
//! written the flow's first answer to that queue, tun keeps the flow there
//! (`tun_flow_update`), so the connection's segments keep coming to the thread that holds it.
//!
//! Who holds a connection is decided once, by its SYN, and never by anything that may change
//! while it lasts: a worker takes every segment of the connections it holds (before any
//! other check: a capture starting, or the MAC table's mirror losing the guest's MAC, must
//! not hand one of its segments to the engine, whose stack would answer it with a RST), and
//! opens a connection for a SYN from a port whose frames clean-traffic does not check (those
//! are the engine's, whose guard sees every frame). Everything else goes to the engine: UDP
//! (one mapping per guest port, RFC 4787 REQ-1, whichever queues its flows land on), ping,
//! the gateway's own ports, port forwards, and the segments of its own connections.
//!
//! A shard's connections count against the network's caps with the engine's
//! ([`crate::socket_nat::SharedCaps`]): a guest gets `max_flows_per_guest` in all, whichever
//! threads hold them. What a shard counts and holds reaches `stats` and `conntrack` through a
//! [`ShardView`]: its counters after every turn that touched it, its connections' rows when
//! asked, its drops as they happen (rare, off the fast path). While a capture runs, copies of
//! the frames it takes and sends go to the engine for the capture; while a trace runs, copies
//! of those it takes, which the trace records as taken by the worker.

use super::egress::Egress;
use crate::nat::FlowRow;
use crate::port::{DropReason, PortId};
use crate::socket_nat::{Claim, Peer, SharedCaps, SocketNat, SocketNatConfig, SocketNatCounters};
use crate::wire::ipv4::Ipv4Packet;
use crate::wire::{MacAddr, VnetHdr, ethernet};
use mio::Registry;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Distinct (port, reason) drops a view holds before the engine folds them; past that, a
/// drop is added to the last one's count (a storm of drops of many kinds at once).
const MAX_PENDING_DROPS: usize = 1024;

/// What a worker's socket NAT shows the engine's thread (for `stats` and `conntrack`).
#[derive(Debug, Default)]
pub(crate) struct ShardView {
    state: Mutex<ShardState>,
    /// A hint for the worker that rows are asked for (the request itself is `asked` in the
    /// state): set after asking, cleared by the worker under the lock before it answers.
    want_rows: AtomicBool,
}

#[derive(Debug, Default)]
struct ShardState {
    counters: SocketNatCounters,
    flows: usize,
    unresolved: u64,
    /// Requests for rows made, and the last one answered (`rows` is its answer, which
    /// answers every request made before it too: several may wait at once, each on the
    /// control thread, and each gets the rows).
    asked: u64,
    answered: u64,
    rows: Arc<Vec<FlowRow>>,
    /// Tickets neither taken nor given up: once none is left, `rows` is let go (a large
    /// table's rows are not kept until the next `conntrack`).
    unclaimed: u64,
    /// Drops not yet folded into the ports' counters.
    drops: Vec<(PortId, DropReason, u64)>,
}

/// A shard's counts as last published.
#[derive(Debug, Default, Clone)]
pub(crate) struct ShardCounts {
    pub counters: SocketNatCounters,
    /// Connections it holds.
    pub flows: usize,
    /// Packets for a guest it had not heard from (dropped; TCP retransmits them).
    pub unresolved: u64,
}

impl ShardView {
    fn lock(&self) -> MutexGuard<'_, ShardState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn counts(&self) -> ShardCounts {
        let state = self.lock();
        ShardCounts {
            counters: state.counters.clone(),
            flows: state.flows,
            unresolved: state.unresolved,
        }
    }

    /// Drops since the last call.
    pub fn take_drops(&self) -> Vec<(PortId, DropReason, u64)> {
        std::mem::take(&mut self.lock().drops)
    }

    /// Asks the worker for its connections' rows (then wake it).
    pub fn ask_rows(self: &Arc<Self>) -> RowsTicket {
        let number = {
            let mut state = self.lock();
            state.asked += 1;
            state.unclaimed += 1;
            state.asked
        };
        self.want_rows.store(true, Ordering::Release);
        RowsTicket {
            view: self.clone(),
            number,
            claimed: false,
        }
    }

    /// One ticket fewer waits for the rows.
    fn claim(&self) {
        let mut state = self.lock();
        state.unclaimed -= 1;
        if state.unclaimed == 0 {
            state.rows = Arc::default();
        }
    }
}

/// A request for a worker's rows ([`ShardView::ask_rows`]); dropping it gives up on them.
#[derive(Debug)]
pub(crate) struct RowsTicket {
    view: Arc<ShardView>,
    number: u64,
    claimed: bool,
}

impl RowsTicket {
    /// The rows, once the worker answered this request (or a later one); `None` before, and
    /// after they were taken.
    pub fn take(&mut self) -> Option<Arc<Vec<FlowRow>>> {
        if self.claimed {
            return None;
        }
        let rows = {
            let state = self.view.lock();
            (state.answered >= self.number).then(|| state.rows.clone())
        }?;
        self.claimed = true;
        self.view.claim();
        Some(rows)
    }
}

impl Drop for RowsTicket {
    fn drop(&mut self) {
        if !self.claimed {
            self.view.claim();
        }
    }
}

/// A worker's socket NAT and its host sockets.
#[derive(Debug)]
pub(crate) struct SocketShard {
    pub nat: SocketNat,
    pub egress: Egress,
    view: Arc<ShardView>,
    gateway_mac: MacAddr,
    /// Something happened since the last [`SocketShard::serve`] (a frame taken, a host
    /// socket's event).
    touched: bool,
}

impl SocketShard {
    /// A shard of the network whose socket NAT runs with `config` and counts against `caps`
    /// (the engine's socket NAT's), and the view of it the engine's thread reads.
    pub fn new(
        config: &SocketNatConfig,
        caps: Arc<SharedCaps>,
        gateway_mac: MacAddr,
        now: Instant,
    ) -> (SocketShard, Arc<ShardView>) {
        let view = Arc::new(ShardView::default());
        let shard = SocketShard {
            nat: SocketNat::sharing_caps(config.clone(), caps, now),
            egress: Egress::default(),
            view: view.clone(),
            gateway_mac,
            touched: false,
        };
        (shard, view)
    }

    /// Whether the shard takes `frame` (after its virtio-net header), read from a queue of
    /// port `port`, which `may_open` connections here: an untagged IPv4 TCP segment to the
    /// gateway's MAC from a guest's, whose header holds and has TTL left, of a connection the
    /// shard holds for that guest on that port, or a SYN for beyond the subnet that opens one.
    pub fn takes(&self, frame: &[u8], port: PortId, may_open: bool) -> bool {
        let Some(packet) = frame.get(ethernet::HEADER_LEN..) else {
            return false;
        };
        let src = MacAddr::from_slice(&frame[6..12]);
        if frame[0..6] != self.gateway_mac.0
            || frame[12..14] != [0x08, 0x00]
            || !src.is_valid_source()
            || src == self.gateway_mac
        {
            return false;
        }
        let Ok(ip) = Ipv4Packet::new_checked(packet) else {
            return false;
        };
        if !ip.header_checksum_ok() || ip.ttl() <= 1 {
            return false;
        }
        let from = Peer { port, mac: src };
        match self.nat.claim(&packet[..ip.total_len()], from) {
            Claim::Held => true,
            Claim::Opens => may_open,
            Claim::Not => false,
        }
    }

    /// Hands a frame [`SocketShard::takes`] to the socket NAT.
    pub fn handle(&mut self, now: Instant, from: Peer, vnet: &VnetHdr, frame: &[u8]) {
        self.touched = true;
        let packet = &frame[ethernet::HEADER_LEN..];
        let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
        if let Err(reason) = self.nat.handle_packet(now, from, &packet[..total], vnet) {
            self.record_drop(from.port, reason);
        }
    }

    /// A readiness event of one of the shard's host sockets.
    pub fn handle_event(&mut self, event: &mio::event::Event) {
        self.touched |= self.egress.handle_event(event);
    }

    fn record_drop(&self, port: PortId, reason: DropReason) {
        let mut state = self.view.lock();
        let drops = &mut state.drops;
        if let Some(seen) = drops
            .iter_mut()
            .find(|(p, r, _)| *p == port && *r == reason)
        {
            seen.2 += 1;
        } else if drops.len() < MAX_PENDING_DROPS {
            drops.push((port, reason, 1));
        } else if let Some(last) = drops.last_mut() {
            last.2 += 1;
        }
    }

    /// Whether [`SocketShard::serve`] has anything to do at `now`.
    pub fn is_due(&self, now: Instant) -> bool {
        self.touched
            || self.is_busy()
            || self.view.want_rows.load(Ordering::Relaxed)
            || self.nat.poll_timeout().is_some_and(|t| t <= now)
    }

    /// Whether work is left that needs no event to wake for.
    pub fn is_busy(&self) -> bool {
        self.egress.has_pending() || self.nat.has_actions()
    }

    /// Runs timers, the host sockets and the stack.
    pub fn serve(&mut self, now: Instant, registry: &Registry) {
        self.touched = false;
        if self.nat.poll_timeout().is_some_and(|t| t <= now) {
            self.nat.handle_timeout(now);
        }
        self.egress.serve(now, &mut self.nat, registry);
    }

    /// The next frame for a guest, with its Ethernet header, and the guest's port. A packet
    /// for a guest the shard has not heard from is dropped (counted; TCP retransmits it).
    pub fn poll_frame(&mut self) -> Option<(PortId, VnetHdr, Vec<u8>)> {
        loop {
            let (mut frame, vnet) = self.nat.poll_packet()?;
            let at = ethernet::HEADER_LEN + 16;
            let dst = frame
                .get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(Ipv4Addr::from);
            match dst.and_then(|ip| self.nat.peer(ip)) {
                Some(peer) => {
                    ethernet::write_header(&mut frame, peer.mac, self.gateway_mac);
                    return Some((peer.port, vnet, frame));
                }
                None => {
                    self.view.lock().unresolved += 1;
                    self.nat.recycle(frame);
                }
            }
        }
    }

    /// When [`SocketShard::serve`] must run again for timers.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.nat.poll_timeout()
    }

    /// The port `port` is gone ([`SocketNat::forget_port`]).
    pub fn forget_port(&mut self, port: PortId) {
        self.nat.forget_port(port);
        self.touched = true;
    }

    /// Copies the counters into the view, and the connections' rows when asked.
    pub fn publish(&mut self, now: Instant) {
        let mut state = self.view.lock();
        state.counters.clone_from(&self.nat.counters);
        state.flows = self.nat.len();
        self.view.want_rows.store(false, Ordering::Release);
        if state.asked != state.answered {
            // Asked for and given up on already: nobody to hold them for.
            if state.unclaimed > 0 {
                state.rows = Arc::new(self.nat.rows(now));
            }
            state.answered = state.asked;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Two `conntrack`s waiting at once (each on the control thread) both get the worker's
    /// rows: taking them for one does not leave the other an empty list.
    #[test]
    fn every_request_answered_gets_the_rows() {
        let now = Instant::now();
        let config = SocketNatConfig::new(Ipv4Addr::new(192, 168, 122, 1), 24);
        let mac = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
        let (mut shard, view) = SocketShard::new(&config, Arc::default(), mac, now);
        let mut first = view.ask_rows();
        let mut second = view.ask_rows();
        assert!(first.take().is_none(), "not answered yet");
        shard.publish(now);
        let a = first.take().unwrap();
        assert!(first.take().is_none(), "taken");
        let mut third = view.ask_rows();
        assert!(third.take().is_none());
        let b = second.take().expect("an answered request stays answered");
        assert!(Arc::ptr_eq(&a, &b));
    }

    /// The rows are let go once every request took them or gave up, whatever their order,
    /// and a worker answering only given-up requests keeps none.
    #[test]
    fn rows_are_kept_only_while_a_request_waits_for_them() {
        let now = Instant::now();
        let config = SocketNatConfig::new(Ipv4Addr::new(192, 168, 122, 1), 24);
        let mac = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
        let (mut shard, view) = SocketShard::new(&config, Arc::default(), mac, now);
        // Distinguishable from the empty default: a fresh allocation each answer.
        let held = |view: &ShardView| view.lock().rows.clone();
        let mut first = view.ask_rows();
        let second = view.ask_rows();
        shard.publish(now);
        let rows = first.take().unwrap();
        assert!(Arc::ptr_eq(&held(&view), &rows), "the second still waits");
        drop(second);
        assert!(!Arc::ptr_eq(&held(&view), &rows), "let go");
        assert_eq!(view.lock().unclaimed, 0);

        let given_up = view.ask_rows();
        drop(given_up);
        let before = held(&view);
        shard.publish(now);
        assert!(
            Arc::ptr_eq(&before, &held(&view)),
            "no rows made for nobody"
        );
        let (asked, answered) = {
            let state = view.lock();
            (state.asked, state.answered)
        };
        assert_eq!(answered, asked);
    }
}
