//! [`PostgresBackend`]: the worker's side of an apalis-postgres queue, made to outlive outages
//! and busy spells.

use std::{collections::HashSet, sync::Weak, time::Duration};

use apalis_core::{
    backend::persistence::{Persistence, TaskEvent},
    task::Task,
    worker::context::WorkerContext,
};
use apalis_postgres::{Config, Error, PgPool, PostgresStorage, queries};
use serde_json::Value;

use crate::backend::{
    WorkerBackend, WorkerPersistence,
    resilient::{Custody, spawn_heartbeat, until_ok},
};

/// An apalis-postgres queue as a worker backend that does not stop on a database error.
///
/// apalis-postgres ends the worker on the first failed fetch, heartbeat or acknowledgement
/// (`PollNextError`), and beats only between fetches, so a worker whose slots are full while
/// fetched tasks wait is declared dead by its peers. This backend runs the same queries
/// (apalis's own, on apalis's tables) with three changes:
///
/// - a failed call is logged and tried again with capped backoff (100 ms doubling to 2 s); the worker
///   keeps running and resumes once the database answers; acknowledgements are never dropped;
/// - the heartbeat runs on its own task every `heartbeat_interval`, whatever the worker does;
/// - a fetch asks for no more tasks than the worker has free slots (of `concurrency`), so no
///   fetched task waits for a slot.
///
/// A worker's first fetch re-queues tasks still locked under its name, which only a dead
/// earlier process of the same name can hold.
pub type PostgresBackend<Args> = WorkerBackend<PgPersistence, Args>;

impl<Args> PostgresBackend<Args> {
    /// The worker backend of `storage`'s queue, for a worker running `concurrency` deliveries
    /// at once (set the same number on the `WorkerBuilder`).
    pub fn new(storage: &PostgresStorage<Args>, concurrency: usize) -> Self {
        Self::with(|alive| PgPersistence {
            pool: storage.pool().clone(),
            config: storage.config().clone(),
            concurrency: concurrency.max(1),
            alive,
            custody: Custody::default(),
        })
    }
}

impl std::fmt::Debug for PgPersistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgPersistence")
            .field("queue", &self.config.queue.as_ref())
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl WorkerPersistence for PgPersistence {
    type Error = Error;
    type Config = Config;

    fn config(&self) -> &Config {
        &self.config
    }

    fn queue(&self) -> &str {
        self.config.queue.as_ref()
    }

    fn heartbeat_interval(&self) -> Duration {
        self.config.heartbeat_interval
    }

    fn batch_size(&self) -> usize {
        self.config.batch_size
    }

    fn persist_results(&self) -> bool {
        self.config.persist_results
    }

    fn lock_tasks(&self) -> bool {
        self.config.lock_tasks
    }

    fn for_worker(&self, alive: Weak<()>) -> Self {
        Self {
            alive,
            custody: Custody::default(),
            ..self.clone()
        }
    }
}

/// apalis-postgres's persistence, with its failures absorbed (see [`PostgresBackend`]).
#[derive(Clone)]
pub struct PgPersistence {
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
