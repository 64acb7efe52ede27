//! The answer cache.
//!
//! dnsmasq's cache (150 entries by default, as libvirt leaves it) is what makes a guest's
//! repeated lookups cheap and keeps names it has seen resolvable for their TTL while the
//! upstreams are unreachable. Entries are whole answers keyed by question, like a stub
//! resolver's view of them: positive answers live for their smallest answer TTL (capped at a
//! day), negative ones (NXDOMAIN, NODATA) for the SOA's negative TTL of RFC 2308 section 5
//! (capped at three hours, as its section 5 suggests) and not at all without an SOA. Served
//! answers have their TTLs lowered by the time spent here (RFC 1035 4.1.3's "time interval
//! that the resource record may be cached" keeps counting down).
//!
//! Eviction is least-recently-used, with a recency index so that a full cache costs
//! O(log n) per insertion; expired entries are removed when looked up, and a bounded sweep from
//! the timer removes those nobody asks for again.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, Record};

use super::DnsCounters;
use super::wire::Question;

/// Longest a positive answer is kept.
pub(crate) const MAX_TTL: u32 = 86_400;
/// Longest a negative answer is kept (RFC 2308 5: "one to three hours").
pub(crate) const MAX_NEGATIVE_TTL: u32 = 10_800;

/// The sections of an answer, without OPT (RFC 6891 6.1.1: never cached or forwarded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl Answer {
    /// How long this answer may be cached, if at all: NOERROR with answers for the smallest
    /// answer TTL; NXDOMAIN or NODATA for min(SOA TTL, SOA MINIMUM) (RFC 2308 5), and for no
    /// longer than any CNAME before it; nothing else, and nothing with a TTL of 0.
    pub fn cache_ttl(&self) -> Option<u32> {
        let answers_min = self.answers.iter().map(|r| r.ttl).min();
        let ttl = match self.rcode {
            ResponseCode::NoError if !self.answers.is_empty() => answers_min?.min(MAX_TTL),
            ResponseCode::NoError | ResponseCode::NXDomain => {
                let soa = self.authorities.iter().find_map(|r| match &r.data {
                    RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                    _ => None,
                })?;
                soa.min(answers_min.unwrap_or(u32::MAX))
                    .min(MAX_NEGATIVE_TTL)
            }
            _ => return None,
        };
        (ttl > 0).then_some(ttl)
    }

    /// Every record's TTL lowered by `age` seconds.
    pub fn aged(&self, age: u32) -> Answer {
        let age_all = |records: &[Record]| {
            records
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.ttl = r.ttl.saturating_sub(age);
                    r
                })
                .collect()
        };
        Answer {
            rcode: self.rcode,
            answers: age_all(&self.answers),
            authorities: age_all(&self.authorities),
            additionals: age_all(&self.additionals),
        }
    }

    fn clamp_ttls(&mut self, max: u32) {
        for r in self
            .answers
            .iter_mut()
            .chain(&mut self.authorities)
            .chain(&mut self.additionals)
        {
            r.ttl = r.ttl.min(max);
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    answer: Answer,
    stored: Instant,
    expires: Instant,
    /// Key into `Cache::recency`.
    used: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Cache {
    capacity: usize,
    entries: HashMap<Question, Entry>,
    /// Use stamp -> key, oldest first.
    recency: BTreeMap<u64, Question>,
    clock: u64,
}

impl Cache {
    pub fn new(capacity: usize) -> Cache {
        Cache {
            capacity,
            entries: HashMap::new(),
            recency: BTreeMap::new(),
            clock: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    fn stamp(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The answer for `question` with its TTLs lowered by its age, if cached and not expired.
    pub fn get(
        &mut self,
        now: Instant,
        question: &Question,
        counters: &mut DnsCounters,
    ) -> Option<Answer> {
        let entry = self.entries.get(question)?;
        if now >= entry.expires {
            self.remove(question);
            counters.cache_expired += 1;
            return None;
        }
        let age = now.saturating_duration_since(entry.stored).as_secs();
        let answer = entry.answer.aged(u32::try_from(age).unwrap_or(u32::MAX));
        let old = entry.used;
        let used = self.stamp();
        self.recency.remove(&old);
        self.recency.insert(used, question.clone());
        if let Some(entry) = self.entries.get_mut(question) {
            entry.used = used;
        }
        Some(answer)
    }

    /// Caches `answer` if it is cacheable (see [`Answer::cache_ttl`]).
    pub fn insert(
        &mut self,
        now: Instant,
        question: Question,
        answer: &Answer,
        counters: &mut DnsCounters,
    ) {
        if self.capacity == 0 {
            return;
        }
        let Some(ttl) = answer.cache_ttl() else {
            return;
        };
        self.remove(&question);
        while self.entries.len() >= self.capacity {
            let Some((_, oldest)) = self.recency.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
            counters.cache_evictions += 1;
        }
        let mut answer = answer.clone();
        // A negative answer's records say how long the name does not exist (RFC 2308 3);
        // a positive answer's keep their own TTLs, within the cap.
        let negative = answer.rcode != ResponseCode::NoError || answer.answers.is_empty();
        answer.clamp_ttls(if negative { ttl } else { MAX_TTL });
        let used = self.stamp();
        self.recency.insert(used, question.clone());
        self.entries.insert(
            question,
            Entry {
                answer,
                stored: now,
                expires: now
                    .checked_add(Duration::from_secs(u64::from(ttl)))
                    .unwrap_or(now),
                used,
            },
        );
        counters.cache_inserts += 1;
    }

    fn remove(&mut self, question: &Question) {
        if let Some(entry) = self.entries.remove(question) {
            self.recency.remove(&entry.used);
        }
    }

    /// Removes expired entries among the `budget` least recently used.
    pub fn sweep(&mut self, now: Instant, budget: usize, counters: &mut DnsCounters) {
        let expired: Vec<Question> = self
            .recency
            .values()
            .take(budget)
            .filter(|q| self.entries.get(*q).is_some_and(|e| now >= e.expires))
            .cloned()
            .collect();
        for question in expired {
            self.remove(&question);
            counters.cache_expired += 1;
        }
    }
}
