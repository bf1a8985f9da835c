//! Settling an attempt: what its outcome stores in the backend, and which dead letter it becomes.

use super::*;

/// Tries of one backend write whose repetition is harmless (an idempotent push, a line move):
/// capped backoff between tries, each try bounded by [`STORE_TRY_TIMEOUT`], for at most
/// [`SETTLE_PATIENCE`]. The attempt's outcome is stored once the backend answers, and the HTTP
/// request is never repeated for it.
pub(super) struct Patience {
    what: &'static str,
    deadline: tokio::time::Instant,
    backoff: Backoff,
}

impl Patience {
    pub(super) fn new(what: &'static str) -> Self {
        Self {
            what,
            deadline: tokio::time::Instant::now() + SETTLE_PATIENCE,
            backoff: Backoff::default(),
        }
    }

    /// Runs one try: `Some` with the final result, or `None` (after the backoff wait) to try
    /// again.
    pub(super) async fn try_once<E: Into<BoxDynError>>(
        &mut self,
        write: impl Future<Output = Result<(), E>>,
    ) -> Option<Result<(), BoxDynError>> {
        let error: BoxDynError = match tokio::time::timeout(STORE_TRY_TIMEOUT, write).await {
            Ok(Ok(())) => return Some(Ok(())),
            Ok(Err(error)) => error.into(),
            Err(_) => format!("no answer within {STORE_TRY_TIMEOUT:?}").into(),
        };
        if tokio::time::Instant::now() >= self.deadline {
            return Some(Err(error));
        }
        tracing::warn!(%error, "{} failed; trying again", self.what);
        self.backoff.wait().await;
        None
    }
}

/// Applies the outcome of one attempt of `job`, run as the task `task_id`.
pub(super) async fn settle<B, K>(
    job: &WebhookJob,
    task_id: Option<&str>,
    started_at_ms: u64,
    result: &AttemptResult,
    backend: &mut B,
    hooks: &Hooks,
) -> Result<DeliveryReport, BoxDynError>
where
    B: WebhookSink<K>,
{
    let policy = job.policy();
    let record = AttemptRecord::new(job, started_at_ms, result);
    let reason = match result.classify(policy) {
        Outcome::Delivered => {
            tracing::debug!(status = result.status(), "delivered");
            observe::settled(job, result, Settled::Delivered);
            hooks.emit(&DeliveryEvent::Delivered { job, result });
            return Ok(DeliveryReport::Delivered { record });
        }
        Outcome::Retry { retry_after } if job.attempt() < policy.max_attempts => {
            let delay = policy.next_delay(job.attempt(), retry_after);
            let next_attempt_at = unix_seconds_after(delay);
            let next = job.next_attempt();
            let stored = patiently!(
                "storing the next attempt",
                backend.push_job(next.clone(), Some(next_attempt_at))
            );
            if let Err(error) = stored {
                return outcome_not_stored(job, record, result, hooks, &error);
            }
            tracing::info!(
                status = result.status(),
                error = result.error(),
                next_attempt_at,
                "retry scheduled"
            );
            observe::settled(job, result, Settled::RetryScheduled);
            hooks.emit(&DeliveryEvent::RetryScheduled {
                job,
                result,
                next_attempt_at,
            });
            return Ok(DeliveryReport::RetryScheduled {
                record,
                next_attempt_at,
            });
        }
        Outcome::Retry { .. } => DeadLetterReason::AttemptsExhausted,
        Outcome::Gone => {
            hooks.emit(&DeliveryEvent::EndpointGone { job });
            DeadLetterReason::EndpointGone
        }
        Outcome::Fatal => DeadLetterReason::Fatal,
        Outcome::Deferred { delay, reason } => {
            let now = unix_seconds();
            let since = job.deferred_since().unwrap_or(now);
            let horizon = policy.defer_horizon();
            if now.saturating_sub(since) >= horizon.as_secs() {
                return deferred_too_long(job, record, result, reason, horizon, hooks);
            }
            let until = unix_seconds_after(delay.max(deferral_floor(job.deferrals())));
            let deferred = job.deferred(now);
            let report = DeliveryReport::Deferred {
                webhook_id: job.webhook_id().clone(),
                attempt: job.attempt(),
                until,
                reason,
            };
            let stored_result = serde_json::json!({ "Ok": &report }).to_string();
            let stored = patiently!("storing the deferred attempt", async {
                match task_id {
                    // The running task itself moves back to the queue: nothing new is stored.
                    Some(task_id) => backend
                        .defer_task(task_id, deferred.clone(), until, &stored_result)
                        .await
                        .map(drop),
                    None => backend.push_job(deferred.clone(), Some(until)).await,
                }
            });
            if let Err(error) = stored {
                return outcome_not_stored(job, record, result, hooks, &error);
            }
            tracing::debug!(%reason, until, "deferred");
            observe::settled(job, result, Settled::Deferred(reason));
            hooks.emit(&DeliveryEvent::Deferred { job, reason, until });
            return Ok(report);
        }
    };
    Err(dead_letter(job, reason, record, result, hooks))
}

/// The attempt has been put off for longer than the delivery's horizon: it becomes a dead
/// letter rather than being put off again.
fn deferred_too_long(
    job: &WebhookJob,
    mut record: AttemptRecord,
    result: &AttemptResult,
    reason: DeferReason,
    horizon: Duration,
    hooks: &Hooks,
) -> Result<DeliveryReport, BoxDynError> {
    record.error = Some(format!(
        "put off for longer than the defer horizon ({}s); last held up by: {reason}",
        horizon.as_secs()
    ));
    Err(dead_letter(
        job,
        DeadLetterReason::DeferredTooLong,
        record,
        result,
        hooks,
    ))
}

/// Kills the task as a dead letter: apalis stores it `Killed`, with the record as its result.
pub(super) fn dead_letter(
    job: &WebhookJob,
    reason: DeadLetterReason,
    record: AttemptRecord,
    result: &AttemptResult,
    hooks: &Hooks,
) -> BoxDynError {
    let dead_letter = DeadLetter {
        reason,
        max_attempts: job.policy().max_attempts,
        record,
    };
    tracing::warn!(status = result.status(), error = result.error(), ?reason, "dead letter");
    observe::settled(job, result, Settled::DeadLettered(reason));
    hooks.emit(&DeliveryEvent::DeadLettered {
        job,
        dead_letter: &dead_letter,
    });
    Box::new(AbortError::new(dead_letter))
}

/// The next attempt could not be stored for [`SETTLE_PATIENCE`]: rather than have apalis run
/// this attempt again (a repeated request, then a task stuck `Failed`), the delivery becomes
/// a dead letter that says so, stored with the acknowledgement once the backend is back.
fn outcome_not_stored(
    job: &WebhookJob,
    mut record: AttemptRecord,
    result: &AttemptResult,
    hooks: &Hooks,
    error: &BoxDynError,
) -> Result<DeliveryReport, BoxDynError> {
    tracing::error!(%error, "the backend did not store the attempt's outcome");
    let attempt_error = record.error.take().map(|e| format!("{e}; ")).unwrap_or_default();
    record.error = Some(format!("{attempt_error}outcome not stored: {error}"));
    Err(dead_letter(
        job,
        DeadLetterReason::OutcomeNotStored,
        record,
        result,
        hooks,
    ))
}

/// Tells the registry how an attempt of one of its endpoints went, once the outcome is stored.
#[cfg(feature = "registry")]
pub(super) async fn report_health(
    health: &EndpointHealth,
    job: &WebhookJob,
    endpoint_id: &EndpointId,
    result: &AttemptResult,
    hooks: &Hooks,
) {
    let verdict = match result.classify(job.policy()) {
        Outcome::Delivered => {
            health.succeeded(endpoint_id).await;
            return;
        }
        Outcome::Deferred { .. } => return,
        Outcome::Gone => health.gone(endpoint_id).await,
        Outcome::Retry { .. } | Outcome::Fatal => health.failed(endpoint_id).await,
    };
    if let Verdict::Disabled(reason) = verdict {
        observe::endpoint_disabled(job);
        hooks.emit(&DeliveryEvent::EndpointDisabled {
            job,
            endpoint_id,
            reason: &reason,
        });
    }
}

/// An ordered delivery reached a worker without lines (`WebhookWorker::ordered`, which needs
/// the `ordering` feature).
#[derive(Debug, thiserror::Error)]
#[error(
    "ordered delivery on a worker without lines: build it with the `ordering` feature and configure \
     WebhookWorker::ordered with the lines it was dispatched into"
)]
pub(super) struct NoLines;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_deferrals_back_off_to_a_cap() {
        let floors: Vec<u64> = (0..10).map(|n| deferral_floor(n).as_secs()).collect();
        assert_eq!(floors, [0, 1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(deferral_floor(u32::MAX), MAX_DEFERRAL_BACKOFF);
    }
}

#[cfg(test)]
#[path = "settle_tests.rs"]
mod settle_tests;
