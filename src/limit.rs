//! [`Limit`]: a rate and a burst.

use std::time::Duration;

/// A sustained rate and a burst, as in GCRA: requests are spaced [`interval`](Self::interval)
/// apart on average, and up to [`burst`](Self::burst) may go at once after a quiet spell.
///
/// ```
/// use std::time::Duration;
/// use apalis_webhooks::layers::Limit;
///
/// let limit = Limit::per_second(10).burst(20);
/// assert_eq!(limit.interval(), Duration::from_millis(100));
/// assert_eq!(Limit::per_minute(0).interval(), Duration::from_secs(60)); // at least one
/// ```
///
/// Serialized (in jobs and registries) as `{"interval_us": …, "burst": …}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(from = "Stored", into = "Stored")]
pub struct Limit {
    interval: Duration,
    burst: u32,
}

/// How a [`Limit`] is stored; read back through the same clamps as the constructors.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    interval_us: u64,
    burst: u32,
}

impl From<Stored> for Limit {
    fn from(stored: Stored) -> Self {
        Limit {
            interval: Duration::from_micros(stored.interval_us.max(1)),
            burst: stored.burst.max(1),
        }
    }
}

impl From<Limit> for Stored {
    fn from(limit: Limit) -> Self {
        Stored {
            interval_us: u64::try_from(limit.interval.as_micros()).unwrap_or(u64::MAX),
            burst: limit.burst,
        }
    }
}

impl Limit {
    /// `n` requests a second (at least one), burst `n`.
    pub fn per_second(n: u32) -> Self {
        Self::per(n, Duration::from_secs(1))
    }

    /// `n` requests a minute (at least one), burst `n`.
    pub fn per_minute(n: u32) -> Self {
        Self::per(n, Duration::from_secs(60))
    }

    /// `n` requests per `period` (at least one, and at least a microsecond apart), burst `n`.
    pub fn per(n: u32, period: Duration) -> Self {
        let n = n.max(1);
        Self {
            interval: (period / n).max(Duration::from_micros(1)),
            burst: n,
        }
    }

    /// Allows `burst` requests at once (at least one).
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = burst.max(1);
        self
    }

    /// Average time between requests.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Requests allowed at once.
    pub fn burst_size(&self) -> u32 {
        self.burst
    }

    pub(crate) fn quota(&self) -> governor::Quota {
        let burst = std::num::NonZeroU32::new(self.burst).unwrap_or(std::num::NonZeroU32::MIN);
        // `interval` is at least a microsecond, so a quota exists; per-second as a fallback.
        governor::Quota::with_period(self.interval)
            .unwrap_or_else(|| governor::Quota::per_second(burst))
            .allow_burst(burst)
    }
}
