//! [`AttemptRecord`]: what one finished attempt leaves in the backend.

use serde::{Deserialize, Serialize};

use crate::{
    job::{WebhookId, WebhookJob},
    outcome::AttemptResult,
};

/// One finished attempt, stored in the backend as part of its task's result (inside
/// [`DeliveryReport`](crate::report::DeliveryReport) or [`DeadLetter`](crate::report::DeadLetter)), and read back
/// by the delivery history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AttemptRecord {
    /// The delivery's id.
    pub webhook_id: WebhookId,
    /// 1-based attempt number (restarts at 1 on a replay).
    pub attempt: u32,
    /// 0 for the original delivery, n for its n-th replay.
    #[serde(default)]
    pub replay: u32,
    /// Unix milliseconds at which the attempt started.
    pub started_at_ms: u64,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
    /// The status, if the receiver answered.
    pub status: Option<u16>,
    /// The transport error or refusal, if it did not.
    pub error: Option<String>,
    /// The start of the response body (at most
    /// [`RESPONSE_EXCERPT_BYTES`](crate::delivery::RESPONSE_EXCERPT_BYTES)), if there was one.
    pub response_excerpt: Option<String>,
}

impl AttemptRecord {
    pub(crate) fn new(job: &WebhookJob, started_at_ms: u64, result: &AttemptResult) -> Self {
        Self {
            webhook_id: job.webhook_id().clone(),
            attempt: job.attempt(),
            replay: job.replay(),
            started_at_ms,
            duration_ms: result.duration().map_or(0, |d| d.as_millis() as u64),
            status: result.status(),
            error: result.error(),
            response_excerpt: match result {
                AttemptResult::Response { body_excerpt, .. } if !body_excerpt.is_empty() => Some(body_excerpt.clone()),
                _ => None,
            },
        }
    }
}
