//! The connection table's index: which flow a packet's tuple belongs to, in which direction.
//!
//! Issue 10 asks for a million concurrent connections in 200 MB, and every connection has two
//! keys (the guest's packets as sent, the remote's as they arrive). A general hash map would
//! store each key beside its value, twice per connection, in buckets sized for its own load
//! factor: that was more than half the table's memory. Here a slot is one `u32` naming the flow
//! record and the direction; the key itself is read back from the record (which holds both
//! tuples' fields once). A connection's two entries take 8 bytes, and the table keeps at least
//! as many slots free as taken (sizes are powers of two), so 16 to 32 bytes per connection.
//!
//! Open addressing with linear probing: a lookup reads consecutive slots, usually in one cache
//! line. The bits of a slot the flow number does not need hold a few bits of the key's hash, so
//! a probe past a colliding slot rarely has to read the record it names. Deletion shifts the
//! rest of the probe run back (no tombstones), so lookups never slow down as connections come
//! and go. Keys are hashed with a per-table random seed (ahash), because remote hosts choose
//! half of every key.

use ahash::RandomState;

/// A flow record's number and a direction, packed as `number * 2 + direction`.
pub type FlowRef = u32;

/// The most flow records an index can name: every `FlowRef + 1` must fit in a slot's 32 bits.
pub const MAX_RECORDS: usize = (1 << 31) - 1;

/// A key and its hash, computed once per packet and used for every probe.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub key: u128,
    hash: u64,
}

#[derive(Debug)]
pub struct Index {
    /// `0` is an empty slot; otherwise `tag | (FlowRef + 1)`.
    slots: Vec<u32>,
    mask: usize,
    /// The low bits of a slot hold `FlowRef + 1`; the others hold the hash tag.
    ref_mask: u32,
    len: usize,
    hasher: RandomState,
}

/// Slots per entry at most: linear probing stays short (about 1.5 probes for a hit, 2.5 for a
/// miss) while at most half the slots are taken.
const MAX_LOAD_INVERSE: usize = 2;

impl Index {
    /// An index for references below `2 * max_records` (at most [`MAX_RECORDS`]), with room
    /// for `expected` entries before it grows.
    pub fn new(max_records: usize, expected: usize) -> Index {
        let highest = (max_records.min(MAX_RECORDS) as u64 * 2).max(1);
        let ref_bits = 64 - highest.leading_zeros();
        let ref_mask = u32::try_from((1u64 << ref_bits) - 1).unwrap_or(u32::MAX);
        let size = (expected.max(1) * MAX_LOAD_INVERSE).next_power_of_two();
        Index {
            // Zeroed memory is mapped lazily: untouched parts cost no resident memory.
            slots: vec![0; size],
            mask: size - 1,
            ref_mask,
            len: 0,
            hasher: RandomState::new(),
        }
    }

    pub fn probe(&self, key: u128) -> Probe {
        Probe {
            key,
            hash: self.hasher.hash_one(key),
        }
    }

    fn tag(&self, hash: u64) -> u32 {
        (hash >> 32) as u32 & !self.ref_mask
    }

    /// The first entry for `probe.key` that `matches` (given its reference) accepts; `matches`
    /// is asked only about entries whose hash tag agrees, and must compare the key.
    pub fn find(&self, probe: &Probe, mut matches: impl FnMut(FlowRef) -> bool) -> Option<FlowRef> {
        let tag = self.tag(probe.hash);
        let mut at = probe.hash as usize & self.mask;
        loop {
            let slot = self.slots[at];
            if slot == 0 {
                return None;
            }
            if slot & !self.ref_mask == tag {
                let r = (slot & self.ref_mask) - 1;
                if matches(r) {
                    return Some(r);
                }
            }
            at = (at + 1) & self.mask;
        }
    }

    /// Adds `r` under `probe.key`. `key_of` gives the key of any reference already in the
    /// index (needed when the index grows and has to place every entry again).
    pub fn insert(&mut self, probe: &Probe, r: FlowRef, key_of: impl Fn(FlowRef) -> u128) {
        if (self.len + 1) * MAX_LOAD_INVERSE > self.slots.len() {
            self.grow(&key_of);
        }
        self.place(probe.hash, r);
        self.len += 1;
    }

    fn place(&mut self, hash: u64, r: FlowRef) {
        debug_assert!(r < self.ref_mask, "reference {r} out of range");
        let slot = self.tag(hash) | (r + 1);
        let mut at = hash as usize & self.mask;
        while self.slots[at] != 0 {
            at = (at + 1) & self.mask;
        }
        self.slots[at] = slot;
    }

    fn grow(&mut self, key_of: &impl Fn(FlowRef) -> u128) {
        let size = self.slots.len() * 2;
        let old = std::mem::replace(&mut self.slots, vec![0; size]);
        self.mask = size - 1;
        for slot in old.into_iter().filter(|&s| s != 0) {
            let r = (slot & self.ref_mask) - 1;
            let hash = self.hasher.hash_one(key_of(r));
            self.place(hash, r);
        }
    }

    /// Removes the entry `r` filed under `probe.key`, if there is one. `key_of` gives the key
    /// of any reference in the index: the entries after it in its probe run move back to
    /// where their own probes will find them.
    pub fn remove(&mut self, probe: &Probe, r: FlowRef, key_of: impl Fn(FlowRef) -> u128) {
        let wanted = self.tag(probe.hash) | (r + 1);
        let mut hole = probe.hash as usize & self.mask;
        loop {
            match self.slots[hole] {
                0 => return,
                slot if slot == wanted => break,
                _ => hole = (hole + 1) & self.mask,
            }
        }
        self.len -= 1;
        let mut at = hole;
        loop {
            at = (at + 1) & self.mask;
            let slot = self.slots[at];
            if slot == 0 {
                break;
            }
            let home = self.hasher.hash_one(key_of((slot & self.ref_mask) - 1)) as usize;
            // The entry may fill the hole if its probe starts at or before the hole (in the
            // run's cyclic order): then its probe still passes through its new place.
            if at.wrapping_sub(home) & self.mask >= at.wrapping_sub(hole) & self.mask {
                self.slots[hole] = slot;
                hole = at;
            }
        }
        self.slots[hole] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Random insertions and removals against a plain map, in a table small enough to grow
    /// several times and to wrap its probe runs around the end, with a key space small enough
    /// that many keys share a home slot.
    #[test]
    fn agrees_with_a_map_through_growth_and_removals() {
        let mut index = Index::new(1024, 4);
        // keys[r] is the key reference r is filed under, while it is in the index.
        let mut keys: Vec<Option<u128>> = vec![None; 2048];
        let mut model: HashMap<u128, FlowRef> = HashMap::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..200_000 {
            let key = u128::from(next() % 3000);
            let probe = index.probe(key);
            let key_of = |r: FlowRef| keys[r as usize].unwrap_or(u128::MAX);
            let found = index.find(&probe, |r| key_of(r) == key);
            assert_eq!(found, model.get(&key).copied(), "round {round}");
            match found {
                Some(r) => {
                    index.remove(&probe, r, key_of);
                    keys[r as usize] = None;
                    model.remove(&key);
                }
                None if model.len() < 1500 => {
                    let r = (0..2048u32).find(|&r| keys[r as usize].is_none()).unwrap();
                    keys[r as usize] = Some(key);
                    let key_of = |r: FlowRef| keys[r as usize].unwrap_or(u128::MAX);
                    index.insert(&probe, r, key_of);
                    model.insert(key, r);
                }
                None => {}
            }
            assert_eq!(index.len, model.len());
        }
        for (key, r) in &model {
            let probe = index.probe(*key);
            let found = index.find(&probe, |s| keys[s as usize] == Some(*key));
            assert_eq!(found, Some(*r));
        }
    }

    /// Without spare bits for a hash tag (the largest tables), every probe reads the key.
    #[test]
    fn works_without_tag_bits() {
        let mut index = Index::new(MAX_RECORDS, 2);
        assert_eq!(index.ref_mask, u32::MAX);
        let keys = [7u128, 8, 9];
        let key_of = |r: FlowRef| keys[r as usize];
        for (r, key) in keys.iter().enumerate() {
            index.insert(&index.probe(*key), r as FlowRef, key_of);
        }
        for (r, key) in keys.iter().enumerate() {
            let found = index.find(&index.probe(*key), |s| key_of(s) == *key);
            assert_eq!(found, Some(r as FlowRef));
        }
        index.remove(&index.probe(8), 1, key_of);
        assert_eq!(index.find(&index.probe(8), |s| key_of(s) == 8), None);
        assert_eq!(index.find(&index.probe(9), |s| key_of(s) == 9), Some(2));
    }
}
