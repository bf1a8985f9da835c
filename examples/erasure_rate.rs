//! How fast `WebhookStore::erase` erases one tenant's deliveries, on SQLite (a temp file), and
//! on Postgres and Redis when `TEST_POSTGRES_URL` / `TEST_REDIS_URL` are set.
//!
//! ```text
//! TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test TEST_REDIS_URL=redis://127.0.0.1:6379/ \
//!     cargo run --release --example erasure_rate
//! ```
//!
//! Per backend: `ERASURE_N` (default 2,000) deliveries of tenant `a` and as many of tenant `b`
//! are delivered over loopback HTTP (1 KiB payloads, a 256-byte answer kept as the response
//! excerpt); then tenant `a` is erased (finished tasks: redacted), then `ERASURE_N` more of
//! tenant `a` are pushed and erased before any worker runs (pending tasks: cancelled).

use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_webhooks::{
    Secret, WebhookJob, WebhookSink, WebhookSubscription, WebhookWorker,
    backend::{postgres, redis, sqlite},
    ssrf::EgressPolicy,
    store::{Erasure, WebhookStore},
    worker::DEFAULT_CONCURRENCY,
};
use axum::{Router, routing::post};
use tokio::{sync::oneshot, task::JoinHandle};

type Error = Box<dyn std::error::Error>;

/// Stops a running worker.
type Running = (oneshot::Sender<()>, JoinHandle<()>);

/// Runs `$worker` until the returned sender fires.
macro_rules! spawn {
    ($worker:expr) => {{
        let worker = $worker;
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            worker
                .run_until(async move {
                    let _ = stopped.await;
                    Ok::<_, WorkerError>(())
                })
                .await
                .expect("worker failed");
        });
        (stop, handle)
    }};
}

fn builder<S: Clone>(sink: S) -> WebhookWorker<S> {
    WebhookWorker::new(sink).egress(EgressPolicy::new().allow_loopback())
}

fn jobs(url: &str, tenant: &str, n: usize) -> Result<Vec<WebhookJob>, Error> {
    let subscription = WebhookSubscription::new(url, Secret::generate()).tenant(tenant);
    let payload = serde_json::json!({ "tenant": tenant, "data": "x".repeat(1000) });
    Ok((0..n)
        .map(|_| subscription.job("customer.updated", &payload))
        .collect::<Result<_, _>>()?)
}

async fn push<K, S: WebhookSink<K>>(sink: &mut S, jobs: Vec<WebhookJob>) -> Result<(), Error> {
    let mut jobs = jobs.into_iter().peekable();
    while jobs.peek().is_some() {
        let chunk: Vec<_> = jobs.by_ref().take(500).collect();
        sink.push_jobs(chunk).await?;
    }
    Ok(())
}

async fn measure<K, S: WebhookSink<K> + Clone>(
    name: &str,
    mut sink: S,
    store: WebhookStore,
    url: &str,
    n: usize,
    start: impl FnOnce() -> Result<Running, Error>,
) -> Result<(), Error> {
    push(&mut sink, jobs(url, "a", n)?).await?;
    push(&mut sink, jobs(url, "b", n)?).await?;
    let (stop, handle) = start()?;
    while store.outstanding().await? > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    handle.await?;

    let started = Instant::now();
    let finished = store.erase(&Erasure::tenant("a")).await?;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{name}: erased {} delivered deliveries of {} in the queue in {elapsed:.2} s: {:.0} deliveries/s",
        finished.deliveries,
        2 * n,
        finished.deliveries as f64 / elapsed
    );

    push(&mut sink, jobs(url, "a", n)?).await?;
    let started = Instant::now();
    let pending = store.erase(&Erasure::tenant("a")).await?;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{name}: cancelled and erased {} pending deliveries of {} in the queue in {elapsed:.2} s: {:.0} deliveries/s",
        pending.cancelled,
        3 * n,
        pending.cancelled as f64 / elapsed
    );
    let started = Instant::now();
    let again = store.erase(&Erasure::tenant("a")).await?;
    println!(
        "{name}: a second run erased {} in {:.2} s",
        again.tasks,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Error> {
    let n: usize = std::env::var("ERASURE_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    let excerpt = "r".repeat(256);
    let app = Router::new().route("/hook", post(move || async move { excerpt }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let queue = format!("erasure-rate-{}", ulid::Ulid::new());

    let dir = tempfile::tempdir()?;
    let pool = sqlite::connect(&format!("sqlite://{}", dir.path().join("rate.db").display())).await?;
    let storage = sqlite::storage(&pool);
    measure(
        "sqlite",
        storage.clone(),
        WebhookStore::sqlite(&storage),
        &url,
        n,
        || {
            let worker = WorkerBuilder::new("erasure-rate")
                .backend(sqlite::worker_backend(storage.clone()))
                .concurrency(DEFAULT_CONCURRENCY)
                .build(builder(storage.clone()).service()?);
            Ok(spawn!(worker))
        },
    )
    .await?;

    if let Some(url_pg) = std::env::var("TEST_POSTGRES_URL").ok().filter(|url| !url.is_empty()) {
        let pool = postgres::connect(&url_pg).await?;
        let storage = postgres::PostgresStorage::new(&pool).with_config(postgres::config().queue(&queue));
        let sink = postgres::PostgresSink::new(&storage);
        measure("postgres", sink.clone(), WebhookStore::postgres(&sink), &url, n, || {
            let worker = WorkerBuilder::new("erasure-rate")
                .backend(postgres::worker_backend_with(storage.clone(), DEFAULT_CONCURRENCY))
                .concurrency(DEFAULT_CONCURRENCY)
                .build(builder(sink.clone()).service()?);
            Ok(spawn!(worker))
        })
        .await?;
        // Leave the shared database as it was.
        sqlx::query("DELETE FROM apalis.jobs WHERE job_type = $1")
            .bind(&queue)
            .execute(&pool)
            .await?;
    }

    if let Some(url_redis) = std::env::var("TEST_REDIS_URL").ok().filter(|url| !url.is_empty()) {
        let conn = redis::connect(&url_redis).await?;
        let storage = redis::RedisStorage::new(conn.clone()).with_config(redis::config().queue(&queue));
        let sink = redis::RedisSink::new(&storage);
        measure("redis", sink.clone(), WebhookStore::redis(&sink), &url, n, || {
            let worker = WorkerBuilder::new("erasure-rate")
                .backend(redis::worker_backend_with(storage.clone(), DEFAULT_CONCURRENCY))
                .concurrency(DEFAULT_CONCURRENCY)
                .build(builder(sink.clone()).service()?);
            Ok(spawn!(worker))
        })
        .await?;
        // Leave the shared server as it was: every key of the queue.
        let mut conn = conn;
        let keys: Vec<String> = {
            let mut iter: ::redis::AsyncIter<String> =
                ::redis::AsyncCommands::scan_match(&mut conn, format!("{queue}:*")).await?;
            let mut keys = Vec::new();
            while let Some(key) = iter.next_item().await {
                keys.push(key?);
            }
            keys
        };
        for chunk in keys.chunks(500) {
            ::redis::cmd("DEL").arg(chunk).query_async::<()>(&mut conn).await?;
        }
    }
    Ok(())
}
