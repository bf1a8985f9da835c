//! How one delivery is attempted: timeout, attempts, backoff and which statuses retry.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::retry::MAX_ATTEMPTS_LIMIT;
use crate::{retry::RetrySchedule, status_set::StatusSet};

/// Per-delivery settings, stored with the job so every attempt uses the ones it was dispatched
/// with. Set them through [`DeliveryTarget`](crate::target::DeliveryTarget) (or the same setters of
/// a [`WebhookSubscription`](crate::WebhookSubscription) or a registry endpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeliveryPolicy {
    /// Limit of one attempt, from connect to the end of the (capped) response read; ms.
    pub timeout_ms: u64,
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// Wait between attempts.
    pub retry: RetrySchedule,
    /// Status codes that are retried.
    pub retry_statuses: StatusSet,
    /// Upper bound for a receiver's `Retry-After`; ms.
    pub max_retry_after_ms: u64,
    /// How long one attempt may be put off before the delivery becomes a dead letter; ms.
    /// `None`: see [`defer_horizon`](Self::defer_horizon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defer_horizon_ms: Option<u64>,
    /// Most attempts of this target's endpoint in flight at once, applied by an
    /// [`InFlightLayer`](crate::layers::InFlightLayer) instead of its per-endpoint default.
    /// `None`: the layer's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
}

impl DeliveryPolicy {
    /// Whether this is the default policy (stored endpoints leave it out).
    pub(crate) fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        Self {
            timeout_ms: 15_000,
            max_attempts: 8,
            retry: RetrySchedule::default(),
            retry_statuses: StatusSet::default(),
            max_retry_after_ms: 24 * 3600 * 1000,
            defer_horizon_ms: None,
            max_in_flight: None,
        }
    }
}

impl DeliveryPolicy {
    /// The longest delay anything of this crate schedules (a retry, a deferral, a receiver's
    /// `Retry-After`, whatever the settings say): 365 days. Longer ones are cut to it, so that
    /// every due time is a valid timestamp in every backend.
    pub const MAX_DELAY: Duration = crate::clock::MAX_DELAY;

    /// The shortest [`defer_horizon`](Self::defer_horizon) by default: an hour.
    pub const MIN_DEFAULT_DEFER_HORIZON: Duration = Duration::from_secs(3600);

    /// How long one attempt may be put off (rate limits, an open circuit breaker, an
    /// unreachable secret store) before the delivery becomes a dead letter: the one set, else
    /// the length of the retry schedule (its delays without jitter, summed over the attempts;
    /// about 28 hours by default), at least [`MIN_DEFAULT_DEFER_HORIZON`](Self::MIN_DEFAULT_DEFER_HORIZON).
    /// Never more than [`MAX_DELAY`](Self::MAX_DELAY). Without a horizon, a backlog behind a
    /// breaker that never closes would be put off forever.
    pub fn defer_horizon(&self) -> Duration {
        match self.defer_horizon_ms {
            Some(ms) => Duration::from_millis(ms),
            None => self
                .retry
                .length(self.max_attempts)
                .max(Self::MIN_DEFAULT_DEFER_HORIZON),
        }
        .min(Self::MAX_DELAY)
    }

    /// The attempt timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The upper bound for a receiver's `Retry-After` (at most [`MAX_DELAY`](Self::MAX_DELAY)).
    pub fn max_retry_after(&self) -> Duration {
        Duration::from_millis(self.max_retry_after_ms).min(Self::MAX_DELAY)
    }

    /// The wait after attempt `attempt` failed: the receiver's `Retry-After` clamped to
    /// `max_retry_after`, else the schedule. Never less than a second, so that two attempts
    /// never share a signature timestamp, and never more than [`MAX_DELAY`](Self::MAX_DELAY).
    pub fn next_delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let delay = match retry_after {
            Some(wait) => wait.min(self.max_retry_after()),
            None => self.retry.delay_after(attempt),
        };
        delay.clamp(Duration::from_secs(1), Self::MAX_DELAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defer_horizon_is_the_retry_schedule_at_least_an_hour() {
        let policy = DeliveryPolicy::default();
        // 5 s + 5 min + 30 min + 2 h + 5 h + 10 h + 10 h: the delays after attempts 1 to 7.
        assert_eq!(
            policy.defer_horizon(),
            Duration::from_secs(5 + 300 + 1800 + 7200 + 18_000 + 72_000)
        );
        let short = DeliveryPolicy {
            max_attempts: 1,
            ..DeliveryPolicy::default()
        };
        assert_eq!(short.defer_horizon(), DeliveryPolicy::MIN_DEFAULT_DEFER_HORIZON);
        let set = DeliveryPolicy {
            defer_horizon_ms: Some(u64::MAX),
            ..DeliveryPolicy::default()
        };
        assert_eq!(set.defer_horizon(), DeliveryPolicy::MAX_DELAY);
        // Stored jobs from before the setting existed still read.
        let mut json = serde_json::to_value(DeliveryPolicy::default()).unwrap();
        json.as_object_mut().unwrap().remove("defer_horizon_ms");
        assert_eq!(
            serde_json::from_value::<DeliveryPolicy>(json).unwrap(),
            DeliveryPolicy::default()
        );
    }

    #[test]
    fn delays_are_clamped_at_the_extremes() {
        let ceiling = DeliveryPolicy::MAX_DELAY;
        let policy = DeliveryPolicy {
            max_retry_after_ms: u64::MAX,
            retry: RetrySchedule::schedule([Duration::MAX]),
            ..DeliveryPolicy::default()
        };
        assert!(policy.next_delay(1, Some(Duration::MAX)) <= ceiling);
        assert!(policy.next_delay(u32::MAX, None) <= ceiling);
        assert_eq!(
            DeliveryPolicy::default().next_delay(1, Some(Duration::MAX)),
            Duration::from_secs(24 * 3600)
        );
    }
}
