//! Purge on apalis-postgres's `apalis.jobs` table.
//!
//! A batch reads the next `batch` idempotency keys of the queue (keyset paging over the unique
//! `(job_type, idempotency_key)` index, in whatever order the database's collation gives), takes
//! their webhook ids, then finds every task of those deliveries by walking their key chains (as
//! [`history`](crate::store::WebhookStore::history) does: an index lookup per task, whatever the
//! collation) and decides and deletes in one statement — atomic.

use std::collections::HashSet;

use sqlx::Row;

use super::{PurgeReport, RetentionPolicy, Tally, settled_dead_outcomes, webhook_id_of_key};
use crate::store::{StoreError, postgres::PostgresBackend};

/// The next keys after the cursor, whether their task finished at least `$3` seconds ago. No
/// other filter: the scan follows the index in order and stops after `$4` keys whatever the
/// planner's statistics say (with a filter, stale statistics made it sort the whole queue).
const NEXT_KEYS: &str = "SELECT idempotency_key, status IN ('Done', 'Killed', 'Failed') \
     AND done_at <= now() - make_interval(secs => $3) AS old FROM apalis.jobs \
     WHERE job_type = $1 AND idempotency_key > $2 ORDER BY idempotency_key LIMIT $4";

/// The idempotency key of task `(replay, attempt, repush, deferrals)` of delivery `$w.wid`
/// with those numbers in `$n`, as `job::task_key` makes it.
macro_rules! key_of {
    ($w:literal, $n:literal) => {
        concat!(
            $w,
            ".wid || CASE WHEN ",
            $n,
            ".replay = 0 THEN '' ELSE ':r' || ",
            $n,
            ".replay END || ':' || ",
            $n,
            ".attempt || CASE WHEN ",
            $n,
            ".repush = 0 THEN '' ELSE ':p' || ",
            $n,
            ".repush END || CASE WHEN ",
            $n,
            ".deferrals = 0 THEN '' ELSE ':d' || ",
            $n,
            ".deferrals END"
        )
    };
}

/// The columns of a found task.
macro_rules! found_columns {
    () => {
        concat!(
            "jobs.id, jobs.status, jobs.attempts >= jobs.max_attempts, jobs.done_at, \
             coalesce(jobs.status = 'Done' AND jobs.last_result -> 'Ok' ->> 'outcome' IN ",
            settled_dead_outcomes!(),
            ", false), \
             coalesce(jobs.status = 'Done' AND jobs.last_result -> 'Ok' ->> 'outcome' = 'delivered', false)"
        )
    };
}

/// Removes every task of each delivery of `$2` that is finished (no task waiting, running, or
/// to be run again by apalis; delivered or dead) and whose last task finished at least its
/// window ago by the database's clock: `$3` seconds for a delivery that ever died, `$4` for one
/// only delivered. Returns each removed task's delivery and whether the task died.
///
/// The tasks are found by walking each delivery's key chain, as `store::postgres` does (see its
/// `task_rows`): a delivery's first task, then after each task found its deferral, its next
/// attempt, its replay and its push again by repair — one index lookup per key (`LIMIT 1`
/// keeps each lookup a subquery of its own, which the planner cannot turn into a hash join
/// over the whole queue), the columns carried along. The delete goes by primary key.
const DELETE_FINISHED: &str = concat!(
    "WITH RECURSIVE found(wid, replay, attempt, repush, deferrals, id, status, spent, done_at, settled_dead, delivered) AS ( \
         SELECT ids.wid, 0, 1, 0, 0, ",
    found_columns!(),
    " FROM unnest($2::text[]) AS ids(wid) CROSS JOIN LATERAL ( \
             SELECT * FROM apalis.jobs WHERE job_type = $1 AND idempotency_key = ids.wid || ':1' LIMIT 1) AS jobs \
         UNION \
         SELECT found.wid, next.replay, next.attempt, next.repush, next.deferrals, ",
    found_columns!(),
    " FROM found CROSS JOIN LATERAL (VALUES \
             (found.replay, found.attempt, found.repush, found.deferrals + 1), \
             (found.replay, found.attempt + 1, found.repush, 0), \
             (found.replay + 1, 1, found.repush, 0), \
             (found.replay, 1, found.repush + 1, 0)) AS next(replay, attempt, repush, deferrals) \
         CROSS JOIN LATERAL (SELECT * FROM apalis.jobs WHERE job_type = $1 AND idempotency_key = ",
    key_of!("found", "next"),
    " LIMIT 1) AS jobs \
     ), \
     tasks AS ( \
         SELECT DISTINCT ON (id) wid, id, status, spent, done_at, delivered, \
                status = 'Killed' OR (status = 'Failed' AND spent) OR settled_dead AS died \
         FROM found \
     ), \
     doomed AS ( \
         SELECT wid FROM tasks GROUP BY wid \
         HAVING bool_and(status IN ('Done', 'Killed') OR (status = 'Failed' AND spent)) \
             AND (bool_or(died) OR bool_or(delivered)) \
             AND max(done_at) <= now() - make_interval(secs => CASE WHEN bool_or(died) THEN $3 ELSE $4 END) \
     ), \
     gone AS ( \
         DELETE FROM apalis.jobs WHERE job_type = $1 \
             AND id = ANY(ARRAY(SELECT id FROM tasks WHERE wid IN (SELECT wid FROM doomed))) \
         RETURNING id \
     ) \
     SELECT tasks.wid, tasks.died FROM gone JOIN tasks ON tasks.id = gone.id"
);

impl PostgresBackend {
    pub(in crate::store) async fn purge(&self, policy: &RetentionPolicy) -> Result<PurgeReport, StoreError> {
        let mut report = PurgeReport::default();
        let mut cursor = String::new();
        loop {
            let keys: Vec<(String, Option<bool>)> = sqlx::query_as(NEXT_KEYS)
                .bind(self.sink.queue())
                .bind(&cursor)
                .bind(policy.delivered_secs().min(policy.dead_letter_secs()) as f64)
                .bind(policy.batch() as i64)
                .fetch_all(self.sink.pool())
                .await
                .map_err(StoreError::backend)?;
            let Some((last, _)) = keys.last() else {
                return Ok(report);
            };
            // Only deliveries with a task that finished longer ago than the shorter window can
            // go: those finished recently, the bulk of what is kept, are not decided again.
            let mut seen = HashSet::new();
            let ids: Vec<&str> = keys
                .iter()
                .filter(|(_, old)| old.unwrap_or(false))
                .filter_map(|(key, _)| webhook_id_of_key(key))
                .filter(|id| seen.insert(*id))
                .collect();
            cursor = last.clone();
            if ids.is_empty() {
                continue;
            }
            let mut tx = self.sink.pool().begin().await.map_err(StoreError::backend)?;
            // The recursive query's estimates are huge, and compiling it costs more than it runs.
            sqlx::query("SET LOCAL jit = off")
                .execute(&mut *tx)
                .await
                .map_err(StoreError::backend)?;
            let rows = sqlx::query(DELETE_FINISHED)
                .bind(self.sink.queue())
                .bind(&ids)
                .bind(policy.dead_letter_secs() as f64)
                .bind(policy.delivered_secs() as f64)
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::backend)?;
            tx.commit().await.map_err(StoreError::backend)?;
            let mut batch = Tally::default();
            for row in &rows {
                let wid: String = row.try_get("wid").map_err(|_| StoreError::backend_column("wid"))?;
                let died: Option<bool> = row.try_get("died").map_err(|_| StoreError::backend_column("died"))?;
                batch.task(wid, died.unwrap_or(false));
            }
            report.add(&batch.report());
            // Keyset paging: a delivery whose keys the collation did not keep together is seen
            // again in a later batch, and deciding it twice is harmless.
        }
    }
}
