//! Purge on apalis-sqlite's `Jobs` table.
//!
//! Walks the unique `(job_type, idempotency_key)` index in key order for tasks that finished
//! longer ago than the shorter window (so deliveries finished recently, the bulk of what is
//! kept, cost one index step each and nothing more). A batch takes the webhook ids of the next
//! `batch` such tasks, then decides and deletes those deliveries in one statement — one implicit
//! transaction, atomic. A delivery's keys all start with `{webhook_id}:` and SQLite compares
//! text bytewise, so its tasks are the index range `[{id}:, {id};)`.

use sqlx::Row;

use super::{PurgeReport, RetentionPolicy, settled_dead_outcomes, webhook_id_of_key};
use crate::store::{StoreError, sqlite::SqliteBackend};

/// The keys after the cursor, made by this crate (a `:` after a non-empty id), of tasks that
/// finished at least `?3` seconds ago.
const NEXT_KEYS: &str = "SELECT idempotency_key FROM Jobs WHERE job_type = ?1 AND idempotency_key > ?2 \
     AND instr(idempotency_key, ':') > 1 AND status IN ('Done', 'Killed', 'Failed') \
     AND done_at <= CAST(strftime('%s', 'now') AS INTEGER) - ?3 ORDER BY idempotency_key LIMIT ?4";

/// Removes every task of each delivery of the JSON array of webhook ids `?2` that is finished (no task
/// waiting, running, or to be run again by apalis; delivered or dead) and whose last task
/// finished at least its window ago by SQLite's clock (the one apalis-sqlite stamps `done_at`
/// with): `?3` seconds for a delivery that ever died, `?4` for one only delivered.
///
/// `CROSS JOIN` makes SQLite keep the ids outside, so each delivery costs an index range; left
/// to choose, it scanned every row of the queue once per batch.
const DELETE_FINISHED: &str = concat!(
    "WITH tasks AS ( \
         SELECT Jobs.id AS id, ids.value AS wid, status, attempts >= max_attempts AS spent, done_at, \
                CASE WHEN json_valid(last_result) THEN json_extract(last_result, '$.Ok.outcome') END AS outcome \
         FROM json_each(?2) AS ids CROSS JOIN Jobs ON job_type = ?1 \
             AND idempotency_key >= ids.value || ':' AND idempotency_key < ids.value || ';' \
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
             AND finished <= CAST(strftime('%s', 'now') AS INTEGER) - CASE WHEN died = 1 THEN ?3 ELSE ?4 END \
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
        let recent = policy.delivered_secs().min(policy.dead_letter_secs());
        loop {
            let keys: Vec<String> = sqlx::query_scalar(NEXT_KEYS)
                .bind(&self.queue)
                .bind(&cursor)
                .bind(recent)
                .bind(policy.batch() as i64)
                .fetch_all(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            let Some(last) = keys.last() else {
                return Ok(report);
            };
            let mut ids: Vec<&str> = keys.iter().filter_map(|key| webhook_id_of_key(key)).collect();
            ids.dedup();
            let ids = serde_json::to_string(&ids).map_err(StoreError::backend)?;
            let rows = sqlx::query(DELETE_FINISHED)
                .bind(&self.queue)
                .bind(&ids)
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
            // Keys are in order, so a delivery's keys are together; should some of the last
            // delivery's be left for the next batch, deciding it again there is harmless.
            cursor = last.clone();
        }
    }
}
