//! Erasure on apalis-postgres's `apalis.jobs` table.

use std::collections::HashSet;

use sqlx::Row;

use super::{Erasure, Plan, ScanPage, Written};
use crate::{
    job::WebhookId,
    store::{StoreError, postgres::PostgresBackend, postgres::task_row, rows::TaskRow},
};

/// A task waiting for an attempt: pending, or failed with apalis's attempts left.
macro_rules! waiting {
    () => {
        "(jobs.status = 'Pending' OR (jobs.status = 'Failed' AND jobs.attempts < jobs.max_attempts))"
    };
}

/// The idempotency key of task `(replay, attempt, repush, deferrals)` of delivery `chain.id`,
/// as [`crate::job::task_key`] makes it (see `task_rows` in the store's Postgres module).
macro_rules! key_of_chain {
    () => {
        "chain.id || CASE WHEN chain.replay = 0 THEN '' ELSE ':r' || chain.replay END || ':' || chain.attempt \
         || CASE WHEN chain.repush = 0 THEN '' ELSE ':p' || chain.repush END \
         || CASE WHEN chain.deferrals = 0 THEN '' ELSE ':d' || chain.deferrals END"
    };
}

impl PostgresBackend {
    /// Every task of each delivery, in one query: the store's walk of apalis's unique
    /// `(job_type, idempotency_key)` index from task to task, for many deliveries at once.
    pub(in crate::store) async fn delivery_rows(&self, ids: &[WebhookId]) -> Result<Vec<TaskRow>, StoreError> {
        const SQL: &str = concat!(
            "WITH RECURSIVE chain(id, replay, attempt, repush, deferrals) AS ( \
                 SELECT id, 0, 1, 0, 0 FROM unnest($2::text[]) AS ids(id) \
                 UNION \
                 SELECT chain.id, next.replay, next.attempt, next.repush, next.deferrals FROM chain \
                 JOIN apalis.jobs AS jobs ON jobs.job_type = $1 AND jobs.idempotency_key = ",
            key_of_chain!(),
            " CROSS JOIN LATERAL (VALUES \
                     (chain.replay, chain.attempt, chain.repush, chain.deferrals + 1), \
                     (chain.replay, chain.attempt + 1, chain.repush, 0), \
                     (chain.replay + 1, 1, chain.repush, 0), \
                     (chain.replay, 1, chain.repush + 1, 0)) AS next(replay, attempt, repush, deferrals) \
             ) \
             SELECT jobs.id, job, status, floor(extract(epoch FROM run_at))::bigint AS run_at, \
             last_result::text AS last_result, floor(extract(epoch FROM done_at))::bigint AS done_at, \
             attempts::bigint AS attempts, max_attempts::bigint AS max_attempts \
             FROM chain JOIN apalis.jobs AS jobs ON jobs.job_type = $1 AND jobs.idempotency_key = ",
            key_of_chain!()
        );
        let rows = sqlx::query(SQL)
            .bind(self.sink.queue())
            .bind(ids.iter().map(WebhookId::as_str).collect::<Vec<_>>())
            .fetch_all(self.sink.pool())
            .await
            .map_err(StoreError::backend)?;
        rows.iter().map(|row| task_row(row).map(|(_, row)| row)).collect()
    }

    /// The next batch of tasks after task id `after` whose job holds the erasure's fragment and
    /// is not erased yet.
    pub(in crate::store) async fn scan(&self, erasure: &Erasure, after: Option<&str>) -> Result<ScanPage, StoreError> {
        const SQL: &str = "SELECT id, job, status, floor(extract(epoch FROM run_at))::bigint AS run_at, \
                           last_result::text AS last_result, floor(extract(epoch FROM done_at))::bigint AS done_at, \
                           attempts::bigint AS attempts, max_attempts::bigint AS max_attempts FROM apalis.jobs \
                           WHERE job_type = $1 AND id > $2 AND position($3::bytea IN job) > 0 \
                           AND position($4::bytea IN job) = 0 ORDER BY id LIMIT $5";
        let limit = erasure.batch();
        let rows = sqlx::query(SQL)
            .bind(self.sink.queue())
            .bind(after.unwrap_or(""))
            .bind(erasure.fragment().unwrap_or_default().into_bytes())
            .bind(super::ERASED_FRAGMENT.as_bytes())
            .bind(limit as i64)
            .fetch_all(self.sink.pool())
            .await
            .map_err(StoreError::backend)?;
        let next = match rows.last() {
            Some(last) if rows.len() >= limit => Some(
                last.try_get::<String, _>("id")
                    .map_err(|_| StoreError::backend_column("id"))?,
            ),
            _ => None,
        };
        Ok((rows.iter().map(|row| task_row(row).map(|(_, row)| row)).collect(), next))
    }

    /// Erases each planned task, in one transaction of two statements: cancels those waiting,
    /// erases those finished (and unchanged since they were read), leaves those running. One
    /// result per plan, in order.
    pub(in crate::store) async fn erase_tasks(&self, plans: &[Plan]) -> Result<Vec<Written>, StoreError> {
        const CANCEL: &str = concat!(
            "UPDATE apalis.jobs AS jobs SET status = 'Killed', job = p.job, last_result = p.cancelled::jsonb, \
             done_at = now() FROM unnest($1::text[], $2::bytea[], $3::text[]) AS p(id, job, cancelled) \
             WHERE jobs.id = p.id AND jobs.job_type = $4 AND ",
            waiting!(),
            " RETURNING jobs.id"
        );
        const REDACT: &str = concat!(
            "UPDATE apalis.jobs AS jobs SET job = p.job, last_result = p.redacted::jsonb \
             FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[]) AS p(id, job, redacted, status) \
             WHERE jobs.id = p.id AND jobs.job_type = $5 AND jobs.status = p.status \
             AND jobs.status NOT IN ('Pending', 'Queued', 'Running') AND NOT ",
            waiting!(),
            " RETURNING jobs.id"
        );
        let ids: Vec<&str> = plans.iter().map(|p| p.task_id.as_str()).collect();
        let jobs: Vec<&[u8]> = plans.iter().map(|p| p.job.as_slice()).collect();
        let mut tx = self.sink.pool().begin().await.map_err(StoreError::backend)?;
        let cancelled: HashSet<String> = sqlx::query_scalar(CANCEL)
            .bind(&ids)
            .bind(&jobs)
            .bind(plans.iter().map(|p| p.cancelled.as_str()).collect::<Vec<_>>())
            .bind(self.sink.queue())
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::backend)?
            .into_iter()
            .collect();
        let redacted: HashSet<String> = sqlx::query_scalar(REDACT)
            .bind(&ids)
            .bind(&jobs)
            .bind(plans.iter().map(|p| p.redacted.as_deref()).collect::<Vec<_>>())
            .bind(plans.iter().map(|p| p.status.as_str()).collect::<Vec<_>>())
            .bind(self.sink.queue())
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::backend)?
            .into_iter()
            .collect();
        tx.commit().await.map_err(StoreError::backend)?;
        Ok(plans
            .iter()
            .map(|plan| {
                if cancelled.contains(&plan.task_id) {
                    Written::Cancelled
                } else if redacted.contains(&plan.task_id) {
                    Written::Redacted
                } else {
                    Written::Skipped
                }
            })
            .collect())
    }
}
