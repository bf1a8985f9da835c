//! The `metrics` facade calls (feature `metrics`); names and labels are listed in the module
//! docs of [`crate::observe`].

use metrics::{counter, histogram};

use super::Settled;
use crate::{
    job::WebhookJob,
    outcome::{AttemptResult, DeferReason},
    report::DeadLetterReason,
};

pub(super) fn settled(job: &WebhookJob, result: &AttemptResult, settled: Settled) {
    let endpoint = job.endpoint().to_owned();
    let outcome = settled.label();
    counter!("webhook_attempts_total", "endpoint" => endpoint.clone(), "outcome" => outcome).increment(1);
    if let Some(duration) = result.duration() {
        histogram!("webhook_attempt_duration_seconds", "endpoint" => endpoint.clone(), "outcome" => outcome)
            .record(duration.as_secs_f64());
    }
    match settled {
        Settled::RetryScheduled => counter!("webhook_retries_total", "endpoint" => endpoint).increment(1),
        Settled::DeadLettered(reason) => {
            counter!("webhook_dead_letters_total", "endpoint" => endpoint, "reason" => dead_letter_label(reason))
                .increment(1)
        }
        Settled::Deferred(reason) => {
            counter!("webhook_deferrals_total", "endpoint" => endpoint, "reason" => defer_label(reason)).increment(1)
        }
        Settled::Delivered => {}
    }
}

#[cfg(feature = "registry")]
pub(super) fn endpoint_disabled(job: &WebhookJob) {
    counter!("webhook_endpoints_disabled_total", "endpoint" => job.endpoint().to_owned()).increment(1);
}

fn defer_label(reason: DeferReason) -> &'static str {
    match reason {
        DeferReason::RateLimited => "rate_limited",
        DeferReason::CircuitOpen => "circuit_open",
        DeferReason::LimiterUnavailable => "limiter_unavailable",
        DeferReason::SecretStoreUnavailable => "secret_store_unavailable",
        DeferReason::EndpointBusy => "endpoint_busy",
    }
}

fn dead_letter_label(reason: DeadLetterReason) -> &'static str {
    match reason {
        DeadLetterReason::AttemptsExhausted => "attempts_exhausted",
        DeadLetterReason::EndpointGone => "endpoint_gone",
        DeadLetterReason::Fatal => "fatal",
        DeadLetterReason::InfrastructureFailed => "infrastructure_failed",
        DeadLetterReason::OutcomeNotStored => "outcome_not_stored",
        DeadLetterReason::DeferredTooLong => "deferred_too_long",
        DeadLetterReason::Erased => "erased",
        DeadLetterReason::WorkerWithoutLines => "worker_without_lines",
        DeadLetterReason::Parked => "parked",
    }
}
