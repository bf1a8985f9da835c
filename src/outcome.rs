//! What one attempt produced, and what it means for the delivery.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::policy::DeliveryPolicy;
pub use crate::status_set::{StatusRange, StatusSet};

/// The result of one delivery attempt, as the HTTP service saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttemptResult {
    /// The receiver answered with a status line.
    Response {
        /// HTTP status code.
        status: u16,
        /// `Retry-After`, parsed (seconds or HTTP-date), when present and valid.
        retry_after: Option<Duration>,
        /// The start of the response body (capped), lossily decoded as UTF-8.
        body_excerpt: String,
        /// Time from sending the request to the end of the capped body read.
        duration: Duration,
    },
    /// No usable answer: connect error, timeout, broken or malformed response.
    Transport {
        /// What went wrong.
        kind: TransportErrorKind,
        /// A description, without secrets or URL credentials.
        message: String,
        /// Time until the failure.
        duration: Duration,
    },
    /// The request was never sent, for a reason that retrying cannot fix: a target the
    /// [`EgressPolicy`](crate::ssrf::EgressPolicy) refuses, a secret that yields no key.
    Refused {
        /// Why.
        reason: String,
    },
    /// The request was not sent now, for a reason that time fixes (an open circuit breaker,
    /// a spent rate budget, a secret store that cannot answer): the same attempt runs again
    /// after `delay`, without counting as one.
    Deferred {
        /// How long to wait before trying the same attempt again.
        delay: Duration,
        /// Why.
        reason: DeferReason,
    },
}

/// Why an attempt was put off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeferReason {
    /// The endpoint's (or the global) rate budget is spent, or the receiver asked to slow down.
    RateLimited,
    /// The endpoint's circuit breaker is open (or half-open with its probes out).
    CircuitOpen,
    /// The shared limiter state (Redis) could not be reached; nothing was sent.
    LimiterUnavailable,
    /// The [`SecretStore`](crate::secret_store::SecretStore) could not answer (an error or a timeout), so the
    /// attempt could not be signed; nothing was sent.
    SecretStoreUnavailable,
}

impl std::fmt::Display for DeferReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::RateLimited => "rate limited",
            Self::CircuitOpen => "circuit open",
            Self::LimiterUnavailable => "limiter state unavailable",
            Self::SecretStoreUnavailable => "secret store unavailable",
        })
    }
}

/// Kinds of transport failure; every one of them is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TransportErrorKind {
    /// The connection could not be made.
    Connect,
    /// The attempt timed out (connecting, waiting for headers, or reading the body).
    Timeout,
    /// Anything else: reset connections, malformed responses, TLS failures.
    Other,
}

/// What an attempt means for the delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// 2xx: done.
    Delivered,
    /// Worth another attempt (408, 429, 5xx and transport errors by default).
    Retry {
        /// The receiver's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// 410 Gone: the endpoint asks not to be called again.
    Gone,
    /// Retrying cannot help (3xx, other 4xx, refused requests).
    Fatal,
    /// Not attempted now: run the same attempt again after `delay`.
    Deferred {
        /// How long to wait.
        delay: Duration,
        /// Why.
        reason: DeferReason,
    },
}

impl AttemptResult {
    /// What this attempt means under `policy`.
    pub fn classify(&self, policy: &DeliveryPolicy) -> Outcome {
        match self {
            Self::Transport { .. } => Outcome::Retry { retry_after: None },
            Self::Refused { .. } => Outcome::Fatal,
            Self::Deferred { delay, reason } => Outcome::Deferred {
                delay: *delay,
                reason: *reason,
            },
            Self::Response {
                status, retry_after, ..
            } => match *status {
                200..=299 => Outcome::Delivered,
                code if policy.retry_statuses.contains(code) => Outcome::Retry {
                    retry_after: *retry_after,
                },
                410 => Outcome::Gone,
                _ => Outcome::Fatal,
            },
        }
    }

    /// The status code, if the receiver answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Response { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// A one-line description of a failure, `None` for a response.
    pub fn error(&self) -> Option<String> {
        match self {
            Self::Response { .. } => None,
            Self::Transport { kind, message, .. } => Some(format!("{kind:?}: {message}").to_lowercase()),
            Self::Refused { reason } => Some(format!("refused: {reason}")),
            Self::Deferred { reason, .. } => Some(format!("deferred: {reason}")),
        }
    }

    /// How long the attempt took, when it was made.
    pub fn duration(&self) -> Option<Duration> {
        match self {
            Self::Response { duration, .. } | Self::Transport { duration, .. } => Some(*duration),
            Self::Refused { .. } | Self::Deferred { .. } => None,
        }
    }
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP-date (a date in the past means now),
/// clamped to [`DeliveryPolicy::MAX_DELAY`]. Delay-seconds too large for a `u64` are a very
/// long delay, not an invalid one.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => Duration::MAX,
        Err(_) => {
            let date = httpdate::parse_http_date(value).ok()?;
            date.duration_since(now).unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(DeliveryPolicy::MAX_DELAY))
}

/// An answer with `status` and nothing else, for tests.
#[cfg(test)]
pub(crate) fn response(status: u16) -> AttemptResult {
    AttemptResult::Response {
        status,
        retry_after: None,
        body_excerpt: String::new(),
        duration: Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_status_matrix() {
        let policy = DeliveryPolicy::default();
        let cases = [
            (200, Outcome::Delivered),
            (204, Outcome::Delivered),
            (299, Outcome::Delivered),
            (301, Outcome::Fatal),
            (302, Outcome::Fatal),
            (400, Outcome::Fatal),
            (401, Outcome::Fatal),
            (404, Outcome::Fatal),
            (408, Outcome::Retry { retry_after: None }),
            (410, Outcome::Gone),
            (422, Outcome::Fatal),
            (429, Outcome::Retry { retry_after: None }),
            (500, Outcome::Retry { retry_after: None }),
            (503, Outcome::Retry { retry_after: None }),
            (599, Outcome::Retry { retry_after: None }),
        ];
        for (status, expected) in cases {
            assert_eq!(response(status).classify(&policy), expected, "status {status}");
        }
        let timeout = AttemptResult::Transport {
            kind: TransportErrorKind::Timeout,
            message: "t".into(),
            duration: Duration::ZERO,
        };
        assert_eq!(timeout.classify(&policy), Outcome::Retry { retry_after: None });
        assert_eq!(
            AttemptResult::Refused { reason: "x".into() }.classify(&policy),
            Outcome::Fatal
        );
    }

    #[test]
    fn status_set_edits() {
        assert_eq!(
            StatusSet::default(),
            StatusSet::empty().with(408).with(429).with(500..=599)
        );
        let set = StatusSet::default().without(501).with(425);
        assert!(set.contains(500) && set.contains(502) && set.contains(425));
        assert!(!set.contains(501) && !set.contains(404));
        assert_eq!(
            StatusSet::empty().with(500..=502).without(501).0,
            vec![[500, 500], [502, 502]]
        );
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(90)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn huge_retry_after_values_are_clamped_not_overflowed() {
        let now = SystemTime::now();
        let ceiling = DeliveryPolicy::MAX_DELAY;
        for value in [
            "18446744073709551615",
            "18446744073709551616",
            "9300000000000",
            "99999999999999999999999999",
        ] {
            let parsed = parse_retry_after(value, now).expect(value);
            assert!(
                parsed > Duration::from_secs(3600) && parsed <= ceiling,
                "{value}: {parsed:?}"
            );
        }
        let far = httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799));
        assert!(parse_retry_after(&far, now).unwrap() <= ceiling);
    }
}
