//! [`WebhookStore`](super::WebhookStore) on apalis-postgres's `apalis.jobs` table.

use sqlx::Row;

use super::{DeadLetterFilter, Position, StoreError, rows::TaskRow};
use crate::{
    backend::postgres::PostgresSink,
    job::{WebhookId, WebhookJob},
    report::DeliveryReport,
    sink::WebhookSink,
};

#[derive(Clone)]
pub(super) struct PostgresBackend {
    pub(super) sink: PostgresSink,
}

/// The columns [`task_row`] reads.
macro_rules! columns {
    () => {
        "id, job, status, floor(extract(epoch FROM run_at))::bigint AS run_at, \
                       last_result::text AS last_result, floor(extract(epoch FROM done_at))::bigint AS done_at, \
                       attempts::bigint AS attempts, max_attempts::bigint AS max_attempts"
    };
}

/// A task that is dead: killed, or failed with apalis's attempts used up (see
/// [`ended_dead`](super::rows::ended_dead)).
macro_rules! dead {
    () => {
        "(status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts))"
    };
}

/// The idempotency key of the task `(replay, attempt, repush, deferrals)` of delivery `$2` in
/// `$t`, as [`WebhookJob::idempotency_key`] makes it: `{id}:{attempt}`,
/// `{id}:r{replay}:{attempt}`, then `:p{repush}` for a head an ordered line's repair pushed
/// again and `:d{deferrals}` for a deferred attempt.
macro_rules! key_of {
    ($t:literal) => {
        concat!(
            "$2 || CASE WHEN ",
            $t,
            ".replay = 0 THEN '' ELSE ':r' || ",
            $t,
            ".replay END || ':' || ",
            $t,
            ".attempt || CASE WHEN ",
            $t,
            ".repush = 0 THEN '' ELSE ':p' || ",
            $t,
            ".repush END || CASE WHEN ",
            $t,
            ".deferrals = 0 THEN '' ELSE ':d' || ",
            $t,
            ".deferrals END"
        )
    };
}

impl PostgresBackend {
    pub(super) fn new(sink: PostgresSink) -> Self {
        Self { sink }
    }

    /// Every task of one delivery, in one query walking apalis's unique
    /// `(job_type, idempotency_key)` index from task to task.
    ///
    /// A delivery's tasks form a chain: the first attempt of its dispatch; after a task
    /// `(replay, attempt, repush, deferrals)` possibly its deferral `(.., deferrals + 1)`, its
    /// next attempt `(replay, attempt + 1, repush, 0)`, its replay `(replay + 1, 1, repush, 0)`
    /// and its push again by an ordered line's repair `(replay, 1, repush + 1, 0)`. The query
    /// follows each task that exists to those four keys, so it costs an index lookup per task
    /// whatever the database's collation (a key range would depend on it).
    pub(super) async fn task_rows(&self, webhook_id: &WebhookId) -> Result<Vec<TaskRow>, StoreError> {
        const SQL: &str = concat!(
            "WITH RECURSIVE chain(replay, attempt, repush, deferrals) AS ( \
                 SELECT 0, 1, 0, 0 \
                 UNION \
                 SELECT next.replay, next.attempt, next.repush, next.deferrals FROM chain \
                 JOIN apalis.jobs AS jobs ON jobs.job_type = $1 AND jobs.idempotency_key = ",
            key_of!("chain"),
            " CROSS JOIN LATERAL (VALUES \
                     (chain.replay, chain.attempt, chain.repush, chain.deferrals + 1), \
                     (chain.replay, chain.attempt + 1, chain.repush, 0), \
                     (chain.replay + 1, 1, chain.repush, 0), \
                     (chain.replay, 1, chain.repush + 1, 0)) AS next(replay, attempt, repush, deferrals) \
             ) \
             SELECT ",
            columns!(),
            " FROM chain JOIN apalis.jobs AS jobs ON jobs.job_type = $1 AND jobs.idempotency_key = ",
            key_of!("chain")
        );
        let rows = sqlx::query(SQL)
            .bind(self.sink.queue())
            .bind(webhook_id.as_str())
            .fetch_all(self.sink.pool())
            .await
            .map_err(StoreError::backend)?;
        rows.iter().map(|row| task_row(row).map(|(_, row)| row)).collect()
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
            " FROM apalis.jobs WHERE job_type = $1 AND ",
            dead!(),
            ") AS dead \
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
        const SQL: &str = concat!(
            "UPDATE apalis.jobs SET status = 'Done', last_result = $1::jsonb WHERE id = $2 AND job_type = $3 AND ",
            dead!()
        );
        let done = sqlx::query(SQL)
            .bind(result)
            .bind(task_id)
            .bind(self.sink.queue())
            .execute(self.sink.pool())
            .await
            .map_err(StoreError::backend)?;
        Ok(done.rows_affected() == 1)
    }
}

pub(super) fn task_row(row: &sqlx::postgres::PgRow) -> Result<(Position, TaskRow), StoreError> {
    let column = |name: &str| StoreError::backend_column(name);
    TaskRow::from_columns(
        row.try_get("id").map_err(|_| column("id"))?,
        row.try_get("job").map_err(|_| column("job"))?,
        row.try_get("status").map_err(|_| column("status"))?,
        row.try_get("run_at").map_err(|_| column("run_at"))?,
        row.try_get("last_result").map_err(|_| column("last_result"))?,
        row.try_get("done_at").map_err(|_| column("done_at"))?,
        row.try_get("attempts").map_err(|_| column("attempts"))?,
        row.try_get("max_attempts").map_err(|_| column("max_attempts"))?,
    )
}
