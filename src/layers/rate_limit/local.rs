//! Rate budgets in process memory, on governor's GCRA.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use governor::{
    DefaultDirectRateLimiter, DefaultKeyedRateLimiter, RateLimiter,
    clock::{Clock, DefaultClock},
};

use super::{Adaptation, Decision};
use crate::layers::Limit;

/// Keys admitted between two sweeps of idle keys out of the limiter.
const SWEEP_EVERY: u64 = 10_000;

pub(super) struct LocalBudget {
    endpoint: DefaultKeyedRateLimiter<String>,
    endpoint_limit: Limit,
    /// One keyed limiter per other limit that jobs carry (registry endpoints with their own).
    own: Mutex<HashMap<Limit, Arc<DefaultKeyedRateLimiter<String>>>>,
    global: Option<DefaultDirectRateLimiter>,
    adaptations: Mutex<HashMap<String, (Adaptation, Instant)>>,
    admitted: AtomicU64,
    clock: DefaultClock,
}

impl LocalBudget {
    pub(super) fn new(endpoint: Limit, global: Option<Limit>) -> Self {
        Self {
            endpoint: RateLimiter::keyed(endpoint.quota()),
            endpoint_limit: endpoint,
            own: Mutex::default(),
            global: global.map(|limit| RateLimiter::direct(limit.quota())),
            adaptations: Mutex::default(),
            admitted: AtomicU64::new(0),
            clock: DefaultClock::default(),
        }
    }

    /// Admits one delivery under `key`, whose limit is `limit` (the job's own) or the layer's.
    pub(super) fn acquire(&self, key: &str, limit: Option<Limit>) -> Decision {
        let now = Instant::now();
        let factor = match self.lock().get(key) {
            Some((_, cooldown_until)) if *cooldown_until > now => return Decision::Wait(*cooldown_until - now),
            Some((adaptation, _)) => adaptation.factor,
            None => 1.0,
        };
        let limit = limit.unwrap_or(self.endpoint_limit);
        let own = (limit != self.endpoint_limit).then(|| self.own_limiter(limit));
        let limiter = own.as_deref().unwrap_or(&self.endpoint);
        let cost = NonZeroU32::new(super::cost(factor, limit.burst_size())).unwrap_or(NonZeroU32::MIN);
        let key = key.to_owned();
        match limiter.check_key_n(&key, cost) {
            Ok(Ok(())) => {}
            Ok(Err(not_until)) => return Decision::Wait(not_until.wait_time_from(self.clock.now())),
            // `cost` never exceeds the burst; wait one interval should it ever.
            Err(_) => return Decision::Wait(limit.interval()),
        }
        if let Some(global) = &self.global
            && let Err(not_until) = global.check()
        {
            return Decision::Wait(not_until.wait_time_from(self.clock.now()));
        }
        if self.admitted.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.endpoint.retain_recent();
            for limiter in self.own.lock().unwrap_or_else(|p| p.into_inner()).values() {
                limiter.retain_recent();
            }
        }
        Decision::Admit { factor }
    }

    fn own_limiter(&self, limit: Limit) -> Arc<DefaultKeyedRateLimiter<String>> {
        let mut own = self.own.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(
            own.entry(limit)
                .or_insert_with(|| Arc::new(RateLimiter::keyed(limit.quota()))),
        )
    }

    /// Applies `change` to the key's adaptation; an adaptation back at full rate is forgotten.
    pub(super) fn adapt(&self, key: &str, change: impl FnOnce(Adaptation) -> (Adaptation, Duration)) {
        let mut adaptations = self.lock();
        let current = adaptations
            .get(key)
            .map_or(Adaptation::FULL, |(adaptation, _)| *adaptation);
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
            adaptations.insert(key.to_owned(), (next, until));
        }
    }

    pub(super) fn adaptation(&self, key: &str) -> Adaptation {
        let now = Instant::now();
        self.lock()
            .get(key)
            .map_or(Adaptation::FULL, |(adaptation, until)| Adaptation {
                cooldown: until.saturating_duration_since(now),
                ..*adaptation
            })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Adaptation, Instant)>> {
        self.adaptations.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_cooldown_does_not_overflow() {
        let budget = LocalBudget::new(Limit::per_second(10), None);
        budget.adapt("k", |current| (Adaptation { factor: 0.5, ..current }, Duration::MAX));
        assert!(budget.adaptation("k").cooldown > Duration::ZERO);
        match budget.acquire("k", None) {
            Decision::Wait(wait) => assert!(wait > Duration::ZERO),
            Decision::Admit { .. } => panic!("held back"),
        }
    }

    #[test]
    fn a_job_with_its_own_limit_is_held_to_it() {
        let budget = LocalBudget::new(Limit::per_second(1000), None);
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
}
