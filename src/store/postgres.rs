//! [`WebhookStore`](super::WebhookStore) on apalis-postgres's `apalis.jobs` table.

use sqlx::Row;

use super::{DeadLetterFilter, Position, StoreError, rows::TaskRow};
use crate::{
    backend::postgres::PostgresSink,
    job::{WebhookId, WebhookJob, attempt_key},
    policy::MAX_ATTEMPTS_LIMIT,
    sink::WebhookSink,
    worker::DeliveryReport,
};

#[derive(Clone)]
pub(super) struct PostgresBackend {
    sink: PostgresSink,
}

/// The columns [`task_row`] reads.
macro_rules! columns {
    () => {
        "id, job, status, floor(extract(epoch FROM run_at))::bigint AS run_at, \
                       last_result::text AS last_result, floor(extract(epoch FROM done_at))::bigint AS done_at"
    };
}

impl PostgresBackend {
    pub(super) fn new(sink: PostgresSink) -> Self {
        Self { sink }
    }

    /// Every task of one delivery, looked up by the idempotency key of each possible attempt
    /// (apalis's unique `(job_type, idempotency_key)` index), one round per replay.
    pub(super) async fn task_rows(&self, webhook_id: &WebhookId) -> Result<Vec<TaskRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            columns!(),
            " FROM apalis.jobs WHERE job_type = $1 AND idempotency_key = ANY($2)"
        );
        let mut all = Vec::new();
        for replay in 0.. {
            let keys: Vec<String> = (1..=MAX_ATTEMPTS_LIMIT)
                .map(|a| attempt_key(webhook_id, replay, a))
                .collect();
            let rows = sqlx::query(SQL)
                .bind(self.sink.queue())
                .bind(&keys)
                .fetch_all(self.sink.pool())
                .await
                .map_err(StoreError::backend)?;
            let mut round = rows
                .iter()
                .map(|row| task_row(row).map(|(_, row)| row))
                .collect::<Result<Vec<_>, _>>()?;
            round.sort_by_key(|row| row.job.attempt());
            // A later round exists only if this one ended in a replay.
            let go_on = round.last().is_some_and(TaskRow::is_replayed);
            all.extend(round);
            if !go_on {
                break;
            }
        }
        Ok(all)
    }

    pub(super) async fn dead_rows(
        &self,
        after: Option<&Position>,
        filter: &DeadLetterFilter,
        limit: usize,
    ) -> Result<Vec<(Position, TaskRow)>, StoreError> {
        const SQL: &str = concat!(
            "SELECT * FROM (SELECT ",
            columns!(),
            " FROM apalis.jobs WHERE job_type = $1 AND status = 'Killed') AS dead \
             WHERE (done_at, id) > ($2, $3) AND done_at >= $4 AND done_at < $5 ORDER BY done_at, id LIMIT $6"
        );
        let rows = sqlx::query(SQL)
            .bind(self.sink.queue())
            .bind(after.map_or(-1, |p| p.died_at as i64))
            .bind(after.map_or("", |p| &p.task_id))
            .bind(filter.since.map_or(0, |s| s as i64))
            .bind(filter.until.map_or(i64::MAX, |u| u.min(i64::MAX as u64) as i64))
            .bind(limit as i64)
            .fetch_all(self.sink.pool())
            .await
            .map_err(StoreError::backend)?;
        rows.iter().map(task_row).collect()
    }

    pub(super) async fn outstanding(&self) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM apalis.jobs WHERE job_type = $1 AND (status IN ('Pending', 'Queued', 'Running') \
             OR (status = 'Failed' AND attempts < max_attempts))",
        )
        .bind(self.sink.queue())
        .fetch_one(self.sink.pool())
        .await
        .map_err(StoreError::backend)?;
        Ok(count.max(0) as u64)
    }

    pub(super) async fn push(&self, job: WebhookJob) -> Result<(), StoreError> {
        self.sink.clone().push_job(job, None).await.map_err(StoreError::backend)
    }

    /// Marks dead task `task_id` as settled with `report`, if it is still dead.
    pub(super) async fn settle_dead(&self, task_id: &str, report: &DeliveryReport) -> Result<bool, StoreError> {
        let result = serde_json::json!({ "Ok": report }).to_string();
        let done = sqlx::query(
            "UPDATE apalis.jobs SET status = 'Done', last_result = $1::jsonb \
             WHERE id = $2 AND job_type = $3 AND status = 'Killed'",
        )
        .bind(result)
        .bind(task_id)
        .bind(self.sink.queue())
        .execute(self.sink.pool())
        .await
        .map_err(StoreError::backend)?;
        Ok(done.rows_affected() == 1)
    }
}

fn task_row(row: &sqlx::postgres::PgRow) -> Result<(Position, TaskRow), StoreError> {
    let column = |name: &str| StoreError::backend_column(name);
    TaskRow::from_columns(
        row.try_get("id").map_err(|_| column("id"))?,
        row.try_get("job").map_err(|_| column("job"))?,
        row.try_get("status").map_err(|_| column("status"))?,
        row.try_get("run_at").map_err(|_| column("run_at"))?,
        row.try_get("last_result").map_err(|_| column("last_result"))?,
        row.try_get("done_at").map_err(|_| column("done_at"))?,
    )
}
