//! Backoff between attempts: a schedule list or exponential, with jitter, capped.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// The most attempts a delivery may have, the first included.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;

/// The wait before the next attempt, persisted in the backend as the next task's `run_at`.
///
/// The default follows the Standard Webhooks recommendation: 5 s, 5 min, 30 min, 2 h, 5 h,
/// 10 h, 10 h (so eight attempts in all with the default
/// [`max_attempts`](crate::WebhookSubscription::max_attempts)), each with ±10 % jitter so that
/// deliveries that failed together do not retry together.
///
/// ```
/// use std::time::Duration;
/// use apalis_webhooks::{WebhookSubscription, retry::RetrySchedule};
///
/// // 1 s, 2 s, 4 s, … at most 10 minutes, ±20 %.
/// let schedule = RetrySchedule::exponential(Duration::from_secs(1), 2.0, Duration::from_secs(600))
///     .with_jitter(0.2);
/// let subscription = WebhookSubscription::new("https://example.com/hooks", apalis_webhooks::Secret::generate())
///     .max_attempts(12)
///     .retry_schedule(schedule);
/// # drop(subscription);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RetrySchedule {
    /// Wait `delays_ms[n - 1]` after the n-th attempt; the last entry repeats.
    Schedule {
        /// Delays in milliseconds.
        delays_ms: Vec<u64>,
        /// Relative jitter in `0.0..=1.0`: each delay is scaled by a random factor in
        /// `1 - jitter ..= 1 + jitter`.
        jitter: f64,
    },
    /// Wait `base × factor^(n - 1)` after the n-th attempt, at most `max`.
    Exponential {
        /// Delay after the first attempt, in milliseconds.
        base_ms: u64,
        /// Growth per attempt.
        factor: f64,
        /// Upper bound of any delay (before jitter), in milliseconds.
        max_ms: u64,
        /// Relative jitter, as for [`RetrySchedule::Schedule`].
        jitter: f64,
    },
}

impl Default for RetrySchedule {
    fn default() -> Self {
        const MIN: u64 = 60_000;
        Self::schedule([
            Duration::from_secs(5),
            Duration::from_millis(5 * MIN),
            Duration::from_millis(30 * MIN),
            Duration::from_millis(120 * MIN),
            Duration::from_millis(300 * MIN),
            Duration::from_millis(600 * MIN),
            Duration::from_millis(600 * MIN),
        ])
    }
}

impl RetrySchedule {
    /// A fixed list of delays (the last one repeats), with ±10 % jitter.
    pub fn schedule(delays: impl IntoIterator<Item = Duration>) -> Self {
        Self::Schedule {
            delays_ms: delays.into_iter().map(duration_ms).collect(),
            jitter: 0.1,
        }
    }

    /// Exponential backoff `base × factor^(n - 1)`, capped at `max`, with ±10 % jitter.
    pub fn exponential(base: Duration, factor: f64, max: Duration) -> Self {
        Self::Exponential {
            base_ms: duration_ms(base),
            factor: if factor.is_finite() && factor >= 1.0 {
                factor
            } else {
                1.0
            },
            max_ms: duration_ms(max),
            jitter: 0.1,
        }
    }

    /// The same schedule with another relative jitter, clamped to `0.0..=1.0`.
    pub fn with_jitter(mut self, value: f64) -> Self {
        let value = if value.is_finite() { value.clamp(0.0, 1.0) } else { 0.0 };
        match &mut self {
            Self::Schedule { jitter, .. } | Self::Exponential { jitter, .. } => *jitter = value,
        }
        self
    }

    /// The time a delivery of `attempts` attempts spends waiting between them: the delays
    /// after attempts 1 to `attempts - 1`, without jitter, summed (at most
    /// [`DeliveryPolicy::MAX_DELAY`](crate::policy::DeliveryPolicy::MAX_DELAY)).
    pub fn length(&self, attempts: u32) -> Duration {
        let attempts = attempts.min(MAX_ATTEMPTS_LIMIT);
        (1..attempts)
            .map(|attempt| Duration::from_millis(self.base_ms(attempt) as u64))
            .fold(Duration::ZERO, Duration::saturating_add)
            .min(crate::clock::MAX_DELAY)
    }

    /// The delay after attempt `attempt` before jitter, in milliseconds.
    fn base_ms(&self, attempt: u32) -> f64 {
        let index = attempt.saturating_sub(1);
        match self {
            Self::Schedule { delays_ms, .. } => {
                let last = delays_ms.len().saturating_sub(1);
                delays_ms.get((index as usize).min(last)).copied().unwrap_or(0) as f64
            }
            Self::Exponential {
                base_ms,
                factor,
                max_ms,
                ..
            } => {
                let grown = *base_ms as f64 * factor.powi(index.min(1024) as i32);
                grown.min(*max_ms as f64)
            }
        }
    }

    /// The delay after attempt number `attempt` (1-based) failed, jitter included, at most
    /// [`DeliveryPolicy::MAX_DELAY`](crate::policy::DeliveryPolicy::MAX_DELAY). A stored schedule with
    /// an out-of-range jitter is read as if clamped to `0.0..=1.0` (not finite: none).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let base_ms = self.base_ms(attempt);
        let (Self::Schedule { jitter, .. } | Self::Exponential { jitter, .. }) = self;
        let jitter = *jitter;
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let factor = if jitter > 0.0 {
            rand::rng().random_range(1.0 - jitter..=1.0 + jitter)
        } else {
            1.0
        };
        // A float-to-int `as` saturates (NaN is 0): no overflow, then the cap.
        Duration::from_millis((base_ms * factor).round() as u64).min(crate::clock::MAX_DELAY)
    }
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_repeats_its_last_delay() {
        let schedule = RetrySchedule::schedule([Duration::from_secs(1), Duration::from_secs(7)]).with_jitter(0.0);
        assert_eq!(schedule.delay_after(1), Duration::from_secs(1));
        assert_eq!(schedule.delay_after(2), Duration::from_secs(7));
        assert_eq!(schedule.delay_after(9), Duration::from_secs(7));
    }

    #[test]
    fn exponential_grows_and_caps() {
        let schedule =
            RetrySchedule::exponential(Duration::from_secs(2), 3.0, Duration::from_secs(60)).with_jitter(0.0);
        assert_eq!(schedule.delay_after(1), Duration::from_secs(2));
        assert_eq!(schedule.delay_after(3), Duration::from_secs(18));
        assert_eq!(schedule.delay_after(50), Duration::from_secs(60));
    }

    #[test]
    fn stored_schedules_at_the_extremes_do_not_panic_or_overflow() {
        let ceiling = crate::clock::MAX_DELAY;
        for jitter in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -3.0, 7.0] {
            // As a stored job could hold it (JSON has no NaN, but other codecs do).
            let schedule = RetrySchedule::Schedule {
                delays_ms: vec![u64::MAX],
                jitter,
            };
            assert!(schedule.delay_after(1) <= ceiling, "{jitter}");
            let exponential = RetrySchedule::Exponential {
                base_ms: u64::MAX,
                factor: f64::INFINITY,
                max_ms: u64::MAX,
                jitter,
            };
            assert!(exponential.delay_after(u32::MAX) <= ceiling, "{jitter}");
        }
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let schedule = RetrySchedule::schedule([Duration::from_secs(100)]).with_jitter(0.2);
        for _ in 0..1000 {
            let delay = schedule.delay_after(1);
            assert!(
                delay >= Duration::from_secs(80) && delay <= Duration::from_secs(120),
                "{delay:?}"
            );
        }
    }
}
