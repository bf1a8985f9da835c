//! Rate budgets in process memory: GCRA per key, in one capped map.
//!
//! The per-key cells are kept here rather than in governor's keyed limiters so that every
//! limit a job can carry shares one [`BoundedMap`]: governor keeps one unbounded map per
//! limiter (one limiter per distinct [`Limit`]), swept only by scans. The arithmetic is
//! governor's (`test_n_all_and_update`), so decisions are the same; the global limit is still
//! a governor direct limiter (one cell, nothing keyed).

use std::{
    num::NonZeroU32,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use governor::{
    DefaultDirectRateLimiter, RateLimiter,
    clock::{Clock, DefaultClock},
};

use super::{Adaptation, Decision};
use crate::{
    bounded::{BoundedMap, HeapSize, MapUsage, MemoryCap},
    limit::Limit,
};

/// A key's budget under one limit: jobs with limits of their own are held to those apart
/// from the layer's, as with one limiter per limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BudgetKey {
    limit: Limit,
    key: String,
}

impl HeapSize for BudgetKey {
    fn heap_bytes(&self) -> usize {
        self.key.heap_bytes()
    }
}

/// A key slowed down after 429s, until when it is held back entirely.
struct Adapted(Adaptation, Instant);

impl HeapSize for Adapted {
    fn heap_bytes(&self) -> usize {
        0
    }
}

/// A GCRA theoretical arrival time, in nanoseconds since the budget's start.
struct Tat(u64);

impl HeapSize for Tat {
    fn heap_bytes(&self) -> usize {
        0
    }
}

pub(super) struct LocalBudget {
    endpoint_limit: Limit,
    /// Per key and limit; a forgotten (evicted) key starts again with a full burst.
    budgets: Mutex<BoundedMap<BudgetKey, Tat>>,
    global: Option<DefaultDirectRateLimiter>,
    /// Keys slowed after 429s; a forgotten one is back at full rate.
    adaptations: Mutex<BoundedMap<String, Adapted>>,
    start: Instant,
    clock: DefaultClock,
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// One GCRA decision for `cells` cells at `now` (ns): the new arrival time, or how long to
/// wait. Governor's arithmetic: `t` the interval, `tau = t × (burst − 1)`.
fn gcra(tat: Option<u64>, now: u64, limit: Limit, cells: u32) -> Result<u64, Duration> {
    let t = nanos(limit.interval()).max(1);
    let tau = t.saturating_mul(u64::from(limit.burst_size().saturating_sub(1)));
    let additional = t.saturating_mul(u64::from(cells.saturating_sub(1)));
    if additional > tau {
        // More cells than the burst: never, `cost` is capped by it; wait one interval.
        return Err(limit.interval());
    }
    let tat = tat.unwrap_or(now);
    let earliest = tat.saturating_add(additional).saturating_sub(tau);
    if now < earliest {
        return Err(Duration::from_nanos(earliest - now));
    }
    Ok(tat.max(now).saturating_add(t).saturating_add(additional))
}

impl LocalBudget {
    pub(super) fn new(endpoint: Limit, global: Option<Limit>, cap: MemoryCap) -> Self {
        Self {
            endpoint_limit: endpoint,
            budgets: Mutex::new(BoundedMap::new("rate_budgets", cap)),
            global: global.map(|limit| RateLimiter::direct(limit.quota())),
            adaptations: Mutex::new(BoundedMap::new("rate_adaptations", cap)),
            start: Instant::now(),
            clock: DefaultClock::default(),
        }
    }

    /// Admits one delivery under `key`, whose limit is `limit` (the job's own) or the layer's.
    pub(super) fn acquire(&self, key: &str, limit: Option<Limit>) -> Decision {
        let now = Instant::now();
        let factor = match self.adaptations().peek(key) {
            Some(Adapted(_, cooldown_until)) if *cooldown_until > now => {
                return Decision::Wait(*cooldown_until - now);
            }
            Some(Adapted(adaptation, _)) => adaptation.factor,
            None => 1.0,
        };
        let limit = limit.unwrap_or(self.endpoint_limit);
        let cost = NonZeroU32::new(super::cost(factor, limit.burst_size())).unwrap_or(NonZeroU32::MIN);
        let at = nanos(now.saturating_duration_since(self.start));
        let budget = BudgetKey {
            limit,
            key: key.to_owned(),
        };
        let decided = self.budgets().update(
            &budget,
            || Tat(at),
            |tat| {
                let next = gcra(Some(tat.0), at, limit, cost.get())?;
                tat.0 = next;
                Ok(())
            },
        );
        if let Err(wait) = decided {
            return Decision::Wait(wait);
        }
        if let Some(global) = &self.global
            && let Err(not_until) = global.check()
        {
            return Decision::Wait(not_until.wait_time_from(self.clock.now()));
        }
        Decision::Admit { factor }
    }

    /// Applies `change` to the key's adaptation; an adaptation back at full rate is forgotten.
    pub(super) fn adapt(&self, key: &str, change: impl FnOnce(Adaptation) -> (Adaptation, Duration)) {
        let mut adaptations = self.adaptations();
        let current = adaptations
            .peek(key)
            .map_or(Adaptation::FULL, |Adapted(adaptation, _)| *adaptation);
        let (next, cooldown) = change(current);
        if next.factor >= 1.0 && cooldown.is_zero() {
            adaptations.remove(key);
        } else {
            // The caller caps the cooldown; should it still not fit an `Instant`, hold the key
            // back as long as the crate ever holds anything back.
            let now = Instant::now();
            let until = now
                .checked_add(cooldown)
                .or_else(|| now.checked_add(crate::clock::MAX_DELAY))
                .unwrap_or(now);
            adaptations.insert(key.to_owned(), Adapted(next, until));
        }
    }

    pub(super) fn adaptation(&self, key: &str) -> Adaptation {
        let now = Instant::now();
        self.adaptations()
            .peek(key)
            .map_or(Adaptation::FULL, |Adapted(adaptation, until)| Adaptation {
                cooldown: until.saturating_duration_since(now),
                ..*adaptation
            })
    }

    /// The sizes of the budget and adaptation maps.
    pub(super) fn usage(&self) -> [MapUsage; 2] {
        [self.budgets().usage(), self.adaptations().usage()]
    }

    fn budgets(&self) -> MutexGuard<'_, BoundedMap<BudgetKey, Tat>> {
        self.budgets.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn adaptations(&self) -> MutexGuard<'_, BoundedMap<String, Adapted>> {
        self.adaptations.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_cooldown_does_not_overflow() {
        let budget = LocalBudget::new(Limit::per_second(10), None, super::super::DEFAULT_KEY_CAP);
        budget.adapt("k", |current| (Adaptation { factor: 0.5, ..current }, Duration::MAX));
        assert!(budget.adaptation("k").cooldown > Duration::ZERO);
        match budget.acquire("k", None) {
            Decision::Wait(wait) => assert!(wait > Duration::ZERO),
            Decision::Admit { .. } => panic!("held back"),
        }
    }

    #[test]
    fn a_job_with_its_own_limit_is_held_to_it() {
        let budget = LocalBudget::new(Limit::per_second(1000), None, super::super::DEFAULT_KEY_CAP);
        let own = Limit::per_minute(2);
        let admitted = |key: &str, limit| matches!(budget.acquire(key, limit), Decision::Admit { .. });
        // Its own burst of two, then a wait of about 30 s, while the layer's limit has room.
        assert!(admitted("endpoint:a", Some(own)));
        assert!(admitted("endpoint:a", Some(own)));
        match budget.acquire("endpoint:a", Some(own)) {
            Decision::Wait(wait) => assert!(wait > Duration::from_secs(25), "{wait:?}"),
            Decision::Admit { .. } => panic!("over its own limit"),
        }
        // Other keys, under the layer's limit or their own, are not affected.
        assert!(admitted("endpoint:b", Some(own)));
        assert!((0..100).all(|_| admitted("api.example.com", None)));
    }

    #[test]
    fn decisions_match_governor() {
        // Same limit, same instants: the same admissions and waits as governor's keyed limiter.
        const STEPS: [(u64, u32); 9] = [
            (0, 1),
            (0, 1),
            (0, 1),
            (0, 1),
            (50, 1),
            (100, 1),
            (100, 2),
            (400, 2),
            (400, 1),
        ];
        let limit = Limit::per(3, Duration::from_millis(300)).burst(3);
        let mut tat = None;
        let mut ours = Vec::new();
        for (at_ms, cells) in STEPS {
            let at = at_ms * 1_000_000;
            match gcra(tat, at, limit, cells) {
                Ok(next) => {
                    tat = Some(next);
                    ours.push(Ok(()));
                }
                Err(wait) => ours.push(Err(wait)),
            }
        }
        let clock = governor::clock::FakeRelativeClock::default();
        let keyed = RateLimiter::hashmap_with_clock(limit.quota(), clock.clone());
        let mut theirs = Vec::new();
        let mut now_ms = 0;
        for (at_ms, cells) in STEPS {
            clock.advance(Duration::from_millis(at_ms - now_ms));
            now_ms = at_ms;
            let cells = NonZeroU32::new(cells).unwrap();
            theirs.push(match keyed.check_key_n(&"k", cells).unwrap() {
                Ok(()) => Ok(()),
                Err(not_until) => Err(not_until.wait_time_from(clock.now())),
            });
        }
        assert_eq!(ours, theirs);
        assert!(ours.iter().any(Result::is_err) && ours.iter().any(Result::is_ok));
    }
}
