//! Erasure on apalis-sqlite's `Jobs` table.

use sqlx::Row;

use super::{Erasure, Plan, ScanPage, Written};
use crate::{
    job::WebhookId,
    store::{StoreError, rows::TaskRow, sqlite::SqliteBackend, sqlite::task_row},
};

/// A task waiting for an attempt: pending, or failed with apalis's attempts left.
macro_rules! waiting {
    () => {
        "(status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))"
    };
}

impl SqliteBackend {
    /// Every task of each delivery (a key-range lookup each).
    pub(in crate::store) async fn delivery_rows(&self, ids: &[WebhookId]) -> Result<Vec<TaskRow>, StoreError> {
        let mut rows = Vec::new();
        for id in ids {
            rows.extend(self.task_rows(id).await?);
        }
        Ok(rows)
    }

    /// The next batch of tasks after task id `after` whose job holds the erasure's fragment and
    /// is not erased yet.
    pub(in crate::store) async fn scan(&self, erasure: &Erasure, after: Option<&str>) -> Result<ScanPage, StoreError> {
        const SQL: &str = "SELECT id, job, status, run_at, last_result, done_at, attempts, max_attempts FROM Jobs \
                           WHERE job_type = ?1 AND id > ?2 AND instr(job, ?3) > 0 AND instr(job, ?4) = 0 \
                           ORDER BY id LIMIT ?5";
        let limit = erasure.batch();
        let rows = sqlx::query(SQL)
            .bind(&self.queue)
            .bind(after.unwrap_or(""))
            .bind(erasure.fragment().unwrap_or_default().into_bytes())
            .bind(super::ERASED_FRAGMENT.as_bytes())
            .bind(limit as i64)
            .fetch_all(&self.pool)
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

    /// Erases each planned task, in one transaction: cancels it if it is waiting, erases it if
    /// it has finished (and has not changed since it was read), leaves it alone if it is
    /// running. One result per plan, in order.
    pub(in crate::store) async fn erase_tasks(&self, plans: &[Plan]) -> Result<Vec<Written>, StoreError> {
        const CANCEL: &str = concat!(
            "UPDATE Jobs SET status = 'Killed', job = ?1, last_result = ?2, done_at = strftime('%s', 'now') \
             WHERE id = ?3 AND job_type = ?4 AND ",
            waiting!()
        );
        const REDACT: &str = concat!(
            "UPDATE Jobs SET job = ?1, last_result = ?2 WHERE id = ?3 AND job_type = ?4 AND status = ?5 \
             AND status NOT IN ('Pending', 'Queued', 'Running') AND NOT ",
            waiting!()
        );
        let mut tx = self.pool.begin().await.map_err(StoreError::backend)?;
        let mut written = Vec::with_capacity(plans.len());
        for plan in plans {
            let cancelled = sqlx::query(CANCEL)
                .bind(&plan.job)
                .bind(&plan.cancelled)
                .bind(&plan.task_id)
                .bind(&self.queue)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::backend)?;
            if cancelled.rows_affected() == 1 {
                written.push(Written::Cancelled);
                continue;
            }
            let redacted = sqlx::query(REDACT)
                .bind(&plan.job)
                .bind(&plan.redacted)
                .bind(&plan.task_id)
                .bind(&self.queue)
                .bind(&plan.status)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::backend)?;
            written.push(match redacted.rows_affected() {
                1 => Written::Redacted,
                _ => Written::Skipped,
            });
        }
        tx.commit().await.map_err(StoreError::backend)?;
        Ok(written)
    }
}
