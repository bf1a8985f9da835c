//! Spreads deferred deliveries over time, so that a backlog held back together does not come
//! due together and get held back again.

use std::{
    fmt,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::bounded::{BoundedMap, HeapSize, MapUsage, MemoryCap};

/// Per key, the time up to which deferred deliveries have been spread. Capped: past the cap
/// the least recently deferred keys are forgotten, which costs only spreading (a forgotten
/// key's next deferral waits its own wait, not behind the earlier ones). A horizon in the past
/// means the same as none, so expired ones need no sweeping.
pub(crate) struct Spread {
    horizons: Mutex<BoundedMap<String, Horizon>>,
}

struct Horizon(Instant);

impl HeapSize for Horizon {
    fn heap_bytes(&self) -> usize {
        0
    }
}

impl fmt::Debug for Spread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spread").field("horizons", &self.usage()).finish()
    }
}

impl Spread {
    /// Spreading for at most `cap` keys.
    pub(crate) fn new(cap: MemoryCap) -> Self {
        Self {
            horizons: Mutex::new(BoundedMap::new("deferral_spread", cap)),
        }
    }

    /// The size of the map.
    pub(crate) fn usage(&self) -> MapUsage {
        self.lock().usage()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BoundedMap<String, Horizon>> {
        self.horizons.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The delay for one more delivery of `key` held back for at least `wait`: after the
    /// ones deferred before it, one `interval` apart; never more than `cap`.
    pub(crate) fn delay(&self, key: &str, wait: Duration, interval: Duration, cap: Duration) -> Duration {
        self.delay_at(key, wait, interval, cap, Instant::now())
    }

    fn delay_at(&self, key: &str, wait: Duration, interval: Duration, cap: Duration, now: Instant) -> Duration {
        let mut horizons = self.lock();
        // In durations from now, saturating: no `Instant` arithmetic that can overflow.
        let queued = horizons
            .peek(key)
            .map_or(Duration::ZERO, |horizon| horizon.0.saturating_duration_since(now));
        let delay = queued.max(wait).saturating_add(interval).min(cap);
        match now.checked_add(delay) {
            Some(horizon) => horizons.insert(key.to_owned(), Horizon(horizon)),
            None => {
                horizons.remove(key);
            }
        };
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferrals_of_one_key_queue_up_one_interval_apart() {
        let spread = Spread::new(crate::bounded::MemoryCap::new(100, 1 << 20));
        let (now, ms) = (Instant::now(), Duration::from_millis);
        let cap = Duration::from_secs(3600);
        let delays: Vec<Duration> = (0..3)
            .map(|_| spread.delay_at("a", ms(1000), ms(100), cap, now))
            .collect();
        assert_eq!(delays, [ms(1100), ms(1200), ms(1300)]);
        // Later, the queue has drained: a new deferral waits only its own wait.
        assert_eq!(spread.delay_at("a", ms(500), ms(100), cap, now + ms(5000)), ms(600));
        // Another key has its own queue.
        assert_eq!(spread.delay_at("b", Duration::ZERO, ms(100), cap, now), ms(100));
        // The queue does not grow past the cap.
        assert_eq!(spread.delay_at("c", ms(900), ms(200), ms(1000), now), ms(1000));
        assert_eq!(spread.delay_at("c", ms(900), ms(200), ms(1000), now), ms(1000));
    }

    #[test]
    fn huge_waits_and_intervals_do_not_overflow() {
        let spread = Spread::new(crate::bounded::MemoryCap::new(100, 1 << 20));
        let now = Instant::now();
        let cap = crate::clock::MAX_DELAY;
        for _ in 0..3 {
            assert_eq!(spread.delay_at("a", Duration::MAX, Duration::MAX, cap, now), cap);
            assert_eq!(spread.delay_at("b", Duration::ZERO, Duration::MAX, cap, now), cap);
            assert_eq!(
                spread.delay_at("c", Duration::MAX, Duration::MAX, Duration::MAX, now),
                Duration::MAX
            );
        }
    }
}
