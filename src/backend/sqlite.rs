//! SQLite (apalis-sqlite), the embedded default.

use apalis_core::backend::ext::poll_strategy::{IntervalStrategy, PollWith};
use std::{str::FromStr, time::Duration};

pub use apalis_sqlite::{Config, Error, SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteStorage};

use apalis_core::backend::{TaskSink, TaskSinkError};

use super::Rearmed;
use crate::{
    job::WebhookJob,
    sink::{Deferral, WebhookSink, task},
    tuning::DEFAULT_POLL_INTERVAL,
};

/// The kind marker of SQLite's [`WebhookSink`]: apalis-sqlite's own storage.
#[derive(Debug)]
pub enum Sqlite {}

/// apalis-sqlite's storage is the SQLite sink as it is: its pushes carry the idempotency key,
/// and a deferral moves the running row back to the queue in place.
impl WebhookSink<Sqlite> for SqliteStorage<WebhookJob> {
    type Error = TaskSinkError<Error>;

    fn push_job(
        &mut self,
        job: WebhookJob,
        run_at: Option<u64>,
    ) -> impl std::future::Future<Output = Result<(), Self::Error>> + Send {
        self.push_task(task(job, run_at))
    }

    fn defer_task(
        &mut self,
        task_id: &str,
        job: WebhookJob,
        run_at: u64,
        result: &str,
    ) -> impl std::future::Future<Output = Result<Deferral, Self::Error>> + Send {
        let pool = self.pool().clone();
        let (task_id, result) = (task_id.to_owned(), result.to_owned());
        async move {
            defer_task(&pool, &task_id, &job, run_at, &result)
                .await
                .map_err(TaskSinkError::PushError)
        }
    }

    fn push_jobs(
        &mut self,
        jobs: Vec<WebhookJob>,
    ) -> impl std::future::Future<Output = Result<(), Self::Error>> + Send {
        // Through the backend's buffered sink: apalis-sqlite writes the batch in one flush.
        let tasks = futures::stream::iter(jobs.into_iter().map(|job| task(job, None)));
        async move { self.push_all(tasks).await }
    }
}

/// Tasks fetched per query. apalis's default of 10 costs a round trip per ten deliveries.
pub const DEFAULT_BATCH_SIZE: usize = 100;

/// Opens (creating if missing) the SQLite database at `url` (for example
/// `sqlite://jobs.db`) with settings suited to a job queue, and applies apalis's migrations.
///
/// WAL journal with `synchronous = NORMAL`: a commit survives the process being killed, and
/// costs no fsync (only a power loss can drop the last commits). SQLite's default, `FULL`,
/// syncs every commit and caps a dispatch loop at a few hundred pushes per second. A busy
/// timeout of 30 s lets the worker and many concurrent dispatchers share the file (SQLite
/// writers take turns, and its busy handler is not fair).
pub async fn connect(url: &str) -> Result<SqlitePool, Error> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .pragma("journal_mode", "WAL")
        .pragma("synchronous", "NORMAL")
        .busy_timeout(Duration::from_secs(30));
    if url.contains(":memory:") || url.contains("mode=memory") {
        // A private in-memory database lives and dies with its one connection.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        SqliteStorage::setup(&pool).await?;
        steer_ack_plan(&pool).await?;
        sqlx::query("ANALYZE sqlite_schema").execute(&pool).await?;
        return Ok(pool);
    }
    // Migrate and write statistics on one connection, then open the pool: SQLite reads planner
    // statistics when a connection opens.
    let setup = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await?;
    SqliteStorage::setup(&setup).await?;
    steer_ack_plan(&setup).await?;
    setup.close().await;
    Ok(SqlitePoolOptions::new().connect_with(options).await?)
}

/// Keeps acknowledgements cheap however many tasks a worker has run.
///
/// apalis-sqlite acknowledges a batch with `UPDATE Jobs … FROM json_each(?) WHERE Jobs.id =
/// task_id AND Jobs.lock_by = ?`. Without statistics SQLite walks the `lock_by` index, which
/// holds every task the worker ever ran (apalis never clears `lock_by`), so each batch cost
/// grows with the worker's history: 130 ms per batch after 2,000 deliveries, and every
/// dispatch waits behind it for the write lock. One row of planner statistics (SQLite lets
/// applications write `sqlite_stat1`) says that index is unselective, and the planner looks
/// tasks up by primary key instead. Only this row is kept for `Jobs`, so no stale statistics
/// steer apalis's other queries.
async fn steer_ack_plan(pool: &SqlitePool) -> Result<(), Error> {
    let mut tx = pool.begin().await?;
    for statement in [
        // Creates sqlite_stat1 if it does not exist yet.
        "ANALYZE Jobs",
        "DELETE FROM sqlite_stat1 WHERE tbl = 'Jobs'",
        "INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES ('Jobs', 'LIdx', '1000000 1000000')",
    ] {
        sqlx::query(statement).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The storage config for webhook jobs: queue [`QUEUE`](crate::backend::QUEUE), batch size
/// [`DEFAULT_BATCH_SIZE`].
pub fn config() -> Config {
    Config::default().queue(super::QUEUE).batch_size(DEFAULT_BATCH_SIZE)
}

/// Webhook storage on `pool` with [`config`]. The pool must be migrated: [`connect`] does it,
/// or run `SqliteStorage::setup(&pool)` once on a pool of your own.
pub fn storage(pool: &SqlitePool) -> SqliteStorage<WebhookJob> {
    SqliteStorage::new(pool).with_config(config())
}

/// Moves the running task `task_id` back to the queue as `job`, due at `run_at` (Unix
/// seconds), under a fresh id, with `result` as its last result (see
/// [`WebhookSink::defer_task`](crate::WebhookSink::defer_task)). Its idempotency key stays.
/// apalis's acknowledgement of the old id then matches no row.
pub(crate) async fn defer_task(
    pool: &SqlitePool,
    task_id: &str,
    job: &WebhookJob,
    run_at: u64,
    result: &str,
) -> Result<Deferral, Error> {
    let body = serde_json::to_vec(job).map_err(|error| Error::Database(sqlx::Error::Encode(Box::new(error))))?;
    let moved = sqlx::query(
        "UPDATE Jobs SET id = ?1, job = ?2, status = 'Pending', run_at = ?3, attempts = 0, last_result = ?4, \
         lock_by = NULL, lock_at = NULL, done_at = NULL \
         WHERE id = ?5 AND status IN ('Queued', 'Running')",
    )
    .bind(ulid::Ulid::new().to_string())
    .bind(body)
    .bind(i64::try_from(run_at).unwrap_or(i64::MAX))
    .bind(result)
    .bind(task_id)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(if moved == 0 { Deferral::Gone } else { Deferral::Moved })
}

/// The webhook worker's builder for `storage`'s queue: a name unique to this process start
/// ([`worker_name`](super::worker_name)), [`worker_backend`] (polled every 100 ms),
/// [`DEFAULT_CONCURRENCY`](crate::worker::DEFAULT_CONCURRENCY) deliveries at once, and for a worker the
/// `Monitor` restarted (`restarts` > 0) a backoff before it uses the database again. Finish it
/// with `.build(service)` inside `Monitor::register`:
///
/// ```no_run
/// # async fn run(pool: apalis_webhooks::sqlite::SqlitePool) -> Result<(), Box<dyn std::error::Error>> {
/// use apalis_core::monitor::Monitor;
/// use apalis_webhooks::{WebhookWorker, sqlite};
///
/// let storage = sqlite::storage(&pool);
/// let service = WebhookWorker::new(storage.clone()).service()?;
/// Monitor::new()
///     .register(move |restarts| sqlite::worker(&storage, restarts).build(service.clone()))
///     .should_restart(|_, _| true)
///     .run()
///     .await?;
/// # Ok(()) }
/// ```
pub fn worker(storage: &SqliteStorage<WebhookJob>, restarts: usize) -> super::WebhookWorkerBuilder<WebhookBackend> {
    super::webhook_worker(
        worker_backend(storage.clone()),
        restarts,
        crate::tuning::DEFAULT_CONCURRENCY,
    )
}

/// The worker backend [`worker`] uses: [`worker_backend`] of the webhook storage.
pub type WebhookBackend = PollWith<SqliteStorage<WebhookJob>, Rearmed<IntervalStrategy>>;

/// The worker backend of `storage`'s queue: the storage polled every [`DEFAULT_POLL_INTERVAL`],
/// without which an idle apalis worker looks for new work only on its heartbeat.
///
/// Postgres and Redis also have `worker_backend_with(storage, concurrency)`, because their worker
/// backends (this crate's) fetch no more than the worker has free slots; SQLite's is
/// apalis-sqlite's own storage, which fetches its batch ([`DEFAULT_BATCH_SIZE`], set in
/// [`config`]) and takes no concurrency.
pub fn worker_backend<T>(storage: SqliteStorage<T>) -> PollWith<SqliteStorage<T>, Rearmed<IntervalStrategy>> {
    PollWith::new(storage, Rearmed(IntervalStrategy::new(DEFAULT_POLL_INTERVAL)))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn ack_plan(pool: &SqlitePool) -> Vec<String> {
        let rows: Vec<(i64, i64, i64, String)> = sqlx::query_as(
            "EXPLAIN QUERY PLAN WITH j AS (SELECT value ->> 'task_id' AS task_id FROM json_each(?1)) \
             UPDATE Jobs SET status = 'Done' FROM j WHERE Jobs.id = j.task_id AND Jobs.lock_by = ?2",
        )
        .bind("[]")
        .bind("worker")
        .fetch_all(pool)
        .await
        .unwrap();
        rows.into_iter().map(|row| row.3).collect()
    }

    /// The statistics row turns apalis's acknowledgement into primary-key lookups; without it
    /// SQLite walks the `lock_by` index (every task the worker ever ran).
    #[tokio::test]
    async fn acknowledgements_look_tasks_up_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let file = connect(&format!("sqlite://{}", dir.path().join("jobs.db").display()))
            .await
            .unwrap();
        let memory = connect("sqlite::memory:").await.unwrap();
        for pool in [&file, &memory] {
            let plan = ack_plan(pool).await;
            assert!(plan.iter().any(|step| step.contains("(id=?)")), "{plan:?}");
            assert!(!plan.iter().any(|step| step.contains("LIdx")), "{plan:?}");
        }
    }
}
