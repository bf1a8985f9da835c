//! Purge on apalis-sqlite's `Jobs` table.
//!
//! Walks the unique `(job_type, idempotency_key)` index in key order. A delivery's keys all
//! start with `{webhook_id}:` and SQLite compares text bytewise, so they are contiguous: a batch
//! reads the next `batch` keys, then decides and deletes the deliveries of the key range
//! `[{first}:, {last};)` in one statement — one implicit transaction, atomic.

use sqlx::Row;

use super::{PurgeReport, RetentionPolicy, settled_dead_outcomes, webhook_id_of_key};
use crate::store::{StoreError, sqlite::SqliteBackend};

/// The next keys after the cursor that this crate made (a `:` after a non-empty id).
const NEXT_KEYS: &str = "SELECT idempotency_key FROM Jobs WHERE job_type = ?1 AND idempotency_key >= ?2 \
     AND instr(idempotency_key, ':') > 1 ORDER BY idempotency_key LIMIT ?3";

/// Removes every task of each delivery of the key range `[?2, ?3)` that is finished (no task
/// waiting, running, or to be run again by apalis; delivered or dead) and whose last task
/// finished at least its window ago by SQLite's clock (the one apalis-sqlite stamps `done_at`
/// with): `?4` seconds for a delivery that ever died, `?5` for one only delivered.
const DELETE_FINISHED: &str = concat!(
    "WITH tasks AS ( \
         SELECT id, substr(idempotency_key, 1, instr(idempotency_key, ':') - 1) AS wid, status, \
                attempts >= max_attempts AS spent, done_at, \
                CASE WHEN json_valid(last_result) THEN json_extract(last_result, '$.Ok.outcome') END AS outcome \
         FROM Jobs WHERE job_type = ?1 AND idempotency_key >= ?2 AND idempotency_key < ?3 \
             AND instr(idempotency_key, ':') > 1 \
     ), \
     verdict AS ( \
         SELECT wid, \
                MIN(status IN ('Done', 'Killed') OR (status = 'Failed' AND spent)) AS closed, \
                MAX(status = 'Killed' OR (status = 'Failed' AND spent) \
                    OR (status = 'Done' AND outcome IN ",
    settled_dead_outcomes!(),
    "))  AS died, \
                MAX(status = 'Done' AND outcome = 'delivered') AS delivered, \
                MAX(done_at) AS finished \
         FROM tasks GROUP BY wid \
     ), \
     doomed AS ( \
         SELECT wid FROM verdict \
         WHERE closed = 1 AND (died = 1 OR delivered = 1) AND finished IS NOT NULL \
             AND finished <= CAST(strftime('%s', 'now') AS INTEGER) - CASE WHEN died = 1 THEN ?4 ELSE ?5 END \
     ) \
     DELETE FROM Jobs WHERE id IN (SELECT id FROM tasks WHERE wid IN (SELECT wid FROM doomed)) \
     RETURNING substr(idempotency_key, 1, instr(idempotency_key, ':') - 1) AS wid, \
         (status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts) \
          OR (status = 'Done' AND CASE WHEN json_valid(last_result) THEN json_extract(last_result, '$.Ok.outcome') END IN ",
    settled_dead_outcomes!(),
    ")) AS died"
);

impl SqliteBackend {
    pub(in crate::store) async fn purge(&self, policy: &RetentionPolicy) -> Result<PurgeReport, StoreError> {
        let mut report = PurgeReport::default();
        let mut cursor = String::new();
        loop {
            let keys: Vec<String> = sqlx::query_scalar(NEXT_KEYS)
                .bind(&self.queue)
                .bind(&cursor)
                .bind(policy.batch() as i64)
                .fetch_all(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            let (Some(first), Some(last)) = (
                keys.first().and_then(|k| webhook_id_of_key(k)),
                keys.last().and_then(|k| webhook_id_of_key(k)),
            ) else {
                return Ok(report);
            };
            let (from, to) = (format!("{first}:"), format!("{last};"));
            let rows = sqlx::query(DELETE_FINISHED)
                .bind(&self.queue)
                .bind(&from)
                .bind(&to)
                .bind(policy.dead_letter_secs())
                .bind(policy.delivered_secs())
                .fetch_all(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            let mut batch = super::Tally::default();
            for row in &rows {
                let wid: String = row.try_get("wid").map_err(|_| StoreError::backend_column("wid"))?;
                let died: Option<bool> = row.try_get("died").map_err(|_| StoreError::backend_column("died"))?;
                batch.task(wid, died.unwrap_or(false));
            }
            report.add(&batch.report());
            // Every key of the last delivery is below `to`: the next batch starts after them.
            cursor = to;
        }
    }
}
