//! [`WorkerBackend`]: an apalis worker backend over a persistence of this crate, the part the
//! Postgres and Redis worker backends share.

use std::{
    fmt,
    marker::PhantomData,
    sync::{Arc, Weak},
    task::{Context, Poll},
    time::Duration,
};

use apalis_codec::json::JsonCodec;
use apalis_core::{
    backend::{
        Backend, BackendConfig, WireFormatBackend,
        finalize::Durable,
        persistence::{Persisted, Persistence, TaskPersistLayer},
    },
    task::Task,
    worker::context::WorkerContext,
};
use serde_json::Value;
use ulid::Ulid;

/// What [`WorkerBackend`] needs from a persistence besides apalis's [`Persistence`].
pub trait WorkerPersistence:
    Persistence<Compact = Vec<u8>, Response = Value, Error = <Self as WorkerPersistence>::Error> + Clone
{
    /// The error of every call.
    type Error: std::error::Error + Send + Sync + 'static;
    /// The apalis storage config it runs with.
    type Config;

    /// The config.
    fn config(&self) -> &Self::Config;
    /// The queue's name, for `Debug`.
    fn queue(&self) -> &str;
    /// How often the worker's heartbeat runs.
    fn heartbeat_interval(&self) -> Duration;
    /// Most tasks fetched at once.
    fn batch_size(&self) -> usize;
    /// Whether task results are stored.
    fn persist_results(&self) -> bool;
    /// Whether a started task is marked as such (its own write per task).
    fn lock_tasks(&self) -> bool;
    /// The same persistence for another worker: its heartbeat lives while `alive` does, and it
    /// holds none of this one's tasks.
    fn for_worker(&self, alive: Weak<()>) -> Self;
}

/// The worker's side of a queue, over a persistence that keeps the worker running through
/// backend outages (see [`PostgresBackend`](crate::backend::postgres::PostgresBackend) and
/// [`RedisBackend`](crate::backend::redis::RedisBackend), the two there are).
pub struct WorkerBackend<P: Persistence, Args> {
    persisted: Persisted<P>,
    codec: JsonCodec,
    // Held, not read: dropping it ends the heartbeat task.
    _alive: Arc<()>,
    _marker: PhantomData<fn() -> Args>,
}

impl<P: WorkerPersistence, Args> WorkerBackend<P, Args> {
    /// The backend over the persistence `make` builds, given the token its heartbeat watches.
    pub(crate) fn with(make: impl FnOnce(Weak<()>) -> P) -> Self {
        let alive = Arc::new(());
        Self {
            persisted: Persisted::new(make(Arc::downgrade(&alive))),
            codec: JsonCodec::default(),
            _alive: alive,
            _marker: PhantomData,
        }
    }
}

impl<P: WorkerPersistence, Args> Clone for WorkerBackend<P, Args> {
    fn clone(&self) -> Self {
        // A clone is another worker's backend: its own heartbeat, tied to its own life.
        Self::with(|alive| self.persisted.for_worker(alive))
    }
}

impl<P: WorkerPersistence, Args> fmt::Debug for WorkerBackend<P, Args> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerBackend")
            .field("queue", &self.persisted.queue())
            .finish_non_exhaustive()
    }
}

impl<P, Args> Backend for WorkerBackend<P, Args>
where
    P: WorkerPersistence + Send + 'static,
{
    type Task = Task<Vec<u8>>;
    type Error = <P as WorkerPersistence>::Error;

    fn poll_ready(&mut self, cx: &mut Context<'_>, worker: &WorkerContext) -> Poll<Result<(), Self::Error>> {
        let interval = self.persisted.heartbeat_interval();
        self.persisted.poll_ready(cx, worker, interval)
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        self.persisted.poll_next(cx, worker)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>, worker: &WorkerContext) -> Poll<Result<(), Self::Error>> {
        self.persisted.poll_close(cx, worker)
    }
}

impl<P: WorkerPersistence, Args> BackendConfig for WorkerBackend<P, Args> {
    type Args = Args;
    type Kind = Durable;
    type Id = Ulid;
    type Config = P::Config;
    type Layer = TaskPersistLayer<JsonCodec<Value>, Value>;

    fn config(&self) -> &P::Config {
        self.persisted.config()
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Self::Layer {
        let (batch_size, persist_results, lock_tasks) = (
            self.persisted.batch_size(),
            self.persisted.persist_results(),
            self.persisted.lock_tasks(),
        );
        self.persisted
            .layer(JsonCodec::<Value>::default(), batch_size)
            .persist_results(persist_results)
            .lock_tasks(lock_tasks)
    }
}

impl<P: WorkerPersistence, Args> WireFormatBackend for WorkerBackend<P, Args> {
    type Codec = JsonCodec;
    type Compact = Vec<u8>;

    fn codec(&self) -> &JsonCodec {
        &self.codec
    }
}
