//! What a backend holds per 100,000 delivered deliveries, before and after
//! `WebhookStore::purge`, and how fast the purge goes.
//!
//! ```sh
//! cargo run --release --example retention_bench --all-features -- \
//!     [--deliveries 100000] [--rounds 2] [--backends sqlite,postgres,redis]
//! ```
//!
//! Each round delivers `--deliveries` deliveries (1 KiB payloads) over HTTP to a receiver on
//! 127.0.0.1 through the real worker (64 slots), measures, purges them all (a 0-day delivered
//! window), and measures again; a second round shows whether the space freed is used again.
//!
//! - SQLite: a fresh file in a temporary directory; the file and its WAL, and the pages in use.
//! - Postgres: a database of its own, `apalis_webhooks_retention_bench` (dropped and made again
//!   on the server of `TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`);
//!   `pg_total_relation_size('apalis.jobs')` (table, TOAST, indexes) and its live rows.
//! - Redis (`TEST_REDIS_URL`, default `redis://127.0.0.1:6379/`): a fresh queue; its keys, the
//!   sum of their `MEMORY USAGE`, and the server's `used_memory` (shared with anything else
//!   using that server).

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use apalis::prelude::*;
use apalis_webhooks::{
    Secret, WebhookJob, WebhookSink, WebhookSubscription, WebhookWorker,
    backend::{postgres, redis, sqlite, worker_name},
    ssrf::EgressPolicy,
    store::{RetentionPolicy, WebhookStore},
};
use axum::{Router, extract::State, http::StatusCode, routing::post};
use tokio::sync::{oneshot, watch};

const CONCURRENCY: usize = 64;
const PAYLOAD_BYTES: usize = 1024;
const BENCH_DATABASE: &str = "apalis_webhooks_retention_bench";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    deliveries: usize,
    rounds: usize,
    backends: Vec<String>,
}

impl Args {
    fn parse() -> Result<Self, BoxError> {
        let mut args = Self {
            deliveries: 100_000,
            rounds: 2,
            backends: vec!["sqlite".into(), "postgres".into(), "redis".into()],
        };
        let mut given = std::env::args().skip(1);
        while let Some(flag) = given.next() {
            let value = given.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--deliveries" => args.deliveries = value.parse()?,
                "--rounds" => args.rounds = value.parse()?,
                "--backends" => args.backends = value.split(',').map(str::to_owned).collect(),
                other => return Err(format!("unknown flag {other}").into()),
            }
        }
        Ok(args)
    }
}

/// A receiver on 127.0.0.1 answering 204 and counting requests.
async fn receiver() -> (String, watch::Receiver<u64>) {
    async fn answer(State(served): State<Arc<watch::Sender<u64>>>) -> StatusCode {
        served.send_modify(|n| *n += 1);
        StatusCode::NO_CONTENT
    }
    let (served, watcher) = watch::channel(0);
    let app = Router::new().route("/hook", post(answer)).with_state(Arc::new(served));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, watcher)
}

fn jobs(url: &str, n: usize) -> Vec<WebhookJob> {
    let subscription = WebhookSubscription::new(url, Secret::generate());
    let pad = "x".repeat(PAYLOAD_BYTES - 32);
    (0..n)
        .map(|seq| {
            subscription
                .job("order.created", &serde_json::json!({ "seq": seq, "pad": pad }))
                .unwrap()
        })
        .collect()
}

/// Pushes `n` deliveries, runs `run` (a worker) until all arrived and none is outstanding.
async fn deliver<S, K>(
    sink: &mut S,
    store: &WebhookStore,
    n: usize,
    url: &str,
    served: &mut watch::Receiver<u64>,
    run: impl FnOnce(oneshot::Receiver<()>) -> tokio::task::JoinHandle<()>,
) -> Result<Duration, BoxError>
where
    S: WebhookSink<K>,
{
    let target = *served.borrow() + n as u64;
    for chunk in jobs(url, n).chunks(1000) {
        sink.push_jobs(chunk.to_vec()).await?;
    }
    let started = Instant::now();
    let (stop, stopped) = oneshot::channel();
    let worker = run(stopped);
    served.wait_for(|&count| count >= target).await?;
    while store.outstanding().await? > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    let _ = stop.send(());
    worker.await?;
    Ok(took)
}

/// Runs an apalis worker until `$stop` fires.
macro_rules! run_until {
    ($worker:expr, $stop:expr) => {{
        let worker = $worker;
        tokio::spawn(async move {
            if let Err(error) = worker
                .run_until(async move {
                    let _ = $stop.await;
                    Ok::<_, WorkerError>(())
                })
                .await
            {
                eprintln!("worker stopped: {error}");
            }
        })
    }};
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn print_row(backend: &str, stage: &str, tasks: u64, size: &str) {
    println!("| {backend} | {stage} | {tasks} | {size} |");
}

fn purge_line(backend: &str, round: usize, n: usize, took: Duration, report: &apalis_webhooks::store::PurgeReport) {
    println!(
        "| {backend} | round {round}: purge of {n} | {} deliveries, {} tasks, {} keys in {} batches | {:.2} s, {:.0} deliveries/s |",
        report.deliveries(),
        report.tasks,
        report.keys,
        report.batches,
        took.as_secs_f64(),
        report.deliveries() as f64 / took.as_secs_f64()
    );
}

async fn sqlite_bench(args: &Args) -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("jobs.db");
    let pool = sqlite::connect(&format!("sqlite://{}", path.display())).await?;
    let storage = sqlite::storage(&pool);
    let store = WebhookStore::sqlite(&storage);
    let (url, mut served) = receiver().await;
    let measure = |stage: String| {
        let (pool, path) = (pool.clone(), path.clone());
        async move {
            let tasks: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM Jobs").fetch_one(&pool).await?;
            let page: i64 = sqlx::query_scalar("PRAGMA page_size").fetch_one(&pool).await?;
            let pages: i64 = sqlx::query_scalar("PRAGMA page_count").fetch_one(&pool).await?;
            let free: i64 = sqlx::query_scalar("PRAGMA freelist_count").fetch_one(&pool).await?;
            let wal = path.with_extension("db-wal");
            let (file, wal) = (file_size(&path), file_size(&wal));
            let used = ((pages - free).max(0) * page) as u64;
            print_row(
                "SQLite",
                &stage,
                tasks as u64,
                &format!("file {} + WAL {}; pages in use {}", mib(file), mib(wal), mib(used)),
            );
            Ok::<_, BoxError>(())
        }
    };
    measure("empty".into()).await?;
    for round in 1..=args.rounds {
        let took = deliver(
            &mut storage.clone(),
            &store,
            args.deliveries,
            &url,
            &mut served,
            |stop| {
                let worker = WorkerBuilder::new(worker_name("retention-bench"))
                    .backend(sqlite::worker_backend(storage.clone()))
                    .concurrency(CONCURRENCY)
                    .build(
                        WebhookWorker::new(storage.clone())
                            .egress(EgressPolicy::new().allow_loopback())
                            .service()
                            .unwrap(),
                    );
                run_until!(worker, stop)
            },
        )
        .await?;
        eprintln!("sqlite round {round}: delivered in {:.1} s", took.as_secs_f64());
        measure(format!("round {round}: {} delivered", args.deliveries)).await?;
        let started = Instant::now();
        let report = store.purge(&purge_all()).await?;
        purge_line("SQLite", round, args.deliveries, started.elapsed(), &report);
        measure(format!("round {round}: after purge")).await?;
    }
    Ok(())
}

fn purge_all() -> RetentionPolicy {
    RetentionPolicy::new().keep_delivered(Duration::ZERO).unwrap()
}

async fn postgres_bench(args: &Args) -> Result<(), BoxError> {
    let server =
        std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let admin = sqlx::PgPool::connect(&server).await?;
    sqlx::query("DROP DATABASE IF EXISTS apalis_webhooks_retention_bench")
        .execute(&admin)
        .await?;
    sqlx::query("CREATE DATABASE apalis_webhooks_retention_bench")
        .execute(&admin)
        .await?;
    let mut url = url::Url::parse(&server)?;
    url.set_path(BENCH_DATABASE);
    let pool = postgres::connect(url.as_str()).await?;
    let storage = postgres::PostgresStorage::new(&pool).with_config(postgres::config());
    let sink = postgres::PostgresSink::new(&storage);
    let store = WebhookStore::postgres(&sink);
    let (url, mut served) = receiver().await;
    let measure = |stage: String| {
        let pool = pool.clone();
        async move {
            let tasks: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM apalis.jobs")
                .fetch_one(&pool)
                .await?;
            let size: i64 = sqlx::query_scalar("SELECT pg_total_relation_size('apalis.jobs')")
                .fetch_one(&pool)
                .await?;
            print_row("Postgres", &stage, tasks as u64, &mib(size as u64));
            Ok::<_, BoxError>(())
        }
    };
    measure("empty".into()).await?;
    for round in 1..=args.rounds {
        let took = deliver(&mut sink.clone(), &store, args.deliveries, &url, &mut served, |stop| {
            let worker = WorkerBuilder::new(worker_name("retention-bench"))
                .backend(postgres::worker_backend_with(storage.clone(), CONCURRENCY))
                .concurrency(CONCURRENCY)
                .build(
                    WebhookWorker::new(sink.clone())
                        .egress(EgressPolicy::new().allow_loopback())
                        .service()
                        .unwrap(),
                );
            run_until!(worker, stop)
        })
        .await?;
        eprintln!("postgres round {round}: delivered in {:.1} s", took.as_secs_f64());
        measure(format!("round {round}: {} delivered", args.deliveries)).await?;
        let started = Instant::now();
        let report = store.purge(&purge_all()).await?;
        purge_line("Postgres", round, args.deliveries, started.elapsed(), &report);
        measure(format!("round {round}: after purge")).await?;
        sqlx::query("VACUUM apalis.jobs").execute(&pool).await?;
        measure(format!("round {round}: after purge and VACUUM")).await?;
    }
    drop(pool);
    Ok(())
}

async fn redis_bench(args: &Args) -> Result<(), BoxError> {
    let server = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let conn = redis::connect(&server).await?;
    let queue = format!("retention-bench-{}", ulid::Ulid::new());
    let storage = redis::RedisStorage::new(conn.clone()).with_config(redis::config().queue(&queue));
    let sink = redis::RedisSink::new(&storage);
    let store = WebhookStore::redis(&sink);
    let (url, mut served) = receiver().await;
    let measure = |stage: String| {
        let (mut conn, queue) = (conn.clone(), queue.clone());
        async move {
            let mut keys: Vec<String> = Vec::new();
            let mut cursor = 0u64;
            loop {
                let (next, page): (u64, Vec<String>) = ::redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{queue}:*"))
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await?;
                keys.extend(page);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            keys.sort();
            keys.dedup();
            let mut bytes = 0u64;
            for chunk in keys.chunks(1000) {
                let mut pipe = ::redis::pipe();
                for key in chunk {
                    pipe.cmd("MEMORY").arg("USAGE").arg(key);
                }
                let sizes: Vec<Option<u64>> = pipe.query_async(&mut conn).await?;
                bytes += sizes.into_iter().flatten().sum::<u64>();
            }
            let tasks: u64 = ::redis::cmd("HLEN")
                .arg(format!("{queue}:data"))
                .query_async(&mut conn)
                .await?;
            let info: String = ::redis::cmd("INFO").arg("memory").query_async(&mut conn).await?;
            let used = info
                .lines()
                .find_map(|line| line.strip_prefix("used_memory:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or(0);
            print_row(
                "Redis",
                &stage,
                tasks,
                &format!(
                    "{} keys, MEMORY USAGE {}; server used_memory {}",
                    keys.len(),
                    mib(bytes),
                    mib(used)
                ),
            );
            Ok::<_, BoxError>(())
        }
    };
    measure("empty".into()).await?;
    for round in 1..=args.rounds {
        let took = deliver(&mut sink.clone(), &store, args.deliveries, &url, &mut served, |stop| {
            let worker = WorkerBuilder::new(worker_name("retention-bench"))
                .backend(redis::worker_backend_with(storage.clone(), CONCURRENCY))
                .concurrency(CONCURRENCY)
                .build(
                    WebhookWorker::new(sink.clone())
                        .egress(EgressPolicy::new().allow_loopback())
                        .service()
                        .unwrap(),
                );
            run_until!(worker, stop)
        })
        .await?;
        eprintln!("redis round {round}: delivered in {:.1} s", took.as_secs_f64());
        measure(format!("round {round}: {} delivered", args.deliveries)).await?;
        let started = Instant::now();
        let report = store.purge(&purge_all()).await?;
        purge_line("Redis", round, args.deliveries, started.elapsed(), &report);
        measure(format!("round {round}: after purge")).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse()?;
    println!("| backend | stage | tasks | size |");
    println!("|---|---|---:|---|");
    for backend in &args.backends {
        match backend.as_str() {
            "sqlite" => sqlite_bench(&args).await?,
            "postgres" => postgres_bench(&args).await?,
            "redis" => redis_bench(&args).await?,
            other => return Err(format!("unknown backend {other}").into()),
        }
    }
    Ok(())
}
