//! Which connections a cap may take, oldest first: the candidates of packet NAT's and socket
//! NAT's `early_drop`.
//!
//! Why two queues: a cap on the whole table may take anyone's connection, a guest's cap only
//! that guest's. With one queue for both, the guest's scan would skip other guests' entries,
//! and 64 long-lived connections of another guest ahead of its own would leave it refused.
//! So every candidate is filed twice, in arrival order: in the table's queue and in its
//! guest's. Either copy may outlive its connection; a (slot, generation) that no longer
//! names a live connection is stale and dropped when reached, and the owner judges the rest.
//! Both queues are bounded: when one is full its oldest entry goes (that connection can then
//! only be taken through the other queue, or not at all: a cap refuses rather than scan
//! without bound).

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;

/// How many live candidates one scan judges at most.
pub const SCAN: usize = 64;
/// How many stale entries one scan drops at most besides (bounded work per packet).
pub const STALE_SCAN: usize = 4 * SCAN;

/// A candidate: a connection's slot and the generation it had when filed.
pub type Candidate = (u32, u32);

#[derive(Debug)]
pub struct Candidates {
    all: VecDeque<Candidate>,
    by_guest: HashMap<Ipv4Addr, VecDeque<Candidate>, ahash::RandomState>,
    /// Entries kept at most in the table's queue, and in each guest's.
    capacity: usize,
    per_guest: usize,
}

/// The owner's verdict on a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Its connection is gone or reused: the entry goes.
    Stale,
    /// Live and not to be taken now (assured and open): the entry goes (the connection is
    /// filed again when it closes).
    Keep,
    /// Taken.
    Evicted,
}

impl Candidates {
    /// Queues for a table of `flows` connections, `per_guest` for each guest: each
    /// connection may be filed twice (made, closed), so they hold twice as many entries.
    /// The table's is set aside up front (never grown on a packet's path).
    pub fn new(flows: usize, per_guest: usize) -> Candidates {
        let capacity = flows.saturating_mul(2);
        Candidates {
            all: VecDeque::with_capacity(capacity),
            by_guest: HashMap::default(),
            capacity,
            per_guest: per_guest.saturating_mul(2),
        }
    }

    /// Files `candidate`, of `guest`, at the back of both queues.
    pub fn push(&mut self, guest: Ipv4Addr, candidate: Candidate) {
        if self.capacity == 0 {
            return;
        }
        let bound = |queue: &mut VecDeque<Candidate>, limit: usize| {
            if queue.len() >= limit {
                queue.pop_front();
            }
            queue.push_back(candidate);
        };
        bound(&mut self.all, self.capacity);
        bound(
            self.by_guest.entry(guest).or_default(),
            self.per_guest.max(1),
        );
    }

    /// Takes the oldest entry of the table's queue (`None`) or of `guest`'s.
    pub fn pop(&mut self, guest: Option<Ipv4Addr>) -> Option<Candidate> {
        match guest {
            None => self.all.pop_front(),
            Some(g) => {
                let queue = self.by_guest.get_mut(&g)?;
                let candidate = queue.pop_front();
                if queue.is_empty() {
                    self.by_guest.remove(&g);
                }
                candidate
            }
        }
    }

    /// Scans the table's queue (`None`) or `guest`'s from its oldest entry, asking `judge`
    /// about each, until one is evicted (true) or the scan's bounds are reached (false).
    /// The owner whose judgement needs itself loops over [`Self::pop`] with a [`Scan`].
    #[cfg(test)]
    pub fn scan(
        &mut self,
        guest: Option<Ipv4Addr>,
        mut judge: impl FnMut(Candidate) -> Verdict,
    ) -> bool {
        let mut scan = Scan::default();
        while scan.goes_on() {
            let Some(candidate) = self.pop(guest) else {
                break;
            };
            if scan.counts(judge(candidate)) {
                return true;
            }
        }
        false
    }
}

/// The bounds of one scan: [`SCAN`] live candidates judged, [`STALE_SCAN`] stale ones dropped.
#[derive(Debug, Default)]
pub struct Scan {
    judged: usize,
    stale: usize,
}

impl Scan {
    /// Whether the scan may look at one more entry.
    pub fn goes_on(&self) -> bool {
        self.judged < SCAN && self.stale < STALE_SCAN
    }

    /// Counts a verdict; true when it ends the scan with an eviction.
    pub fn counts(&mut self, verdict: Verdict) -> bool {
        match verdict {
            Verdict::Stale => self.stale += 1,
            Verdict::Keep => self.judged += 1,
            Verdict::Evicted => return true,
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 10);
    const B: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 11);

    /// Another guest's live connections filed first do not hide a guest's own from its cap.
    #[test]
    fn a_guests_scan_sees_only_its_own_candidates() {
        let mut c = Candidates::new(1000, 1000);
        for slot in 0..100 {
            c.push(B, (slot, 0));
        }
        c.push(A, (500, 0));
        let mut seen = Vec::new();
        assert!(c.scan(Some(A), |cand| {
            seen.push(cand);
            Verdict::Evicted
        }));
        assert_eq!(seen, [(500, 0)]);
        // The table's scan sees everyone's, oldest first, and stops at its bound.
        let mut judged = 0;
        assert!(!c.scan(None, |_| {
            judged += 1;
            Verdict::Keep
        }));
        assert_eq!(judged, SCAN);
    }

    /// Stale entries are dropped within their own bound, so a queue of them costs a scan a
    /// bounded amount and does not stop it before its live candidates.
    #[test]
    fn stale_entries_go_within_a_bound() {
        let mut c = Candidates::new(1000, 1000);
        for slot in 0..10 {
            c.push(A, (slot, 0));
        }
        c.push(A, (99, 0));
        let evicted = c.scan(Some(A), |(slot, _)| {
            if slot == 99 {
                Verdict::Evicted
            } else {
                Verdict::Stale
            }
        });
        assert!(evicted);
        assert!(!c.by_guest.contains_key(&A), "emptied, forgotten");
    }

    #[test]
    fn queues_keep_their_newest_entries() {
        let mut c = Candidates::new(3, 2);
        for slot in 0..8 {
            c.push(A, (slot, 0));
        }
        assert_eq!(c.all, [(2, 0), (3, 0), (4, 0), (5, 0), (6, 0), (7, 0)]);
        assert_eq!(c.by_guest[&A], [(4, 0), (5, 0), (6, 0), (7, 0)]);
    }
}
