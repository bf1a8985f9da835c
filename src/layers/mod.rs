//! Tower layers around the delivery service that protect receivers: [`RateLimitLayer`] and
//! [`CircuitBreakerLayer`].
//!
//! Both **defer** instead of failing: a delivery they hold back is answered with
//! [`AttemptResult::Deferred`], and the worker stores the same
//! attempt again, due later. No attempt is counted, no worker slot waits, nothing is
//! dead-lettered for it. Each keeps its state in process memory, or in Redis (feature `redis`)
//! so that every worker of a fleet shares one budget and one breaker per endpoint.
//!
//! Every deferral is capped: whatever a receiver's `Retry-After`, a stored state or a limit
//! says, neither layer defers a delivery by more than its `max_deferral` (one hour by default,
//! [`DEFAULT_MAX_DEFERRAL`]); a delivery held back longer comes back then and is checked again.
//!
//! Compose them outside the signer, breaker first, so that a held-back delivery is neither
//! signed nor counted against a budget:
//!
//! ```
//! use std::time::Duration;
//! use apalis_webhooks::{layers::{CircuitBreakerLayer, Limit, RateLimitLayer}, signing::SigningLayer};
//! use tower::ServiceBuilder;
//!
//! let layers = ServiceBuilder::new()
//!     .layer(CircuitBreakerLayer::default())
//!     .layer(RateLimitLayer::per_endpoint(Limit::per_second(20).burst(40)).global(Limit::per_second(500)))
//!     .layer(SigningLayer::new());
//! // WebhookWorker::new(storage).service_with(layers)
//! # drop(layers);
//! ```

pub mod circuit_breaker;
pub mod rate_limit;
pub(crate) mod signing;
mod spread;

pub use crate::limit::Limit;
pub use circuit_breaker::{
    BreakerConfig, BreakerState, CircuitBreakerLayer, CircuitBreakerService, Phase, StateChange, Trip,
};
pub use rate_limit::{RateLimitLayer, RateLimitService};

use std::time::Duration;

use crate::outcome::AttemptResult;

/// The longest [`RateLimitLayer`] and [`CircuitBreakerLayer`] defer a delivery unless
/// configured otherwise (their `max_deferral`): one hour.
pub const DEFAULT_MAX_DEFERRAL: Duration = Duration::from_secs(3600);

/// A configured `max_deferral`: at least a millisecond, at most
/// [`DeliveryPolicy::MAX_DELAY`](crate::policy::DeliveryPolicy::MAX_DELAY).
pub(crate) fn deferral_cap(cap: Duration) -> Duration {
    cap.clamp(Duration::from_millis(1), crate::clock::MAX_DELAY)
}

/// Takes the service `poll_ready` readied, for a call that outlives `&mut self`, and leaves a
/// clone in its place for the next request (the usual tower pattern).
pub(crate) fn take_ready<S: Clone>(slot: &mut S) -> S {
    let clone = slot.clone();
    std::mem::replace(slot, clone)
}

/// Whether an attempt's result says the endpoint is unwell: transport errors and timeouts,
/// 5xx and 429. Other 4xx mean the endpoint is up and answering.
pub(crate) fn endpoint_failed(result: &AttemptResult) -> Option<bool> {
    match result {
        AttemptResult::Transport { .. } => Some(true),
        AttemptResult::Response { status, .. } => Some(*status >= 500 || *status == 429),
        // Never sent: says nothing about the endpoint.
        AttemptResult::Refused { .. } | AttemptResult::Deferred { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{DeferReason, TransportErrorKind, response};

    #[test]
    fn breakers_count_transport_errors_5xx_and_429_but_not_other_4xx() {
        for status in [500, 502, 503, 504, 429] {
            assert_eq!(endpoint_failed(&response(status)), Some(true), "{status}");
        }
        for status in [200, 204, 301, 400, 401, 404, 410, 422] {
            assert_eq!(endpoint_failed(&response(status)), Some(false), "{status}");
        }
        let timeout = AttemptResult::Transport {
            kind: TransportErrorKind::Timeout,
            message: String::new(),
            duration: Duration::ZERO,
        };
        assert_eq!(endpoint_failed(&timeout), Some(true));
        let deferred = AttemptResult::Deferred {
            delay: Duration::ZERO,
            reason: DeferReason::RateLimited,
        };
        assert_eq!(endpoint_failed(&deferred), None);
        assert_eq!(endpoint_failed(&AttemptResult::Refused { reason: String::new() }), None);
    }
}
