//! Observability: metrics (feature `metrics`), one tracing span per attempt, and in-process
//! per-endpoint statistics ([`EndpointStats`]).
//!
//! # Metrics
//!
//! With the `metrics` feature the worker records through the [`metrics`](https://docs.rs/metrics)
//! facade, to whatever recorder the app installed (Prometheus, StatsD, OpenTelemetry…).
//! `endpoint` is the job's [`endpoint`](crate::WebhookJob::endpoint) (`host[:port]`).
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `webhook_attempts_total` | counter | `endpoint`, `outcome` | attempts by outcome: `delivered`, `retry_scheduled`, `dead_lettered`, `deferred` |
//! | `webhook_attempt_duration_seconds` | histogram | `endpoint`, `outcome` | request to response read, for attempts that were made |
//! | `webhook_retries_total` | counter | `endpoint` | retries scheduled |
//! | `webhook_dead_letters_total` | counter | `endpoint`, `reason` | `attempts_exhausted`, `endpoint_gone`, `fatal`, `outcome_not_stored`, `deferred_too_long` |
//! | `webhook_deferrals_total` | counter | `endpoint`, `reason` | `rate_limited`, `circuit_open`, `limiter_unavailable`, `secret_store_unavailable` |
//! | `webhook_circuit_breaker_state` | gauge | `endpoint` | 0 closed, 1 half-open, 2 open (set on every change) |
//! | `webhook_endpoints_disabled_total` | counter | `endpoint` | registry endpoints disabled by the worker |
//!
//! # Tracing
//!
//! Every attempt runs in an `INFO` span `webhook.attempt` with OpenTelemetry HTTP client field
//! names:
//!
//! | field | value |
//! |---|---|
//! | `http.request.method` | `POST` |
//! | `url.full` | the URL without query, fragment or credentials, and with token-like path segments (16+ characters mixing letters and digits, as in Slack or Discord hook URLs) replaced by `REDACTED` |
//! | `server.address`, `server.port` | host and port |
//! | `http.response.status_code` | the status, when the receiver answered |
//! | `error.type` | the status code for a non-2xx answer; `timeout`, `connect`, `transport`, `refused` otherwise |
//! | `webhook.id`, `webhook.event`, `webhook.attempt` | the delivery, its event type, the 1-based attempt |
//! | `webhook.outcome` | `delivered`, `retry_scheduled`, `dead_lettered` or `deferred` |
//!
//! # Trace context
//!
//! With the `opentelemetry` feature, dispatch stores the W3C trace context of the current span
//! (as its `tracing-opentelemetry` layer knows it) in the job
//! ([`WebhookJob::trace_context`](crate::WebhookJob::trace_context)). Each `webhook.attempt`
//! span gets it as its OpenTelemetry parent, so one trace runs from the dispatching request
//! through every attempt; each request carries `traceparent` naming the attempt span, and
//! `tracestate`. A stored context is sent by a worker without the feature too (naming the
//! dispatch's span). No scheme signs these headers. See `docs/observability.md`.

#[cfg(feature = "metrics")]
mod metrics;
mod span;
mod stats;
mod trace_context;

pub use stats::{DEFAULT_STATS_CAP, EndpointSnapshot, EndpointStats, LATENCY_WINDOW, LastError};

pub(crate) use span::{attempt_span, record_result};
pub(crate) use trace_context::capture as capture_trace_context;

use crate::{
    job::WebhookJob,
    outcome::{AttemptResult, DeferReason},
    report::DeadLetterReason,
};

/// The `outcome` label of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    Delivered,
    RetryScheduled,
    DeadLettered(DeadLetterReason),
    Deferred(DeferReason),
}

impl Settled {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::RetryScheduled => "retry_scheduled",
            Self::DeadLettered(_) => "dead_lettered",
            Self::Deferred(_) => "deferred",
        }
    }
}

/// Records how an attempt was settled (metrics and the span).
pub(crate) fn settled(job: &WebhookJob, result: &AttemptResult, settled: Settled) {
    tracing::Span::current().record("webhook.outcome", settled.label());
    #[cfg(feature = "metrics")]
    metrics::settled(job, result, settled);
    #[cfg(not(feature = "metrics"))]
    let _ = (job, result);
}

/// The worker disabled a registry endpoint.
#[cfg(feature = "registry")]
pub(crate) fn endpoint_disabled(job: &WebhookJob) {
    #[cfg(feature = "metrics")]
    metrics::endpoint_disabled(job);
    #[cfg(not(feature = "metrics"))]
    let _ = job;
}
