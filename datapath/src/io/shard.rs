//! Socket NAT on a worker: the TCP connections whose frames a worker's tap queue brings.
//!
//! Socket NAT's connections are smoltcp sockets and host sockets, each with one owner that
//! moves bytes between the two; nothing of a connection is shared with another. So each
//! worker runs a socket NAT of its own (a shard) for the TCP connections that open on its
//! queue: the kernel puts a guest's flow on one queue by its hash, and once the worker has
//! written the flow's first answer to that queue, tun keeps the flow there
//! (`tun_flow_update`), so the connection's segments keep coming to the thread that holds it.
//! A segment of a connection the shard does not hold (one the engine opened) is handed to
//! the engine; so is everything else: UDP (one mapping per guest port, RFC 4787 REQ-1,
//! whichever queues its flows land on), ping, the gateway's own ports, port forwards.
//!
//! The shard's caps are its share of the network's ([`SocketNat::share_caps`]), and what it
//! counts and holds reaches `stats` and `conntrack` through a [`ShardView`]: counters a few
//! times a second, connection rows when asked, drops as they happen (rare, off the fast
//! path).

use super::egress::Egress;
use crate::nat::FlowRow;
use crate::port::{DropReason, PortId};
use crate::socket_nat::{Peer, SocketNat, SocketNatCounters};
use crate::wire::ipv4::Ipv4Packet;
use crate::wire::{MacAddr, VnetHdr, ethernet};
use mio::Registry;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How often a shard's counters are copied into its view.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// Drops a view holds before the engine folds them; more are counted in the last one's place.
const MAX_PENDING_DROPS: usize = 1024;

/// What a worker's socket NAT shows the engine's thread (for `stats` and `conntrack`).
#[derive(Debug, Default)]
pub(crate) struct ShardView {
    state: Mutex<ShardState>,
    /// The engine's thread wants fresh connection rows (`conntrack`).
    want_rows: AtomicBool,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct ShardState {
    pub counters: SocketNatCounters,
    pub flows: usize,
    /// Packets for a guest the shard had not heard from (dropped; TCP retransmits).
    pub unresolved: u64,
    pub rows: Vec<FlowRow>,
    /// Drops not yet folded into the ports' counters.
    pub drops: Vec<(PortId, DropReason, u64)>,
}

impl ShardView {
    fn lock(&self) -> std::sync::MutexGuard<'_, ShardState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The counters, connection count and rows as last published.
    pub fn snapshot(&self) -> ShardState {
        let state = self.lock();
        ShardState {
            drops: Vec::new(),
            ..state.clone()
        }
    }

    /// Drops since the last call.
    pub fn take_drops(&self) -> Vec<(PortId, DropReason, u64)> {
        std::mem::take(&mut self.lock().drops)
    }

    /// Asks the worker for fresh rows; true once it has given them ([`ShardView::rows_given`]).
    pub fn ask_rows(&self) {
        self.want_rows.store(true, Ordering::Release);
    }

    pub fn rows_given(&self) -> bool {
        !self.want_rows.load(Ordering::Acquire)
    }
}

/// A worker's socket NAT and its host sockets.
#[derive(Debug)]
pub(crate) struct SocketShard {
    pub nat: SocketNat,
    pub egress: Egress,
    pub view: Arc<ShardView>,
    gateway_mac: MacAddr,
    published: Option<Instant>,
}

impl SocketShard {
    pub fn new(nat: SocketNat, gateway_mac: MacAddr, view: Arc<ShardView>) -> SocketShard {
        SocketShard {
            nat,
            egress: Egress::default(),
            view,
            gateway_mac,
            published: None,
        }
    }

    /// Whether the shard takes `frame` (an untagged Ethernet frame to the gateway's MAC): an
    /// IPv4 TCP segment whose header holds, with TTL left, that [`SocketNat::takes_tcp`].
    pub fn takes(&self, frame: &[u8]) -> bool {
        let Some(packet) = frame.get(ethernet::HEADER_LEN..) else {
            return false;
        };
        let Ok(ip) = Ipv4Packet::new_checked(packet) else {
            return false;
        };
        ip.header_checksum_ok() && ip.ttl() > 1 && self.nat.takes_tcp(&packet[..ip.total_len()])
    }

    /// Hands a frame [`SocketShard::takes`] to the socket NAT.
    pub fn handle(&mut self, now: Instant, from: Peer, vnet: &VnetHdr, frame: &[u8]) {
        let packet = &frame[ethernet::HEADER_LEN..];
        let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
        if let Err(reason) = self.nat.handle_packet(now, from, &packet[..total], vnet) {
            self.record_drop(from.port, reason);
        }
    }

    pub fn record_drop(&self, port: PortId, reason: DropReason) {
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

    /// Host sockets' events, the stack, and timers; then the frames for guests, each with
    /// its Ethernet header and where it goes (`None`: a guest not heard from, dropped).
    pub fn serve(&mut self, now: Instant, registry: &Registry) {
        if self.nat.poll_timeout().is_some_and(|t| t <= now) {
            self.nat.handle_timeout(now);
        }
        self.egress.serve(now, &mut self.nat, registry);
    }

    /// The next frame for a guest, framed for it, and its port.
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

    /// Copies counters into the view every [`PUBLISH_EVERY`], and rows when asked.
    pub fn publish(&mut self, now: Instant) {
        let rows_wanted = self.view.want_rows.load(Ordering::Acquire);
        let due = self
            .published
            .is_none_or(|at| now.duration_since(at) >= PUBLISH_EVERY);
        if !due && !rows_wanted {
            return;
        }
        self.published = Some(now);
        let rows = rows_wanted.then(|| self.nat.rows(now));
        let mut state = self.view.lock();
        state.counters = self.nat.counters.clone();
        state.flows = self.nat.len();
        if let Some(rows) = rows {
            state.rows = rows;
            drop(state);
            self.view.want_rows.store(false, Ordering::Release);
        }
    }
}
