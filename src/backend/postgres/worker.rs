//! [`PostgresBackend`]: the worker's side of an apalis-postgres queue, made to outlive outages
//! and busy spells.

use std::{
    collections::HashSet,
    fmt,
    marker::PhantomData,
    sync::{Arc, Weak},
    task::{Context, Poll},
};

use apalis_codec::json::JsonCodec;
use apalis_core::{
    backend::{
        Backend, BackendConfig, WireFormatBackend,
        finalize::Durable,
        persistence::{Persisted, Persistence, TaskEvent, TaskPersistLayer},
    },
    task::Task,
    worker::context::WorkerContext,
};
use apalis_postgres::{Config, Error, PgPool, PostgresStorage, queries};
use serde_json::Value;
use ulid::Ulid;

use crate::backend::resilient::{Custody, spawn_heartbeat, until_ok};

/// An apalis-postgres queue as a worker backend that does not stop on a database error.
///
/// apalis-postgres ends the worker on the first failed fetch, heartbeat or acknowledgement
/// (`PollNextError`), and beats only between fetches, so a worker whose slots are full while
/// fetched tasks wait is declared dead by its peers. This backend runs the same queries
/// (apalis's own, on apalis's tables) with three changes:
///
/// - a failed call is logged and tried again with capped backoff ([`MAX_BACKOFF`]); the worker
///   keeps running and resumes once the database answers; acknowledgements are never dropped;
/// - the heartbeat runs on its own task every `heartbeat_interval`, whatever the worker does;
/// - a fetch asks for no more tasks than the worker has free slots (of `concurrency`), so no
///   fetched task waits for a slot.
///
/// A worker's first fetch re-queues tasks still locked under its name, which only a dead
/// earlier process of the same name can hold.
///
/// [`MAX_BACKOFF`]: crate::backend::resilient::MAX_BACKOFF
pub struct PostgresBackend<Args> {
    persisted: Persisted<PgPersistence>,
    codec: JsonCodec,
    // Held, not read: dropping it ends the heartbeat task.
    _alive: Arc<()>,
    _marker: PhantomData<fn() -> Args>,
}

impl<Args> PostgresBackend<Args> {
    /// The worker backend of `storage`'s queue, for a worker running `concurrency` deliveries
    /// at once (set the same number on the `WorkerBuilder`).
    pub fn new(storage: &PostgresStorage<Args>, concurrency: usize) -> Self {
        let alive = Arc::new(());
        let persisted = Persisted::new(PgPersistence {
            pool: storage.pool().clone(),
            config: storage.config().clone(),
            concurrency: concurrency.max(1),
            alive: Arc::downgrade(&alive),
            custody: Custody::default(),
        });
        Self {
            persisted,
            codec: JsonCodec::default(),
            _alive: alive,
            _marker: PhantomData,
        }
    }
}

impl<Args> Clone for PostgresBackend<Args> {
    fn clone(&self) -> Self {
        // A clone is another worker's backend: its own heartbeat, tied to its own life.
        let alive = Arc::new(());
        let mut persisted = self.persisted.clone();
        persisted.alive = Arc::downgrade(&alive);
        persisted.custody = Custody::default();
        Self {
            persisted,
            codec: self.codec.clone(),
            _alive: alive,
            _marker: PhantomData,
        }
    }
}

impl<Args> fmt::Debug for PostgresBackend<Args> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("queue", &self.persisted.config.queue.as_ref())
            .field("concurrency", &self.persisted.concurrency)
            .finish_non_exhaustive()
    }
}

impl<Args> Backend for PostgresBackend<Args> {
    type Task = Task<Vec<u8>>;
    type Error = Error;

    fn poll_ready(&mut self, cx: &mut Context<'_>, worker: &WorkerContext) -> Poll<Result<(), Error>> {
        let interval = self.persisted.config.heartbeat_interval;
        self.persisted.poll_ready(cx, worker, interval)
    }

    fn poll_next(&mut self, cx: &mut Context<'_>, worker: &WorkerContext) -> Poll<Option<Result<Self::Task, Error>>> {
        self.persisted.poll_next(cx, worker)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>, worker: &WorkerContext) -> Poll<Result<(), Error>> {
        self.persisted.poll_close(cx, worker)
    }
}

impl<Args> BackendConfig for PostgresBackend<Args> {
    type Args = Args;
    type Kind = Durable;
    type Id = Ulid;
    type Config = Config;
    type Layer = TaskPersistLayer<JsonCodec<Value>, Value>;

    fn config(&self) -> &Config {
        &self.persisted.config
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Self::Layer {
        let config = self.persisted.config.clone();
        self.persisted
            .layer(JsonCodec::<Value>::default(), config.batch_size)
            .persist_results(config.persist_results)
            .lock_tasks(config.lock_tasks)
    }
}

impl<Args> WireFormatBackend for PostgresBackend<Args> {
    type Codec = JsonCodec;
    type Compact = Vec<u8>;

    fn codec(&self) -> &JsonCodec {
        &self.codec
    }
}

/// apalis-postgres's persistence, with its failures absorbed (see [`PostgresBackend`]).
#[derive(Clone)]
struct PgPersistence {
    pool: PgPool,
    config: Config,
    concurrency: usize,
    alive: Weak<()>,
    custody: Custody,
}

impl PgPersistence {
    /// Puts back the tasks locked to this worker that it never received (see [`Custody`]).
    async fn reclaim(&self, worker: &WorkerContext) -> Result<u64, Error> {
        let reclaimed = sqlx::query(
            "UPDATE apalis.jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL \
             WHERE job_type = $1 AND lock_by = $2 AND status IN ('Queued', 'Running') AND NOT (id = ANY($3))",
        )
        .bind(self.config.queue.as_ref())
        .bind(worker.name())
        .bind(self.custody.held())
        .execute(&self.pool)
        .await?
        .rows_affected();
        if reclaimed > 0 {
            tracing::warn!(
                reclaimed,
                "put back webhook tasks a lost fetch reply had locked to this worker"
            );
        }
        Ok(reclaimed)
    }

    /// Takes the name and re-queues what workers silent for too long hold. One transaction,
    /// the database's clock. (What a dead earlier process of this name still holds goes back
    /// with the first fetch's reclaim: this worker's custody is empty then.)
    async fn try_register(&self, worker: &WorkerContext) -> Result<(), Error> {
        let queue = self.config.queue.as_ref();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO apalis.workers (id, worker_type, storage_name, layers, last_seen) \
             VALUES ($1, $2, 'PgStorage', $3, now()) \
             ON CONFLICT (id) DO UPDATE SET worker_type = EXCLUDED.worker_type, layers = EXCLUDED.layers, \
             last_seen = now()",
        )
        .bind(worker.name())
        .bind(queue)
        .bind(worker.get_service())
        .execute(&mut *tx)
        .await?;
        queries::reenqueue_orphaned(&mut *tx, queue, self.config.orphaned_duration().as_secs()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Keeps this worker alive and re-queues the tasks of workers that are not.
    async fn beat(&self, worker: &WorkerContext) -> Result<(), Error> {
        let queue = self.config.queue.as_ref();
        let mut tx = self.pool.begin().await?;
        match queries::keep_alive(&mut *tx, queue, worker).await {
            // The row is gone (deleted by hand, a vacuum of workers): take the name again.
            Err(Error::WorkerOutOfSync) => {
                drop(tx);
                return self.try_register(worker).await;
            }
            other => other?,
        }
        queries::reenqueue_orphaned(&mut *tx, queue, self.config.orphaned_duration().as_secs()).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn try_handle_events(&self, events: &[TaskEvent<Value>], worker: &WorkerContext) -> Result<(), Error> {
        let acks: Vec<_> = events
            .iter()
            .filter_map(|event| match event {
                TaskEvent::Complete(payload) => Some(payload),
                _ => None,
            })
            .collect();
        let acked: HashSet<String> = acks.iter().map(|payload| payload.task_id().to_string()).collect();
        let locks: Vec<String> = events
            .iter()
            .filter_map(|event| match event {
                TaskEvent::Lock { task_id } => Some(task_id.to_string()),
                _ => None,
            })
            .filter(|id| !acked.contains(id))
            .collect();
        if acks.is_empty() && locks.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        if !acks.is_empty() {
            queries::handle_results(&mut *tx, &acks, worker.name()).await?;
        }
        if !locks.is_empty() {
            queries::lock_tasks(&mut *tx, &locks, worker.name()).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

impl Persistence for PgPersistence {
    type Compact = Vec<u8>;
    type Response = Value;
    type Error = Error;

    async fn register(&mut self, worker: &WorkerContext) -> Result<(), Error> {
        until_ok("registering the webhook worker", || self.try_register(worker)).await;
        let this = self.clone();
        let worker = worker.clone();
        spawn_heartbeat(self.alive.clone(), self.config.heartbeat_interval, move || {
            let this = this.clone();
            let worker = worker.clone();
            async move { this.beat(&worker).await }
        });
        Ok(())
    }

    async fn heartbeat(&mut self, _: &WorkerContext) -> Result<(), Error> {
        // The heartbeat task started by `register` beats; the worker loop's beat would stop
        // whenever the loop does.
        Ok(())
    }

    async fn fetch_next(&mut self, worker: &WorkerContext) -> Result<Vec<Task<Vec<u8>>>, Error> {
        let free = self.concurrency.saturating_sub(worker.task_count());
        let limit = self.config.batch_size.min(free);
        if limit == 0 {
            return Ok(Vec::new());
        }
        if self.custody.reclaim_due(self.config.orphaned_duration())
            && let Err(error) = self.reclaim(worker).await
        {
            self.custody.mark_uncertain();
            tracing::warn!(%error, "could not check for tasks a lost fetch locked; the worker polls again");
            return Ok(Vec::new());
        }
        let config = self.config.clone().batch_size(limit);
        let fetched = async {
            let mut tx = self.pool.begin().await?;
            let tasks = queries::fetch_next(&mut *tx, &config, worker).await?;
            tx.commit().await?;
            Ok::<_, Error>(tasks)
        }
        .await;
        // On failure nothing is fetched, and the worker sleeps until its poll strategy wakes
        // it (every `RETRY_POLL_INTERVAL`), which is the backoff.
        match fetched {
            Ok(tasks) => {
                self.custody.received(&tasks);
                Ok(tasks)
            }
            Err(error) => {
                self.custody.mark_uncertain();
                tracing::warn!(%error, "fetching webhook tasks failed; the worker polls again");
                Ok(Vec::new())
            }
        }
    }

    async fn handle_events(&mut self, events: Vec<TaskEvent<Value>>, worker: &WorkerContext) -> Result<(), Error> {
        // An acknowledgement dropped would leave its task locked by a live worker for good.
        until_ok("acknowledging webhook tasks", || {
            self.try_handle_events(&events, worker)
        })
        .await;
        self.custody.settled(&events);
        Ok(())
    }

    async fn reenqueue_abandoned(&mut self, tasks: Vec<Task<Vec<u8>>>, worker: &WorkerContext) -> Result<u64, Error> {
        self.custody.released(&tasks);
        let ids: Vec<String> = tasks
            .iter()
            .filter_map(|task| task.task_id().map(ToString::to_string))
            .collect();
        let queue = self.config.queue.as_ref();
        let result = async {
            let mut tx = self.pool.begin().await?;
            let count = queries::reenqueue_abandoned(&mut *tx, queue, worker.name(), &ids).await?;
            tx.commit().await?;
            Ok::<_, Error>(count)
        }
        .await;
        // Left locked, they go back to the queue once this worker's heartbeat has stopped
        // for the orphan window.
        Ok(result.unwrap_or_else(|error| {
            tracing::warn!(%error, "could not hand back unstarted webhook tasks; they wait for the orphan sweep");
            0
        }))
    }

    async fn push_tasks(&mut self, tasks: Vec<Task<Vec<u8>>>) -> Result<(), Error> {
        let mut tx = self.pool.begin().await?;
        queries::push_tasks(&mut *tx, self.config.queue.as_ref(), tasks).await?;
        tx.commit().await?;
        Ok(())
    }
}
