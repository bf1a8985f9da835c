//! Ready-made storage settings per apalis backend.

pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
mod rearmed;
#[cfg(feature = "redis")]
pub mod redis;
pub(crate) mod resilient;
mod restart;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(any(feature = "postgres", feature = "redis"))]
mod worker_backend;

pub use rearmed::Rearmed;
pub use restart::{MAX_RESTART_DELAY, Restarted, restart_delay};
#[cfg(any(feature = "postgres", feature = "redis"))]
pub use worker_backend::{WorkerBackend, WorkerPersistence};

/// The queue webhook jobs live in. apalis would otherwise name the queue after the Rust type,
/// which changes when the type moves.
pub const QUEUE: &str = "apalis-webhooks";

/// A worker builder configured as a webhook worker should be, from a backend module's `worker`
/// function (`sqlite::worker`, `postgres::worker`, `redis::worker`): a name unique to this
/// process start, the backend's worker backend (polling or listening), a concurrency limit, and
/// a backoff before a restarted worker uses the backend again. Finish it with `.build(service)`.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub type WebhookWorkerBuilder<B> = apalis_core::worker::builder::WorkerBuilder<
    crate::WebhookJob,
    Restarted<B>,
    tower::layer::util::Stack<tower::limit::ConcurrencyLimitLayer, tower::layer::util::Identity>,
>;

/// The worker builder every backend's `worker` function returns: unique name, backend,
/// concurrency, restart backoff.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub(crate) fn webhook_worker<B>(backend: B, restarts: usize, concurrency: usize) -> WebhookWorkerBuilder<B>
where
    Restarted<B>: apalis_core::backend::Backend + apalis_core::backend::BackendConfig<Args = crate::WebhookJob>,
{
    apalis_core::worker::builder::WorkerBuilder::new(worker_name("webhooks"))
        .backend(Restarted::new(backend, restarts))
        .layer(tower::limit::ConcurrencyLimitLayer::new(concurrency))
}

/// A worker name unique to this process: `{prefix}-{pid}-{random}`.
///
/// The durable backends recover a dead worker's in-flight deliveries once its name stops sending
/// heartbeats. A restarted process that reused the name would, on Postgres, keep the old name
/// alive and its predecessor's deliveries locked for good, and on Redis be refused as "still
/// active".
pub fn worker_name(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), ulid::Ulid::new())
}
