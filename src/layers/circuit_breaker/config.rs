//! [`BreakerConfig`]: when a breaker opens, how long it stays open, how it closes.

use std::time::Duration;

/// What opens a breaker.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Trip {
    /// This many failures in a row.
    ConsecutiveFailures(u32),
    /// At least `ratio` of the deliveries within `window` failed, counting only once there
    /// were `min_requests` of them.
    FailureRatio {
        /// Share of failures, 0 to 1.
        ratio: f64,
        /// How far back deliveries count (in tenths of it).
        window: Duration,
        /// Fewest deliveries in the window before the ratio counts.
        min_requests: u32,
    },
}

/// A circuit breaker's settings. Failures are transport errors, timeouts, 5xx and 429; other
/// 4xx mean the endpoint is up.
///
/// | setting | default |
/// |---|---|
/// | [`consecutive_failures`](Self::consecutive_failures) / [`failure_ratio`](Self::failure_ratio) | 5 in a row |
/// | [`open_for`](Self::open_for) | 30 s |
/// | [`half_open_probes`](Self::half_open_probes) | 1 |
/// | [`successes_to_close`](Self::successes_to_close) | 1 (at most the probes) |
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    pub(crate) trip: Trip,
    pub(crate) open_for: Duration,
    pub(crate) half_open_probes: u32,
    successes_to_close: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            trip: Trip::ConsecutiveFailures(5),
            open_for: Duration::from_secs(30),
            half_open_probes: 1,
            successes_to_close: 1,
        }
    }
}

impl BreakerConfig {
    /// Opens after `n` failures in a row (at least 1).
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.trip = Trip::ConsecutiveFailures(n.max(1));
        self
    }

    /// Opens when at least `ratio` (clamped to 0–1) of the deliveries within `window` failed,
    /// once there were `min_requests` (at least 1) of them.
    pub fn failure_ratio(mut self, ratio: f64, window: Duration, min_requests: u32) -> Self {
        let ratio = if ratio.is_nan() { 1.0 } else { ratio.clamp(0.0, 1.0) };
        self.trip = Trip::FailureRatio {
            ratio,
            window,
            min_requests: min_requests.max(1),
        };
        self
    }

    /// How long the breaker stays open before it lets probes through (30 s by default).
    pub fn open_for(mut self, duration: Duration) -> Self {
        self.open_for = duration;
        self
    }

    /// How many probe deliveries half-open lets through (1 by default, at least 1).
    pub fn half_open_probes(mut self, probes: u32) -> Self {
        self.half_open_probes = probes.max(1);
        self
    }

    /// How many probes must succeed to close (1 by default; at least 1, at most the probes).
    pub fn successes_to_close(mut self, successes: u32) -> Self {
        self.successes_to_close = successes.max(1);
        self
    }

    pub(crate) fn close_after(&self) -> u32 {
        self.successes_to_close.min(self.half_open_probes)
    }

    /// What opens the breaker.
    pub fn trip(&self) -> Trip {
        self.trip
    }
}
