//! PostgreSQL (apalis-postgres), for fleets of workers and the outbox pattern.
//!
//! Three things differ from handing apalis's `PostgresStorage` to the webhook worker directly:
//!
//! - **Idempotent pushes.** apalis-postgres inserts without `ON CONFLICT`, so storing an attempt
//!   twice (a worker killed between storing the next attempt and acknowledging this one) fails
//!   with a unique violation, and apalis then retries at once, with no backoff. [`PostgresSink`]
//!   inserts with `ON CONFLICT DO NOTHING` on apalis's own `(job_type, idempotency_key)` index.
//! - **Transactional enqueue.** [`InTransaction`] pushes inside the caller's own transaction,
//!   so a webhook is enqueued if and only if the business write commits.
//! - **Pick-up.** [`worker_backend`] wakes the worker on Postgres `NOTIFY` (apalis's trigger fires on
//!   every insert that is due now) and polls for attempts whose backoff has run out.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use apalis::prelude::*;
//! use apalis_webhooks::{WebhookSubscription, WebhookWorker, backend::postgres};
//!
//! let pool = postgres::connect("postgres://postgres@127.0.0.1/app").await?;
//! let storage = postgres::storage(&pool);
//! let sink = postgres::PostgresSink::new(&storage);
//! let worker = postgres::worker(&storage, 0).build(WebhookWorker::new(sink.clone()).service()?);
//!
//! // The outbox pattern: the webhook exists if and only if the order does.
//! let mut tx = pool.begin().await?;
//! // sqlx::query("INSERT INTO orders ...").execute(&mut *tx).await?;
//! WebhookSubscription::new("https://example.com/hook", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
//!     .dispatch(&mut postgres::InTransaction::new(&mut tx, &sink), "order.created", &1)
//!     .await?;
//! tx.commit().await?;
//! # drop(worker); Ok(()) }
//! ```

use std::{fmt, time::Duration};

use apalis_core::backend::ext::poll_strategy::{PollWith, Strategy};
pub use apalis_postgres::{Config, Error, PgConnectOptions, PgConnection, PgPool, PostgresStorage, Pubsub};

use super::Rearmed;
use crate::{
    job::WebhookJob,
    sink::{Deferral, WebhookSink},
};

mod worker;
pub use worker::PostgresBackend;

/// Tasks fetched per query. Measured on a 100,000-delivery backlog with 64 worker slots: 10
/// (apalis's default) drains 2,000/s, 25 2,900/s, 50 4,850/s, 100 1,700/s (README, Performance).
pub const DEFAULT_BATCH_SIZE: usize = 50;

/// How often a worker polls for attempts whose backoff has run out. New deliveries do not
/// wait for it: they wake the worker through `NOTIFY`.
pub const RETRY_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Heartbeat of a worker. A worker that misses [`MISSED_HEARTBEATS`] in a row is presumed dead
/// and its in-flight deliveries go back to the queue (apalis's default is 30 s × 10: five
/// minutes before a killed worker's deliveries are retried).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// See [`HEARTBEAT_INTERVAL`]. 6 × 5 s = 30 s: longer than the longest attempt a worker runs
/// by default ([`DEFAULT_MAX_ATTEMPT_TIMEOUT`](crate::delivery::DEFAULT_MAX_ATTEMPT_TIMEOUT), 20 s), which
/// [`WebhookWorker`](crate::WebhookWorker) checks when it builds its service.
pub const MISSED_HEARTBEATS: usize = 6;

/// Connects to `url` and applies apalis's migrations (schema `apalis`; they need the `pgcrypto`
/// and `hstore` extensions, which a database owner may create). Safe to run from several
/// processes at once: sqlx serialises migrations with an advisory lock.
pub async fn connect(url: &str) -> Result<PgPool, Error> {
    let pool = PgPool::connect(url).await?;
    PostgresStorage::setup(&pool).await?;
    Ok(pool)
}

/// The storage config for webhook jobs: queue [`QUEUE`](crate::backend::QUEUE), batch size
/// [`DEFAULT_BATCH_SIZE`], heartbeat [`HEARTBEAT_INTERVAL`] × [`MISSED_HEARTBEATS`].
pub fn config() -> Config {
    Config::default()
        .queue(super::QUEUE)
        .batch_size(DEFAULT_BATCH_SIZE)
        .heartbeat_interval(HEARTBEAT_INTERVAL)
        .missed_heartbeats(MISSED_HEARTBEATS)
}

/// Webhook storage on `pool` with [`config`]. The pool must be migrated: [`connect`] does it.
pub fn storage(pool: &PgPool) -> PostgresStorage<WebhookJob> {
    PostgresStorage::new(pool).with_config(config())
}

/// The worker backend of `storage`'s queue ([`PostgresBackend`]), for a worker running
/// [`DEFAULT_CONCURRENCY`](crate::worker::DEFAULT_CONCURRENCY) deliveries at once: woken by Postgres
/// `NOTIFY` for new deliveries, polled every [`RETRY_POLL_INTERVAL`] for due retries, and kept
/// running through database outages.
pub fn worker_backend<T>(storage: PostgresStorage<T>) -> PollWith<PostgresBackend<T>, Rearmed<Strategy>> {
    worker_backend_with(storage, crate::tuning::DEFAULT_CONCURRENCY)
}

/// The webhook worker's builder for `storage`'s queue: a name unique to this process start
/// ([`worker_name`](super::worker_name)), [`worker_backend`] (woken by `NOTIFY`),
/// [`DEFAULT_CONCURRENCY`](crate::worker::DEFAULT_CONCURRENCY) deliveries at once, and for a worker the
/// `Monitor` restarted (`restarts` > 0) a backoff before it uses the database again. Finish it
/// with `.build(service)` inside `Monitor::register`:
///
/// ```no_run
/// # async fn run(pool: apalis_webhooks::backend::postgres::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use apalis_core::monitor::Monitor;
/// use apalis_webhooks::{WebhookWorker, backend::postgres};
///
/// let storage = postgres::storage(&pool);
/// let service = WebhookWorker::new(postgres::PostgresSink::new(&storage)).service()?;
/// Monitor::new()
///     .register(move |restarts| postgres::worker(&storage, restarts).build(service.clone()))
///     .should_restart(|_, _| true)
///     .run()
///     .await?;
/// # Ok(()) }
/// ```
pub fn worker(storage: &PostgresStorage<WebhookJob>, restarts: usize) -> super::WebhookWorkerBuilder<WebhookBackend> {
    super::webhook_worker(
        worker_backend(storage.clone()),
        restarts,
        crate::tuning::DEFAULT_CONCURRENCY,
    )
}

/// The worker backend [`worker`] uses: [`worker_backend`] of the webhook storage.
pub type WebhookBackend = PollWith<PostgresBackend<WebhookJob>, Rearmed<Strategy>>;

/// As [`worker_backend`], for a worker running `concurrency` deliveries at once (the number given
/// to `WorkerBuilder::concurrency`): no more tasks are fetched than it has free slots.
pub fn worker_backend_with<T>(
    storage: PostgresStorage<T>,
    concurrency: usize,
) -> PollWith<PostgresBackend<T>, Rearmed<Strategy>> {
    let notifications = Pubsub::new(storage.pool().clone(), storage.config().queue.to_string());
    let strategy = Strategy::new().stream(notifications).interval(RETRY_POLL_INTERVAL);
    PollWith::new(PostgresBackend::new(&storage, concurrency), Rearmed(strategy))
}

/// Pushes webhook jobs into the queue of a [`PostgresStorage`], idempotently. Cheap to clone.
///
/// The sink to dispatch through and to give the worker (its retries go there too); a plain
/// `PostgresStorage` is not a sink.
///
/// ```no_run
/// # async fn run(pool: apalis_webhooks::backend::postgres::PgPool) -> Result<(), apalis_webhooks::DispatchError> {
/// use apalis_webhooks::{Secret, WebhookSubscription, backend::postgres};
///
/// let mut sink = postgres::PostgresSink::new(&postgres::storage(&pool));
/// WebhookSubscription::new("https://example.com/hooks", Secret::generate())
///     .dispatch(&mut sink, "order.created", &serde_json::json!({ "order": 42 }))
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresSink {
    pool: PgPool,
    queue: String,
    orphan_window: Duration,
}

impl PostgresSink {
    /// A sink into the same database and queue as `storage`.
    pub fn new(storage: &PostgresStorage<WebhookJob>) -> Self {
        Self {
            pool: storage.pool().clone(),
            queue: storage.config().queue.to_string(),
            orphan_window: storage.config().orphaned_duration(),
        }
    }

    /// The queue this sink pushes into.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The pool this sink pushes into.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl fmt::Debug for PostgresSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSink")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// Marker for [`WebhookSink`] on the Postgres sinks.
#[derive(Debug, Clone, Copy)]
pub enum Postgres {}

impl WebhookSink<Postgres> for PostgresSink {
    type Error = Error;

    async fn push_job(&mut self, job: WebhookJob, run_at: Option<u64>) -> Result<(), Error> {
        insert(&self.pool, &self.queue, &job, run_at).await
    }

    fn orphan_window(&self) -> Option<Duration> {
        Some(self.orphan_window)
    }

    async fn push_jobs(&mut self, jobs: Vec<WebhookJob>) -> Result<(), Error> {
        insert_all(&self.pool, &self.queue, &jobs).await
    }

    async fn defer_task(
        &mut self,
        task_id: &str,
        job: WebhookJob,
        run_at: u64,
        result: &str,
    ) -> Result<Deferral, Error> {
        defer_task(&self.pool, task_id, &job, run_at, result).await
    }
}

/// Moves the running task `task_id` back to the queue under a fresh id (see
/// [`WebhookSink::defer_task`]), due `run_at` by the database's clock as [`insert`] computes it.
async fn defer_task(
    pool: &PgPool,
    task_id: &str,
    job: &WebhookJob,
    run_at: u64,
    result: &str,
) -> Result<Deferral, Error> {
    let body = serde_json::to_vec(job).map_err(Error::JsonError)?;
    let moved = sqlx::query(
        "UPDATE apalis.jobs SET id = $1, job = $2, status = 'Pending', \
         run_at = now() + make_interval(secs => $3::float8), attempts = 0, last_result = $4::jsonb, \
         lock_by = NULL, lock_at = NULL, done_at = NULL \
         WHERE id = $5 AND status IN ('Queued', 'Running')",
    )
    .bind(ulid::Ulid::new().to_string())
    .bind(body)
    .bind(crate::clock::until(run_at).as_secs_f64().min(MAX_DELAY_SECS))
    .bind(result)
    .bind(task_id)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(if moved == 0 { Deferral::Gone } else { Deferral::Moved })
}

/// Pushes webhook jobs inside the caller's transaction: they become visible to workers when
/// it commits and vanish if it rolls back.
pub struct InTransaction<'t> {
    conn: &'t mut PgConnection,
    queue: String,
}

impl<'t> InTransaction<'t> {
    /// Pushes through `conn` (usually `&mut tx` of a `sqlx::Transaction`) into `sink`'s queue.
    pub fn new(conn: &'t mut PgConnection, sink: &PostgresSink) -> Self {
        Self {
            conn,
            queue: sink.queue.clone(),
        }
    }
}

impl fmt::Debug for InTransaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InTransaction")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl WebhookSink<Postgres> for InTransaction<'_> {
    type Error = Error;

    async fn push_job(&mut self, job: WebhookJob, run_at: Option<u64>) -> Result<(), Error> {
        insert(&mut *self.conn, &self.queue, &job, run_at).await
    }

    async fn push_jobs(&mut self, jobs: Vec<WebhookJob>) -> Result<(), Error> {
        insert_all(&mut *self.conn, &self.queue, &jobs).await
    }
}

/// Longest delay stored: 400 days.
const MAX_DELAY_SECS: f64 = 400.0 * 24.0 * 3600.0;

/// apalis-postgres's own insert (`queries/task/sink.sql`), one row, plus `ON CONFLICT DO NOTHING`.
///
/// Due times are the database's clock: workers fetch by its `now()`, so `run_at` is stored as
/// `now()` plus the delay this process measured to it (a clock skew between this machine and
/// the database moves nothing). A job due now gets `now()` exactly: apalis's `NOTIFY` trigger
/// fires only for `run_at <= now()`, and inside a transaction `now()` is the transaction's
/// start. Delays are capped at 400 days, so no stored value can
/// leave PostgreSQL's range.
async fn insert<'e, E>(executor: E, queue: &str, job: &WebhookJob, run_at: Option<u64>) -> Result<(), Error>
where
    E: sqlx::PgExecutor<'e>,
{
    let body = serde_json::to_vec(job).map_err(Error::JsonError)?;
    sqlx::query(
        "INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority, metadata, \
         idempotency_key) \
         VALUES ($1, $2, $3, 'Pending', 0, $4, now() + make_interval(secs => COALESCE($5::float8, 0)), 0, ''::hstore, $6) \
         ON CONFLICT (job_type, idempotency_key) DO NOTHING",
    )
    .bind(ulid::Ulid::new().to_string())
    .bind(queue)
    .bind(body)
    .bind(crate::sink::INFRA_MAX_ATTEMPTS as i32)
    .bind(run_at.map(|t| crate::clock::until(t).as_secs_f64().min(MAX_DELAY_SECS)))
    .bind(job.idempotency_key())
    .execute(executor)
    .await?;
    Ok(())
}

/// As [`insert`] for many jobs due now, in one statement (fan-out): all are stored or none.
async fn insert_all<'e, E>(executor: E, queue: &str, jobs: &[WebhookJob]) -> Result<(), Error>
where
    E: sqlx::PgExecutor<'e>,
{
    let mut ids = Vec::with_capacity(jobs.len());
    let mut bodies = Vec::with_capacity(jobs.len());
    let mut keys = Vec::with_capacity(jobs.len());
    for job in jobs {
        ids.push(ulid::Ulid::new().to_string());
        bodies.push(serde_json::to_vec(job).map_err(Error::JsonError)?);
        keys.push(job.idempotency_key());
    }
    sqlx::query(
        "INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority, metadata, \
         idempotency_key) \
         SELECT id, $2, job, 'Pending', 0, $4, now(), 0, ''::hstore, key \
         FROM unnest($1::text[], $3::bytea[], $5::text[]) AS t(id, job, key) \
         ON CONFLICT (job_type, idempotency_key) DO NOTHING",
    )
    .bind(ids)
    .bind(queue)
    .bind(bodies)
    .bind(crate::sink::INFRA_MAX_ATTEMPTS as i32)
    .bind(keys)
    .execute(executor)
    .await?;
    Ok(())
}
