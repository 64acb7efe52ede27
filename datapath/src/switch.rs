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
        }
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
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.last_seen = now;
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
        self.entries.retain(|_, e| {
            let expires = e.last_seen + aging;
            let keep = expires > now;
            if keep {
                next = Some(next.map_or(expires, |n| n.min(expires)));
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
}
