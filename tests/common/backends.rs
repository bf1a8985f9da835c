//! One trait over the backends, so that one test body runs on each (see tests/backends.rs).
//!
//! Postgres and Redis tests use `TEST_POSTGRES_URL` / `TEST_REDIS_URL`, by default the local
//! servers, and fail when these are unreachable unless `SKIP_BACKEND_TESTS=1` is set (see
//! `services.rs`). Every test gets its own queue, hence its own rows and keys, so tests run
//! in parallel on one server.
#![allow(dead_code)]

use std::sync::Mutex;

use apalis::prelude::*;
use apalis_webhooks::{
    WebhookJob, WebhookSink, WebhookWorker,
    backend::{memory, postgres, redis, sqlite, worker_name},
    delivery::{DeliveryRequest, HttpDelivery},
    outcome::AttemptResult,
    store::WebhookStore,
};
use tokio::{sync::oneshot, task::JoinHandle};

// Relative to this file, which tests and benches both include.
#[path = "services.rs"]
pub mod services;

/// Runs `worker` until `stop` fires.
macro_rules! spawn_until {
    ($worker:expr, $stop:expr) => {{
        let worker = $worker;
        let stop = $stop;
        tokio::spawn(async move {
            worker
                .run_until(async move {
                    let _ = stop.await;
                    Ok::<_, WorkerError>(())
                })
                .await
                .unwrap()
        })
    }};
}

/// Worker slots of a test worker.
pub const CONCURRENCY: usize = 8;

/// A backend with a queue of its own.
pub trait TestBackend: Sized + Send + Sync + 'static {
    /// Kind marker of the sink.
    type Marker: Send + 'static;
    /// Where deliveries are pushed.
    type Sink: WebhookSink<Self::Marker> + Clone + Send + Sync + 'static;

    /// A fresh queue for test `test`, or `None` (with a printed notice) if the server is
    /// unreachable and `SKIP_BACKEND_TESTS=1`; fails the test if it is unreachable otherwise.
    async fn open(test: &str) -> Option<Self>;

    fn sink(&self) -> Self::Sink;

    /// Dead letters and history; `None` on the in-memory backend.
    fn store(&self) -> Option<WebhookStore>;

    /// Runs a webhook worker built from `builder` until `stop` fires.
    fn run(&self, builder: WebhookWorker<Self::Sink>, stop: oneshot::Receiver<()>) -> JoinHandle<()> {
        self.run_with(builder, CONCURRENCY, stop)
    }

    /// As `run`, with `concurrency` slots.
    fn run_with(
        &self,
        builder: WebhookWorker<Self::Sink>,
        concurrency: usize,
        stop: oneshot::Receiver<()>,
    ) -> JoinHandle<()> {
        let signing = builder.signing_layer();
        self.run_layered(builder, signing, concurrency, stop)
    }

    /// As `run_with`, delivering through `layer` (which should include the signer).
    fn run_layered<L>(
        &self,
        builder: WebhookWorker<Self::Sink>,
        layer: L,
        concurrency: usize,
        stop: oneshot::Receiver<()>,
    ) -> JoinHandle<()>
    where
        L: Layered;

    /// The job of every task the backend stores for this queue, as JSON, whatever its state.
    async fn stored_jobs(&self) -> Vec<serde_json::Value>;
}

/// What a delivery stack around [`HttpDelivery`] must be for a test worker.
pub trait Layered: tower::Layer<HttpDelivery, Service = Self::Stack> {
    type Stack: tower::Service<
            DeliveryRequest,
            Response = AttemptResult,
            Future: Send + 'static,
            Error: Into<apalis_core::error::BoxDynError> + Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static;
}

impl<L> Layered for L
where
    L: tower::Layer<HttpDelivery>,
    L::Service: tower::Service<DeliveryRequest, Response = AttemptResult> + Clone + Send + Sync + 'static,
    <L::Service as tower::Service<DeliveryRequest>>::Future: Send + 'static,
    <L::Service as tower::Service<DeliveryRequest>>::Error: Into<apalis_core::error::BoxDynError> + Send + 'static,
{
    type Stack = L::Service;
}

fn parse_jobs(jobs: Vec<Vec<u8>>) -> Vec<serde_json::Value> {
    jobs.iter().map(|job| serde_json::from_slice(job).unwrap()).collect()
}

fn unique_queue(test: &str) -> String {
    format!("t-{test}-{}", ulid::Ulid::new())
}

pub struct Sqlite {
    _dir: tempfile::TempDir,
    pub pool: sqlite::SqlitePool,
    queue: String,
}

impl Sqlite {
    pub fn queue(&self) -> &str {
        &self.queue
    }

    pub fn storage(&self) -> sqlite::SqliteStorage<WebhookJob> {
        sqlite::SqliteStorage::new(&self.pool).with_config(sqlite::config().queue(&self.queue))
    }
}

impl TestBackend for Sqlite {
    type Marker = sqlite::Sqlite;
    type Sink = sqlite::SqliteStorage<WebhookJob>;

    async fn open(test: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let pool = sqlite::connect(&format!("sqlite://{}", dir.path().join("jobs.db").display()))
            .await
            .unwrap();
        Some(Self {
            _dir: dir,
            pool,
            queue: unique_queue(test),
        })
    }

    fn sink(&self) -> Self::Sink {
        self.storage()
    }

    fn store(&self) -> Option<WebhookStore> {
        Some(WebhookStore::sqlite(&self.storage()))
    }

    async fn stored_jobs(&self) -> Vec<serde_json::Value> {
        let jobs = sqlx::query_scalar("SELECT job FROM Jobs WHERE job_type = ?1")
            .bind(&self.queue)
            .fetch_all(&self.pool)
            .await
            .unwrap();
        parse_jobs(jobs)
    }

    fn run_layered<L: Layered>(
        &self,
        builder: WebhookWorker<Self::Sink>,
        layer: L,
        concurrency: usize,
        stop: oneshot::Receiver<()>,
    ) -> JoinHandle<()> {
        let worker = WorkerBuilder::new(worker_name("test"))
            .backend(sqlite::worker_backend(self.storage()))
            .concurrency(concurrency)
            .build(builder.service_with(layer).unwrap());
        spawn_until!(worker, stop)
    }
}

pub struct Postgres {
    pub pool: postgres::PgPool,
    queue: String,
}

impl Postgres {
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Deletes this test's rows, for tests that store many: the test database is shared by
    /// every run on the machine.
    pub async fn clear(&self) {
        sqlx::query("DELETE FROM apalis.jobs WHERE job_type = $1")
            .bind(&self.queue)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    pub fn storage(&self) -> postgres::PostgresStorage<WebhookJob> {
        postgres::PostgresStorage::new(&self.pool).with_config(postgres::config().queue(&self.queue))
    }
}

impl TestBackend for Postgres {
    type Marker = postgres::Postgres;
    type Sink = postgres::PostgresSink;

    async fn open(test: &str) -> Option<Self> {
        let url = services::postgres_url(test).await?;
        Some(Self {
            pool: postgres::connect(&url).await.unwrap(),
            queue: unique_queue(test),
        })
    }

    fn sink(&self) -> Self::Sink {
        postgres::PostgresSink::new(&self.storage())
    }

    fn store(&self) -> Option<WebhookStore> {
        Some(WebhookStore::postgres(&self.sink()))
    }

    async fn stored_jobs(&self) -> Vec<serde_json::Value> {
        let jobs = sqlx::query_scalar("SELECT job FROM apalis.jobs WHERE job_type = $1")
            .bind(&self.queue)
            .fetch_all(&self.pool)
            .await
            .unwrap();
        parse_jobs(jobs)
    }

    fn run_layered<L: Layered>(
        &self,
        builder: WebhookWorker<Self::Sink>,
        layer: L,
        concurrency: usize,
        stop: oneshot::Receiver<()>,
    ) -> JoinHandle<()> {
        let worker = WorkerBuilder::new(worker_name("test"))
            .backend(postgres::worker_backend_with(self.storage(), concurrency))
            .concurrency(concurrency)
            .build(builder.service_with(layer).unwrap());
        spawn_until!(worker, stop)
    }
}

pub struct Redis {
    pub conn: redis::ConnectionManager,
    queue: String,
}

impl Redis {
    pub fn storage(&self) -> redis::RedisStorage<WebhookJob> {
        redis::RedisStorage::new(self.conn.clone()).with_config(redis::config().queue(&self.queue))
    }

    /// The keys matching `pattern`, each once. SCAN, not KEYS: one KEYS over a Redis that other
    /// tests have filled can outlast the connection's response timeout.
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, page): (u64, Vec<String>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(10_000)
                .query_async(&mut self.conn.clone())
                .await
                .unwrap();
            keys.extend(page);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        // SCAN may return a key twice while Redis rehashes.
        keys.sort();
        keys.dedup();
        keys
    }

    /// Deletes this test's keys, for tests that store many: the test Redis is shared by every
    /// run on the machine.
    pub async fn clear(&self) {
        for keys in self.keys(&format!("{}:*", self.queue)).await.chunks(1_000) {
            let _: () = ::redis::cmd("UNLINK")
                .arg(keys)
                .query_async(&mut self.conn.clone())
                .await
                .unwrap();
        }
    }
}

impl TestBackend for Redis {
    type Marker = redis::Redis;
    type Sink = redis::RedisSink;

    async fn open(test: &str) -> Option<Self> {
        let url = services::redis_url(test).await?;
        Some(Self {
            conn: redis::connect(&url).await.unwrap(),
            queue: unique_queue(test),
        })
    }

    fn sink(&self) -> Self::Sink {
        redis::RedisSink::new(&self.storage())
    }

    fn store(&self) -> Option<WebhookStore> {
        Some(WebhookStore::redis(&self.sink()))
    }

    async fn stored_jobs(&self) -> Vec<serde_json::Value> {
        let data = redis::config().queue(&self.queue).job_data_hash();
        let jobs: Vec<Vec<u8>> = ::redis::cmd("HVALS")
            .arg(data)
            .query_async(&mut self.conn.clone())
            .await
            .unwrap();
        parse_jobs(jobs)
    }

    fn run_layered<L: Layered>(
        &self,
        builder: WebhookWorker<Self::Sink>,
        layer: L,
        concurrency: usize,
        stop: oneshot::Receiver<()>,
    ) -> JoinHandle<()> {
        let worker = WorkerBuilder::new(worker_name("test"))
            .backend(redis::worker_backend_with(self.storage(), concurrency))
            .concurrency(concurrency)
            .build(builder.service_with(layer).unwrap());
        spawn_until!(worker, stop)
    }
}

pub struct Memory {
    storage: Mutex<Option<apalis_core::backend::memory::MemoryStorage<WebhookJob>>>,
    sink: memory::MemorySink,
}

impl TestBackend for Memory {
    type Marker = memory::InProcess;
    type Sink = memory::MemorySink;

    async fn open(_test: &str) -> Option<Self> {
        let (storage, sink) = memory::storage();
        Some(Self {
            storage: Mutex::new(Some(storage)),
            sink,
        })
    }

    fn sink(&self) -> Self::Sink {
        self.sink.clone()
    }

    fn store(&self) -> Option<WebhookStore> {
        None
    }

    /// The in-memory backend keeps no finished tasks, and its queue cannot be read.
    async fn stored_jobs(&self) -> Vec<serde_json::Value> {
        Vec::new()
    }

    fn run_layered<L: Layered>(
        &self,
        builder: WebhookWorker<Self::Sink>,
        layer: L,
        concurrency: usize,
        stop: oneshot::Receiver<()>,
    ) -> JoinHandle<()> {
        let storage = self
            .storage
            .lock()
            .unwrap()
            .take()
            .expect("one worker per in-memory queue");
        let worker = WorkerBuilder::new(worker_name("test"))
            .backend(storage)
            .concurrency(concurrency)
            .build(builder.service_with(layer).unwrap());
        spawn_until!(worker, stop)
    }
}
