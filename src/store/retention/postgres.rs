//! Purge on apalis-postgres's `apalis.jobs` table.
//!
//! A batch reads the next `batch` idempotency keys of the queue (keyset paging over the unique
//! `(job_type, idempotency_key)` index, in whatever order the database's collation gives), takes
//! their webhook ids, then finds every task of those deliveries by walking their key chains (as
//! [`history`](crate::WebhookStore::history) does: an index lookup per task, whatever the
//! collation) and decides and deletes in one statement — atomic.

use std::collections::HashSet;

use sqlx::Row;

use super::{PurgeReport, RetentionPolicy, Tally, settled_dead_outcomes, webhook_id_of_key};
use crate::store::{StoreError, postgres::PostgresBackend};

/// The keys after the cursor, made by this crate (a `:` after a non-empty id), of tasks that
/// finished at least `$3` seconds ago: deliveries finished recently, the bulk of what is kept,
/// are not decided again at every purge.
const NEXT_KEYS: &str = "SELECT idempotency_key FROM apalis.jobs WHERE job_type = $1 AND idempotency_key > $2 \
     AND position(':' IN idempotency_key) > 1 AND status IN ('Done', 'Killed', 'Failed') \
     AND done_at <= now() - make_interval(secs => $3) ORDER BY idempotency_key LIMIT $4";

/// The idempotency key of task `(replay, attempt, repush, deferrals)` of delivery `wid` in
/// `$t`, as `job::task_key` makes it.
macro_rules! key_of {
    ($t:literal) => {
        concat!(
            $t,
            ".wid || CASE WHEN ",
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

/// Removes every task of each delivery of `$2` that is finished (no task waiting, running, or
/// to be run again by apalis; delivered or dead) and whose last task finished at least its
/// window ago by the database's clock: `$3` seconds for a delivery that ever died, `$4` for one
/// only delivered. The chain is the one `store::postgres` walks (see its `task_rows`).
const DELETE_FINISHED: &str = concat!(
    "WITH RECURSIVE chain(wid, replay, attempt, repush, deferrals) AS ( \
         SELECT wid, 0, 1, 0, 0 FROM unnest($2::text[]) AS ids(wid) \
         UNION \
         SELECT chain.wid, next.replay, next.attempt, next.repush, next.deferrals FROM chain \
         JOIN apalis.jobs AS jobs ON jobs.job_type = $1 AND jobs.idempotency_key = ",
    key_of!("chain"),
    " CROSS JOIN LATERAL (VALUES \
             (chain.replay, chain.attempt, chain.repush, chain.deferrals + 1), \
             (chain.replay, chain.attempt + 1, chain.repush, 0), \
             (chain.replay + 1, 1, chain.repush, 0), \
             (chain.replay, 1, chain.repush + 1, 0)) AS next(replay, attempt, repush, deferrals) \
     ), \
     tasks AS ( \
         SELECT chain.wid, jobs.id, jobs.status, jobs.attempts >= jobs.max_attempts AS spent, jobs.done_at, \
                coalesce(jobs.status = 'Done' AND jobs.last_result -> 'Ok' ->> 'outcome' IN ",
    settled_dead_outcomes!(),
    ", false) AS settled_dead, \
                coalesce(jobs.status = 'Done' AND jobs.last_result -> 'Ok' ->> 'outcome' = 'delivered', false) AS delivered \
         FROM chain JOIN apalis.jobs AS jobs ON jobs.job_type = $1 AND jobs.idempotency_key = ",
    key_of!("chain"),
    " ), \
     classified AS ( \
         SELECT *, status = 'Killed' OR (status = 'Failed' AND spent) OR settled_dead AS died FROM tasks \
     ), \
     doomed AS ( \
         SELECT wid FROM classified GROUP BY wid \
         HAVING bool_and(status IN ('Done', 'Killed') OR (status = 'Failed' AND spent)) \
             AND (bool_or(died) OR bool_or(delivered)) \
             AND max(done_at) <= now() - make_interval(secs => CASE WHEN bool_or(died) THEN $3 ELSE $4 END) \
     ) \
     DELETE FROM apalis.jobs AS jobs USING classified \
     WHERE jobs.id = classified.id AND classified.wid IN (SELECT wid FROM doomed) \
     RETURNING classified.wid, classified.died"
);

impl PostgresBackend {
    pub(in crate::store) async fn purge(&self, policy: &RetentionPolicy) -> Result<PurgeReport, StoreError> {
        let mut report = PurgeReport::default();
        let mut cursor = String::new();
        loop {
            let keys: Vec<String> = sqlx::query_scalar(NEXT_KEYS)
                .bind(self.sink.queue())
                .bind(&cursor)
                .bind(policy.delivered_secs().min(policy.dead_letter_secs()) as f64)
                .bind(policy.batch() as i64)
                .fetch_all(self.sink.pool())
                .await
                .map_err(StoreError::backend)?;
            let Some(last) = keys.last() else {
                return Ok(report);
            };
            let mut seen = HashSet::new();
            let ids: Vec<&str> = keys
                .iter()
                .filter_map(|key| webhook_id_of_key(key))
                .filter(|id| seen.insert(*id))
                .collect();
            let rows = sqlx::query(DELETE_FINISHED)
                .bind(self.sink.queue())
                .bind(&ids)
                .bind(policy.dead_letter_secs() as f64)
                .bind(policy.delivered_secs() as f64)
                .fetch_all(self.sink.pool())
                .await
                .map_err(StoreError::backend)?;
            let mut batch = Tally::default();
            for row in &rows {
                let wid: String = row.try_get("wid").map_err(|_| StoreError::backend_column("wid"))?;
                let died: Option<bool> = row.try_get("died").map_err(|_| StoreError::backend_column("died"))?;
                batch.task(wid, died.unwrap_or(false));
            }
            report.add(&batch.report());
            // Keyset paging: a delivery whose keys the collation did not keep together is seen
            // again in a later batch, and deciding it twice is harmless.
            cursor = last.clone();
        }
    }
}
