//! The learning switch: a forwarding database keyed by (MAC, VLAN id), as IEEE 802.1Q 8.8
//! describes and the Linux bridge implements.
//!
//! Learning happens on every valid frame, so lookups and refreshes must not allocate: the
//! table is sized for its cap up front, and a full table stops learning (the frame is still
//! flooded, and counted) rather than growing or evicting, so a guest flooding random source
//! MACs costs a counter, not memory or other guests' entries.

use crate::port::PortId;
use crate::wire::MacAddr;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Default FDB aging time, as the Linux bridge (`ageing_time` 300 s, IEEE 802.1Q 8.8.3).
pub const DEFAULT_AGING: Duration = Duration::from_secs(300);
/// Default FDB size cap.
pub const DEFAULT_CAPACITY: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    mac: MacAddr,
    vlan: u16,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    port: PortId,
    last_seen: Instant,
}

/// What learning a source address did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// Already known on this port; its age was refreshed.
    Refreshed,
    /// A new entry.
    New,
    /// Known on another port: the station moved (or a loop exists); the entry now points here.
    Moved { from: PortId },
    /// The table is at its cap: not learned.
    TableFull,
}

/// FDB event counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FdbCounters {
    pub learned: u64,
    pub moved: u64,
    pub aged: u64,
    pub full: u64,
}

/// One row of `switchyard fdb`, like `bridge fdb show` / `brctl showmacs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FdbRow {
    pub mac: String,
    pub vlan: u16,
    pub port: PortId,
    pub age_ms: u64,
}

/// The forwarding database.
#[derive(Debug)]
pub struct Fdb {
    entries: HashMap<Key, Entry, ahash::RandomState>,
    capacity: usize,
    aging: Duration,
    next_expiry: Option<Instant>,
    pub counters: FdbCounters,
    /// What the other workers read ([`Mirror`]), when there are any.
    mirror: Option<Arc<Mirror>>,
}

impl Fdb {
    pub fn new(capacity: usize, aging: Duration) -> Fdb {
        Fdb {
            // Preallocated: inserting up to `capacity` entries never reallocates, so
            // learning on the forwarding path does not allocate.
            entries: HashMap::with_capacity_and_hasher(capacity, ahash::RandomState::new()),
            capacity,
            aging,
            next_expiry: None,
            counters: FdbCounters::default(),
            mirror: None,
        }
    }

    /// The table's mirror for other threads, made on first use with what is learned so far.
    pub fn mirror(&mut self, max_ports: usize) -> Arc<Mirror> {
        let capacity = self.capacity;
        let mirror = self
            .mirror
            .get_or_insert_with(|| Arc::new(Mirror::new(capacity, max_ports)))
            .clone();
        for (key, entry) in &self.entries {
            if key.vlan == 0 {
                mirror.publish(key.mac, entry.port);
            }
        }
        mirror
    }

    /// The mirror, if [`Fdb::mirror`] made one.
    pub fn mirrored(&self) -> Option<&Arc<Mirror>> {
        self.mirror.as_ref()
    }

    /// The most entries the table holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn aging(&self) -> Duration {
        self.aging
    }

    /// Records that `mac` on `vlan` was seen as a source on `port` at `now`.
    pub fn learn(&mut self, now: Instant, mac: MacAddr, vlan: u16, port: PortId) -> Learned {
        let key = Key { mac, vlan };
        let mirror = self.mirror.as_deref().filter(|_| vlan == 0);
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.last_seen = now;
            if let Some(mirror) = mirror {
                mirror.publish(mac, port);
            }
            if entry.port == port {
                return Learned::Refreshed;
            }
            let from = entry.port;
            entry.port = port;
            self.counters.moved += 1;
            return Learned::Moved { from };
        }
        if self.entries.len() >= self.capacity {
            self.counters.full += 1;
            return Learned::TableFull;
        }
        if let Some(mirror) = mirror {
            mirror.publish(mac, port);
        }
        self.entries.insert(
            key,
            Entry {
                port,
                last_seen: now,
            },
        );
        self.counters.learned += 1;
        if self.next_expiry.is_none() {
            self.next_expiry = Some(now + self.aging);
        }
        Learned::New
    }

    /// The port `mac` was last seen on, if that was less than the aging time ago.
    pub fn lookup(&self, now: Instant, mac: MacAddr, vlan: u16) -> Option<PortId> {
        let entry = self.entries.get(&Key { mac, vlan })?;
        (now.saturating_duration_since(entry.last_seen) < self.aging).then_some(entry.port)
    }

    /// When [`Fdb::expire`] next has something to do.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.next_expiry
    }

    /// Removes entries not seen for the aging time; returns how many went.
    pub fn expire(&mut self, now: Instant) -> usize {
        let aging = self.aging;
        let before = self.entries.len();
        let mut next: Option<Instant> = None;
        let mirror = self.mirror.as_deref();
        self.entries.retain(|key, e| {
            // Frames the other workers forward never reach this table: their sightings
            // are in the mirror.
            if let Some(seen) = mirror
                .filter(|_| key.vlan == 0)
                .and_then(|m| m.last_seen(key.mac, e.port))
            {
                e.last_seen = e.last_seen.max(seen);
            }
            let expires = e.last_seen + aging;
            let keep = expires > now;
            if keep {
                next = Some(next.map_or(expires, |n| n.min(expires)));
            } else if let Some(m) = mirror.filter(|_| key.vlan == 0) {
                m.forget(key.mac);
            }
            keep
        });
        self.next_expiry = next;
        let aged = before - self.entries.len();
        self.counters.aged += aged as u64;
        aged
    }

    /// Forgets every address learned on `port` (the port went away).
    pub fn flush_port(&mut self, port: PortId) {
        self.entries.retain(|_, e| e.port != port);
        if let Some(mirror) = &self.mirror {
            mirror.flush_port(port);
        }
    }

    /// The table, sorted by port then MAC.
    pub fn rows(&self, now: Instant) -> Vec<FdbRow> {
        let mut rows: Vec<FdbRow> = self
            .entries
            .iter()
            .map(|(k, e)| FdbRow {
                mac: k.mac.to_string(),
                vlan: k.vlan,
                port: e.port,
                age_ms: now.saturating_duration_since(e.last_seen).as_millis() as u64,
            })
            .collect();
        rows.sort_by(|a, b| (a.port, &a.mac, a.vlan).cmp(&(b.port, &b.mac, b.vlan)));
        rows
    }
}

/// The forwarding database as other threads see it: the fast-path workers of multi-queue
/// taps (`io::worker`) forward a guest's unicast frame to another tap without the engine
/// when both of its addresses are here.
///
/// Only the engine's thread writes; readers take no lock. Each slot is one atomic word (MAC
/// and port), so a reader sees an entry whole or not at all. It is a cache, direct-mapped:
/// two MACs in one slot evict each other, and a MAC that is not here sends the frame to the
/// engine, which has the whole table. A miss costs a hand-over, never a wrong port; stale
/// entries are cleared before their port is closed. Only VLAN 0 (untagged) is mirrored.
#[derive(Debug)]
pub struct Mirror {
    /// `mac << 16 | (port + 1)`; 0 is empty.
    slots: Box<[AtomicU64]>,
    /// When a worker last forwarded a frame from the slot's MAC, in seconds after `base`.
    seen: Box<[AtomicU32]>,
    /// Whether frames from a port may take the fast path (a switch port without clean-traffic).
    fast_ingress: Box<[AtomicBool]>,
    /// Each port id's generation, bumped when a port is added under the id and when it is
    /// removed: a worker's queue, and a frame it handed over, belong to the generation they
    /// were opened or read under, so a reused id never mixes two guests.
    generations: Box<[AtomicU32]>,
    /// Captures or a trace are running: every frame must pass through the engine.
    observed: AtomicBool,
    /// A capture runs on the port (the last one: on the gateway): the frames workers handle
    /// without the engine and that the capture would see are copied to it.
    captured: Box<[AtomicBool]>,
    /// A trace runs: the frames workers' socket NATs take are copied to the engine for it.
    traced: AtomicBool,
    base: Instant,
    mask: usize,
}

/// Flags workers read for every frame are written only when they change, so that their cache
/// line is not taken from the workers every turn.
fn store_if_changed(flag: &AtomicBool, on: bool) {
    if flag.load(Ordering::Relaxed) != on {
        flag.store(on, Ordering::Relaxed);
    }
}

impl Mirror {
    fn new(capacity: usize, max_ports: usize) -> Mirror {
        let len = (capacity.max(64) * 2).next_power_of_two();
        Mirror {
            slots: (0..len).map(|_| AtomicU64::new(0)).collect(),
            seen: (0..len).map(|_| AtomicU32::new(0)).collect(),
            fast_ingress: (0..max_ports).map(|_| AtomicBool::new(false)).collect(),
            generations: (0..max_ports).map(|_| AtomicU32::new(0)).collect(),
            observed: AtomicBool::new(false),
            traced: AtomicBool::new(false),
            captured: (0..=max_ports).map(|_| AtomicBool::new(false)).collect(),
            base: Instant::now(),
            mask: len - 1,
        }
    }

    fn index(&self, mac: MacAddr) -> usize {
        // The low bytes of a MAC vary most (OUI first); a multiplicative mix spreads them.
        (mac_bits(mac).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize & self.mask
    }

    fn publish(&self, mac: MacAddr, port: PortId) {
        let word = (mac_bits(mac) << 16) | (port.0 as u64 + 1);
        let index = self.index(mac);
        let slot = &self.slots[index];
        let was = slot.load(Ordering::Relaxed);
        if was != word {
            if was >> 16 != mac_bits(mac) {
                // Another station's sightings are not this one's.
                self.seen[index].store(0, Ordering::Relaxed);
            }
            slot.store(word, Ordering::Release);
        }
    }

    fn forget(&self, mac: MacAddr) {
        let slot = &self.slots[self.index(mac)];
        if slot.load(Ordering::Relaxed) >> 16 == mac_bits(mac) {
            slot.store(0, Ordering::Release);
        }
    }

    fn flush_port(&self, port: PortId) {
        for slot in &self.slots {
            let word = slot.load(Ordering::Relaxed);
            if word != 0 && word & 0xffff == port.0 as u64 + 1 {
                slot.store(0, Ordering::Release);
            }
        }
    }

    fn last_seen(&self, mac: MacAddr, port: PortId) -> Option<Instant> {
        let index = self.index(mac);
        let word = (mac_bits(mac) << 16) | (port.0 as u64 + 1);
        if self.slots[index].load(Ordering::Acquire) != word {
            return None;
        }
        match self.seen[index].load(Ordering::Relaxed) {
            0 => None,
            secs => Some(self.base + Duration::from_secs(u64::from(secs))),
        }
    }

    /// The port `mac` is on, if mirrored.
    pub fn lookup(&self, mac: MacAddr) -> Option<PortId> {
        let word = self.slots[self.index(mac)].load(Ordering::Acquire);
        (word != 0 && word >> 16 == mac_bits(mac)).then(|| PortId((word & 0xffff) as u16 - 1))
    }

    /// Notes a frame from `mac` (which [`Mirror::lookup`] found), so its entry does not age
    /// out while only workers see it. Written at most once a second per MAC.
    pub fn note_seen(&self, now: Instant, mac: MacAddr) {
        let secs = now.saturating_duration_since(self.base).as_secs() as u32 + 1;
        let index = self.index(mac);
        let seen = &self.seen[index];
        if seen.load(Ordering::Relaxed) != secs
            && self.slots[index].load(Ordering::Relaxed) >> 16 == mac_bits(mac)
        {
            seen.store(secs, Ordering::Relaxed);
        }
    }

    /// Starts a new generation of port id `port` (added, or removed): what workers opened or
    /// read under the previous one no longer counts.
    pub fn next_generation(&self, port: PortId) -> u32 {
        self.generations
            .get(port.0 as usize)
            .map_or(0, |g| g.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// The current generation of port id `port`.
    pub fn generation(&self, port: PortId) -> u32 {
        self.generations
            .get(port.0 as usize)
            .map_or(u32::MAX, |g| g.load(Ordering::Acquire))
    }

    pub fn set_fast_ingress(&self, port: PortId, on: bool) {
        if let Some(flag) = self.fast_ingress.get(port.0 as usize) {
            flag.store(on, Ordering::Relaxed);
        }
    }

    pub fn fast_ingress(&self, port: PortId) -> bool {
        self.fast_ingress
            .get(port.0 as usize)
            .is_some_and(|f| f.load(Ordering::Relaxed))
    }

    /// Marks `port`'s capture (`None`: the gateway's) as running or not.
    pub fn set_captured(&self, port: Option<PortId>, on: bool) {
        let index = port.map_or(self.captured.len() - 1, |p| p.0 as usize);
        if let Some(flag) = self.captured.get(index) {
            flag.store(on, Ordering::Relaxed);
        }
    }

    /// Whether a capture would see what the gateway exchanges with `port`: the port's own,
    /// or the gateway's.
    pub fn captured(&self, port: PortId) -> bool {
        let gateway = self
            .captured
            .last()
            .is_some_and(|f| f.load(Ordering::Relaxed));
        gateway
            || (self.captured)
                .get(port.0 as usize)
                .is_some_and(|f| f.load(Ordering::Relaxed))
    }

    /// Called every turn: written only when it changes, as workers read it for every frame.
    pub fn set_observed(&self, on: bool) {
        store_if_changed(&self.observed, on);
    }

    pub fn observed(&self) -> bool {
        self.observed.load(Ordering::Relaxed)
    }

    /// Marks a trace as running or not: workers copy the frames their socket NAT takes to the
    /// engine for it. Called every turn, written only when it changes.
    pub fn set_traced(&self, on: bool) {
        store_if_changed(&self.traced, on);
    }

    pub fn traced(&self) -> bool {
        self.traced.load(Ordering::Relaxed)
    }
}

fn mac_bits(mac: MacAddr) -> u64 {
    let m = mac.0;
    u64::from_be_bytes([0, 0, m[0], m[1], m[2], m[3], m[4], m[5]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(last: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, last])
    }

    // IEEE 802.1Q 8.8.3: a dynamic entry is removed after the ageing time without refresh.
    #[test]
    fn entries_age_out_after_aging_time_and_refresh_extends_them() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(16, Duration::from_secs(300));
        assert_eq!(fdb.learn(t0, mac(1), 0, PortId(0)), Learned::New);
        assert_eq!(fdb.learn(t0, mac(2), 0, PortId(1)), Learned::New);
        assert_eq!(fdb.next_expiry(), Some(t0 + Duration::from_secs(300)));

        let t1 = t0 + Duration::from_secs(200);
        assert_eq!(fdb.learn(t1, mac(2), 0, PortId(1)), Learned::Refreshed);

        let t2 = t0 + Duration::from_secs(300);
        assert_eq!(
            fdb.lookup(t2, mac(1), 0),
            None,
            "stale entries are not used"
        );
        assert_eq!(fdb.expire(t2), 1);
        assert_eq!(fdb.lookup(t2, mac(2), 0), Some(PortId(1)));
        assert_eq!(fdb.next_expiry(), Some(t1 + Duration::from_secs(300)));

        assert_eq!(fdb.expire(t1 + Duration::from_secs(300)), 1);
        assert!(fdb.is_empty());
        assert_eq!(fdb.next_expiry(), None);
        assert_eq!(fdb.counters.aged, 2);
    }

    #[test]
    fn a_station_that_moves_is_followed() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(16, DEFAULT_AGING);
        fdb.learn(t0, mac(1), 0, PortId(0));
        assert_eq!(
            fdb.learn(t0, mac(1), 0, PortId(3)),
            Learned::Moved { from: PortId(0) }
        );
        assert_eq!(fdb.lookup(t0, mac(1), 0), Some(PortId(3)));
        assert_eq!(fdb.counters.moved, 1);
    }

    // IEEE 802.1Q 8.8: independent VLAN learning, the same MAC is distinct per VLAN.
    #[test]
    fn same_mac_on_two_vlans_is_two_entries() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(16, DEFAULT_AGING);
        fdb.learn(t0, mac(1), 10, PortId(0));
        fdb.learn(t0, mac(1), 20, PortId(1));
        assert_eq!(fdb.lookup(t0, mac(1), 10), Some(PortId(0)));
        assert_eq!(fdb.lookup(t0, mac(1), 20), Some(PortId(1)));
        assert_eq!(fdb.lookup(t0, mac(1), 0), None);
    }

    #[test]
    fn a_full_table_stops_learning_but_keeps_refreshing() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(2, DEFAULT_AGING);
        fdb.learn(t0, mac(1), 0, PortId(0));
        fdb.learn(t0, mac(2), 0, PortId(0));
        assert_eq!(fdb.learn(t0, mac(3), 0, PortId(0)), Learned::TableFull);
        assert_eq!(
            fdb.learn(t0, mac(1), 0, PortId(1)),
            Learned::Moved { from: PortId(0) }
        );
        assert_eq!(fdb.len(), 2);
        assert_eq!(fdb.counters.full, 1);
    }

    #[test]
    fn flushing_a_port_forgets_only_its_entries() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(16, DEFAULT_AGING);
        fdb.learn(t0, mac(1), 0, PortId(0));
        fdb.learn(t0, mac(2), 0, PortId(1));
        fdb.flush_port(PortId(0));
        assert_eq!(fdb.lookup(t0, mac(1), 0), None);
        assert_eq!(fdb.lookup(t0, mac(2), 0), Some(PortId(1)));
        let rows = fdb.rows(t0);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].mac, "52:54:00:00:00:02");
    }

    #[test]
    fn the_mirror_follows_learning_moves_aging_and_flushes() {
        let t0 = Instant::now();
        let mut fdb = Fdb::new(16, Duration::from_secs(300));
        fdb.learn(t0, mac(1), 0, PortId(0));
        let mirror = fdb.mirror(8);
        assert_eq!(
            mirror.lookup(mac(1)),
            Some(PortId(0)),
            "what was learned before"
        );
        fdb.learn(t0, mac(2), 0, PortId(1));
        fdb.learn(t0, mac(3), 7, PortId(1));
        assert_eq!(mirror.lookup(mac(2)), Some(PortId(1)));
        assert_eq!(
            mirror.lookup(mac(3)),
            None,
            "tagged frames are the engine's"
        );
        fdb.learn(t0, mac(2), 0, PortId(2));
        assert_eq!(mirror.lookup(mac(2)), Some(PortId(2)), "a move");

        // A worker forwarding mac(1)'s frames keeps its entry alive past the aging time.
        mirror.note_seen(t0 + Duration::from_secs(200), mac(1));
        fdb.expire(t0 + Duration::from_secs(301));
        assert_eq!(mirror.lookup(mac(1)), Some(PortId(0)));
        assert_eq!(mirror.lookup(mac(2)), None, "aged out of both");
        assert_eq!(
            fdb.lookup(t0 + Duration::from_secs(301), mac(1), 0),
            Some(PortId(0))
        );

        fdb.flush_port(PortId(0));
        assert_eq!(mirror.lookup(mac(1)), None);
    }

    #[test]
    fn a_mirror_slot_taken_by_another_mac_is_a_miss_not_a_wrong_port() {
        let mut fdb = Fdb::new(16, DEFAULT_AGING);
        let mirror = fdb.mirror(8);
        let t0 = Instant::now();
        let first = mac(1);
        let rival = (2..=255)
            .flat_map(|a| (0..=255).map(move |b| MacAddr([0x52, 0x54, 0, 0, a, b])))
            .find(|m| mirror.index(*m) == mirror.index(first))
            .expect("a colliding MAC");
        fdb.learn(t0, first, 0, PortId(1));
        mirror.note_seen(t0 + Duration::from_secs(100), first);
        fdb.learn(t0, rival, 0, PortId(2));
        mirror.note_seen(t0 + Duration::from_secs(200), first);
        assert_eq!(
            mirror.last_seen(rival, PortId(2)),
            None,
            "the slot's sightings were the other MAC's"
        );
        assert_eq!(mirror.lookup(first), None);
        assert_eq!(mirror.lookup(rival), Some(PortId(2)));
        assert_eq!(
            fdb.lookup(t0, first, 0),
            Some(PortId(1)),
            "the engine still knows"
        );
    }
}
