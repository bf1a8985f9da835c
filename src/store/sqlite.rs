//! [`WebhookStore`](super::WebhookStore) on apalis-sqlite's `Jobs` table.

use sqlx::Row;

use super::{DeadLetterFilter, Position, StoreError, rows::TaskRow};
use crate::{
    backend::sqlite::{self as backend, SqlitePool},
    job::{WebhookId, WebhookJob},
    report::DeliveryReport,
    sink::WebhookSink,
};

#[derive(Clone)]
pub(super) struct SqliteBackend {
    pub(super) pool: SqlitePool,
    pub(super) queue: String,
}

/// A task that is dead: killed, or failed with apalis's attempts used up (see
/// [`ended_dead`](super::rows::ended_dead)).
macro_rules! dead {
    () => {
        "(status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts))"
    };
}

/// The columns [`task_row`] reads.
macro_rules! columns {
    () => {
        "id, job, status, run_at, last_result, done_at, attempts, max_attempts"
    };
}

impl SqliteBackend {
    pub(super) fn new(pool: SqlitePool, queue: &str) -> Self {
        Self {
            pool,
            queue: queue.to_owned(),
        }
    }

    /// Every task of one delivery: their idempotency keys all start with `{webhook_id}:`, and
    /// `;` is the byte after `:`, so the unique `(job_type, idempotency_key)` index finds them.
    pub(super) async fn task_rows(&self, webhook_id: &WebhookId) -> Result<Vec<TaskRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            columns!(),
            " FROM Jobs WHERE job_type = ?1 AND idempotency_key >= ?2 AND idempotency_key < ?3"
        );
        let rows = sqlx::query(SQL)
            .bind(&self.queue)
            .bind(format!("{webhook_id}:"))
            .bind(format!("{webhook_id};"))
            .fetch_all(&self.pool)
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
            "SELECT ",
            columns!(),
            " FROM Jobs WHERE job_type = ?1 AND ",
            dead!(),
            " AND (done_at, id) > (?2, ?3) AND done_at >= ?4 AND done_at < ?5 ORDER BY done_at, id LIMIT ?6"
        );
        let rows = sqlx::query(SQL)
            .bind(&self.queue)
            .bind(after.map_or(-1, |p| p.died_at as i64))
            .bind(after.map_or("", |p| &p.task_id))
            .bind(filter.since.map_or(0, |s| s as i64))
            .bind(filter.until.map_or(i64::MAX, |u| u.min(i64::MAX as u64) as i64))
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        rows.iter().map(task_row).collect()
    }

    pub(super) async fn outstanding(&self) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM Jobs WHERE job_type = ?1 AND (status IN ('Pending', 'Queued', 'Running') \
             OR (status = 'Failed' AND attempts < max_attempts))",
        )
        .bind(&self.queue)
        .fetch_one(&self.pool)
        .await
        .map_err(StoreError::backend)?;
        Ok(count.max(0) as u64)
    }

    pub(super) async fn push(&self, job: WebhookJob) -> Result<(), StoreError> {
        let mut storage = backend::SqliteStorage::new(&self.pool).with_config(backend::config().queue(&self.queue));
        storage.push_job(job, None).await.map_err(StoreError::backend)
    }

    /// Marks dead task `task_id` as settled with `report`, if it is still dead.
    pub(super) async fn settle_dead(&self, task_id: &str, report: &DeliveryReport) -> Result<bool, StoreError> {
        let result = serde_json::json!({ "Ok": report }).to_string();
        const SQL: &str = concat!(
            "UPDATE Jobs SET status = 'Done', last_result = ?1 WHERE id = ?2 AND job_type = ?3 AND ",
            dead!()
        );
        let done = sqlx::query(SQL)
            .bind(result)
            .bind(task_id)
            .bind(&self.queue)
            .execute(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(done.rows_affected() == 1)
    }
}

pub(super) fn task_row(row: &sqlx::sqlite::SqliteRow) -> Result<(Position, TaskRow), StoreError> {
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
