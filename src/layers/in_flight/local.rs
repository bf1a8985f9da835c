//! In-flight counts and average attempt durations in process memory, in one capped map.

use std::{
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use crate::bounded::{BoundedMap, HeapSize, MapUsage, MemoryCap};

/// Weight of the newest attempt in an endpoint's average: about the last ten count.
const NEWEST_WEIGHT: f64 = 0.2;

/// One endpoint: attempts in flight (counted here), and the recent average duration.
#[derive(Default)]
struct Slots {
    in_flight: u32,
    /// Seconds, exponentially weighted; `None` until an attempt has ended.
    average: Option<f64>,
}

impl HeapSize for Slots {
    fn heap_bytes(&self) -> usize {
        0
    }
}

pub(super) struct LocalSlots {
    /// A forgotten (evicted) endpoint is counted from zero and measured anew; a slot given back
    /// to it afterwards does not go below zero.
    map: Mutex<BoundedMap<String, Slots>>,
}

impl LocalSlots {
    pub(super) fn new(cap: MemoryCap) -> Self {
        Self {
            map: Mutex::new(BoundedMap::new("in_flight", cap)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BoundedMap<String, Slots>> {
        self.map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The endpoint's recent average attempt duration, if any attempt has ended.
    pub(super) fn average(&self, key: &str) -> Option<Duration> {
        let seconds = self.lock().peek(key)?.average?;
        Duration::try_from_secs_f64(seconds).ok()
    }

    /// Takes a slot of `key` unless `enforce` and `cap` are in flight already.
    pub(super) fn acquire(&self, key: &str, cap: u32, enforce: bool) -> bool {
        self.lock().update(key, Slots::default, |slots| {
            if enforce && slots.in_flight >= cap {
                return false;
            }
            slots.in_flight = slots.in_flight.saturating_add(1);
            true
        })
    }

    /// Gives a slot back and records the attempt's duration, if it reached the endpoint.
    pub(super) fn release(&self, key: &str, took: Option<Duration>) {
        self.lock().update(key, Slots::default, |slots| {
            slots.in_flight = slots.in_flight.saturating_sub(1);
            if let Some(took) = took {
                let took = took.as_secs_f64();
                slots.average = Some(match slots.average {
                    Some(average) => average + NEWEST_WEIGHT * (took - average),
                    None => took,
                });
            }
        });
    }

    pub(super) fn state(&self, key: &str) -> (u32, Option<Duration>) {
        let in_flight = self.lock().peek(key).map_or(0, |slots| slots.in_flight);
        (in_flight, self.average(key))
    }

    pub(super) fn usage(&self) -> MapUsage {
        self.lock().usage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_endpoint_is_held_to_its_cap_and_slots_come_back() {
        let slots = LocalSlots::new(MemoryCap::new(100, 1 << 20));
        assert!((0..3).all(|_| slots.acquire("a", 3, true)));
        assert!(!slots.acquire("a", 3, true));
        // Not enforced (fast or unmeasured): the count still moves.
        assert!(slots.acquire("a", 3, false));
        assert_eq!(slots.state("a").0, 4);
        slots.release("a", Some(Duration::from_secs(2)));
        slots.release("a", None);
        assert_eq!(slots.state("a"), (2, Some(Duration::from_secs(2))));
        assert!(slots.acquire("a", 3, true));
        assert!(slots.acquire("b", 3, true), "other endpoints are not affected");
        // The average follows newer durations; a stray release does not go below zero.
        slots.release("a", Some(Duration::ZERO));
        assert!(slots.average("a").unwrap() < Duration::from_secs(2));
        for _ in 0..10 {
            slots.release("c", None);
        }
        assert_eq!(slots.state("c").0, 0);
    }
}
