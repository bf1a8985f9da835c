//! Reading apalis tasks back as a delivery's history.

use serde::{Deserialize, Serialize};

use super::{Position, StoreError};
use crate::{
    job::{WebhookId, WebhookJob},
    record::AttemptRecord,
    worker::{DeadLetter, DeadLetterReason, DeliveryReport},
};

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeliveryStatus {
    /// Waiting for, or in, its first attempt (after a replay too).
    Pending,
    /// An attempt failed; the next one is due at `next_attempt_at` (Unix seconds).
    Retrying {
        /// When the next attempt is due.
        next_attempt_at: u64,
    },
    /// The next attempt was put off until `until` (Unix seconds) by a rate limit or an open
    /// circuit breaker.
    Deferred {
        /// When it is due again.
        until: u64,
        /// Why.
        reason: crate::outcome::DeferReason,
    },
    /// The receiver accepted it.
    Delivered,
    /// It is a dead letter.
    Dead {
        /// Why.
        reason: DeadLetterReason,
    },
    /// It was a dead letter and was discarded.
    Discarded {
        /// Why it had died.
        reason: DeadLetterReason,
    },
}

/// A delivery and every attempt made of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeliveryHistory {
    /// The delivery's id.
    pub webhook_id: WebhookId,
    /// Its event type.
    pub event_type: String,
    /// Host of its endpoint.
    pub endpoint_host: String,
    /// Where it stands.
    pub status: DeliveryStatus,
    /// Every finished attempt, oldest first, replays included.
    pub attempts: Vec<AttemptRecord>,
}

/// One apalis task of a webhook queue, as a backend stores it.
#[derive(Debug, Clone)]
pub(crate) struct TaskRow {
    pub(crate) task_id: String,
    pub(crate) job: WebhookJob,
    /// apalis's status name: `Pending`, `Queued`, `Running`, `Done`, `Failed`, `Killed`.
    pub(crate) status: String,
    /// Unix seconds at which the task is due.
    pub(crate) run_at: u64,
    /// apalis's stored result: `{"Ok": report}` or `{"Err": text}`.
    pub(crate) last_result: Option<serde_json::Value>,
}

impl TaskRow {
    pub(crate) fn is_dead(&self) -> bool {
        self.status == "Killed"
    }

    pub(crate) fn dead_letter(&self) -> Option<DeadLetter> {
        let text = self.last_result.as_ref()?.get("Err")?.as_str()?;
        DeadLetter::from_stored_error(text)
    }

    #[cfg(feature = "postgres")]
    pub(crate) fn is_replayed(&self) -> bool {
        matches!(self.report(), Some(DeliveryReport::Replayed { .. }))
    }

    /// A task from the columns the SQL backends store.
    pub(crate) fn from_columns(
        task_id: String,
        job: Vec<u8>,
        status: String,
        run_at: i64,
        last_result: Option<String>,
        done_at: Option<i64>,
    ) -> Result<(Position, Self), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            task_id: task_id.clone(),
            reason,
        };
        let job = serde_json::from_slice(&job).map_err(|e| corrupt(crate::json::describe(&e)))?;
        let last_result = last_result
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(|e| corrupt(crate::json::describe(&e)))?;
        let position = Position {
            died_at: done_at.unwrap_or_default().max(0) as u64,
            task_id: task_id.clone(),
        };
        let row = Self {
            task_id,
            job,
            status,
            run_at: run_at.max(0) as u64,
            last_result,
        };
        Ok((position, row))
    }

    fn report(&self) -> Option<DeliveryReport> {
        serde_json::from_value(self.last_result.as_ref()?.get("Ok")?.clone()).ok()
    }

    /// Replay, attempt, deferral: the order in which a delivery's tasks were made.
    pub(crate) fn order(&self) -> (u32, u32, u32) {
        (self.job.replay(), self.job.attempt(), self.job.deferrals())
    }
}

/// The history of one delivery from all its tasks, in any order.
pub(crate) fn history_from_rows(mut rows: Vec<TaskRow>) -> Option<DeliveryHistory> {
    rows.sort_by_key(TaskRow::order);
    let last = rows.last()?;
    let attempts = rows
        .iter()
        .filter_map(|row| match row.report() {
            Some(report) => report.record().cloned(),
            None if row.is_dead() => row.dead_letter().map(|dead| dead.record),
            None => None,
        })
        .collect();
    let status = match (last.status.as_str(), last.report()) {
        (_, Some(DeliveryReport::Delivered { .. })) => DeliveryStatus::Delivered,
        (_, Some(DeliveryReport::Discarded { reason, .. })) => DeliveryStatus::Discarded { reason },
        (_, Some(DeliveryReport::RetryScheduled { next_attempt_at, .. })) => {
            DeliveryStatus::Retrying { next_attempt_at }
        }
        ("Killed", _) => DeliveryStatus::Dead {
            reason: last.dead_letter().map_or(DeadLetterReason::Fatal, |dead| dead.reason),
        },
        (_, Some(DeliveryReport::Deferred { until, reason, .. })) => DeliveryStatus::Deferred { until, reason },
        // A task that a failure or a deferral scheduled; its due time is in that task's report
        // (Redis forgets a task's due time once it is in the active list).
        _ => match rows.iter().rev().nth(1).and_then(TaskRow::report) {
            Some(DeliveryReport::RetryScheduled { next_attempt_at, .. }) => {
                DeliveryStatus::Retrying { next_attempt_at }
            }
            Some(DeliveryReport::Deferred { until, reason, .. }) => DeliveryStatus::Deferred { until, reason },
            _ if last.job.attempt() > 1 => DeliveryStatus::Retrying {
                next_attempt_at: last.run_at,
            },
            _ => DeliveryStatus::Pending,
        },
    };
    Some(DeliveryHistory {
        webhook_id: last.job.webhook_id().clone(),
        event_type: last.job.event_type().to_owned(),
        endpoint_host: last.job.endpoint_host().to_owned(),
        status,
        attempts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Secret, WebhookSubscription};

    fn row(job: &WebhookJob, status: &str, last_result: serde_json::Value) -> TaskRow {
        TaskRow {
            task_id: format!("t{}", job.attempt()),
            job: job.clone(),
            status: status.into(),
            run_at: 0,
            last_result: Some(last_result),
        }
    }

    #[test]
    fn history_follows_attempt_order_not_row_order() {
        let first = WebhookSubscription::new("https://example.com/hook", Secret::generate())
            .job("e", &1)
            .unwrap();
        let second = first.next_attempt();
        let record = |job: &WebhookJob, status| {
            serde_json::json!({ "webhook_id": job.webhook_id(), "attempt": job.attempt(), "started_at_ms": 0,
                "duration_ms": 1, "status": status, "error": null, "response_excerpt": null })
        };
        let mut retried = record(&first, 503);
        retried["outcome"] = "retry_scheduled".into();
        retried["next_attempt_at"] = 10.into();
        let mut delivered = record(&second, 200);
        delivered["outcome"] = "delivered".into();
        // The backend returned the later attempt first.
        let rows = vec![
            row(&second, "Done", serde_json::json!({ "Ok": delivered })),
            row(&first, "Done", serde_json::json!({ "Ok": retried })),
        ];
        let history = history_from_rows(rows.clone()).unwrap();
        assert_eq!(history.status, DeliveryStatus::Delivered);
        let attempts: Vec<_> = history.attempts.iter().map(|a| (a.attempt, a.status)).collect();
        assert_eq!(attempts, [(1, Some(503)), (2, Some(200))]);
        assert_eq!(rows.iter().max_by_key(|r| r.order()).unwrap().job.attempt(), 2);
    }
}
