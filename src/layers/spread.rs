//! Spreads deferred deliveries over time, so that a backlog held back together does not come
//! due together and get held back again.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Most keys remembered before the expired ones are swept.
const SWEEP_AT: usize = 10_000;

/// Per key, the time up to which deferred deliveries have been spread.
#[derive(Debug, Default)]
pub(crate) struct Spread {
    horizons: Mutex<HashMap<String, Instant>>,
}

impl Spread {
    /// The delay for one more delivery of `key` held back for at least `wait`: after the
    /// ones deferred before it, one `interval` apart.
    pub(crate) fn delay(&self, key: &str, wait: Duration, interval: Duration) -> Duration {
        self.delay_at(key, wait, interval, Instant::now())
    }

    fn delay_at(&self, key: &str, wait: Duration, interval: Duration, now: Instant) -> Duration {
        let mut horizons = self.horizons.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if horizons.len() >= SWEEP_AT {
            horizons.retain(|_, horizon| *horizon > now);
        }
        let horizon = horizons.entry(key.to_owned()).or_insert(now);
        *horizon = (*horizon).max(now + wait) + interval;
        *horizon - now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferrals_of_one_key_queue_up_one_interval_apart() {
        let spread = Spread::default();
        let (now, ms) = (Instant::now(), Duration::from_millis);
        let delays: Vec<Duration> = (0..3).map(|_| spread.delay_at("a", ms(1000), ms(100), now)).collect();
        assert_eq!(delays, [ms(1100), ms(1200), ms(1300)]);
        // Later, the queue has drained: a new deferral waits only its own wait.
        assert_eq!(spread.delay_at("a", ms(500), ms(100), now + ms(5000)), ms(600));
        // Another key has its own queue.
        assert_eq!(spread.delay_at("b", Duration::ZERO, ms(100), now), ms(100));
    }
}
