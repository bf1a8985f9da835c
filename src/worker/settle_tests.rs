//! The settle decision table, the crate's core: for each kind of attempt result, what is stored
//! in the backend and what the attempt reports (or which dead letter it becomes).

use std::time::Duration;

use super::*;
use crate::{Secret, WebhookSubscription, sink::Deferral};

/// Records what settle stores; `fail` makes every write fail.
#[derive(Default)]
struct Backend {
    pushed: Vec<(WebhookJob, Option<u64>)>,
    deferred: Vec<(String, WebhookJob, u64)>,
    fail: bool,
}

impl WebhookSink<()> for Backend {
    type Error = std::io::Error;

    async fn push_job(&mut self, job: WebhookJob, run_at: Option<u64>) -> Result<(), Self::Error> {
        if self.fail {
            return Err(std::io::Error::other("backend down"));
        }
        self.pushed.push((job, run_at));
        Ok(())
    }

    async fn defer_task(
        &mut self,
        task_id: &str,
        job: WebhookJob,
        run_at: u64,
        _: &str,
    ) -> Result<Deferral, Self::Error> {
        if self.fail {
            return Err(std::io::Error::other("backend down"));
        }
        self.deferred.push((task_id.to_owned(), job, run_at));
        Ok(Deferral::Moved)
    }
}

fn job(attempts: u32) -> WebhookJob {
    WebhookSubscription::new("https://example.com/hook", Secret::generate())
        .max_attempts(attempts)
        .retry_schedule(crate::retry::RetrySchedule::schedule([Duration::from_secs(30)]).with_jitter(0.0))
        .job("order.created", &1)
        .unwrap()
}

fn response(status: u16) -> AttemptResult {
    AttemptResult::Response {
        status,
        retry_after: None,
        body_excerpt: String::new(),
        duration: Duration::ZERO,
    }
}

fn deferred() -> AttemptResult {
    AttemptResult::Deferred {
        delay: Duration::from_secs(10),
        reason: DeferReason::CircuitOpen,
    }
}

async fn run(job: &WebhookJob, result: &AttemptResult, backend: &mut Backend) -> Result<DeliveryReport, String> {
    settle(job, Some("task-1"), 0, result, backend, &Hooks::default())
        .await
        .map_err(|error| error.to_string())
}

fn dead_letter_reason(error: &str) -> DeadLetterReason {
    DeadLetter::from_stored_error(error)
        .unwrap_or_else(|| panic!("not a dead letter: {error}"))
        .reason
}

#[tokio::test]
async fn a_2xx_is_delivered_and_stores_nothing_more() {
    let mut backend = Backend::default();
    let report = run(&job(3), &response(204), &mut backend).await.unwrap();
    assert!(matches!(report, DeliveryReport::Delivered { .. }), "{report:?}");
    assert!(backend.pushed.is_empty() && backend.deferred.is_empty());
}

#[tokio::test]
async fn a_retryable_failure_with_attempts_left_stores_the_next_attempt_when_due() {
    let mut backend = Backend::default();
    let before = unix_seconds();
    let report = run(&job(3), &response(503), &mut backend).await.unwrap();
    let DeliveryReport::RetryScheduled { next_attempt_at, .. } = report else {
        panic!("{report:?}");
    };
    assert_eq!(backend.pushed.len(), 1);
    let (next, run_at) = &backend.pushed[0];
    assert_eq!(next.attempt(), 2);
    assert_eq!(*run_at, Some(next_attempt_at));
    // Not due before the schedule's 30 s.
    assert!(next_attempt_at >= before + 30, "{next_attempt_at} vs {before}");
}

#[tokio::test]
async fn the_last_attempt_410_and_fatal_answers_are_dead_letters_storing_nothing() {
    for (attempts, result, reason) in [
        (1, response(503), DeadLetterReason::AttemptsExhausted),
        (3, response(410), DeadLetterReason::EndpointGone),
        (3, response(400), DeadLetterReason::Fatal),
        (
            3,
            AttemptResult::Refused {
                reason: "no key".into(),
            },
            DeadLetterReason::Fatal,
        ),
    ] {
        let mut backend = Backend::default();
        let error = run(&job(attempts), &result, &mut backend).await.unwrap_err();
        assert_eq!(dead_letter_reason(&error), reason, "{result:?}");
        assert!(backend.pushed.is_empty() && backend.deferred.is_empty(), "{result:?}");
    }
}

#[tokio::test]
async fn a_deferral_moves_the_running_task_without_using_an_attempt() {
    let mut backend = Backend::default();
    let job = job(3);
    let report = run(&job, &deferred(), &mut backend).await.unwrap();
    assert!(
        matches!(report, DeliveryReport::Deferred { attempt: 1, .. }),
        "{report:?}"
    );
    assert!(backend.pushed.is_empty());
    let (task_id, moved, _) = &backend.deferred[0];
    assert_eq!(task_id, "task-1");
    assert_eq!((moved.attempt(), moved.deferrals()), (1, 1));
}

#[tokio::test]
async fn a_deferral_past_the_horizon_is_a_dead_letter() {
    let mut backend = Backend::default();
    // Deferred since the epoch: far past any horizon.
    let job = job(3).deferred(0);
    let error = run(&job, &deferred(), &mut backend).await.unwrap_err();
    assert_eq!(dead_letter_reason(&error), DeadLetterReason::DeferredTooLong);
    assert!(backend.deferred.is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_outcome_the_backend_never_stores_is_a_dead_letter_after_the_patience() {
    for result in [response(503), deferred()] {
        let mut backend = Backend {
            fail: true,
            ..Backend::default()
        };
        let error = run(&job(3), &result, &mut backend).await.unwrap_err();
        assert_eq!(
            dead_letter_reason(&error),
            DeadLetterReason::OutcomeNotStored,
            "{result:?}"
        );
    }
}
