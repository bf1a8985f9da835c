//! What deliveries report: the result an attempt stores ([`DeliveryReport`]), a dead letter and
//! its reason, and the events hooks and observers receive ([`DeliveryEvent`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{
    endpoint_id::EndpointId,
    job::WebhookJob,
    outcome::{AttemptResult, DeferReason},
    record::AttemptRecord,
};

/// What a finished attempt reports to apalis; stored as the task's result.
///
/// A task whose delivery continues in a later task ends `Done` with
/// [`DeliveryReport::RetryScheduled`]: it is superseded, not delivered and not dead.
/// Dead letters are tasks in the backend's `Killed` state (see [`DeadLetter`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeliveryReport {
    /// The receiver answered 2xx.
    Delivered {
        /// The attempt.
        #[serde(flatten)]
        record: AttemptRecord,
    },
    /// This attempt failed; the next one is stored in the backend.
    RetryScheduled {
        /// The attempt that failed.
        #[serde(flatten)]
        record: AttemptRecord,
        /// Unix seconds at which the next attempt becomes due.
        next_attempt_at: u64,
    },
    /// This dead letter was discarded from the dead letters.
    Discarded {
        /// The last attempt before the delivery died.
        #[serde(flatten)]
        record: AttemptRecord,
        /// Why it had died.
        reason: DeadLetterReason,
    },
    /// This dead letter was replayed: the delivery goes on under the same webhook id.
    Replayed {
        /// The last attempt before the delivery died.
        #[serde(flatten)]
        record: AttemptRecord,
        /// Why it had died.
        reason: DeadLetterReason,
    },
    /// The attempt was not made now (rate limit, open circuit breaker); the same attempt is
    /// stored again, due at `until`.
    Deferred {
        /// The delivery's id.
        webhook_id: crate::job::WebhookId,
        /// The attempt that was put off (it is not counted).
        attempt: u32,
        /// Unix seconds at which it is due again.
        until: u64,
        /// Why.
        reason: DeferReason,
    },
}

impl DeliveryReport {
    /// The attempt this report is about; `None` for a deferral, which made no attempt.
    pub fn record(&self) -> Option<&AttemptRecord> {
        match self {
            Self::Delivered { record }
            | Self::RetryScheduled { record, .. }
            | Self::Replayed { record, .. }
            | Self::Discarded { record, .. } => Some(record),
            Self::Deferred { .. } => None,
        }
    }
}

/// Why a delivery became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The last allowed attempt failed with a retryable outcome.
    AttemptsExhausted,
    /// The receiver answered 410 Gone.
    EndpointGone,
    /// The outcome cannot be fixed by retrying (3xx, most 4xx, a refused request).
    Fatal,
    /// The attempt failed or was put off, and the backend did not store its next attempt for
    /// [`SETTLE_PATIENCE`](crate::worker::SETTLE_PATIENCE). Replay it once the backend is back.
    OutcomeNotStored,
    /// The backend holds the task as finished and failed without a dead letter of this crate:
    /// apalis ran out of its own attempts after the worker failed for a reason of the
    /// infrastructure on every try (storing the next attempt, say), or killed the task itself.
    /// Only the `WebhookStore` reports it (backend features); the record's `error` holds the
    /// last error text the backend stored.
    InfrastructureFailed,
    /// The attempt was put off (rate limits, an open circuit breaker, an unreachable secret
    /// store) for longer than the delivery's
    /// [`defer_horizon`](crate::policy::DeliveryPolicy::defer_horizon); the record's `error` says what
    /// held it up last.
    DeferredTooLong,
    /// The delivery was erased ([`WebhookStore::erase`]) before it was delivered or died: it is
    /// never sent, and cannot be replayed.
    ///
    /// [`WebhookStore::erase`]: crate::store::WebhookStore::erase
    Erased,
    /// An ordered delivery reached a worker without the ordered lines it was dispatched into
    /// ([`WebhookWorker::ordered`], or a worker built without the `ordering` feature): it was
    /// not sent, since sending it could break its key's order. Replay it (a replay goes outside
    /// its line) or give the worker its lines.
    ///
    /// [`WebhookWorker::ordered`]: crate::WebhookWorker::ordered
    WorkerWithoutLines,
    /// The delivery was fanned out while its registry endpoint was disabled with
    /// [`WhenDisabled::Park`](crate::registry::WhenDisabled::Park): it was stored and never
    /// sent. [`WebhookStore::recover`](crate::store::WebhookStore::recover) sends it once the
    /// endpoint is enabled again.
    Parked,
}

/// A delivery that will not be attempted again. Returned to apalis inside an
/// [`AbortError`](apalis_core::error::AbortError), which puts the task in the backend's `Killed` state with this text as its
/// last result.
///
/// Displays as [`DEAD_LETTER_PREFIX`] followed by the record as JSON, so that the backend's
/// stored error text is both readable in logs and parsed back by the dead-letter listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Why.
    pub reason: DeadLetterReason,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// The last attempt made.
    #[serde(flatten)]
    pub record: AttemptRecord,
}

/// How the text of a [`DeadLetter`] starts.
pub const DEAD_LETTER_PREFIX: &str = "webhook dead-lettered: ";

impl fmt::Display for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let json = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        write!(f, "{DEAD_LETTER_PREFIX}{json}")
    }
}

impl DeadLetter {
    /// Reads a dead letter back from the error text a backend stored (the text may carry
    /// apalis's own prefix, such as `AbortError: `).
    pub fn from_stored_error(text: &str) -> Option<Self> {
        let start = text.find(DEAD_LETTER_PREFIX)? + DEAD_LETTER_PREFIX.len();
        serde_json::from_str(&text[start..]).ok()
    }
}

/// Something that happened to a delivery, passed to [`WebhookWorker::on_event`](crate::WebhookWorker::on_event) hooks.
#[derive(Debug)]
#[non_exhaustive]
pub enum DeliveryEvent<'a> {
    /// The receiver answered 2xx.
    Delivered {
        /// The job.
        job: &'a WebhookJob,
        /// The attempt.
        result: &'a AttemptResult,
    },
    /// The attempt failed and the next one is stored.
    RetryScheduled {
        /// The job (the attempt that failed).
        job: &'a WebhookJob,
        /// What happened.
        result: &'a AttemptResult,
        /// Unix seconds at which the next attempt becomes due.
        next_attempt_at: u64,
    },
    /// The receiver answered 410 Gone: disable this subscription. A
    /// [`DeliveryEvent::DeadLettered`] follows.
    EndpointGone {
        /// The job.
        job: &'a WebhookJob,
    },
    /// The attempt was put off without being made (rate limit, open circuit breaker).
    Deferred {
        /// The job (the attempt that was put off).
        job: &'a WebhookJob,
        /// Why.
        reason: DeferReason,
        /// Unix seconds at which it is due again.
        until: u64,
    },
    /// The worker disabled the job's registry endpoint (it answered 410 Gone, or failed for
    /// [`disable_endpoints_after`]); it receives
    /// nothing more until the app enables it again.
    ///
    /// [`disable_endpoints_after`]: crate::WebhookWorker::disable_endpoints_after
    EndpointDisabled {
        /// The job whose attempt decided it.
        job: &'a WebhookJob,
        /// The endpoint.
        endpoint_id: &'a EndpointId,
        /// Why, as stored in the registry.
        reason: &'a str,
    },
    /// The delivery will not be attempted again.
    DeadLettered {
        /// The job.
        job: &'a WebhookJob,
        /// Why, with the last status or error.
        dead_letter: &'a DeadLetter,
    },
}
