//! Side-by-side delivery benchmark on one machine, over loopback HTTP: `raw` HTTP (the
//! ceiling, no queue), `bare` apalis (the floor of apalis's own cost), `hand-rolled` (an apalis
//! job that signs and sends like we do, retried by apalis), `apalis-webhooks` with its default
//! layers, `apalis-webhooks-batched` (the same, the events sent 100 at a time with
//! `dispatch_many`, on SQLite and Postgres), `webhook-dispatcher` (memory, Postgres) and
//! `webhooksmith` (SQLite, Postgres), on each backend.
//!
//! ```text
//! cd benches/compare && cargo run --release -- [--events N] [--runs R] [--backends memory,sqlite,postgres,redis] [--json FILE]
//! cd benches/compare && cargo run --release -- --backlog 100000 --backends sqlite,postgres,redis
//! cd benches/compare && cargo run --release --bin chart -- FILE out.svg
//! ```
//!
//! Postgres and Redis come from `TEST_POSTGRES_URL` / `TEST_REDIS_URL` (skipped when unset).
//! Rows the Postgres contenders leave in apalis's table are deleted (and the table vacuumed)
//! before each of them, so every one starts on the same table.
//! Each contender gets a fresh queue; events are enqueued by 4 tasks while the worker (64
//! slots) delivers; throughput is events / (first dispatch → last arrival), latency is each
//! event's dispatch → arrival. `--json FILE` writes the medians as
//! `{"rows": [{contender, backend, per_sec, p50_ms, p99_ms, cpu_us, rss_mib}, …]}`; `raw` has
//! the backend `none`.

mod backlog;
mod bare;
mod dispatcher;
mod hand_rolled;
mod raw;
mod receiver;
mod smith;
mod webhooks;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use apalis::prelude::*;
use apalis_webhooks::{
    Secret, WebhookSink, WebhookSubscription,
    backend::{memory, postgres, redis, sqlite, worker_name},
};
use receiver::{PAD, Probe, Receiver, now_us};

pub const CONCURRENCY: usize = 64;
const ENQUEUERS: u64 = 4;
/// Events per `dispatch_many` for the `apalis-webhooks-batched` contender.
const BATCH: u64 = 100;
const PATIENCE: Duration = Duration::from_secs(600);

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Row {
    contender: &'static str,
    backend: &'static str,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU time of this whole process (worker, receiver, enqueuers) per delivery, µs.
    cpu_us: f64,
    /// Peak resident set of this process while the contender ran, MiB (sampled every 50 ms).
    rss_mib: f64,
}

/// Resident set size of this process, in MiB (from /proc; 0 elsewhere).
pub fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Samples the resident set every 50 ms on a thread of its own (not a runtime task, so a
/// saturated runtime does not skip samples) until `finish` returns the peak.
struct RssSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl RssSampler {
    fn start() -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut peak = rss_mib();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                peak = peak.max(rss_mib());
            }
            peak
        });
        Self { stop, thread }
    }

    fn finish(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let peak = self.thread.join().unwrap_or(0.0);
        peak.max(rss_mib())
    }
}

fn print_row(row: &Row) {
    eprintln!(
        "{:>18} {:>8}: {:>8.0}/s  p50 {:>8.1} ms  p99 {:>8.1} ms  cpu {:>5.1} µs  rss {:>6.1} MiB",
        row.contender, row.backend, row.per_sec, row.p50_ms, row.p99_ms, row.cpu_us, row.rss_mib
    );
}

/// User + system CPU time of this process so far, in µs (from /proc; 0 elsewhere).
fn process_cpu_us() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the `(comm)`: state is 3rd, utime 14th, stime 15th (clock ticks of 10 ms).
    let after = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) * 10_000.0
}

/// Runs `enqueue(seq)` for every event from `ENQUEUERS` tasks, waits for all to arrive, and
/// reports. `stop` ends the worker afterwards.
async fn measure<F, Fut>(
    receiver: &mut Receiver,
    events: u64,
    contender: &'static str,
    backend: &'static str,
    enqueue: F,
) -> Row
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    measure_batched(receiver, events, 1, contender, backend, move |seqs: Vec<u64>| {
        let enqueue = enqueue.clone();
        async move {
            for seq in seqs {
                enqueue(seq).await;
            }
        }
    })
    .await
}

/// As [`measure`], each enqueuing task handing `enqueue` its next `batch` events at once.
async fn measure_batched<F, Fut>(
    receiver: &mut Receiver,
    events: u64,
    batch: u64,
    contender: &'static str,
    backend: &'static str,
    enqueue: F,
) -> Row
where
    F: Fn(Vec<u64>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let before = receiver.arrived();
    let _ = receiver.take_latencies();
    let sampler = RssSampler::start();
    let cpu_before = process_cpu_us();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for lane in 0..ENQUEUERS {
        let enqueue = enqueue.clone();
        tasks.push(tokio::spawn(async move {
            let mut seq = lane;
            while seq < events {
                let mut seqs = Vec::with_capacity(batch as usize);
                while seq < events && (seqs.len() as u64) < batch {
                    seqs.push(seq);
                    seq += ENQUEUERS;
                }
                enqueue(seqs).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    tokio::time::timeout(PATIENCE, receiver.wait_for(before + events as usize))
        .await
        .unwrap_or_else(|_| panic!("{contender} on {backend}: not every event arrived"));
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_us = (process_cpu_us() - cpu_before) / events as f64;
    let rss_mib = sampler.finish();
    let (p50_ms, p99_ms) = receiver.take_latencies();
    let row = Row {
        contender,
        backend,
        per_sec: events as f64 / elapsed,
        p50_ms,
        p99_ms,
        cpu_us,
        rss_mib,
    };
    print_row(&row);
    row
}

fn stop_signal() -> (
    tokio::sync::oneshot::Sender<()>,
    impl Future<Output = Result<(), WorkerError>> + Send,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    (stop, async move {
        let _ = stopped.await;
        Ok(())
    })
}

fn bare_job(url: &str, seq: u64) -> bare::BareJob {
    bare::BareJob {
        url: url.to_owned(),
        body: receiver::body(seq),
    }
}

/// Dispatches event `seq` through apalis-webhooks into `sink`.
async fn dispatch<S: WebhookSink<K>, K>(subscription: &WebhookSubscription, sink: &mut S, seq: u64) {
    let probe = Probe {
        seq,
        t: now_us(),
        pad: PAD,
    };
    subscription
        .dispatch(sink, "bench.event", &probe)
        .await
        .expect("dispatch");
}

/// Dispatches events `seqs` through apalis-webhooks into `sink` as one batch (one round trip).
async fn dispatch_many<S: WebhookSink<K>, K>(subscription: &WebhookSubscription, sink: &mut S, seqs: Vec<u64>) {
    let probes: Vec<Probe> = seqs
        .into_iter()
        .map(|seq| Probe {
            seq,
            t: now_us(),
            pad: PAD,
        })
        .collect();
    subscription
        .dispatch_many(sink, "bench.event", &probes)
        .await
        .expect("dispatch_many");
}

async fn run_backend(
    backend: &'static str,
    receiver: &mut Receiver,
    events: u64,
    rows: &mut Vec<Row>,
) -> Result<(), Error> {
    let url = receiver.url.clone();
    let client = reqwest::Client::new();
    let subscription = WebhookSubscription::new(url.clone(), Secret::generate());
    // The hand-rolled contender's secret, as a `whsec_…` string like a team would store it.
    let secret = Secret::generate()
        .expose_text()
        .expect("a generated secret is text")
        .to_owned();
    let queue = |who: &str| format!("bench-{who}-{}", ulid::Ulid::new());
    match backend {
        "memory" => {
            // Bare: apalis's memory storage, fed straight through its channel.
            let (tx, rx) = futures_channel();
            let storage = apalis_core::backend::memory::MemoryStorage::new_with(sink_for(&tx), rx);
            let (stop, until) = stop_signal();
            let worker = WorkerBuilder::new(worker_name("bare"))
                .backend(storage)
                .data(client.clone())
                .concurrency(CONCURRENCY)
                .build(bare::post);
            let handle = tokio::spawn(worker.run_until(until));
            let enqueue = move |seq| {
                let (tx, url) = (tx.clone(), url.clone());
                async move {
                    tx.unbounded_send(apalis_core::task::builder::TaskBuilder::new(bare_job(&url, seq)).build())
                        .unwrap();
                }
            };
            rows.push(measure(receiver, events, "bare", backend, enqueue).await);
            let _ = stop.send(());
            handle.await??;

            let (tx, rx) = futures_channel();
            let storage = apalis_core::backend::memory::MemoryStorage::new_with(sink_for(&tx), rx);
            let (stop, until) = stop_signal();
            let worker = WorkerBuilder::new(worker_name("hand-rolled"))
                .backend(storage)
                .data(hand_rolled::client())
                .retry(hand_rolled::retry_policy())
                .concurrency(CONCURRENCY)
                .build(hand_rolled::deliver);
            let handle = tokio::spawn(worker.run_until(until));
            let (url2, secret2) = (receiver.url.clone(), secret.clone());
            let enqueue = move |seq| {
                let (tx, url, secret) = (tx.clone(), url2.clone(), secret2.clone());
                async move {
                    tx.unbounded_send(
                        apalis_core::task::builder::TaskBuilder::new(hand_rolled::job(&url, &secret, seq)).build(),
                    )
                    .unwrap();
                }
            };
            rows.push(measure(receiver, events, "hand-rolled", backend, enqueue).await);
            let _ = stop.send(());
            handle.await??;

            let (storage, sink) = memory::storage();
            let (stop, until) = stop_signal();
            let worker = WorkerBuilder::new(worker_name("webhooks"))
                .backend(storage)
                .concurrency(CONCURRENCY)
                .build(webhooks::service(sink.clone()));
            let handle = tokio::spawn(worker.run_until(until));
            let enqueue = move |seq| {
                let (subscription, mut sink) = (subscription.clone(), sink.clone());
                async move { dispatch(&subscription, &mut sink, seq).await }
            };
            rows.push(measure(receiver, events, "apalis-webhooks", backend, enqueue).await);
            let _ = stop.send(());
            handle.await??;

            let (dispatcher, endpoint) = dispatcher::in_memory(&receiver.url).await;
            let run = ulid::Ulid::new().to_string();
            let enqueue = move |seq| {
                let (dispatcher, endpoint, run) = (Arc::clone(&dispatcher), endpoint.clone(), run.clone());
                async move { dispatcher::send(&dispatcher, &endpoint, &run, seq).await }
            };
            rows.push(measure(receiver, events, "webhook-dispatcher", backend, enqueue).await);
        }
        "sqlite" => {
            let dir = tempfile::tempdir()?;
            let pool = sqlite::connect(&format!("sqlite://{}", dir.path().join("bench.db").display())).await?;

            let storage = apalis_sqlite::SqliteStorage::<bare::BareJob>::new(&pool)
                .with_config(sqlite::config().queue(queue("bare")));
            let (stop, until) = stop_signal();
            let worker = WorkerBuilder::new(worker_name("bare"))
                .backend(sqlite::worker_backend(storage.clone()))
                .data(client.clone())
                .concurrency(CONCURRENCY)
                .build(bare::post);
            let handle = tokio::spawn(worker.run_until(until));
            let url2 = url.clone();
            let enqueue = move |seq| {
                let (mut storage, url) = (storage.clone(), url2.clone());
                async move { storage.push(bare_job(&url, seq)).await.expect("push") }
            };
            rows.push(measure(receiver, events, "bare", backend, enqueue).await);
            let _ = stop.send(());
            handle.await??;

            let storage = apalis_sqlite::SqliteStorage::<hand_rolled::HandRolledJob>::new(&pool)
                .with_config(sqlite::config().queue(queue("hand-rolled")));
            let (stop, until) = stop_signal();
            let worker = WorkerBuilder::new(worker_name("hand-rolled"))
                .backend(sqlite::worker_backend(storage.clone()))
                .data(hand_rolled::client())
                .retry(hand_rolled::retry_policy())
                .concurrency(CONCURRENCY)
                .build(hand_rolled::deliver);
            let handle = tokio::spawn(worker.run_until(until));
            let (url2, secret2) = (url.clone(), secret.clone());
            let enqueue = move |seq| {
                let (mut storage, url, secret) = (storage.clone(), url2.clone(), secret2.clone());
                async move { storage.push(hand_rolled::job(&url, &secret, seq)).await.expect("push") }
            };
            rows.push(measure(receiver, events, "hand-rolled", backend, enqueue).await);
            let _ = stop.send(());
            handle.await??;

            let storage = apalis_sqlite::SqliteStorage::<apalis_webhooks::WebhookJob>::new(&pool)
                .with_config(sqlite::config().queue(queue("webhooks")));
            let (stop, until) = stop_signal();
            let worker = WorkerBuilder::new(worker_name("webhooks"))
                .backend(sqlite::worker_backend(storage.clone()))
                .concurrency(CONCURRENCY)
                .build(webhooks::service(storage.clone()));
            let handle = tokio::spawn(worker.run_until(until));
            let subscription2 = subscription.clone();
            let enqueue = move |seq| {
                let (subscription, mut sink) = (subscription2.clone(), storage.clone());
                async move { dispatch(&subscription, &mut sink, seq).await }
            };
            rows.push(measure(receiver, events, "apalis-webhooks", backend, enqueue).await);
            let _ = stop.send(());
            handle.await??;

            // The same, the events dispatched `BATCH` at a time (`dispatch_many`).
            let storage = apalis_sqlite::SqliteStorage::<apalis_webhooks::WebhookJob>::new(&pool)
                .with_config(sqlite::config().queue(queue("webhooks-batched")));
            let (stop, until) = stop_signal();
            let worker = WorkerBuilder::new(worker_name("webhooks-batched"))
                .backend(sqlite::worker_backend(storage.clone()))
                .concurrency(CONCURRENCY)
                .build(webhooks::service(storage.clone()));
            let handle = tokio::spawn(worker.run_until(until));
            let enqueue = move |seqs| {
                let (subscription, mut sink) = (subscription.clone(), storage.clone());
                async move { dispatch_many(&subscription, &mut sink, seqs).await }
            };
            rows.push(measure_batched(receiver, events, BATCH, "apalis-webhooks-batched", backend, enqueue).await);
            let _ = stop.send(());
            handle.await??;

            let smith = smith::Smith::on_sqlite(dir.path(), &receiver.url).await?;
            rows.push(run_smith(receiver, events, backend, smith).await?);
        }
        "postgres" => {
            let Ok(database_url) = std::env::var("TEST_POSTGRES_URL") else {
                eprintln!("skipping postgres: set TEST_POSTGRES_URL");
                return Ok(());
            };
            let pool = postgres::connect(&database_url).await?;
            seed_postgres_history(&database_url).await?;
            clear_postgres(&database_url).await?;

            let storage = apalis_postgres::PostgresStorage::<bare::BareJob>::new(&pool)
                .with_config(postgres::config().queue(queue("bare")));
            let (stop, until) = stop_signal();
            let worker = WorkerBuilder::new(worker_name("bare"))
                .backend(postgres::worker_backend_with(storage.clone(), CONCURRENCY))
                .data(client.clone())
                .concurrency(CONCURRENCY)
                .build(bare::post);
            let handle = tokio::spawn(worker.run_until(until));
            let url2 = url.clone();
            let enqueue = move |seq| {
                let (mut storage, url) = (storage.clone(), url2.clone());
                async move { storage.push(bare_job(&url, seq)).await.expect("push") }
            };
            rows.push(measure(receiver, events, "bare", backend, enqueue).await);
            let _ = stop.send(());
            handle.await??;
            clear_postgres(&database_url).await?;

            let storage = apalis_postgres::PostgresStorage::<hand_rolled::HandRolledJob>::new(&pool)
                .with_config(postgres::config().queue(queue("hand-rolled")));
            let (stop, until) = stop_signal();
            let worker = WorkerBuilder::new(worker_name("hand-rolled"))
                .backend(postgres::worker_backend_with(storage.clone(), CONCURRENCY))
                .data(hand_rolled::client())
                .retry(hand_rolled::retry_policy())
                .concurrency(CONCURRENCY)
                .build(hand_rolled::deliver);
            let handle = tokio::spawn(worker.run_until(until));
            let (url2, secret2) = (url.clone(), secret.clone());
            let enqueue = move |seq| {
                let (mut storage, url, secret) = (storage.clone(), url2.clone(), secret2.clone());
                async move { storage.push(hand_rolled::job(&url, &secret, seq)).await.expect("push") }
            };
            rows.push(measure(receiver, events, "hand-rolled", backend, enqueue).await);
            let _ = stop.send(());
            handle.await??;
            clear_postgres(&database_url).await?;

            let storage = apalis_postgres::PostgresStorage::<apalis_webhooks::WebhookJob>::new(&pool)
                .with_config(postgres::config().queue(queue("webhooks")));
            let sink = postgres::PostgresSink::new(&storage);
            let (stop, until) = stop_signal();
            let worker = WorkerBuilder::new(worker_name("webhooks"))
                .backend(postgres::worker_backend_with(storage, CONCURRENCY))
                .concurrency(CONCURRENCY)
                .build(webhooks::service(sink.clone()));
            let handle = tokio::spawn(worker.run_until(until));
            let subscription2 = subscription.clone();
            let enqueue = move |seq| {
                let (subscription, mut sink) = (subscription2.clone(), sink.clone());
                async move { dispatch(&subscription, &mut sink, seq).await }
            };
            rows.push(measure(receiver, events, "apalis-webhooks", backend, enqueue).await);
            let _ = stop.send(());
            handle.await??;
            clear_postgres(&database_url).await?;

            // The same, the events dispatched `BATCH` at a time (`dispatch_many`).
            let storage = apalis_postgres::PostgresStorage::<apalis_webhooks::WebhookJob>::new(&pool)
                .with_config(postgres::config().queue(queue("webhooks-batched")));
            let sink = postgres::PostgresSink::new(&storage);
            let (stop, until) = stop_signal();
            let worker = WorkerBuilder::new(worker_name("webhooks-batched"))
                .backend(postgres::worker_backend_with(storage, CONCURRENCY))
                .concurrency(CONCURRENCY)
                .build(webhooks::service(sink.clone()));
            let handle = tokio::spawn(worker.run_until(until));
            let enqueue = move |seqs| {
                let (subscription, mut sink) = (subscription.clone(), sink.clone());
                async move { dispatch_many(&subscription, &mut sink, seqs).await }
            };
            rows.push(measure_batched(receiver, events, BATCH, "apalis-webhooks-batched", backend, enqueue).await);
            let _ = stop.send(());
            handle.await??;
            clear_postgres(&database_url).await?;

            let (dispatcher, endpoint, schema) = dispatcher::on_postgres(&database_url, &receiver.url).await?;
            let run = ulid::Ulid::new().to_string();
            let enqueue = move |seq| {
                let (dispatcher, endpoint, run) = (Arc::clone(&dispatcher), endpoint.clone(), run.clone());
                async move { dispatcher::send(&dispatcher, &endpoint, &run, seq).await }
            };
            rows.push(measure(receiver, events, "webhook-dispatcher", backend, enqueue).await);
            dispatcher::drop_schema(&database_url, &schema).await?;

            let (smith, schema) = smith::Smith::on_postgres(&database_url, &receiver.url).await?;
            rows.push(run_smith(receiver, events, backend, smith).await?);
            dispatcher::drop_schema(&database_url, &schema).await?;
            unseed_postgres_history(&database_url).await?;
        }
        "redis" => {
            let Ok(redis_url) = std::env::var("TEST_REDIS_URL") else {
                eprintln!("skipping redis: set TEST_REDIS_URL");
                return Ok(());
            };
            let conn = redis::connect(&redis_url).await?;

            let storage = apalis_redis::RedisStorage::<bare::BareJob>::new(conn.clone())
                .with_config(redis::config().queue(queue("bare")));
            let (stop, until) = stop_signal();
            let worker = WorkerBuilder::new(worker_name("bare"))
                .backend(redis::worker_backend_with(storage.clone(), CONCURRENCY))
                .data(client.clone())
                .concurrency(CONCURRENCY)
                .build(bare::post);
            let handle = tokio::spawn(worker.run_until(until));
            let url2 = url.clone();
            let enqueue = move |seq| {
                let (mut storage, url) = (storage.clone(), url2.clone());
                async move { storage.push(bare_job(&url, seq)).await.expect("push") }
            };
            rows.push(measure(receiver, events, "bare", backend, enqueue).await);
            let _ = stop.send(());
            handle.await??;

            let storage = apalis_redis::RedisStorage::<hand_rolled::HandRolledJob>::new(conn.clone())
                .with_config(redis::config().queue(queue("hand-rolled")));
            let (stop, until) = stop_signal();
            let worker = WorkerBuilder::new(worker_name("hand-rolled"))
                .backend(redis::worker_backend_with(storage.clone(), CONCURRENCY))
                .data(hand_rolled::client())
                .retry(hand_rolled::retry_policy())
                .concurrency(CONCURRENCY)
                .build(hand_rolled::deliver);
            let handle = tokio::spawn(worker.run_until(until));
            let (url2, secret2) = (url.clone(), secret.clone());
            let enqueue = move |seq| {
                let (mut storage, url, secret) = (storage.clone(), url2.clone(), secret2.clone());
                async move { storage.push(hand_rolled::job(&url, &secret, seq)).await.expect("push") }
            };
            rows.push(measure(receiver, events, "hand-rolled", backend, enqueue).await);
            let _ = stop.send(());
            handle.await??;

            let storage = apalis_redis::RedisStorage::<apalis_webhooks::WebhookJob>::new(conn)
                .with_config(redis::config().queue(queue("webhooks")));
            let sink = redis::RedisSink::new(&storage);
            let (stop, until) = stop_signal();
            let worker = WorkerBuilder::new(worker_name("webhooks"))
                .backend(redis::worker_backend_with(storage, CONCURRENCY))
                .concurrency(CONCURRENCY)
                .build(webhooks::service(sink.clone()));
            let handle = tokio::spawn(worker.run_until(until));
            let enqueue = move |seq| {
                let (subscription, mut sink) = (subscription.clone(), sink.clone());
                async move { dispatch(&subscription, &mut sink, seq).await }
            };
            rows.push(measure(receiver, events, "apalis-webhooks", backend, enqueue).await);
            let _ = stop.send(());
            handle.await??;
        }
        other => return Err(format!("unknown backend {other}").into()),
    }
    Ok(())
}

/// Rows of delivered history in apalis's table while the Postgres contenders run.
const HISTORY_ROWS: i64 = 100_000;

/// Gives apalis's table a history of [`HISTORY_ROWS`] done tasks (in a queue of their own),
/// as a production table has until retention purges it. On a nearly empty table, apalis's
/// fetch runs with the plan statistics of an empty table and every contender drains several
/// times slower (measured: 1,230/s against 5,190/s for a 40,000 backlog), which is not the
/// state a worker lives in.
async fn seed_postgres_history(database_url: &str) -> Result<(), Error> {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .execute("DELETE FROM apalis.jobs WHERE job_type = 'benchhist'", &[])
        .await?;
    client
        .execute(
            "INSERT INTO apalis.jobs (job, id, job_type, status, attempts, max_attempts, run_at, priority, done_at) \
             SELECT convert_to(repeat('x', 1500), 'UTF8'), 'benchhist-' || g, 'benchhist', 'Done', 1, 25, now(), 0, now() \
             FROM generate_series(1, $1::bigint) g",
            &[&HISTORY_ROWS],
        )
        .await?;
    Ok(())
}

/// Removes the history [`seed_postgres_history`] wrote.
async fn unseed_postgres_history(database_url: &str) -> Result<(), Error> {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .execute("DELETE FROM apalis.jobs WHERE job_type = 'benchhist'", &[])
        .await?;
    client.execute("VACUUM (ANALYZE) apalis.jobs", &[]).await?;
    Ok(())
}

/// Deletes the rows earlier contenders (and earlier invocations) left in apalis's table, and
/// vacuums it, so every contender starts on the same table (outside the measured window).
async fn clear_postgres(database_url: &str) -> Result<(), Error> {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .execute("DELETE FROM apalis.jobs WHERE job_type LIKE 'bench-%'", &[])
        .await?;
    client.execute("VACUUM (ANALYZE) apalis.jobs", &[]).await?;
    Ok(())
}

/// Measures webhooksmith: its delivery loop runs while the events are sent, and stops after.
async fn run_smith(
    receiver: &mut Receiver,
    events: u64,
    backend: &'static str,
    smith: smith::Smith,
) -> Result<Row, Error> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(smith.clone().run(async move {
        let _ = stopped.await;
    }));
    let enqueue = move |seq| {
        let smith = smith.clone();
        async move { smith.send(seq).await }
    };
    let row = measure(receiver, events, "webhooksmith", backend, enqueue).await;
    let _ = stop.send(());
    handle.await?;
    Ok(row)
}

/// `{"rows": [{contender, backend, per_sec, p50_ms, p99_ms, cpu_us, rss_mib}, …]}`, the figures
/// being the medians over the runs; `benches/compare/src/bin/chart.rs` draws it.
fn json_rows(rows: &[Row]) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| {
            serde_json::json!({
                "contender": row.contender,
                "backend": row.backend,
                "per_sec": row.per_sec,
                "p50_ms": row.p50_ms,
                "p99_ms": row.p99_ms,
                "cpu_us": row.cpu_us,
                "rss_mib": row.rss_mib,
            })
        })
        .collect();
    serde_json::json!({ "rows": rows })
}

/// One row per contender and backend, each figure the median over the runs.
fn medians(all: &[Row]) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    for row in all {
        if rows
            .iter()
            .any(|r| r.contender == row.contender && r.backend == row.backend)
        {
            continue;
        }
        let same: Vec<&Row> = all
            .iter()
            .filter(|r| r.contender == row.contender && r.backend == row.backend)
            .collect();
        let median = |field: fn(&Row) -> f64| {
            let mut values: Vec<f64> = same.iter().map(|r| field(r)).collect();
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        rows.push(Row {
            contender: row.contender,
            backend: row.backend,
            per_sec: median(|r| r.per_sec),
            p50_ms: median(|r| r.p50_ms),
            p99_ms: median(|r| r.p99_ms),
            cpu_us: median(|r| r.cpu_us),
            rss_mib: median(|r| r.rss_mib),
        });
    }
    rows
}

type MemoryTask<T> = apalis_core::task::Task<T>;

fn futures_channel<T: Send + 'static>() -> (
    futures::channel::mpsc::UnboundedSender<MemoryTask<T>>,
    futures::stream::BoxStream<'static, MemoryTask<T>>,
) {
    use futures::StreamExt;
    let (tx, rx) = futures::channel::mpsc::unbounded();
    (tx, rx.boxed())
}

fn sink_for<T: Send + 'static>(
    tx: &futures::channel::mpsc::UnboundedSender<MemoryTask<T>>,
) -> apalis_core::backend::memory::MemorySink<T> {
    use futures::SinkExt;
    let sink = tx
        .clone()
        .sink_map_err(apalis_core::backend::memory::MemoryStorageError::from);
    apalis_core::backend::memory::MemorySink::new(std::sync::Arc::new(futures::lock::Mutex::new(Box::new(sink))))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut events = 10_000u64;
    let mut runs = 3usize;
    let mut backlog_events = 0u64;
    let mut backends = vec!["memory", "sqlite", "postgres", "redis"];
    let mut json: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or("a flag without a value")?;
        match flag.as_str() {
            "--events" => events = value.parse()?,
            "--runs" => runs = value.parse::<usize>()?.max(1),
            "--backlog" => backlog_events = value.parse()?,
            "--json" => json = Some(value),
            "--backends" => {
                backends = value
                    .split(',')
                    .map(|b| match b {
                        "memory" => Ok("memory"),
                        "sqlite" => Ok("sqlite"),
                        "postgres" => Ok("postgres"),
                        "redis" => Ok("redis"),
                        other => Err(format!("unknown backend {other}")),
                    })
                    .collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let mut receiver = Receiver::start().await;
    if backlog_events > 0 {
        println!("| backend | backlog | drained deliveries/s | peak RSS MiB (before the backlog) |");
        println!("|---|---:|---:|---:|");
        for backend in &backends {
            if let Some((rate, peak, baseline)) = backlog::run(backend, &mut receiver, backlog_events).await? {
                println!("| {backend} | {backlog_events} | {rate:.0} | {peak:.0} ({baseline:.0}) |");
            }
        }
        return Ok(());
    }
    let mut all = Vec::new();
    for run in 1..=runs {
        eprintln!("run {run} of {runs}");
        let before = receiver.arrived();
        let sampler = RssSampler::start();
        let cpu_before = process_cpu_us();
        let started = Instant::now();
        raw::run(&receiver.url, events, &Secret::generate()).await;
        receiver.wait_for(before + events as usize).await;
        let per_sec = events as f64 / started.elapsed().as_secs_f64();
        let cpu_us = (process_cpu_us() - cpu_before) / events as f64;
        let rss_mib = sampler.finish();
        let (p50_ms, p99_ms) = receiver.take_latencies();
        let row = Row {
            contender: "raw",
            // No queue, so no backend.
            backend: "none",
            per_sec,
            p50_ms,
            p99_ms,
            cpu_us,
            rss_mib,
        };
        print_row(&row);
        all.push(row);
        for backend in &backends {
            run_backend(backend, &mut receiver, events, &mut all).await?;
        }
    }
    let rows = medians(&all);

    println!("\n{events} events of 1 KiB, 64 in flight, loopback receiver answering 204; median of {runs} runs\n");
    println!(
        "| contender | backend | deliveries/s | p50 ms | p99 ms | vs bare | process CPU µs/delivery | peak RSS MiB |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let bare = rows
            .iter()
            .find(|r| r.backend == row.backend && r.contender == "bare")
            .map(|bare| format!("{:.2}×", row.per_sec / bare.per_sec))
            .unwrap_or_default();
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {bare} | {:.1} | {:.1} |",
            row.contender, row.backend, row.per_sec, row.p50_ms, row.p99_ms, row.cpu_us, row.rss_mib
        );
    }
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&json_rows(&rows))?)?;
        eprintln!("wrote {path}");
    }
    Ok(())
}
