//! Reading apalis tasks back as a delivery's history.

use serde::{Deserialize, Serialize};

use super::{Position, StoreError};
use crate::{
    job::{WebhookId, WebhookJob},
    record::AttemptRecord,
    report::{DeadLetter, DeadLetterReason, DeliveryReport},
};

/// Longest error text of a task apalis gave up on that a synthesised dead letter keeps, in
/// bytes (cut at a character boundary).
const MAX_ERROR_TEXT: usize = 2 * 1024;

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
    /// Whether its payload, headers and secrets were erased
    /// ([`WebhookStore::erase`](crate::store::WebhookStore::erase)): what is left is this audit stub.
    #[serde(default)]
    pub erased: bool,
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
    /// How often apalis has run the task.
    pub(crate) attempts: u32,
    /// How often apalis runs it at most: a `Failed` task that reached it is not run again.
    pub(crate) max_attempts: u32,
    /// Unix seconds at which the task last finished; 0 if it never did.
    pub(crate) done_at: u64,
}

/// Whether a task in apalis state `status`, run `attempts` times of at most `max_attempts`,
/// ended without delivering and will not run again: `Killed` (a dead letter of the worker, or
/// a task apalis killed), or `Failed` with apalis's attempts used up. A `Failed` task with
/// attempts left is run again by apalis: it is outstanding, not dead.
pub(crate) fn ended_dead(status: &str, attempts: u32, max_attempts: u32) -> bool {
    match status {
        "Killed" => true,
        "Failed" => attempts >= max_attempts,
        _ => false,
    }
}

impl TaskRow {
    pub(crate) fn is_dead(&self) -> bool {
        ended_dead(&self.status, self.attempts, self.max_attempts)
    }

    /// The dead letter of a dead task: the one the worker stored, or, for a task that ended
    /// without one (apalis gave up on it, or killed it), one made from its last error text
    /// ([`DeadLetterReason::InfrastructureFailed`]). `None` for a task that is not dead.
    pub(crate) fn dead_letter(&self) -> Option<DeadLetter> {
        if !self.is_dead() {
            return None;
        }
        let text = self.error_text();
        let stored = text
            .as_deref()
            .and_then(DeadLetter::from_stored_error)
            .filter(|dead| dead.record.webhook_id == *self.job.webhook_id());
        Some(stored.unwrap_or_else(|| self.infrastructure_failure(text)))
    }

    /// The error text apalis stored as the task's result, if any: `{"Err": text}`.
    fn error_text(&self) -> Option<String> {
        match self.last_result.as_ref()?.get("Err")? {
            serde_json::Value::String(text) => Some(text.clone()),
            serde_json::Value::Null => None,
            other => Some(other.to_string()),
        }
    }

    /// The dead letter of a task that ended without one of the worker's: its last attempt, as
    /// far as the backend knows it, with the backend's error text.
    fn infrastructure_failure(&self, text: Option<String>) -> DeadLetter {
        let error = match text {
            Some(mut text) => {
                if text.len() > MAX_ERROR_TEXT {
                    let mut end = MAX_ERROR_TEXT;
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    text.truncate(end);
                }
                text
            }
            None => format!("the backend holds the task as {} without an error", self.status),
        };
        DeadLetter {
            reason: DeadLetterReason::InfrastructureFailed,
            max_attempts: self.job.policy().max_attempts,
            record: AttemptRecord {
                webhook_id: self.job.webhook_id().clone(),
                attempt: self.job.attempt(),
                replay: self.job.replay(),
                // When it ended: the backend keeps no start time.
                started_at_ms: self.done_at.saturating_mul(1000),
                duration_ms: 0,
                status: None,
                error: Some(error),
                response_excerpt: None,
            },
        }
    }

    /// A task from the columns the SQL backends store.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_columns(
        task_id: String,
        job: Vec<u8>,
        status: String,
        run_at: i64,
        last_result: Option<String>,
        done_at: Option<i64>,
        attempts: i64,
        max_attempts: i64,
    ) -> Result<(Position, Self), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            task_id: task_id.clone(),
            reason,
        };
        let count = |name: &str, value: i64| {
            u32::try_from(value).map_err(|_| corrupt(format!("{name} is {value}, not a count")))
        };
        let attempts = count("attempts", attempts)?;
        let max_attempts = count("max_attempts", max_attempts)?;
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
            attempts,
            max_attempts,
            done_at: position.died_at,
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
            None => row.dead_letter().map(|dead| dead.record),
        })
        .collect();
    let status = match last.report() {
        Some(DeliveryReport::Delivered { .. }) => DeliveryStatus::Delivered,
        Some(DeliveryReport::Discarded { reason, .. }) => DeliveryStatus::Discarded { reason },
        Some(DeliveryReport::RetryScheduled { next_attempt_at, .. }) => DeliveryStatus::Retrying { next_attempt_at },
        _ if last.is_dead() => DeliveryStatus::Dead {
            reason: last
                .dead_letter()
                .map_or(DeadLetterReason::InfrastructureFailed, |dead| dead.reason),
        },
        Some(DeliveryReport::Deferred { until, reason, .. }) => DeliveryStatus::Deferred { until, reason },
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
        erased: rows.iter().any(|row| row.job.is_erased()),
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
            attempts: 1,
            max_attempts: 25,
            done_at: 1_700_000_000,
        }
    }

    fn job() -> WebhookJob {
        WebhookSubscription::new("https://example.com/hook", Secret::generate())
            .job("e", &1)
            .unwrap()
    }

    #[test]
    fn a_failed_task_is_dead_once_apalis_attempts_are_used_up() {
        let job = job();
        let mut failed = row(&job, "Failed", serde_json::json!({ "Err": "database is locked" }));
        failed.attempts = 24;
        assert!(!failed.is_dead(), "apalis runs it again");
        assert!(failed.dead_letter().is_none());
        assert_eq!(history_from_rows(vec![failed.clone()]).unwrap().attempts, []);

        failed.attempts = 25;
        assert!(failed.is_dead());
        let dead = failed.dead_letter().unwrap();
        assert_eq!(dead.reason, DeadLetterReason::InfrastructureFailed);
        assert_eq!(dead.max_attempts, job.policy().max_attempts);
        assert_eq!(
            (dead.record.attempt, dead.record.replay, dead.record.status),
            (1, 0, None)
        );
        assert_eq!(dead.record.error.as_deref(), Some("database is locked"));
        assert_eq!(dead.record.started_at_ms, 1_700_000_000_000);
        let history = history_from_rows(vec![failed]).unwrap();
        assert_eq!(
            history.status,
            DeliveryStatus::Dead {
                reason: DeadLetterReason::InfrastructureFailed
            }
        );
        assert_eq!(history.attempts, [dead.record]);
    }

    #[test]
    fn a_killed_task_without_a_dead_letter_of_the_worker_is_still_dead() {
        let job = job();
        for result in [
            serde_json::json!({ "Err": "AbortError: task cancelled" }),
            serde_json::json!({ "Err": { "unexpected": true } }),
            serde_json::json!({ "Err": null }),
            serde_json::json!({ "Ok": null }),
        ] {
            let killed = row(&job, "Killed", result.clone());
            let dead = killed.dead_letter().unwrap_or_else(|| panic!("{result}"));
            assert_eq!(dead.reason, DeadLetterReason::InfrastructureFailed);
            assert!(dead.record.error.is_some_and(|e| !e.is_empty()), "{result}");
        }
    }

    #[test]
    fn a_dead_letter_of_another_delivery_is_not_taken_for_this_ones() {
        let (job, other) = (job(), job());
        let mut dead = row(&other, "Killed", serde_json::json!({ "Err": "" }))
            .dead_letter()
            .unwrap();
        dead.reason = DeadLetterReason::Fatal;
        let stored = serde_json::json!({ "Err": format!("AbortError: {dead}") });
        assert_eq!(
            row(&other, "Killed", stored.clone()).dead_letter().unwrap().reason,
            DeadLetterReason::Fatal
        );
        let mixed_up = row(&job, "Killed", stored).dead_letter().unwrap();
        assert_eq!(mixed_up.reason, DeadLetterReason::InfrastructureFailed);
        assert_eq!(mixed_up.record.webhook_id, *job.webhook_id());
    }

    #[test]
    fn a_long_error_text_is_cut_at_a_character_boundary() {
        let text = "é".repeat(MAX_ERROR_TEXT);
        let mut failed = row(&job(), "Failed", serde_json::json!({ "Err": text }));
        failed.attempts = 25;
        let error = failed.dead_letter().unwrap().record.error.unwrap();
        assert!(error.len() <= MAX_ERROR_TEXT && error.len() >= MAX_ERROR_TEXT - 1);
        assert!(text.starts_with(&error));
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
