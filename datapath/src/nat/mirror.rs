//! Established connections as the fast-path workers see them (`io::worker`).
//!
//! With `--workers N`, most of a NAT connection's packets are data packets that change
//! nothing but counters and a deadline: TCP segments without SYN, FIN or RST once the
//! handshake is done, UDP datagrams once the remote has answered. A worker translates those
//! itself, through this table; everything else (a new connection, a closing one, ICMP,
//! fragments, hairpins, a miss) it hands to the engine's thread, whose [`super::Nat`] stays
//! the one owner of every connection. The engine publishes a connection here when it has
//! seen it established and knows the next hop's MAC, and withdraws it when it starts to
//! close, expires or is evicted, so a worker never opens, closes or outlives a connection.
//!
//! Like the switch's `Mirror`, it is a cache: direct-mapped by the tuple's hash, one entry per
//! slot. A connection keeps its slot until the engine withdraws it; another that hashes to
//! the same slot meanwhile stays the engine's. A miss costs a hand-over, never a wrong
//! translation. An entry is several words, so each is a sequence lock: the engine (the one
//! writer) makes the sequence odd while it writes, and a reader that sees it odd or changed
//! takes it as a miss. Workers write only an entry's tallies: how many packets and bytes they
//! translated (added to the connection's counts when the engine lists, refreshes or
//! withdraws it) and when they last did (at most once a second), which the engine reads
//! before it lets an idle-looking connection expire and when it takes it back.

use super::Dir;
use super::packet::Tuple;
use crate::wire::MacAddr;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};
use std::time::{Duration, Instant};

/// Entries per direction: enough that a host's busy connections rarely share a slot, small
/// enough (2 MiB in all) not to matter when there are none.
const ENTRIES: usize = 1 << 14;

/// Where a worker sends a translated packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewrite {
    /// The new address and port of the end it rewrites: the source going out, the
    /// destination coming in.
    pub ip: Ipv4Addr,
    pub port: u16,
    /// Where the frame goes: the next hop going out, the guest coming in.
    pub mac: MacAddr,
    /// The guest's MAC. Going out, a frame of the connection from another MAC is the
    /// engine's (the guest changed its MAC, and the way back must change too).
    pub guest: MacAddr,
}

/// What workers did with an entry: what they translated through it since last taken, and
/// when they last did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tallies {
    pub packets: u64,
    pub bytes: u64,
    pub seen: Option<Instant>,
}

/// What [`NatMirror::publish`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The entry already said the same.
    Unchanged,
    /// The entry now says what was published (new, or changed).
    Written,
    /// Another connection holds the slot; nothing was published.
    Taken,
}

/// A slot found by [`NatMirror::lookup`], for [`NatMirror::tally`].
#[derive(Debug, Clone, Copy)]
pub struct Found {
    dir: Dir,
    index: usize,
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct Entry {
    /// Even when stable, odd while the engine writes.
    seq: AtomicU64,
    /// `src << 32 | dst`.
    addrs: AtomicU64,
    /// `1 << 63 | proto << 32 | sport << 16 | dport`; 0 when empty.
    ports: AtomicU64,
    /// `port << 48 | mac` of the [`Rewrite`].
    to: AtomicU64,
    /// The table's epoch when written (bits 48-63: an entry of an earlier epoch is a miss),
    /// and going out the guest's MAC (the new address is the external one), coming in the
    /// guest's address (its MAC is `to`'s).
    aux: AtomicU64,
    /// Seconds after the table's base, plus one, when a worker last translated through it.
    seen: AtomicU64,
    packets: AtomicU64,
    bytes: AtomicU64,
}

/// The two words a tuple packs to.
fn key(t: &Tuple) -> (u64, u64) {
    (
        u64::from(u32::from(t.src)) << 32 | u64::from(u32::from(t.dst)),
        1 << 63 | u64::from(t.proto) << 32 | u64::from(t.sport) << 16 | u64::from(t.dport),
    )
}

fn mac_bits(mac: MacAddr) -> u64 {
    let m = mac.0;
    u64::from_be_bytes([0, 0, m[0], m[1], m[2], m[3], m[4], m[5]])
}

fn mac_of(bits: u64) -> MacAddr {
    let b = bits.to_be_bytes();
    MacAddr([b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// NAT's established connections, shared with the fast-path workers.
#[derive(Debug)]
pub struct NatMirror {
    /// By the guest's tuple as sent (guest -> remote).
    out: Box<[Entry]>,
    /// By the remote's tuple as it arrives (remote -> external address).
    back: Box<[Entry]>,
    /// The address every connection leaves from.
    external: Ipv4Addr,
    /// Bumped to take every entry back at once ([`NatMirror::invalidate`]); entries carry its
    /// low 16 bits.
    epoch: AtomicU64,
    /// Entries of the way out that hold a connection (of any epoch): none means workers send
    /// to no next hop. Written by the engine only.
    held_out: AtomicUsize,
    base: Instant,
}

impl NatMirror {
    pub fn new(external: Ipv4Addr) -> NatMirror {
        NatMirror {
            out: (0..ENTRIES).map(|_| Entry::default()).collect(),
            back: (0..ENTRIES).map(|_| Entry::default()).collect(),
            external,
            epoch: AtomicU64::new(0),
            held_out: AtomicUsize::new(0),
            base: Instant::now(),
        }
    }

    /// Whether any connection's way out is published (in any epoch): workers may be sending
    /// to a next hop. Engine only.
    pub(crate) fn sends_out(&self) -> bool {
        self.held_out.load(Ordering::Relaxed) > 0
    }

    /// Counts a way-out entry taken (`+1`) or given back (`-1`).
    fn count_out(&self, dir: Dir, up: bool) {
        if dir == Dir::Out {
            let held = self.held_out.load(Ordering::Relaxed);
            let held = if up { held + 1 } else { held.saturating_sub(1) };
            self.held_out.store(held, Ordering::Relaxed);
        }
    }

    fn table(&self, dir: Dir) -> &[Entry] {
        match dir {
            Dir::Out => &self.out,
            Dir::In => &self.back,
        }
    }

    fn index(addrs: u64, ports: u64) -> usize {
        let mixed = (addrs ^ ports.rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (mixed >> 40) as usize & (ENTRIES - 1)
    }

    fn entry(&self, dir: Dir, t: &Tuple) -> (usize, &Entry, (u64, u64)) {
        let (addrs, ports) = key(t);
        let index = Self::index(addrs, ports);
        (index, &self.table(dir)[index], (addrs, ports))
    }

    fn epoch_bits(&self, ordering: Ordering) -> u64 {
        (self.epoch.load(ordering) & 0xffff) << 48
    }

    fn pack(&self, dir: Dir, r: &Rewrite) -> (u64, u64) {
        let to = u64::from(r.port) << 48 | mac_bits(r.mac);
        let epoch = self.epoch_bits(Ordering::Relaxed);
        match dir {
            Dir::Out => (to, epoch | mac_bits(r.guest)),
            Dir::In => (to, epoch | u64::from(u32::from(r.ip))),
        }
    }

    fn unpack(&self, dir: Dir, to: u64, aux: u64) -> Rewrite {
        let (port, mac) = ((to >> 48) as u16, mac_of(to));
        match dir {
            Dir::Out => Rewrite {
                ip: self.external,
                port,
                mac,
                guest: mac_of(aux & 0xffff_ffff_ffff),
            },
            Dir::In => Rewrite {
                ip: Ipv4Addr::from(aux as u32),
                port,
                mac,
                guest: mac,
            },
        }
    }

    /// The engine's write of a whole entry, under its sequence lock.
    fn write(entry: &Entry, (addrs, ports): (u64, u64), (to, aux): (u64, u64)) {
        let seq = entry.seq.load(Ordering::Relaxed);
        entry.seq.store(seq + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        entry.addrs.store(addrs, Ordering::Relaxed);
        entry.ports.store(ports, Ordering::Relaxed);
        entry.to.store(to, Ordering::Relaxed);
        entry.aux.store(aux, Ordering::Relaxed);
        entry.seq.store(seq + 2, Ordering::Release);
    }

    /// Whether the entry (read by its one writer, the engine) holds `key`.
    fn holds(entry: &Entry, (addrs, ports): (u64, u64)) -> bool {
        entry.ports.load(Ordering::Relaxed) == ports && entry.addrs.load(Ordering::Relaxed) == addrs
    }

    /// Publishes (or updates) the translation of tuple `t` arriving in direction `dir`. A
    /// slot that holds another connection keeps it (a connection keeps its slot until the
    /// engine withdraws it, so nothing workers counted or saw of it is lost). Engine only. An
    /// entry already saying the same is left alone, so publishing on every packet the engine
    /// sees costs a few loads.
    pub(crate) fn publish(&self, dir: Dir, t: &Tuple, rewrite: &Rewrite) -> Published {
        let (_, entry, key) = self.entry(dir, t);
        let value = self.pack(dir, rewrite);
        if Self::holds(entry, key) {
            if entry.to.load(Ordering::Relaxed) == value.0
                && entry.aux.load(Ordering::Relaxed) == value.1
            {
                return Published::Unchanged;
            }
            Self::write(entry, key, value);
            return Published::Written;
        }
        if entry.ports.load(Ordering::Relaxed) != 0 {
            return Published::Taken;
        }
        // A late tally of the connection that held the slot before is not this one's.
        entry.packets.store(0, Ordering::Relaxed);
        entry.bytes.store(0, Ordering::Relaxed);
        entry.seen.store(0, Ordering::Relaxed);
        Self::write(entry, key, value);
        self.count_out(dir, true);
        Published::Written
    }

    /// Whether the next [`Self::invalidate`] empties every entry (the engine takes their
    /// tallies first).
    pub(crate) fn next_invalidation_empties(&self) -> bool {
        (self.epoch.load(Ordering::Relaxed) + 1) & 0xffff == 0
    }

    /// Takes every entry back from the workers at once (a next hop's MAC changed): they miss
    /// until the engine publishes each connection again. Entries keep their tallies, which
    /// the engine still reads by key. Engine only.
    ///
    /// An entry keeps 16 bits of its epoch: once in 65,536 calls (a neighbour flapping its
    /// MAC that often), entries written that many epochs ago would match again, so before
    /// the count comes round every entry is emptied ([`Nat::withdraw_all`](super::Nat::withdraw_all)
    /// takes what workers counted and saw of each first; the engine publishes each
    /// connection again at its next packet).
    pub(crate) fn invalidate(&self) {
        if self.next_invalidation_empties() {
            for dir in [Dir::Out, Dir::In] {
                for entry in self.table(dir) {
                    if entry.ports.load(Ordering::Relaxed) != 0 {
                        Self::write(entry, (0, 0), (0, 0));
                        self.count_out(dir, false);
                    }
                }
            }
        }
        self.epoch.fetch_add(1, Ordering::Release);
    }

    /// Withdraws tuple `t`'s entry if it holds one, with what workers did with it since last
    /// taken. Engine only.
    pub(crate) fn withdraw(&self, dir: Dir, t: &Tuple) -> Tallies {
        let (_, entry, key) = self.entry(dir, t);
        if !Self::holds(entry, key) {
            return Tallies::default();
        }
        Self::write(entry, (0, 0), (0, 0));
        self.count_out(dir, false);
        self.read_tallies(entry, true)
    }

    /// What workers did with tuple `t`'s entry; the counts are taken (zeroed) when `take`.
    pub(crate) fn tallies(&self, dir: Dir, t: &Tuple, take: bool) -> Tallies {
        let (_, entry, key) = self.entry(dir, t);
        if !Self::holds(entry, key) {
            return Tallies::default();
        }
        self.read_tallies(entry, take)
    }

    fn read_tallies(&self, entry: &Entry, take: bool) -> Tallies {
        let read = |c: &AtomicU64| {
            if take {
                c.swap(0, Ordering::Relaxed)
            } else {
                c.load(Ordering::Relaxed)
            }
        };
        Tallies {
            packets: read(&entry.packets),
            bytes: read(&entry.bytes),
            seen: match entry.seen.load(Ordering::Relaxed) {
                0 => None,
                secs => Some(self.base + Duration::from_secs(secs - 1)),
            },
        }
    }

    /// The translation of tuple `t` travelling in direction `dir`, if published. Workers.
    pub fn lookup(&self, dir: Dir, t: &Tuple) -> Option<(Rewrite, Found)> {
        let (index, entry, (addrs, ports)) = self.entry(dir, t);
        let seq = entry.seq.load(Ordering::Acquire);
        if seq & 1 != 0 {
            return None;
        }
        let found = (
            entry.addrs.load(Ordering::Relaxed),
            entry.ports.load(Ordering::Relaxed),
        );
        let (to, aux) = (
            entry.to.load(Ordering::Relaxed),
            entry.aux.load(Ordering::Relaxed),
        );
        fence(Ordering::Acquire);
        if entry.seq.load(Ordering::Relaxed) != seq
            || found != (addrs, ports)
            || aux & 0xffff << 48 != self.epoch_bits(Ordering::Acquire)
        {
            return None;
        }
        Some((self.unpack(dir, to, aux), Found { dir, index }))
    }

    /// Counts a packet of `len` bytes a worker translated through `found`.
    pub fn tally(&self, now: Instant, found: Found, len: usize) {
        let entry = &self.table(found.dir)[found.index];
        entry.packets.fetch_add(1, Ordering::Relaxed);
        entry.bytes.fetch_add(len as u64, Ordering::Relaxed);
        let secs = now.saturating_duration_since(self.base).as_secs() + 1;
        // Once a second at most; never backwards (two workers, two clocks read apart).
        if entry.seen.load(Ordering::Relaxed) < secs {
            entry.seen.fetch_max(secs, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ipv4::PROTO_TCP;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    const EXTERNAL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

    fn tuple(sport: u16) -> Tuple {
        Tuple {
            proto: PROTO_TCP,
            src: Ipv4Addr::new(192, 168, 122, 10),
            sport,
            dst: Ipv4Addr::new(203, 0, 113, 5),
            dport: 80,
        }
    }

    /// A rewrite whose every word depends on `port`, so a torn read would show.
    fn rewrite(port: u16) -> Rewrite {
        let [hi, lo] = port.to_be_bytes();
        Rewrite {
            ip: EXTERNAL,
            port,
            mac: MacAddr([2, 0, 0, 0, hi, lo]),
            guest: MacAddr([0x52, 0x54, 0, 0, hi, lo]),
        }
    }

    #[test]
    fn publish_lookup_withdraw_per_direction() {
        let m = NatMirror::new(EXTERNAL);
        let t = tuple(40000);
        assert!(m.lookup(Dir::Out, &t).is_none());
        assert!(!m.sends_out());
        assert_eq!(m.publish(Dir::Out, &t, &rewrite(1024)), Published::Written);
        assert_eq!(
            m.publish(Dir::Out, &t, &rewrite(1024)),
            Published::Unchanged
        );
        assert!(m.sends_out(), "workers send it out");
        let (r, found) = m.lookup(Dir::Out, &t).expect("published");
        assert_eq!(r, rewrite(1024));
        assert!(m.lookup(Dir::In, &t).is_none(), "directions are apart");
        assert!(m.lookup(Dir::Out, &tuple(40001)).is_none());
        let now = Instant::now();
        m.tally(now, found, 100);
        m.tally(now, found, 50);
        let tallies = m.tallies(Dir::Out, &t, false);
        assert_eq!((tallies.packets, tallies.bytes), (2, 150));
        assert!(tallies.seen.is_some_and(|s| s <= now));
        let withdrawn = m.withdraw(Dir::Out, &t);
        assert_eq!((withdrawn.packets, withdrawn.bytes), (2, 150));
        assert_eq!(
            withdrawn.seen, tallies.seen,
            "when workers last saw it comes back too"
        );
        assert!(m.lookup(Dir::Out, &t).is_none());
        assert_eq!(m.withdraw(Dir::Out, &t), Tallies::default());
        assert!(!m.sends_out(), "its next hop is nobody's now");

        let inward = Rewrite {
            ip: Ipv4Addr::new(192, 168, 122, 10),
            port: 40000,
            mac: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
            guest: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
        };
        assert_eq!(m.publish(Dir::In, &t, &inward), Published::Written);
        assert_eq!(m.lookup(Dir::In, &t).unwrap().0, inward);
        assert!(!m.sends_out(), "the way in sends to no next hop");

        // Taken back all at once: a miss, tallies kept, until published again.
        let (_, found) = m.lookup(Dir::In, &t).unwrap();
        m.tally(now, found, 60);
        m.invalidate();
        assert!(m.lookup(Dir::In, &t).is_none());
        assert_eq!(m.tallies(Dir::In, &t, false).packets, 1);
        assert_eq!(
            m.publish(Dir::In, &t, &inward),
            Published::Written,
            "a new epoch"
        );
        assert_eq!(m.lookup(Dir::In, &t).unwrap().0, inward);
        assert_eq!(
            m.tallies(Dir::In, &t, false).packets,
            1,
            "the same connection's"
        );
    }

    /// 65,536 invalidations bring an entry's 16 epoch bits round: it must not match again.
    #[test]
    fn an_entry_stays_a_miss_however_many_epochs_pass() {
        let m = NatMirror::new(EXTERNAL);
        let t = tuple(40000);
        let outward = Rewrite {
            ip: EXTERNAL,
            port: 40000,
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            guest: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
        };
        assert_eq!(m.publish(Dir::Out, &t, &outward), Published::Written);
        for _ in 0..0x1_0000 {
            m.invalidate();
            assert!(m.lookup(Dir::Out, &t).is_none());
        }
        assert!(!m.sends_out(), "emptied on the way round");
        assert_eq!(m.publish(Dir::Out, &t, &outward), Published::Written);
        assert_eq!(m.lookup(Dir::Out, &t).unwrap().0, outward);
    }

    #[test]
    fn a_colliding_connection_waits_for_the_slot() {
        let m = NatMirror::new(EXTERNAL);
        let first = tuple(40000);
        let (index, _, _) = m.entry(Dir::Out, &first);
        let other = (1..=u16::MAX)
            .map(tuple)
            .find(|t| t.sport != 40000 && m.entry(Dir::Out, t).0 == index)
            .expect("some port shares the slot");
        assert_eq!(
            m.publish(Dir::Out, &first, &rewrite(1024)),
            Published::Written
        );
        let (_, found) = m.lookup(Dir::Out, &first).unwrap();
        m.tally(Instant::now(), found, 10);
        assert_eq!(
            m.publish(Dir::Out, &other, &rewrite(1025)),
            Published::Taken,
            "the slot is taken"
        );
        assert!(m.lookup(Dir::Out, &other).is_none());
        assert_eq!(
            m.tallies(Dir::Out, &first, false).packets,
            1,
            "first keeps its counts"
        );
        m.withdraw(Dir::Out, &first);
        assert_eq!(
            m.publish(Dir::Out, &other, &rewrite(1025)),
            Published::Written
        );
        assert_eq!(m.tallies(Dir::Out, &other, false), Tallies::default());
    }

    /// A reader racing the writer sees an entry whole, never half of two (the sequence lock).
    #[test]
    fn readers_never_see_a_torn_entry() {
        let m = Arc::new(NatMirror::new(EXTERNAL));
        let t = tuple(40000);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (m, stop) = (m.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut hits = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if let Some((r, _)) = m.lookup(Dir::Out, &t) {
                        assert!(r == rewrite(1024) || r == rewrite(2048), "torn: {r:?}");
                        hits += 1;
                    }
                }
                hits
            })
        };
        for i in 0..200_000u32 {
            let port = if i % 2 == 0 { 1024 } else { 2048 };
            m.publish(Dir::Out, &t, &rewrite(port));
            if i % 1000 == 999 {
                m.withdraw(Dir::Out, &t);
            }
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    }
}
